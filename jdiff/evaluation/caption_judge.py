"""An attribute judge for captioned shapes scenes (:mod:`jdiff.data.captions`): does a generated
image show what its caption says?

The judge is a small CNN trained on the generator's exact ground truth (fresh scenes every
step, so it never sees the same image twice). It reads each quadrant of the image separately
and answers four questions there: is an object present, and if so, what is its colour, its
shape and its size. A caption's objects name their quadrants, so scoring a sample is a lookup:
- an object's position is right when the judge finds an object in its quadrant;
- its colour / shape / size are right when the judge's reading there matches;
- the whole caption is right when every object is, and no other quadrant holds an object.

:func:`train_judge` trains it (about a minute on 2 CPU cores at 32x32); :func:`read_scenes`
applies it; :func:`caption_accuracy` scores images against captions or scenes.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff.data import captions as cap

__all__ = ["CaptionJudge", "QuadrantTargets", "targets", "train_judge", "read_scenes", "caption_accuracy", "ATTRIBUTES"]

ATTRIBUTES = ("colour", "shape", "size")
"""The object attributes the judge reads in each quadrant besides ``present``, and
:func:`caption_accuracy` scores (with ``position``, ``object`` and ``caption``)."""

_HEADS = {"present": 2, "colour": len(cap.COLOUR_NAMES), "shape": 3, "size": len(cap.SIZE_NAMES)}
_QUADRANTS = len(cap.POSITION_NAMES)


class QuadrantTargets(NamedTuple):
    """Per image and quadrant (in POSITION_NAMES order): ``present`` bool [N, 4] and the
    ``colour``, ``shape``, ``size`` indices int32 [N, 4] (-1 where no object is)."""

    present: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    size: np.ndarray


def targets(scene: cap.Scene) -> QuadrantTargets:
    """What the judge should read in each quadrant of ``scene``'s images."""
    n = len(scene.count)
    out = {k: np.full((n, _QUADRANTS), -1, np.int32) for k in ATTRIBUTES}
    present = np.zeros((n, _QUADRANTS), bool)
    for slot in range(cap.MAX_OBJECTS):
        rows = np.nonzero(scene.count > slot)[0]
        q = scene.position[rows, slot]
        present[rows, q] = True
        for k in ATTRIBUTES:
            out[k][rows, q] = getattr(scene, k)[rows, slot]
    return QuadrantTargets(present, out["colour"], out["shape"], out["size"])


class CaptionJudge(nn.Module):
    """``[B, R, R, 3]`` images in [-1, 1] (R divisible by 8) -> logits per quadrant: a dict with
    "present" [B, 4, 2], "colour" [B, 4, 6], "shape" [B, 4, 3], "size" [B, 4, 2].

    Three 3x3 convolutions (the first and last with stride 2) and ReLUs; each quadrant's features
    are the mean and the max of the last map over that quadrant, shared heads read them."""

    channels: Sequence[int] = (32, 64, 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2] or x.shape[1] % 8:
            raise ValueError(f"x: expected [B, R, R, 3] images with R divisible by 8, got shape {tuple(x.shape)}")
        h = x
        for i, c in enumerate(self.channels):
            h = nn.relu(nn.Conv(c, (3, 3), strides=(1, 1) if i == 1 else (2, 2), name=f"conv{i}")(h))
        B, S = h.shape[0], h.shape[1] // 2
        # Quadrants in POSITION_NAMES order: top left, top right, bottom left, bottom right.
        quads = h.reshape(B, 2, S, 2, S, h.shape[-1]).transpose(0, 1, 3, 2, 4, 5).reshape(B, _QUADRANTS, S * S, -1)
        feats = jnp.concatenate([quads.mean(axis=2), quads.max(axis=2)], axis=-1)
        feats = nn.relu(nn.Dense(128, name="hidden")(feats))
        return {k: nn.Dense(n, name=k)(feats) for k, n in _HEADS.items()}


def _loss(module, params, images, t: dict) -> tuple[jax.Array, dict]:
    logits = module.apply({"params": params}, images)
    ce = lambda k, y: optax.softmax_cross_entropy_with_integer_labels(logits[k], jnp.maximum(y, 0))  # noqa: E731
    present = t["present"].astype(jnp.float32)
    loss = ce("present", t["present"].astype(jnp.int32)).mean()
    for k in ATTRIBUTES:  # attributes only where an object is
        loss = loss + (ce(k, t[k]) * present).sum() / jnp.maximum(present.sum(), 1.0)
    return loss, logits


def train_judge(resolution: int = 32, num_steps: int = 1500, batch_size: int = 64, seed: int = 0,
                learning_rate: float = 2e-3) -> tuple[CaptionJudge, Any, dict]:
    """Train a judge on fresh scenes (``captions.scenes(batch_size, seed=[seed, step])``).

    Returns ``(module, params, metrics)``; metrics holds the final loss and the per-quadrant
    accuracies of each head on 1,000 held-out scenes (seed ``[seed, -1]`` is never a training
    seed: training seeds are non-negative steps).
    """
    module = CaptionJudge()
    # Jitted: one compiled program, not one per operation of an eager init.
    params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, resolution, resolution, 3)))["params"]
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))  # decays to 0: a stable end
    state = opt.init(params)

    @jax.jit
    def step(params, state, images, t):
        (loss, _), grads = jax.value_and_grad(lambda p: _loss(module, p, images, t), has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    loss = np.nan
    for i in range(num_steps):
        scene = cap.scenes(batch_size, seed=[seed, i])
        images, _ = cap.render_scenes(scene, resolution)
        params, state, loss = step(params, state, images, targets(scene)._asdict())
    held_out = cap.scenes(1000, seed=[seed + 1, 10**9])
    images, _ = cap.render_scenes(held_out, resolution)
    metrics = {"loss": float(loss), **_head_accuracy(read_scenes(module, params, images), targets(held_out))}
    return module, params, metrics


def read_scenes(module: CaptionJudge, params: Any, images: np.ndarray, batch_size: int = 500) -> QuadrantTargets:
    """The judge's reading of ``images`` [N, R, R, 3] in [-1, 1]: per quadrant, whether an object
    is there and its colour, shape and size (-1 where it sees none)."""
    images = np.asarray(images, np.float32)
    parts = []
    for start in range(0, len(images), batch_size):
        out = _apply(module, params, images[start : start + batch_size])
        parts.append({k: np.asarray(jnp.argmax(v, axis=-1)) for k, v in out.items()})
    read = {k: np.concatenate([p[k] for p in parts]) for k in _HEADS}
    present = read["present"].astype(bool)
    return QuadrantTargets(present, *(np.where(present, read[k], -1).astype(np.int32) for k in ATTRIBUTES))


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: CaptionJudge, params: Any, x: jax.Array) -> dict:
    # Params as an argument: one compile per batch shape for every call and every judge.
    return module.apply({"params": params}, x)


def _head_accuracy(read: QuadrantTargets, want: QuadrantTargets) -> dict[str, float]:
    out = {"present": float((read.present == want.present).mean())}
    for k in ATTRIBUTES:
        where = want.present
        out[k] = float((getattr(read, k)[where] == getattr(want, k)[where]).mean())
    return out


def caption_accuracy(read: QuadrantTargets, wanted: cap.Scene | Sequence[str]) -> dict[str, float]:
    """Caption accuracy of images the judge read (:func:`read_scenes`) against what they should
    show: a :class:`~jdiff.data.captions.Scene` or the captions themselves.

    Per attribute, the fraction of the captions' objects that attribute is right for
    ("position": the judge finds an object in the object's quadrant); "object": all four right;
    "caption": every object right and no object in a quadrant the caption leaves empty.
    """
    if not isinstance(wanted, cap.Scene):
        wanted = _scene_of(list(wanted))
    want = targets(wanted)
    if want.present.shape != read.present.shape:
        raise ValueError(f"wanted: {want.present.shape[0]} captions for {read.present.shape[0]} images")
    where = want.present
    right = {"position": read.present[where]}
    for k in ATTRIBUTES:
        right[k] = getattr(read, k)[where] == getattr(want, k)[where]
    obj = right["position"] & right["colour"] & right["shape"] & right["size"]
    per_image_ok = np.ones(len(where), bool)
    rows = np.nonzero(where)[0]
    np.logical_and.at(per_image_ok, rows, obj)
    per_image_ok &= ~(read.present & ~where).any(axis=1)
    out = {k: float(v.mean()) for k, v in right.items()}
    out["object"] = float(obj.mean())
    out["caption"] = float(per_image_ok.mean())
    return out


def _scene_of(texts: list[str]) -> cap.Scene:
    n = len(texts)
    arrays = {k: np.full((n, cap.MAX_OBJECTS), -1, np.int32) for k in ("colour", "shape", "size", "position")}
    count = np.zeros(n, np.int32)
    for i, text in enumerate(texts):
        objects = sorted(cap.parse_caption(text), key=lambda o: o["position"])
        count[i] = len(objects)
        for slot, o in enumerate(objects):
            for k, v in o.items():
                arrays[k][i, slot] = v
    return cap.Scene(count, arrays["colour"], arrays["shape"], arrays["size"], arrays["position"],
                     np.full((n, cap.MAX_OBJECTS, 2), np.nan))
