"""Flax (linen) networks. They know nothing of diffusion: no schedules, only (x, t, y, cond)."""

from jdiff.models import classifier, layers, unet
from jdiff.models.classifier import NoiseAwareClassifier
from jdiff.models.layers import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    fourier_features,
    sinusoidal_embedding,
)
from jdiff.models.unet import EncoderOutput, UNet, UNetDecoder, UNetEncoder, cifar10_ddpm_unet, module_from_config

__all__ = [
    "UNet",
    "UNetEncoder",
    "UNetDecoder",
    "EncoderOutput",
    "NoiseAwareClassifier",
    "cifar10_ddpm_unet",
    "module_from_config",
    "TimestepEmbedding",
    "ResBlock",
    "AttentionBlock",
    "AttentionPool2d",
    "Downsample",
    "Upsample",
    "sinusoidal_embedding",
    "fourier_features",
]
