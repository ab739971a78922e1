"""Tests for Fashion-MNIST: the IDX reader, the loader, area downsampling, the shipped sample,
the feature network and the metrics in its feature space, and configs/fashion_mnist.py.

Tests marked by the ``real_files`` fixture read the Debian package's IDX files. Without them
they skip on a developer's machine but FAIL when the environment variable CI is set (CI
installs the package, see .ci/run), so the loader is never silently untested there.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pathlib

import chex
import numpy as np
import pytest

from jdiff import data
from jdiff.data import fashion_mnist as fm
from jdiff.evaluation import fashion_mnist_classifier as fmc
from jdiff.evaluation import sample_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
# Computed once from the files of Debian's dataset-fashion-mnist (identical to the original
# release): the sum of all uint8 pixels and the SHA-256 of the pixel and label bytes.
PIXEL_SUMS = {"train": 3_431_114_169, "test": 573_469_082}
IMAGES_SHA256 = {
    "train": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    "test": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
}
LABELS_SHA256 = {
    "train": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "test": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}
APT_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"


@pytest.fixture(scope="module")
def real_files():
    """The default IDX directory; skip without it, except in CI, where its absence is a failure."""
    directory = pathlib.Path(fm.FASHION_MNIST_DEFAULT_DIR)
    missing = [f for pair in fm.FASHION_MNIST_FILES.values() for f in pair if not (directory / f).exists()]
    if missing:
        message = f"Fashion-MNIST IDX files {missing} missing in {directory}; install them with: {APT_COMMAND}"
        if os.environ.get("CI"):
            pytest.fail("CI is set, so the real-file tests must run: " + message)
        pytest.skip(message)
    return directory


# ----------------------------------------------------------------------------- IDX files


def _write_idx(path, magic, dims, values=None, truncate=0, extra=b""):
    values = np.zeros(dims, np.uint8) if values is None else values
    raw = np.asarray([magic, *dims], ">i4").tobytes() + np.asarray(values, np.uint8).tobytes() + extra
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(raw[: len(raw) - truncate])
    return path


def _write_test_split(directory, n=10_000, image_magic=2051, label_magic=2049, seed=0):
    # Every pixel value occurs, but the pattern compresses: random bytes would make gzip the test's cost.
    images = ((np.arange(n * 28 * 28) * 7 + seed) % 256).astype(np.uint8).reshape(n, 28, 28)
    labels = (np.arange(n) % 10).astype(np.uint8)
    _write_idx(directory / "t10k-images-idx3-ubyte.gz", image_magic, (n, 28, 28), images)
    _write_idx(directory / "t10k-labels-idx1-ubyte.gz", label_magic, (n,), labels)
    return images, labels


def test_read_idx_reads_values_and_checks_the_header(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write_idx(tmp_path / "x.gz", 2051, (2, 3, 4), values)
    np.testing.assert_array_equal(fm.read_idx(path, 2051, (2, 3, 4)), values)
    np.testing.assert_array_equal(fm.read_idx(path, 2051, (None, 3, 4)), values)
    with pytest.raises(ValueError, match=r"x\.gz: expected IDX magic number 2049, got 2051"):
        fm.read_idx(path, 2049, (2, 3, 4))
    with pytest.raises(ValueError, match=r"x\.gz: expected dimensions \(5, 3, 4\).*got \(2, 3, 4\)"):
        fm.read_idx(path, 2051, (5, 3, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"truncate": 1}, r"expected 40 bytes .*truncated or corrupt.*got 39"),
        ({"extra": b"\0"}, r"expected 40 bytes .*got 41"),
        ({"truncate": 34}, r"expected an IDX header of 16 bytes, got a file of 6 bytes"),
    ],
)
def test_read_idx_rejects_truncated_and_padded_files(tmp_path, kwargs, match):
    path = _write_idx(tmp_path / "bad.gz", 2051, (2, 2, 6), **kwargs)
    with pytest.raises(ValueError, match=r"bad\.gz: " + match):
        fm.read_idx(path, 2051, (2, 2, 6))


def test_read_idx_rejects_a_corrupt_gzip(tmp_path):
    path = _write_idx(tmp_path / "c.gz", 2049, (100,))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # a cut-off download
    with pytest.raises(ValueError, match=r"c\.gz: expected a gzip-compressed IDX file"):
        fm.read_idx(path, 2049, (100,))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"c\.gz: expected a gzip-compressed IDX file"):
        fm.read_idx(path, 2049, (100,))


def test_loader_reads_a_synthetic_split_from_data_dir(tmp_path):
    images, labels = _write_test_split(tmp_path)
    x, y = data.load_fashion_mnist("test", data_dir=str(tmp_path))
    chex.assert_shape(x, (10_000, 28, 28, 1))
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    np.testing.assert_array_equal(y, labels)
    ds = data.get_dataset({"name": "fashion_mnist", "data_dir": str(tmp_path), "resolution": 14}, split="test")
    assert ds.image_shape == (14, 14, 1) and ds.num_classes == 10 and ds.name == "fashion_mnist"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 9_999}, r"t10k-images-idx3-ubyte\.gz: expected dimensions \(10000, 28, 28\)"),
        ({"image_magic": 2049}, r"t10k-images-idx3-ubyte\.gz: expected IDX magic number 2051, got 2049"),
        ({"label_magic": 2051}, r"t10k-labels-idx1-ubyte\.gz: expected IDX magic number 2049, got 2051"),
    ],
)
def test_loader_rejects_wrong_counts_and_magic(tmp_path, kwargs, match):
    _write_test_split(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=match):
        data.load_fashion_mnist("test", data_dir=str(tmp_path))


def test_loader_rejects_labels_out_of_range(tmp_path):
    _write_test_split(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, (10_000,), np.full(10_000, 10, np.uint8))
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte\.gz: expected labels in \[0, 10\)"):
        data.load_fashion_mnist("test", data_dir=str(tmp_path))


def test_one_missing_file_is_named(tmp_path):
    _write_test_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.FashionMnistNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.* is missing"):
        data.load_fashion_mnist("test", data_dir=str(tmp_path))


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(data.FashionMnistNotFoundError) as info:
        data.get_dataset({"name": "fashion_mnist", "data_dir": str(tmp_path / "nowhere")})
    message = str(info.value)
    assert APT_COMMAND in message and "tfds build fashion_mnist --file_format=array_record" in message
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path / "nowhere") in message
    assert isinstance(info.value, FileNotFoundError)


def test_tfds_fallback_when_the_idx_files_are_absent(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        x, y = data.load_fashion_mnist("test", data_dir=str(tmp_path), resolution=14)
    chex.assert_shape(x, (7, 14, 14, 1))
    assert x.dtype == np.float32 and y.dtype == np.int32 and -1.0 <= x.min() <= x.max() <= 1.0
    assert 0 <= y.min() and y.max() < 10


def test_bad_split_and_resolution():
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'test'\)"):
        data.get_dataset({"name": "fashion_mnist", "split": "validation"})
    with pytest.raises(ValueError, match=r"resolution: expected None \(28\) or an int in \[1, 28\]"):
        data.get_dataset({"name": "fashion_mnist_sample", "resolution": 32})


def test_image_shape_of_reads_no_files(tmp_path, monkeypatch):
    """A Fashion-MNIST config's image shape follows from its split and resolution, checked as the
    loader checks them: sampling a workdir trained on it reads none of the 60,000 images (a load
    at resolution 14 cost ~3 s of every launch.sample and launch.train), and needs none."""
    want = {r: data.get_dataset({"name": "fashion_mnist_sample", "resolution": r}).image_shape for r in (None, 14, 12)}

    def refused(*args, **kwargs):
        raise AssertionError("image_shape_of read Fashion-MNIST")

    monkeypatch.setattr(fm, "load_fashion_mnist_uint8", refused)
    monkeypatch.setattr(fm, "load_fashion_mnist_sample", refused)
    for r, shape in want.items():
        for name in ("fashion_mnist", "fashion_mnist_sample"):
            assert data.image_shape_of({"name": name, "resolution": r}) == tuple(shape) == ((r or 28), (r or 28), 1)
    assert data.image_shape_of({"name": "fashion_mnist", "data_dir": str(tmp_path), "split": "test"}) == (28, 28, 1)
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'test'\)"):
        data.image_shape_of({"name": "fashion_mnist", "split": "validation"})
    with pytest.raises(ValueError, match=r"resolution: expected None \(28\) or an int in \[1, 28\]"):
        data.image_shape_of({"name": "fashion_mnist_sample", "resolution": 32})


# ----------------------------------------------------------------------------- area downsampling


def test_area_downsample_halving_is_the_block_mean():
    x = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 2)).astype(np.float32)
    expected = x.reshape(3, 14, 2, 14, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(data.area_downsample(x, 14), expected, atol=1e-6)
    np.testing.assert_array_equal(data.area_downsample(x, 28), x)


@pytest.mark.parametrize("resolution", [16, 12, 7])
def test_area_downsample_is_the_area_integral(resolution):
    # Nearest-upsampling by u = R / gcd(28, R) makes every footprint a whole u*28/R block, whose
    # plain mean is the exact area integral of the piecewise-constant image.
    x = np.random.default_rng(1).uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
    u = resolution // np.gcd(28, resolution)
    fine = np.repeat(np.repeat(x.astype(np.float64), u, axis=1), u, axis=2)
    block = 28 * u // resolution
    expected = fine.reshape(2, resolution, block, resolution, block, 1).mean(axis=(2, 4))
    got = data.area_downsample(x, resolution)
    chex.assert_shape(got, (2, resolution, resolution, 1))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # A mean: constants stay constant, the total mass is kept, the range is kept.
    np.testing.assert_allclose(data.area_downsample(np.full((1, 28, 28, 1), 0.25), resolution), 0.25, atol=1e-7)
    np.testing.assert_allclose(got.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)
    assert -1.0 <= got.min() and got.max() <= 1.0


def test_area_downsample_bad_arguments():
    with pytest.raises(ValueError, match=r"resolution: expected an int in \[1, 28\]"):
        data.area_downsample(np.zeros((1, 28, 28, 1)), 29)
    with pytest.raises(ValueError, match=r"images: expected square images"):
        data.area_downsample(np.zeros((1, 28, 14, 1)), 7)


# ----------------------------------------------------------------------------- the shipped sample


def test_committed_sample():
    with np.load(REPO / "jdiff" / "data" / "fashion_mnist_sample.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"images", "labels", "test_indices"}
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (300, 28, 28)
        idx = npz["test_indices"]
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 10_000
    x, y = data.load_fashion_mnist_sample()
    chex.assert_shape(x, (300, 28, 28, 1))
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 30))
    assert x.min() == -1.0 and x.max() == 1.0
    small = data.get_dataset({"name": "fashion_mnist_sample", "resolution": 14})
    assert small.image_shape == (14, 14, 1)
    np.testing.assert_allclose(small.source["image"], data.area_downsample(x, 14), atol=1e-6)


# ----------------------------------------------------------------------------- the real files


def test_real_files_counts_balance_and_checksums(real_files):
    for split, n in fm.FASHION_MNIST_SPLIT_SIZES.items():
        images, labels = fm.load_fashion_mnist_uint8(split)
        assert images.shape == (n, 28, 28) and labels.shape == (n,)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
        assert int(images.sum(dtype=np.int64)) == PIXEL_SUMS[split]
        assert hashlib.sha256(images.tobytes()).hexdigest() == IMAGES_SHA256[split]
        assert hashlib.sha256(labels.tobytes()).hexdigest() == LABELS_SHA256[split]


def test_real_files_through_get_dataset(real_files):
    train = data.get_dataset({"name": "fashion_mnist"})
    chex.assert_shape(train.source["image"], (60_000, 28, 28, 1))
    assert train.source["image"].dtype == np.float32 and train.source["label"].dtype == np.int32
    assert train.image_shape == (28, 28, 1) and train.num_classes == 10
    test = data.get_dataset({"name": "fashion_mnist", "resolution": 16}, split="test")
    chex.assert_shape(test.source["image"], (10_000, 16, 16, 1))
    batch = data.batch_at(train.source, 3, batch_size=8, seed=0)
    chex.assert_shape(batch["image"], (8, 28, 28, 1))


def test_sample_is_the_documented_subset_of_the_test_split(real_files):
    tool = _load_module(REPO / "tools" / "make_fashion_mnist_sample.py")
    images, labels = fm.load_fashion_mnist_uint8("test")
    with np.load(REPO / "jdiff" / "data" / "fashion_mnist_sample.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["test_indices"], tool.sample_indices(labels))
        np.testing.assert_array_equal(npz["images"], images[npz["test_indices"]])
        np.testing.assert_array_equal(npz["labels"], labels[npz["test_indices"]])


# ----------------------------------------------------------------------------- the feature network


@pytest.fixture(scope="module")
def sample():
    return data.load_fashion_mnist_sample()


def test_shipped_classifier_metadata_and_file():
    meta = fmc.load_fashion_mnist_classifier_metadata()
    assert meta["test_accuracy"] >= 0.92 and meta["seed"] == 0 and meta["num_steps"] > 0
    path = REPO / "jdiff" / "evaluation" / "fashion_mnist_classifier.npz"
    with np.load(path, allow_pickle=False) as npz:
        params = [k for k in npz.files if k.startswith("params/")]
        assert params and all(npz[k].dtype == np.float32 for k in params)


def test_shipped_classifier_on_the_sample(sample):
    images, labels = sample
    features, logits = fmc.fashion_mnist_features(images, batch_size=128)
    chex.assert_shape(features, (300, fmc.FASHION_MNIST_FEATURE_DIM))
    chex.assert_shape(logits, (300, 10))
    assert float(np.mean(np.argmax(np.asarray(logits), 1) == labels)) >= 0.9
    # Padding to the batch size does not change any image's outputs.
    f2, _ = fmc.fashion_mnist_features(images[:7], batch_size=4)
    np.testing.assert_allclose(f2, features[:7], rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_checks(tmp_path):
    module, params = fmc.load_fashion_mnist_classifier()
    path = tmp_path / "c.npz"
    fmc.save_fashion_mnist_classifier(path, params, test_accuracy=0.5, seed=3, num_steps=7)
    assert fmc.load_fashion_mnist_classifier_metadata(path) == {"test_accuracy": 0.5, "seed": 3, "num_steps": 7}
    _, loaded = fmc.load_fashion_mnist_classifier(path)
    chex.assert_trees_all_equal(jax_to_np(loaded), jax_to_np(params))
    bad = {"params": dict(params["params"], head={"kernel": np.zeros((3, 10)), "bias": np.zeros(10)})}
    with pytest.raises(ValueError, match=r"params: .*wrong shapes .*head/kernel"):
        fmc.save_fashion_mnist_classifier(tmp_path / "d.npz", bad, test_accuracy=0.5, seed=0, num_steps=1)


def jax_to_np(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------- metrics in its feature space


@pytest.fixture(scope="module")
def sample_eval(sample):
    return sample_metrics.evaluate_samples(*sample, dataset="fashion_mnist_sample")


def test_sample_against_itself(sample_eval):
    assert abs(sample_eval["fid"]) < 1e-3
    assert sample_eval["precision"] == 1.0 and sample_eval["recall"] == 1.0
    assert sample_eval["class_accuracy"] >= 0.9 and sample_eval["inception_score"] > 6.0
    assert sample_eval["num_samples"] == 300 and sample_eval["num_reference"] == 300
    assert len(sample_eval["mean_pairwise_distance_per_class"]) == 10


def test_degraded_samples_score_worse(sample, sample_eval):
    images, labels = sample
    noise = np.random.default_rng(0).standard_normal(images.shape).astype(np.float32)
    noisy = sample_metrics.evaluate_samples(np.clip(images + 0.5 * noise, -1, 1), labels, "fashion_mnist_sample")
    blank = sample_metrics.evaluate_samples(np.full_like(images[:20], -1.0), labels[:20], "fashion_mnist_sample")
    assert noisy["fid"] > 10 and noisy["class_accuracy"] < sample_eval["class_accuracy"]
    # 20 identical images: their k-NN balls have radius 0, so they cover no real image.
    assert blank["fid"] > noisy["fid"] and blank["recall"] == 0.0
    assert blank["inception_score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "samples, labels, match",
    [
        (np.zeros((10, 8, 8, 1)), None, r"samples: expected shape \[N, 28, 28, 1\] with N >= 4, got \(10, 8, 8, 1\)"),
        (np.zeros((10, 28, 28, 1)), np.full(10, 10), r"labels: expected class labels in \[0, 10\)"),
        (np.full((10, 28, 28, 1), 2.0), None, r"samples: expected values in \[-1, 1\]"),
    ],
)
def test_evaluate_samples_rejects_bad_input(samples, labels, match):
    with pytest.raises(ValueError, match=match):
        sample_metrics.evaluate_samples(samples, labels, dataset="fashion_mnist_sample")


def test_unknown_feature_space_and_the_evaluator_check():
    with pytest.raises(ValueError, match=r"dataset: expected one of \('digits', 'fashion_mnist'"):
        sample_metrics.evaluate_samples(np.zeros((4, 28, 28, 1)), dataset="cifar10")
    sample_metrics.check_fashion_mnist_data((28, 28, 1), 10, "fashion_mnist")
    sample_metrics.check_fashion_mnist_data((28, 28, 1), 10, "fashion_mnist_sample")
    with pytest.raises(ValueError, match=r"config.eval.evaluator: 'fashion_mnist' scores 28x28x1"):
        sample_metrics.check_fashion_mnist_data((14, 14, 1), 10, "fashion_mnist")
    with pytest.raises(ValueError, match=r"config.eval.evaluator"):
        sample_metrics.check_fashion_mnist_data((8, 8, 1), 10, "digits")


def test_real_test_split_and_floor(real_files):
    images, labels = data.load_fashion_mnist("test")
    result = sample_metrics.score_fashion_mnist_samples(images[:200], labels[:200])
    assert result["num_reference"] == 10_000 and result["num_samples"] == 200
    assert result["class_accuracy"] >= 0.88
    # 200 real test images vs all 10,000 and 200 real train images vs the same: the same regime.
    assert 0 < result["fid_floor"] < 3 * result["fid"] + 5 and result["fid"] < 3 * result["fid_floor"] + 5
    train, train_labels = sample_metrics.fashion_mnist_train_subset(1000)
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.full(10, 100))


# ----------------------------------------------------------------------------- configs


def _load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arg", [None, "small"])
def test_configs_validate_and_fit_28(arg):
    from jdiff.train import config as config_lib

    config = _load_module(REPO / "configs" / "fashion_mnist.py").get_config(arg)
    config_lib.validate(config)
    assert 28 % 2 ** (len(config.model.channel_mult) - 1) == 0
    assert config.diffusion.p_uncond == 0.1 and config.model.num_classes == 10
    assert config.eval.evaluator == ("fashion_mnist" if arg is None else "fashion_mnist_sample")
    assert config.data.name == ("fashion_mnist" if arg is None else "fashion_mnist_sample")


def test_config_rejects_unknown_variant():
    with pytest.raises(ValueError, match=r"arg: expected None or 'small'"):
        _load_module(REPO / "configs" / "fashion_mnist.py").get_config("large")


# ----------------------------------------------------------------------------- re-training (slow)


@pytest.mark.manual  # ~15 minutes on 2 cores: python -m pytest -m manual
def test_retraining_reaches_92_percent(real_files):
    tool = _load_module(REPO / "tools" / "train_fashion_mnist_classifier.py")
    _, accuracy = tool.train_fashion_mnist_classifier()
    assert accuracy >= 0.92
