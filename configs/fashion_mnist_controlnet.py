"""ControlNet on Canny edges over the Fashion-MNIST 28x28 model (Zhang et al. 2023).

python -m launch.train --config configs/fashion_mnist_controlnet.py --config.base_workdir workdirs/fm28 --workdir workdirs/fm28_cn
python -m launch.train --config configs/fashion_mnist_controlnet.py:lora --config.base_workdir workdirs/fm28 --workdir workdirs/fm28_cn_lora
python -m launch.train --config configs/fashion_mnist_controlnet.py:small --config.base_workdir BASE --workdir /tmp/cn  # test-sized
python -m launch.sample --workdir workdirs/fm28_cn --control EDGES.png --control_scale 1.0 --label 0 --out x.png

The base workdir (configs/fashion_mnist.py) supplies the U-Net, its diffusion section and its
weights (jdiff.train.adapt.resolve_base): the base U-Net is frozen ("base/..."), the ControlNet
("control_0/...": a hint encoder, a copy of the base's encoder initialised from its weights, and
zero convs) is all that trains. Each training image's control is its Canny edge map
(sigma 1.5, jdiff.data.controls), computed once when the data loads. Labels keep the base's
dropout (p 0.1), so the controlled model samples with and without classifier-free guidance.

":lora" trains LoRA factors (rank 8) on the copy's encoder instead of the whole copy, with the
hint encoder and zero convs (new layers, nothing to adapt) trained in full.
"""

import ml_collections

from configs import fashion_mnist


def get_config(arg=None):
    if arg not in (None, "", "small", "lora", "small_lora"):
        raise ValueError(f"arg: expected None, 'small', 'lora' or 'small_lora', got {arg!r}")
    small = arg in ("small", "small_lora")
    lora = arg in ("lora", "small_lora")
    c = fashion_mnist.get_config("small" if small else None)
    c.base_workdir = ""  # required: --config.base_workdir=DIR, a configs/fashion_mnist.py workdir
    c.model_name = "controlnet"
    control = ml_collections.ConfigDict()
    control.control_channels = (1,)  # one Canny edge map
    control.control_scale = (1.0,)
    control.hint_channels = (8,) if small else (16, 32)
    c.model = control
    c.train.trainable = "control_0/.*"
    if lora:
        c.model_name = "lora"
        c.model = ml_collections.ConfigDict({"model_name": "controlnet", "model": control.to_dict(), "rank": 8,
                                             "alpha": 8.0, "targets": "control_0/encoder/.*kernel"})
        c.train.trainable = "lora/.*|model/control_0/(hint_.*|zero_conv_.*)"
    c.data.control = "canny"
    c.data.control_kwargs.sigma = 1.5
    if small:
        return c
    c.optim.lr = 5e-4 if lora else 2e-4  # a larger rate for the LoRA factors (common practice; not tuned here)
    c.optim.warmup_steps = 100
    c.train.num_steps = 1200
    c.train.checkpoint_every = 200
    c.train.sample_every = 0
    # Scored by benchmarks/adapt.py (edge F1 and FID of samples controlled by test images' edges).
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    return c
