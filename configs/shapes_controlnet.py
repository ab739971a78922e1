"""ControlNet on object masks over the 16x16 shapes model (configs/shapes.py; Zhang et al. 2023).

python -m launch.train --config configs/shapes_controlnet.py --config.base_workdir workdirs/shapes16 --workdir workdirs/shapes16_cn

The control is the shapes generator's exact object mask (config.data.control = "mask",
jdiff.data.controls): the sample should put a shape of that outline there, in any colour. The base
U-Net comes from --config.base_workdir and stays frozen; only "control_0/..." trains.
"""

import ml_collections

from configs import shapes


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"arg: expected None, got {arg!r}")
    c = shapes.get_config()
    c.base_workdir = ""  # required: --config.base_workdir=DIR, a configs/shapes.py workdir
    c.model_name = "controlnet"
    c.model = ml_collections.ConfigDict({"control_channels": (1,), "control_scale": (1.0,), "hint_channels": (16, 32)})
    c.train.trainable = "control_0/.*"
    c.data.control = "mask"
    c.optim.lr = 2e-4
    c.train.num_steps = 800
    c.train.checkpoint_every = 200
    return c
