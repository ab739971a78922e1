"""Noise-aware digits classifier p(y | x_t, t) for classifier guidance of the digits model.

python -m launch.train_classifier --config configs/digits_classifier.py --workdir workdirs/digits_classifier
The schedule must be the diffusion model's (configs/digits.py: cosine, T = 1000).
"""

from jdiff.train.config import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 128

    # Fields of jdiff.models.NoiseAwareClassifier: the U-Net's downsampling trunk + pooling head.
    c.model.num_classes = 10
    c.model.pool = "attention"
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.num_heads = 2
    c.model.dropout = 0.1

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.99
    c.optim.ema_warmup = True

    c.train.num_steps = 1500
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    return c
