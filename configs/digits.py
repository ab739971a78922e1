"""The main job: a class-conditional DDPM on the embedded 8x8 digits, a few minutes on 2 CPU cores.

python -m launch.train --config configs/digits.py --workdir workdirs/digits
Labels are dropped with probability 0.1, so the same model samples unconditionally (the null
label) and with classifier-free guidance (python -m launch.sample ... --label 3 --guidance 2).
"""

from jdiff.train.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.data.name = "digits"  # 1,497 training images, 8x8x1, 10 classes (embedded, offline)
    c.data.batch_size = 64

    c.model.base_channels = 32
    c.model.channel_mult = (1, 2)  # 8x8 -> 4x4
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.num_heads = 2
    c.model.dropout = 0.1
    c.model.num_classes = 10  # + a null class for classifier-free guidance

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.parameterization = "eps"
    c.diffusion.p_uncond = 0.1

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True

    c.train.num_steps = 3000
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.sample_every = 1500

    c.sample.num = 100  # a 10x10 grid, one row per class
    c.sample.method = "ddpm"
    c.sample.steps = 100  # respaced; as good as 250 on 2,000 samples (BENCHMARKS.md), 2.5x cheaper
    c.sample.guidance = 0.0

    c.eval.num_samples = 500  # scored by the digits classifier (jdiff.evaluation)
    return c
