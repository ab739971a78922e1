"""XLA:CPU compile flags: what a compile of the sampler and the train step costs, and how fast the
compiled programs then run, under the flags the test suite uses against XLA's defaults.

    python -m benchmarks.compile_flags               # 3 rounds, tiny8 and digits8
    python -m benchmarks.compile_flags --reps 2 --nets tiny8

Settings (``XLA_FLAGS`` of a fresh Python process each, no compilation cache):

  default    XLA's defaults (what users and the other benchmarks compile with);
  O0         ``--xla_backend_optimization_level=0`` (LLVM's -O0);
  emitters   ``--xla_cpu_use_fusion_emitters=false`` (XLA:CPU's LLVM IR emitters instead of its
             MLIR fusion emitters);
  O0+emitters both;
  split1     ``--xla_cpu_parallel_codegen_split_count=1`` (LLVM code generation in one piece, on one
             thread, instead of a module split to compile its parts on several);
  O0+emitters+split1  all three: what ``tests/conftest.py`` sets for the test suite and every
             process it starts.

A child builds the network (``benchmarks.common.make_net``), lowers ``jdiff.sample`` (DDIM, 50
steps) and the jitted train step (``make_train_step``), then times ``.compile()`` in CPU seconds
(``time.process_time``: all of the process's threads; and the train step's in wall seconds) and the
compiled program's run (median of 5 calls after a warm-up). Every round runs every setting once, in an order rotated from one round
to the next. Reported: medians, the ratios to ``default``, and the largest difference of the
sample from ``default``'s (same key and params: float32 rounding only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

STEPS = 50
SETTINGS = {
    "default": "",
    "O0": "--xla_backend_optimization_level=0",
    "emitters": "--xla_cpu_use_fusion_emitters=false",
    "O0+emitters": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
    "split1": "--xla_cpu_parallel_codegen_split_count=1",
    "O0+emitters+split1": ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                           "--xla_cpu_parallel_codegen_split_count=1"),
}


def child(net_name: str, out_npy: str) -> dict:
    import jax

    import jdiff
    from benchmarks import common
    from jdiff.inference import model_fn_for
    from jdiff.train.network import apply_fn
    from jdiff.train.state import create_train_state, make_optimizer
    from jdiff.train.step import make_train_step

    net = common.make_net(net_name)
    key = jax.random.key(0)
    fn = model_fn_for(net.model, net.params, net.labels)
    optimizer = make_optimizer(net.config.optim)
    state = create_train_state(net.params, optimizer, jax.random.key(1))
    batch = {"image": jax.random.uniform(key, net.shape, minval=-1.0, maxval=1.0), "cond": {"label": net.labels}}
    sample = jax.jit(lambda k: jdiff.sample(fn, net.schedule, net.shape, k, method="ddim", steps=STEPS))
    train = jax.jit(make_train_step(apply_fn(net.model), net.schedule, optimizer, net.config))
    out = {}
    for phase, f, args in (("sample", sample, (key,)), ("train", train, (state, batch))):
        lowered = f.lower(*args)
        c0, w0 = time.process_time(), time.perf_counter()
        compiled = lowered.compile()
        out[phase + "_compile_cpu_s"] = time.process_time() - c0
        out[phase + "_compile_wall_s"] = time.perf_counter() - w0
        result = jax.block_until_ready(compiled(*args))
        if phase == "sample":
            np.save(out_npy, np.asarray(result))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        out[phase + "_run_s"] = float(np.median(times))
    return out


def _spawn(setting: str, net_name: str, out_npy: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": SETTINGS[setting], "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.compile_flags", "--child", "--nets", net_name, "--out-npy", out_npy]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"child ({setting}) failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(reps: int, nets: list[str]) -> tuple[str, dict]:
    from benchmarks import common

    info = common.machine_info()
    names = list(SETTINGS)
    raw: dict = {}
    sections = []
    with tempfile.TemporaryDirectory(prefix="jdiff-flags-") as tmp:
        for net_name in nets:
            results: dict[str, list[dict]] = {s: [] for s in names}
            for r in range(reps):
                order = names[r % len(names):] + names[:r % len(names)]
                for s in order:
                    res = _spawn(s, net_name, os.path.join(tmp, f"{net_name}_{s}.npy"))
                    results[s].append(res)
                base = np.load(os.path.join(tmp, f"{net_name}_default.npy"))
                for s in names:
                    diff = float(np.max(np.abs(np.load(os.path.join(tmp, f"{net_name}_{s}.npy")) - base)))
                    results[s][-1]["sample_max_abs_diff"] = diff
                print(f"  {net_name} round {r + 1}/{reps}: " + ", ".join(
                    f"{s} compile {results[s][-1]['sample_compile_cpu_s']:.2f}+{results[s][-1]['train_compile_cpu_s']:.2f} s"
                    for s in names), flush=True)

            def med(s, k):
                return common.median([res[k] for res in results[s]])

            def ratio(s, k):
                return common.median([a[k] / b[k] for a, b in zip(results[s], results["default"])])

            rows = [[s, med(s, "sample_compile_cpu_s"), ratio(s, "sample_compile_cpu_s"),
                     med(s, "train_compile_cpu_s"), ratio(s, "train_compile_cpu_s"), med(s, "train_compile_wall_s"),
                     med(s, "sample_run_s"), ratio(s, "sample_run_s"), 1e3 * med(s, "train_run_s"), ratio(s, "train_run_s"),
                     f"{max(res['sample_max_abs_diff'] for res in results[s]):.1e}"] for s in names]
            sections.append(f"\n\n**{net_name}**, medians over {reps} rounds of fresh processes:\n\n" + common.markdown_table(
                ["flags", "sample compile CPU s", "x default", "train-step compile CPU s", "x default", "its wall s",
                 f"DDIM-{STEPS} run s", "x default", "train step ms", "x default", "sample max abs diff from default"],
                rows))
            raw[net_name] = results
    cmd = ("python -m benchmarks.compile_flags " + " ".join(sys.argv[1:])).strip()
    md = (common.header("XLA:CPU compile flags: compile cost against run time", cmd, info)
          + "\nSettings: " + "; ".join(f"`{s}` = `{f or '(none)'}`" for s, f in SETTINGS.items()) + ".\n"
          + "".join(sections) + "\n")
    return md, {"machine": info, "results": raw}


def main(argv=None) -> None:
    from benchmarks import common

    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(reps=3)
    p.add_argument("--nets", default="tiny8,digits8")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-npy", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one setting's measurements, for _spawn
        print(json.dumps(child(args.nets, args.out_npy)))
        return
    nets = [n for n in args.nets.split(",") if n]
    unknown = [n for n in nets if n not in common.IMAGE_SHAPES]
    if unknown:
        raise SystemExit(f"--nets: unknown network(s) {unknown}; expected names from {sorted(common.IMAGE_SHAPES)}")
    md, raw = run(args.reps, nets)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
