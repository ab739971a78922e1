"""A mask-channel inpainting model on Fashion-MNIST 28x28, fine-tuned from configs/fashion_mnist.py.

python -m launch.train --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist       # the base
python -m launch.train --config configs/fashion_mnist_inpaint.py --workdir workdirs/fashion_mnist_inpaint
python -m launch.sample --workdir workdirs/fashion_mnist_inpaint --inpaint shirt.png --mask mask.png --out x.png

GLIDE's recipe (Nichol et al. 2022, sec. 4): the base network with the masked image and the mask
as extra input channels, cond["image"] = [m * x0, m] (1 = known), made inside the train step by
the "inpaint" batch transform from random boxes, free-form strokes, halves and outpainting
borders (jdiff.editing.random_masks); the new input channels of the first conv start at zero
(jdiff.train.state.overlay_params), so step 0 is the base model. ":scratch" trains it from a
random init instead; ":small" is the test-sized variant on the 300 shipped images (from scratch).
The base path is ``config.train.init_from`` (--config.train.init_from=W for another one).
At 1,000 steps the completions still partly copied the grey fill of the hole (seam ratio 2.0-2.5
in benchmarks/inpainting.py); at 2,500 it is 1.2-1.35 (BENCHMARKS.md).

benchmarks/inpainting.py compares it with naive replacement and RePaint on the base model.
"""

from configs import fashion_mnist


def get_config(arg=None):
    c = fashion_mnist.get_config("small" if arg == "small" else None)
    c.data.transform = "inpaint"  # cond["image"] = [m * x0, m] per example, inside the train step
    c.data.transform_kwargs.kinds = ("box", "stroke", "half", "border")
    c.model.image_channels = 2  # the masked image (1 channel) and the mask

    c.eval.num_samples = 0  # completions are scored against their own images by benchmarks/inpainting.py
    if arg == "small":
        return c
    c.train.init_from = "workdirs/fashion_mnist"
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 100
    c.train.num_steps = 2500  # ~0.7-1.0 s per step on 2 CPU cores, as the base: ~35-45 minutes
    c.train.sample_every = 0
    if arg == "scratch":
        c.train.init_from = ""
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 200
    elif arg not in (None, ""):
        raise ValueError(f"arg: expected None, 'scratch' or 'small', got {arg!r}")
    return c
