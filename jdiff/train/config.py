"""The config schema of a training run: defaults for every section, validation of keys,
and the check that a workdir's checkpoint belongs to the same experiment."""

from __future__ import annotations

import json
import math

import ml_collections

from jdiff import conditioning, diffusion, losses, schedules

INCOMPATIBLE_SECTIONS = (
    "model_name", "model", "diffusion", "data.name", "data.resolution", "data.transform", "data.transform_kwargs",
    "data.control", "data.control_kwargs", "data.path", "train.trainable", "seed",
)
"""Sections whose change makes an existing checkpoint meaningless (a different network,
process or data); train/sample/logging settings may change between restarts. Their values are the
experiment's fingerprint (:func:`experiment_fingerprint`)."""

FREE_FORM_SECTIONS = ("model", "data.transform_kwargs", "data.control_kwargs")
"""Free-form sections: their keys belong to the module / transform they configure, which checks
them, so the schema's key validation skips them."""


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config may have, with its default. Experiment configs start here."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # base PRNG seed: params init, per-step noise (fold_in(step)), data order
    # The trained workdir an adaptation (ControlNet, DreamBooth, LoRA) starts from: its network
    # fields, diffusion section and params are taken over at launch (jdiff.train.adapt). "": none.
    c.base_workdir = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # "digits" | "shapes" | any TFDS name (tfds.data_source)
    c.data.split = "train"
    c.data.resolution = ml_collections.FieldReference(None, field_type=int)  # TFDS/shapes size
    c.data.num_examples = 10000  # shapes only: size of the generated set
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.image_key = "image"  # TFDS: the feature holding the uint8 image
    c.data.label_key = ml_collections.FieldReference("label", field_type=str)  # TFDS: the class label; None: unlabelled
    c.data.download = False  # TFDS: let tfds download and prepare the dataset (needs the internet)
    c.data.batch_size = 128  # global batch, split over processes and devices
    c.data.random_flip = False
    # A batch transform run inside the jitted train step with its own key (jdiff.train.transforms):
    # "" none, "downsample_image" (cond["image"] = a down-then-up-sampled copy of x0), a name
    # registered with jdiff.train.transforms.register, or "package.module:factory".
    c.data.transform = ""
    c.data.transform_kwargs = ml_collections.ConfigDict()  # keyword arguments of the transform's factory
    # A ControlNet's control image, computed from each image at load (jdiff.data.controls):
    # "" none, "canny" (edges), "mask" (the shapes generator's object mask).
    c.data.control = ""
    c.data.control_kwargs = ml_collections.ConfigDict()  # e.g. sigma for "canny"
    c.data.max_objects = 2  # captioned_shapes: 1 or 2 objects per scene
    c.data.captions = False  # fashion_mnist(_sample): add class-name captions ("tokens")
    c.data.caption_length = 20  # captioned data: tokens per caption (the tokenizer's max_length)
    c.data.autoencoder = ""  # latent diffusion: an autoencoder directory (launch.train_autoencoder); "" = pixels
    c.data.clip_workdir = ""  # unCLIP: a clean CLIP workdir (launch.train_clip) whose embeddings ...
    c.data.clip_embeddings = ""  # ... condition a "decoder" or are the data of a "prior"; "" = neither
    c.data.path = ""  # data.name = "arrays": the .npz file (image, label, loss_weight)
    # (H, W, C) of the images when the workdir needs no dataset to know it: an imported model
    # (launch.convert writes data.name = "none" and this). (): read it off the dataset.
    c.data.image_shape = ()

    # The network: a name in the model registry (jdiff.models.MODELS, jdiff.models.register) or
    # "package.module:Class", built by jdiff.models.build(model_name, model).
    c.model_name = "unet"
    # Fields of that module (the builder rejects unknown keys).
    c.model = ml_collections.ConfigDict()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # "linear" | "cosine" | "scaled_linear" (LDM's; imported models)
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4  # linear and scaled_linear only
    c.diffusion.beta_end = 0.02  # linear and scaled_linear only
    c.diffusion.parameterization = "eps"  # "eps" | "x0" | "v"
    c.diffusion.weighting = "uniform"  # see jdiff.losses.loss_weight
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.variance = "fixed_small"  # "learned_range" trains the improved-DDPM hybrid loss
    c.diffusion.vlb_weight = 0.001
    # The process: "vp" (the discrete schedule above), "edm" (Karras et al. 2022: x = x0 + sigma n,
    # preconditioned denoiser, log-normal sigma, parameterization "x0") or "flow" (rectified flow:
    # x_t = (1 - t) x0 + t eps, velocity target, parameterization "flow").
    c.diffusion.process = "vp"
    c.diffusion.sigma_min = 0.002  # edm: the noise range of sampling (Table 1)
    c.diffusion.sigma_max = 80.0
    c.diffusion.sigma_data = 0.5  # edm: data std of the preconditioning
    c.diffusion.p_mean = -1.2  # edm: ln(sigma) ~ N(p_mean, p_std^2) in training
    c.diffusion.p_std = 1.2
    c.diffusion.flow_time = "uniform"  # flow: "uniform" | "logit_normal" training times (Esser et al. 2024)
    c.diffusion.p_uncond = 0.0  # conditioning dropout for classifier-free guidance (Ho & Salimans 2022)
    # The conditioning kinds p_uncond drops to their null value (jdiff.conditioning.drop); an
    # image or aug_level has no null value and is never dropped.
    c.diffusion.uncond_keys = ("label", "context", "context_mask", "tokens")

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adam"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = False
    # Steps with non-finite gradients (NaN/inf) skipped in a row before training stops
    # (optax.apply_if_finite: a skipped step leaves params and optimizer state as they were).
    # 0: stop at the first, naming the step; no checkpoint is written after it either way.
    c.optim.skip_nonfinite = 0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 800000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0  # 0: only at the end
    c.train.progress = True  # tqdm progress bar
    # Regex (re.fullmatch) over '/'-joined param paths of the params to train, e.g.
    # "decoder/.*"; the rest stay frozen, bit-identical, with no EMA or optimizer state. "": all.
    c.train.trainable = ""
    # A workdir whose newest EMA params initialise every param with the same path (and shape)
    # before training starts (e.g. the frozen part of a fine-tune). "": none.
    c.train.init_from = ""
    # Where init_from's params go: "destination_prefix=source_prefix" strings, e.g. a ControlNet's
    # ("base/=", "control_0/encoder/=encoder/") (the frozen U-Net, and the trainable copy of its
    # encoder). Empty: every path maps to itself.
    c.train.init_map = ()
    # Classes added to a class-conditional network (DreamBooth's identifier): the source class
    # each new class row of init_from's class embedding starts from, e.g. (3,). The null row moves last.
    c.train.init_new_classes_from = ()

    c.sample = ml_collections.ConfigDict()
    c.sample.num = 64  # the grid a run draws at its end (and every train.sample_every steps); 0: none
    c.sample.method = "ddpm"
    c.sample.steps = ml_collections.FieldReference(None, field_type=int)
    c.sample.eta = ml_collections.FieldReference(None, field_type=float)  # DDIM eta (None: the sampler's default)
    c.sample.guidance = 0.0  # classifier-free guidance weight w for class-conditional models
    # Clip predicted x_0: True = to [-1, 1], False = not, a float c = to [-c, c] (e.g. a latent
    # model's range), "dynamic" = Imagen's dynamic thresholding (jdiff.samplers.sample's clip).
    c.sample.clip = ml_collections.FieldReference(True, field_type=object)
    c.sample.batch_size = 256
    # A super-resolution stage's conditioning-augmentation level when it samples in a cascade, a
    # fraction of the schedule in [0, 1] (jdiff.cascade; launch.sample --aug_level overrides).
    c.sample.aug_level = 0.0

    # DreamBooth (Ruiz et al. 2023; launch.finetune, jdiff.dreambooth): the subject's class, the
    # prior-preservation weight lambda and the frozen base's class samples it applies to.
    c.dreambooth = ml_collections.ConfigDict()
    c.dreambooth.subject_class = -1  # required by launch.finetune: the class the subject belongs to
    c.dreambooth.prior_weight = 1.0  # lambda of eq. 2; 0 trains on the subject alone
    c.dreambooth.num_prior = 200  # class samples of the frozen base, generated once before fine-tuning
    c.dreambooth.prior_guidance = 1.0  # their classifier-free guidance weight
    c.dreambooth.max_shift = 2  # subject augmentation: integer shifts in pixels ...
    c.dreambooth.flip = True  # ... and left-right flips

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 0  # 0: no evaluation at the end of training
    c.eval.bpd_examples = 0  # test examples for the bits/dim bound (T network calls each)
    # Scores the samples (jdiff.evaluation.evaluators): "digits" (FID etc. with the digits
    # classifier; digits data only) or "" (none: only bits/dim, if bpd_examples).
    c.eval.evaluator = "digits"
    return c


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject unknown keys (outside ``model``) and values outside their allowed sets."""
    known = set(_flatten(base_config().to_dict()))
    unknown = sorted(k for k in _flatten(config.to_dict())
                     if not any(k.startswith(s + ".") for s in FREE_FORM_SECTIONS) and k not in known)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; see jdiff.train.config.base_config for the accepted keys")
    d = config.diffusion
    if d.schedule not in ("linear", "cosine", "scaled_linear"):
        raise ValueError(f"config.diffusion.schedule: expected 'linear', 'cosine' or 'scaled_linear', got {d.schedule!r}")
    if d.process not in PROCESSES:
        raise ValueError(f"config.diffusion.process: expected one of {PROCESSES}, got {d.process!r}")
    want = {"edm": "x0", "flow": "flow"}.get(d.process)
    if want is not None:
        if d.parameterization != want:
            raise ValueError(f"config.diffusion.parameterization: expected {want!r} for process={d.process!r} "
                             f"(what the sampled model predicts), got {d.parameterization!r}")
        if d.variance != "fixed_small" or d.weighting != "uniform":
            raise ValueError(f"config.diffusion.variance / weighting: process={d.process!r} has its own loss; expected "
                             f"'fixed_small' / 'uniform', got {d.variance!r} / {d.weighting!r}")
        if d.process == "edm":
            schedules.edm(d.sigma_min, d.sigma_max, d.sigma_data)  # raises on a bad range
        if d.process == "flow" and d.flow_time not in ("uniform", "logit_normal"):
            raise ValueError(f"config.diffusion.flow_time: expected 'uniform' or 'logit_normal', got {d.flow_time!r}")
    elif d.parameterization not in ("eps", "x0", "v"):
        raise ValueError(f"config.diffusion.parameterization: expected 'eps', 'x0' or 'v', got {d.parameterization!r}")
    if d.weighting not in losses.WEIGHTINGS:
        raise ValueError(f"config.diffusion.weighting: expected one of {losses.WEIGHTINGS}, got {d.weighting!r}")
    if d.variance not in diffusion.VARIANCE_TYPES:
        raise ValueError(f"config.diffusion.variance: expected one of {diffusion.VARIANCE_TYPES}, got {d.variance!r}")
    model_fields = config.model.get("model", config.model) if config.model_name == "lora" else config.model
    if (d.variance in ("learned_range", "learned")) != bool(model_fields.get("learn_sigma", False)):
        raise ValueError(
            f"config.model.learn_sigma={config.model.get('learn_sigma', False)} does not match "
            f"config.diffusion.variance={d.variance!r}: learned variances need learn_sigma=True and vice versa"
        )
    a = config.sample.get("aug_level", 0.0)
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
        raise ValueError(f"config.sample.aug_level: expected a fraction of the schedule in [0, 1], got {a!r}")
    if not 0.0 <= d.p_uncond < 1.0:
        raise ValueError(f"config.diffusion.p_uncond: expected a probability in [0, 1), got {d.p_uncond}")
    bad = [k for k in d.uncond_keys if k not in conditioning.DROPPABLE]
    if isinstance(d.uncond_keys, str) or bad:
        raise ValueError(f"config.diffusion.uncond_keys: expected a tuple of kinds from {conditioning.DROPPABLE}, "
                         f"got {d.uncond_keys!r}")
    if not isinstance(config.model_name, str) or not config.model_name:
        raise ValueError(f"config.model_name: expected a model name such as 'unet', got {config.model_name!r}")
    if not isinstance(config.train.init_from, str):
        raise ValueError(f"config.train.init_from: expected a workdir path or '', got {config.train.init_from!r}")
    from jdiff.train.state import parse_init_map

    parse_init_map(tuple(config.train.init_map) if isinstance(config.train.init_map, list) else config.train.init_map)
    ncf = config.train.init_new_classes_from
    if isinstance(ncf, str) or not isinstance(ncf, (tuple, list)) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in ncf):
        raise ValueError(f"config.train.init_new_classes_from: expected a tuple of class ids >= 0, got {ncf!r}")
    if (config.train.init_map or ncf) and not config.train.init_from:
        raise ValueError("config.train.init_map / init_new_classes_from: given without config.train.init_from "
                         f"(init_map={tuple(config.train.init_map)}, init_new_classes_from={tuple(ncf)})")
    if not isinstance(config.get("base_workdir", ""), str):
        raise ValueError(f"config.base_workdir: expected a workdir path or '', got {config.base_workdir!r}")
    if not isinstance(config.eval.evaluator, str):
        raise ValueError(f"config.eval.evaluator: expected an evaluator name or '', got {config.eval.evaluator!r}")
    for name in ("num_samples", "bpd_examples"):
        v = config.eval[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"config.eval.{name}: expected an int >= 0, got {v!r}")
    for name, least in (("num", 0), ("batch_size", 1)):
        v = config.sample[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"config.sample.{name}: expected an int >= {least}, got {v!r}")
    if config.sample.num == 0 and config.train.sample_every:
        raise ValueError(f"config.train.sample_every: {config.train.sample_every!r} asks for a grid every so many steps, "
                         "but config.sample.num is 0 (no grids); set sample_every to 0 or sample.num >= 1")
    g = config.sample.guidance
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
        raise ValueError(f"config.sample.guidance: expected a finite weight >= 0, got {g!r}")
    w = config.optim.warmup_steps
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise ValueError(f"config.optim.warmup_steps: expected an int >= 0, got {w!r}")
    v = config.optim.ema_decay
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"config.optim.ema_decay: expected a decay in [0, 1], got {v!r}")
    if d.process == "vp":
        v = d.num_timesteps
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.diffusion.num_timesteps: expected a positive int, got {v!r}")
    v = config.optim.skip_nonfinite
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"config.optim.skip_nonfinite: expected an int >= 0 (steps skipped in a row), got {v!r}")
    for name in ("batch_size",):
        v = config.data[name]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config.data.{name}: expected a positive int, got {v!r}")
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        v = config.train[name]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config.train.{name}: expected a positive int, got {v!r}")


PROCESSES = ("vp", "edm", "flow")
"""The ``config.diffusion.process`` values (:func:`make_schedule`): ``vp`` (a discrete
:class:`~jdiff.schedules.Schedule`), ``edm`` (:class:`~jdiff.schedules.EDMProcess`) and ``flow``
(:class:`~jdiff.schedules.FlowProcess`)."""


def make_schedule(config: ml_collections.ConfigDict):
    """The process of ``config.diffusion``: a discrete :class:`~jdiff.schedules.Schedule` (process
    "vp"), an :class:`~jdiff.schedules.EDMProcess` or a :class:`~jdiff.schedules.FlowProcess`."""
    d = config.diffusion
    process = d.get("process", "vp")
    if process == "edm":
        return schedules.edm(d.sigma_min, d.sigma_max, d.sigma_data)
    if process == "flow":
        return schedules.flow()
    if d.schedule == "linear":
        return schedules.linear(d.num_timesteps, d.beta_start, d.beta_end)
    if d.schedule == "scaled_linear":
        return schedules.scaled_linear(d.num_timesteps, d.beta_start, d.beta_end)
    return schedules.cosine(d.num_timesteps)


def experiment_fingerprint(config: ml_collections.ConfigDict) -> dict:
    """The parts of a config that a checkpoint depends on, as plain JSON values."""
    flat = _flatten(json.loads(config.to_json_best_effort()))
    return {k: v for k, v in sorted(flat.items()) if any(k == s or k.startswith(s + ".") for s in INCOMPATIBLE_SECTIONS)}


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raise if ``workdir``'s checkpoint was written by an experiment other than ``config``."""
    now = experiment_fingerprint(config)
    # A key the schema gained after the checkpoint was written stood at its default then.
    defaults = experiment_fingerprint(base_config())
    saved = {**{k: v for k, v in defaults.items() if k not in saved and not k.startswith("model.")}, **saved}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r}, config {now.get(k, '<absent>')!r}" for k in diff[:8])
        raise ValueError(
            f"workdir {workdir!r} holds a checkpoint of a different experiment ({details}). "
            "Use a new --workdir; nothing in this one was changed."
        )


def sigma_data_of(config: ml_collections.ConfigDict) -> float | None:
    """EDM's sigma_data when the network must be wrapped in the preconditioning, else None."""
    d = config.diffusion
    return float(d.sigma_data) if d.get("process", "vp") == "edm" else None
