"""Show that the sampler tests fail when any step coefficient is perturbed by 1%.

python tools/perturb_samplers.py            # all perturbations, a few minutes each batch
python tools/perturb_samplers.py --list

Each perturbation multiplies one coefficient of one step by 1.01 in a copy of the package,
then runs tests/test_samplers.py (and tests/test_diffusion.py for the shared posterior)
against the copy. A perturbation that leaves the tests passing is reported as SURVIVED.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, original text, perturbed text)
PERTURBATIONS = [
    ("ddpm: noise scale", "jdiff/samplers.py",
     "return mean + jnp.sqrt(var) * noise, var",
     "return mean + 1.01 * jnp.sqrt(var) * noise, var"),
    ("ddpm: posterior mean, x_t term", "jdiff/samplers.py",
     "mean = x_coef * x + alpha_n * frac * x0",
     "mean = 1.01 * x_coef * x + alpha_n * frac * x0"),
    ("ddpm: posterior mean, x0 term", "jdiff/samplers.py",
     "mean = x_coef * x + alpha_n * frac * x0",
     "mean = x_coef * x + 1.01 * alpha_n * frac * x0"),
    ("ddim: sqrt(abar_prev) x0", "jdiff/samplers.py",
     "return alpha_n * x0 + jnp.sqrt(jnp.maximum(sigma_n**2 - s2, 0.0)) * eps",
     "return 1.01 * alpha_n * x0 + jnp.sqrt(jnp.maximum(sigma_n**2 - s2, 0.0)) * eps"),
    ("ddim: direction to x_t", "jdiff/samplers.py",
     "return alpha_n * x0 + jnp.sqrt(jnp.maximum(sigma_n**2 - s2, 0.0)) * eps",
     "return alpha_n * x0 + 1.01 * jnp.sqrt(jnp.maximum(sigma_n**2 - s2, 0.0)) * eps"),
    ("ddim: sigma(eta)", "jdiff/samplers.py",
     "s2 = eta**2 * sigma_n**2 * _posterior_fraction(lam_t, lam_n)",
     "s2 = 1.0201 * eta**2 * sigma_n**2 * _posterior_fraction(lam_t, lam_n)"),
    ("sde: drift", "jdiff/samplers.py",
     "return x - int_f * x + int_g2 * score + jnp.sqrt",
     "return x - 1.01 * int_f * x + 1.01 * int_g2 * score + jnp.sqrt"),
    ("sde: diffusion", "jdiff/samplers.py",
     "+ jnp.sqrt(jnp.maximum(int_g2, 0.0)) * noise",
     "+ 1.01 * jnp.sqrt(jnp.maximum(int_g2, 0.0)) * noise"),
    ("ode: drift", "jdiff/samplers.py",
     "return x - int_f * x + 0.5 * int_g2 * score",
     "return x - 1.01 * int_f * x + 0.505 * int_g2 * score"),
    ("dpm-solver++: exp(-h)", "jdiff/samplers.py",
     "exp_neg_h = (sigma_n * alpha_t) / (alpha_n * sigma_t)",
     "exp_neg_h = 1.01 * (sigma_n * alpha_t) / (alpha_n * sigma_t)"),
    ("dpm-solver++: second-order D", "jdiff/samplers.py",
     "(1.0 + 0.5 / r) * x0 - (0.5 / r) * state.x0_prev",
     "(1.0 + 0.505 / r) * x0 - (0.505 / r) * state.x0_prev"),
    ("dpm-solver++: sigma ratio", "jdiff/samplers.py",
     "x_next = (sigma_n / sigma_t) * xt",
     "x_next = 1.01 * (sigma_n / sigma_t) * xt"),
    ("re-noise: q(x_t' | x_t) noise", "jdiff/samplers.py",
     "x_new = ratio * x + jnp.sqrt(jnp.maximum(var, 0.0)) * _noise(step.key, x)",
     "x_new = ratio * x + 1.01 * jnp.sqrt(jnp.maximum(var, 0.0)) * _noise(step.key, x)"),
]


def run(name, path, old, new, python) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(ROOT, "jdiff"), os.path.join(tmp, "jdiff"))
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(tmp, "tests"))
        target = os.path.join(tmp, path)
        src = open(target).read()
        if src.count(old) != 1:
            raise SystemExit(f"{name}: the text to perturb occurs {src.count(old)} times in {path}")
        open(target, "w").write(src.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp)
        r = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_samplers.py"],
                           cwd=tmp, env=env, capture_output=True, text=True)
        failed = r.returncode != 0
        last = [line for line in r.stdout.splitlines() if line.startswith("FAILED")][:1]
        print(f"{'CAUGHT  ' if failed else 'SURVIVED'} {name}: {last[0] if last else r.stdout.strip().splitlines()[-1]}", flush=True)
        return failed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, *_ in PERTURBATIONS:
            print(name)
        return
    caught = [run(*pert, sys.executable) for pert in PERTURBATIONS]
    print(f"{sum(caught)}/{len(caught)} perturbations caught")
    sys.exit(0 if all(caught) else 1)


if __name__ == "__main__":
    main()
