"""Sample from a trained workdir.

python -m launch.sample --workdir workdirs/digits --num 64 --out samples.png
python -m launch.sample --workdir workdirs/digits --num 64 --out samples.npz --label 3 --guidance 2.0
python -m launch.sample --workdir workdirs/tiny_sr --num 4 --out sr.png --cond_image low_res.png
python -m launch.sample --workdir workdirs/digits --num 16 --out edit.png --sdedit guide.png --t0 400
python -m launch.sample --workdir workdirs/digits --num 16 --out fill.png --repaint img.png --mask mask.png
python -m launch.sample --workdir workdirs/digits_inpaint --num 16 --out fill.png --inpaint img.png --mask mask.png
python -m launch.sample --workdir workdirs/fm_base14 --sr_workdir workdirs/fm_sr --aug_level 0.1 --label 3 --num 64 --out x.png
python -m launch.sample --workdir workdirs/fm_sr --low_res img14.png --out up.png
python -m launch.sample --workdir workdirs/adm64 --classifier_workdir workdirs/adm64_clf --classifier_scale 1 --label 207 --out x.png
python -m launch.sample --workdir workdirs/shapes_text --prompt "a large red disc at the top left" --guidance 3 --out x.png
python -m launch.sample --workdir workdirs/unclip_decoder --prior_workdir workdirs/unclip_prior --prompt "a red disc at the top left" --out x.png

Cascades (jdiff.cascade; Ho et al. 2022, CDM): --workdir is the base stage and each --sr_workdir
a super-resolution stage (a workdir trained with data.transform='super_resolution', e.g.
configs/fashion_mnist_sr.py), run in order with one key and the same --label per sample.
--aug_level a in [0, 1] is the conditioning-augmentation level of the SR stages (one value for
all, or one per --sr_workdir; default: each SR config's sample.aug_level): the stage below's
output is noised to timestep round(a T) - 1 before it is upsampled (--aug_mode non_truncated),
or the stage below stops its reverse process there (--aug_mode truncated). --method / --steps
/ --guidance set the base stage's sampler, --sr_method / --sr_steps / --sr_guidance the SR
stages' (default: their configs). --low_res IMG with an SR workdir as --workdir upsamples a
given image (.png or .npz with "image" [h, w, C] or [N, h, w, C] in [-1, 1]) of exactly the
SR model's input size. A base whose output size is not the SR model's input, an SR workdir of
another kind, or a level outside [0, 1] is an error before anything is loaded.

Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2): --classifier_workdir C --classifier_scale s
guides every step towards --label (default: class-balanced over the classifier's classes) with
a noise-aware classifier: a launch.train_classifier workdir or an OpenAI classifier imported with
launch.convert --kind classifier. It must see the model's image size and noise schedule; with a
class-conditional model the labels are the model's too (and --guidance adds classifier-free
guidance on top), with an unconditional one they are the classifier's alone.

Text to image (GLIDE / LDM; jdiff.models.TextUNet): --prompt "..." (repeat for several; they
cycle over the samples) in the vocabulary of the model's dataset; --guidance w is classifier-free
guidance against the empty caption. --clip_workdir C --clip_guidance s adds GLIDE's CLIP guidance
with a noised CLIP (launch.train_clip --noised) of the same image size and schedule; it also
steers a model without text conditioning. An empty prompt, an unknown word, a prompt longer
than the tokenizer allows, or a prompt for a model that cannot read it is an error before
anything is loaded.

unCLIP (Ramesh et al. 2022; jdiff.unclip): --workdir DECODER --prior_workdir PRIOR --prompt "..."
maps the caption to a CLIP text embedding, samples an image embedding with the prior
(--prior_guidance, default its config's) and the image with the decoder (--guidance); both
stages use their configs' samplers and must embed with the same CLIP.

--adapter FILE samples an adaptation (the adapter.msgpack launch.train / launch.finetune write in a
LoRA, ControlNet or DreamBooth workdir: its trained params alone) on the base model --workdir.

ControlNet (jdiff.controlnet; Zhang et al. 2023): a workdir trained with model_name='controlnet'
(configs/fashion_mnist_controlnet.py) needs --control, its control image: a .png (grey levels
/ 255, so white = 1) or .npz "image" [H, W, Cc] or [N, H, W, Cc] in [0, 1], of exactly the
model's size and control channels (e.g. a Canny edge map). --control_scale s multiplies the
ControlNet's residuals (0: the base model). --control_workdir adds ControlNets trained on the
same base, summed (one --control each, in order: --workdir's first; one --control_scale for
all or one each). --guidance guides the label; the control steers both halves.

Editing (jdiff.editing, one device): --sdedit GUIDE --t0 N noises the guide to timestep N and
denoises it with --method / --steps (default: the config's sampler at its density of steps);
--repaint IMG --mask MASK keeps the mask's white (1) pixels and fills the rest with RePaint's
resampling (--jump_length, --jump_n_sample; --steps reverse steps); --inpaint IMG --mask MASK
completes the image with a mask-channel inpainting model (a workdir trained with
data.transform='inpaint', e.g. configs/digits_inpaint.py; sharded like plain sampling) and
puts the known pixels back exactly. Edits sample the null class unless --label is given. Images
must have the model's size; a wrong size, a t0 outside [0, T) or a non-binary mask is an error
before anything is loaded.

--out FILE.png writes a grid; FILE.npz writes the raw float32 array "samples" [N, H, W, C] in
[-1, 1] (and "labels" for conditional models). Uses the EMA params of the newest checkpoint.

Class-conditional models sample class-balanced labels by default (one class per grid row when
--num is a multiple of the number of classes); --label picks classes, --null_label samples the
null class (the unconditional model learnt by label dropout). A model conditioned on an image
(config.model.image_channels > 0) needs --cond_image: a .png (converted to the model's channels)
or a .npz with an "image" array [H, W, C] or [N, H, W, C] in [-1, 1]; an image of another size
is resized bilinearly to the sample size (so a low-resolution image works as it is).

Each batch is split over all devices (of all processes, with --coordinator / --num_processes /
--process_id as for launch.train; process 0 writes --out); for the same --seed and
--batch_size the array is the same whatever the number of devices, e.g. with
XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU. Logging as launch.train
(--verbosity, --log_dir).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jdiff import images, latent, parallel, samplers
from jdiff.data import captions
from jdiff.inference import balanced_labels, generate
from jdiff.train import clip as clip_lib
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.workdir import load_for_sampling
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_OUT = flags.DEFINE_string("out", "samples.png", "Output .png (grid) or .npz (raw arrays).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_LABEL = flags.DEFINE_multi_integer("label", None, "Class label(s); repeated labels cycle over the samples "
                                    "(default: class-balanced labels).")
_NULL_LABEL = flags.DEFINE_bool("null_label", False, "Sample the null class of a class-conditional model "
                                "(unconditional samples) instead of class-balanced labels.")
_COND_IMAGE = flags.DEFINE_string("cond_image", None, "cond['image'] of an image-conditioned model: a .png, or a .npz "
                                  "with 'image' [H, W, C] or [N, H, W, C] in [-1, 1].")
_SDEDIT = flags.DEFINE_string("sdedit", None, "SDEdit (Meng et al. 2022): a guide image .png or .npz ('image' "
                              "[H, W, C] or [N, H, W, C] in [-1, 1]) noised to --t0, then denoised.")
_T0 = flags.DEFINE_integer("t0", None, "SDEdit's starting timestep in [0, T) (0-indexed): small stays faithful, large realistic.")
_REPAINT = flags.DEFINE_string("repaint", None, "RePaint (Lugmayr et al. 2022): the image (.png or .npz) whose --mask "
                               "pixels are kept; the rest is filled.")
_INPAINT = flags.DEFINE_string("inpaint", None, "An inpainting model's input (.png or .npz; a workdir trained with "
                                "data.transform='inpaint'): its --mask pixels are kept, the rest completed.")
_MASK = flags.DEFINE_string("mask", None, "RePaint's or --inpaint's mask (.png: white = known; .npz 'image' of 0/1), [H, W] or "
                            "[H, W, 1] or [N, H, W, 1].")
_JUMP_LENGTH = flags.DEFINE_integer("jump_length", 10, "RePaint's jump length j.")
_JUMP_N_SAMPLE = flags.DEFINE_integer("jump_n_sample", 10, "RePaint's resampling count r (1: plain replacement).")
_SR_WORKDIR = flags.DEFINE_multi_string("sr_workdir", None, "A super-resolution stage's workdir (repeat for more "
                                        "stages): a cascade on top of the --workdir base.")
_LOW_RES = flags.DEFINE_string("low_res", None, "Upsample this image (.png or .npz 'image' [h, w, C] or [N, h, w, C] in "
                               "[-1, 1]) with the super-resolution model of --workdir.")
_AUG_LEVEL = flags.DEFINE_multi_float("aug_level", None, "SR conditioning-augmentation level in [0, 1] (a fraction of "
                                      "the schedule): one for every SR stage or one per --sr_workdir.")
_AUG_MODE = flags.DEFINE_enum("aug_mode", "non_truncated", ["non_truncated", "truncated"],
                              "Noise the stage below's sample (non_truncated) or stop its reverse process at the level.")
_SR_METHOD = flags.DEFINE_string("sr_method", None, "The SR stages' sampler (default: each SR config's).")
_SR_STEPS = flags.DEFINE_integer("sr_steps", None, "The SR stages' network calls (default: each SR config's).")
_SR_GUIDANCE = flags.DEFINE_float("sr_guidance", None, "The SR stages' classifier-free guidance weight (default: each "
                                  "SR config's sample.guidance).")
_CONTROL = flags.DEFINE_multi_string("control", None, "A ControlNet's control image: .png (grey / 255) or .npz 'image' "
                                     "[H, W, Cc] or [N, H, W, Cc] in [0, 1]; one per ControlNet.")
_CONTROL_SCALE = flags.DEFINE_multi_float("control_scale", None, "Control strength: one for all ControlNets or one "
                                          "each (default 1).")
_CONTROL_WORKDIR = flags.DEFINE_multi_string("control_workdir", None, "More ControlNet workdirs trained on --workdir's "
                                             "base, composed with it (their residuals summed).")
_ADAPTER = flags.DEFINE_string("adapter", None, "An adapter file (adapter.msgpack of a LoRA / ControlNet / DreamBooth "
                                "workdir): sample it on the base --workdir.")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w >= 0.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A text model's caption (repeat for more; they cycle over the "
                                    "samples), in the vocabulary of its dataset (jdiff.data.captions).")
_CLIP_WORKDIR = flags.DEFINE_string("clip_workdir", None, "CLIP guidance (GLIDE, Nichol et al. 2022): a noised CLIP "
                                    "workdir (launch.train_clip --noised) of the model's image size and schedule.")
_PRIOR_WORKDIR = flags.DEFINE_string("prior_workdir", None, "unCLIP (Ramesh et al. 2022): the prior's workdir "
                                     "(configs/shapes_unclip_prior.py), with the decoder's as --workdir and --prompt.")
_PRIOR_GUIDANCE = flags.DEFINE_float("prior_guidance", None, "unCLIP: the prior's classifier-free guidance weight "
                                     "(default: its config's); --guidance is the decoder's.")
_CLIP_GUIDANCE = flags.DEFINE_float("clip_guidance", None, "CLIP guidance scale s > 0 (with --clip_workdir and --prompt).")
_CLASSIFIER_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Classifier guidance (Dhariwal & Nichol 2021): a "
                                          "noise-aware classifier's workdir (launch.train_classifier, or an OpenAI "
                                          "classifier imported with launch.convert --kind classifier).")
_CLASSIFIER_SCALE = flags.DEFINE_float("classifier_scale", None, "Classifier guidance scale s > 0 (with "
                                       "--classifier_workdir; ADM's ImageNet samples use 1 to 10).")
_METHOD = flags.DEFINE_string("method", None, "A registered sampler (jdiff.samplers.available()): ddpm | ddim | "
                              "euler_maruyama | ode | dpm_solver++ | euler | heun | heun_churn (default: config).")
_STEPS = flags.DEFINE_integer("steps", None, "Network calls (default: config).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: config).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Samples per compiled batch (default: config).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run, or 'auto' (default: JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default: JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes) (default: JAX_PROCESS_ID).")


def _read_png(path: str, mode: str, flag: str) -> np.ndarray:
    """The image at ``path`` converted to PIL ``mode``, as float32 [H, W(, C)] in [0, 255]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), np.float32)
    except OSError as e:  # PIL.UnidentifiedImageError and truncated or unreadable files
        raise app.UsageError(f"{flag}: cannot read {path!r} as a PNG image ({e}); expected a readable .png file") from None


def _read_image_file(path: str, channels: int, flag: str) -> tuple[np.ndarray, bool]:
    """``(x, from_png)``: a .png (converted to ``channels``, grey levels in [0, 255]) or a .npz's
    "image" array (its only array if unnamed), as float32 with a leading batch axis when it had
    none. NumPy only, so it runs before jax.distributed is initialised."""
    if not os.path.exists(path):
        raise app.UsageError(f"{flag}: {path!r} does not exist")
    if path.endswith(".png"):
        x = _read_png(path, "L" if channels == 1 else "RGB", flag)
        x = x[..., None] if x.ndim == 2 else x
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            if "image" in npz.files:
                x = npz["image"]
            elif len(npz.files) == 1:
                x = npz[npz.files[0]]
            else:
                raise app.UsageError(f"{flag}: {path!r} holds {npz.files}; expected an array named 'image'")
        x = np.asarray(x, np.float32)
    else:
        raise app.UsageError(f"{flag}: expected a .png or .npz path, got {path!r}")
    return (x[None] if x.ndim == 3 else x), path.endswith(".png")


def load_cond_image(path: str, num: int, channels: int, flag: str = "--cond_image") -> np.ndarray:
    """``--cond_image`` (or another image ``flag``) as [1 or num, h, w, channels] float32 in
    [-1, 1] (NumPy only, so it runs before jax.distributed is initialised)."""
    x, from_png = _read_image_file(path, channels, flag)
    if from_png:
        x = x / 127.5 - 1.0
    elif not np.all(np.isfinite(x)) or x.min() < -1 or x.max() > 1:
        raise app.UsageError(f"{flag}: expected finite values in [-1, 1], got range [{x.min()}, {x.max()}]")
    if x.ndim != 4 or x.shape[0] not in (1, num) or x.shape[-1] != channels:
        raise app.UsageError(f"{flag}: expected [H, W, {channels}] or [1 or {num}, H, W, {channels}] "
                             f"(config.model.image_channels={channels}, --num={num}), got shape {x.shape}")
    return x.astype(np.float32)


def resize_cond_image(x: np.ndarray, num: int, image_shape: tuple) -> np.ndarray:
    """[1 or num, h, w, C] -> [num, H, W, C], resized as the "downsample_image" transform upsamples
    (jax.image.resize, bilinear). A JAX computation: call after jax.distributed is initialised."""
    h, w = image_shape[:2]
    if x.shape[1:3] != (h, w):
        x = np.asarray(jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "bilinear"))
    return np.broadcast_to(x, (num, h, w, x.shape[-1])).astype(np.float32)


def _image_shape(cfg) -> tuple:
    from jdiff import data as data_lib

    return data_lib.image_shape_of(cfg.data)


def _load_edit_image(cfg, shape, flag: str, path: str) -> np.ndarray:
    image = load_cond_image(path, _NUM.value, shape[-1], flag)
    if image.shape[1:3] != shape[:2]:
        raise app.UsageError(f"{flag}: expected an image of the model's size {shape[0]}x{shape[1]}, got {image.shape[1]}x{image.shape[2]}")
    return np.broadcast_to(image, (_NUM.value,) + image.shape[1:]).astype(np.float32)


def _load_mask(shape, flag: str) -> np.ndarray:
    """--mask as [1 or num, H, W, 1] of 0/1 (.png: white = known; .npz 'image' of 0/1)."""
    if not _MASK.value:
        raise app.UsageError(f"--mask: {flag} needs a mask (white / 1 = known)")
    if _MASK.value.endswith(".png"):  # white = known
        if not os.path.exists(_MASK.value):
            raise app.UsageError(f"--mask: {_MASK.value!r} does not exist")
        mask = (_read_png(_MASK.value, "L", "--mask") > 127).astype(np.float32)[None, ..., None]
    else:
        mask = load_cond_image(_MASK.value, _NUM.value, 1, "--mask")
    if mask.shape[1:3] != shape[:2] or not np.all((mask == 0) | (mask == 1)):
        raise app.UsageError(f"--mask: expected a 0/1 mask of the model's size {shape[0]}x{shape[1]}, got shape "
                             f"{mask.shape[1:3]} with values {np.unique(mask)[:4]}")
    return mask


def _check_edit_flags(cfg, model):
    """The --sdedit / --repaint / --inpaint request, checked against the workdir's config before
    anything is loaded or compiled: (kind, image [num, H, W, C], t0 or mask [num or 1, H, W, 1])."""
    given = [f for f, v in (("--sdedit", _SDEDIT.value), ("--repaint", _REPAINT.value), ("--inpaint", _INPAINT.value)) if v]
    if len(given) > 1:
        raise app.UsageError(f"{', '.join(given)}: expected at most one of them")
    if _T0.value is not None and not _SDEDIT.value:
        raise app.UsageError("--t0: only with --sdedit")
    if _MASK.value and not (_REPAINT.value or _INPAINT.value):
        raise app.UsageError("--mask: only with --repaint or --inpaint")
    if _INPAINT.value:
        shape = _image_shape(cfg)
        if cfg.data.get("transform", "") != "inpaint" or (getattr(model, "image_channels", 0) or 0) != shape[-1] + 1:
            raise app.UsageError(
                f"--inpaint: expected a workdir of an inpainting model (data.transform='inpaint', model.image_channels="
                f"{shape[-1] + 1}), got data.transform={cfg.data.get('transform', '')!r}, model.image_channels="
                f"{getattr(model, 'image_channels', 0)}; use --repaint with a plain model")
        if _COND_IMAGE.value:
            raise app.UsageError("--cond_image: --inpaint makes the conditioning from the image and --mask; expected no --cond_image")
        image = _load_edit_image(cfg, shape, "--inpaint", _INPAINT.value)
        return "inpaint", image, _load_mask(shape, "--inpaint")
    if not (_SDEDIT.value or _REPAINT.value):
        return None
    if cfg.diffusion.get("process", "vp") != "vp":
        raise app.UsageError(f"--sdedit/--repaint: expected a model on the discrete schedule (diffusion.process='vp'), "
                             f"got process={cfg.diffusion.process!r}")
    shape = _image_shape(cfg)
    flag, path = ("--sdedit", _SDEDIT.value) if _SDEDIT.value else ("--repaint", _REPAINT.value)
    image = _load_edit_image(cfg, shape, flag, path)
    if _SDEDIT.value:
        T = int(cfg.diffusion.num_timesteps)
        if _T0.value is None or not 0 <= _T0.value < T:
            raise app.UsageError(f"--t0: expected a timestep in [0, {T}) (0-indexed) with --sdedit, got {_T0.value}")
        return "sdedit", image, _T0.value
    mask = _load_mask(shape, "--repaint")
    if _JUMP_LENGTH.value < 1 or _JUMP_N_SAMPLE.value < 1:
        raise app.UsageError(f"--jump_length, --jump_n_sample: expected positive ints, got {_JUMP_LENGTH.value}, "
                             f"{_JUMP_N_SAMPLE.value}")
    return "repaint", image, mask


def _run_edit(edit, loaded, labels, cond, g, method, steps, eta, cfg) -> np.ndarray:
    """SDEdit or RePaint on the whole batch (one device): jdiff.editing with the workdir's model."""
    from jdiff import editing
    from jdiff.inference import model_fn_for

    kind, image, extra = edit
    fn = model_fn_for(loaded.model, loaded.params, None if labels is None else np.asarray(labels, np.int32), g,
                      cond={k: jnp.asarray(v) for k, v in cond.items()} or None)
    kw = dict(parameterization=cfg.diffusion.parameterization, clip=cfg.sample.clip or None)
    if kind == "sdedit":
        x = editing.sdedit(fn, loaded.schedule, image, extra, jax.random.key(_SEED.value), method=method, steps=steps,
                           **({"eta": eta} if eta is not None else {}), variance=cfg.diffusion.variance, **kw)
    else:
        x = editing.repaint(fn, loaded.schedule, image, extra, jax.random.key(_SEED.value), steps=steps,
                            jump_length=_JUMP_LENGTH.value, jump_n_sample=_JUMP_N_SAMPLE.value,
                            method=method if _METHOD.value else "ddpm", variance=cfg.diffusion.variance, **kw)
    return np.clip(np.asarray(x), -1.0, 1.0)


def _check_sampler_flags(cfg, edit) -> None:
    """--method, --steps and --eta against the sampler registry and the workdir's
    config, before any checkpoint is read (the library would say the same, but only later)."""
    if _METHOD.value is not None and _METHOD.value not in samplers.available():
        raise app.UsageError(f"--method: expected a registered sampler, one of {samplers.available()}, got {_METHOD.value!r}")
    steps = _STEPS.value
    if steps is not None:
        if cfg.diffusion.get("process", "vp") == "vp":
            if edit is not None and edit[0] == "sdedit":
                top, what = edit[2] + 1, f"the timesteps up to --t0={edit[2]}"
            else:
                top, what = int(cfg.diffusion.num_timesteps), "config.diffusion.num_timesteps of the workdir"
            if not 1 <= steps <= top:
                raise app.UsageError(f"--steps: expected an int in [1, {top}] ({what}), got {steps}")
        elif steps < 1:
            raise app.UsageError(f"--steps: expected a positive number of steps, got {steps}")
    if _ETA.value is not None and not (np.isfinite(_ETA.value) and _ETA.value >= 0):
        raise app.UsageError(f"--eta: expected a finite float >= 0, got {_ETA.value}")


def _sr_factor(cfg) -> int | None:
    """The factor of a super-resolution workdir's config, None if it is not one."""
    if cfg.data.get("transform", "") != "super_resolution":
        return None
    return int(cfg.data.get("transform_kwargs", {}).get("factor", 2))


def _check_cascade_flags(base_cfg, base_model):
    """The cascade / --low_res request against the workdirs' configs, before anything is loaded:
    (SR configs, aug levels, the --low_res image or None)."""
    sr_dirs = list(_SR_WORKDIR.value or [])
    others = [f for f, v in (("--sdedit", _SDEDIT.value), ("--repaint", _REPAINT.value), ("--inpaint", _INPAINT.value),
                             ("--cond_image", _COND_IMAGE.value)) if v]
    if sr_dirs and _LOW_RES.value:
        raise app.UsageError("--low_res, --sr_workdir: expected one of them (--low_res upsamples with the SR model of "
                             "--workdir; --sr_workdir stacks SR stages on the base model of --workdir)")
    if others:
        raise app.UsageError(f"{', '.join(others)}: not with {'--low_res' if _LOW_RES.value else '--sr_workdir'}")
    stage_cfgs = [base_cfg] + [common.load_workdir_config(d) for d in sr_dirs] if sr_dirs else [base_cfg]
    names = ["--workdir"] + [f"--sr_workdir {d}" for d in sr_dirs]
    sr_cfgs = stage_cfgs[1:] if sr_dirs else [base_cfg]
    sr_names = names[1:] if sr_dirs else ["--workdir"]
    for c, name in zip(sr_cfgs, sr_names):
        if _sr_factor(c) is None or c.diffusion.get("process", "vp") != "vp":
            raise app.UsageError(f"{name}: expected a super-resolution workdir (data.transform='super_resolution' on the "
                                 f"discrete schedule, e.g. configs/fashion_mnist_sr.py), got data.transform="
                                 f"{c.data.get('transform', '')!r}, diffusion.process={c.diffusion.get('process', 'vp')!r}")
    if sr_dirs and base_cfg.diffusion.get("process", "vp") != "vp":
        raise app.UsageError(f"--workdir: a cascade's base is on the discrete schedule (diffusion.process='vp'), "
                             f"got {base_cfg.diffusion.process!r}")
    if sr_dirs and _sr_factor(base_cfg) is not None:
        raise app.UsageError("--workdir: expected a base model (no low-resolution input); got a super-resolution workdir "
                             "(use it as --sr_workdir, or alone with --low_res)")
    levels = list(_AUG_LEVEL.value or [])
    if levels and len(levels) not in (1, len(sr_cfgs)):
        raise app.UsageError(f"--aug_level: expected one value or one per SR stage ({len(sr_cfgs)}), got {len(levels)}")
    bad = [a for a in levels if not 0.0 <= a <= 1.0]
    if bad:
        raise app.UsageError(f"--aug_level: expected fractions of the schedule in [0, 1], got {bad}")
    if not levels:
        levels = [float(c.sample.get("aug_level", 0.0)) for c in sr_cfgs]
    levels = levels * len(sr_cfgs) if len(levels) == 1 else levels
    if _SR_METHOD.value is not None and _SR_METHOD.value not in samplers.available():
        raise app.UsageError(f"--sr_method: expected a registered sampler, one of {samplers.available()}, got {_SR_METHOD.value!r}")
    for c, name in zip(sr_cfgs, sr_names):
        if _SR_STEPS.value is not None and not 1 <= _SR_STEPS.value <= int(c.diffusion.num_timesteps):
            raise app.UsageError(f"--sr_steps: expected an int in [1, {c.diffusion.num_timesteps}] (the timesteps of "
                                 f"{name}), got {_SR_STEPS.value}")
    if _SR_GUIDANCE.value is not None and not (np.isfinite(_SR_GUIDANCE.value) and _SR_GUIDANCE.value >= 0):
        raise app.UsageError(f"--sr_guidance: expected a finite weight >= 0, got {_SR_GUIDANCE.value}")
    if _AUG_MODE.value == "truncated" and _LOW_RES.value:
        raise app.UsageError("--aug_mode: 'truncated' stops a base stage early; --low_res has none (expected non_truncated)")
    shapes = [_image_shape(c) for c in stage_cfgs]
    for i in range(1, len(stage_cfgs)):
        f, (h, w, ch) = _sr_factor(stage_cfgs[i]), shapes[i]
        want = (h // f, w // f, ch)
        if tuple(shapes[i - 1]) != want:
            raise app.UsageError(f"{names[i]}: takes {want[0]}x{want[1]}x{want[2]} images ({h}x{w} / factor {f}), but "
                                 f"{names[i - 1].split()[0]} {'makes' if i == 1 else 'stage makes'} "
                                 f"{shapes[i - 1][0]}x{shapes[i - 1][1]}x{shapes[i - 1][2]}")
    low = None
    if _LOW_RES.value:
        f, (h, w, ch) = _sr_factor(base_cfg), shapes[0]
        low = load_cond_image(_LOW_RES.value, _NUM.value, ch, "--low_res")
        if low.shape[1:3] != (h // f, w // f):
            raise app.UsageError(f"--low_res: expected an image of the SR model's input size {h // f}x{w // f} (its "
                                 f"{h}x{w} output / factor {f}), got {low.shape[1]}x{low.shape[2]}")
        low = np.broadcast_to(low, (_NUM.value,) + low.shape[1:]).astype(np.float32)
    return sr_dirs, levels, low


def _run_cascade(sr_dirs, levels, low, labels, mesh):
    """The cascade (or one SR stage on --low_res), sharded like plain sampling."""
    from jdiff import cascade

    base = load_for_sampling(_WORKDIR.value, mesh)
    sr_overrides = {k: v for k, v in (("method", _SR_METHOD.value), ("steps", _SR_STEPS.value),
                                      ("guidance", _SR_GUIDANCE.value)) if v is not None}
    base_overrides = {k: v for k, v in (("method", _METHOD.value), ("steps", _STEPS.value), ("eta", _ETA.value),
                                        ("guidance", _GUIDANCE.value)) if v is not None}
    if _BATCH.value:
        batch = _BATCH.value
    else:
        batch = base.config.sample.batch_size
    key = jax.random.key(_SEED.value)
    if low is not None:
        stage = cascade.Stage.from_loaded(base, aug_level=levels[0], **base_overrides)
        return cascade.super_resolve(stage, low, key, labels=labels, batch_size=batch, mesh=mesh), base.step
    stages = [cascade.Stage.from_loaded(base, **base_overrides)]
    for d, a in zip(sr_dirs, levels):
        stages.append(cascade.Stage.from_loaded(load_for_sampling(d, mesh), aug_level=a, **sr_overrides))
    return cascade.cascade(stages, _NUM.value, key, labels=labels, aug_mode=_AUG_MODE.value, batch_size=batch,
                           mesh=mesh), base.step


def load_control(path: str, num: int, shape: tuple, flag: str = "--control") -> np.ndarray:
    """``--control``: [1 or num, H, W, Cc] float32 in [0, 1] of exactly ``shape`` (H, W, Cc)."""
    x, from_png = _read_image_file(path, shape[-1], flag)
    x = x / 255.0 if from_png else x
    if x.ndim != 4 or x.shape[0] not in (1, num) or tuple(x.shape[1:]) != tuple(shape):
        raise app.UsageError(f"{flag}: expected a control image [{shape[0]}, {shape[1]}, {shape[2]}] (the model's size and "
                             f"control channels) or [1 or {num}, {shape[0]}, {shape[1]}, {shape[2]}], got shape {x.shape} "
                             f"from {path!r}")
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise app.UsageError(f"{flag}: expected values in [0, 1], got range [{x.min()}, {x.max()}] from {path!r}")
    return x.astype(np.float32)


def _check_control_flags(cfg, model):
    """``(control [1 or num, H, W, sum Cc], scales, [extra workdir configs])``, or None without
    --control; every flag checked against the workdirs' configs before anything loads."""
    cc = network.control_channels(model)
    controls, scales, extra = _CONTROL.value or [], _CONTROL_SCALE.value, _CONTROL_WORKDIR.value or []
    if not cc:
        if controls or scales or extra:
            raise app.UsageError(f"--control / --control_scale / --control_workdir: {_WORKDIR.value!r} is not a ControlNet "
                                 f"workdir (model_name {cfg.model_name!r}); expected one trained with model_name='controlnet'")
        return None
    if not controls:
        raise app.UsageError(f"--control: {_WORKDIR.value!r} is a ControlNet ({cc} control channel(s)); pass its control "
                             "image (.png or .npz), e.g. a Canny edge map of the model's size")
    shape = _image_shape(cfg)
    channels = [cc]
    for w in extra:
        c2 = common.load_workdir_config(w)
        m2 = network.build_model(c2)
        if cfg.model_name != "controlnet" or c2.model_name != "controlnet":
            raise app.UsageError(f"--control_workdir: {w!r} ({c2.model_name!r}) and --workdir ({cfg.model_name!r}) must "
                                 "both be plain ControlNet workdirs (model_name 'controlnet') to compose")
        if c2.get("base_workdir", "") != cfg.get("base_workdir", "") or _image_shape(c2) != shape:
            raise app.UsageError(f"--control_workdir: {w!r} adapts {c2.get('base_workdir', '')!r}, --workdir adapts "
                                 f"{cfg.get('base_workdir', '')!r}; expected ControlNets of one base")
        channels.append(network.control_channels(m2))
    if len(controls) != len(channels):
        raise app.UsageError(f"--control: expected {len(channels)} control image(s), one per ControlNet (--workdir and "
                             f"{len(extra)} --control_workdir), got {len(controls)}")
    images = [load_control(p, _NUM.value, shape[:2] + (c,)) for p, c in zip(controls, channels)]
    n = max(x.shape[0] for x in images)
    control = np.concatenate([np.broadcast_to(x, (n,) + x.shape[1:]) for x in images], axis=-1)
    if scales is not None and len(scales) not in (1, len(channels)):
        raise app.UsageError(f"--control_scale: expected 1 or {len(channels)} values, got {len(scales)}")
    if scales is not None and not all(np.isfinite(scales)):
        raise app.UsageError(f"--control_scale: expected finite values, got {scales}")
    scales = None if scales is None else (tuple(scales) * len(channels) if len(scales) == 1 else tuple(scales))
    return control, scales, extra


def _controlled(model, params, scales, extra, mesh):
    """The network and params to sample: --workdir's ControlNet (LoRA factors already merged)
    composed with --control_workdir's at --control_scale."""
    from jdiff import controlnet
    from jdiff.models.lora import merged

    if extra:
        nets = [(model, params)] + [merged(l.model, l.params) for l in (load_for_sampling(w, mesh) for w in extra)]
        model, params = controlnet.compose(nets, scales if scales is not None else 1.0)
    elif scales is not None:
        model = controlnet.with_scale(model, scales)
    return model, params


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.configure_gc()
    common.configure_logging()
    out = _OUT.value
    if not out.endswith((".png", ".npz")):
        raise app.UsageError(f"--out: expected a .png or .npz path, got {out!r}")
    if _NUM.value < 1:
        raise app.UsageError(f"--num: expected a positive number, got {_NUM.value}")
    g = _GUIDANCE.value
    if not np.isfinite(g) or g < 0:
        raise app.UsageError(f"--guidance: expected a finite weight >= 0, got {g}")
    if _NULL_LABEL.value and _LABEL.value:
        raise app.UsageError("--null_label: expected either --null_label or --label, got both")
    if _NULL_LABEL.value and g:
        raise app.UsageError(f"--guidance: {g} guides towards labels, but --null_label samples the null class; expected 0")
    # The flags are checked against the workdir's config before any checkpoint is read.
    cfg = common.load_workdir_config(_WORKDIR.value)
    if _ADAPTER.value:
        from jdiff.train import adapt

        try:
            cfg = adapt.adapter_config(_ADAPTER.value)
        except ValueError as e:
            raise app.UsageError(f"--{e}") from None
        if _CONTROL_WORKDIR.value:
            raise app.UsageError("--control_workdir: not with --adapter (compose ControlNet workdirs)")
    role = cfg.data.get("clip_embeddings", "")
    if role == "prior":
        raise app.UsageError("--workdir: this is unCLIP's prior (it samples CLIP embeddings, not images); pass the "
                             "decoder's workdir as --workdir and this one as --prior_workdir")
    if role == "decoder" or _PRIOR_WORKDIR.value:
        _run_unclip(cfg)
        return
    model = network.build_model(cfg)
    num_classes = getattr(model, "num_classes", None)
    tokens = _prompt_tokens(cfg, model)
    clip_request = _check_clip_flags(cfg, model, tokens)
    classifier_request = _check_classifier_flags(cfg)
    edit = _check_edit_flags(cfg, model)
    _check_sampler_flags(cfg, edit)
    labels = None
    if classifier_request is not None:
        classifier_labels = _classifier_labels(classifier_request[1], num_classes)
        classifier_request = (classifier_request[0], classifier_labels)
        if num_classes is not None:  # a class-conditional model samples the classes it is guided towards
            labels = classifier_labels
        elif g:
            raise app.UsageError("--guidance: classifier-free guidance needs a class-conditional model "
                                 "(--classifier_scale sets classifier guidance)")
        if edit is not None or _SR_WORKDIR.value or _LOW_RES.value or _CONTROL.value:
            raise app.UsageError("--classifier_workdir: not combined with editing, cascade or control flags")
    elif _LABEL.value:
        if num_classes is None:
            raise app.UsageError("--label: this model is not class-conditional")
        bad = [y for y in _LABEL.value if not 0 <= y < num_classes]
        if bad:
            raise app.UsageError(f"--label: expected labels in [0, {num_classes}), got {bad}")
        labels = np.resize(np.asarray(_LABEL.value, np.int32), _NUM.value)
    elif _NULL_LABEL.value:
        if num_classes is None:
            raise app.UsageError("--null_label: this model is not class-conditional")
        labels = np.full((_NUM.value,), num_classes, np.int32)
    elif num_classes is not None and (edit is not None or _LOW_RES.value):
        if g:
            what = "an edit" if edit is not None else "--low_res"
            raise app.UsageError(f"--guidance: {g} guides towards a class; {what} without --label uses the null class")
        labels = np.full((_NUM.value,), num_classes, np.int32)  # edits complete the image, not a class
    elif num_classes is not None:
        labels = balanced_labels(_NUM.value, num_classes)
    elif g and not network.text_length(model):
        raise app.UsageError("--guidance: classifier-free guidance needs a class- or text-conditional model")
    if tokens is not None and (edit is not None or _SR_WORKDIR.value or _LOW_RES.value or _CONTROL.value):
        raise app.UsageError("--prompt: not combined with editing, cascade or control flags")
    cascade_request = None
    if _SR_WORKDIR.value or _LOW_RES.value:
        cascade_request = _check_cascade_flags(cfg, model)
    elif _sr_factor(cfg) is not None:
        raise app.UsageError("--low_res: this is a super-resolution model (data.transform='super_resolution'); pass the "
                             "low-resolution image with --low_res, or use the workdir as --sr_workdir of a cascade")
    if (_SR_METHOD.value or _SR_STEPS.value is not None or _SR_GUIDANCE.value is not None) and not _SR_WORKDIR.value:
        raise app.UsageError("--sr_method / --sr_steps / --sr_guidance: only with --sr_workdir (with --low_res, use "
                             "--method / --steps / --guidance)")
    image_channels = getattr(model, "image_channels", 0) or 0
    if cascade_request is not None:
        pass
    elif image_channels and not _COND_IMAGE.value and not (edit and edit[0] == "inpaint"):
        raise app.UsageError(f"--cond_image: this model is conditioned on an image (config.model.image_channels="
                             f"{image_channels}); pass the conditioning image as a .png or .npz")
    if _COND_IMAGE.value and not image_channels:
        raise app.UsageError("--cond_image: this model takes no image conditioning (config.model.image_channels=0)")
    cond_image = load_cond_image(_COND_IMAGE.value, _NUM.value, image_channels) if _COND_IMAGE.value else None
    control_request = _check_control_flags(cfg, model)
    if control_request is not None and (edit is not None or cascade_request is not None):
        raise app.UsageError("--control: not combined with editing or cascade flags")
    common.configure_devices()  # one XLA CPU device per core: the rows are split over them
    common.configure_compilation_cache()
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    mesh = parallel.make_mesh()
    if cascade_request is not None:
        x, step = _run_cascade(*cascade_request, labels, mesh)
        _write(x, labels, num_classes, step)
        return
    if _ADAPTER.value:
        loaded = adapt.load_adapter(_ADAPTER.value, _WORKDIR.value, mesh)
    else:
        loaded = load_for_sampling(_WORKDIR.value, mesh)
    model = loaded.model
    cond = {} if cond_image is None else {"image": resize_cond_image(cond_image, _NUM.value, loaded.image_shape)}
    if tokens is not None and network.text_length(model):
        cond["tokens"] = tokens
    from jdiff.models.lora import merged

    model, params = merged(model, loaded.params)  # LoRA factors merged into the kernels: the base's cost
    if control_request is not None:
        control, scales, extra = control_request
        model, params = _controlled(model, params, scales, extra, mesh)
        cond["control"] = np.broadcast_to(control, (_NUM.value,) + control.shape[1:]).astype(np.float32)
    s = cfg.sample
    method = _METHOD.value or s.method
    steps = _STEPS.value if _STEPS.value is not None else s.steps
    eta = _ETA.value if _ETA.value is not None else s.eta
    inpaint = edit is not None and edit[0] == "inpaint"
    if inpaint:  # plain (sharded) sampling with the masked image and the mask as cond["image"]
        from jdiff import editing

        _, image, mask = edit
        mask = np.broadcast_to(mask, (_NUM.value,) + mask.shape[1:])
        cond = {k: np.asarray(v) for k, v in editing.inpaint_cond(image, mask).items()}
    if edit is not None and not inpaint:
        if edit[0] == "sdedit" and _STEPS.value is None and steps is not None:
            # The config's density of steps, over the part of the chain SDEdit runs.
            steps = max(1, round(steps * (edit[2] + 1) / cfg.diffusion.num_timesteps))
        x = _run_edit(edit, loaded, labels, cond, g, method, steps, eta, cfg)
    else:
        x = generate(
            model, params, loaded.schedule, loaded.image_shape, _NUM.value, jax.random.key(_SEED.value),
            labels=labels, cond=cond, guidance_weight=g, batch_size=_BATCH.value or s.batch_size,
            method=method, steps=steps, eta=eta, clip=s.clip or None,
            variance=cfg.diffusion.variance, parameterization=cfg.diffusion.parameterization, mesh=mesh,
            sigma_data=config_lib.sigma_data_of(cfg), **_classifier_kwargs(classifier_request, mesh),
            **_clip_kwargs(clip_request, tokens),
        )
    if inpaint:
        x = np.asarray(editing.paste_known(x, image, mask))  # the known pixels exactly
    x = latent.decode_samples(cfg.data, x)  # latent diffusion: back to pixels
    _write(x, labels, num_classes, loaded.step)


def _stage(loaded, guidance: float):
    from jdiff.unclip import StageSettings

    cfg = loaded.config
    s = cfg.sample
    return StageSettings(loaded.model, loaded.params, loaded.schedule, loaded.image_shape, s.method, s.steps, s.eta,
                         s.clip or None, cfg.diffusion.variance, cfg.diffusion.parameterization, guidance)


def _run_unclip(cfg) -> None:
    """--workdir DECODER --prior_workdir PRIOR --prompt ...: text -> prior -> decoder (jdiff.unclip)."""
    if cfg.data.get("clip_embeddings", "") != "decoder":
        raise app.UsageError(f"--prior_workdir: --workdir {_WORKDIR.value!r} is not unCLIP's decoder "
                             f"(config.data.clip_embeddings={cfg.data.get('clip_embeddings', '')!r}); expected a workdir "
                             "trained with configs/shapes_unclip_decoder.py")
    if not _PRIOR_WORKDIR.value:
        raise app.UsageError("--prior_workdir: this is unCLIP's decoder (conditioned on CLIP image embeddings); expected "
                             "the prior's workdir, which maps --prompt to an embedding")
    pcfg = common.load_workdir_config(_PRIOR_WORKDIR.value)
    if pcfg.data.get("clip_embeddings", "") != "prior":
        raise app.UsageError(f"--prior_workdir: {_PRIOR_WORKDIR.value!r} is not an unCLIP prior "
                             f"(config.data.clip_embeddings={pcfg.data.get('clip_embeddings', '')!r})")
    if os.path.abspath(pcfg.data.clip_workdir) != os.path.abspath(cfg.data.clip_workdir):
        raise app.UsageError(f"--prior_workdir: the prior embeds with CLIP {pcfg.data.clip_workdir!r}, the decoder with "
                             f"{cfg.data.clip_workdir!r}; expected one CLIP")
    others = [f for f, v in (("--label", _LABEL.value), ("--cond_image", _COND_IMAGE.value), ("--sdedit", _SDEDIT.value),
                             ("--repaint", _REPAINT.value), ("--inpaint", _INPAINT.value), ("--sr_workdir", _SR_WORKDIR.value),
                             ("--control", _CONTROL.value), ("--classifier_workdir", _CLASSIFIER_WORKDIR.value),
                             ("--clip_workdir", _CLIP_WORKDIR.value), ("--adapter", _ADAPTER.value)) if v]
    if others:
        raise app.UsageError(f"{others[0]}: not with unCLIP (--prior_workdir)")
    if not _PROMPT.value:
        raise app.UsageError("--prompt: unCLIP samples from a caption; expected --prompt")
    try:
        ids, _ = captions.tokenizer_of(cfg.data).encode(_PROMPT.value)
    except ValueError as e:
        raise app.UsageError(f"--prompt: {e}") from None
    pg = pcfg.sample.guidance if _PRIOR_GUIDANCE.value is None else _PRIOR_GUIDANCE.value
    if not np.isfinite(pg) or pg < 0:
        raise app.UsageError(f"--prior_guidance: expected a finite weight >= 0, got {pg}")
    if _METHOD.value or _STEPS.value is not None or _ETA.value is not None:
        raise app.UsageError("--method / --steps / --eta: unCLIP uses each stage's config sampler")
    from jdiff.unclip import unclip

    common.configure_compilation_cache()
    clip_module, clip_params, _ = clip_lib.load_clip(cfg.data.clip_workdir)
    decoder = load_for_sampling(_WORKDIR.value)
    prior = load_for_sampling(_PRIOR_WORKDIR.value)
    x, _ = unclip(_stage(prior, pg), _stage(decoder, _GUIDANCE.value), clip_module, clip_params,
                  np.resize(ids, (_NUM.value, ids.shape[1])), jax.random.key(_SEED.value),
                  batch_size=_BATCH.value or cfg.sample.batch_size)
    _write(x, None, None, decoder.step)


def _prompt_tokens(cfg, model):
    """--prompt as token ids [num, L] (cycled over the samples), checked against the model and its
    dataset's vocabulary before anything is loaded; None without --prompt."""
    L = network.text_length(model)
    if not _PROMPT.value:
        if L:
            raise app.UsageError("--prompt: this is a text-conditioned model (config.model_name="
                                 f"{cfg.model_name!r}); expected a caption, e.g. --prompt 'a red disc at the top left'")
        return None
    if not L and _CLIP_WORKDIR.value is None:
        raise app.UsageError(f"--prompt: this model is not text-conditioned (config.model_name={cfg.model_name!r}); "
                             "a prompt steers it only through CLIP guidance (--clip_workdir, --clip_guidance)")
    try:
        if L:
            tokenizer = captions.tokenizer_of(cfg.data)
        else:  # only the CLIP reads the prompt: its vocabulary (checked with the rest of the CLIP flags)
            tokenizer = captions.Tokenizer(_clip_info().get("vocabulary") or captions.SHAPES_VOCABULARY)
        ids, _ = tokenizer.encode(_PROMPT.value)
    except ValueError as e:
        raise app.UsageError(f"--prompt: {e}") from None
    if L and ids.shape[1] > L:
        raise app.UsageError(f"--prompt: the tokenizer's {ids.shape[1]} positions exceed the model's max_length {L}")
    return np.resize(ids, (_NUM.value, ids.shape[1]))


def _same_schedule(mine, theirs) -> bool:
    """Whether a guiding network (classifier, noised CLIP) saw the model's discrete noise levels."""
    a, b = (np.asarray(getattr(s, "alphas_cumprod", ())) for s in (mine, theirs))
    return a.size > 0 and a.shape == b.shape and np.allclose(a, b)


def _clip_info() -> dict:
    """The clip.json of --clip_workdir ({} without one)."""
    import json

    path = os.path.join(_CLIP_WORKDIR.value or "", clip_lib.CLIP_CONFIG_FILE)
    if not _CLIP_WORKDIR.value or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _check_clip_flags(cfg, model, tokens):
    """The CLIP workdir of --clip_workdir (checked against the model's config), or None."""
    if _CLIP_WORKDIR.value is None:
        if _CLIP_GUIDANCE.value is not None:
            raise app.UsageError("--clip_guidance: only with --clip_workdir")
        return None
    s = _CLIP_GUIDANCE.value
    if s is None or not np.isfinite(s) or s <= 0:
        raise app.UsageError(f"--clip_guidance: expected a finite scale > 0 with --clip_workdir, got {s}")
    if tokens is None:
        raise app.UsageError("--clip_workdir: CLIP guidance guides towards a caption; expected --prompt")
    info = _clip_info()
    if not info:
        raise app.UsageError(f"--clip_workdir: {_CLIP_WORKDIR.value!r} has no {clip_lib.CLIP_CONFIG_FILE}; expected a "
                             "workdir written by launch.train_clip --noised")
    if not info["noised"]:
        raise app.UsageError(f"--clip_workdir: {_CLIP_WORKDIR.value!r} was trained on clean images; CLIP guidance needs "
                             "a noised CLIP (launch.train_clip --noised), whose gradients at x_t mean something")
    shape = _image_shape(cfg)
    if tuple(shape) != (info["resolution"], info["resolution"], 3):
        raise app.UsageError(f"--clip_workdir: the CLIP sees {info['resolution']}x{info['resolution']} RGB images, the "
                             f"model samples {tuple(shape)}")
    from jdiff import schedules

    mine = config_lib.make_schedule(cfg)
    theirs = schedules.get(info["schedule"]["name"], info["schedule"]["num_timesteps"])
    if not _same_schedule(mine, theirs):
        raise app.UsageError(f"--clip_workdir: the CLIP was trained on the {info['schedule']['name']} schedule with "
                             f"T={info['schedule']['num_timesteps']}, the model's is {cfg.diffusion.schedule} with "
                             f"T={cfg.diffusion.num_timesteps}")
    vocab = tuple(info["vocabulary"])
    if network.text_length(model) and vocab != captions.tokenizer_of(cfg.data).vocabulary:
        raise app.UsageError("--clip_workdir: the CLIP's vocabulary is not the model's dataset's")
    return _CLIP_WORKDIR.value


def _clip_kwargs(workdir, tokens) -> dict:
    """generate()'s CLIP-guidance arguments, or none."""
    if workdir is None:
        return {}
    module, params, _ = clip_lib.load_clip(workdir)
    return dict(clip_model=(module, params), clip_scale=_CLIP_GUIDANCE.value, clip_tokens=tokens)


def _check_classifier_flags(cfg):
    """``(workdir, classifier module)`` for --classifier_workdir (checked against the model's
    config before anything is loaded), or None."""
    if _CLASSIFIER_WORKDIR.value is None:
        if _CLASSIFIER_SCALE.value is not None:
            raise app.UsageError("--classifier_scale: only with --classifier_workdir")
        return None
    s = _CLASSIFIER_SCALE.value
    if s is None or not np.isfinite(s) or s <= 0:
        raise app.UsageError(f"--classifier_scale: expected a finite scale > 0 with --classifier_workdir, got {s}")
    ccfg = common.load_workdir_config(_CLASSIFIER_WORKDIR.value)
    if ccfg.model_name != "classifier":
        raise app.UsageError(f"--classifier_workdir: {_CLASSIFIER_WORKDIR.value!r} holds a {ccfg.model_name!r} network; "
                             "expected a noise-aware classifier (launch.train_classifier or launch.convert --kind classifier)")
    if _image_shape(ccfg) != _image_shape(cfg):
        raise app.UsageError(f"--classifier_workdir: the classifier sees {_image_shape(ccfg)} images, the model "
                             f"samples {_image_shape(cfg)}")
    mine, theirs = config_lib.make_schedule(cfg), config_lib.make_schedule(ccfg)
    if not _same_schedule(mine, theirs):
        raise app.UsageError("--classifier_workdir: the classifier was trained on another noise schedule "
                             f"({ccfg.diffusion.schedule}, T={ccfg.diffusion.num_timesteps}) than the model's "
                             f"({cfg.diffusion.schedule}, T={cfg.diffusion.num_timesteps})")
    return _CLASSIFIER_WORKDIR.value, network.build_model(ccfg)


def _classifier_labels(classifier, model_classes):
    k = classifier.num_classes
    if model_classes is not None and model_classes != k:
        raise app.UsageError(f"--classifier_workdir: the classifier has {k} classes, the model {model_classes}")
    if _NULL_LABEL.value:
        raise app.UsageError("--null_label: classifier guidance guides towards a class")
    if _LABEL.value:
        bad = [y for y in _LABEL.value if not 0 <= y < k]
        if bad:
            raise app.UsageError(f"--label: expected labels in [0, {k}) (the classifier's classes), got {bad}")
        return np.resize(np.asarray(_LABEL.value, np.int32), _NUM.value)
    return balanced_labels(_NUM.value, k)


def _classifier_kwargs(request, mesh) -> dict:
    """generate()'s classifier arguments for ``(classifier workdir, labels)``, or none."""
    if request is None:
        return {}
    workdir, labels = request
    clf = load_for_sampling(workdir, mesh)
    return dict(classifier=(clf.model, clf.params), classifier_scale=_CLASSIFIER_SCALE.value, classifier_labels=labels)


def _write(x: np.ndarray, labels, num_classes, step: int) -> None:
    """Process 0 writes --out: a grid (.png) or the raw arrays (.npz)."""
    out = _OUT.value
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".npz"):
        tmp = out + ".tmp.npz"
        arrays = {"samples": x.astype(np.float32)}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    else:
        ncols = _NUM.value // num_classes if (labels is not None and not _LABEL.value and not _NULL_LABEL.value
                                               and _NUM.value % num_classes == 0) else None
        images.save_grid(x, out, ncols=ncols)
    print(f"wrote {out}: {x.shape[0]} samples of shape {x.shape[1:]} from step {step}")


if __name__ == "__main__":
    app.run(main)
