"""Checkpoint cost: how long a save stalls the training loop (async vs synchronous), and what
the restore-time checks cost (SPEC 7, issue 14).

    python -m benchmarks.checkpointing                 # the digits8 and fashion28 train states, 5 reps
    python -m benchmarks.checkpointing --nets digits8 --reps 3

For each network's full TrainState (params, EMA, Adam moments; random values), side by side
in one process, each repetition in rotated order:

  save_sync    ``Checkpointer(async_save=False).save``: returns once the files are on disk;
  save_async   ``Checkpointer().save`` (the default): returns once the arrays are copied off
               the device; the stall a training step sees. ``async_total`` adds the wait for
               the files (done in the background while training goes on);
  restore      ``Checkpointer.restore`` onto the abstract state, with its checks (commit
               marker, sizes, every byte read once, JSON metadata); ``restore_orbax`` is orbax's
               restore alone, without them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import common
from jdiff.train.checkpoint import Checkpointer
from jdiff.train.state import create_train_state, make_optimizer

NETS = {"digits8": ("digits", (8, 8, 1)), "fashion28": ("fashion_mnist", (28, 28, 1))}


def _state(config_name: str, image_shape):
    from jdiff.train import network

    config = common.load_config(config_name)
    model = network.build_model(config)
    abstract = jax.eval_shape(lambda: create_train_state(
        network.init_params(model, image_shape, jax.random.key(0)), make_optimizer(config.optim), jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype) if x.dtype.kind == "f"
                                                 else np.zeros(x.shape, x.dtype)), abstract), abstract


def _abstract_with_sharding(abstract):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def run(name: str, reps: int) -> dict:
    state, abstract = _state(*NETS[name])
    target = _abstract_with_sharding(abstract)
    root = tempfile.mkdtemp(prefix="jdiff_ckpt_bench_")
    counter = {"step": 0}
    totals = []

    def save(async_save: bool) -> float:
        counter["step"] += 1
        ck = Checkpointer(os.path.join(root, "async" if async_save else "sync"), keep=2, async_save=async_save)
        st = state.replace(step=jax.numpy.asarray(counter["step"], jax.numpy.int32))
        t0 = time.perf_counter()
        ck.save(st)
        stall = time.perf_counter() - t0
        ck.wait()
        if async_save:
            totals.append(time.perf_counter() - t0)
        ck.close()
        return stall

    def restore(checks: bool) -> float:
        ck = Checkpointer(os.path.join(root, "sync"))
        t0 = time.perf_counter()
        if checks:
            ck.restore(target, move_aside=False)
        else:
            ck.manager.restore(ck.manager.latest_step(), args=ocp.args.StandardRestore(target))
        dt = time.perf_counter() - t0
        ck.close()
        return dt

    save(False)  # a step to restore from
    times = common.interleaved({"save_sync": lambda: save(False), "save_async": lambda: save(True),
                                "restore": lambda: restore(True), "restore_orbax": lambda: restore(False)}, reps)
    shutil.rmtree(root)
    row = {"net": name, "MB": sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20,
           **{k: common.median(v) for k, v in times.items()}, "async_total": common.median(totals[-reps:])}
    row["stall_ratio"] = common.paired_ratio(times["save_async"], times["save_sync"])
    return row


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    args = p.parse_args()
    info = common.machine_info()
    rows = [run(n, args.reps) for n in args.nets]
    print(common.header("Checkpoint saves and restores", "python -m benchmarks.checkpointing "
                        + " ".join(["--nets", *args.nets, "--reps", str(args.reps)]), info))
    print(common.markdown_table(
        ["state", "size (MB)", "save, synchronous (s)", "save, async: stall (s)", "async: until on disk (s)",
         "stall / synchronous", "restore with checks (s)", "orbax restore alone (s)"],
        [[r["net"], r["MB"], r["save_sync"], r["save_async"], r["async_total"], r["stall_ratio"], r["restore"],
          r["restore_orbax"]] for r in rows]))
    common.write_json(args.json, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
