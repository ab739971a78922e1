"""A fresh process that calls ``jdiff.parallel.use_cpu_cores(2)`` first, then checks that a plain
``jdiff.sample`` splits its batch over the two CPU devices with the same samples as on one.

Usage: python tests/workers/cpu_cores.py OUT.json  (XLA_FLAGS must not set a device count)

The network is configs/tiny.py's U-Net with its params perturbed (a fresh U-Net outputs exactly
zero), class-conditional, sampled with DDIM (eta 0) and DDPM. The one-device reference is the
same call with the params committed to device 0, which ``auto_batch_sharding`` respects.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jdiff  # noqa: E402

devices = jdiff.parallel.use_cpu_cores(2)  # before anything runs on a device

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from jdiff.train import config as config_lib  # noqa: E402
from jdiff.train import network  # noqa: E402


def main(out_path):
    c = tiny.get_config()
    model = network.build_model(c)
    params = network.init_params(model, (8, 8, 1), jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.01 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    schedule = config_lib.make_schedule(c)

    def apply(p, x, t, cond):
        return model.apply({"params": p}, x, t, cond)

    results = {"use_cpu_cores": devices, "devices": len(jax.devices()), "cases": {}}
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    one = jax.tree_util.Partial(apply, jax.device_put(params, jax.devices()[0]))
    for method, steps in (("ddim", 10), ("ddpm", 20)):
        for batch in (8, 7) if method == "ddim" else (8,):
            cond = {"label": labels[:batch]}
            kw = dict(method=method, steps=steps, cond=cond)
            split = jdiff.sample(jax.tree_util.Partial(apply, params), schedule, (batch, 8, 8, 1), jax.random.key(2), **kw)
            ref = jdiff.sample(one, schedule, (batch, 8, 8, 1), jax.random.key(2), **kw)
            a, b = np.asarray(split), np.asarray(ref)
            results["cases"][f"{method}_{batch}"] = {
                "split_devices": len(split.sharding.device_set), "ref_devices": len(ref.sharding.device_set),
                "max_abs_diff": float(np.max(np.abs(a - b))), "max_abs": float(np.max(np.abs(b))), "std": float(b.std()), "finite": bool(np.all(np.isfinite(a))),
            }
    results["second_call"] = jdiff.parallel.use_cpu_cores(3)  # the count already set wins
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
