"""unCLIP (Ramesh et al. 2022, DALL-E 2): text -> CLIP text embedding -> a diffusion **prior**
samples a CLIP image embedding -> a diffusion **decoder** conditioned on that embedding samples
the image (sec. 2, eq. 1: P(x | y) = P(x | z_i, y) P(z_i | y), here with the decoder reading z_i
alone, as the paper's ablation without the caption).

Both stages are ordinary jdiff models trained by ``launch.train`` on data a clean CLIP
(``launch.train_clip``) embeds (:func:`jdiff.data.get_dataset`'s ``clip_embeddings``):

  prior    ``configs/shapes_unclip_prior.py``: an :class:`~jdiff.models.EmbeddingPrior` over
           ``sqrt(D) e_img`` ``[N, 1, 1, D]`` with the caption's CLIP text embedding as
           ``cond["context"]`` ``[N, 1, D]``; classifier-free guidance drops it;
  decoder  ``configs/shapes_unclip_decoder.py``: a U-Net whose cross-attention reads the unit
           CLIP image embedding as one context token; classifier-free guidance drops it.

:func:`unclip` chains them: each stage is a :func:`jdiff.inference.generate` call (one
``lax.scan`` sampler each, the same guidance), the prior's sample is renormalised to the unit
sphere CLIP embeddings live on before it conditions the decoder.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jdiff.inference import generate
from jdiff.train import clip as clip_lib

__all__ = ["StageSettings", "text_embeddings", "unclip"]


class StageSettings(NamedTuple):
    """One stage's network and sampler: what :func:`jdiff.inference.generate` takes besides the
    conditioning (``guidance`` is its classifier-free guidance weight w)."""

    module: Any
    params: Any
    schedule: Any
    image_shape: tuple
    method: str = "ddim"
    steps: int | None = 50
    eta: float | None = None
    clip: Any = None
    variance: str = "fixed_small"
    parameterization: str = "eps"
    guidance: float = 0.0


def text_embeddings(clip_module, clip_params, tokens: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Unit CLIP text embeddings ``[N, D]`` of token ids ``[N, L]`` (0 = padding)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or not (tokens != 0).any(axis=1).all():
        raise ValueError(f"tokens: expected int ids [N, L] with at least one real token per caption, got shape "
                         f"{tokens.shape} dtype {tokens.dtype}")
    return np.concatenate([np.asarray(clip_lib.encode_text(clip_module, clip_params, part, part != 0))
                           for part in (tokens[s : s + batch_size] for s in range(0, len(tokens), batch_size))])


def _sample(stage: StageSettings, num: int, key: jax.Array, context: np.ndarray, batch_size: int) -> np.ndarray:
    return generate(stage.module, stage.params, stage.schedule, tuple(stage.image_shape), num, key,
                    cond={"context": context}, guidance_weight=stage.guidance, batch_size=batch_size,
                    method=stage.method, steps=stage.steps, eta=stage.eta, clip=stage.clip, variance=stage.variance,
                    parameterization=stage.parameterization)


def unclip(prior: StageSettings, decoder: StageSettings, clip_module, clip_params, tokens: np.ndarray, key: jax.Array,
           *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Images for captions ``tokens`` [N, L]: ``(images [N, H, W, C], image_embeddings [N, D])``.

    e_txt = CLIP text embedding; z ~ prior(. | e_txt) (``[N, 1, 1, D]``, trained on sqrt(D) e_img);
    e_img = z / |z|; x ~ decoder(. | e_img). The stages draw from ``fold_in(key, 0)`` and
    ``fold_in(key, 1)``.
    """
    text = text_embeddings(clip_module, clip_params, tokens)
    N, D = text.shape
    if tuple(prior.image_shape) != (1, 1, D):
        raise ValueError(f"prior.image_shape: expected (1, 1, {D}) (the CLIP's embedding width), got {tuple(prior.image_shape)}")
    z = _sample(prior, N, jax.random.fold_in(key, 0), text[:, None, :], batch_size).reshape(N, D)
    image_emb = np.asarray(z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12), np.float32)
    images = _sample(decoder, N, jax.random.fold_in(key, 1), image_emb[:, None, :], batch_size)
    return images, image_emb
