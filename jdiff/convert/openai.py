"""OpenAI improved-diffusion / guided-diffusion checkpoints -> jdiff's own networks.

:func:`from_openai` reads a ``.pt`` state dict (``torch.load(weights_only=True)``: no pickled
code runs) and the command-line flags the checkpoint was trained or sampled with (the
``MODEL_FLAGS`` / ``DIFFUSION_FLAGS`` / ``CLASSIFIER_FLAGS`` of the repositories' READMEs), and
returns an :class:`~jdiff.convert.common.Imported`: the jdiff network, its params, and the
``diffusion`` / ``sample`` settings that reproduce the source's process.

Supported:
  - guided-diffusion's ``UNetModel`` (``create_model``; Dhariwal & Nichol 2021, "Diffusion Models
    Beat GANs on Image Synthesis", sec. 3): learned variances (``learn_sigma``), class
    conditioning (``class_cond``: 1000 ImageNet classes; jdiff's class embedding gets a zero
    null row for classifier-free guidance, which OpenAI's ``label_emb`` does not have), BigGAN
    up/down residual blocks (``resblock_updown``), adaptive group norm
    (``use_scale_shift_norm``), heads of a fixed width (``num_head_channels``) or a fixed count
    (``num_heads``), and both attention orders: the legacy one (``QKVAttentionLegacy``, fused
    qkv rows grouped per head as [q k v]) and ``use_new_attention_order`` (``QKVAttention``,
    rows [q | k | v], each split into heads).
  - guided-diffusion's noise-aware classifier ``EncoderUNetModel`` (``create_classifier``; same
    paper, sec. 4) with the "attention" pool (CLIP-style attention pooling) or the "adaptive"
    pool (spatial mean, then a 1x1 conv = jdiff's pool "mean").
  - improved-diffusion's ``UNetModel`` (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
    Probabilistic Models"): the same state-dict names and the legacy attention order; pass
    ``codebase="improved-diffusion"`` so its own flag set and defaults apply
    (``rescale_timesteps`` and ``rescale_learned_sigmas`` default to True there, and the 32x32
    models have ``channel_mult`` (1, 2, 2, 2)). ``rescale_timesteps`` (the network fed
    ``t * 1000 / T``, e.g. the 4000-step models) becomes the U-Net's ``time_scale = 1000 / T``.

Not supported (a :class:`~jdiff.convert.common.ConversionError` names the flag and value):
  - ``SuperResModel`` (``large_size`` / ``small_size``): its low-resolution image, bilinearly
    upsampled and concatenated to x, would map to jdiff's ``image_channels`` conditioning; that
    mapping is not done.
  - the classifier's "spatial" / "spatial_v2" pools (a head over every level's features).
  - the 512x512 models' ``channel_mult`` (0.5, 1, ...): their first level is half the base
    width, while jdiff's input conv and time embedding are both sized by ``base_channels``.
  - ``num_heads_upsample`` other than ``num_heads`` (with ``num_head_channels=-1``).
  - ``timestep_respacing`` other than "" or an N whose steps jdiff's uniform spacing picks too
    (``ddimN`` and per-section counts): set ``sample.steps`` / ``sample.method`` in jdiff instead.
  ``use_fp16`` / ``classifier_use_fp16`` / ``use_checkpoint`` do not change the weights: every
  tensor is read as float32 and the network runs in float32. ``use_kl`` and
  ``rescale_learned_sigmas`` only choose the training loss; they are kept in the provenance.

The process (guided-diffusion's ``create_gaussian_diffusion``): ``noise_schedule`` "linear" is
DDPM's linear betas rescaled to T steps, beta_start = 1e-4 * 1000 / T, beta_end = 0.02 * 1000 / T
(``get_named_beta_schedule``; Nichol & Dhariwal 2021, sec. 3.2 keep it "similar in the limit"),
"cosine" is their eq. 17; ``predict_xstart`` -> parameterization "x0" (else "eps");
``learn_sigma`` -> variance "learned_range" (their eq. 15: log Sigma = v log beta_t +
(1 - v) log beta_tilde_t), else "fixed_small" with ``sigma_small``, "fixed_large" without.
Sampling clips the predicted x_0 to [-1, 1], as the scripts' ``clip_denoised=True``.

The mapping is one jdiff module per OpenAI module (jdiff's U-Net follows the same ADM equations:
:mod:`jdiff.models.layers`), so the outputs agree to float32 rounding
(tests/test_convert_openai.py measures it against guided-diffusion itself).
"""

from __future__ import annotations

import os
import shlex
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from jdiff.convert.common import (
    ConversionError,
    Imported,
    Rule,
    apply_rules,
    conv,
    copy,
    linear,
    read_state_dict,
    state_arrays,
    template_of,
)

__all__ = [
    "from_openai",
    "parse_flags",
    "unet_fields",
    "classifier_fields",
    "unet_rules",
    "classifier_rules",
    "diffusion_settings",
    "GUIDED_DEFAULTS",
    "IMPROVED_DEFAULTS",
    "CODEBASES",
    "KINDS",
    "NUM_CLASSES",
]

NUM_CLASSES = 1000
"""ImageNet's 1000 classes (``script_util.NUM_CLASSES`` of both repositories): the class count of
every class-conditional model and classifier."""

KINDS = ("model", "classifier")
"""What :func:`from_openai` converts: ``model`` (``UNetModel`` -> jdiff ``"unet"``) or ``classifier``
(guided-diffusion's noisy ``EncoderUNetModel`` -> jdiff ``"classifier"``)."""

_DIFFUSION_DEFAULTS = dict(  # guided-diffusion script_util.diffusion_defaults()
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
)

GUIDED_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    sigma_small=False,
    **_DIFFUSION_DEFAULTS,
))
"""guided-diffusion's flags and defaults: ``model_and_diffusion_defaults()`` and
``classifier_defaults()`` (the two sets ``classifier_sample.py`` takes together), plus
``sigma_small``, a keyword of its ``create_gaussian_diffusion`` (a flag in improved-diffusion)."""

IMPROVED_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
))
"""improved-diffusion's flags and defaults: its ``model_and_diffusion_defaults()``."""

# What improved-diffusion's code fixes for the guided-diffusion flags it does not have.
_IMPROVED_IMPLIED = dict(num_head_channels=-1, channel_mult="", resblock_updown=False, use_fp16=False,
                         use_new_attention_order=False)

# channel_mult by image_size when the flag is "" (create_model / create_classifier).
_GUIDED_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_IMPROVED_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}

CODEBASES: Mapping[str, tuple] = MappingProxyType({
    "guided-diffusion": (GUIDED_DEFAULTS, _GUIDED_CHANNEL_MULT),
    "improved-diffusion": (IMPROVED_DEFAULTS, _IMPROVED_CHANNEL_MULT),
})
"""codebase -> (its flags and defaults, its create_model's channel_mult table by image size), for
``"guided-diffusion"`` and ``"improved-diffusion"``: what :func:`parse_flags` resolves flags over."""

_TRUE = ("yes", "true", "t", "y", "1")  # str2bool of both repositories
_FALSE = ("no", "false", "f", "n", "0")
_LISTS = ("attention_resolutions", "classifier_attention_resolutions", "channel_mult")
_CLASSIFIER_HEAD_CHANNELS = 64  # create_classifier's num_head_channels
_POOLS = {"attention": "attention", "adaptive": "mean"}  # OpenAI pool -> NoiseAwareClassifier.pool

FlagsLike = Union[str, Mapping[str, Any], None]


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------


def _split_flags(flags: str) -> list[tuple[str, str]]:
    """'--name value --other=value' -> [(name, value), ...] (argparse's two spellings)."""
    try:
        words = shlex.split(flags)
    except ValueError as e:
        raise ConversionError(f"flags: {flags!r} cannot be split into words: {e}") from None
    pairs, i = [], 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ConversionError(f"flags: expected '--name value' pairs, got {word!r} (word {i} of {flags!r})")
        name, eq, value = word[2:].partition("=")
        if not eq:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise ConversionError(f"flags: --{name} has no value; expected '--{name} VALUE'")
            value = words[i + 1]
            i += 1
        pairs.append((name, value))
        i += 1
    return pairs


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the flag's default (argparse's ``type=type(default)``; bools by
    str2bool); the comma-list flags also take a sequence of ints."""
    bad = lambda expected: ConversionError(f"flags: --{name} {value!r}: expected {expected}")  # noqa: E731
    if isinstance(default, bool):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, np.integer)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("a boolean: True / False (or yes/no, t/f, y/n, 1/0)")
    if isinstance(default, int):
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad("an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad("a number")
    if name in _LISTS and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if name in _LISTS and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if name == "channel_mult" and value is None:
        return ""
    if not isinstance(value, str):
        raise bad("a string")
    return value.strip()


def _number_list(name: str, text: str, kind: Callable[[str], Any] = int) -> tuple:
    """'32,16,8' -> (32, 16, 8), each positive; a ConversionError names the flag otherwise."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not (np.isfinite(v) and v > 0) for v in values):
        raise ConversionError(f"flags: --{name} {text!r}: expected a comma-separated list of positive "
                              f"{'integers' if kind is int else 'numbers'}, e.g. '32,16,8'")
    return tuple(int(v) if float(v).is_integer() else v for v in values)


def _guided_spacing(num_timesteps: int, count: int) -> list[int]:
    """The timesteps ``timestep_respacing="N"`` keeps in guided / improved diffusion's
    ``respace.space_timesteps`` (one section): round(k * stride) for k < N,
    stride = (T - 1) / (N - 1), accumulated as a running float sum (hence the explicit loop)."""
    stride = 1.0 if count <= 1 else (num_timesteps - 1) / (count - 1)
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return taken


def _check_process_flags(f: Mapping[str, Any]) -> None:
    T = f["diffusion_steps"]
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise ConversionError(f"flags: --noise_schedule {f['noise_schedule']!r}: expected 'linear' or 'cosine' "
                              "(get_named_beta_schedule's names)")
    if f["noise_schedule"] == "linear" and not 0.02 * 1000 / T < 1:
        raise ConversionError(f"flags: --diffusion_steps {T}: the linear schedule's last beta 0.02 * 1000 / T = "
                              f"{0.02 * 1000 / T:g} is not below 1; expected more than 20 steps")
    r = f["timestep_respacing"]
    if r:
        if not r.isdigit() or not 1 <= int(r) <= T:
            raise ConversionError(
                f"flags: --timestep_respacing {r!r} is not supported: expected '' or one step count N in [1, {T}] "
                "('ddimN' and per-section counts pick timesteps jdiff's samplers do not; drop the flag and set "
                "jdiff's sample.method / sample.steps instead)")
        from jdiff.schedules import space_timesteps

        if _guided_spacing(T, int(r)) != [int(s) for s in space_timesteps(T, int(r))]:
            raise ConversionError(
                f"flags: --timestep_respacing {r!r}: OpenAI's respacing keeps other timesteps than jdiff's uniform "
                f"spacing of {r} steps over {T} (their strides round differently); drop the flag and set jdiff's "
                "sample.steps instead (e.g. 25, 50, 100, 250 give the same timesteps)")


def parse_flags(flags: FlagsLike = None, codebase: str = "guided-diffusion") -> dict[str, Any]:
    """The flags of an OpenAI training / sampling script, resolved over the codebase's defaults.

    Args:
      flags: a command-line string (``"--image_size 64 --learn_sigma True ..."``, also
        ``--name=value``; a flag given twice keeps its last value, as argparse does), a mapping
        name -> value (strings or Python values), or None / "" for the defaults.
      codebase: "guided-diffusion" (:data:`GUIDED_DEFAULTS`: the model, diffusion and classifier
        flags) or "improved-diffusion" (:data:`IMPROVED_DEFAULTS`).
    Returns:
      Every flag of the codebase, typed as its default (bools by the scripts' ``str2bool``),
      with the comma lists parsed: ``attention_resolutions`` and
      ``classifier_attention_resolutions`` as tuples of ints, and ``channel_mult`` resolved as
      the codebase's ``create_model`` does (the table by ``image_size`` when "", None when the
      table has no entry for it). An improved-diffusion result also holds the guided-diffusion
      network flags its code fixes (num_head_channels -1, resblock_updown False, legacy
      attention order), so both resolve to one schema. ``parse_flags(result)`` is ``result``.
    Raises:
      ConversionError naming an unknown flag (and listing the known ones), a value of the wrong
      type, or a process setting jdiff cannot reproduce (see the module docstring). Network
      settings are checked by :func:`unet_fields` / :func:`classifier_fields`, so a flag of the
      other network does not stop a conversion.
    """
    if codebase not in CODEBASES:
        raise ConversionError(f"codebase: expected one of {sorted(CODEBASES)}, got {codebase!r}")
    defaults, mult_table = CODEBASES[codebase]
    if flags is None:
        pairs = []
    elif isinstance(flags, str):
        pairs = _split_flags(flags)
    elif isinstance(flags, Mapping):
        pairs = [(str(k), v) for k, v in flags.items()]
    else:
        raise ConversionError(f"flags: expected a command-line string or a mapping, got {type(flags).__name__}")
    known = {**defaults, **(_IMPROVED_IMPLIED if codebase == "improved-diffusion" else {})}
    unknown = sorted({name for name, _ in pairs if name not in known})
    if unknown:
        hint = ""
        if {"large_size", "small_size"} & set(unknown):
            hint = " (large_size / small_size are SuperResModel's flags: super-resolution models are not supported)"
        raise ConversionError(f"flags: unknown flag(s) {', '.join('--' + n for n in unknown)} for {codebase}{hint}; "
                              f"known: {', '.join(sorted(defaults))}")
    out = dict(known)
    for name, value in pairs:
        out[name] = _coerce(name, value, known[name])

    for name in ("image_size", "num_channels", "num_res_blocks", "num_heads", "diffusion_steps",
                 "classifier_width", "classifier_depth"):
        if name in out and out[name] < 1:
            raise ConversionError(f"flags: --{name} {out[name]}: expected a positive integer")
    for name in ("num_head_channels", "num_heads_upsample"):
        if out[name] != -1 and out[name] < 1:
            raise ConversionError(f"flags: --{name} {out[name]}: expected -1 (unset) or a positive integer")
    if not 0.0 <= out["dropout"] < 1.0:
        raise ConversionError(f"flags: --dropout {out['dropout']}: expected a rate in [0, 1)")
    for name in ("attention_resolutions", "classifier_attention_resolutions"):
        if name in out and isinstance(out[name], str):
            out[name] = _number_list(name, out[name])
    if out["channel_mult"] == "":
        out["channel_mult"] = mult_table.get(out["image_size"])
    elif isinstance(out["channel_mult"], str):
        out["channel_mult"] = _number_list("channel_mult", out["channel_mult"], float)
    if codebase == "improved-diffusion":  # the guided-diffusion flags it lacks may only restate its code
        fixed = {**_IMPROVED_IMPLIED, "channel_mult": mult_table.get(out["image_size"])}
        for name, value in fixed.items():
            if out[name] != value:
                raise ConversionError(f"flags: --{name} {out[name]!r} is not an improved-diffusion flag; its "
                                      f"code fixes {name} to {value!r} (guided-diffusion's flags: "
                                      "codebase='guided-diffusion')")
    _check_process_flags(out)
    return out


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------

_ADM_FIELDS = dict(  # what every OpenAI network shares, in jdiff's import fields
    conv_resample=True,  # Downsample / Upsample with convolutions (the scripts never turn it off)
    mid_attention=True,
    time_embedding="sinusoidal",
    norm_num_groups=32,  # nn.normalization: GroupNorm32(32, channels)
    norm_eps=1e-5,  # torch.nn.GroupNorm's default
    downsample_padding=1,  # Downsample: conv(3, stride=2, padding=1)
    flip_sin_to_cos=True,  # nn.timestep_embedding: [cos, sin], freqs exp(-log(10000) i / half)
    freq_shift=0,
)


def _attention_heights(image_size: int, resolutions: Sequence[int], levels: int) -> tuple:
    """OpenAI's attention_resolutions (feature-map sizes, turned into downsample rates
    ds = image_size // res by create_model) as the feature-map heights jdiff compares with: the
    level l has attention when its rate 2**l is one of those ds."""
    rates = {image_size // int(r) for r in resolutions}
    return tuple(image_size // 2**level for level in range(levels) if 2**level in rates)


def _trunk_fields(width: int, mult: Optional[Sequence], image_size: int, resolutions: Sequence[int],
                  flag_names: tuple[str, str]) -> dict:
    """base_channels, channel_mult and attention_resolutions; ConversionErrors name the flags."""
    width_flag, mult_flag = flag_names
    if mult is None:
        raise ConversionError(f"flags: --{mult_flag} '' with --image_size {image_size}: the script has no default "
                              f"channel_mult for that size; expected an explicit --{mult_flag}, e.g. 1,2,2,2")
    if any(float(m) != int(m) for m in mult):
        raise ConversionError(
            f"flags: {mult_flag} {tuple(mult)} (image_size {image_size}) is not supported: a fractional multiplier "
            "makes a level narrower than --" + width_flag + ", and jdiff's U-Net sizes its input conv and time "
            "embedding by base_channels (the first level's width); expected integer multipliers")
    mult = tuple(int(m) for m in mult)
    if image_size % 2 ** (len(mult) - 1):
        raise ConversionError(f"flags: --image_size {image_size}: expected a multiple of 2**(len(channel_mult) - 1) = "
                              f"{2 ** (len(mult) - 1)} for channel_mult {mult}")
    widths = sorted({width * m for m in mult})
    if any(w % 32 for w in widths):
        raise ConversionError(f"flags: --{width_flag} {width} with channel_mult {mult} gives widths {widths}; "
                              "OpenAI's GroupNorm32 needs every width divisible by 32")
    return dict(base_channels=width, channel_mult=mult,
                attention_resolutions=_attention_heights(image_size, resolutions, len(mult)))


def _time_scale(f: Mapping[str, Any]) -> dict:
    """``rescale_timesteps``: the network saw t * 1000 / T (``_scale_timesteps``), jdiff's
    ``time_scale`` field; nothing when that is t itself."""
    T = f["diffusion_steps"]
    return {"time_scale": 1000.0 / T} if f["rescale_timesteps"] and T != 1000 else {}


def unet_fields(flags: Mapping[str, Any]) -> dict[str, Any]:
    """jdiff :class:`~jdiff.models.UNet` fields of the ``UNetModel`` that ``create_model`` builds
    from ``flags`` (a :func:`parse_flags` result). Raises ConversionError naming a flag whose
    value jdiff's U-Net cannot represent (see the module docstring)."""
    f = flags
    heads_up = f["num_heads_upsample"]
    if f["num_head_channels"] == -1 and heads_up not in (-1, f["num_heads"]):
        raise ConversionError(
            f"flags: --num_heads_upsample {heads_up} (with --num_heads {f['num_heads']}, --num_head_channels -1) is "
            "not supported: jdiff's decoder attention has as many heads as its encoder's; expected -1 or num_heads")
    return dict(
        **_trunk_fields(f["num_channels"], f["channel_mult"], f["image_size"], f["attention_resolutions"],
                        ("num_channels", "channel_mult")),
        num_res_blocks=f["num_res_blocks"],
        num_heads=f["num_heads"],
        num_head_channels=None if f["num_head_channels"] == -1 else f["num_head_channels"],
        dropout=float(f["dropout"]),
        resblock_updown=f["resblock_updown"],
        scale_shift_norm=f["use_scale_shift_norm"],
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        out_channels=3,
        learn_sigma=f["learn_sigma"],
        **_ADM_FIELDS,
        **_time_scale(f),
    )


def classifier_fields(flags: Mapping[str, Any]) -> dict[str, Any]:
    """jdiff :class:`~jdiff.models.NoiseAwareClassifier` fields of the ``EncoderUNetModel`` that
    ``create_classifier`` builds from ``flags`` (a guided-diffusion :func:`parse_flags` result):
    1000 classes, ``channel_mult`` by ``image_size``, 64-channel heads, no dropout."""
    f = flags
    if "classifier_pool" not in f:
        raise ConversionError("flags: they have no classifier flags (improved-diffusion has no classifier); "
                              "expected a guided-diffusion flag set")
    if f["classifier_pool"] not in _POOLS:
        raise ConversionError(f"flags: --classifier_pool {f['classifier_pool']!r} is not supported: expected one of "
                              f"{sorted(_POOLS)} (the 'spatial' pools read every level's features)")
    size = f["image_size"]
    if size not in _GUIDED_CHANNEL_MULT:
        raise ConversionError(f"flags: --image_size {size}: create_classifier knows {sorted(_GUIDED_CHANNEL_MULT)}")
    return dict(
        num_classes=NUM_CLASSES,
        pool=_POOLS[f["classifier_pool"]],
        **_trunk_fields(f["classifier_width"], _GUIDED_CHANNEL_MULT[size], size, f["classifier_attention_resolutions"],
                        ("classifier_width", "channel_mult")),
        num_res_blocks=f["classifier_depth"],
        num_heads=1,
        num_head_channels=_CLASSIFIER_HEAD_CHANNELS,
        dropout=0.0,
        resblock_updown=f["classifier_resblock_updown"],
        scale_shift_norm=f["classifier_use_scale_shift_norm"],
        **_ADM_FIELDS,
        **_time_scale(f),
    )


# ---------------------------------------------------------------------------
# State-dict names -> jdiff param paths
# ---------------------------------------------------------------------------


def _dense(path: str, key: str, layout=linear) -> list[Rule]:
    """A conv / linear layer: ``key.weight`` -> ``path/kernel``, ``key.bias`` -> ``path/bias``."""
    return [Rule(f"{path}/kernel", f"{key}.weight", layout), Rule(f"{path}/bias", f"{key}.bias", copy)]


def _norm(path: str, key: str) -> list[Rule]:
    return [Rule(f"{path}/scale", f"{key}.weight", copy), Rule(f"{path}/bias", f"{key}.bias", copy)]


def _resblock(path: str, key: str, in_ch: int, out_ch: int) -> list[Rule]:
    """ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, linear],
    out_layers = [GroupNorm, SiLU, Dropout, conv], skip_connection (1x1 conv iff the width changes)."""
    rules = (_norm(f"{path}/norm1", f"{key}.in_layers.0") + _dense(f"{path}/conv1", f"{key}.in_layers.2", conv)
             + _dense(f"{path}/temb_proj", f"{key}.emb_layers.1")
             + _norm(f"{path}/norm2", f"{key}.out_layers.0") + _dense(f"{path}/conv2", f"{key}.out_layers.3", conv))
    if in_ch != out_ch:
        rules += _dense(f"{path}/nin_shortcut", f"{key}.skip_connection", conv)
    return rules


def _heads(fields: Mapping[str, Any], channels: int) -> int:
    """The heads of an attention block over ``channels`` (fixed width or fixed count)."""
    from jdiff.models.layers import heads_for

    try:
        return heads_for(channels, fields["num_heads"], fields.get("num_head_channels"))
    except ValueError as e:
        raise ConversionError(f"flags: attention over {channels} channels: {e}") from None


def _has_attention(fields: Mapping[str, Any], image_size: int, level: int) -> bool:
    return image_size // 2**level in tuple(fields["attention_resolutions"])


def _columns(index: np.ndarray, width: int) -> Callable[[np.ndarray], np.ndarray]:
    """Take the ``index`` columns of a fused [..., width] tensor (checked first: a wider tensor
    would otherwise yield a well-shaped, wrong part)."""

    def select(a: np.ndarray) -> np.ndarray:
        if a.shape[-1] != width:
            raise ValueError(f"expected {width} fused q, k, v channels, got {a.shape[-1]}")
        return a[..., index]

    return select


def _qkv_columns(channels: int, heads: int, new_order: bool) -> dict[str, np.ndarray]:
    """Which outputs of the fused 1x1 qkv conv ([3C] channels) are jdiff's q, k and v, each laid
    out as jdiff's heads are (head h = channels [h d, (h + 1) d), d = C / heads).

    QKVAttention (new order) chunks [q | k | v] first, then views each as heads;
    QKVAttentionLegacy views the 3C channels as heads first: head h owns [3 h d, 3 (h + 1) d),
    q its first d channels, k the next d, v the last d."""
    d = channels // heads
    if new_order:
        return {name: np.arange(i * channels, (i + 1) * channels) for i, name in enumerate("qkv")}
    first = (3 * d * np.arange(heads)[:, None] + np.arange(d)[None, :]).reshape(-1)
    return {name: first + i * d for i, name in enumerate("qkv")}


def _attention(path: str, key: str, channels: int, heads: int, new_order: bool) -> list[Rule]:
    """AttentionBlock: norm, qkv (a 1x1 conv1d to 3C, split into jdiff's q, k, v), proj_out."""
    rules = _norm(f"{path}/norm", f"{key}.norm")
    for name, index in _qkv_columns(channels, heads, new_order).items():
        rules += [Rule(f"{path}/{name}/kernel", f"{key}.qkv.weight", linear, _columns(index, 3 * channels)),
                  Rule(f"{path}/{name}/bias", f"{key}.qkv.bias", copy, _columns(index, 3 * channels))]
    return rules + _dense(f"{path}/proj_out", f"{key}.proj_out")


def _encoder(fields: Mapping[str, Any], image_size: int, new_order: bool,
             class_embedding: bool) -> tuple[list[Rule], list[int], int]:
    """time_embed, label_emb (with ``class_embedding``), input_blocks, middle_block ->
    ``encoder/...`` (UNetModel.__init__'s walk: one input block per residual block, with its
    attention, and one per downsampling). Returns (rules, the skip connections' widths, the
    middle block's width)."""
    base, mult, nrb = fields["base_channels"], tuple(fields["channel_mult"]), fields["num_res_blocks"]
    rules = _dense("encoder/time_embed/dense0", "time_embed.0") + _dense("encoder/time_embed/dense1", "time_embed.2")
    if class_embedding:
        rules.append(Rule("encoder/class_embed/embedding", "label_emb.weight", copy, pad_rows=1))
    rules += _dense("encoder/conv_in", "input_blocks.0.0", conv)
    ch, skips, block = base, [base], 1
    for level, m in enumerate(mult):
        for i in range(nrb):
            key = f"input_blocks.{block}"
            rules += _resblock(f"encoder/down_{level}_block_{i}", f"{key}.0", ch, base * m)
            ch = base * m
            if _has_attention(fields, image_size, level):
                rules += _attention(f"encoder/down_{level}_attn_{i}", f"{key}.1", ch, _heads(fields, ch), new_order)
            skips.append(ch)
            block += 1
        if level != len(mult) - 1:
            key, path = f"input_blocks.{block}.0", f"encoder/down_{level}_downsample"
            if fields["resblock_updown"]:
                rules += _resblock(path, key, ch, ch)
            elif fields.get("conv_resample", True):
                rules += _dense(f"{path}/conv", f"{key}.op", conv)
            skips.append(ch)
            block += 1
    rules += _resblock("encoder/mid_block_1", "middle_block.0", ch, ch)
    rules += _attention("encoder/mid_attn", "middle_block.1", ch, _heads(fields, ch), new_order)
    rules += _resblock("encoder/mid_block_2", "middle_block.2", ch, ch)
    return rules, skips, ch


def unet_rules(fields: Mapping[str, Any], image_size: int, new_attention_order: bool = False) -> list[Rule]:
    """The rules that fill a jdiff UNet with ``fields`` (:func:`unet_fields`) from a
    ``UNetModel`` state dict: the encoder (time_embed, label_emb, input_blocks, middle_block),
    then output_blocks (per level, deepest first, ``num_res_blocks + 1`` blocks on [h, skip],
    each with its attention; the last block of every level but the first ends with the
    upsampling) and ``out`` = [GroupNorm, SiLU, conv]."""
    rules, skips, ch = _encoder(fields, image_size, new_attention_order, fields.get("num_classes") is not None)
    base, mult, nrb = fields["base_channels"], tuple(fields["channel_mult"]), fields["num_res_blocks"]
    block = 0
    for level in reversed(range(len(mult))):
        has_attn = _has_attention(fields, image_size, level)
        for i in range(nrb + 1):
            key = f"output_blocks.{block}"
            rules += _resblock(f"decoder/up_{level}_block_{i}", f"{key}.0", ch + skips.pop(), base * mult[level])
            ch = base * mult[level]
            layer = 1
            if has_attn:
                rules += _attention(f"decoder/up_{level}_attn_{i}", f"{key}.1", ch, _heads(fields, ch),
                                    new_attention_order)
                layer = 2
            if level and i == nrb:
                path = f"decoder/up_{level}_upsample"
                if fields["resblock_updown"]:
                    rules += _resblock(path, f"{key}.{layer}", ch, ch)
                elif fields.get("conv_resample", True):
                    rules += _dense(f"{path}/conv", f"{key}.{layer}.conv", conv)
            block += 1
    return rules + _norm("decoder/norm_out", "out.0") + _dense("decoder/conv_out", "out.2", conv)


def classifier_rules(fields: Mapping[str, Any], image_size: int, new_attention_order: bool = False) -> list[Rule]:
    """The rules that fill a jdiff NoiseAwareClassifier with ``fields``
    (:func:`classifier_fields`) from an ``EncoderUNetModel`` state dict: the encoder, then
    ``out`` = [GroupNorm, SiLU, AttentionPool2d] (positional_embedding [C, HW + 1] transposed,
    qkv_proj and c_proj 1x1 conv1ds; its QKVAttention splits [q | k | v] before the heads, as
    jdiff's AttentionPool2d does) or [GroupNorm, SiLU, AdaptiveAvgPool2d, 1x1 conv, Flatten]."""
    rules, _, _ = _encoder(fields, image_size, new_attention_order, class_embedding=False)
    rules += _norm("norm_out", "out.0")
    if fields["pool"] == "attention":
        # A [C, HW + 1] matrix transposed like a linear weight.
        rules += [Rule("attention_pool/positional_embedding", "out.2.positional_embedding", linear)]
        rules += _dense("attention_pool/qkv", "out.2.qkv_proj") + _dense("attention_pool/proj", "out.2.c_proj")
    else:
        rules += _dense("head", "out.3")
    return rules


# ---------------------------------------------------------------------------
# Process
# ---------------------------------------------------------------------------


def diffusion_settings(flags: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(diffusion, sample)`` config sections reproducing ``create_gaussian_diffusion(flags)``
    and the scripts' sampling (``clip_denoised=True``; ``timestep_respacing`` N -> ``steps``)."""
    f = flags
    T = f["diffusion_steps"]
    diffusion: dict[str, Any] = {"process": "vp", "num_timesteps": T, "schedule": f["noise_schedule"]}
    if f["noise_schedule"] == "linear":
        scale = 1000 / T
        diffusion.update(beta_start=scale * 0.0001, beta_end=scale * 0.02)
    diffusion["parameterization"] = "x0" if f["predict_xstart"] else "eps"
    if f["learn_sigma"]:
        diffusion["variance"] = "learned_range"
    else:
        diffusion["variance"] = "fixed_small" if f["sigma_small"] else "fixed_large"
    sample: dict[str, Any] = {"clip": True}
    if f["timestep_respacing"]:
        sample.update(method="ddpm", steps=int(f["timestep_respacing"]))
    return diffusion, sample


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _state_from(checkpoint: Any) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        return read_state_dict(path), path
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"checkpoint: expected a file path or a state dict (name -> tensor), "
                              f"got {type(checkpoint).__name__}")
    return state_arrays(checkpoint, "checkpoint"), "state dict"


def from_openai(checkpoint: Union[str, os.PathLike, Mapping[str, Any]], flags: FlagsLike = None, kind: str = "model",
                codebase: str = "guided-diffusion") -> Imported:
    """Load an OpenAI improved / guided-diffusion checkpoint into jdiff's network.

    Args:
      checkpoint: a ``.pt`` file (``model.state_dict()`` as the scripts save it; read as weights
        only), a ``.safetensors`` file, or the state dict itself (name -> tensor or array).
      flags: the flags the checkpoint was built with (see :func:`parse_flags`), e.g. guided
        diffusion's 256x256 conditional model: ``"--attention_resolutions 32,16,8 --class_cond
        True --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear
        --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True
        --use_fp16 True --use_scale_shift_norm True"``.
      kind: "model" (``UNetModel`` -> jdiff ``"unet"``) or "classifier" (``EncoderUNetModel`` ->
        jdiff ``"classifier"``; guided-diffusion only).
      codebase: "guided-diffusion" or "improved-diffusion" (whose flags and defaults differ).
    Returns:
      An :class:`~jdiff.convert.common.Imported`: image_shape ``(image_size, image_size, 3)``;
      the diffusion section of :func:`diffusion_settings` (for a classifier only the noise
      schedule it was trained on); source ``{"format": "openai", "codebase", "kind", "path",
      "flags"}`` with the resolved flags. A class-conditional U-Net takes ``cond["label"]``
      (ImageNet class ids in [0, 1000)); jdiff's null class 1000 is a zero embedding row
      (OpenAI trained no unconditional model, so classifier-free guidance with it means
      nothing: guide with the converted classifier instead).
    Raises:
      ConversionError (a ValueError) for an argument, flag or value the converter does not take,
      a file that cannot be read, and keys of the state dict that are missing, unexpected or
      mis-shaped for the network the flags describe, each named; before anything is compiled.
    """
    from jdiff import models

    if kind not in KINDS:
        raise ConversionError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind == "classifier" and codebase != "guided-diffusion":
        raise ConversionError(f"kind: 'classifier' needs codebase 'guided-diffusion' (improved-diffusion has no "
                              f"classifier), got codebase {codebase!r}")
    resolved = parse_flags(flags, codebase)
    image_size = resolved["image_size"]
    if kind == "model":
        name, fields = "unet", unet_fields(resolved)
        rules = unet_rules(fields, image_size, resolved["use_new_attention_order"])
    else:
        name, fields = "classifier", classifier_fields(resolved)
        rules = classifier_rules(fields, image_size)
    image_shape = (image_size, image_size, 3)
    state, source = _state_from(checkpoint)
    first = state.get("input_blocks.0.0.weight")
    if first is not None and np.ndim(first) == 4 and first.shape[1] == 6:
        raise ConversionError(f"{source}: input_blocks.0.0.weight has 6 input channels (shape {first.shape}): a "
                              "SuperResModel (x and the upsampled low-resolution image), which is not supported")
    try:
        template = template_of(models.build(name, fields), image_shape)
    except ValueError as e:
        raise ConversionError(f"flags: jdiff refuses the network they describe: {e}") from None
    params = apply_rules(state, rules, template, source)
    diffusion, sample = diffusion_settings(resolved)
    if kind == "classifier":  # only the noise levels it was trained on matter
        diffusion = {k: v for k, v in diffusion.items() if k in ("process", "num_timesteps", "schedule", "beta_start",
                                                                 "beta_end")}
        sample = {}
    return Imported(
        model_name=name,
        model=fields,
        params=params,
        image_shape=image_shape,
        diffusion=diffusion,
        sample=sample,
        source={"format": "openai", "codebase": codebase, "kind": kind, "path": source, "flags": resolved},
    )
