"""Shared pieces of the speed suite: the networks under test, interleaved timing, reports.

Speed is reported as ratios of medians taken side by side in one process: every repetition
runs each case once, in an order rotated from one repetition to the next, so a burst of load
from another job on the machine hits all cases alike. Nothing here asserts a time; the
scripts print Markdown tables (pasted into BENCHMARKS.md) and can write the raw times as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Networks.
# ---------------------------------------------------------------------------


def load_config(name: str = "digits"):
    """``configs/<name>.py``'s ``get_config()`` (configs/ is a folder of files, not a package)."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@dataclasses.dataclass
class Net:
    """A jdiff U-Net with its params, ready to time.

    ``apply(params, x [B, H, W, C], t [B], y [B], train=False, rngs=None)`` is the network;
    ``labels`` are the [B] class labels every case uses; ``config`` is a full training config
    (the digits one, with the model section replaced for other networks).
    """

    name: str
    model: Any
    params: Any
    image_shape: tuple[int, int, int]
    batch: int
    config: Any
    schedule: Any
    labels: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch,) + self.image_shape

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.params)))

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def describe(self) -> dict:
        m = self.model
        return {
            "name": self.name, "image": "x".join(map(str, self.image_shape)), "batch": self.batch,
            "params": self.num_params, "base_channels": m.base_channels, "channel_mult": tuple(m.channel_mult),
            "num_res_blocks": m.num_res_blocks, "attention_resolutions": tuple(m.attention_resolutions),
            "num_heads": m.num_heads, "num_classes": m.num_classes, "dropout": m.dropout,
        }


@jax.jit
def _perturb(params, key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def _apply(model, params, x, t, y, train=False, rngs=None):
    return model.apply({"params": params}, x, t, None if y is None else {"label": y}, train=train, rngs=rngs)


NETWORKS = ("digits8", "rgb16", "tiny8")
IMAGE_SHAPES = {"digits8": (8, 8, 1), "rgb16": (16, 16, 3), "tiny8": (8, 8, 1)}


def make_net_config(name: str):
    """The digits training config with the model section and batch of network ``name``."""
    config = load_config("digits")
    if name == "rgb16":
        config.data.batch_size = 16
        config.model.attention_resolutions = (8,)
    elif name == "tiny8":
        config.data.batch_size = 16
        config.model = load_config("tiny").model
    elif name != "digits8":
        raise ValueError(f"name: expected one of {NETWORKS}, got {name!r}")
    return config


def make_net(name: str, batch: int | None = None, seed: int = 0, init_only: bool = False) -> Net:
    """``digits8``: the network of configs/digits.py (class-conditional, 8x8x1, batch 64).
    ``rgb16``: the same architecture on 16x16x3 images (attention at 8x8), batch 16, so a
    call sees the same number of pixels per batch. ``tiny8``: the test network of
    configs/tiny.py (8 base channels) on 8x8x1 at batch 16, where a call costs about 2 ms and
    per-call dispatch shows. All use the digits schedule (cosine, T = 1000).
    ``init_only`` returns the params of ``init_params`` unperturbed and no labels."""
    from jdiff.models import UNet
    from jdiff.train import config as config_lib
    from jdiff.train.network import init_params

    config = make_net_config(name)
    image_shape = IMAGE_SHAPES[name]
    batch = config.data.batch_size if batch is None else int(batch)
    config.data.batch_size = batch
    model = UNet.from_config(config.model)
    params = init_params(model, image_shape, jax.random.key(seed))
    if init_only:  # the params exactly as jdiff.train.network.init_params returns them
        return Net(name, model, params, image_shape, batch, config, config_lib.make_schedule(config), None)
    # A fresh U-Net outputs exactly zero (zero-initialised head); perturb the params so the
    # samplers see a non-trivial eps, as they would with a trained network.
    params = _perturb(params, jax.random.key(seed + 1))
    labels = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    return Net(name, model, params, image_shape, batch, config, config_lib.make_schedule(config), labels)


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def interleaved(
    cases: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each case, ``reps`` times, interleaved.

    Each case is a no-argument callable that runs one repetition to completion (it must block
    on its result). ``warmup`` rounds (compilation, caches) are run and discarded first. Round r
    runs the cases in the order rotated by r, so no case always follows the same neighbour.
    A case may return a float: then that is its time (e.g. measured in another process).
    """
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            out = cases[n]()
            dt = time.perf_counter() - t0
            times[n].append(float(out) if isinstance(out, float) else dt)
        if log is not None:
            log(f"  round {r + 1}/{reps}: " + ", ".join(f"{n}={times[n][-1]:.3f}s" for n in names))
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
    """min-max of the repetitions, to show how noisy a median is."""
    return f"{min(xs):.3f}-{max(xs):.3f}"


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios num[r] / den[r] (the two ran back to back in round r),
    which cancels load that changes between rounds better than a ratio of medians."""
    return float(statistics.median([a / b for a, b in zip(num, den)]))


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def machine_info() -> dict:
    import flax

    load = os.getloadavg()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "loadavg_start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def loadavg() -> str:
    load = os.getloadavg()
    return f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per case (medians are reported)")
    p.add_argument("--json", default=None, help="also write the raw times and the machine info to this file")
    return p


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)


def header(title: str, command: str, info: dict) -> str:
    return (
        f"### {title}\n\n"
        f"Command: `{command}`  \n"
        f"Date: {info['date']}; jax {info['jax']} (flax {info['flax']}), backend {info['backend']}, "
        f"{info['cpu_cores']} CPU cores ({info['machine']})"
        + (f", this process pinned to {info['usable_cores']}" if info["usable_cores"] != info["cpu_cores"] else "")
        + f", Python {info['python']}; "
        f"load average at start {info['loadavg_start']}, at end {loadavg()}.\n"
    )
