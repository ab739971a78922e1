"""What every checkpoint converter shares: reading a PyTorch state dict without running pickle
code, placing its tensors into a jdiff params tree by explicit rules (with the missing,
unexpected and mis-shaped keys named), and writing the result as a jdiff workdir.

A converter turns a foreign checkpoint into an :class:`Imported`: the jdiff network (registry
name + fields), its params, the image shape, and the ``diffusion`` / ``sample`` config sections
that reproduce the source's process. :func:`write_workdir` stores it as a workdir (``config.json``
+ an orbax checkpoint at step 0 whose EMA params are the imported ones), so ``launch.sample`` and
``launch.evaluate`` take it like a trained one.

PyTorch layouts and their flax counterparts (NCHW tensors, NHWC arrays):
  conv2d weight ``[O, I, kh, kw]`` <-> kernel ``[kh, kw, I, O]``;
  linear weight ``[O, I]`` (or a 1x1 conv's ``[O, I, 1]`` / ``[O, I, 1, 1]``) <-> kernel ``[I, O]``;
  biases, norm scales, embeddings: as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from flax import traverse_util

__all__ = [
    "ConversionError",
    "Imported",
    "Rule",
    "conv",
    "linear",
    "copy",
    "read_state_dict",
    "state_arrays",
    "flat_params",
    "check_params",
    "apply_rules",
    "export_rules",
    "write_workdir",
    "INSTALL_HINT",
]

INSTALL_HINT = "pip install 'jdiff[convert]' (PyTorch and safetensors)"
"""How to install what reading and writing PyTorch checkpoints needs (torch, safetensors),
quoted by every :class:`ConversionError` about a missing package."""

IMPORTED_FROM = "imported_from.json"  # a converted workdir's provenance


class ConversionError(ValueError):
    """A checkpoint or config the converter cannot take; the message names what and why."""


class Imported(NamedTuple):
    """A foreign checkpoint as jdiff sees it.

    model_name: the registry name (``"unet"``, ``"classifier"``); model: that module's fields.
    params: the flax ``params`` tree (float32 NumPy arrays). image_shape: ``(H, W, C)``.
    diffusion / sample: overrides of the config's ``diffusion`` and ``sample`` sections (the
    source's schedule, parameterization, variance, clipping). source: provenance (format, path,
    the source's own config), stored beside the workdir's config as ``imported_from.json``.
    """

    model_name: str
    model: dict
    params: dict
    image_shape: tuple
    diffusion: dict
    sample: dict
    source: dict

    def module(self):
        """The jdiff network (a flax module) these params belong to."""
        from jdiff import models

        return models.build(self.model_name, self.model)


@dataclasses.dataclass(frozen=True)
class _Layout:
    name: str
    forward: Callable[[np.ndarray], np.ndarray]  # torch tensor -> flax array
    inverse: Callable[[np.ndarray], np.ndarray]  # flax array -> torch tensor


def _linear_forward(w: np.ndarray) -> np.ndarray:
    if w.ndim > 2:
        if any(s != 1 for s in w.shape[2:]):
            raise ConversionError(f"expected a linear weight [O, I] or a 1x1 conv [O, I, 1(, 1)], got shape {w.shape}")
        w = w.reshape(w.shape[:2])
    return np.ascontiguousarray(w.T)


conv = _Layout("conv2d", lambda w: np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0))),
               lambda k: np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1))))
"""The conv2d layout: a torch weight ``[O, I, kh, kw]`` <-> a flax kernel ``[kh, kw, I, O]``
(a :class:`Rule`'s ``layout``; ``forward`` converts to flax, ``inverse`` back)."""

linear = _Layout("linear", _linear_forward, lambda k: np.ascontiguousarray(k.T))
"""The linear layout: a torch weight ``[O, I]`` (or a 1x1 conv's ``[O, I, 1]`` /
``[O, I, 1, 1]``, any other shape a :class:`ConversionError`) <-> a flax kernel ``[I, O]``."""

copy = _Layout("copy", lambda w: w, lambda w: w)
"""The identity layout, for biases, norm scales and embeddings, which both frameworks store alike."""


class Rule(NamedTuple):
    """One jdiff param from one torch tensor: ``params[path] = layout.forward(state[key])[select]``.

    ``select`` (optional) takes a part of the converted tensor (OpenAI's fused qkv is split into
    q, k and v this way); several rules may read one key. ``pad_rows``: rows of zeros appended
    (a class embedding's null row, which the source does not have).
    """

    path: str
    key: str
    layout: _Layout
    select: Optional[Callable[[np.ndarray], np.ndarray]] = None
    pad_rows: int = 0


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint file as float32 NumPy arrays, keyed by their torch names.

    ``.safetensors`` is read with ``safetensors.numpy`` (no PyTorch needed). ``.bin`` / ``.pt`` /
    ``.pth`` are PyTorch pickles: they are read with ``torch.load(weights_only=True)``, which
    rebuilds tensors and plain containers only and refuses any other object (no pickled code
    runs). A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    """
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ConversionError(f"path: {path!r} is not a file; expected a .safetensors, .bin, .pt or .pth checkpoint")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ConversionError(f"path: reading {path!r} needs safetensors: {INSTALL_HINT}") from None
        try:
            raw = load_file(path)
        except Exception as e:  # a truncated or foreign file
            raise ConversionError(f"path: {path!r} is not a readable safetensors file: {e}") from None
        return {k: np.asarray(v, np.float32) for k, v in raw.items()}
    if ext in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            import torch
        except ImportError:
            raise ConversionError(f"path: reading the PyTorch pickle {path!r} needs torch: {INSTALL_HINT}") from None
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(
                f"path: {path!r} could not be read as weights only (torch.load(weights_only=True) refuses pickled "
                f"objects other than tensors and containers, so no code in the file runs): {e}"
            ) from None
        if isinstance(raw, Mapping) and not any(hasattr(v, "shape") for v in raw.values()):
            for wrapper in ("state_dict", "model"):  # a training checkpoint around the weights
                if isinstance(raw.get(wrapper), Mapping):
                    raw = raw[wrapper]
                    break
        if not isinstance(raw, Mapping):
            raise ConversionError(f"path: {path!r} holds a {type(raw).__name__}, expected a state dict (name -> tensor)")
        return state_arrays(raw, f"path: {path!r}")
    raise ConversionError(f"path: {path!r} has extension {ext!r}; expected .safetensors, .bin, .pt or .pth")


def state_arrays(state: Mapping[str, Any], source: str = "state dict") -> dict[str, np.ndarray]:
    """A state dict (name -> torch tensor or array) as float32 NumPy arrays; anything else in it
    is a :class:`ConversionError` naming the entry (``source`` prefixes the message)."""
    out = {}
    for k, v in state.items():
        if hasattr(v, "detach"):  # a torch tensor (torch itself is not imported here)
            v = v.detach().cpu().float().numpy()
        elif not hasattr(v, "shape"):
            raise ConversionError(f"{source}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[str(k)] = np.asarray(v, np.float32)
    return out


def flat_params(params: Any) -> dict[str, Any]:
    """'/'-joined param path -> leaf of a (possibly frozen) nested params dict."""
    import flax

    tree = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else dict(params)
    return traverse_util.flatten_dict(tree, sep="/")


def check_params(params: Any, template: Mapping[str, Any], what: str) -> None:
    """Raise a :class:`ConversionError` unless ``params`` has exactly ``template``'s paths and
    shapes (``what`` names the network in the message)."""
    got = {p: tuple(np.shape(v)) for p, v in flat_params(params).items()}
    want = {p: tuple(s.shape) for p, s in template.items()}
    if got != want:
        wrong = sorted(set(got) ^ set(want)) or sorted(p for p in got if got[p] != want[p])
        raise ConversionError(f"params: they do not match {what} (first differences: {wrong[:6]}; nothing was written)")


def _list(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def apply_rules(state: Mapping[str, np.ndarray], rules: Sequence[Rule], template: Mapping[str, Any],
                source: str = "state dict") -> dict:
    """Build the nested params dict from ``state`` by ``rules``, checked against ``template``.

    ``template`` maps every '/'-joined param path of the jdiff network to its shape (or anything
    with ``.shape``). Raises :class:`ConversionError` listing the keys the rules need that
    ``state`` lacks (missing), the keys of ``state`` no rule reads (unexpected), params of the
    template no rule fills, and every shape that differs (``key -> path: got, expected``).
    """
    shapes = {p: tuple(getattr(s, "shape", s)) for p, s in template.items()}
    missing = sorted({r.key for r in rules if r.key not in state})
    used = {r.key for r in rules}
    unexpected = sorted(set(state) - used)
    unfilled = sorted(set(shapes) - {r.path for r in rules})
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if unfilled:
        problems.append(f"jdiff params without a source ({len(unfilled)}): {_list(unfilled)}")
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))
    flat, mismatched = {}, []
    for r in rules:
        try:
            value = r.layout.forward(np.asarray(state[r.key], np.float32))
            if r.select is not None:
                value = r.select(value)
        except (ConversionError, ValueError, IndexError) as e:
            mismatched.append(f"{r.key} (shape {tuple(np.shape(state[r.key]))}) -> {r.path}: {e}")
            continue
        if r.pad_rows:
            value = np.concatenate([value, np.zeros((r.pad_rows,) + value.shape[1:], value.dtype)])
        want = shapes.get(r.path)
        if want is None:
            mismatched.append(f"{r.key} -> {r.path}: the jdiff network has no such param")
        elif tuple(value.shape) != want:
            mismatched.append(f"{r.key} (shape {tuple(np.shape(state[r.key]))}) -> {r.path}: got {tuple(value.shape)}, "
                              f"expected {want}")
        flat[r.path] = np.ascontiguousarray(value, np.float32)
    if mismatched:
        raise ConversionError(f"{source}: shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:12]))
    return traverse_util.unflatten_dict(flat, sep="/")


def export_rules(params: Mapping[str, Any], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """The inverse of :func:`apply_rules` for rules without ``select``: a torch state dict
    (name -> float32 NumPy array) from jdiff params. Rules with ``pad_rows`` drop those rows.
    Raises :class:`ConversionError` when params and rules do not cover each other."""
    flat = {k: np.asarray(v, np.float32) for k, v in flat_params(params).items()}
    paths = {r.path for r in rules}
    extra, lacking = sorted(set(flat) - paths), sorted(paths - set(flat))
    if extra or lacking:
        raise ConversionError(f"params: the export layout does not cover the network: params without a target "
                              f"({len(extra)}): {_list(extra)}; targets without a param ({len(lacking)}): {_list(lacking)}")
    out = {}
    for r in rules:
        if r.select is not None:
            raise ConversionError(f"rule for {r.path!r}: a selecting rule cannot be inverted")
        value = flat[r.path]
        if r.pad_rows:
            value = value[: value.shape[0] - r.pad_rows]
        out[r.key] = np.ascontiguousarray(r.layout.inverse(value), np.float32)
    return out


def template_of(module, image_shape: tuple, cond: Optional[Mapping[str, Any]] = None) -> dict:
    """'/'-joined param path -> ShapeDtypeStruct of ``module`` at ``image_shape`` (nothing is computed)."""
    import jax

    from jdiff.train import network

    shapes = jax.eval_shape(lambda k: network.init_params(module, image_shape, k, cond=cond), jax.random.key(0))
    return flat_params(shapes)


def write_workdir(imported: Imported, workdir: str, data: Optional[Mapping[str, Any]] = None) -> str:
    """Store ``imported`` as a jdiff workdir; returns its absolute path.

    The config is jdiff's schema with the imported network, process and sampler settings, and
    ``data`` (default: ``{"name": "none"}``, an image shape without a dataset: sampling works,
    training and evaluation need a dataset named here, e.g. ``{"name": "cifar10"}``). The
    checkpoint is step 0 of a fresh train state whose params and EMA params are the imported
    ones. Refuses a directory that already holds a config or checkpoints (nothing is written).
    """
    import jax
    import ml_collections

    from jdiff.train import config as config_lib
    from jdiff.train.checkpoint import Checkpointer
    from jdiff.train.state import create_train_state, make_optimizer

    workdir = os.path.abspath(workdir)
    for name in ("config.json", "checkpoints"):
        if os.path.exists(os.path.join(workdir, name)):
            raise ConversionError(f"workdir: {workdir!r} already has {name}; expected a new or empty directory "
                                  "(nothing was written)")
    config = config_lib.base_config()
    config.model_name = imported.model_name
    config.model = ml_collections.ConfigDict(imported.model)
    for k, v in imported.diffusion.items():
        config.diffusion[k] = v
    for k, v in imported.sample.items():
        config.sample[k] = v
    data = dict(data or {"name": "none"})
    for k, v in data.items():
        config.data[k] = v
    config.data.image_shape = tuple(int(s) for s in imported.image_shape)
    config.eval.evaluator = ""
    check_params(imported.params, template_of(imported.module(), imported.image_shape), "the network the config builds")
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), imported.params)
    optimizer = make_optimizer(config.optim)
    # One compiled program (as the training loop builds its state), not one per leaf and operation.
    state = jax.jit(lambda p, k: create_train_state(p, optimizer, k))(params, jax.random.key(config.seed))
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False)
    try:
        ckpt.write_experiment(config)
        ckpt.save(state)
        ckpt.wait()
    finally:
        ckpt.close()
    with open(os.path.join(workdir, IMPORTED_FROM), "w") as f:
        json.dump(_json_safe(imported.source), f, indent=1, sort_keys=True)
    return workdir


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
