"""Noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The trunk is the U-Net's encoder (time embedding, downsampling levels, middle block), so the
classifier sees the noise level the same way the denoiser does; the head is GroupNorm ->
swish -> attention pooling (ADM's "attention" pool) or spatial mean -> Dense ("mean").
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.layers import AttentionPool2d, Dtype, default_init, group_norm
from jdiff.models.unet import UNetEncoder, module_from_config, validate_trunk_fields

__all__ = ["NoiseAwareClassifier", "POOLINGS"]

POOLINGS = ("attention", "mean")
"""How the classifier pools its trunk's features before the output layer: ``attention`` (ADM's
attention pool) or ``mean`` (spatial mean, then Dense)."""


class NoiseAwareClassifier(nn.Module):
    """Logits of p(y | x_t, t): ``NoiseAwareClassifier(...).apply(params, x, t) -> [B, num_classes]``.

    Fields: ``num_classes`` (outputs), ``pool`` ("attention" | "mean"), and the U-Net trunk's
    fields (see :class:`~jdiff.models.unet.UNetEncoder`, the import fields included: OpenAI's
    classifiers load through :mod:`jdiff.convert.openai`); the defaults follow ADM's classifier
    (scale-shift norm, residual up/down blocks) at a small width.

    Call: ``x: [B, H, W, C]`` float, ``t: [B]`` int or float, ``cond`` None or a
    :mod:`jdiff.conditioning` mapping for the trunk ("image" iff ``image_channels``, "context" /
    "context_mask" with ``context_dim``, "aug_level" iff ``aug_level_embedding``; never "label",
    which is what the classifier predicts), ``train`` enables dropout. The attention pool's
    positional embedding is sized by the input at init, so apply it at the resolution it was
    initialised with.
    """

    predicts_label: ClassVar[bool] = True  # num_classes counts its outputs; cond never holds a label

    num_classes: int = 10
    pool: str = "attention"
    base_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    dropout: float = 0.0
    resblock_updown: bool = True
    conv_resample: bool = True
    scale_shift_norm: bool = True
    mid_attention: bool = True
    image_channels: int = 0
    context_dim: Optional[int] = None
    aug_level_embedding: bool = False
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    fourier_seed: int = 0
    dtype: Dtype = jnp.float32
    num_head_channels: Optional[int] = None
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-6
    downsample_padding: int = 1
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    time_scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {self.num_classes!r}")
        if self.pool not in POOLINGS:
            raise ValueError(f"pool: expected one of {POOLINGS}, got {self.pool!r}")
        validate_trunk_fields(self)
        super().__post_init__()

    @classmethod
    def from_config(cls, cfg: Any, **overrides) -> "NoiseAwareClassifier":
        """Build from an ml_collections ConfigDict whose keys are this class's fields."""
        return module_from_config(cls, cfg, **overrides)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, cond: Optional[Mapping[str, jax.Array]] = None, train: bool = False
    ) -> jax.Array:
        if isinstance(cond, Mapping) and "label" in cond:
            raise ValueError(
                f"cond['label']: given (shape {np.shape(cond['label'])}) but a classifier predicts the label; "
                "pass the labels to the loss or to log_prob_fn instead"
            )
        # Every trunk field of the encoder but its class embedding (num_classes is this module's outputs).
        trunk = {f.name: getattr(self, f.name) for f in dataclasses.fields(UNetEncoder)
                 if f.init and f.name not in ("parent", "name", "num_classes")}
        h = UNetEncoder(**trunk, name="encoder")(x, t, cond, train=train).h
        h = nn.swish(group_norm(h.shape[-1], self.dtype, "norm_out", self.norm_num_groups, self.norm_eps)(h))
        if self.pool == "attention":
            logits = AttentionPool2d(self.num_classes, self.num_heads, self.dtype, self.num_head_channels,
                                     name="attention_pool")(h)
        else:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=default_init(), name="head")(h.mean(axis=(1, 2)))
        return logits.astype(jnp.float32)
