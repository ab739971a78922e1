"""A small transformer text encoder and a CLIP-style image-text model (Radford et al. 2021).

:class:`TextEncoder`: token ids ``[B, L]`` and their padding mask -> token features
``[B, L, width]`` (the context a U-Net's cross-attention reads, LDM sec. 3.3) and one pooled
vector ``[B, width]`` (the masked mean of the tokens). The architecture is a pre-LayerNorm
transformer (Vaswani et al. 2017; GPT-2's block order): learned token and position embeddings,
then ``layers`` blocks of masked multi-head self-attention and an MLP, each residual, and a
final LayerNorm. Padding is masked out of every attention and of the pooling, so what a padded
position holds never changes the output.

:class:`CLIP`: an image tower and that text encoder, each followed by a linear projection to
``embed_dim``, with L2-normalised outputs and a learned log temperature (CLIP's logit scale).
The image tower is the noise-aware classifier's trunk (:class:`~jdiff.models.NoiseAwareClassifier`
with ``embed_dim`` outputs), so the same model is GLIDE's "noised CLIP" when it is trained on
x_t with t as input (Nichol et al. 2022, sec. 2.3), and a plain CLIP when t is always 0. The
networks know nothing of diffusion: the caller chooses t.

:class:`TextUNet`: the diffusion U-Net with its own :class:`TextEncoder`, trained jointly from
scratch as in GLIDE (Nichol et al. 2022, sec. 4) and LDM (Rombach et al. 2022, eq. 3, with
tau_theta the text encoder). It reads ``cond["tokens"]`` ``[B, L]`` int (0 = padding) and feeds
the encoder's token features to the U-Net's cross-attention with the padding mask, so the null
caption of classifier-free guidance (all padding) is seen as "no tokens": only the learned null
key/value answers. The same network serves pixel space and an autoencoder's latent space.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import conditioning
from jdiff.models.classifier import NoiseAwareClassifier
from jdiff.models.unet import UNet

__all__ = ["TextEncoder", "CLIP", "TextUNet"]


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


class TextEncoder(nn.Module):
    """Token ids -> ``(tokens [B, L, width], pooled [B, width])`` (see the module docstring).

    Fields: vocab_size (ids in [0, vocab_size); 0 is padding by convention), max_length (the
    longest L), width, layers, heads (dividing width), mlp_ratio.
    Call: ``ids`` int ``[B, L]`` with L <= max_length, ``mask`` bool ``[B, L]`` (True = a real
    token; None: all real). A row with no real token (the null caption of classifier-free
    guidance) gives zero token features and a zero pooled vector.
    """

    vocab_size: int
    max_length: int = 20
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "width", "layers", "heads", "mlp_ratio"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"heads: expected a divisor of width {self.width}, got {self.heads}")
        super().__post_init__()

    @nn.compact
    def __call__(self, ids: jax.Array, mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
        if np.ndim(ids) != 2 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise ValueError(f"ids: expected int token ids [B, L], got shape {np.shape(ids)} dtype {jnp.result_type(ids)}")
        B, L = np.shape(ids)
        if L > self.max_length:
            raise ValueError(f"ids: {L} tokens, more than max_length {self.max_length}")
        if mask is None:
            mask = jnp.ones((B, L), bool)
        if tuple(np.shape(mask)) != (B, L) or jnp.result_type(mask) != jnp.bool_:
            raise ValueError(f"mask: expected a bool array of shape {(B, L)}, got shape {np.shape(mask)} "
                             f"dtype {jnp.result_type(mask)}")
        if not isinstance(ids, jax.core.Tracer):
            concrete = np.asarray(ids)
            if concrete.size and (concrete.min() < 0 or concrete.max() >= self.vocab_size):
                raise ValueError(f"ids: expected ids in [0, {self.vocab_size}), got range [{concrete.min()}, {concrete.max()}]")
        h = nn.Embed(self.vocab_size, self.width, name="token_embed")(ids)
        pos = self.param("position_embed", nn.initializers.normal(0.02), (self.max_length, self.width))
        h = h + pos[None, :L]
        d = self.width // self.heads
        # A row with no real token attends to itself only (finite), and is zeroed at the end.
        attend = (mask[:, None, :] | jnp.eye(L, dtype=bool)[None]) & (mask[:, :, None] | jnp.eye(L, dtype=bool)[None])
        for i in range(self.layers):
            x = nn.LayerNorm(name=f"ln_attn_{i}")(h)
            q, k, v = (nn.Dense(self.width, name=f"{n}_{i}")(x).reshape(B, L, self.heads, d) for n in "qkv")
            a = jax.nn.dot_product_attention(q, k, v, mask=attend[:, None]).reshape(B, L, self.width)
            h = h + nn.Dense(self.width, name=f"proj_{i}")(a)
            x = nn.LayerNorm(name=f"ln_mlp_{i}")(h)
            x = nn.Dense(self.mlp_ratio * self.width, name=f"mlp_in_{i}")(x)
            h = h + nn.Dense(self.width, name=f"mlp_out_{i}")(nn.gelu(x))
        h = nn.LayerNorm(name="ln_final")(h) * mask[..., None]
        count = mask.sum(axis=1, keepdims=True)
        pooled = h.sum(axis=1) / jnp.maximum(count, 1)
        return h, pooled


class CLIP(nn.Module):
    """Image and text embeddings in one space (Radford et al. 2021) and a learned temperature.

    Fields: embed_dim; the text encoder's (vocab_size, max_length, text_width, text_layers,
    text_heads); the image tower's NoiseAwareClassifier trunk (image_channels_base,
    image_channel_mult, image_res_blocks, image_attention_resolutions).

    Methods (``module.apply(params, ..., method=...)``):
      ``encode_image(x [B, H, W, C], t [B])`` -> ``[B, embed_dim]``, unit norm;
      ``encode_text(ids [B, L], mask [B, L])`` -> ``[B, embed_dim]``, unit norm;
      ``similarity(x, t, ids, mask)`` -> ``[B]`` logit_scale * image_emb . text_emb;
      ``__call__(x, t, ids, mask)`` -> ``(image_emb, text_emb, logit_scale)`` with
      ``logit_scale = exp(log_scale)`` (initialised to 1 / 0.07, CLIP's value) clipped at 100.
    """

    vocab_size: int
    max_length: int = 20
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    image_channels_base: int = 32
    image_channel_mult: Sequence[int] = (1, 2, 2)
    image_res_blocks: int = 1
    image_attention_resolutions: Sequence[int] = (8,)

    def setup(self):
        """Build the text encoder and its projection, the image tower and the learned log temperature."""
        self.text = TextEncoder(self.vocab_size, self.max_length, self.text_width, self.text_layers, self.text_heads)
        self.text_proj = nn.Dense(self.embed_dim, use_bias=False)
        self.image = NoiseAwareClassifier(
            num_classes=self.embed_dim, pool="attention", base_channels=self.image_channels_base,
            channel_mult=tuple(self.image_channel_mult), num_res_blocks=self.image_res_blocks,
            attention_resolutions=tuple(self.image_attention_resolutions), num_heads=1, dropout=0.0)
        self.log_scale = self.param("log_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

    def encode_image(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """Unit-norm image embeddings ``[B, embed_dim]`` of (noisy) images ``x`` ``[B, H, W, C]`` at
        times ``t`` ``[B]``."""
        e = self.image(x, t)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-6)

    def encode_text(self, ids: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """Unit-norm text embeddings ``[B, embed_dim]`` of token ids ``[B, L]``: the projected mean of
        the encoder's final features over the real tokens (``mask`` ``[B, L]``, True = real; None:
        every token is real)."""
        e = self.text_proj(self.text(ids, mask)[1])
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-6)

    def logit_scale(self) -> jax.Array:
        """The temperature ``exp(log_scale)``, clipped at 100 (Radford et al. 2021)."""
        return jnp.minimum(jnp.exp(self.log_scale), 100.0)

    def similarity(self, x: jax.Array, t: jax.Array, ids: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """``[B]`` logits of matching pairs: tau f(x, t) . g(ids) (GLIDE's CLIP guidance climbs it)."""
        return self.logit_scale() * jnp.sum(self.encode_image(x, t) * self.encode_text(ids, mask), axis=-1)

    def __call__(self, x: jax.Array, t: jax.Array, ids: jax.Array, mask: Optional[jax.Array] = None) -> tuple[Any, Any, Any]:
        return self.encode_image(x, t), self.encode_text(ids, mask), self.logit_scale()


class TextUNet(UNet):
    """A :class:`~jdiff.models.UNet` conditioned on a caption through its own text encoder.

    Fields: every UNet field (``attention_resolutions`` / ``mid_attention`` place the
    cross-attention blocks; ``context_dim`` must stay None, it is ``text_width``), plus the
    encoder's: ``vocab_size`` (required; ids in [0, vocab_size), 0 = padding), ``max_length``,
    ``text_width``, ``text_layers``, ``text_heads``.

    Call: ``x [B, H, W, C]``, ``t [B]``, ``cond`` with ``"tokens"`` ``[B, L]`` int, L <=
    max_length (missing: the empty caption), and the other kinds a UNet reads (``"label"``,
    ``"image"``, ...); ``"context"`` is refused (the encoder makes it). Context = the encoder's
    ``[B, L, text_width]`` features, mask = ``tokens != 0``. Returns the U-Net's output.
    Parameters: ``{"text": TextEncoder's, "unet": UNet's}``.
    """

    reads_tokens: ClassVar[bool] = True  # jdiff.train.network feeds it the batches' "tokens"

    vocab_size: Optional[int] = None
    max_length: int = 20
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4

    def __post_init__(self):
        if not _positive_int(self.vocab_size):
            raise ValueError(f"vocab_size: expected the tokenizer's vocabulary size (a positive int), got {self.vocab_size!r}")
        if self.context_dim is not None:
            raise ValueError(f"context_dim: expected None (a TextUNet's context is its text encoder's text_width "
                             f"{self.text_width} features), got {self.context_dim!r}")
        if not self.attention_resolutions and not self.mid_attention:
            raise ValueError("attention_resolutions, mid_attention: a TextUNet reads the caption through the "
                             "cross-attention that follows self-attention blocks; expected at least one "
                             "(got attention_resolutions=() and mid_attention=False)")
        super().__post_init__()


    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: Optional[Any] = None, train: bool = False) -> jax.Array:
        B = np.shape(x)[0] if np.ndim(x) else 0
        cond = dict(cond or {})
        conditioning.check(cond, B)
        for k in ("context", "context_mask"):
            if k in cond:
                raise ValueError(f"cond[{k!r}]: given (shape {np.shape(cond[k])}) but a TextUNet makes its context from "
                                 "cond['tokens'] with its own text encoder")
        tokens = cond.pop("tokens", None)
        if tokens is None:
            tokens = jnp.zeros((B, 1), jnp.int32)  # the empty caption
        encoder = TextEncoder(self.vocab_size, self.max_length, self.text_width, self.text_layers, self.text_heads,
                              name="text")
        context, _ = encoder(tokens, tokens != 0)
        cond["context"], cond["context_mask"] = context, tokens != 0
        fields = self._shared_fields(UNet)
        fields["context_dim"] = self.text_width
        return UNet(**fields, name="unet")(x, t, cond, train)
