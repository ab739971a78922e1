"""DreamBooth (jdiff.dreambooth, launch.finetune) and adapters (jdiff.train.adapt): the subject's
augmentations against a brute-force oracle, the fine-tuning set's layout and weights, the
identifier row initialised from the subject's class, fidelity measures on hand-made features,
LoRA fine-tuning that leaves the base untouched and saves a small adapter that rebuilds the
network exactly, and bad input refused before anything is written."""

import json
import os
import re
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jdiff import dreambooth
from jdiff.train import adapt, network
from jdiff.train.state import split_params
from jdiff.workdir import load_for_sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import fashion_mnist, fashion_mnist_dreambooth  # noqa: E402
from launch import finetune  # noqa: E402

import forked  # noqa: E402
from commands import run_commands  # noqa: E402


def test_augmentations_are_shifts_and_flips_of_the_subject():
    rng = np.random.default_rng(0)
    subject = rng.uniform(-1, 1, (3, 10, 10, 1)).astype(np.float32)
    out = dreambooth.augment(subject, 40, seed=1, max_shift=2)
    np.testing.assert_array_equal(out[:3], subject)

    def candidates(img):  # every flip and shift, uncovered pixels -1 (an independent construction)
        for f in (img, img[:, ::-1]):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    c = -np.ones_like(f)
                    for i in range(10):
                        for j in range(10):
                            if 0 <= i - dy < 10 and 0 <= j - dx < 10:
                                c[i, j] = f[i - dy, j - dx]
                    yield c

    for i in range(3, 40):
        assert any(np.array_equal(out[i], c) for c in candidates(subject[i % 3])), i
    assert len({out[i].tobytes() for i in range(40)}) > 20  # not all the same variant
    with pytest.raises(ValueError, match="num: expected an int >= the 3 images"):
        dreambooth.augment(subject, 2)


def test_finetune_arrays_layout_and_prior_weights():
    subject = np.zeros((2, 4, 4, 1), np.float32)
    prior = np.ones((5, 4, 4, 1), np.float32)
    a = dreambooth.finetune_arrays(subject, prior, identifier=10, subject_class=3, num_classes=11, prior_weight=0.5)
    np.testing.assert_array_equal(a["label"], [10] * 5 + [3] * 5)
    np.testing.assert_array_equal(a["loss_weight"], [1.0] * 5 + [0.5] * 5)
    np.testing.assert_array_equal(a["image"][5:], prior)
    assert int(a["num_classes"]) == 11
    # The weights reach the train step's batch (mean of loss_weight * loss, the paper's eq. 2).
    batch = network.step_batch({"image": a["image"], "label": a["label"], "loss_weight": a["loss_weight"]},
                               type("M", (), {"num_classes": 11})())
    np.testing.assert_array_equal(batch["loss_weight"], a["loss_weight"])
    np.testing.assert_array_equal(batch["cond"]["label"], a["label"])
    for kw, match in [(dict(prior_weight=-1.0), "prior_weight: expected a finite lambda >= 0"),
                      (dict(subject_class=10), "identifier, subject_class: expected two different classes")]:
        with pytest.raises(ValueError, match=match):
            dreambooth.finetune_arrays(subject, prior, **{**dict(identifier=10, subject_class=3, num_classes=11,
                                                                 prior_weight=1.0), **kw})


def test_subject_fidelity_on_hand_made_features():
    subject = np.array([[0.0, 0.0]])
    cls = np.array([[3.0, 4.0], [0.0, 10.0]])  # distances 5 and 10 from the origin
    near = dreambooth.subject_fidelity(np.array([[0.0, 1.0]]), subject, cls)
    # d_subject 1; d_class mean(|(3,3)|, |(0,9)|) = (sqrt(18) + 9) / 2.
    assert near["d_subject"] == pytest.approx(1.0)
    assert near["d_class"] == pytest.approx((np.sqrt(18) + 9) / 2)
    assert near["nn_subject"] == 1.0
    far = dreambooth.subject_fidelity(np.array([[3.0, 4.5]]), subject, cls)
    assert far["nn_subject"] == 0.0 and far["ratio"] > 1


def _subject_dir(path, size=28, n=3):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
    return str(path)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from jdiff.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("db")
    base_dir = str(root / "base")
    c = fashion_mnist.get_config("small")
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    # Its final grid samples as the prior samples below do (8 images, guidance 3): one compiled
    # sampler for both. tests/test_controlnet.py trains the same base (one compile for the suite).
    c.sample.num = 8
    c.sample.guidance = 3.0
    train_and_evaluate(c, base_dir)
    subject = _subject_dir(root / "subject")
    c = fashion_mnist_dreambooth.get_config("small_lora")
    assert (c.dreambooth.num_prior, c.dreambooth.prior_guidance) == (8, 3.0)  # as the base's grid above
    c.base_workdir = base_dir
    c.dreambooth.subject_class = 2
    workdir = str(root / "lora")
    config, settings, images, shape = finetune.prepare(c, workdir, subject)
    finetune.write_set(config, workdir, settings, images, shape)
    train_and_evaluate(config, workdir)
    return dict(root=root, base=base_dir, subject=subject, lora=workdir, config=config,
                adapter=adapt.export_adapter(workdir))


def test_the_identifier_row_starts_as_the_subjects_class(tuned):
    from jdiff.train.loop import _init_from

    config = adapt.resolve_base(tuned["config"])
    model = network.build_model(config)
    # Fresh params of the right tree (shapes only: compiling the init would cost seconds), random
    # so that a row _init_from did not copy cannot equal the base's.
    shapes = jax.eval_shape(lambda: network.init_params(model, (28, 28, 1), jax.random.key(0),
                                                        cond=network.example_cond(model, (28, 28, 1))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), shapes)
    params = _init_from(config, params, config.train.trainable, None)
    table = np.asarray(params["model"]["encoder"]["class_embed"]["embedding"])
    base = np.asarray(load_for_sampling(tuned["base"]).params["encoder"]["class_embed"]["embedding"])
    assert table.shape == (12, base.shape[1]) and base.shape[0] == 11
    np.testing.assert_array_equal(table[:10], base[:10])
    np.testing.assert_array_equal(table[10], base[2])  # "[V]" starts as the subject's class
    np.testing.assert_array_equal(table[11], base[10])  # the null class moved last


def test_lora_finetune_trains_factors_only_and_its_adapter_rebuilds_the_network(tuned):
    loaded = load_for_sampling(tuned["lora"])
    base = load_for_sampling(tuned["base"]).params
    inner = loaded.params["model"]
    # Every frozen base weight is bit-identical (the class table aside: it grew and trains).
    frozen = split_params(loaded.params, loaded.config.train.trainable)[1]["model"]
    flat_base = {k: v for k, v in jax.tree_util.tree_flatten_with_path(base)[0]}
    flat_frozen = {k: v for k, v in jax.tree_util.tree_flatten_with_path(frozen)[0]}
    assert len(flat_frozen) == len(flat_base) - 1
    for k, v in flat_frozen.items():
        np.testing.assert_array_equal(v, flat_base[k])
    bs = [v for k, v in jax.tree_util.tree_flatten_with_path(loaded.params["lora"])[0] if str(k[-1]) == "['b']"]
    assert bs and max(float(np.abs(b).max()) for b in bs) > 0  # b left zero: the factors trained
    assert inner["encoder"]["class_embed"]["embedding"].shape[0] == 12
    # The adapter alone (trainable params + config) and the base rebuild the network bit for bit.
    rebuilt = adapt.load_adapter(tuned["adapter"])
    a, b = jax.tree.leaves(rebuilt.params), jax.tree.leaves(loaded.params)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    ckpt = os.path.join(tuned["lora"], "checkpoints", str(loaded.step))
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    assert os.path.getsize(tuned["adapter"]) * 5 < ckpt_bytes


def test_adapter_refuses_another_base(tuned, tmp_path, monkeypatch):
    import jdiff.workdir

    base, step = jdiff.workdir.load_params(tuned["base"])
    # Another base: the same paths, one kernel of another shape (e.g. a wider network).
    other = jax.tree_util.tree_map_with_path(
        lambda p, v: np.zeros(v.shape[:-1] + (v.shape[-1] + 1,), v.dtype) if "conv_in" in str(p) and "kernel" in str(p) else v,
        base)
    monkeypatch.setattr(jdiff.workdir, "load_params", lambda workdir, mesh=None: (other, step))
    with pytest.raises(ValueError, match=r"base_workdir: param .*conv_in/kernel' has shape .* in the source but .* in "
                                         r"this network"):
        adapt.load_adapter(tuned["adapter"])
    with pytest.raises(ValueError, match="adapter: no file at"):
        adapt.load_adapter(str(tmp_path / "none.msgpack"))


REFUSALS = {
    "empty": "--subject: .* holds no .png image",
    "size": r"--subject: .*0.png' is 16x16; expected the model's size 28x28",
    "no_dir": "--subject: .* is not a directory",
    "class": r"--config.dreambooth.subject_class: expected the subject's class in \[0, 10\)",
    "weight": "--config.dreambooth.prior_weight: expected a finite lambda >= 0, got -0.5",
    "base": "--config.base_workdir: .* has no config.json",
    "settings": "--workdir: .* holds a DreamBooth set made with other settings",
    "rank": "rank: expected an int >= 1, got 0",
}


@pytest.fixture(scope="module")
def refusals(tuned, tmp_path_factory):
    """{case: (launch.finetune's exit code, its stderr, XLA compiles meanwhile, its --workdir)}, the
    cases run in one process (tests/commands.py)."""
    d = tmp_path_factory.mktemp("refusals")
    argvs, workdirs = [], {}
    for case in REFUSALS:
        subject, extra = tuned["subject"], []
        if case == "empty":
            os.makedirs(d / "empty")
            subject = str(d / "empty")
        elif case == "size":
            subject = _subject_dir(d / "small", size=16)
        elif case == "no_dir":
            subject = str(d / "nothing")
        elif case == "class":
            extra = ["--config.dreambooth.subject_class=10"]
        elif case in ("weight", "settings"):
            extra = ["--config.dreambooth.prior_weight=" + ("-0.5" if case == "weight" else "0.25")]
        elif case == "rank":
            extra = ["--config.model.rank=0"]
        base = str(d / "nobase") if case == "base" else tuned["base"]
        workdirs[case] = tuned["lora"] if case == "settings" else str(d / case / "w")
        argvs.append(["--config", os.path.join(ROOT, "configs/fashion_mnist_dreambooth.py:small_lora"),
                      f"--config.base_workdir={base}", "--config.dreambooth.subject_class=2", *extra,
                      "--subject", subject, "--workdir", workdirs[case]])
    results = run_commands("launch.finetune", argvs, timeout=600)
    return {case: (*res, workdirs[case]) for case, res in zip(REFUSALS, results, strict=True)}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_finetune_refuses_bad_input_before_writing(refusals, case):
    """Each bad flag of launch.finetune exits non-zero naming it, before anything compiles or is written."""
    returncode, stderr, compiles, workdir = refusals[case]
    assert returncode != 0
    assert re.search(REFUSALS[case], stderr), stderr[-2000:]
    assert "Compiling" not in stderr and compiles == 0, (compiles, stderr[-2000:])
    if case != "settings":
        assert not os.path.exists(workdir)


def test_sample_with_an_adapter_on_the_base(tuned, tmp_path):
    out = tmp_path / "v.npz"
    r = forked.run_module("launch.sample", "--workdir", tuned["base"], "--adapter", tuned["adapter"], "--label", "10",
                          "--num", "3", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(out)
    assert x["samples"].shape == (3, 28, 28, 1) and list(x["labels"]) == [10, 10, 10]
    settings = json.load(open(os.path.join(tuned["lora"], finetune.SETTINGS_FILE)))
    assert settings["identifier"] == 10 and settings["subject_class"] == 2
