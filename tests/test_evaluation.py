"""Tests for jdiff.evaluation: the shipped digits classifier and the sample-quality numbers.

The classifier's forward pass, and every number evaluate_digit_samples returns, are checked
against float64 NumPy/SciPy transcriptions written here; the metrics are then checked to
rank real digits above corrupted ones.
"""

import importlib.resources
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special

from jdiff.data import load_digits
from jdiff.evaluation import (
    DIGITS_FEATURE_DIM,
    DigitsClassifier,
    digits_features,
    evaluate_digit_samples,
    load_digits_classifier,
    load_digits_classifier_metadata,
    mean_pairwise_distance,
    reference_floor,
    save_digits_classifier,
)
from jdiff.evaluation import digits_classifier as dc

EPS32 = float(np.finfo(np.float32).eps)
REPO = pathlib.Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("train_digits_classifier", REPO / "tools" / "train_digits_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- float64 references


def shipped_arrays():
    with importlib.resources.files("jdiff.evaluation").joinpath("digits_classifier.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}


def conv_same_np(x, kernel, bias):
    """3x3 'SAME' cross-correlation, x [B, H, W, Cin], kernel [3, 3, Cin, Cout]."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out + bias


def classifier_np(arrays, images):
    """The architecture in the module docstring, in float64 NumPy."""
    p = {k: v.astype(np.float64) for k, v in arrays.items() if k.startswith("params/")}
    relu = lambda z: np.maximum(z, 0.0)
    x = images.astype(np.float64)
    x = relu(conv_same_np(x, p["params/conv1/kernel"], p["params/conv1/bias"]))
    x = relu(conv_same_np(x, p["params/conv2/kernel"], p["params/conv2/bias"]))
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    x = relu(conv_same_np(x, p["params/conv3/kernel"], p["params/conv3/bias"]))
    x = x.reshape(b, -1)
    features = relu(x @ p["params/embed/kernel"] + p["params/embed/bias"])
    logits = features @ p["params/head/kernel"] + p["params/head/bias"]
    return features, logits


def fid_np(real, fake):
    """Heusel et al. 2017 without a matrix square root: with S1 = A A^T, S2 = B B^T (A, B the
    centred features over sqrt(n - 1)), Tr((S1 S2)^{1/2}) is the nuclear norm of B^T A, exact
    in float64 even for the rank-deficient covariances where sqrtm loses half its digits.

    Returns the distance and the first-order error bound of a backward-stable float64 FID:
    rounding perturbs S1^{1/2} S2 S1^{1/2} by delta ~ eps ||S1|| ||S2||, which moves
    sqrt(lambda) by min(sqrt(delta), delta / (2 sqrt(lambda))) (Weyl); the singular
    covariances here (dead ReLU units, fewer samples than dimensions) pay sqrt(delta) for
    every zero eigenvalue. Traces and sums cost a few ulps.
    """
    eps = np.finfo(np.float64).eps
    a = (real - real.mean(0)).T / np.sqrt(len(real) - 1)
    b = (fake - fake.mean(0)).T / np.sqrt(len(fake) - 1)
    diff = real.mean(0) - fake.mean(0)
    sv = np.linalg.svd(b.T @ a, compute_uv=False)
    fid = diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * sv.sum()
    lam = np.zeros(a.shape[0])
    lam[: min(a.shape[0], sv.size)] = sv[: a.shape[0]] ** 2
    delta = 4 * eps * np.linalg.norm(a @ a.T, 2) * np.linalg.norm(b @ b.T, 2)
    per_eig = np.where(lam > 0, delta / (2 * np.sqrt(np.where(lam > 0, lam, 1.0))), np.inf)
    tolerance = 4 * eps * (diff @ diff + np.sum(a * a) + np.sum(b * b)) + 2 * np.sum(np.minimum(np.sqrt(delta), per_eig))
    return float(fid), float(tolerance)


def inception_score_np(logits):
    p = scipy.special.softmax(logits.astype(np.float64), axis=1)
    marginal = p.mean(0, keepdims=True)
    kl = np.sum(scipy.special.xlogy(p, p) - scipy.special.xlogy(p, marginal), axis=1)
    return float(np.exp(kl.mean()))


def precision_recall_np(real, fake, k):
    """Kynkaanniemi et al. 2019 by brute force; also counts points within 1e-4 of a ball's edge."""

    def radii(x):
        d = scipy.spatial.distance.cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def inside(queries, centres, r):
        d = scipy.spatial.distance.cdist(queries, centres)
        hits = np.any(d <= r[None, :], axis=1)
        margin = np.min(np.abs(d - r[None, :]) / np.maximum(r[None, :], 1e-12), axis=1)
        return hits.mean(), int(np.sum(margin < 1e-4))

    precision, p_edge = inside(fake, real, radii(real))
    recall, r_edge = inside(real, fake, radii(fake))
    return precision, recall, p_edge, r_edge


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def test_split():
    return load_digits("test")


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


@pytest.fixture(scope="module")
def test_outputs(test_split, classifier):
    module, params = classifier
    return digits_features(test_split[0], module=module, params=params)


@pytest.fixture(scope="module")
def floor():
    return reference_floor()


@pytest.fixture(scope="module")
def noisy_test_set(test_split):
    images, labels = test_split
    noise = np.random.default_rng(0).standard_normal(images.shape).astype(np.float32)
    return np.clip(images + 0.5 * noise, -1.0, 1.0), labels


@pytest.fixture(scope="module")
def noisy_eval(noisy_test_set):
    return evaluate_digit_samples(*noisy_test_set)


@pytest.fixture(scope="module")
def real_eval(test_split):
    return evaluate_digit_samples(*test_split)


# --------------------------------------------------------------------------- the shipped classifier


def test_npz_loads_without_pickle_and_is_small():
    path = importlib.resources.files("jdiff.evaluation").joinpath("digits_classifier.npz")
    with path.open("rb") as f:
        size = len(f.read())
    assert size < 1_000_000
    arrays = shipped_arrays()
    param_keys = sorted(k for k in arrays if k.startswith("params/"))
    assert param_keys == sorted(
        f"params/{layer}/{leaf}" for layer in ("conv1", "conv2", "conv3", "embed", "head") for leaf in ("kernel", "bias")
    )
    assert set(arrays) - set(param_keys) == {"test_accuracy", "seed", "num_steps"}
    assert all(arrays[k].dtype == np.float32 for k in param_keys)
    assert arrays["params/embed/kernel"].shape == (4 * 4 * 64, DIGITS_FEATURE_DIM)


def test_shipped_classifier_accuracy_on_test_split(test_split, test_outputs):
    images, labels = test_split
    _, logits = test_outputs
    correct = int(np.sum(np.argmax(np.asarray(logits), axis=1) == labels))
    assert correct / len(labels) >= 0.97
    meta = load_digits_classifier_metadata()
    # The recorded accuracy was measured by the same code on the same 300 images.
    assert correct == round(meta["test_accuracy"] * len(labels))


def test_metadata_matches_the_tool_defaults():
    import inspect

    defaults = inspect.signature(load_tool().train_digits_classifier).parameters
    meta = load_digits_classifier_metadata()
    assert meta["seed"] == defaults["seed"].default
    assert meta["num_steps"] == defaults["num_steps"].default


def test_features_match_float64_numpy_forward_pass(test_split, test_outputs):
    features, logits = test_outputs
    chex.assert_shape(features, (300, DIGITS_FEATURE_DIM))
    chex.assert_shape(logits, (300, 10))
    ref_features, ref_logits = classifier_np(shipped_arrays(), test_split[0])
    # float32 rounding through 5 layers of fan-in <= 1024: a few hundred ulps of the scale.
    np.testing.assert_allclose(np.asarray(features), ref_features, rtol=0, atol=500 * EPS32 * np.abs(ref_features).max())
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=500 * EPS32 * np.abs(ref_logits).max())


def test_features_do_not_depend_on_batching(test_split, test_outputs, classifier):
    module, params = classifier
    images = test_split[0][:37]
    features, logits = digits_features(images, batch_size=16, module=module, params=params)
    chex.assert_shape(features, (37, DIGITS_FEATURE_DIM))
    chex.assert_shape(logits, (37, 10))
    scale = float(jnp.abs(test_outputs[0]).max())
    expected = (test_outputs[0][:37], test_outputs[1][:37])
    chex.assert_trees_all_close((features, logits), expected, atol=100 * EPS32 * scale, rtol=0)
    # Without module/params the shipped classifier is loaded.
    chex.assert_trees_all_close(digits_features(images, batch_size=16), (features, logits), atol=0, rtol=0)


def test_save_load_round_trip(tmp_path, classifier):
    module, params = classifier
    path = tmp_path / "clf.npz"
    save_digits_classifier(path, params, test_accuracy=0.5, seed=3, num_steps=7)
    loaded_module, loaded = load_digits_classifier(path)
    assert loaded_module == module
    chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(params))
    assert load_digits_classifier_metadata(path) == {"test_accuracy": 0.5, "seed": 3, "num_steps": 7}
    wrong = jax.tree_util.tree_map(lambda x: x, params)
    wrong["params"]["head"]["kernel"] = jnp.zeros((3, 10))
    with pytest.raises(ValueError, match=r"params: .*wrong shapes .*head/kernel"):
        save_digits_classifier(path, wrong, test_accuracy=0.5, seed=0, num_steps=1)
    flat = dc.flatten_params(params)
    del flat["params/conv1/bias"]
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ValueError, match=r"path .*missing \['params/conv1/bias'\]"):
        load_digits_classifier(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- evaluate_digit_samples


def test_mean_pairwise_distance_matches_scipy():
    rng = np.random.default_rng(1)
    # 1100 rows cross the 1024-row block boundary.
    x = rng.uniform(-1, 1, size=(1100, 8, 8, 1))
    expected = scipy.spatial.distance.pdist(x.reshape(1100, -1)).mean()
    np.testing.assert_allclose(mean_pairwise_distance(x), expected, rtol=1e-12)
    assert mean_pairwise_distance(np.zeros((5, 8, 8, 1))) == 0.0
    two = np.stack([np.zeros((8, 8, 1)), np.full((8, 8, 1), 0.5)])
    assert mean_pairwise_distance(two) == pytest.approx(4.0, abs=1e-12)  # sqrt(64 * 0.25)


def test_evaluation_matches_numpy_transcription(noisy_test_set, noisy_eval, test_split, test_outputs):
    images, labels = noisy_test_set
    fake_features, fake_logits = (np.asarray(a, np.float64) for a in digits_features(images))
    real_features = np.asarray(test_outputs[0], np.float64)

    fid, tolerance = fid_np(real_features, fake_features)
    assert noisy_eval["fid"] == pytest.approx(fid, abs=tolerance)
    assert noisy_eval["inception_score"] == pytest.approx(inception_score_np(fake_logits), rel=1e-4)
    precision, recall, p_edge, r_edge = precision_recall_np(real_features, fake_features, k=3)
    assert abs(noisy_eval["precision"] - precision) <= p_edge / 300 + 1e-7
    assert abs(noisy_eval["recall"] - recall) <= r_edge / 300 + 1e-7
    assert noisy_eval["class_accuracy"] == pytest.approx(np.mean(np.argmax(fake_logits, 1) == labels), abs=1e-7)
    flat = images.reshape(300, -1).astype(np.float64)
    assert noisy_eval["mean_pairwise_distance"] == pytest.approx(scipy.spatial.distance.pdist(flat).mean(), rel=1e-10)
    per_class = {c: scipy.spatial.distance.pdist(flat[labels == c]).mean() for c in range(10)}
    assert noisy_eval["mean_pairwise_distance_per_class"].keys() == per_class.keys()
    for c in range(10):
        assert noisy_eval["mean_pairwise_distance_per_class"][c] == pytest.approx(per_class[c], rel=1e-10)
    assert noisy_eval["mean_pairwise_distance_within_class"] == pytest.approx(np.mean(list(per_class.values())), rel=1e-10)
    assert noisy_eval["num_samples"] == 300 and noisy_eval["num_reference"] == 300


def test_real_test_images_score_perfectly_against_themselves(real_eval, test_outputs):
    assert real_eval["class_accuracy"] >= 0.97
    features = np.asarray(test_outputs[0], np.float64)
    assert abs(real_eval["fid"]) <= fid_np(features, features)[1]
    assert real_eval["precision"] == 1.0 and real_eval["recall"] == 1.0
    assert real_eval["inception_score"] > 9.5


def test_floor_is_small_and_corruption_is_penalised(floor, noisy_eval, real_eval, test_split):
    assert floor["num_samples"] == 1497 and floor["num_reference"] == 300
    assert 0 < floor["fid"] < 10
    assert floor["precision"] > 0.85 and floor["recall"] > 0.85
    assert floor["class_accuracy"] >= 0.97
    assert floor["inception_score"] > 9.5
    assert noisy_eval["fid"] > 10 * floor["fid"]
    assert noisy_eval["class_accuracy"] < real_eval["class_accuracy"]
    assert noisy_eval["precision"] < floor["precision"] - 0.1
    assert noisy_eval["inception_score"] < real_eval["inception_score"]

    images, labels = test_split
    blank = evaluate_digit_samples(np.full_like(images, -1.0), labels)
    assert blank["fid"] > 100 * floor["fid"]
    assert blank["precision"] == 0.0 and blank["recall"] == 0.0
    # One class for every input: IS = exp(KL(p || p)) = 1 and accuracy 1/10.
    assert blank["inception_score"] == pytest.approx(1.0, abs=1e-5)
    assert blank["class_accuracy"] == pytest.approx(0.1)
    assert blank["mean_pairwise_distance"] == 0.0 and blank["mean_pairwise_distance_within_class"] == 0.0


def test_without_labels_and_train_reference(test_split):
    images = test_split[0][:40]
    result = evaluate_digit_samples(images, reference="train")
    assert "class_accuracy" not in result and "mean_pairwise_distance_per_class" not in result
    assert result["num_samples"] == 40 and result["num_reference"] == 1497
    fake = np.asarray(digits_features(images)[0], np.float64)
    real = np.asarray(digits_features(load_digits("train")[0])[0], np.float64)
    fid, tolerance = fid_np(real, fake)
    assert result["fid"] == pytest.approx(fid, abs=tolerance)
    precision, recall, p_edge, r_edge = precision_recall_np(real, fake, k=3)
    assert abs(result["precision"] - precision) <= p_edge / 40 + 1e-7
    assert abs(result["recall"] - recall) <= r_edge / 1497 + 1e-7


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "samples, labels, kwargs, match",
    [
        (np.zeros((10, 8, 8)), None, {}, r"samples: expected shape \[N, 8, 8, 1\]"),
        (np.zeros((10, 16, 16, 1)), None, {}, r"samples: expected shape \[N, 8, 8, 1\].*\(10, 16, 16, 1\)"),
        (np.zeros((3, 8, 8, 1)), None, {}, r"samples: .*N >= 4"),
        (np.zeros((10, 8, 8, 1), np.int32), None, {}, r"samples: expected a float array .*int32"),
        (np.full((10, 8, 8, 1), 255.0), None, {}, r"samples: expected values in \[-1, 1\].*255"),
        (np.full((10, 8, 8, 1), np.nan), None, {}, r"samples: expected finite values"),
        (np.zeros((10, 8, 8, 1)), np.zeros(9, np.int32), {}, r"labels: expected shape \[10\]"),
        (np.zeros((10, 8, 8, 1)), np.zeros(10), {}, r"labels: expected integer .*float64"),
        (np.zeros((10, 8, 8, 1)), np.full(10, 10), {}, r"labels: expected digits in \[0, 10\).*max 10"),
        (np.zeros((10, 8, 8, 1)), None, {"reference": "val"}, r"reference: expected one of \('test', 'train'\), got 'val'"),
        (np.zeros((10, 8, 8, 1)), None, {"batch_size": 0}, r"batch_size: expected a positive int, got 0"),
        (np.zeros((10, 8, 8, 1)), None, {"module": DigitsClassifier()}, r"module, params: expected both or neither"),
    ],
)
def test_evaluate_rejects_bad_input(samples, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_digit_samples(samples, labels, **kwargs)


def test_features_reject_bad_input():
    with pytest.raises(ValueError, match=r"images: expected values in \[-1, 1\]"):
        digits_features(np.full((2, 8, 8, 1), 1.5, np.float32))
    with pytest.raises(ValueError, match=r"batch_size: expected a positive int, got 2.5"):
        digits_features(np.zeros((2, 8, 8, 1), np.float32), batch_size=2.5)
    with pytest.raises(ValueError, match=r"images: expected a concrete array"):
        jax.jit(lambda x: digits_features(x)[0])(jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"conv_channels: expected three positive ints"):
        DigitsClassifier(conv_channels=(8, 8))


# --------------------------------------------------------------------------- re-training (slow)


_RETRAIN = """
import importlib.util, json, sys
import numpy as np
from jdiff.data import load_digits
from jdiff.evaluation import DigitsClassifier, digits_features
spec = importlib.util.spec_from_file_location("tool", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
params, accuracy = tool.train_digits_classifier()
images, labels = load_digits("test")
_, logits = digits_features(images, module=DigitsClassifier(), params=params)
correct = int(np.sum(np.argmax(np.asarray(logits), 1) == labels))
print(json.dumps({"accuracy": accuracy, "correct": correct, "num_test": len(labels)}))
"""


@pytest.mark.slow
def test_retraining_reaches_97_percent():
    """tools/train_digits_classifier.py's 3,000 steps reach 97% on the test split, in a process that
    compiles at XLA's defaults as the tool's users do (the suite's -O0 makes these steps ~2x slower)."""
    import json
    import subprocess
    import sys

    from conftest import xla_defaults_env

    r = subprocess.run([sys.executable, "-c", _RETRAIN, str(REPO / "tools" / "train_digits_classifier.py")],
                       cwd=REPO, env=xla_defaults_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["accuracy"] >= 0.97, result
    assert result["correct"] == round(result["accuracy"] * result["num_test"]), result


# --------------------------------------------------------------------------- evaluating a network


@pytest.fixture(scope="module")
def loaded_tiny():
    """A tiny class-conditional U-Net at its init (no training), as jdiff.workdir would load it."""
    import sys

    sys.path.insert(0, str(REPO))
    from configs import tiny

    from jdiff.train import config as config_lib
    from jdiff.train import network
    from jdiff.workdir import Loaded

    c = tiny.get_config()
    model = network.build_model(c)
    params = network.init_params(model, (8, 8, 1), jax.random.key(0))
    return Loaded(c, model, params, config_lib.make_schedule(c), (8, 8, 1), 0)


def test_evaluate_loaded_clips_samples_outside_the_data_range(loaded_tiny, monkeypatch):
    """A sampler run without clipping overshoots [-1, 1]; the scores use the clipped samples and
    report how much was outside."""
    from jdiff.evaluation import workdir as ev_workdir

    images, _ = load_digits("test")
    overshoot = (images[:12] * 1.5).astype(np.float32)
    monkeypatch.setattr(ev_workdir, "generate", lambda *a, **k: overshoot)
    result = ev_workdir.evaluate_loaded(loaded_tiny, 12, jax.random.key(0))
    np.testing.assert_allclose(result["out_of_range_fraction"], np.mean(np.abs(overshoot) > 1))
    assert result["out_of_range_fraction"] > 0
    want = evaluate_digit_samples(np.clip(overshoot, -1, 1), labels=np.repeat(np.arange(10), [2, 1, 1, 1, 1, 2, 1, 1, 1, 1]))
    assert result["fid"] == pytest.approx(want["fid"])


def test_evaluator_is_chosen_by_name(loaded_tiny, monkeypatch):
    from jdiff.evaluation import evaluators
    from jdiff.evaluation import workdir as ev_workdir

    with pytest.raises(ValueError, match=r"evaluator: unknown evaluator 'nope'; expected '' \(none\) or one of \['digits'"):
        ev_workdir.evaluate_loaded(loaded_tiny, 8, jax.random.key(0), evaluator="nope")
    monkeypatch.setitem(evaluators.EVALUATORS, "mean", evaluators.Evaluator(
        "mean", lambda x, y: {"mean": float(np.mean(x)), "labelled": y is not None}, lambda *a: None, 1))
    monkeypatch.setattr(ev_workdir, "generate", lambda *a, **k: np.full((3, 8, 8, 1), 0.25, np.float32))
    result = ev_workdir.evaluate_loaded(loaded_tiny, 3, jax.random.key(0), evaluator="mean")
    assert result["mean"] == 0.25 and result["labelled"] and result["out_of_range_fraction"] == 0.0
    assert "fid" not in ev_workdir.evaluate_loaded(loaded_tiny, 3, jax.random.key(0), evaluator="")


def test_bits_per_dim_includes_the_remainder_batch_and_does_not_depend_on_batching(loaded_tiny):
    from jdiff.evaluation.workdir import bits_per_dim

    images, _ = load_digits("test")
    by_three = bits_per_dim(loaded_tiny, images[:7], jax.random.key(0), batch_size=3)
    at_once = bits_per_dim(loaded_tiny, images[:7], jax.random.key(0), batch_size=7)
    assert by_three["bpd_examples"] == 7
    for k in ("bits_per_dim", "bpd_prior", "bpd_decoder"):
        assert np.isfinite(by_three[k])
        np.testing.assert_allclose(by_three[k], at_once[k], rtol=1e-5)
