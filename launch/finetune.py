"""DreamBooth fine-tuning of a trained class-conditional model on a few images of one subject.

python -m launch.finetune --config configs/fashion_mnist_dreambooth.py --config.base_workdir workdirs/fm28 \
    --config.dreambooth.subject_class 8 --subject SUBJECT_DIR --workdir workdirs/fm28_db
python -m launch.finetune --config configs/fashion_mnist_dreambooth.py:lora ...   # LoRA factors only
python -m launch.sample --workdir workdirs/fm28_db --label 10 --guidance 3 --out v.png   # "[V]": the subject

Ruiz et al. 2023 (jdiff.dreambooth): the base's label embedding gains one row, the identifier
"[V]" (label K for a base with K classes; the null class moves to K + 1), initialised from the
subject's class row. Before training, the frozen base draws config.dreambooth.num_prior samples of
that class (DPM-Solver++ as in config.sample, guidance config.dreambooth.prior_guidance); the
fine-tuning set is as many augmentations of the subject images (label [V], loss weight 1) plus
those samples (the class label, loss weight lambda = config.dreambooth.prior_weight), written to
WORKDIR/dreambooth.npz, and the ordinary train loop trains on it (resumable like launch.train).

--subject: a folder of .png images of the model's size (3-5 of one item). Everything is checked
(the folder, the images' size, the base workdir, the class) before anything is written.
"""

import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jdiff import dreambooth
from jdiff import data as data_lib
from jdiff.train import adapt
from jdiff.train import config as config_lib
from jdiff.train import network
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fashion_mnist_dreambooth.py", "Path to a get_config() file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the fine-tuning set, checkpoints and samples.", required=True)
_SUBJECT = flags.DEFINE_string("subject", None, "A folder of the subject's .png images (the model's size).", required=True)

DATA_FILE = "dreambooth.npz"
SETTINGS_FILE = "dreambooth.json"


def prepare(config, workdir: str, subject_dir: str):
    """``(config, settings)``: the fine-tuning config (data from WORKDIR/dreambooth.npz, the
    identifier class added) after every check; raises app.UsageError naming the flag or key."""
    db = config.dreambooth
    base_dir = config.get("base_workdir", "")
    if not base_dir:
        raise app.UsageError("--config.base_workdir: required: the trained class-conditional workdir to fine-tune")
    from jdiff.workdir import load_config

    try:
        base = load_config(base_dir)
    except ValueError as e:
        raise app.UsageError(f"--config.base_workdir: {e}") from None
    if base.model_name != "unet":
        raise app.UsageError(f"--config.base_workdir: {base_dir!r} holds a {base.model_name!r} network; expected a "
                             "class-conditional U-Net")
    num_classes = base.model.get("num_classes", None)
    if num_classes is None:
        raise app.UsageError(f"--config.base_workdir: {base_dir!r} is not class-conditional (model.num_classes is None); "
                             "DreamBooth adds an identifier class to a class-conditional model")
    c = db.subject_class
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
        raise app.UsageError(f"--config.dreambooth.subject_class: expected the subject's class in [0, {num_classes}) "
                             f"(the base's classes), got {c!r}")
    w = db.prior_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
        raise app.UsageError(f"--config.dreambooth.prior_weight: expected a finite lambda >= 0, got {w!r}")
    for name in ("num_prior", "max_shift"):
        v = db[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_prior" else 0):
            raise app.UsageError(f"--config.dreambooth.{name}: expected an int >= {1 if name == 'num_prior' else 0}, got {v!r}")
    g = db.prior_guidance
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g) or g < 0:
        raise app.UsageError(f"--config.dreambooth.prior_guidance: expected a finite weight >= 0, got {g!r}")
    shape = data_lib.image_shape_of(base.data)
    try:
        subject = dreambooth.load_subject(subject_dir, shape)
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.train.init_new_classes_from = (int(c),)
        out.data = base.data  # to resolve and validate the network before the set exists
    try:
        out = adapt.resolve_base(out)
        config_lib.validate(out)
        network.build_model(out)  # the network's own checks (e.g. a LoRA rank), before anything is written
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    with out.unlocked():
        out.data = config.data.copy_and_resolve_references()
        out.data.name = "arrays"
        out.data.path = os.path.join(os.path.abspath(workdir), DATA_FILE)
    settings = {"base_workdir": base_dir, "subject": sorted(os.listdir(subject_dir)), **db.to_dict(),
                "identifier": int(num_classes)}
    path = os.path.join(workdir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(settings)):
            raise app.UsageError(f"--workdir: {workdir!r} holds a DreamBooth set made with other settings ({previous}); "
                                 f"expected {settings}, or a fresh --workdir")
    return out, settings, subject, shape


def write_set(config, workdir: str, settings: dict, subject: np.ndarray, shape: tuple) -> None:
    """Draw the prior samples with the frozen base and write WORKDIR/dreambooth.npz (once)."""
    from jdiff.inference import generate
    from jdiff.workdir import load_for_sampling

    path = config.data.path
    if os.path.exists(path):
        return
    db = config.dreambooth
    base = load_for_sampling(config.base_workdir)
    s = config.sample
    labels = np.full((db.num_prior,), db.subject_class, np.int32)
    prior = generate(base.model, base.params, base.schedule, shape, db.num_prior, jax.random.key(config.seed + 17),
                     labels=labels, guidance_weight=float(db.prior_guidance), method=s.method, steps=s.steps,
                     eta=s.eta, clip=s.clip or None, batch_size=s.batch_size,
                     variance=base.config.diffusion.variance, parameterization=base.config.diffusion.parameterization)
    arrays = dreambooth.finetune_arrays(subject, np.asarray(prior), settings["identifier"], db.subject_class,
                                        settings["identifier"] + 1, float(db.prior_weight), seed=config.seed,
                                        max_shift=db.max_shift, flip=db.flip)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)
        with open(os.path.join(workdir, SETTINGS_FILE), "w") as f:
            json.dump(settings, f, indent=1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.configure_gc()
    common.configure_logging()
    config, settings, subject, shape = prepare(_CONFIG.value, _WORKDIR.value, _SUBJECT.value)
    common.configure_devices(config, shape)
    common.configure_compilation_cache()
    write_set(config, _WORKDIR.value, settings, subject, shape)
    from jdiff.train.loop import train_and_evaluate

    metrics = train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        if config.train.trainable and not metrics.get("preempted"):
            metrics["adapter"] = adapt.export_adapter(_WORKDIR.value)  # LoRA factors and the new class row alone
        print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
