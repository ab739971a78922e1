"""How far RePaint and guidance inpainting are from the exact conditional, on the Gaussian mixture.

    python -m benchmarks.editing_mixture            # ~2 minutes on 2 cores

A 2-D mixture of two Gaussians (weights 0.4 / 0.6, means (-1, -1.5) / (1, 1.5), stds 0.5 / 0.4,
diagonal) with the first coordinate known (x_1 = 0.2). The exact conditional p(x_2 | x_1) is a
mixture with weights ~ pi_k N(x_1; mu_k1, s_k^2); the reported error is the mass on x_2 > 0
(the weight of the second mode) against its exact value, and the mean/std of x_2. Every method
uses the exact score (jdiff.testing), so what remains is the method's own error:

- RePaint (Lugmayr et al. 2022) with 250 respaced ancestral steps, jump_length 10 and
  jump_n_sample r in {1, 2, 5, 10, 20} (r = 1: plain replacement);
- guidance inpainting (DPS-style: jdiff.guidance.energy with jdiff.editing.inpaint_energy) at
  several scales, 250 ancestral steps. Its known coordinate is only pulled towards x_1, so its
  error on the known coordinate is reported too.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

import jdiff
from jdiff import editing, guidance, schedules
from jdiff.testing import gaussian_mixture

WEIGHTS = np.array([0.4, 0.6])
MEANS = np.array([[-1.0, -1.5], [1.0, 1.5]])
STDS = np.array([0.5, 0.4])
KNOWN = 0.2
N = 20000


def exact_conditional():
    w = WEIGHTS * norm.pdf(KNOWN, MEANS[:, 0], STDS)
    w /= w.sum()
    mass = float(w @ norm.cdf(MEANS[:, 1] / STDS))
    mean = float(w @ MEANS[:, 1])
    std = float(np.sqrt(w @ (STDS**2 + MEANS[:, 1] ** 2) - mean**2))
    return mass, mean, std


def summarize(x):
    x2 = np.asarray(x[:, 1], np.float64)
    return float(np.mean(x2 > 0)), float(x2.mean()), float(x2.std()), float(np.abs(np.asarray(x[:, 0]) - KNOWN).mean())


def main():
    gm = gaussian_mixture(WEIGHTS, MEANS, STDS)
    sched = schedules.linear(1000)
    model = gm.model_fn(sched)
    x_known = jnp.broadcast_to(jnp.asarray([KNOWN, 0.0], jnp.float32), (N, 2))
    mask = jnp.asarray([1.0, 0.0])
    mass, mean, std = exact_conditional()
    se = np.sqrt(mass * (1 - mass) / N)
    print(f"exact p(x_2 | x_1 = {KNOWN}): mass on x_2 > 0 = {mass:.4f}, mean {mean:.4f}, std {std:.4f}; "
          f"sampling SE of the mass {se:.4f} (N = {N})\n")
    print("| method | network calls | mass on x_2 > 0 | error | mean x_2 | std x_2 | mean abs error on x_1 | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (1, 2, 5, 10, 20):
        t0 = time.perf_counter()
        x = editing.repaint(model, sched, x_known, mask, jax.random.key(r), steps=250, jump_length=10, jump_n_sample=r)
        x = np.asarray(jax.block_until_ready(x))
        calls = int(np.sum(np.diff(editing.repaint_times(250, 10, r)) < 0))
        m, mu, sd, err1 = summarize(x)
        print(f"| RePaint r={r} | {calls} | {m:.4f} | {m - mass:+.4f} | {mu:.4f} | {sd:.4f} | {err1:.1e} | {time.perf_counter() - t0:.1f} |")
    for s in (1.0, 10.0, 100.0):
        t0 = time.perf_counter()
        f = editing.inpaint_energy(model, sched, x_known, mask)
        x = jdiff.sample(guidance.energy(model, f, s, sched), sched, (N, 2), jax.random.key(7), steps=250)
        x = np.asarray(jax.block_until_ready(x))
        m, mu, sd, err1 = summarize(x)
        print(f"| guidance inpainting s={s:g} | 250 (x2: grad) | {m:.4f} | {m - mass:+.4f} | {mu:.4f} | {sd:.4f} | {err1:.3f} | {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
