"""diffusers ``UNet2DModel`` checkpoints <-> jdiff's :class:`~jdiff.models.UNet`, and the
scheduler config <-> jdiff's diffusion and sampling settings.

Import: :func:`from_diffusers` reads a model folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, or ``.bin`` read as weights only), or a pipeline folder
with ``unet/`` and ``scheduler/`` (``DDPMPipeline.save_pretrained``, the hub's
``google/ddpm-*`` repos), and returns an :class:`~jdiff.convert.common.Imported`. Export:
:func:`to_diffusers` writes a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
``scheduler/``) that ``diffusers.DDPMPipeline.from_pretrained`` loads, with safetensors weights
(written with NumPy: exporting needs no PyTorch).

The supported ``UNet2DModel`` layouts are those of the pixel-space DDPM checkpoints
(``google/ddpm-cifar10-32``, ``-celebahq-256``, ``-church-256``, ``-bedroom-256``, ``-cat-256``)
and their kin: ``DownBlock2D`` / ``AttnDownBlock2D`` levels mirrored by ``UpBlock2D`` /
``AttnUpBlock2D``, conv up/down-sampling, the positional time embedding, attention heads of a
fixed width (``attention_head_dim``) or one head per block (None), a class embedding
(``num_class_embeds``), "default" time conditioning. Anything else is refused with the field
and value named: skip blocks (NCSN++), ResNet up/down blocks, Fourier or learned time
embeddings, "scale_shift" time conditioning (its mid-block attention has no group norm, which
jdiff's U-Net always has), ``center_input_sample``.

The network's equations are DDPM's (Ho et al. 2020, appendix B); the mapping is one jdiff
module per diffusers module, so the forward passes agree to float32 rounding (tests/test_convert.py
measures it; BENCHMARKS.md "Importing pretrained weights").
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping, Optional

from jdiff.convert.common import (
    INSTALL_HINT,
    ConversionError,
    Imported,
    Rule,
    apply_rules,
    check_params,
    conv,
    copy,
    export_rules,
    linear,
    read_state_dict,
    template_of,
)

__all__ = [
    "from_diffusers",
    "to_diffusers",
    "unet_fields",
    "diffusers_unet_config",
    "scheduler_settings",
    "scheduler_config",
    "unet_rules",
    "read_folder",
    "WEIGHT_FILES",
    "DDPM_CIFAR10_32",
]

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
"""The weight files of a diffusers model folder, in the order they are looked for: safetensors,
then the PyTorch pickle (read without running its code); writing uses the first."""

DDPM_CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    mid_block_scale_factor=1, center_input_sample=False, time_embedding_type="positional", act_fn="silu")
"""The UNet2DModel config of google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 network, 35.7M
parameters): attention at 16x16 only, one head, TF-style downsampling pads, DDPM's embedding."""

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# UNet2DModel's config fields and the values jdiff can run (None: any value is handled below).
_KNOWN = {
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type", "time_embedding_dim",
    "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type", "up_block_types", "block_out_channels",
    "layers_per_block", "mid_block_scale_factor", "downsample_padding", "downsample_type", "upsample_type", "dropout",
    "act_fn", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift",
    "add_attention", "class_embed_type", "num_class_embeds", "num_train_timesteps",
}
# jdiff writes this private key (diffusers ignores keys starting with "_"): the jdiff fields the
# export came from, so that an import gives them back exactly (e.g. num_heads=2 rather than the
# equivalent num_head_channels, and the class embedding's last row as the CFG null class).
JDIFF_FIELDS_KEY = "_jdiff_fields"
_DIFFUSERS_VERSION = "0.30.0"  # the format written; any later diffusers reads it


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{what}: {path!r} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ConversionError(f"{what}: {path!r} holds a {type(out).__name__}, expected a JSON object")
    return out


def read_folder(path: str) -> tuple[dict, str, Optional[dict]]:
    """``(unet config, weights file, scheduler config or None)`` of a diffusers folder.

    ``path`` is a model folder (``config.json`` + weights, optionally ``scheduler_config.json``
    beside them, as in the hub's ``google/ddpm-*`` repos) or a pipeline folder whose ``unet/``
    holds the model and ``scheduler/`` the scheduler. Raises :class:`ConversionError` naming
    the files that are missing and those that are there.
    """
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ConversionError(f"path: {path!r} is not a directory; expected a diffusers model or pipeline folder")
    model_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"path: {path!r} has no config.json (nor unet/config.json); it has "
                              f"{sorted(os.listdir(path))}; expected a folder written by save_pretrained")
    weights = [os.path.join(model_dir, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if not weights:
        raise ConversionError(f"path: {model_dir!r} has none of {list(WEIGHT_FILES)}; it has {sorted(os.listdir(model_dir))}")
    scheduler = None
    for candidate in (os.path.join(path, "scheduler", "scheduler_config.json"), os.path.join(model_dir, "scheduler_config.json")):
        if os.path.isfile(candidate):
            scheduler = _load_json(candidate, "scheduler config")
            break
    return _load_json(config_path, "config"), weights[0], scheduler


def _unsupported(field: str, value: Any, expected: str) -> ConversionError:
    return ConversionError(f"config.json: {field}={value!r} is not supported by the converter; expected {expected}")


def unet_fields(config: Mapping[str, Any]) -> tuple[dict, tuple, int]:
    """``(jdiff UNet fields, image shape (H, W, C), null rows to add to the class embedding)``
    of a ``UNet2DModel`` config; a :class:`ConversionError` names the first field jdiff cannot run."""
    cfg = dict(config)
    name = cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise _unsupported("_class_name", name, "'UNet2DModel' (a pixel-space diffusers U-Net)")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _KNOWN)
    if unknown:  # diffusers' UNet2DModel ignores them too (older checkpoints carry retired keys)
        warnings.warn(f"config.json: field(s) {unknown} are not UNet2DModel arguments; ignored, as diffusers does "
                      f"(the converter reads {sorted(_KNOWN)})", stacklevel=3)
    get = lambda k, default=None: cfg.get(k, default)  # noqa: E731  (UNet2DModel's defaults below)
    size = get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported("sample_size", size, "an int or a square [S, S]")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _unsupported("sample_size", size, "a positive int (the image side the model was trained at)")
    fixed = (  # (field, UNet2DModel's default, the value jdiff runs, what the error says)
        ("center_input_sample", False, False, "false"),
        ("time_embedding_type", "positional", "positional", "'positional'"),
        ("mid_block_type", "UNetMidBlock2D", "UNetMidBlock2D", "'UNetMidBlock2D'"),
        ("downsample_type", "conv", "conv", "'conv'"),
        ("upsample_type", "conv", "conv", "'conv'"),
        ("resnet_time_scale_shift", "default", "default",
         "'default' ('scale_shift' drops the mid-block attention's group norm, which jdiff's U-Net keeps)"),
        ("class_embed_type", None, None, "null (a learned class embedding from num_class_embeds)"),
    )
    for field, default, want, expected in fixed:
        if get(field, default) != want:
            raise _unsupported(field, get(field), expected)
    if get("act_fn", "silu") not in ("silu", "swish"):
        raise _unsupported("act_fn", get("act_fn"), "'silu'")
    if float(get("mid_block_scale_factor", 1)) != 1.0:
        raise _unsupported("mid_block_scale_factor", get("mid_block_scale_factor"), "1")
    channels = list(get("block_out_channels", (224, 448, 672, 896)))
    base = channels[0]
    if any(c % base for c in channels):
        raise _unsupported("block_out_channels", channels, "multiples of the first entry")
    temb_dim = get("time_embedding_dim")
    if temb_dim not in (None, 4 * base):
        raise _unsupported("time_embedding_dim", temb_dim, f"null or 4 * block_out_channels[0] = {4 * base}")
    down = list(get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up = list(get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    for field, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        bad = [t for t in types if t not in known]
        if bad:
            raise _unsupported(field, types, f"entries from {sorted(known)}; {bad} are not")
    if len(down) != len(channels) or len(up) != len(channels):
        raise _unsupported("down_block_types", down, f"{len(channels)} entries (one per block_out_channels) mirrored by up_block_types")
    attn = [_DOWN[t] for t in down]
    if [_UP[t] for t in reversed(up)] != attn:
        raise _unsupported("up_block_types", up, f"the mirror of down_block_types {down} (attention at the same levels)")
    if size % 2 ** (len(channels) - 1):
        raise _unsupported("sample_size", size, f"divisible by 2**{len(channels) - 1}")
    groups = get("norm_num_groups", 32)
    if get("attn_norm_num_groups") not in (None, groups):
        raise _unsupported("attn_norm_num_groups", get("attn_norm_num_groups"), f"null or norm_num_groups = {groups}")
    in_ch, out_ch = get("in_channels", 3), get("out_channels", 3)
    head_dim = get("attention_head_dim", 8)
    fields = dict(
        base_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=int(get("layers_per_block", 2)),
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
        num_heads=1,
        num_head_channels=None if head_dim is None else int(head_dim),
        dropout=float(get("dropout", 0.0)),
        resblock_updown=False,
        conv_resample=True,
        scale_shift_norm=False,
        mid_attention=bool(get("add_attention", True)),
        norm_num_groups=int(groups),
        norm_eps=float(get("norm_eps", 1e-5)),
        downsample_padding=int(get("downsample_padding", 1)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)),
        time_embedding="sinusoidal",
    )
    if fields["downsample_padding"] not in (0, 1):
        raise _unsupported("downsample_padding", fields["downsample_padding"], "0 or 1")
    if out_ch == 2 * in_ch:
        fields["learn_sigma"] = True
    elif out_ch != in_ch:
        fields["out_channels"] = int(out_ch)
    pad = 0
    n_class = get("num_class_embeds")
    if n_class is not None:  # a diffusers class embedding has no null row: a zero row is added (no class = no embedding)
        fields["num_classes"], pad = int(n_class), 1
    image_shape = (size, size, int(in_ch))
    if JDIFF_FIELDS_KEY in cfg:  # written by to_diffusers: the very fields, if they still describe this network
        own = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(cfg[JDIFF_FIELDS_KEY]).items()}
        try:
            same = _comparable(diffusers_unet_config(own, image_shape)) == _comparable(cfg)
        except (ConversionError, ValueError, TypeError):
            same = False
        if same:
            return own, image_shape, 0
    return fields, image_shape, pad


def _comparable(config: Mapping[str, Any]) -> dict:
    """A UNet2DModel config without its private keys, lists for tuples."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DEPRECATED = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
_CONVS = {"conv_in", "conv1", "conv2", "nin_shortcut", "conv", "conv_out"}


_LEAF_MODULES = {"encoder/conv_in": "conv_in", "encoder/time_embed/dense0": "time_embedding.linear_1",
                 "encoder/time_embed/dense1": "time_embedding.linear_2", "decoder/norm_out": "conv_norm_out",
                 "decoder/conv_out": "conv_out"}


def _block(jdiff_block: str, levels: int) -> str:
    """The diffusers module of a jdiff block (``encoder/down_1_attn_0`` -> ``down_blocks.1.attentions.0``)."""
    mid = {"encoder/mid_block_1": "mid_block.resnets.0", "encoder/mid_block_2": "mid_block.resnets.1",
           "encoder/mid_attn": "mid_block.attentions.0"}
    if jdiff_block in mid:
        return mid[jdiff_block]
    m = re.fullmatch(r"(encoder/down|decoder/up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", jdiff_block)
    if m is None:
        raise ConversionError(f"params: no diffusers counterpart for jdiff module {jdiff_block!r}")
    way, level, what, index = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    block = f"down_blocks.{level}" if way == "encoder/down" else f"up_blocks.{levels - 1 - level}"
    return {"block": f"{block}.resnets.{index}", "attn": f"{block}.attentions.{index}",
            "downsample": f"{block}.downsamplers.0", "upsample": f"{block}.upsamplers.0"}[what]


def unet_rules(template: Mapping[str, Any], levels: int, state_keys: Optional[set] = None, class_pad: int = 0) -> list[Rule]:
    """One :class:`Rule` per param of a jdiff UNet (``template``: path -> shape) naming the
    diffusers tensor it comes from. ``state_keys`` (the checkpoint's keys) selects the attention
    names per block: today's ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` or the deprecated
    ``query`` / ``key`` / ``value`` / ``proj_attn`` of older checkpoints (the hub's DDPM ones);
    without it (export) today's names are used."""
    rules = []
    for path in sorted(template):
        module, _, leaf = path.rpartition("/")
        if path == "encoder/class_embed/embedding":
            rules.append(Rule(path, "class_embedding.weight", copy, pad_rows=class_pad))
            continue
        sub = module.rpartition("/")[2]
        if module in _LEAF_MODULES:
            layer = _LEAF_MODULES[module]
        else:
            block, _, sub = module.rpartition("/")
            torch_block = _block(block, levels)
            if block.endswith("sample") and sub == "conv":  # a Downsample / Upsample's conv
                layer = f"{torch_block}.conv"
            elif "attn" in block.rpartition("/")[2] and sub in _ATTN:
                deprecated = state_keys is not None and f"{torch_block}.query.weight" in state_keys
                layer = f"{torch_block}.{(_ATTN_DEPRECATED if deprecated else _ATTN)[sub]}"
            elif sub in _RES and "attn" not in block.rpartition("/")[2]:
                layer = f"{torch_block}.{_RES[sub]}"
            else:
                raise ConversionError(f"params: no diffusers counterpart for {path!r}")
        if leaf == "kernel":
            rules.append(Rule(path, f"{layer}.weight", conv if sub in _CONVS else linear))
        elif leaf in ("scale", "bias"):
            rules.append(Rule(path, f"{layer}.{'weight' if leaf == 'scale' else 'bias'}", copy))
        else:
            raise ConversionError(f"params: no diffusers counterpart for {path!r}")
    return rules


def scheduler_settings(config: Optional[Mapping[str, Any]]) -> tuple[dict, dict]:
    """``(diffusion section, sample section)`` of jdiff's config from a diffusers scheduler config
    (``DDPMScheduler``, ``DDIMScheduler`` or ``DPMSolverMultistepScheduler``; None: DDPM's
    defaults). Betas: "linear" and "scaled_linear" (linspace of betas / of their square roots,
    with beta_start and beta_end), "squaredcos_cap_v2" (jdiff's cosine, Nichol & Dhariwal 2021
    eq. 17). Prediction "epsilon" / "sample" / "v_prediction" -> "eps" / "x0" / "v"; DDPM's
    variance_type "fixed_small(_log)" / "fixed_large(_log)" / "learned_range" / "learned"; clip_sample.
    Which timesteps a sampler visits (diffusers' ``timestep_spacing``) is a sampling choice,
    not part of the model: jdiff samples with its own spacing (``"uniform"`` = diffusers'
    "linspace"); pass ``timesteps=`` to :func:`jdiff.sample` to visit diffusers' exactly."""
    cfg = dict(config or {"_class_name": "DDPMScheduler"})
    name = cfg.get("_class_name", "DDPMScheduler")
    methods = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm_solver++"}
    if name not in methods:
        raise ConversionError(f"scheduler_config.json: _class_name={name!r} is not supported; expected one of {sorted(methods)}")
    bad = lambda field, expected: ConversionError(  # noqa: E731
        f"scheduler_config.json: {field}={cfg.get(field)!r} is not supported by the converter; expected {expected}")
    if cfg.get("trained_betas") is not None:
        raise bad("trained_betas", "null (betas from beta_schedule)")
    if cfg.get("rescale_betas_zero_snr", False):
        raise bad("rescale_betas_zero_snr", "false")
    if cfg.get("thresholding", False):
        raise bad("thresholding", "false (clip_sample's fixed [-1, 1] clip is supported)")
    if float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise bad("clip_sample_range", "1.0")
    schedules = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    kind = cfg.get("beta_schedule", "linear")
    if kind not in schedules:
        raise bad("beta_schedule", f"one of {sorted(schedules)}")
    predictions = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
    if cfg.get("prediction_type", "epsilon") not in predictions:
        raise bad("prediction_type", f"one of {sorted(predictions)}")
    variances = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                 "fixed_large_log": "fixed_large", "learned_range": "learned_range", "learned": "learned"}
    variance = cfg.get("variance_type", "fixed_small") if name == "DDPMScheduler" else "fixed_small"
    if variance not in variances:
        raise bad("variance_type", f"one of {sorted(variances)}")
    diffusion = dict(process="vp", schedule=schedules[kind], num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                     beta_start=float(cfg.get("beta_start", 1e-4)), beta_end=float(cfg.get("beta_end", 0.02)),
                     parameterization=predictions[cfg.get("prediction_type", "epsilon")], variance=variances[variance])
    sample = dict(method=methods[name], clip=bool(cfg.get("clip_sample", True)))
    return diffusion, sample


def from_diffusers(path: str) -> Imported:
    """A diffusers ``UNet2DModel`` folder (model or pipeline layout, see :func:`read_folder`) as
    a jdiff :class:`~jdiff.convert.common.Imported`: UNet fields, params, image shape, and the
    diffusion / sample sections of its scheduler config (DDPM defaults when it has none).
    Raises :class:`ConversionError` for missing files, unsupported config fields (named),
    missing / unexpected checkpoint keys (listed) and shape mismatches (named)."""
    from jdiff.models import UNet

    config, weights, scheduler = read_folder(path)
    fields, image_shape, pad = unet_fields(config)
    diffusion, sample = scheduler_settings(scheduler)
    if diffusion["variance"] in ("learned_range", "learned") and not fields.get("learn_sigma"):
        raise ConversionError(f"scheduler_config.json: variance_type {scheduler.get('variance_type')!r} needs a model "
                              f"with 2 x in_channels outputs; config.json has out_channels={config.get('out_channels')}")
    if fields.get("learn_sigma") and diffusion["variance"] not in ("learned_range", "learned"):
        diffusion["variance"] = "learned_range"  # the model's second half is only meaningful as a variance
    state = read_state_dict(weights)
    template = template_of(UNet(**fields), image_shape)
    rules = unet_rules(template, len(fields["channel_mult"]), set(state), pad)
    params = apply_rules(state, rules, template, source=weights)
    source = {"format": "diffusers", "path": os.path.abspath(path), "config": config, "scheduler": scheduler}
    return Imported("unet", fields, params, image_shape, diffusion, sample, source)


def diffusers_unet_config(fields: Mapping[str, Any], image_shape: tuple) -> dict:
    """The ``UNet2DModel`` config of a jdiff UNet (its fields and image shape); a
    :class:`ConversionError` names the first field diffusers' UNet2DModel cannot express."""
    from jdiff.models import UNet
    from jdiff.models.layers import norm_groups

    m = UNet(**dict(fields))  # validates the fields, fills defaults
    H, W, C = image_shape
    if H != W:
        raise ConversionError(f"image_shape: UNet2DModel samples square images; got {tuple(image_shape)}")
    need = lambda field, value, expected: ConversionError(  # noqa: E731
        f"model.{field}={value!r} cannot be expressed by diffusers' UNet2DModel; expected {expected}")
    for field, ok, expected in (("resblock_updown", not m.resblock_updown, "False"),
                                ("conv_resample", m.conv_resample, "True"),
                                ("scale_shift_norm", not m.scale_shift_norm, "False (UNet2DModel's 'scale_shift' "
                                 "has no group norm in its mid-block attention)"),
                                ("time_embedding", m.time_embedding == "sinusoidal", "'sinusoidal'"),
                                ("image_channels", m.image_channels == 0, "0"), ("context_dim", m.context_dim is None, "None"),
                                ("aug_level_embedding", not m.aug_level_embedding, "False")):
        if not ok:
            raise need(field, getattr(m, field), expected)
    channels = [m.base_channels * k for k in m.channel_mult]
    groups = m.norm_num_groups
    if groups is None:
        used = sorted({norm_groups(c) for c in channels})
        if len(used) != 1:
            raise need("norm_num_groups", None, f"a group count for every GroupNorm (UNet2DModel has one; this "
                       f"network's widths {channels} get {used} groups by jdiff's rule): train with model.norm_num_groups set")
        groups = used[0]
    attn = [H // 2**i in m.attention_resolutions for i in range(len(channels))]
    attn_widths = sorted({c for c, a in zip(channels, attn) if a} | ({channels[-1]} if m.mid_attention else set()))
    if m.num_head_channels is not None:
        head_dim = m.num_head_channels
    elif m.num_heads == 1:
        head_dim = None  # one head per block
    elif len(attn_widths) == 1:
        head_dim = attn_widths[0] // m.num_heads
    else:
        raise need("num_heads", m.num_heads, f"1 or num_head_channels set: {m.num_heads} heads at the attention widths "
                   f"{attn_widths} have different head widths, and UNet2DModel fixes one")
    out_ch = (m.out_channels or C) * (2 if m.learn_sigma else 1)
    config = {
        "_class_name": "UNet2DModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "sample_size": int(H), "in_channels": int(C), "out_channels": int(out_ch), "center_input_sample": False,
        "time_embedding_type": "positional", "freq_shift": float(m.freq_shift), "flip_sin_to_cos": bool(m.flip_sin_to_cos),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2D", "block_out_channels": channels, "layers_per_block": int(m.num_res_blocks),
        "mid_block_scale_factor": 1, "downsample_padding": int(m.downsample_padding), "downsample_type": "conv",
        "upsample_type": "conv", "dropout": float(m.dropout), "act_fn": "silu", "attention_head_dim": head_dim,
        "norm_num_groups": int(groups), "attn_norm_num_groups": None, "norm_eps": float(m.norm_eps),
        "resnet_time_scale_shift": "default", "add_attention": bool(m.mid_attention), "class_embed_type": None,
        "num_class_embeds": None if m.num_classes is None else int(m.num_classes) + 1,
    }
    config[JDIFF_FIELDS_KEY] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(fields).items()}
    if m.out_channels not in (None, C):
        raise need("out_channels", m.out_channels, f"None or the image channels {C} (diffusers' pipelines feed the "
                   "output back as the next input)")
    return config


def scheduler_config(diffusion: Mapping[str, Any], sample: Optional[Mapping[str, Any]] = None) -> dict:
    """The ``DDPMScheduler`` config of jdiff's diffusion (and sample) sections; the inverse of
    :func:`scheduler_settings`. Refuses processes diffusers' DDPMScheduler has no form for."""
    d = dict(diffusion)
    if d.get("process", "vp") != "vp":
        raise ConversionError(f"diffusion.process={d.get('process')!r}: only the discrete 'vp' process has a DDPMScheduler")
    kinds = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    if d.get("schedule") not in kinds:
        raise ConversionError(f"diffusion.schedule={d.get('schedule')!r}: expected one of {sorted(kinds)}")
    preds = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
    if d.get("parameterization", "eps") not in preds:
        raise ConversionError(f"diffusion.parameterization={d.get('parameterization')!r}: expected one of {sorted(preds)}")
    if d.get("variance", "fixed_small") not in ("fixed_small", "fixed_large", "learned_range", "learned"):
        raise ConversionError(f"diffusion.variance={d.get('variance')!r}: expected fixed_small, fixed_large, learned_range or learned")
    clip = (sample or {}).get("clip", True)
    if clip not in (True, False):
        raise ConversionError(f"sample.clip={clip!r}: DDPMScheduler clips to [-1, 1] or not; expected True or False")
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": _DIFFUSERS_VERSION,
        "num_train_timesteps": int(d.get("num_timesteps", 1000)), "beta_start": float(d.get("beta_start", 1e-4)),
        "beta_end": float(d.get("beta_end", 0.02)), "beta_schedule": kinds[d["schedule"]], "trained_betas": None,
        "variance_type": d.get("variance", "fixed_small"), "clip_sample": bool(clip), "clip_sample_range": 1.0,
        "prediction_type": preds[d.get("parameterization", "eps")], "thresholding": False,
        "timestep_spacing": "leading", "steps_offset": 0,
    }


def to_diffusers(out_dir: str, fields: Mapping[str, Any], params: Any, image_shape: tuple,
                 diffusion: Optional[Mapping[str, Any]] = None, sample: Optional[Mapping[str, Any]] = None) -> str:
    """Write a jdiff UNet as a ``DDPMPipeline`` folder: ``model_index.json``, ``unet/config.json``
    + ``unet/diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json`` (from
    ``diffusion`` / ``sample``; DDPM's defaults when None). Returns the folder's absolute path.

    Everything is checked before anything is written; an existing non-empty ``out_dir`` is
    refused. ``from_diffusers`` of the folder gives back the same fields and bit-identical params.
    """
    from jdiff.models import UNet

    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ConversionError(f"out_dir: writing safetensors needs the safetensors package: {INSTALL_HINT}") from None
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"out_dir: {out_dir!r} exists and is not empty; expected a new directory (nothing was written)")
    unet_config = diffusers_unet_config(fields, image_shape)
    sched = scheduler_config(diffusion or {"schedule": "linear"}, sample)
    template = template_of(UNet(**dict(fields)), tuple(image_shape))
    check_params(params, template, "the UNet of these fields")
    state = export_rules(params, unet_rules(template, len(unet_config["block_out_channels"])))
    os.makedirs(os.path.join(out_dir, "unet"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    save_file(state, os.path.join(out_dir, "unet", WEIGHT_FILES[0]), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "unet", "config.json"), "w") as f:
        json.dump(unet_config, f, indent=2, default=str)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump({"_class_name": "DDPMPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
                   "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, f, indent=2)
    return out_dir
