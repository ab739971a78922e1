"""jdiff: diffusion models in JAX/Flax.

Math is pure functions over a :class:`~jdiff.schedules.Schedule` pytree; every sampler is a
step function plus one ``lax.scan``; networks are Flax modules that know nothing of diffusion.
"""

from jdiff import diffusion, losses, schedules
from jdiff.diffusion import (
    p_mean_variance,
    predict_eps,
    predict_eps_from_v,
    predict_v,
    predict_x0,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior,
    q_sample,
)
from jdiff.schedules import Schedule

__version__ = "0.1.0"

from jdiff import cascade, conditioning, edm, editing, guidance, metrics, models, parallel, samplers, testing
from jdiff.samplers import SampleOutput, ddim_invert, ddim_step, ddpm_step, sample

__all__ = [
    "Schedule",
    "SampleOutput",
    "cascade",
    "conditioning",
    "edm",
    "editing",
    "ddim_invert",
    "ddim_step",
    "ddpm_step",
    "diffusion",
    "guidance",
    "losses",
    "metrics",
    "models",
    "p_mean_variance",
    "predict_eps",
    "predict_eps_from_v",
    "predict_v",
    "predict_x0",
    "predict_x0_from_v",
    "q_mean_variance",
    "q_posterior",
    "q_sample",
    "sample",
    "samplers",
    "schedules",
    "testing",
]
