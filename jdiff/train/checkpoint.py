"""Checkpoints through orbax: keep the newest N, resume from the newest good one.

The workdir holds ``checkpoints/<step>/`` (orbax, written atomically: a save killed midway
leaves no step directory) and ``experiment.json``, the config fingerprint that a restart must
match. A checkpoint that fails to restore (truncated or corrupt files) is reported and the
previous one is used; nothing is deleted or overwritten.

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
from typing import Any

import jax
import orbax.checkpoint as ocp

from jdiff.train import config as config_lib

_FINGERPRINT = "experiment.json"


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
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, target: Any) -> Any | None:
        """The newest checkpoint that restores into ``target``'s structure, or None.

        ``target`` holds arrays or ``jax.ShapeDtypeStruct`` whose ``sharding`` says where each
        restored leaf goes; without one, orbax falls back to the layout the checkpoint was
        written with, which fails on a different set of devices.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.steps()):
            try:
                return self._restore_step(step, abstract)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                logging.warning("checkpoint %s in %s could not be restored (%s: %s); trying an older one",
                                step, self.directory, type(e).__name__, str(e)[:300])
        if self.steps():
            raise ValueError(f"no checkpoint in {self.directory} could be restored (steps {self.steps()}); nothing was changed")
        return None

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
