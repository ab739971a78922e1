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
     "return pmv.mean + nonzero * jnp.exp(0.5 * pmv.log_variance) * noise",
     "return pmv.mean + nonzero * 1.01 * jnp.exp(0.5 * pmv.log_variance) * noise"),
    ("ddpm: posterior mean coef1 (x0)", "jdiff/diffusion.py",
     "mean = extract(schedule.posterior_mean_coef1, t, xt) * x0",
     "mean = 1.01 * extract(schedule.posterior_mean_coef1, t, xt) * x0"),
    ("ddpm: posterior mean coef2 (x_t)", "jdiff/diffusion.py",
     "+ extract(schedule.posterior_mean_coef2, t, xt) * xt",
     "+ 1.01 * extract(schedule.posterior_mean_coef2, t, xt) * xt"),
    ("ddim: sqrt(abar_prev) x0", "jdiff/samplers.py",
     "return alpha_p * x0 + dir_xt + sigma * noise",
     "return 1.01 * alpha_p * x0 + dir_xt + sigma * noise"),
    ("ddim: direction to x_t", "jdiff/samplers.py",
     "return alpha_p * x0 + dir_xt + sigma * noise",
     "return alpha_p * x0 + 1.01 * dir_xt + sigma * noise"),
    ("ddim: sigma(eta)", "jdiff/samplers.py",
     "sigma = eta * (sigma_p / sigma_t) * jnp.sqrt(one_minus_ratio)",
     "sigma = 1.01 * eta * (sigma_p / sigma_t) * jnp.sqrt(one_minus_ratio)"),
    ("sde: drift", "jdiff/samplers.py",
     "return xt + (0.5 * xt + score) * dB + noise_scale",
     "return xt + 1.01 * (0.5 * xt + score) * dB + noise_scale"),
    ("sde: diffusion", "jdiff/samplers.py",
     "+ noise_scale * _noise(key, xt)",
     "+ 1.01 * noise_scale * _noise(key, xt)"),
    ("ode: drift", "jdiff/samplers.py",
     "return xt + 0.5 * (xt + score) * dB",
     "return xt + 0.505 * (xt + score) * dB"),
    ("dpm-solver++: exp(-h)", "jdiff/samplers.py",
     "exp_neg_h = (sigma_p * alpha_t) / (alpha_p * sigma_t)",
     "exp_neg_h = 1.01 * (sigma_p * alpha_t) / (alpha_p * sigma_t)"),
    ("dpm-solver++: second-order D", "jdiff/samplers.py",
     "(1.0 + 0.5 / r) * x0 - (0.5 / r) * state.x0_prev",
     "(1.0 + 0.505 / r) * x0 - (0.505 / r) * state.x0_prev"),
    ("dpm-solver++: sigma ratio", "jdiff/samplers.py",
     "x_prev = (sigma_p / sigma_t) * xt",
     "x_prev = 1.01 * (sigma_p / sigma_t) * xt"),
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
