"""The config schema of a training run: defaults for every section, validation of keys,
and the check that a workdir's checkpoint belongs to the same experiment."""

from __future__ import annotations

import json

import ml_collections

from jdiff import diffusion, losses, schedules

# Sections whose change makes an existing checkpoint meaningless (a different network,
# process or data); train/sample/logging settings may change between restarts.
INCOMPATIBLE_SECTIONS = ("model", "diffusion", "data.name", "data.resolution", "seed")


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config may have, with its default. Experiment configs start here."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # base PRNG seed: params init, per-step noise (fold_in(step)), data order

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # "digits" | "shapes" | any TFDS name (tfds.data_source)
    c.data.split = "train"
    c.data.resolution = ml_collections.FieldReference(None, field_type=int)  # TFDS/shapes size
    c.data.num_examples = 10000  # shapes only: size of the generated set
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.batch_size = 128  # global batch, split over processes and devices
    c.data.random_flip = False

    # Fields of jdiff.models.UNet (UNet.from_config rejects unknown keys).
    c.model = ml_collections.ConfigDict()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # "linear" | "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4  # linear only
    c.diffusion.beta_end = 0.02  # linear only
    c.diffusion.parameterization = "eps"  # "eps" | "x0" | "v"
    c.diffusion.weighting = "uniform"  # see jdiff.losses.loss_weight
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.variance = "fixed_small"  # "learned_range" trains the improved-DDPM hybrid loss
    c.diffusion.vlb_weight = 0.001
    c.diffusion.p_uncond = 0.0  # label dropout for classifier-free guidance

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

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 800000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0  # 0: only at the end
    c.train.progress = True  # tqdm progress bar

    c.sample = ml_collections.ConfigDict()
    c.sample.num = 64
    c.sample.method = "ddpm"
    c.sample.steps = ml_collections.FieldReference(None, field_type=int)
    c.sample.eta = 0.0
    c.sample.guidance = 0.0  # classifier-free guidance weight w for class-conditional models
    c.sample.clip = True  # clip predicted x_0 to [-1, 1]
    c.sample.batch_size = 256

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 0  # 0: no evaluation at the end of training
    c.eval.bpd_examples = 0  # test examples for the bits/dim bound (T network calls each)
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
    unknown = sorted(k for k in _flatten(config.to_dict()) if not k.startswith("model.") and k not in known)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; see jdiff.train.config.base_config for the accepted keys")
    d = config.diffusion
    if d.schedule not in ("linear", "cosine"):
        raise ValueError(f"config.diffusion.schedule: expected 'linear' or 'cosine', got {d.schedule!r}")
    if d.parameterization not in ("eps", "x0", "v"):
        raise ValueError(f"config.diffusion.parameterization: expected 'eps', 'x0' or 'v', got {d.parameterization!r}")
    if d.weighting not in losses.WEIGHTINGS:
        raise ValueError(f"config.diffusion.weighting: expected one of {losses.WEIGHTINGS}, got {d.weighting!r}")
    if d.variance not in diffusion.VARIANCE_TYPES:
        raise ValueError(f"config.diffusion.variance: expected one of {diffusion.VARIANCE_TYPES}, got {d.variance!r}")
    if (d.variance in ("learned_range", "learned")) != bool(config.model.get("learn_sigma", False)):
        raise ValueError(
            f"config.model.learn_sigma={config.model.get('learn_sigma', False)} does not match "
            f"config.diffusion.variance={d.variance!r}: learned variances need learn_sigma=True and vice versa"
        )
    if not 0.0 <= d.p_uncond < 1.0:
        raise ValueError(f"config.diffusion.p_uncond: expected a probability in [0, 1), got {d.p_uncond}")
    if d.p_uncond > 0 and config.model.get("num_classes", None) is None:
        raise ValueError("config.diffusion.p_uncond > 0 needs a class-conditional model (config.model.num_classes)")
    for name in ("batch_size",):
        v = config.data[name]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config.data.{name}: expected a positive int, got {v!r}")
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        v = config.train[name]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config.train.{name}: expected a positive int, got {v!r}")


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    d = config.diffusion
    if d.schedule == "linear":
        return schedules.linear(d.num_timesteps, d.beta_start, d.beta_end)
    return schedules.cosine(d.num_timesteps)


def experiment_fingerprint(config: ml_collections.ConfigDict) -> dict:
    """The parts of a config that a checkpoint depends on, as plain JSON values."""
    flat = _flatten(json.loads(config.to_json_best_effort()))
    return {k: v for k, v in sorted(flat.items()) if any(k == s or k.startswith(s + ".") for s in INCOMPATIBLE_SECTIONS)}


def check_compatible(saved: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raise if ``workdir``'s checkpoint was written by an experiment other than ``config``."""
    now = experiment_fingerprint(config)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k, '<absent>')!r}, config {now.get(k, '<absent>')!r}" for k in diff[:8])
        raise ValueError(
            f"workdir {workdir!r} holds a checkpoint of a different experiment ({details}). "
            "Use a new --workdir; nothing in this one was changed."
        )
