"""A network and schedule small enough for tests: trains a step in milliseconds."""

from jdiff.train.config import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 16

    c.model.base_channels = 8
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.num_heads = 1
    c.model.dropout = 0.0
    c.model.num_classes = 10

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 20
    c.diffusion.p_uncond = 0.1

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.ema_decay = 0.9
    c.optim.ema_warmup = True

    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.train.progress = False

    c.sample.num = 16
    c.sample.method = "ddim"
    c.sample.steps = 5
    return c
