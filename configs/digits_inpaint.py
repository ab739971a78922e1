"""A mask-channel inpainting model on the 8x8 digits, fine-tuned from the main job (GLIDE-style).

python -m launch.train --config configs/digits.py --workdir workdirs/digits            # the base
python -m launch.train --config configs/digits_inpaint.py --workdir workdirs/digits_inpaint
python -m launch.train --config configs/digits_inpaint.py:scratch --workdir workdirs/digits_inpaint_scratch
python -m launch.sample --workdir workdirs/digits_inpaint --inpaint digit.png --mask mask.png --out x.png

The network is configs/digits.py's with two more input channels, cond["image"] = [m * x0, m]
(the masked image and the mask, 1 = known), made inside the train step by the "inpaint" batch
transform from random boxes, free-form strokes, halves and outpainting borders
(jdiff.editing.random_masks). Fine-tuning starts from the base's EMA params, the new input
channels of the first conv zero-initialised (jdiff.train.state.overlay_params), so step 0 is the
base model; ":scratch" trains the same network from a random init for comparison. The base path
is ``config.train.init_from`` (--config.train.init_from=W for another one).

benchmarks/inpainting.py compares it with naive replacement and RePaint on the base model.
"""

from configs import digits


def get_config(arg=None):
    c = digits.get_config()
    c.data.transform = "inpaint"  # cond["image"] = [m * x0, m] per example, inside the train step
    c.data.transform_kwargs.kinds = ("box", "stroke", "half", "border")
    c.model.image_channels = 2  # the masked image (1 channel) and the mask

    c.train.init_from = "workdirs/digits"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.train.num_steps = 1500
    c.train.sample_every = 0
    c.sample.num = 100  # completions of training images under random masks, one row per class label
    c.eval.num_samples = 0  # completions are scored against their own images by benchmarks/inpainting.py
    if arg == "scratch":
        c.train.init_from = ""
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 200
    elif arg not in (None, ""):
        raise ValueError(f"arg: expected None or 'scratch', got {arg!r}")
    return c
