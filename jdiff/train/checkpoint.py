"""Checkpoints through orbax: keep the newest N, resume from the newest good one.

The workdir holds ``checkpoints/<step>/`` and ``experiment.json``, the config fingerprint that
a restart must match. A save is atomic (orbax writes a temporary directory, puts
``commit_success.txt`` in it and renames it: a save killed midway leaves no step directory)
and asynchronous (``save`` returns once the arrays are copied off the devices; the files are
written in the background, and the next ``save``, ``wait`` or ``close`` waits for them). Each
finished step also gets ``jdiff_files.json``, the size of every file in it, and its
``_CHECKPOINT_METADATA`` records the PRNG implementation the run's keys belong to.

Restoring tries the newest step first and tells three kinds of failure apart:

* **corrupt** (a missing commit marker, an empty directory, a file shorter or longer than
  written, metadata that is not JSON, arrays that do not decode): a warning naming the step and
  the file, the step moved aside to ``checkpoints.corrupt/<step>`` (renamed, never deleted, so
  that later saves at those steps land), and the previous step is tried;
* **incompatible** (a readable checkpoint of another state structure or shapes, as a config
  change outside the fingerprint makes, or keys of another PRNG implementation):
  :class:`IncompatibleCheckpointError`, nothing moved;
* **transient** (an I/O error that may pass: timeouts, EIO/EAGAIN/ESTALE, "UNAVAILABLE"): retried
  with back-off, then :class:`TransientCheckpointError`, nothing moved.

Every process of a multi-host job takes part in each decision: the candidate steps are process
0's listing, and a step is used only if every process restored it (the most severe outcome over
processes wins), so all of them resume from the same step or all stop.

Arrays are saved shard by shard (every process calls ``save`` and writes its own shards) and
restored onto the shardings of the restore target, so a checkpoint written on one mesh loads on
another (8 devices -> 1, 1 -> 4, 8 -> 4x2, replicated -> FSDP). The directory must be a local or
network file system (the corrupt-step rename and the file listing use ``os``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jdiff.train import config as config_lib

__all__ = ["Checkpointer", "IncompatibleCheckpointError", "TransientCheckpointError"]

_FINGERPRINT = "experiment.json"
_ASIDE = "checkpoints.corrupt"
_FILES = "jdiff_files.json"  # {relative path: size} of a finished step, written after its commit
_COMMIT = "commit_success.txt"
_JSON_FILES = ("_CHECKPOINT_METADATA", "default/_METADATA", "default/_sharding")
_CHUNK = 1 << 24  # bytes per read when verifying a step's files
_MAX_CANDIDATES = 64  # steps considered on restore, newest first (an int32 vector shared by all processes)
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY, errno.EIO,
                     errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH}
_TRANSIENT_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED)\b")
_OK, _CORRUPT, _INCOMPATIBLE, _TRANSIENT = 0, 1, 2, 3  # outcomes of a restore; the max over processes wins


def _path(keys) -> str:
    """'a/b/0' for a pytree key path (dict keys, attributes and indices alike)."""
    names = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return "/".join(names)


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint of a state with another structure, shapes or PRNG implementation."""


class TransientCheckpointError(OSError):
    """A checkpoint could not be read for a reason that may pass (retried; nothing was moved)."""


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is an I/O failure that may pass."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (TimeoutError, ConnectionError, InterruptedError, BlockingIOError, TransientCheckpointError)):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        if _TRANSIENT_STATUS.search(str(error)[:2000]):
            return True
        error = error.__cause__ or error.__context__
    return False


def _agree(code: int) -> int:
    """The largest of every process's ``code`` (the most severe outcome).

    A value outside the outcome codes means this collective was paired with another one (a
    process fell out of step, e.g. an error inside orbax's read on one process only): stop
    without deciding anything, rather than act on a garbled vote.
    """
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils

    votes = np.asarray(multihost_utils.process_allgather(np.asarray(code, np.int32))).ravel()
    if not np.isin(votes, (_OK, _CORRUPT, _INCOMPATIBLE, _TRANSIENT)).all():
        raise RuntimeError(
            f"checkpoint restore: the processes fell out of step (votes {votes.tolist()}); an error on some of them "
            "interrupted orbax's coordinated read. Nothing was moved or deleted; run again"
        )
    return int(votes.max())


class Checkpointer:
    """Save and restore a :class:`~jdiff.train.state.TrainState` pytree under ``workdir``.

    ``keep``: the newest steps kept (older ones are deleted by orbax after each save).
    ``retries`` / ``backoff``: attempts after a transient read error, ``backoff * 2**i`` seconds
    apart. ``async_save``: return from :meth:`save` before the files are written.
    """

    def __init__(self, workdir: str, keep: int = 3, *, retries: int = 3, backoff: float = 0.5, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._manager = None
        self._keep = keep
        self._retries = retries
        self._backoff = backoff
        self._async = async_save
        self._unlisted: list[int] = []  # saved steps whose file list is not written yet

    @property
    def manager(self) -> ocp.CheckpointManager:
        """The orbax ``CheckpointManager`` of ``workdir/checkpoints`` (created on first use, with this
        checkpointer's ``keep`` and ``async_save``)."""
        if self._manager is None:
            os.makedirs(self.directory, exist_ok=True)
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                                     enable_async_checkpointing=self._async),
            )
        return self._manager

    def _reset(self) -> None:
        """Forget the manager (its cached steps and item layout): after a failed read or a rename."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def steps(self) -> list[int]:
        """The steps in ``checkpoints/``, ascending, after waiting for this process's saves in flight."""
        if not os.path.isdir(self.directory):
            return []
        self.wait()
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def check_experiment(self, config) -> None:
        """Raise before anything is written if the workdir belongs to another experiment."""
        path = os.path.join(self.workdir, _FINGERPRINT)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            config_lib.check_compatible(saved, config, self.workdir)
        elif self.steps():
            raise ValueError(
                f"workdir {self.workdir!r} has checkpoints but no {_FINGERPRINT}: it was not written by "
                "jdiff.train; use a new --workdir (nothing was changed)"
            )

    def write_experiment(self, config) -> None:
        """Record the experiment in ``workdir``: ``experiment.json``, the config's fingerprint
        (:func:`jdiff.train.config.experiment_fingerprint`; written once, atomically, and never
        overwritten), and ``config.json``, the whole config (rewritten on every call)."""
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, _FINGERPRINT)
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(config_lib.experiment_fingerprint(config), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        with open(os.path.join(self.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    # ------------------------------------------------------------------ saving

    def save(self, state: Any) -> None:
        """Start writing ``state`` at its step (every process calls it).

        Returns once the arrays are copied off the devices (``state`` may then be donated or
        changed); :meth:`wait` or the next ``save`` waits for the files. Raises RuntimeError if
        orbax refuses the step (one at or below its latest), instead of carrying on as if saved.
        """
        step = int(jax.device_get(state.step))
        self.wait()
        saved = self.manager.save(step, args=ocp.args.StandardSave(state),
                                  custom_metadata={"jdiff": {"prng_impl": _prng_impl()}})
        if not saved:
            raise RuntimeError(
                f"checkpoint of step {step} was not written to {self.directory}: orbax refused it (its steps are "
                f"{self.steps()}); expected a step above the latest. The state is still in memory"
            )
        self._unlisted.append(step)
        if not self._async:
            self.wait()

    def wait(self) -> None:
        """Block until every started save is on disk, then record its files' sizes."""
        if self._manager is None:
            return
        self._manager.wait_until_finished()
        if self._unlisted and jax.process_index() == 0:
            for step in self._unlisted:
                self._write_file_list(step)
        self._unlisted = []

    def _write_file_list(self, step: int) -> None:
        root = os.path.join(self.directory, str(step))
        if not os.path.isdir(root):  # already removed by retention
            return
        sizes = {}
        for d, _, files in os.walk(root):
            for f in files:
                p = os.path.join(d, f)
                rel = os.path.relpath(p, root)
                if rel != _FILES:
                    sizes[rel] = os.path.getsize(p)
        tmp = os.path.join(root, _FILES + ".tmp")
        with open(tmp, "w") as f:
            json.dump(sizes, f, indent=0, sort_keys=True)
        os.replace(tmp, os.path.join(root, _FILES))

    # ------------------------------------------------------------------ restoring

    def restore(self, target: Any, *, move_aside: bool = True) -> Any | None:
        """The newest checkpoint that restores into ``target``'s structure, or None if there is none.

        ``target`` holds arrays or ``jax.ShapeDtypeStruct`` whose ``sharding`` says where each
        restored leaf goes (without one, orbax falls back to the layout the checkpoint was
        written with, which fails on a different set of devices).

        A corrupt newer step is moved to ``checkpoints.corrupt/`` (``move_aside``, what a
        resuming run needs so that its next saves land) or only skipped (readers such as
        sampling, which must not change the workdir). Raises :class:`IncompatibleCheckpointError`
        for a readable checkpoint this state cannot take, :class:`TransientCheckpointError` when
        a step stays unreadable for a reason that may pass, and ValueError when every step is
        corrupt; in each case nothing is deleted.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        candidates = self._candidates()  # steps() waits for this process's saves in flight
        for step in reversed(candidates):
            code, local, state, detail = self._try(step, abstract)
            if code == _OK:
                return state
            if local == _OK:
                detail = "on another process of this job"
            if code == _TRANSIENT:
                raise TransientCheckpointError(
                    f"checkpoint {step} in {self.directory} could not be read ({detail}) after {self._retries} retries; "
                    "this looks temporary (an I/O error, not corruption): nothing was moved; run again"
                )
            if code == _INCOMPATIBLE:
                raise IncompatibleCheckpointError(
                    f"checkpoint {step} in {self.directory} holds a state this run cannot take: {detail}. A config "
                    "change outside the experiment fingerprint (e.g. an optimizer option) alters the state; use a new "
                    "--workdir or restore the config (nothing was changed)"
                )
            where = f"moved it to {self._move_aside(step)}" if move_aside else "left it in place"
            logging.warning("checkpoint %s in %s is corrupt: %s; %s and trying an older one", step, self.directory,
                            detail, where)
        if candidates:
            where = f"all moved to {os.path.join(self.workdir, _ASIDE)}" if move_aside else "all left in place"
            raise ValueError(f"no checkpoint in {self.directory} could be restored (steps {candidates}, {where}); "
                             "nothing was deleted")
        return None

    def _candidates(self) -> list[int]:
        """Process 0's newest steps (every process then tries the same ones)."""
        steps = self.steps()[-_MAX_CANDIDATES:]
        if jax.process_count() == 1:
            return steps
        from jax.experimental import multihost_utils

        padded = np.full((_MAX_CANDIDATES,), -1, np.int32)
        padded[: len(steps)] = steps
        shared = np.asarray(multihost_utils.broadcast_one_to_all(padded))
        return [int(s) for s in shared if s >= 0]

    def _verify(self, step: int) -> tuple[int, str | None]:
        """Checks before orbax decodes anything: the commit marker, the file sizes against
        ``jdiff_files.json``, every file readable (each byte read once, so an I/O error shows
        here on every process alike), the JSON metadata, the PRNG implementation.
        ``(outcome, what is wrong, naming the file)``."""
        root = os.path.join(self.directory, str(step))
        try:
            present = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
            if not present:
                return _CORRUPT, f"its directory {root} is empty"
            if not os.path.exists(os.path.join(root, _COMMIT)):
                return _CORRUPT, f"it has no commit marker {os.path.join(root, _COMMIT)} (the save did not finish)"
            parsed = {}
            for rel in (_FILES,) + _JSON_FILES:
                p = os.path.join(root, rel)
                if os.path.exists(p):
                    try:
                        with open(p) as f:
                            parsed[rel] = json.load(f)
                    except ValueError as e:
                        return _CORRUPT, f"file {p} is not valid JSON ({e})"
            for rel, size in sorted(parsed.get(_FILES, {}).items()):
                p = os.path.join(root, rel)
                if not os.path.exists(p):
                    return _CORRUPT, f"file {p} is missing"
                if os.path.getsize(p) != size:
                    return _CORRUPT, f"file {p} has {os.path.getsize(p)} bytes, {size} were written"
            for p in present:  # every byte once: an I/O error shows here, on every process alike
                with open(p, "rb") as fh:
                    while fh.read(_CHUNK):
                        pass
            step_meta = parsed.get("_CHECKPOINT_METADATA", {})
            recorded = (step_meta.get("custom_metadata") or {}).get("jdiff", {}).get("prng_impl")
        except OSError as e:
            return (_TRANSIENT if is_transient(e) else _CORRUPT), f"{type(e).__name__}: {e}"
        if recorded is not None and recorded != _prng_impl():
            return _INCOMPATIBLE, (f"its PRNG keys are {recorded!r} keys but this process uses {_prng_impl()!r} "
                                   f"(jax_default_prng_impl); expected {recorded!r}: set "
                                   f"jax.config.update('jax_default_prng_impl', {recorded!r})")
        return _OK, None

    def _try(self, step: int, abstract: Any) -> tuple[int, int, Any, str | None]:
        """Verify and restore ``step`` onto ``abstract``, retrying transient errors with back-off:
        ``(agreed outcome, this process's outcome, state or None, what went wrong here)``.

        Every process makes the same calls in the same order (orbax's listings and barriers are
        collectives that pair up by order): each phase ends with an agreement, and a step that
        any process finds corrupt is read by none.
        """
        for attempt in range(self._retries + 1):
            local, detail = self._verify(step)
            code, state = _agree(local), None
            if code == _OK:
                try:
                    state = self._restore_step(step, abstract)
                except Exception as e:  # noqa: BLE001 - classified below, then agreed on
                    local = _TRANSIENT if is_transient(e) else _CORRUPT
                    detail = f"{type(e).__name__}: {_summary(e)}"
                code = _agree(local)
                if code == _CORRUPT:  # a read failed somewhere: is it another state, not damage?
                    mismatch = self._mismatch(step, abstract)
                    if _agree(_INCOMPATIBLE if mismatch else _CORRUPT) == _INCOMPATIBLE:
                        code, local, detail = _INCOMPATIBLE, (_INCOMPATIBLE if mismatch else local), mismatch or detail
            if code != _OK:
                self._reset()  # a failed read can leave the manager's item layout wrong for other steps
                state = None
            if code != _TRANSIENT or attempt == self._retries:
                return code, local, state, detail
            delay = self._backoff * 2**attempt
            logging.warning("checkpoint %s: transient read error (%s); retrying in %.1f s", step, detail or "on another "
                            "process of this job", delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _saved_paths(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """Leaf path -> shape of checkpoint ``step``'s own metadata, or None if it cannot be read."""
        try:
            meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "default")).item_metadata
            meta = getattr(meta, "tree", meta)
            return {_path(k): tuple(getattr(v, "shape", ())) for k, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
        except Exception:  # noqa: BLE001 - unreadable metadata is corruption, not incompatibility
            return None

    def _mismatch(self, step: int, abstract: Any) -> str | None:
        """How checkpoint ``step``'s own metadata differs from ``abstract`` (first differing leaf
        path or shape), or None when it matches or the metadata cannot be read (corrupt)."""
        saved = self._saved_paths(step)
        if not saved:
            return None
        wanted = {_path(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        legacy = {k for k in wanted if k.startswith("frozen/")}  # pre-"frozen" checkpoints restore without it
        missing = sorted(set(wanted) - set(saved) - legacy)
        extra = sorted(set(saved) - set(wanted))
        if missing or extra:
            return (f"leaves {missing[:3]} of this run are not in the checkpoint" if missing else "") + \
                   ("; " if missing and extra else "") + (f"leaves {extra[:3]} of the checkpoint are not in this run" if extra else "")
        for k in sorted(saved):
            if k in wanted and saved[k] != wanted[k]:
                return f"leaf {k} has shape {saved[k]} in the checkpoint but {wanted[k]} in this run"
        return None

    def _move_aside(self, step: int) -> str:
        """Rename ``checkpoints/<step>`` to ``checkpoints.corrupt/<step>[.<time>]`` (process 0;
        the others wait), and forget the manager's cached steps."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, _ASIDE, str(step))
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(dst):
                dst = f"{dst}.{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jdiff_checkpoint_aside_{step}")
        self._reset()
        return dst

    def _restore_step(self, step: int, abstract: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            # Checkpoints written before TrainState had a ``frozen`` field hold the same state
            # with everything trainable: restore the other fields into it. If that fails too,
            # the first error is the one that describes the checkpoint.
            if not (dataclasses.is_dataclass(abstract) and getattr(abstract, "frozen", None) == {}):
                raise
            self._reset()
            legacy = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract) if f.name != "frozen"}
            try:
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(legacy))
            except Exception:  # noqa: BLE001
                raise e from None
            return abstract.replace(**restored)

    def close(self) -> None:
        """Wait for any save in progress, then release orbax's resources."""
        self.wait()
        self._reset()


def _prng_impl() -> str:
    return str(jax.config.jax_default_prng_impl)


def _summary(error: BaseException) -> str:
    """The first line of an orbax/TensorStore error, and the array it was reading if it says."""
    text = str(error)
    first = text.strip().splitlines()[0][:600] if text.strip() else ""
    m = re.search(r"'path': '([^']+)'", text)
    return f"{first} (array {m.group(1).rstrip('/')})" if m and m.group(1).rstrip("/") not in first else first
