"""Convergence order of the ODE samplers on the exact Gaussian mixture (no network).

    python -m benchmarks.solver_order          # ~1 minute on 2 cores

For each process (EDM with Karras sigmas, flow matching with uniform t, the discrete VP
schedule with Karras-nearest indices), the mean absolute error of 2,000 samples from the same
x_T against a 1024-step Heun solve of the same probability-flow ODE, at 8..128 steps, and the
ratio of successive errors: ~2 for a first-order method (Euler, DDIM), ~4 for Heun.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jdiff
from jdiff import schedules
from jdiff.testing import gaussian_mixture

STEPS = (8, 16, 32, 64, 128)


def main():
    gm = gaussian_mixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.3])
    cases = [("EDM (Karras sigmas)", schedules.edm(), "x0", "karras", 80.0),
             ("flow matching (uniform t)", schedules.flow(), "flow", "uniform", 1.0),
             ("VP linear T=1000 (Karras indices)", schedules.linear(1000), "eps", "karras", 1.0)]
    print("| process | method | " + " | ".join(f"{n} steps" for n in STEPS) + " | error ratios (x2 steps) |")
    print("|---|---|" + "---|" * len(STEPS) + "---|")
    for name, proc, param, spacing, scale in cases:
        xT = jax.random.normal(jax.random.key(1), (2000, 2)) * scale

        def run(method, n):
            return jdiff.sample(gm.model_fn(proc, param), proc, xT, jax.random.key(0), method=method, steps=n,
                                parameterization=param, spacing=spacing)

        ref = run("heun", 1024 if param != "eps" else 999)
        for method in ("euler", "heun"):
            errs = [float(jnp.mean(jnp.abs(run(method, n) - ref))) for n in STEPS]
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(errs, errs[1:]))
            print(f"| {name} | {method} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {ratios} |")


if __name__ == "__main__":
    main()
