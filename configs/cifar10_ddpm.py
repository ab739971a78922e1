"""DDPM on CIFAR-10 with the paper's hyperparameters (Ho et al. 2020, sec. 4 and appendix B).

35.7M-parameter U-Net, linear betas 1e-4..0.02 over T = 1000, L_simple, Adam 2e-4 with
5000 warm-up steps, batch 128, dropout 0.1, EMA 0.9999, random horizontal flips, 800k steps.
Needs the TFDS cifar10 dataset prepared as ArrayRecord (see jdiff.data.tfds_source).
"""

from jdiff.train.config import base_config


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.batch_size = 128
    c.data.random_flip = True

    c.model.base_channels = 128
    c.model.channel_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16,)
    c.model.num_heads = 1
    c.model.dropout = 0.1

    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.parameterization = "eps"
    c.diffusion.variance = "fixed_large"  # DDPM's CIFAR-10 samples use sigma^2 = beta

    c.optim.optimizer = "adam"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.9999

    c.train.num_steps = 800000
    c.train.checkpoint_every = 5000
    c.train.sample_every = 50000

    c.sample.method = "ddpm"
    c.sample.clip = True
    return c
