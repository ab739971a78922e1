"""EDM (Karras et al. 2022) on the embedded 8x8 digits: the main job's network and budget with
EDM's preconditioning, log-normal sigma and loss weighting, sampled with Heun on Karras sigmas.

python -m launch.train --config configs/digits_edm.py --workdir workdirs/digits_edm
python -m launch.sample --workdir workdirs/digits_edm --method heun --steps 18 --num 100 --out edm.png
"""

from configs import digits


def get_config():
    c = digits.get_config()
    c.diffusion.process = "edm"
    c.diffusion.parameterization = "x0"  # the preconditioned denoiser D(x; sigma)
    c.diffusion.sigma_min = 0.002
    c.diffusion.sigma_max = 80.0
    c.diffusion.sigma_data = 0.5  # digits in [-1, 1] have std ~0.6; EDM's default is close enough
    # The network sees c_noise = ln(sigma) / 4 in about [-1.6, 1.1]: random Fourier features
    # (score SDE) resolve that range, DDPM's sinusoidal embedding is made for integer steps.
    c.model.time_embedding = "fourier"
    c.sample.method = "heun"
    c.sample.steps = 18  # 35 network calls (Karras et al.'s CIFAR-10 setting)
    return c
