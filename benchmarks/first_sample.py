"""Time to the first result and peak memory of a fresh process: jdiff against PyTorch diffusers.

    python -m benchmarks.first_sample --torch-python /work/venv-bench/bin/python

Each row is a new process that does one thing with the digits8 network (batch 64) and exits:

  sample  one DDIM-50 sample batch, then two more (the steady state is not what is timed);
  train   20 training steps.

"first result" is the wall time from starting the process (``subprocess.Popen``) to the end of
the first sample batch / the first training step: interpreter start, imports, building and
initialising the network, compiling (jdiff) and running. "peak RSS" is the process's
``ru_maxrss`` when it is done. jdiff runs with its defaults (``jdiff.parallel.use_cpu_cores()``
then plain calls; training on the mesh ``launch.train`` chooses) three times: without the
persistent compilation cache, with an empty one (cold: compiles and writes) and with the one
the cold run wrote (warm: loads the executables), the cache ``launch`` turns on by default.
diffusers runs its host loop / training step in ``benchmarks/torch_worker.py`` (torch with
``--threads`` threads), with nothing to compile. Rows are repeated ``--reps`` times (medians).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common

DEFAULT_TORCH_PYTHON = "/work/venv-bench/bin/python"
TRAIN_STEPS = 20


def _child(task: str, cache: str) -> None:
    """The jdiff process: prints ``first`` when the first result is ready, then a JSON line."""
    import resource

    import jdiff

    jdiff.parallel.use_cpu_cores()
    import jax

    if cache:
        jdiff.parallel.use_compilation_cache(cache)  # as launch/ does by default
    from benchmarks.vs_diffusers import _placements

    net = common.make_net("digits8")
    key = jax.random.key(0)
    if task == "sample":
        from jdiff.inference import model_fn_for

        fn = model_fn_for(net.model, net.params, net.labels, 0.0)
        for i in range(3):
            common.block(jdiff.sample(fn, net.schedule, net.shape, jax.random.fold_in(key, i), method="ddim", steps=50))
            if i == 0:
                print("first", flush=True)
    else:
        from jdiff.train.network import apply_fn
        from jdiff.train.state import create_train_state, make_optimizer
        from jdiff.train.step import make_train_step

        optimizer = make_optimizer(net.config.optim)
        _, (shard, repl) = _placements(net)["jdiff"]
        step = jax.jit(make_train_step(apply_fn(net.model), net.schedule, optimizer, net.config), donate_argnums=0)
        state = jax.device_put(create_train_state(net.params, optimizer, jax.random.key(1)), repl)
        batch = jax.device_put({"image": jax.random.uniform(key, net.shape, minval=-1.0, maxval=1.0),
                                "cond": {"label": net.labels}}, shard)
        for i in range(TRAIN_STEPS):
            state, metrics = step(state, batch)
            if i == 0:
                common.block(metrics)
                print("first", flush=True)
        common.block(state)
    print(json.dumps({"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "devices": len(jax.devices())}), flush=True)


def _run_jdiff(task: str, cache: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.first_sample", "--child", task, "--cache", cache],
                            cwd=common.REPO, stdout=subprocess.PIPE, text=True)
    first = None
    for line in proc.stdout:
        if line.strip() == "first":
            first = time.perf_counter() - t0
        elif line.startswith("{"):
            out = json.loads(line)
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"jdiff {task} child failed (exit {proc.returncode})")
    return {"first_s": first, **out}


def _run_diffusers(task: str, torch_python: str, threads: int) -> dict:
    from benchmarks.vs_diffusers import TorchWorker, diffusers_unet_kwargs

    net = common.make_net("digits8", init_only=True)  # only its fields: the diffusers kwargs
    t0 = time.perf_counter()
    worker = TorchWorker(torch_python)
    try:
        worker.call(cmd="setup", image_shape=list(net.image_shape), batch=net.batch, unet=diffusers_unet_kwargs(net),
                    threads=threads, seed=0)
        if task == "sample":
            worker.call(cmd="sample", method="ddim", steps=50, guidance=None)
            first = time.perf_counter() - t0
            for _ in range(2):
                worker.call(cmd="sample", method="ddim", steps=50, guidance=None)
        else:
            worker.call(cmd="train", steps=1)
            first = time.perf_counter() - t0
            worker.call(cmd="train", steps=TRAIN_STEPS - 1)
        rss = worker.call(cmd="rss")["max_rss_mib"]
    finally:
        worker.close()
    return {"first_s": first, "max_rss_mib": rss}


def run(torch_python: str, threads: int, reps: int) -> tuple[str, dict]:
    info = common.machine_info()
    results: dict[str, list] = {}
    for _ in range(reps):
        for task in ("sample", "train"):
            with tempfile.TemporaryDirectory() as cache:
                for mode, path in (("no cache", ""), ("cold cache", cache), ("warm cache", cache)):
                    results.setdefault(f"jdiff|{task}|{mode}", []).append(_run_jdiff(task, path))
            results.setdefault(f"diffusers|{task}|-", []).append(_run_diffusers(task, torch_python, threads))
            print(task, {k: v[-1] for k, v in results.items() if f"|{task}|" in k}, flush=True)
    rows = []
    for name, runs in results.items():
        lib, task, mode = name.split("|")
        what = "DDIM-50, batch 64" if task == "sample" else f"{TRAIN_STEPS} steps, batch 64"
        rows.append([lib, f"{task} ({what})", mode, common.median([r["first_s"] for r in runs]),
                     common.median([r["max_rss_mib"] for r in runs])])
    cmd = ("python -m benchmarks.first_sample " + " ".join(sys.argv[1:])).strip()
    md = (common.header("Time to the first sample and peak memory of a fresh process (issue 13)", cmd, info) + "\n"
          + common.markdown_table(["library", "process", "compilation cache", "first result s", "peak RSS MiB"], rows) + "\n")
    return md, {"machine": info, "runs": results}


def main(argv=None) -> None:
    if argv is None and "--child" in sys.argv:
        i = sys.argv.index("--child")
        _child(sys.argv[i + 1], sys.argv[sys.argv.index("--cache") + 1])
        return
    import jdiff

    jdiff.parallel.use_cpu_cores()  # this process builds the diffusers kwargs (vs_diffusers does this too)
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(reps=1)
    p.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON, help="python of a virtualenv with torch and diffusers")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if not os.path.exists(args.torch_python):
        sys.exit(f"--torch-python: {args.torch_python} does not exist; see benchmarks/README.md")
    md, raw = run(args.torch_python, args.threads, args.reps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
