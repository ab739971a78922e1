"""Training a CLIP-style contrastive model (:class:`~jdiff.models.CLIP`) on captioned scenes, and
its zero-shot retrieval accuracy.

The loss is CLIP's symmetric InfoNCE (Radford et al. 2021, Figure 3): with unit image and text
embeddings I, T [B, D] and the learned scale s, logits = s I T^T, and the loss is the mean of
the cross-entropies of each image over the batch's texts and of each text over the images,
the matching pair being the target. With ``noised=True`` each image is replaced by
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at a uniform t, and t is the image tower's input:
GLIDE's noised CLIP (Nichol et al. 2022, sec. 2.3), whose gradient guides sampling.

Batches are drawn fresh every step (``jdiff.data.captions.scenes(batch, seed=[seed, step])``),
so a run is a pure function of its arguments.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import diffusion, module_files, schedules
from jdiff.data import captions as cap
from jdiff.models.text import CLIP

__all__ = ["clip_loss", "train_clip", "retrieval_accuracy", "embed", "encode_text", "save_clip", "load_clip", "CLIP_FILE", "CLIP_CONFIG_FILE"]

CLIP_PREFIX = "clip"
CLIP_FILE = CLIP_PREFIX + ".msgpack"
"""A CLIP workdir's params file (flax msgpack); :func:`save_clip` writes it, :func:`load_clip` reads it."""

CLIP_CONFIG_FILE = CLIP_PREFIX + ".json"
"""A CLIP workdir's JSON beside :data:`CLIP_FILE`: what rebuilds the module (its fields) and
checks its use (resolution, noised or not and on which schedule, vocabulary), and its metrics."""


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE over a batch of matching pairs: ``[B, D]`` unit embeddings, a scalar scale."""
    logits = scale * image_emb @ text_emb.T
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def _batch(step: int, seed: int, batch_size: int, resolution: int, tokenizer: cap.Tokenizer):
    scene = cap.scenes(batch_size, seed=[seed, step])
    images, _ = cap.render_scenes(scene, resolution)
    ids, mask = tokenizer.encode(cap.captions(scene))
    return images, ids, mask


def train_clip(num_steps: int = 1000, batch_size: int = 64, resolution: int = 32, seed: int = 0, *,
               noised: bool = False, schedule: Optional[schedules.Schedule] = None, learning_rate: float = 1e-3,
               tokenizer: Optional[cap.Tokenizer] = None, **fields) -> tuple[CLIP, Any, dict]:
    """Train a :class:`~jdiff.models.CLIP` on captioned shapes scenes.

    ``noised``: train on x_t at uniform t of ``schedule`` (default: cosine, T = 1000), t given to
    the image tower; else on clean images with t = 0. ``fields``: CLIP fields besides the
    vocabulary. Returns ``(module, params, {"loss": last loss})``.
    """
    tokenizer = tokenizer or cap.Tokenizer()
    if noised and schedule is None:
        schedule = schedules.cosine(1000)
    module = CLIP(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length, **fields)
    images, ids, mask = _batch(0, seed, 2, resolution, tokenizer)
    # Jitted: one compiled program, not one per operation of an eager init.
    params = jax.jit(module.init)(jax.random.key(seed), images, jnp.zeros((2,), jnp.int32), ids, mask)["params"]
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, num_steps // 10 + 1), num_steps),
                      weight_decay=1e-4)
    state = opt.init(params)

    def loss_fn(p, x, t, ids, mask):
        i, txt, scale = module.apply({"params": p}, x, t, ids, mask)
        return clip_loss(i, txt, scale)

    @jax.jit
    def step(p, state, x0, ids, mask, key):
        B = x0.shape[0]
        if noised:
            k1, k2 = jax.random.split(key)
            t = jax.random.randint(k1, (B,), 0, schedule.num_timesteps)
            x = diffusion.q_sample(schedule, x0, t, jax.random.normal(k2, x0.shape))
        else:
            t, x = jnp.zeros((B,), jnp.int32), x0
        loss, grads = jax.value_and_grad(loss_fn)(p, x, t, ids, mask)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    base = jax.random.key(seed + 1)
    loss = np.nan
    for i in range(num_steps):
        x0, ids, mask = _batch(i, seed, batch_size, resolution, tokenizer)
        params, state, loss = step(params, state, x0, ids, mask, jax.random.fold_in(base, i))
    return module, params, {"loss": float(loss)}


def embed(module: CLIP, params: Any, images: np.ndarray, t: np.ndarray, ids: np.ndarray, mask: np.ndarray,
          batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings ``([N, D], [N, D])`` in batches."""
    ie, te = [], []
    for s in range(0, len(images), batch_size):
        sl = slice(s, s + batch_size)
        ie.append(np.asarray(_encode_image(module, params, images[sl], t[sl])))
        te.append(np.asarray(encode_text(module, params, ids[sl], mask[sl])))
    return np.concatenate(ie), np.concatenate(te)


# The module is static (hashable) and the params an argument: one compile per module and batch
# shape, shared by every call (a jitted closure over the params would compile again per call).
@functools.partial(jax.jit, static_argnums=0)
def _encode_image(module: CLIP, params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x, t, method=CLIP.encode_image)


@functools.partial(jax.jit, static_argnums=0)
def encode_text(module: CLIP, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``module.encode_text`` jitted with the params as an argument: unit text embeddings ``[B, D]``
    of token ids ``[B, L]`` with their mask ``[B, L]`` (True = a real token)."""
    return module.apply({"params": params}, ids, mask, method=CLIP.encode_text)


def retrieval_accuracy(image_emb: np.ndarray, text_emb: np.ndarray, texts: list[str]) -> dict[str, float]:
    """Zero-shot retrieval among N held-out pairs: the fraction of images whose most similar
    text is their caption (``image_to_text``) and of texts whose most similar image is one of
    theirs (``text_to_image``). A retrieved caption identical in words to the true one counts as
    right (two scenes may share a caption). Chance is about 1 / N."""
    sim = np.asarray(image_emb) @ np.asarray(text_emb).T
    texts = np.asarray(texts, object)
    i2t = (texts[sim.argmax(axis=1)] == texts).mean()
    t2i = (texts[sim.argmax(axis=0)] == texts).mean()
    return {"image_to_text": float(i2t), "text_to_image": float(t2i)}


def save_clip(workdir: str, module: CLIP, params: Any, *, resolution: int, noised: bool,
              schedule: Optional[dict] = None, vocabulary: tuple[str, ...] = cap.SHAPES_VOCABULARY,
              metrics: Optional[dict] = None) -> str:
    """Write a CLIP workdir: ``clip.msgpack`` (params) and ``clip.json`` (the module's fields, the
    image resolution, whether it was trained on noised images and on which schedule
    ``{"name", "num_timesteps"}``, the tokenizer's vocabulary, metrics). Returns the workdir."""
    if noised and not (isinstance(schedule, dict) and set(schedule) == {"name", "num_timesteps"}):
        raise ValueError(f"schedule: expected {{'name', 'num_timesteps'}} of a noised CLIP's schedule, got {schedule!r}")
    info = {"resolution": int(resolution), "noised": bool(noised), "schedule": schedule if noised else None,
            "vocabulary": list(vocabulary), "metrics": metrics or {}}
    return module_files.save_module(workdir, CLIP_PREFIX, module, params, info)


def _init(module: CLIP, resolution: int):
    ids = jnp.ones((1, module.max_length), jnp.int32)
    return module.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)), jnp.zeros((1,), jnp.int32), ids, ids > 0)


def load_clip(workdir: str) -> tuple[CLIP, Any, dict]:
    """``(module, params, info)`` of a CLIP workdir written by :func:`save_clip` (``launch.train_clip``)."""
    return module_files.load_module(workdir, CLIP_PREFIX, CLIP, lambda m, info: _init(m, info["resolution"]),
                                    "launch.train_clip")
