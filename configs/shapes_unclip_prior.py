"""unCLIP's prior (Ramesh et al. 2022, sec. 2.1) on captioned shapes scenes: a residual-MLP
diffusion model over the clean CLIP's image embeddings (x sqrt(D): [N, 1, 1, 64]) conditioned
on the caption's CLIP text embedding (cond["context"], dropped with probability 0.1); the network
predicts the clean embedding (parameterization "x0"), as DALL-E 2's prior does.

python -m launch.train_clip --workdir workdirs/clip16 --resolution 16 --steps 1500
python -m launch.train --config configs/shapes_unclip_prior.py --workdir workdirs/unclip_prior
(then configs/shapes_unclip_decoder.py; python -m launch.sample --workdir workdirs/unclip_decoder
 --prior_workdir workdirs/unclip_prior --prompt "..." --out x.png)

Samples are embeddings: the run writes samples.npz, not a picture.
"""

from jdiff.train.config import base_config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"arg: expected None, got {arg!r}")
    c = base_config()
    c.data.name = "captioned_shapes"
    c.data.resolution = 16
    c.data.num_examples = 20000
    c.data.batch_size = 128
    c.data.clip_workdir = "workdirs/clip16"
    c.data.clip_embeddings = "prior"
    c.model_name = "embedding_prior"
    c.model.width = 256
    c.model.depth = 4
    c.model.context_dim = 64
    c.model.dropout = 0.0
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.p_uncond = 0.1
    # DALL-E 2 predicts the unnoised embedding directly (sec. 2.1). It also keeps the sampler stable
    # without clipping: with eps-prediction, x_0 = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) at the
    # cosine schedule's last abar (2.4e-9) multiplies the network's error ~2e4-fold.
    c.diffusion.parameterization = "x0"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True
    c.train.num_steps = 5000
    c.train.log_every = 500
    c.train.checkpoint_every = 1000
    c.train.sample_every = 0
    c.sample.num = 16
    c.sample.method = "ddim"
    c.sample.steps = 50
    c.sample.clip = False
    c.sample.guidance = 1.0
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    return c
