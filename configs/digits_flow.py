"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) on the embedded 8x8
digits: the main job's network and budget with the linear path x_t = (1 - t) x0 + t eps and
the velocity target eps - x0, sampled with Euler or Heun.

python -m launch.train --config configs/digits_flow.py --workdir workdirs/digits_flow
python -m launch.sample --workdir workdirs/digits_flow --method euler --steps 50 --num 100 --out flow.png
"""

from configs import digits


def get_config():
    c = digits.get_config()
    c.diffusion.process = "flow"
    c.diffusion.parameterization = "flow"  # v = eps - x0
    c.diffusion.flow_time = "logit_normal"  # Esser et al. 2024, sec. 3.1
    c.model.time_embedding = "fourier"  # t in [0, 1]
    c.sample.method = "heun"
    c.sample.steps = 25
    return c
