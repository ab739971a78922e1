"""Class-conditional DDPM on the shapes generator at 16x16 (a disc, square or triangle of random size,
place and colour; jdiff.data.shapes): the base model of configs/shapes_controlnet.py.

python -m launch.train --config configs/shapes.py --workdir workdirs/shapes16

The label is the shape type; labels are dropped with probability 0.1 (classifier-free guidance).
No feature network scores shapes, so training ends without an evaluation; the ControlNet benchmark
measures the mask IoU of controlled samples instead (python -m benchmarks.adapt controlnet_shapes).
"""

from jdiff.train.config import base_config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"arg: expected None, got {arg!r}")
    c = base_config()
    c.data.name = "shapes"
    c.data.resolution = 16
    c.data.num_examples = 10000
    c.data.batch_size = 32
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)
    c.model.num_heads = 2
    c.model.dropout = 0.0
    c.model.num_classes = 3
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.p_uncond = 0.1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True
    c.train.num_steps = 2000
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.sample_every = 0
    c.sample.num = 36
    c.sample.method = "dpm_solver++"
    c.sample.steps = 25
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    return c
