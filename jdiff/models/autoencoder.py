"""A KL-regularised convolutional autoencoder: the first stage of latent diffusion (Rombach et al.
2022, LDM sec. 3.1 and appendix G).

The encoder maps ``x [B, H, W, C]`` to the mean and log-variance of a diagonal Gaussian
posterior q(z | x) over latents ``[B, H/f, W/f, latent_channels]`` with f =
``2 ** (len(channel_mult) - 1)``; the decoder maps a latent back to ``[B, H, W, C]``. Both are
stacks of pre-activation residual blocks (GroupNorm, SiLU, 3x3 conv; no time input), with a
stride-2 conv down and nearest-neighbour + conv up between levels, like LDM's first stage
without its attention and GAN loss. Training (the loss, the KL weight, the latent scale
factor) is :mod:`jdiff.train.autoencoder`; the network knows nothing of diffusion.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.layers import Conv, Downsample, Upsample, group_norm

__all__ = ["Autoencoder"]


class _Block(nn.Module):
    """x + conv(silu(GN(conv(silu(GN(x)))))) with a 1x1 skip conv when the width changes."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv(self.channels, (3, 3), name="conv1")(nn.silu(group_norm(x.shape[-1], jnp.float32, "norm1")(x)))
        h = Conv(self.channels, (3, 3), name="conv2")(nn.silu(group_norm(self.channels, jnp.float32, "norm2")(h)))
        if x.shape[-1] != self.channels:
            x = Conv(self.channels, (1, 1), name="skip")(x)
        return x + h


class _Encoder(nn.Module):
    latent_channels: int
    base_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv(self.base_channels, (3, 3), name="conv_in")(x)
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = _Block(self.base_channels * mult, name=f"down_{level}_block_{i}")(h)
            if level < len(self.channel_mult) - 1:
                h = Downsample(name=f"down_{level}_downsample")(h)
        h = _Block(h.shape[-1], name="mid_block")(h)
        h = nn.silu(group_norm(h.shape[-1], jnp.float32, "norm_out")(h))
        return Conv(2 * self.latent_channels, (3, 3), name="conv_out")(h)


class _Decoder(nn.Module):
    image_channels: int
    base_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = Conv(self.base_channels * self.channel_mult[-1], (3, 3), name="conv_in")(z)
        h = _Block(h.shape[-1], name="mid_block")(h)
        for level in reversed(range(len(self.channel_mult))):
            for i in range(self.num_res_blocks):
                h = _Block(self.base_channels * self.channel_mult[level], name=f"up_{level}_block_{i}")(h)
            if level > 0:
                h = Upsample(name=f"up_{level}_upsample")(h)
        h = nn.silu(group_norm(h.shape[-1], jnp.float32, "norm_out")(h))
        return Conv(self.image_channels, (3, 3), name="conv_out")(h)


class Autoencoder(nn.Module):
    """KL autoencoder (see the module docstring).

    Fields: image_channels (C), latent_channels, base_channels, channel_mult (its length - 1
    is the number of halvings: the downsampling factor f = 2 ** (len - 1)), num_res_blocks.

    Methods (``module.apply({"params": p}, ..., method=...)``):
      ``encode(x [B, H, W, C])`` -> ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]``
        (logvar clipped to [-30, 20], as LDM's DiagonalGaussianDistribution);
      ``decode(z [B, H/f, W/f, latent_channels])`` -> ``[B, H, W, C]``;
      ``__call__(x, key)`` -> ``(reconstruction, mean, logvar)`` with z = mean + exp(logvar / 2) eps,
        eps ~ N(0, I) from ``key`` (the reparameterisation, Kingma & Welling 2014, eq. 10).
    """

    image_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1

    def __post_init__(self):
        for name in ("image_channels", "latent_channels", "num_res_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if isinstance(self.base_channels, bool) or not isinstance(self.base_channels, (int, np.integer)) or self.base_channels < 4:
            raise ValueError(f"base_channels: expected an int >= 4, got {self.base_channels!r}")
        mult = tuple(self.channel_mult) if isinstance(self.channel_mult, (tuple, list)) else ()
        if not mult or not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m >= 1 for m in mult):
            raise ValueError(f"channel_mult: expected a non-empty sequence of positive ints, got {self.channel_mult!r}")
        super().__post_init__()

    @property
    def factor(self) -> int:
        """The downsampling factor f: latents are ``[B, H/f, W/f, latent_channels]``."""
        return 2 ** (len(self.channel_mult) - 1)

    def setup(self):
        """Build the encoder and decoder towers from the fields."""
        mult = tuple(self.channel_mult)
        self.encoder = _Encoder(self.latent_channels, self.base_channels, mult, self.num_res_blocks)
        self.decoder = _Decoder(self.image_channels, self.base_channels, mult, self.num_res_blocks)

    def _check(self, a: jax.Array, channels: int, name: str, divisible: int) -> None:
        shape = tuple(np.shape(a))
        if len(shape) != 4 or shape[-1] != channels or shape[1] % divisible or shape[2] % divisible:
            raise ValueError(f"{name}: expected [B, H, W, {channels}] with H and W divisible by {divisible}, got shape {shape}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior q(z | x) of images ``x`` ``[B, H, W, C]`` (H, W divisible by f): ``(mean, logvar)``,
        each ``[B, H/f, W/f, latent_channels]``, logvar clipped to [-30, 20]."""
        self._check(x, self.image_channels, "x", self.factor)
        mean, logvar = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` from latents ``z`` ``[B, H/f, W/f, latent_channels]``."""
        self._check(z, self.latent_channels, "z", 1)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar
