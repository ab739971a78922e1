"""unCLIP's diffusion prior network (Ramesh et al. 2022, DALL-E 2, sec. 2.1): a denoiser over
CLIP image embeddings conditioned on the caption's CLIP text embedding.

Embeddings travel through jdiff as ``[B, 1, 1, D]`` "images", so the training loop, the
samplers and classifier-free guidance handle them unchanged. The network is a residual MLP
(DALL-E 2 uses a decoder-only transformer over the text tokens, the text embedding, the time
and the noised image embedding; for one conditioning vector an MLP with the same inputs is
the small equivalent the issue allows): h = Dense(x); every block adds
Dense(silu(Dense(LN(h) + e_t + e_c))), with e_t the timestep embedding and e_c a projection of
the masked mean of ``cond["context"]`` (the null context, every token masked, gives e_c = the
projection's bias: a learned "no caption"); the output head is zero-initialised. It knows
nothing of diffusion: t is whatever the sampler passes.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import conditioning
from jdiff.models.layers import TimestepEmbedding

__all__ = ["EmbeddingPrior"]


class EmbeddingPrior(nn.Module):
    """Residual-MLP denoiser over ``x [B, 1, 1, D]`` (see the module docstring).

    Fields: width, depth (residual blocks), context_dim (the width D_c of ``cond["context"]``
    ``[B, L, D_c]``; None: unconditional), dropout.
    Call: ``x [B, 1, 1, D]``, ``t [B]``, ``cond`` with optional ``"context"`` / ``"context_mask"``
    (missing: the null context); returns ``[B, 1, 1, D]`` float32.
    """

    width: int = 256
    depth: int = 4
    context_dim: Optional[int] = None
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("width", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.context_dim is not None and (isinstance(self.context_dim, bool) or not isinstance(self.context_dim, (int, np.integer))
                                             or self.context_dim < 1):
            raise ValueError(f"context_dim: expected None or a positive int, got {self.context_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, Any]] = None, train: bool = False) -> jax.Array:
        shape = tuple(np.shape(x))
        if len(shape) != 4 or shape[1:3] != (1, 1):
            raise ValueError(f"x: expected an embedding batch [B, 1, 1, D], got shape {shape}")
        B, D = shape[0], shape[-1]
        if np.ndim(t) != 1 or np.shape(t)[0] != B:
            raise ValueError(f"t: expected shape [{B}] (one time per example of x), got shape {np.shape(t)}")
        cond = dict(cond or {})
        conditioning.check(cond, B)
        extra = sorted(set(cond) - {"context", "context_mask"})
        if extra:
            raise ValueError(f"cond: keys {extra} given, but an EmbeddingPrior reads only 'context' and 'context_mask'")
        if "context" in cond and self.context_dim is None:
            raise ValueError(f"cond['context']: given (shape {np.shape(cond['context'])}) but the prior is unconditional (context_dim=None)")
        h = nn.Dense(self.width, name="embed_in")(jnp.reshape(x, (B, D)).astype(jnp.float32))
        e = TimestepEmbedding(self.width, self.width, name="time_embed")(t)
        if self.context_dim is not None:
            if "context" in cond:
                context = jnp.asarray(cond["context"], jnp.float32)
                if np.shape(context)[-1] != self.context_dim:
                    raise ValueError(f"cond['context']: expected width {self.context_dim} (context_dim), got shape {np.shape(context)}")
                mask = cond.get("context_mask", jnp.ones(np.shape(context)[:2], bool))
            else:
                context, mask = jnp.zeros((B, 1, self.context_dim)), jnp.zeros((B, 1), bool)
            w = mask.astype(jnp.float32)[..., None]
            pooled = (context * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
            e = e + nn.Dense(self.width, name="context_embed")(pooled)
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"norm_{i}")(h) + e
            y = nn.silu(nn.Dense(2 * self.width, name=f"mlp_in_{i}")(y))
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
            h = h + nn.Dense(self.width, name=f"mlp_out_{i}")(y)
        out = nn.Dense(D, kernel_init=nn.initializers.zeros, name="embed_out")(nn.LayerNorm(name="norm_out")(h))
        return out.reshape(shape)
