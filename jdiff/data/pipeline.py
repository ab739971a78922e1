"""A deterministic, resumable, multi-host batch pipeline in NumPy.

The batch at training step ``s`` is a pure function of ``(source, seed, s)`` and the batch
settings, so a run resumed at step ``s`` reads exactly the batches an uninterrupted run
would have read; no iterator state has to be checkpointed, only the step.

Order of examples: with ``S = steps_per_epoch(N, B, drop_remainder)``, step ``s`` is
position ``k = s mod S`` of epoch ``e = s // S``; epoch ``e`` visits the examples in the
order ``np.random.default_rng([seed, 0, e]).permutation(N)`` (the identity when
``shuffle=False``), and global batch ``s`` is elements ``k B .. (k + 1) B - 1`` of it.
Process ``p`` of ``P`` reads the ``p``-th contiguous block of ``B / P`` of them, so the
processes of a multi-host job read disjoint slices whose union, in process order, is the
global batch. With ``drop_remainder=False`` an epoch's last batch holds the ``N mod B``
remaining examples, split as evenly as ``np.array_split`` does (a process can get none).

A source is either arrays -- one array, or a dict or tuple of arrays sharing the leading
dimension N, read by fancy indexing -- or any other object with ``__len__`` and
``__getitem__(int)`` returning a record (an array or a dict/tuple of arrays), such as
:class:`jdiff.data.tfds_source.TfdsSource`; records are stacked along a new axis 0.
Batches are NumPy pytrees of the same structure on the host; placing them on devices
(e.g. ``jax.make_array_from_process_local_data``) is the training loop's job.

Why NumPy and not grain: a grain ``MapDataset`` with an ``IndexSampler`` would also make the
batch a pure function of (seed, step), but (1) its shuffle (a Feistel-network index shuffle)
is a different order from the documented ``default_rng`` permutation that tests pin and
that resumed runs of existing workdirs rely on, so adopting it changes every run's data
order; (2) the sources jdiff trains on (digits, shapes, Fashion-MNIST: 188 MB of float32 at
28x28) are in-memory arrays whose batch is one fancy index, so worker processes and
prefetch of decoded batches have nothing to hide, and on the 2-core machines jdiff is
trained on they would take CPU from the train step; (3) per-process sharding is already the
contiguous slice above. grain earns its place for record sources too big for memory that
are decoded per example (large TFDS datasets); a ``TfdsSource`` is the hook for that.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import numpy as np

__all__ = ["steps_per_epoch", "batch_indices", "batch_at", "iterate", "source_length"]

# Distinct SeedSequence entropy prefixes keep the permutation and flip streams independent.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _is_array_source(source: Any) -> bool:
    if _is_array(source):
        return True
    if isinstance(source, Mapping) or type(source) is tuple:
        leaves = jax.tree_util.tree_leaves(source)
        return bool(leaves) and all(_is_array(leaf) for leaf in leaves)
    return False


def source_length(source: Any) -> int:
    """N, the number of examples of ``source`` (arrays or a random-access object)."""
    if _is_array_source(source):
        sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree_util.tree_leaves(source)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"source: expected arrays sharing one leading dimension, got leading dims {sorted(map(str, sizes))}"
            )
        return int(sizes.pop())
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise ValueError(
            f"source: expected arrays (an array, or a dict/tuple of arrays) or an object with __len__ and "
            f"__getitem__, got {type(source).__name__}"
        )
    return len(source)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Global batches per epoch: floor(N / B) with ``drop_remainder``, else ceil(N / B)."""
    if not _is_int(num_examples) or num_examples < 1:
        raise ValueError(f"num_examples: expected a positive int, got {num_examples!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    steps = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
    if steps == 0:
        raise ValueError(
            f"batch_size: expected at most num_examples={num_examples} with drop_remainder=True "
            f"(otherwise no batch is ever full), got {batch_size}"
        )
    return steps


def _process(process_index: int | None, process_count: int | None, batch_size: int) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not _is_int(process_count) or process_count < 1:
        raise ValueError(f"process_count: expected a positive int, got {process_count!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index: expected an int in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size: expected a multiple of process_count={process_count} (the global batch is split "
            f"evenly over processes), got {batch_size}"
        )
    return int(process_index), int(process_count)


def _check_step(step: int, argument: str = "step") -> None:
    if not _is_int(step) or step < 0:
        raise ValueError(f"{argument}: expected a non-negative int, got {step!r}")


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(n)


class _BatchPlan:
    """Validated batch settings plus a one-epoch cache of the permutation (for iterate)."""

    def __init__(self, n, batch_size, seed, process_index, process_count, drop_remainder, shuffle):
        self.steps = steps_per_epoch(n, batch_size, drop_remainder)
        self.process_index, self.process_count = _process(process_index, process_count, batch_size)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, bool(shuffle)
        self._epoch, self._order = -1, None

    def _slice(self, global_batch: np.ndarray) -> np.ndarray:
        if global_batch.shape[0] == self.batch_size:
            return global_batch.reshape(self.process_count, -1)[self.process_index]
        return np.array_split(global_batch, self.process_count)[self.process_index]

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, _epoch_order(self.n, self.seed, epoch, self.shuffle)
        return self._slice(self._order[k * self.batch_size : (k + 1) * self.batch_size])

    def flips(self, step: int) -> np.ndarray:
        # Drawn for the whole global batch and then sliced, so a process's flips do not
        # depend on the number of processes.
        k = step % self.steps
        size = min(self.batch_size, self.n - k * self.batch_size)
        return self._slice(np.random.default_rng([self.seed, _FLIP_STREAM, step]).random(size) < 0.5)


def batch_indices(
    step: int,
    *,
    num_examples: int,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    shuffle: bool = True,
) -> np.ndarray:
    """Indices into the source of this process's part of global batch ``step``.

    Args:
      step: the training step s >= 0.
      num_examples: N, the size of the source.
      batch_size: the global batch size B, a multiple of process_count.
      seed: a non-negative int; the epoch-e order is default_rng([seed, 0, e]).permutation(N).
      process_index, process_count: this process and the number of processes (default:
        ``jax.process_index()`` and ``jax.process_count()``).
      drop_remainder: drop each epoch's last, partial batch.
      shuffle: False keeps the source order in every epoch (for evaluation).

    Returns:
      int64 [B / process_count] (fewer for a partial batch with drop_remainder=False).
    """
    _check_step(step)
    plan = _BatchPlan(num_examples, batch_size, seed, process_index, process_count, drop_remainder, shuffle)
    return plan.indices(step)


def _gather(source: Any, idx: np.ndarray, arrays: bool) -> Any:
    if arrays:
        return jax.tree_util.tree_map(lambda a: a[idx], source)
    if idx.shape[0] == 0:
        # A process left without examples still needs the record structure and dtypes.
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[None][:0], source[0])
    records = [source[int(i)] for i in idx]
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *records)


def _flip(batch: Any, flips: np.ndarray) -> Any:
    def f(a: np.ndarray) -> np.ndarray:
        if a.ndim != 4:
            return a
        return np.where(flips[:, None, None, None], a[:, :, ::-1], a)

    return jax.tree_util.tree_map(f, batch)


def _batch(source, arrays, plan: _BatchPlan, step: int, random_flip: bool) -> Any:
    batch = _gather(source, plan.indices(step), arrays)
    return _flip(batch, plan.flips(step)) if random_flip else batch


def batch_at(
    source: Any,
    step: int,
    *,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    shuffle: bool = True,
    random_flip: bool = False,
) -> Any:
    """This process's part of global batch ``step`` of ``source``: a pure function of its arguments.

    Arguments as :func:`batch_indices`, plus:
      source: arrays with leading dimension N, or an object with __len__ and __getitem__.
      random_flip: mirror each example left-right with probability 1/2, drawn from
        default_rng([seed, 1, step]) over the global batch. Every field of rank 3 per
        example ([H, W, C]: images and masks alike) is flipped together; labels are not.
        Off by default; never use it for digits, whose identity a flip can change.

    Returns:
      The batch: the source's structure with a leading axis of size B / process_count.
    """
    _check_step(step)
    arrays = _is_array_source(source)
    if arrays:  # one host copy of device arrays, not one per batch
        source = jax.tree_util.tree_map(np.asarray, source)
    plan = _BatchPlan(source_length(source), batch_size, seed, process_index, process_count, drop_remainder, shuffle)
    return _batch(source, arrays, plan, step, random_flip)


def iterate(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    shuffle: bool = True,
    random_flip: bool = False,
) -> Iterator[Any]:
    """Yield ``batch_at(source, s, ...)`` for s = start_step, start_step + 1, ...

    Resuming a run at step s is ``iterate(..., start_step=s)``. Runs forever unless
    ``num_steps`` is given (e.g. ``steps_per_epoch(N, B, False)`` with ``shuffle=False``
    for one pass over an evaluation split). The epoch's permutation is computed once per
    epoch rather than once per batch.
    """
    _check_step(start_step, "start_step")
    if num_steps is not None and (not _is_int(num_steps) or num_steps < 0):
        raise ValueError(f"num_steps: expected None or a non-negative int, got {num_steps!r}")
    arrays = _is_array_source(source)
    if arrays:  # one host copy of device arrays, not one per batch
        source = jax.tree_util.tree_map(np.asarray, source)
    plan = _BatchPlan(source_length(source), batch_size, seed, process_index, process_count, drop_remainder, shuffle)
    return _iterate(source, arrays, plan, start_step, num_steps, random_flip)


def _iterate(source, arrays, plan, start_step, num_steps, random_flip) -> Iterator[Any]:
    # A separate generator so that iterate() validates its arguments when called, not at
    # the first next().
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield _batch(source, arrays, plan, step, random_flip)
        step += 1
