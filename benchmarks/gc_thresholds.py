"""Python's garbage collector in a command: ``launch.common.GC_THRESHOLDS`` against Python's
default thresholds, on short ``launch`` commands whose compiled programs are already cached.

    python -m benchmarks.gc_thresholds            # 3 rounds
    python -m benchmarks.gc_thresholds --reps 5

Commands (fresh processes, XLA's default flags, one persistent compilation cache that a warm-up
run of each command fills first, so that what is timed is what a repeated command costs: imports,
tracing and lowering, cache reads, the steps, checkpoints):

  train    ``python -m launch.train --config configs/tiny.py``, 40 steps, a checkpoint every 5;
  sample   ``python -m launch.sample`` of 64 images from that workdir.

Settings: ``default`` runs the command with ``launch.common.GC_THRESHOLDS`` replaced by Python's
defaults (``gc.get_threshold()`` of a fresh interpreter, (700, 10, 10)) before its ``main``;
``tuned`` runs it unchanged. Every round runs every command under both settings, in an order
rotated from one round to the next. Reported: medians of wall and CPU seconds (user + system of
the child) and the paired ratios tuned / default.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("default", "tuned")

# The child: Python's default thresholds patched in for ``default``, then the module run as
# ``python -m`` would run it.
_CHILD = """
import gc, runpy, sys
import launch.common
if sys.argv[1] == "default":
    launch.common.GC_THRESHOLDS = gc.get_threshold()
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _commands(tmp: str) -> dict[str, tuple[str, list[str]]]:
    workdir = os.path.join(tmp, "tiny")
    return {
        "train": ("launch.train", ["--config", os.path.join(REPO, "configs", "tiny.py"), "--config.train.num_steps=40",
                                   "--config.train.checkpoint_every=5", "--config.sample.num=4"]),
        "sample": ("launch.sample", ["--workdir", workdir, "--num", "64", "--out", os.path.join(tmp, "x.npz")]),
    }


def _run(setting: str, module: str, args: list[str], env: dict, workdir: str | None) -> tuple[float, float]:
    if workdir is not None:  # a training run starts from scratch every time
        subprocess.run(["rm", "-rf", workdir], check=True)
        args = args + ["--workdir", workdir]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, setting, module, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise RuntimeError(f"{module} ({setting}) failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run(reps: int) -> tuple[str, dict]:
    from benchmarks import common

    info = common.machine_info()
    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="jdiff-gc-") as tmp:
        env = {**os.environ, "JDIFF_COMPILATION_CACHE": os.path.join(tmp, "xla"), "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": REPO}
        env.pop("XLA_FLAGS", None)
        commands = _commands(tmp)
        workdirs = {"train": os.path.join(tmp, "run"), "sample": None}
        # Warm-up: the cache filled, and the workdir launch.sample reads.
        _run("tuned", commands["train"][0], commands["train"][1], env, os.path.join(tmp, "tiny"))
        _run("tuned", commands["sample"][0], commands["sample"][1], env, None)
        results = {c: {s: [] for s in SETTINGS} for c in commands}
        for r in range(reps):
            order = SETTINGS[r % 2:] + SETTINGS[:r % 2]
            for c, (module, args) in commands.items():
                for s in order:
                    results[c][s].append(_run(s, module, args, env, workdirs[c]))
            print(f"  round {r + 1}/{reps}: " + ", ".join(
                f"{c} {s} {results[c][s][-1][0]:.2f} s" for c in commands for s in SETTINGS), flush=True)
        rows = []
        for c in commands:
            d, t = results[c]["default"], results[c]["tuned"]
            rows.append([c, common.median([x[0] for x in d]), common.median([x[0] for x in t]),
                         common.paired_ratio([x[0] for x in t], [x[0] for x in d]),
                         common.median([x[1] for x in d]), common.median([x[1] for x in t]),
                         common.paired_ratio([x[1] for x in t], [x[1] for x in d])])
        raw = {"machine": info, "results": results}
    cmd = ("python -m benchmarks.gc_thresholds " + " ".join(sys.argv[1:])).strip()
    md = (common.header("Python's garbage collector in a command", cmd, info)
          + f"\nMedians over {reps} rounds of fresh processes, warm compilation cache; `tuned` = "
          "`launch.common.GC_THRESHOLDS`, `default` = Python's (700, 10, 10).\n\n"
          + common.markdown_table(["command", "default wall s", "tuned wall s", "tuned / default",
                                   "default CPU s", "tuned CPU s", "tuned / default"], rows) + "\n")
    return md, raw


def main(argv=None) -> None:
    from benchmarks import common

    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(reps=3)
    args = p.parse_args(argv)
    md, raw = run(args.reps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
