"""Flax (linen) networks. They know nothing of diffusion: no schedules, only (x, t, cond)."""

from jdiff.models import autoencoder, classifier, controlnet, layers, lora, prior, registry, text, unet
from jdiff.models.autoencoder import Autoencoder
from jdiff.models.classifier import NoiseAwareClassifier
from jdiff.models.controlnet import ControlledUNet, ControlNet
from jdiff.models.layers import (
    AttentionBlock,
    AttentionPool2d,
    CrossAttention,
    Downsample,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    fourier_features,
    sinusoidal_embedding,
)
from jdiff.models.lora import LoRA
from jdiff.models.prior import EmbeddingPrior
from jdiff.models.text import CLIP, TextEncoder, TextUNet
from jdiff.models.registry import MODELS, build, register, resolve
from jdiff.models.unet import EncoderOutput, UNet, UNetDecoder, UNetEncoder, cifar10_ddpm_unet, module_from_config

__all__ = [
    "UNet",
    "UNetEncoder",
    "UNetDecoder",
    "EncoderOutput",
    "NoiseAwareClassifier",
    "ControlNet",
    "ControlledUNet",
    "LoRA",
    "TextEncoder",
    "CLIP",
    "TextUNet",
    "Autoencoder",
    "EmbeddingPrior",
    "cifar10_ddpm_unet",
    "module_from_config",
    "MODELS",
    "register",
    "resolve",
    "build",
    "TimestepEmbedding",
    "ResBlock",
    "AttentionBlock",
    "AttentionPool2d",
    "CrossAttention",
    "Downsample",
    "Upsample",
    "sinusoidal_embedding",
    "fourier_features",
]
