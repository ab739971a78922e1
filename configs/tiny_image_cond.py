"""A tiny super-resolution model for tests: the network sees cond["image"], a bilinearly down-
then up-sampled copy of the digit (8x8 -> 4x4 -> 8x8), concatenated to x_t.

python -m launch.train --config configs/tiny_image_cond.py --workdir /tmp/tiny_sr
python -m launch.sample --workdir /tmp/tiny_sr --cond_image low_res.png --num 4 --out sr.png

The "downsample_image" batch transform (jdiff.train.transforms) makes the conditioning inside the
jitted train step; sampling takes it from --cond_image (or cond={"image": ...} in
jdiff.inference.generate). Otherwise the values of configs/tiny.py.
"""

from jdiff.train.config import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 16
    c.data.transform = "downsample_image"  # cond["image"] = up(down(x0)), inside the train step
    c.data.transform_kwargs.factor = 2  # 8x8 -> 4x4 -> 8x8

    c.model_name = "unet"
    c.model.base_channels = 8
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.num_heads = 1
    c.model.dropout = 0.0
    c.model.num_classes = None  # conditioned on the low-resolution image only
    c.model.image_channels = 1  # cond["image"]: [B, 8, 8, 1]

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 20
    c.diffusion.p_uncond = 0.0  # an image has no null value: nothing to drop

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.ema_decay = 0.9
    c.optim.ema_warmup = True

    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.train.progress = False

    c.sample.num = 4
    c.sample.method = "ddim"
    c.sample.steps = 5

    c.eval.evaluator = ""  # the digits classifier scores digits, not their super-resolution
    return c
