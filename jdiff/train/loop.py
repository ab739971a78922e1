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

import collections
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jdiff import data as data_lib
from jdiff import images as images_lib
from jdiff import latent, parallel, samplers
from jdiff.evaluation import evaluators
from jdiff.evaluation.workdir import evaluate_loaded
from jdiff.inference import balanced_labels, generate
from jdiff.train import adapt
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.train.checkpoint import Checkpointer
from jdiff.train.network import build_model, init_params
from jdiff.train.state import (TrainState, create_train_state, make_optimizer, map_params, overlay_params, param_paths,
                               split_params)
from jdiff.train.step import make_train_step
from jdiff.workdir import Loaded, load_config, load_params

# Training steps queued on the devices ahead of the host (see the loop).
MAX_STEPS_IN_FLIGHT = 2

__all__ = ["NonFiniteLossError", "build_model", "init_params", "train_and_evaluate", "validate_run"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; no checkpoint was written after it."""


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


def _zero_output(x, t):
    return jnp.zeros_like(x)


def _zero_output_with_variance(x, t):
    return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)


def _check_sampling(config: ml_collections.ConfigDict, model, dataset, schedule) -> None:
    """``config.sample``: a registered method, steps in [1, T], guidance only for a model it can
    guide, and whatever else the sampler itself rejects (tried on abstract values: no compile)."""
    s = config.sample
    names = samplers.available()
    if s.method not in names:
        raise ValueError(f"config.sample.method: expected one of {names} (jdiff.samplers.register adds more), "
                         f"got {s.method!r}")
    if hasattr(schedule, "num_timesteps"):
        T = schedule.num_timesteps
        if s.steps is not None and (isinstance(s.steps, bool) or not isinstance(s.steps, int) or not 1 <= s.steps <= T):
            raise ValueError(f"config.sample.steps: expected None or an int in [1, {T}] (config.diffusion.num_timesteps), "
                             f"got {s.steps!r}")
    elif s.steps is None or isinstance(s.steps, bool) or not isinstance(s.steps, int) or s.steps < 1:
        raise ValueError(f"config.sample.steps: expected a positive int for process={config.diffusion.process!r} "
                         f"(a continuous process has no default number of steps), got {s.steps!r}")
    if config.data.get("autoencoder", "") and s.clip is True:
        raise ValueError(f"config.sample.clip: True clips x_0 to [-1, 1], but the model samples latents "
                         f"(config.data.autoencoder={config.data.autoencoder!r}) scaled to unit variance; expected False "
                         "or a bound on the latents such as 4.0")
    if s.guidance and not (network.class_conditional(model) or network.text_length(model)
                           or getattr(model, "context_dim", None)):
        raise ValueError(f"config.sample.guidance: {s.guidance} needs a conditional model (sample grids guide towards "
                         "their labels, captions or context), but config.model.num_classes is None; expected 0")
    learned = config.diffusion.variance in ("learned", "learned_range")
    zeros = _zero_output_with_variance if learned else _zero_output
    try:
        jax.eval_shape(  # the key is made while tracing: nothing runs or compiles
            lambda x: samplers.sample(zeros, schedule, x, jax.random.key(0), method=s.method, steps=s.steps, eta=s.eta,
                                      clip=s.clip or None, variance=config.diffusion.variance,
                                      parameterization=config.diffusion.parameterization),
            jax.ShapeDtypeStruct((1,) + tuple(dataset.image_shape), jnp.float32),
        )
    except ValueError as e:
        raise ValueError(f"config.sample (method={s.method!r}, steps={s.steps}, eta={s.eta}): {e}") from None


def _check_evaluation(config: ml_collections.ConfigDict, dataset) -> None:
    e = config.eval
    ev = evaluators.get(e.evaluator)  # an unknown name fails even when evaluation is off
    if e.num_samples and ev is not None:
        ev.check(tuple(dataset.image_shape), dataset.num_classes, config.data.name)
        if e.num_samples < ev.min_samples:
            raise ValueError(f"config.eval.num_samples: evaluator {e.evaluator!r} needs at least {ev.min_samples} "
                             f"samples, got {e.num_samples}")
    if e.bpd_examples:
        data_lib.get_dataset(config.data, split="test")  # the bound is computed on the test split


def _check_conditioning(config: ml_collections.ConfigDict, model, dataset, transform) -> None:
    """Every batch must carry the conditioning the network reads, and p_uncond something to drop."""
    cond = network.example_batch(model, dataset.image_shape, transform, fill=False)["cond"]
    image_channels = getattr(model, "image_channels", 0) or 0
    if image_channels and "image" not in cond:
        raise ValueError(
            f"config.model.image_channels: {image_channels} needs cond['image'] in every batch, but no batch transform "
            f"provides it (config.data.transform={config.data.transform!r}); expected e.g. 'downsample_image'"
        )
    if "image" in cond and cond["image"].shape[-1] != image_channels:
        raise ValueError(f"config.model.image_channels: {image_channels} does not match the {cond['image'].shape[-1]} "
                         f"channels of cond['image'] that config.data.transform={config.data.transform!r} makes")
    if getattr(model, "aug_level_embedding", False) and "aug_level" not in cond:
        raise ValueError("config.model.aug_level_embedding: True needs cond['aug_level'] in every batch, but no batch "
                         f"transform provides it (config.data.transform={config.data.transform!r})")
    cc = network.control_channels(model)
    if cc and not config.data.get("control", ""):
        raise ValueError(f"config.data.control: the model reads a {cc}-channel control image (a ControlNet), but no "
                         f"control kind is set (config.data.control={config.data.get('control', '')!r}); expected 'canny' or 'mask'")
    if config.data.get("control", "") and not cc:
        raise ValueError(f"config.data.control: {config.data.control!r} makes control images, but the model reads none "
                         f"(config.model_name={config.model_name!r}); expected '' or a ControlNet model ('controlnet')")
    _check_captions(config, model, dataset)
    d = config.diffusion
    if d.p_uncond > 0:
        full = network.example_batch(model, dataset.image_shape, transform)["cond"]
        if not any(k in full for k in d.uncond_keys):
            raise ValueError(
                f"config.diffusion.p_uncond: {d.p_uncond} drops the kinds {tuple(d.uncond_keys)} "
                f"(config.diffusion.uncond_keys), but the model reads none of them (its conditioning: {sorted(full)}); "
                "expected 0, or a conditional model (config.model.num_classes / context_dim)"
            )


def _check_captions(config: ml_collections.ConfigDict, model, dataset) -> None:
    """A text model needs a captioned dataset whose tokens fit its text encoder, and vice versa."""
    L = network.text_length(model)
    has_tokens = isinstance(dataset.source, Mapping) and "tokens" in dataset.source
    if L and not has_tokens:
        raise ValueError(f"config.data.name: the model reads captions (config.model_name={config.model_name!r}) but "
                         f"dataset {config.data.name!r} has none; expected 'captioned_shapes', or a Fashion-MNIST set "
                         "with config.data.captions=True")
    if not L:
        return
    from jdiff.data import captions as captions_lib

    tokenizer = captions_lib.tokenizer_of(config.data)
    if tokenizer.max_length > model.max_length:
        raise ValueError(f"config.model.max_length: {model.max_length} is shorter than the captions' "
                         f"config.data.caption_length {tokenizer.max_length}")
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"config.model.vocab_size: {model.vocab_size} is smaller than dataset {config.data.name!r}'s "
                         f"{tokenizer.vocab_size} token ids (padding included)")


def validate_run(config: ml_collections.ConfigDict, model, dataset, schedule, transform=None) -> None:
    """Everything about a run that can be checked before training: the sample and eval sections
    (used only at the end), the conditioning the batches carry. Raises ValueError naming the key."""
    if getattr(model, "num_classes", None) not in (None, dataset.num_classes):
        raise ValueError(
            f"config.model.num_classes: {model.num_classes} does not match dataset "
            f"{config.data.name!r} with {dataset.num_classes} classes"
        )
    _check_conditioning(config, model, dataset, transform)
    _check_sampling(config, model, dataset, schedule)
    _check_evaluation(config, dataset)
    init_from = config.train.init_from
    if init_from:
        load_config(init_from)  # a readable workdir; its params are read only if no checkpoint resumes


def _init_from(config: ml_collections.ConfigDict, params, trainable: str, mesh: Mesh):
    """``params`` with the matching paths replaced by ``config.train.init_from``'s EMA params,
    moved by ``config.train.init_map`` / ``init_new_classes_from`` (:func:`map_params`)."""
    source, step = load_params(config.train.init_from, mesh)
    source = map_params(source, tuple(config.train.init_map), tuple(config.train.init_new_classes_from))
    params, loaded = overlay_params(params, source)
    logging.info("initialised %d of %d param arrays from %s (step %d)", len(loaded), len(param_paths(params)),
                 config.train.init_from, step)
    if trainable:
        frozen = param_paths(split_params(params, trainable)[1])
        missing = sorted(set(frozen) - set(loaded))
        if missing:
            logging.warning("%d frozen param arrays are not in %s and keep their random init, e.g. %s",
                            len(missing), config.train.init_from, missing[:3])
    return params


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted functions of a training run and the state's target shapes and shardings."""

    make_params: Callable[[], Any]  # -> params, placed on the param shardings
    init_state: Callable[[Any], TrainState]  # params -> the initial state, placed on the state shardings
    train_step: Callable  # (state, global batch) -> (state, metrics), the state donated
    target: Any  # the state's ShapeDtypeStructs with their shardings (what a resume restores onto)


# The programs of recent training runs in this process, keyed by everything they are a function
# of: the config (as JSON), the data's image shape, the mesh and the FSDP choice. A second run
# with the same request (a resume, a notebook cell run again, a test repeating a run) reuses the
# jitted functions and their traces instead of tracing, lowering and looking up every program
# again (about 5 s of CPU for the tiny test config). A cache like jit's own, bounded.
_PROGRAMS: "collections.OrderedDict[tuple, _Programs]" = collections.OrderedDict()
_PROGRAMS_KEPT = 4


def _programs(config: ml_collections.ConfigDict, model, schedule, transform, optimizer, image_shape: tuple,
              mesh: Mesh, fsdp: bool, fsdp_min_size: int, init_key: jax.Array, state_key: jax.Array) -> _Programs:
    """The programs of this request (see :data:`_PROGRAMS`): built from the given network, schedule,
    transform and optimizer, or those of an earlier call with the same key. The PRNG keys are
    functions of ``config.seed``, which the key holds."""
    try:
        key = (config.to_json(sort_keys=True), image_shape, mesh, bool(fsdp), int(fsdp_min_size))
    except (TypeError, ValueError):  # a value JSON cannot hold: build afresh, keep nothing
        key = None
    if key is not None and key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    example_cond = network.example_batch(model, image_shape, transform)["cond"]
    trainable = config.train.trainable

    def make_params():
        return init_params(model, image_shape, init_key, cond=example_cond)

    def init_state(params):
        return create_train_state(params, optimizer, state_key, trainable)

    # The state's shapes and shardings, without computing it: a resume restores onto them (no
    # fresh state beside the restored one); otherwise every process computes the same initial
    # state and each device keeps only its shards.
    abstract_params = jax.eval_shape(make_params)
    param_shardings = parallel.param_shardings(abstract_params, mesh, fsdp, min_size=fsdp_min_size)
    abstract_state = jax.eval_shape(init_state, abstract_params)
    state_shardings = parallel.param_shardings(abstract_state, mesh, fsdp, min_size=fsdp_min_size)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
    train_step = jax.jit(
        make_train_step(network.apply_fn(model), schedule, optimizer, config, transform=transform,
                        num_classes=getattr(model, "num_classes", None)),
        in_shardings=(state_shardings, parallel.data_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    programs = _Programs(jax.jit(make_params, out_shardings=param_shardings),
                         jax.jit(init_state, out_shardings=state_shardings), train_step, target)
    if key is not None:
        _PROGRAMS[key] = programs
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    return programs


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

    The network is ``jdiff.models.build(config.model_name, config.model)``; each data batch
    becomes the step's ``{"image", "cond"}`` (labels -> ``cond["label"]`` for class-conditional
    networks) and passes through ``config.data.transform`` inside the step. Only the params
    matching ``config.train.trainable`` train; ``config.train.init_from`` initialises matching
    params from another workdir's EMA params.

    ``mesh``: the devices to train on (default ``jdiff.parallel.make_mesh()``, all devices of all
    processes); the global batch ``config.data.batch_size`` is split along its data axis.
    ``fsdp``: shard params, EMA and optimizer state (leaves of at least ``fsdp_min_size``
    elements) along that axis too, instead of replicating them (``jdiff.parallel.param_shardings``).
    Neither changes the result beyond float summation order.

    A SIGTERM (a preemption notice) saves the current step and returns ``{"step", "preempted":
    True}`` without samples or evaluation; the same call resumes from exactly that step.

    The jitted train step, init and state functions of the last 4 distinct requests (config,
    data shape, mesh, FSDP) are kept in the process, so a repeated call (a resume, a notebook cell
    run again) traces and compiles nothing new for them.
    """
    # Everything that can be wrong with the request is checked before the workdir is touched.
    config = adapt.resolve_base(config)  # an adaptation takes its network from config.base_workdir
    config_lib.validate(config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(config.data.batch_size, mesh, "config.data.batch_size")
    writer = jax.process_index() == 0
    dataset = data_lib.get_dataset(config.data)
    model = build_model(config)
    schedule = config_lib.make_schedule(config)
    transform = network.make_transform(config)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    ckpt.check_experiment(config)  # reads files only
    optimizer = make_optimizer(config.optim)
    validate_run(config, model, dataset, schedule, transform)

    trainable = config.train.trainable
    init_key, state_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
    programs = _programs(config, model, schedule, transform, optimizer, tuple(dataset.image_shape), mesh, fsdp,
                         fsdp_min_size, init_key, state_key)
    state = ckpt.restore(programs.target)  # onto the target shardings, whatever mesh wrote it
    if state is not None:
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    else:
        params = programs.make_params()
        if config.train.init_from:
            params = _init_from(config, params, trainable, mesh)
        state = programs.init_state(params)
        del params
    if writer:
        ckpt.write_experiment(config)

    train_step = programs.train_step
    log = _MetricLog(workdir) if writer else None
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves((state.params, state.frozen)))
    num_trainable = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    logging.info("model: %s parameters, %s trainable", f"{num_params:,}", f"{num_trainable:,}")

    tc = config.train
    start = int(jax.device_get(state.step))
    bar = _progress(tc.num_steps, start, tc.progress and writer)
    pending: list[tuple[int, dict]] = []  # device metrics not yet inspected
    last_good = start
    t0, steps_timed = time.perf_counter(), 0

    skip_limit = int(config.optim.get("skip_nonfinite", 0))
    skipped_in_a_row, skipped_total = 0, 0

    def flush():
        """Pull pending metrics to the host, fail on a non-finite loss (or on more skipped steps
        in a row than ``optim.skip_nonfinite`` allows), log means over the finite steps."""
        nonlocal pending, t0, steps_timed, skipped_in_a_row, skipped_total
        if not pending:
            return None
        host = jax.device_get([m for _, m in pending])
        finite = []
        for (s, _), m in zip(pending, host):
            if all(math.isfinite(float(v)) for v in m.values()):
                finite.append(m)
                skipped_in_a_row = 0
                continue
            skipped_in_a_row += 1
            skipped_total += 1
            if skipped_in_a_row > skip_limit:
                raise NonFiniteLossError(
                    f"non-finite training metrics at step {s}: {m}"
                    + (f" ({skipped_in_a_row} steps in a row, config.optim.skip_nonfinite={skip_limit})" if skip_limit else "")
                    + f". Training stopped; the last checkpoint (step {last_good}) is untouched. Lower optim.lr, check "
                    "the data, or set config.optim.skip_nonfinite to skip such steps"
                )
            logging.warning("step %d: non-finite gradients, update skipped (%d in a row, %d in all)", s,
                            skipped_in_a_row, skipped_total)
        mean = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan") for k in host[0]}
        if skip_limit:
            mean["skipped_steps"] = skipped_total
        dt = time.perf_counter() - t0
        mean["steps_per_sec"] = steps_timed / dt if dt > 0 else float("nan")
        step = pending[-1][0]
        pending = []
        t0, steps_timed = time.perf_counter(), 0
        return step, mean

    preempted = _PreemptionNotice()
    try:
        for step in range(start, tc.num_steps):
            batch = data_lib.batch_at(
                dataset.source, step, batch_size=config.data.batch_size, seed=config.seed,
                random_flip=config.data.random_flip, process_index=jax.process_index(), process_count=jax.process_count(),
            )
            batch = network.step_batch(batch, model)
            state, metrics = train_step(state, parallel.global_batch(batch, mesh))
            pending.append((step + 1, metrics))
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                # Bounded async dispatch: wait for an earlier step before queueing more. With
                # several XLA CPU devices in one process, a deep queue of steps has deadlocked in
                # the gradient all-reduce's rendezvous (RELIABILITY.md); two in flight keep the
                # devices busy (same step time in a 200-step probe).
                jax.block_until_ready(pending[-1 - MAX_STEPS_IN_FLIGHT][1])
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
            if preempted(done) and done != tc.num_steps:
                # A preemption notice (SIGTERM): save this step, skip samples and evaluation, and
                # return; the same command resumes from exactly here.
                logged = flush()
                if logged and writer:
                    log.write(*logged)
                if done % tc.checkpoint_every:
                    ckpt.save(state)
                if bar is not None:
                    bar.close()
                ckpt.close()
                preempted.restore()
                logging.warning("preempted (SIGTERM): saved step %d in %s; run the same command to resume", done, workdir)
                return {"step": done, "preempted": True}
            if tc.sample_every and done % tc.sample_every == 0 and done != tc.num_steps:
                _write_samples(config, model, state, schedule, dataset, sample_key, os.path.join(workdir, f"samples_{done}.png"), mesh)
    finally:
        preempted.restore()
        ckpt.wait()  # a save in flight finishes, whatever ends the loop
    if bar is not None:
        bar.close()

    final = {"step": int(jax.device_get(state.step)), "num_params": num_params, "num_trainable_params": num_trainable}
    if config.sample.num:  # 0: no grid, and no sampler to compile
        final["samples_png"] = _write_samples(config, model, state, schedule, dataset, sample_key,
                                              os.path.join(workdir, "samples.png"), mesh)
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


class _PreemptionNotice:
    """Whether a preemption notice (SIGTERM) has arrived, agreed by every process.

    One process: a SIGTERM handler sets a flag (installed only from the main thread; the
    previous handler comes back with :meth:`restore`). Several processes: JAX's preemption
    sync point (``multihost_utils.reached_preemption_sync_point``, which needs the preemption
    service of ``jax.distributed``), so that all of them stop at the same step; without it,
    SIGTERM keeps its default meaning there.
    """

    def __init__(self):
        self._flag = False
        self._unavailable = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame):
        del signum, frame
        self._flag = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        if self._unavailable:
            return False
        try:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        except Exception:  # noqa: BLE001 - no preemption service: no notice, and no more asking
            self._unavailable = True
            return False

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _sample_cond(config, model, dataset, num: int, key: jax.Array) -> tuple[dict, np.ndarray | None]:
    """Conditioning for sample grids beyond labels (e.g. the low-resolution copy of the first
    ``num`` training images for a cond["image"] model) and those images' labels (None if the
    dataset has none); ({}, None) for models that need none."""
    if not network.needs_data_conditioning(model):
        return {}, None
    n = min(num, data_lib.source_length(dataset.source))
    batch = data_lib.batch_at(dataset.source, 0, batch_size=n, seed=config.seed, shuffle=False)
    images = np.asarray(batch["image"])
    labels = np.resize(np.asarray(batch["label"], np.int32), (num,)) if "label" in batch else None
    cond = network.conditioning_from_data(config, model, np.resize(images, (num,) + images.shape[1:]), None, key)
    fed = network.step_batch(batch, model)["cond"]
    for k in ("tokens", "context"):  # the training captions / CLIP embeddings of those images
        if k in fed:
            cond[k] = np.resize(np.asarray(batch[k]), (num,) + batch[k].shape[1:])
    return cond, labels


def _write_samples(config, model, state: TrainState, schedule, dataset, key, path: str, mesh: Mesh | None = None) -> str:
    """Sample on every process (the sampler is one SPMD program); process 0 writes the grid
    (class-balanced labels, one class per row when ``sample.num`` is a multiple of K; a model
    conditioned on data images gets those images' labels)."""
    s = config.sample
    num_classes = getattr(model, "num_classes", None)
    labels = None if num_classes is None else balanced_labels(s.num, num_classes)
    cond, data_labels = _sample_cond(config, model, dataset, s.num, jax.random.fold_in(key, 2))
    by_class = labels is not None and data_labels is None
    if labels is not None and data_labels is not None:
        labels = data_labels
    x = generate(
        model, state.full_ema_params(), schedule, dataset.image_shape, s.num, key,
        labels=labels, cond=cond,
        guidance_weight=s.guidance, batch_size=s.batch_size, method=s.method, steps=s.steps,
        eta=s.eta, clip=s.clip or None, variance=config.diffusion.variance, parameterization=config.diffusion.parameterization,
        mesh=mesh, sigma_data=config_lib.sigma_data_of(config),
    )
    x = latent.decode_samples(config.data, x)  # latent diffusion: the grid shows pixels
    if x.shape[1:3] == (1, 1):  # embeddings (unCLIP's prior): the raw vectors, not a picture
        path = os.path.splitext(path)[0] + ".npz"
        if jax.process_index() == 0:
            np.savez(path, samples=x.reshape(len(x), -1))
        return path
    ncols = s.num // num_classes if (by_class and s.num % num_classes == 0) else None
    return images_lib.save_grid(x, path, ncols=ncols) if jax.process_index() == 0 else path


def evaluate(config, model, state: TrainState, schedule, dataset, key) -> dict:
    """Sample quality numbers at the end of training (``config.eval``: ``num_samples`` scored by
    ``evaluator``, the bits/dim bound on ``bpd_examples`` test images); empty if both are 0."""
    e = config.eval
    if not e.num_samples and not e.bpd_examples:
        return {}
    loaded = Loaded(config, model, state.full_ema_params(), schedule, tuple(dataset.image_shape),
                    int(jax.device_get(state.step)))
    ev = evaluators.get(e.evaluator)
    result = evaluate_loaded(loaded, max(e.num_samples, ev.min_samples if ev else 1), jax.random.fold_in(key, 1),
                             guidance_weight=config.sample.guidance, bpd_examples=e.bpd_examples,
                             evaluator=e.evaluator if e.num_samples else "")
    return {f"eval/{k}": v for k, v in result.items() if k not in ("step",)}
