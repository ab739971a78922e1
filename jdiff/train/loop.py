"""The training loop: data, checkpoints, logs and sample grids around the pure ``train_step``.

``train_and_evaluate(config, workdir)`` is importable and testable without a shell; the
command line (``python -m launch.train``) only parses flags and calls it.

Written to ``workdir``: ``checkpoints/<step>/`` (orbax), ``experiment.json`` (what a restart
must match), ``config.json``, ``metrics.jsonl`` (one JSON object per log step),
``samples_<step>.png`` grids, and at the end ``samples.png`` and ``metrics.json``.

The same loop runs on one device, a device mesh and many hosts (``jdiff.parallel``): the state
is placed on the mesh once (replicated, or FSDP-sharded), each process reads its slice of
every global batch, and the jitted step carries the shardings through. Every process runs
every step and every checkpoint save (orbax coordinates them); only process 0 writes logs,
sample grids and metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jdiff import data as data_lib
from jdiff import images as images_lib
from jdiff import parallel
from jdiff.models import UNet
from jdiff.train import config as config_lib
from jdiff.train.checkpoint import Checkpointer
from jdiff.train.generate import generate
from jdiff.train.state import TrainState, create_train_state, make_optimizer
from jdiff.train.step import make_train_step


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; no checkpoint was written after it."""


def build_model(config: ml_collections.ConfigDict, image_shape) -> UNet:
    return UNet.from_config(config.model)


def init_params(model: UNet, image_shape, key: jax.Array, num_classes=None):
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if getattr(model, "num_classes", None) is not None else None
    return model.init({"params": key}, x, t, y=y)["params"]


def _apply_fn(model):
    def apply(params, x, t, y=None, cond=None, train=False, rngs=None):
        return model.apply({"params": params}, x, t, y=y, cond=cond, train=train, rngs=rngs)

    return apply


class _MetricLog:
    """Appends JSON lines; TensorBoard too when tensorboardX is installed."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter  # optional

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:
            pass

    def write(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    fsdp: bool = False,
    fsdp_min_size: int = parallel.FSDP_MIN_SIZE,
) -> dict:
    """Train (resuming from ``workdir`` if it holds a checkpoint of this experiment), write
    sample grids and logs, and return the final metrics (also written to metrics.json).

    ``mesh``: the devices to train on (default ``jdiff.parallel.make_mesh()``, all devices of all
    processes); the global batch ``config.data.batch_size`` is split along its data axis.
    ``fsdp``: shard params, EMA and optimizer state (leaves of at least ``fsdp_min_size``
    elements) along that axis too, instead of replicating them (``jdiff.parallel.param_shardings``).
    Neither changes the result beyond float summation order.
    """
    # Everything that can be wrong with the request is checked before the workdir is touched.
    config_lib.validate(config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(config.data.batch_size, mesh, "config.data.batch_size")
    writer = jax.process_index() == 0
    dataset = data_lib.get_dataset(config.data)
    if config.model.get("num_classes", None) not in (None, dataset.num_classes):
        raise ValueError(
            f"config.model.num_classes: {config.model.num_classes} does not match dataset "
            f"{config.data.name!r} with {dataset.num_classes} classes"
        )
    model = build_model(config, dataset.image_shape)
    schedule = config_lib.make_schedule(config)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    ckpt.check_experiment(config)

    optimizer = make_optimizer(config.optim)
    init_key, state_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)

    def init_state():
        return create_train_state(init_params(model, dataset.image_shape, init_key), optimizer, state_key)

    # Every process computes the same initial state; each device keeps only its shards.
    state_shardings = parallel.param_shardings(jax.eval_shape(init_state), mesh, fsdp, min_size=fsdp_min_size)
    state = jax.jit(init_state, out_shardings=state_shardings)()
    restored = ckpt.restore(state)  # onto the target shardings, whatever mesh wrote it
    if restored is not None:
        state = restored
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    if writer:
        ckpt.write_experiment(config)

    train_step = jax.jit(
        make_train_step(_apply_fn(model), schedule, optimizer, config),
        in_shardings=(state_shardings, parallel.data_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    log = _MetricLog(workdir) if writer else None
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("model: %s parameters", f"{num_params:,}")

    tc = config.train
    start = int(jax.device_get(state.step))
    bar = _progress(tc.num_steps, start, tc.progress and writer)
    pending: list[tuple[int, dict]] = []  # device metrics not yet inspected
    last_good = start
    t0, steps_timed = time.perf_counter(), 0

    def flush():
        """Pull pending metrics to the host, fail on a non-finite loss, log means."""
        nonlocal pending, t0, steps_timed
        if not pending:
            return None
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host):
            if not all(math.isfinite(float(v)) for v in m.values()):
                raise NonFiniteLossError(
                    f"non-finite training metrics at step {s}: {m}. Training stopped; the last checkpoint "
                    f"(step {last_good}) is untouched. Lower optim.lr or check the data."
                )
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        dt = time.perf_counter() - t0
        mean["steps_per_sec"] = steps_timed / dt if dt > 0 else float("nan")
        step = pending[-1][0]
        pending = []
        t0, steps_timed = time.perf_counter(), 0
        return step, mean

    for step in range(start, tc.num_steps):
        batch = data_lib.batch_at(
            dataset.source, step, batch_size=config.data.batch_size, seed=config.seed,
            random_flip=config.data.random_flip, process_index=jax.process_index(), process_count=jax.process_count(),
        )
        batch = {"image": batch["image"], "label": batch["label"]} if dataset.num_classes else {"image": batch["image"]}
        state, metrics = train_step(state, parallel.global_batch(batch, mesh))
        pending.append((step + 1, metrics))
        steps_timed += 1
        if bar is not None:
            bar.update(1)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.num_steps:
            logged = flush()
            if logged and writer:
                log.write(*logged)
                if bar is not None:
                    bar.set_postfix(loss=f"{logged[1]['loss']:.4f}")
                else:
                    logging.info("step %d: %s", logged[0], logged[1])
        if done % tc.checkpoint_every == 0 or done == tc.num_steps:
            logged = flush()  # never save a state whose losses were not checked
            if logged and writer:
                log.write(*logged)
            ckpt.save(state)
            last_good = done
        if tc.sample_every and done % tc.sample_every == 0 and done != tc.num_steps:
            _write_samples(config, model, state, schedule, dataset, sample_key, os.path.join(workdir, f"samples_{done}.png"), mesh)
    if bar is not None:
        bar.close()

    grid = _write_samples(config, model, state, schedule, dataset, sample_key, os.path.join(workdir, "samples.png"), mesh)
    final = {"step": int(jax.device_get(state.step)), "num_params": num_params, "samples_png": grid}
    if log is not None and os.path.exists(log.path):
        with open(log.path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines:
            final["final_loss"] = lines[-1]["loss"]
    final.update(evaluate(config, model, state, schedule, dataset, sample_key))
    if writer:
        tmp = os.path.join(workdir, "metrics.json.tmp")
        with open(tmp, "w") as f:
            json.dump(final, f, indent=1)
        os.replace(tmp, os.path.join(workdir, "metrics.json"))
    ckpt.close()
    return final


def _sample_labels(num: int, num_classes: int | None) -> np.ndarray | None:
    """Class-balanced labels 0, 1, ..., K-1, 0, ... (one grid row per class when num = K^2)."""
    if num_classes is None:
        return None
    return (np.arange(num) // max(1, num // num_classes)) % num_classes if num >= num_classes else np.arange(num) % num_classes


def _write_samples(config, model, state: TrainState, schedule, dataset, key, path: str, mesh: Mesh | None = None) -> str:
    """Sample on every process (the sampler is one SPMD program); process 0 writes the grid."""
    s = config.sample
    labels = _sample_labels(s.num, dataset.num_classes if model.num_classes is not None else None)
    x = generate(
        model, state.ema_params, schedule, dataset.image_shape, s.num, key,
        labels=labels, guidance_weight=s.guidance, batch_size=s.batch_size, method=s.method, steps=s.steps,
        eta=s.eta, clip=s.clip or None, variance=config.diffusion.variance, parameterization=config.diffusion.parameterization,
        mesh=mesh,
    )
    ncols = dataset.num_classes if (labels is not None and s.num % dataset.num_classes == 0) else None
    return images_lib.save_grid(x, path, ncols=ncols) if jax.process_index() == 0 else path


def evaluate(config, model, state: TrainState, schedule, dataset, key) -> dict:
    """Sample quality numbers at the end of training (``config.eval``); empty if disabled."""
    e = config.eval
    if not e.num_samples or config.data.name != "digits":
        return {}
    from jdiff.evaluation.workdir import evaluate_loaded
    from jdiff.train.restore import Loaded

    loaded = Loaded(config, model, state.ema_params, schedule, tuple(dataset.image_shape), int(jax.device_get(state.step)))
    result = evaluate_loaded(loaded, e.num_samples, jax.random.fold_in(key, 1), guidance_weight=config.sample.guidance,
                             bpd_examples=e.bpd_examples)
    return {f"eval/{k}": v for k, v in result.items() if k not in ("step",)}
