"""Compile time of ``jdiff.sample`` and the train step, cold and with the persistent cache.

    python -m benchmarks.compile_cache             # 3 rounds of 3 fresh processes each
    python -m benchmarks.compile_cache --reps 2 --net tiny8

Every measurement is a fresh Python process (``--child``), so nothing is cached in memory.
Each round runs three of them back to back:

  no_cache   the persistent compilation cache off (JAX's default);
  cold       ``jax_compilation_cache_dir`` set to a new empty directory (compiles and writes);
  warm       the same directory again, now filled by ``cold`` (reads the executables).

with ``jax_persistent_cache_min_compile_time_secs = 0`` for the last two. A child builds the
network (``benchmarks.common.make_net``), then calls ``jdiff.sample`` (DDIM, 50 steps) twice and
the jitted train step (``make_train_step``, the digits config) twice. Reported per phase:
first call, second call, their difference (the one-off cost: tracing, lowering, compiling or
loading from the cache), and JAX's own monitoring events: time in tracing, in lowering to
MLIR, in the XLA backend compile, and persistent-cache hits / misses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

T_PROCESS = time.perf_counter()

STEPS = 50
PHASES = ("sample", "train")


def child(cache_dir: str | None, net_name: str) -> dict:
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jax import monitoring

    import jdiff
    from benchmarks import common
    from jdiff.inference import model_fn_for
    from jdiff.train.network import apply_fn as _apply_fn
    from jdiff.train.state import create_train_state, make_optimizer
    from jdiff.train.step import make_train_step

    t_import = time.perf_counter() - t0
    events: dict[str, float] = {}

    def on_duration(event, duration, **kw):
        events[event] = events.get(event, 0.0) + duration

    def on_event(event, **kw):
        events[event] = events.get(event, 0.0) + 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)

    # jdiff.train.network.init_params compiles model.init as one program (since 2026-12-05); the
    # same init op by op (jax.disable_jit: every op compiled on its own, as init_params ran
    # before) is timed first, so the two share no compiled code.
    from jdiff.models import UNet
    from jdiff.train.network import init_params

    model = UNet.from_config(common.make_net_config(net_name).model)
    t0 = time.perf_counter()
    with jax.disable_jit():
        jax.block_until_ready(init_params(model, common.IMAGE_SHAPES[net_name], jax.random.key(7)))
    t_init_eager = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = common.make_net(net_name, init_only=True)
    jax.block_until_ready(probe.params)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    net = common.make_net(net_name)
    jax.block_until_ready(net.params)
    out = {"import_s": t_import, "init_params_s": t_init, "init_params_eager_s": t_init_eager, "make_net_s": time.perf_counter() - t0}

    key = jax.random.key(0)
    fn = model_fn_for(net.model, net.params, net.labels)
    optimizer = make_optimizer(net.config.optim)
    state = create_train_state(jax.tree.map(jnp.copy, net.params), optimizer, jax.random.key(1))  # donated below
    batch = {"image": jax.random.uniform(key, net.shape, minval=-1.0, maxval=1.0), "cond": {"label": net.labels}}
    jax.block_until_ready((state, batch))
    train_step = jax.jit(make_train_step(_apply_fn(net.model), net.schedule, optimizer, net.config), donate_argnums=0)

    def sample():
        return jax.block_until_ready(jdiff.sample(fn, net.schedule, net.shape, key, method="ddim", steps=STEPS))

    def train():
        nonlocal state
        state, metrics = train_step(state, batch)
        return jax.block_until_ready((state, metrics))

    for phase, call in (("sample", sample), ("train", train)):
        events.clear()
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        snapshot = dict(events)
        t0 = time.perf_counter()
        call()
        second = time.perf_counter() - t0
        out[phase] = {
            "first_s": first, "second_s": second, "one_off_s": first - second,
            "trace_s": snapshot.get("/jax/core/compile/jaxpr_trace_duration", 0.0),
            "lower_s": snapshot.get("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.0),
            "backend_compile_s": snapshot.get("/jax/core/compile/backend_compile_duration", 0.0),
            "cache_hits": int(snapshot.get("/jax/compilation_cache/cache_hits", 0)),
            "cache_misses": int(snapshot.get("/jax/compilation_cache/cache_misses", 0)),
            "cache_retrieval_s": snapshot.get("/jax/compilation_cache/cache_retrieval_time_sec", 0.0),
        }
    out["process_s"] = time.perf_counter() - T_PROCESS
    return out


def _spawn(cache_dir: str | None, net_name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compile_cache", "--child", "--net", net_name]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=False)  # stderr reported below
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def run(reps: int, net_name: str) -> tuple[str, dict]:
    from benchmarks import common

    info = common.machine_info()
    results: dict[str, list[dict]] = {"no_cache": [], "cold": [], "warm": []}
    for r in range(reps):
        d = tempfile.mkdtemp(prefix="jdiff-jax-cache-")
        try:
            results["no_cache"].append(_spawn(None, net_name))
            results["cold"].append(_spawn(d, net_name))
            n_files = sum(len(f) for _, _, f in os.walk(d))
            results["warm"].append(_spawn(d, net_name))
            results["cold"][-1]["cache_files"] = n_files
        finally:
            shutil.rmtree(d, ignore_errors=True)
        print(f"  round {r + 1}/{reps}: " + ", ".join(
            f"{k}: sample first {v[-1]['sample']['first_s']:.2f}s train first {v[-1]['train']['first_s']:.2f}s"
            for k, v in results.items()), flush=True)

    def med(scenario, *path):
        vals = []
        for res in results[scenario]:
            v = res
            for p in path:
                v = v[p]
            vals.append(v)
        return common.median(vals)

    rows = []
    for phase in PHASES:
        for scenario in results:
            rows.append([
                f"`{'jdiff.sample' if phase == 'sample' else 'train_step'}`", scenario,
                med(scenario, phase, "first_s"), med(scenario, phase, "second_s"), med(scenario, phase, "one_off_s"),
                med(scenario, phase, "trace_s"), med(scenario, phase, "lower_s"), med(scenario, phase, "backend_compile_s"),
                f"{med(scenario, phase, 'cache_hits'):.0f} / {med(scenario, phase, 'cache_misses'):.0f}",
            ])
    proc_rows = [[s, med(s, "import_s"), med(s, "init_params_eager_s"), med(s, "init_params_s"), med(s, "wall_s")] for s in results]
    cmd = ("python -m benchmarks.compile_cache " + " ".join(sys.argv[1:])).strip()
    md = (
        common.header("Compile time and the persistent compilation cache", cmd, info)
        + f"\nNetwork {net_name}; `jdiff.sample` is DDIM with {STEPS} steps. Medians over {reps} rounds of fresh "
        "processes; seconds. one-off = first call - second call.\n\n"
        + common.markdown_table(
            ["call", "cache", "first call", "second call", "one-off", "tracing", "lowering", "XLA compile", "cache hits / misses"],
            rows,
        )
        + "\n\nWhole process: import of jax + jdiff; the network's `model.init` op by op (under `jax.disable_jit`), "
        "then `jdiff.train.network.init_params` (one compiled program); then both phases:\n\n"
        + common.markdown_table(["cache", "import s", "init op by op s", "init_params s", "process wall s"], proc_rows)
        + "\n"
    )
    return md, {"machine": info, "net": net_name, "results": results}


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--net", default="digits8")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.cache_dir, args.net)))
        return
    md, raw = run(args.reps, args.net)
    print("\n" + md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1, default=str)


if __name__ == "__main__":
    main()
