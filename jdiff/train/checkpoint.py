"""Checkpoints through orbax: keep the newest N, resume from the newest good one.

The workdir holds ``checkpoints/<step>/`` (orbax, written atomically: a save killed midway
leaves no step directory) and ``experiment.json``, the config fingerprint that a restart must
match. A checkpoint that fails to restore is diagnosed: if its own metadata describes a state of
another structure or shapes than the run's (a config change the fingerprint does not cover),
restoring stops with an error naming the first differing leaf; otherwise it is corrupt
(truncated or unreadable files): it is reported, moved aside to ``checkpoints.corrupt/<step>``
(renamed, never deleted) so that later saves at those steps land, and the previous one is used.
A save that orbax refuses raises instead of being silently dropped.

Arrays are saved shard by shard (every process of a multi-host job calls ``save`` and writes
its own shards; orbax coordinates them) and restored onto the shardings of the restore target,
so a checkpoint written on one mesh loads on another (8 devices -> 1, 1 -> 4, replicated ->
FSDP).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from jdiff.train import config as config_lib

_FINGERPRINT = "experiment.json"
_ASIDE = "checkpoints.corrupt"


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
    """A readable checkpoint of a state with another structure or shapes than the run's."""


class Checkpointer:
    """Save and restore a :class:`~jdiff.train.state.TrainState` pytree under ``workdir``."""

    def __init__(self, workdir: str, keep: int = 3):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._manager = None
        self._keep = keep

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            os.makedirs(self.directory, exist_ok=True)
            self._manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True)
            )
        return self._manager

    def steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
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
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, _FINGERPRINT)
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(config_lib.experiment_fingerprint(config), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        with open(os.path.join(self.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))

    def save(self, state: Any) -> None:
        """Write ``state`` at its step; raises RuntimeError if orbax does not write it (a step
        at or below its latest one), instead of carrying on as if it had."""
        step = int(jax.device_get(state.step))
        saved = self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        if not saved:
            raise RuntimeError(
                f"checkpoint of step {step} was not written to {self.directory}: orbax refused it (its steps are "
                f"{self.steps()}); expected a step above the latest. The state is still in memory"
            )

    def restore(self, target: Any, *, move_aside: bool = True) -> Any | None:
        """The newest checkpoint that restores into ``target``'s structure, or None.

        A corrupt newer checkpoint is moved to ``checkpoints.corrupt/`` (``move_aside``, what a
        resuming run needs so that its next saves land) or only skipped (readers such as
        sampling, which must not change the workdir). A readable checkpoint of another state
        structure raises :class:`IncompatibleCheckpointError`.

        ``target`` holds arrays or ``jax.ShapeDtypeStruct`` whose ``sharding`` says where each
        restored leaf goes; without one, orbax falls back to the layout the checkpoint was
        written with, which fails on a different set of devices.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        tried = self.steps()
        for step in reversed(tried):
            try:
                return self._restore_step(step, abstract)
            except Exception as e:  # noqa: BLE001 - diagnosed below: incompatible raises, corrupt falls back
                mismatch = self._mismatch(step, abstract)
                if mismatch is not None:
                    raise IncompatibleCheckpointError(
                        f"checkpoint {step} in {self.directory} holds a state this run cannot take: {mismatch}. A config "
                        "change outside the experiment fingerprint (e.g. an optimizer option) alters the state; use a new "
                        "--workdir or restore the config (nothing was changed)"
                    ) from e
                aside = self._move_aside(step) if move_aside else None
                logging.warning("checkpoint %s in %s is corrupt (%s: %s); moved it %s and trying an older one",
                                step, self.directory, type(e).__name__, str(e)[:300],
                                f"to {aside}" if move_aside else "nowhere")
        if tried:
            where = f"all moved to {os.path.join(self.workdir, _ASIDE)}" if move_aside else "all left in place"
            raise ValueError(f"no checkpoint in {self.directory} could be restored (steps {tried}, {where}); "
                             "nothing was deleted")
        return None

    def _mismatch(self, step: int, abstract: Any) -> str | None:
        """How checkpoint ``step``'s own metadata differs from ``abstract`` (first differing leaf
        path or shape), or None when it matches or the metadata cannot be read (corrupt)."""
        try:
            meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "default")).item_metadata
            meta = getattr(meta, "tree", meta)
            saved = {_path(k): tuple(getattr(v, "shape", ())) for k, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
        except Exception:  # noqa: BLE001 - unreadable metadata is corruption, not incompatibility
            return None
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
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        return dst

    def _restore_step(self, step: int, abstract: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception:
            # Checkpoints written before TrainState had a ``frozen`` field hold the same
            # state with everything trainable: restore the other fields into it.
            if not (dataclasses.is_dataclass(abstract) and getattr(abstract, "frozen", None) == {}):
                raise
            legacy = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract) if f.name != "frozen"}
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(legacy))
            return abstract.replace(**restored)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
