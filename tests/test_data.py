"""Tests for jdiff.data: embedded digits, shapes, TFDS (through mock_data), the batch pipeline."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jdiff import data

REPO = pathlib.Path(__file__).resolve().parents[1]
# Per-class counts of the 1,797 UCI digits (optdigits.tes), as the dataset documents them.
UCI_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _mock(num_examples: int):
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


# ----------------------------------------------------------------------------- digits


def test_digits_counts_splits_and_range():
    x_train, y_train = data.load_digits("train")
    x_test, y_test = data.load_digits("test")
    chex.assert_shape(x_train, (1497, 8, 8, 1))
    chex.assert_shape(y_train, (1497,))
    chex.assert_shape(x_test, (300, 8, 8, 1))
    chex.assert_shape(y_test, (300,))
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), np.full(10, 30))
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10) + 30, UCI_CLASS_COUNTS)
    for x in (x_train, x_test):
        assert x.min() == -1.0 and x.max() == 1.0
        # 17 levels v / 8 - 1 and nothing else.
        np.testing.assert_array_equal(np.unique(x), np.arange(17) / 8.0 - 1.0)


def test_digits_split_is_disjoint_and_the_documented_rule():
    with np.load(REPO / "jdiff" / "data" / "digits.npz") as npz:
        labels, test_indices = npz["labels"], npz["test_indices"]
    assert len(np.unique(test_indices)) == 300 and test_indices.min() >= 0 and test_indices.max() < 1797
    expected = []
    for c in range(10):
        members = [i for i, y in enumerate(labels) if y == c]
        expected += [members[int((j + 0.5) * len(members) / 30)] for j in range(30)]
    np.testing.assert_array_equal(test_indices, sorted(expected))


def test_digits_equal_scikit_learn():
    from sklearn.datasets import load_digits as sk_load_digits  # the tool's source of truth

    sk = sk_load_digits()
    with np.load(REPO / "jdiff" / "data" / "digits.npz") as npz:
        test_indices = npz["test_indices"]
    is_test = np.zeros(1797, bool)
    is_test[test_indices] = True
    for split, keep in (("train", ~is_test), ("test", is_test)):
        images, labels = data.load_digits(split)
        expected = sk.images[keep].astype(np.float64) / 8.0 - 1.0
        np.testing.assert_allclose(images[..., 0].astype(np.float64), expected, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(labels, sk.target[keep])


def test_digits_tool_regenerates_the_packaged_file():
    spec = importlib.util.spec_from_file_location("make_digits_npz", REPO / "tools" / "make_digits_npz.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rebuilt = tool.build_arrays()
    with np.load(REPO / "jdiff" / "data" / "digits.npz") as npz:
        assert sorted(npz.files) == sorted(rebuilt)
        for key, value in rebuilt.items():
            assert npz[key].dtype == value.dtype, key
            np.testing.assert_array_equal(npz[key], value)


@pytest.mark.parametrize("split", ["validation", "TRAIN", "", None, "train[:10%]"])
def test_digits_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        data.load_digits(split)


# ----------------------------------------------------------------------------- shapes


def _reference_masks(params: data.ShapeParams, resolution: int) -> np.ndarray:
    """Float64 rasterisation pixel by pixel; the triangle by the sign of edge cross products."""
    n = params.labels.shape[0]
    out = np.zeros((n, resolution, resolution), bool)
    for k in range(n):
        cx, cy = params.centers[k]
        h = params.sizes[k]
        # Upright equilateral triangle of circumradius h: apex above the centre (y points down).
        verts = [(cx, cy - h), (cx - h * np.sqrt(3) / 2, cy + h / 2), (cx + h * np.sqrt(3) / 2, cy + h / 2)]
        for i in range(resolution):
            for j in range(resolution):
                px, py = (j + 0.5) / resolution, (i + 0.5) / resolution
                if params.labels[k] == 0:
                    inside = np.hypot(px - cx, py - cy) <= h
                elif params.labels[k] == 1:
                    inside = abs(px - cx) <= h and abs(py - cy) <= h
                else:
                    crosses = [
                        (bx - ax) * (py - ay) - (by - ay) * (px - ax)
                        for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1])
                    ]
                    inside = all(c <= 0 for c in crosses) or all(c >= 0 for c in crosses)
                out[k, i, j] = inside
    return out


@pytest.mark.parametrize("resolution", [8, 13, 24])
def test_shapes_match_a_float64_rasterisation(resolution):
    params = data.shape_params(40, seed=3)
    images, labels, masks = data.render_shapes(params, resolution)
    chex.assert_shape(images, (40, resolution, resolution, 3))
    chex.assert_shape(masks, (40, resolution, resolution, 1))
    chex.assert_shape(labels, (40,))
    assert set(labels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(masks[..., 0] == 1.0, _reference_masks(params, resolution))
    expected = np.where(masks == 1.0, 2.0 * params.colors[:, None, None, :] - 1.0, -1.0)
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)


def test_shapes_masks_are_where_the_image_differs_from_background():
    images, labels, masks = data.shapes(500, 16, seed=0)
    assert masks.dtype == np.float32 and set(np.unique(masks).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(masks[..., 0] == 1.0, np.any(images != -1.0, axis=-1))
    assert images.dtype == np.float32 and images.min() >= -1.0 and images.max() <= 1.0
    # One flat colour per shape.
    for k in range(0, 500, 50):
        on = images[k][masks[k, ..., 0] == 1.0]
        np.testing.assert_array_equal(on, np.broadcast_to(on[0], on.shape))


def test_shapes_labels_in_range_and_every_shape_visible():
    _, labels, masks = data.shapes(3000, 8, seed=11)
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < len(data.SHAPE_NAMES)
    counts = np.bincount(labels, minlength=3)
    assert counts.sum() == 3000 and counts.min() > 900  # 1000 expected each, sd ~26
    assert masks.sum(axis=(1, 2, 3)).min() >= 1


def test_shapes_are_deterministic_and_resolution_independent():
    a = data.shapes(64, 16, seed=5)
    b = data.shapes(64, 16, seed=5)
    chex.assert_trees_all_equal(a, b)
    prefix = data.shapes(10, 16, seed=5)
    chex.assert_trees_all_equal(prefix, tuple(x[:10] for x in a))
    other = data.shapes(64, 16, seed=6)
    assert not np.array_equal(a[0], other[0])
    # The same scenes at another resolution: same labels and colours, similar coverage.
    big = data.shapes(64, 48, seed=5)
    np.testing.assert_array_equal(big[1], a[1])
    coverage_small, coverage_big = a[2].mean(axis=(1, 2, 3)), big[2].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(coverage_big, coverage_small, atol=0.12)
    colour = lambda im, m: im[m[..., 0] == 1.0][0]  # noqa: E731
    for k in range(0, 64, 8):
        np.testing.assert_array_equal(colour(big[0][k], big[2][k]), colour(a[0][k], a[2][k]))


def test_shapes_fast():
    start = time.perf_counter()
    images, _, _ = data.shapes(2000, 32, seed=0)
    assert images.shape == (2000, 32, 32, 3)
    assert time.perf_counter() - start < 5.0  # ~0.2 s; generous for a shared machine


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_examples=4, resolution=7, seed=0), "resolution"),
        (dict(num_examples=4, resolution=16.0, seed=0), "resolution"),
        (dict(num_examples=4, resolution=True, seed=0), "resolution"),
        (dict(num_examples=-1, resolution=16, seed=0), "num_examples"),
        (dict(num_examples=2.5, resolution=16, seed=0), "num_examples"),
        (dict(num_examples=4, resolution=16, seed=None), "seed"),
        (dict(num_examples=4, resolution=16, seed=-3), "seed"),
    ],
)
def test_shapes_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        data.shapes(**kwargs)


# ----------------------------------------------------------------------------- tfds


def test_tfds_source_scales_mock_mnist():
    with _mock(12):
        raw = tfds.data_source("mnist", split="train")
        source = data.tfds_source("mnist", "train")
        assert len(source) == 12 and source.image_shape == (28, 28, 1) and source.num_classes == 10
        for i in (0, 5, 11):
            record = source[i]
            assert set(record) == {"image", "label"}
            assert record["image"].dtype == np.float32 and record["label"].dtype == np.int32
            chex.assert_shape(record["image"], (28, 28, 1))
            expected = raw[i]["image"].astype(np.float64) / 127.5 - 1.0
            np.testing.assert_allclose(record["image"], expected, rtol=0, atol=1e-6)
            assert int(record["label"]) == int(raw[i]["label"])
        with pytest.raises(IndexError):
            source[12]
    assert "tensorflow" not in sys.modules


def test_tfds_source_batches_through_the_pipeline():
    with _mock(20):
        source = data.tfds_source("cifar10", "test")
        assert source.image_shape == (32, 32, 3) and source.num_classes == 10
        batch = data.batch_at(source, 3, batch_size=8, seed=1, process_index=0, process_count=1)
        chex.assert_shape(batch["image"], (8, 32, 32, 3))
        chex.assert_shape(batch["label"], (8,))
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        idx = data.batch_indices(3, num_examples=20, batch_size=8, seed=1, process_index=0, process_count=1)
        for row, i in enumerate(idx):
            np.testing.assert_array_equal(batch["image"][row], source[int(i)]["image"])
    assert "tensorflow" not in sys.modules


def test_tfds_source_resize_is_a_block_mean_when_halving():
    with _mock(4):
        raw = tfds.data_source("mnist", split="train")
        source = data.tfds_source("mnist", "train", resolution=14)
        assert source.image_shape == (14, 14, 1)
        for i in range(4):
            x = raw[i]["image"].astype(np.float64) / 127.5 - 1.0
            expected = x.reshape(14, 2, 14, 2, 1).mean(axis=(1, 3))
            np.testing.assert_allclose(source[i]["image"], expected, rtol=0, atol=1e-5)


def test_center_crop_resize():
    rng = np.random.default_rng(0)
    wide = rng.uniform(-1, 1, (6, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(data.center_crop_resize(wide, 6), wide[:, 2:8])
    tall = rng.uniform(-1, 1, (12, 8, 2)).astype(np.float32)
    expected = tall[2:10].astype(np.float64).reshape(4, 2, 4, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(data.center_crop_resize(tall, 4), expected, rtol=0, atol=1e-6)
    up = data.center_crop_resize(tall, 20)
    chex.assert_shape(up, (20, 20, 2))
    assert up.dtype == np.float32 and up.min() >= -1.0 and up.max() <= 1.0
    constant = np.full((5, 5, 1), 0.25, np.float32)
    np.testing.assert_allclose(data.center_crop_resize(constant, 9), np.full((9, 9, 1), 0.25), atol=1e-6)


def test_tfds_source_unlabelled_and_variable_keys():
    with _mock(3):
        # celeb_a has no "label" feature.
        with pytest.raises(ValueError, match="label_key"):
            data.tfds_source("celeb_a", "train")
        source = data.tfds_source("celeb_a", "train", label_key=None, resolution=16)
        assert source.num_classes is None and source.image_shape == (16, 16, 3)
        record = source[0]
        assert set(record) == {"image"}
        chex.assert_shape(record["image"], (16, 16, 3))
        with pytest.raises(ValueError, match="image_key"):
            data.tfds_source("mnist", "train", image_key="pixels")
        with pytest.raises(ValueError, match="resolution"):
            data.tfds_source("mnist", "train", resolution=0)


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "Not A Name!", ""])
def test_tfds_unknown_name_is_a_fast_value_error(name):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="name") as info:
        data.tfds_source(name, "train")
    assert time.perf_counter() - start < 5.0
    if name:
        assert repr(name) in str(info.value)
    assert "tensorflow" not in sys.modules


def test_tfds_bad_split_argument():
    with pytest.raises(ValueError, match="split"):
        data.tfds_source("mnist", "")


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def toy():
    """50 examples whose image encodes the index, so a batch shows which examples it holds."""
    n = 50
    image = np.arange(n, dtype=np.float32)[:, None, None, None] + np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3) / 100
    return {"image": image, "label": np.arange(n, dtype=np.int32)}


def test_batch_order_is_the_documented_permutation(toy):
    n, b, seed = 50, 8, 7
    assert data.steps_per_epoch(n, b) == 6 and data.steps_per_epoch(n, b, drop_remainder=False) == 7
    for step in (0, 5, 6, 13, 40):
        epoch, k = divmod(step, 6)
        expected = np.random.default_rng([seed, 0, epoch]).permutation(n)[k * b : (k + 1) * b]
        idx = data.batch_indices(step, num_examples=n, batch_size=b, seed=seed, process_index=0, process_count=1)
        np.testing.assert_array_equal(idx, expected)
        batch = data.batch_at(toy, step, batch_size=b, seed=seed, process_index=0, process_count=1)
        np.testing.assert_array_equal(batch["label"], expected)
        np.testing.assert_array_equal(batch["image"], toy["image"][expected])


def test_epochs_cover_the_data(toy):
    kw = dict(num_examples=50, batch_size=8, seed=0, process_index=0, process_count=1)
    epoch0 = np.concatenate([data.batch_indices(s, **kw) for s in range(6)])
    epoch1 = np.concatenate([data.batch_indices(s, **kw) for s in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not np.array_equal(epoch0, epoch1)
    full = np.concatenate([data.batch_indices(s, drop_remainder=False, **kw) for s in range(7)])
    np.testing.assert_array_equal(np.sort(full), np.arange(50))
    ordered = np.concatenate([data.batch_indices(s, shuffle=False, drop_remainder=False, **kw) for s in range(7)])
    np.testing.assert_array_equal(ordered, np.arange(50))


@pytest.mark.parametrize("random_flip", [False, True])
def test_resume_gives_the_same_batches(toy, random_flip):
    kw = dict(batch_size=8, seed=3, process_index=0, process_count=1, random_flip=random_flip)
    uninterrupted = list(data.iterate(toy, num_steps=20, **kw))
    for start in (1, 6, 13):
        resumed = list(data.iterate(toy, start_step=start, num_steps=20 - start, **kw))
        chex.assert_trees_all_equal(resumed, uninterrupted[start:])
    for step in (0, 7, 19):
        chex.assert_trees_all_equal(data.batch_at(toy, step, **kw), uninterrupted[step])


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_process_slices_partition_the_global_batch(toy, process_count, drop_remainder):
    kw = dict(batch_size=8, seed=9, drop_remainder=drop_remainder, random_flip=True)
    for step in (0, 5, 6, 12, 13):
        whole = data.batch_at(toy, step, process_index=0, process_count=1, **kw)
        parts = [data.batch_at(toy, step, process_index=p, process_count=process_count, **kw) for p in range(process_count)]
        labels = [p["label"] for p in parts]
        if len(whole["label"]) == 8:
            assert all(len(lab) == 8 // process_count for lab in labels)
        flat = np.concatenate(labels)
        assert len(set(flat.tolist())) == len(flat)
        # Union in process order, flips included, is the global batch.
        chex.assert_trees_all_equal(jnp.asarray(flat), jnp.asarray(whole["label"]))
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])


def test_partial_batch_leaves_some_processes_empty_with_record_sources(toy):
    records = [{"image": toy["image"][i], "label": toy["label"][i]} for i in range(10)]
    kw = dict(batch_size=8, seed=0, drop_remainder=False, process_count=8)
    # Step 1 is the last batch of epoch 0: 2 examples for 8 processes.
    sizes = [len(data.batch_at(records, 1, process_index=p, **kw)["label"]) for p in range(8)]
    assert sizes == [1, 1, 0, 0, 0, 0, 0, 0]
    empty = data.batch_at(records, 1, process_index=5, **kw)
    chex.assert_shape(empty["image"], (0, 2, 2, 3))
    assert empty["image"].dtype == np.float32 and empty["label"].dtype == np.int32


def test_record_and_array_sources_agree(toy):
    records = [{"image": toy["image"][i], "label": toy["label"][i]} for i in range(50)]
    kw = dict(batch_size=10, seed=4, process_index=1, process_count=2, random_flip=True)
    for step in (0, 3, 8):
        chex.assert_trees_all_equal(data.batch_at(records, step, **kw), data.batch_at(toy, step, **kw))
    as_tuple = data.batch_at((toy["image"], toy["label"]), 2, **kw)
    as_jax = data.batch_at({"image": jnp.asarray(toy["image"]), "label": jnp.asarray(toy["label"])}, 2, **kw)
    as_dict = data.batch_at(toy, 2, **kw)
    chex.assert_trees_all_equal(as_tuple, (as_dict["image"], as_dict["label"]))
    chex.assert_trees_all_equal(as_jax, as_dict)
    single = data.batch_at(toy["label"], 2, **kw)
    np.testing.assert_array_equal(single, as_dict["label"])


def test_random_flip_mirrors_images_and_masks_together():
    images, labels, masks = data.shapes(64, 16, seed=2)
    source = {"image": images, "label": labels, "mask": masks}
    kw = dict(batch_size=64, seed=1, process_index=0, process_count=1, shuffle=False)
    plain = data.batch_at(source, 0, **kw)
    chex.assert_trees_all_equal(plain, source)  # flips are off by default
    flipped = data.batch_at(source, 0, random_flip=True, **kw)
    np.testing.assert_array_equal(flipped["label"], labels)
    symmetric = np.array([np.array_equal(im, im[:, ::-1]) for im in images])
    mirrored = np.array([np.array_equal(f, im[:, ::-1]) for f, im in zip(flipped["image"], images)]) & ~symmetric
    kept = np.array([np.array_equal(f, im) for f, im in zip(flipped["image"], images)])
    assert np.all(mirrored | kept) and 16 < mirrored.sum() < 48
    expected_flips = np.random.default_rng([1, 1, 0]).random(64) < 0.5
    for k in range(64):
        mask_k = masks[k, :, ::-1] if expected_flips[k] else masks[k]
        image_k = images[k, :, ::-1] if expected_flips[k] else images[k]
        np.testing.assert_array_equal(flipped["mask"][k], mask_k)
        np.testing.assert_array_equal(flipped["image"][k], image_k)
    np.testing.assert_array_equal(flipped["mask"][..., 0] == 1.0, np.any(flipped["image"] != -1.0, axis=-1))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(batch_size=6, process_count=4, process_index=0), "batch_size"),
        (dict(batch_size=8, process_count=2, process_index=2), "process_index"),
        (dict(batch_size=8, process_count=0, process_index=0), "process_count"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=64), "batch_size"),  # more than the 50 examples, drop_remainder
        (dict(batch_size=8, seed=-1), "seed"),
        (dict(batch_size=8, seed=1.5), "seed"),
        (dict(batch_size=8, step=-2), "step"),
    ],
)
def test_pipeline_bad_arguments(toy, kwargs, argument):
    kw = dict(step=0, seed=0, process_index=0, process_count=1) | kwargs
    step = kw.pop("step")
    with pytest.raises(ValueError, match=argument):
        data.batch_at(toy, step, **kw)


def test_pipeline_bad_sources():
    with pytest.raises(ValueError, match="source"):
        data.batch_at(42, 0, batch_size=1, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="source"):
        ragged = {"a": np.zeros((4, 2)), "b": np.zeros((5,))}
        data.batch_at(ragged, 0, batch_size=1, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="num_steps"):
        data.iterate(np.zeros((4, 2)), batch_size=2, seed=0, num_steps=-1)
    with pytest.raises(ValueError, match="start_step"):
        data.iterate(np.zeros((4, 2)), batch_size=2, seed=0, start_step=-1)


def test_pipeline_defaults_to_this_process():
    idx = data.batch_indices(0, num_examples=50, batch_size=8, seed=0)
    np.testing.assert_array_equal(idx, np.random.default_rng([0, 0, 0]).permutation(50)[:8])


# ----------------------------------------------------------------------------- get_dataset


def test_get_dataset_builtins():
    ds = data.get_dataset({"name": "digits"})
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10 and ds.split == "train"
    chex.assert_shape(ds.source["image"], (1497, 8, 8, 1))
    test = data.get_dataset({"name": "digits", "split": "train"}, split="test")
    chex.assert_shape(test.source["label"], (300,))
    shapes_train = data.get_dataset({"name": "shapes", "resolution": 16, "num_examples": 20, "seed": 4})
    shapes_test = data.get_dataset({"name": "shapes", "resolution": 16, "num_examples": 20, "seed": 4}, split="test")
    assert shapes_train.image_shape == (16, 16, 3) and shapes_train.num_classes == 3
    assert set(shapes_train.source) == {"image", "label", "mask"}
    stored = tuple(shapes_train.source[k] for k in ("image", "label", "mask"))
    chex.assert_trees_all_equal(stored, data.shapes(20, 16, [4, 0]))
    assert not np.array_equal(shapes_train.source["image"], shapes_test.source["image"])


def test_get_dataset_tfds_and_config_dict():
    import ml_collections

    config = ml_collections.ConfigDict({"name": "mnist", "split": "test", "resolution": 14})
    with _mock(6):
        ds = data.get_dataset(config)
        assert isinstance(ds.source, data.TfdsSource) and len(ds.source) == 6
        assert ds.image_shape == (14, 14, 1) and ds.num_classes == 10 and ds.split == "test"


@pytest.mark.parametrize(
    "config, split, argument",
    [
        ({"name": "no_such_dataset_xyz"}, None, "no_such_dataset_xyz"),
        ({}, None, "name"),
        ({"name": "digits", "split": "validation"}, None, "split"),
        ({"name": "digits"}, "valid", "split"),
        ({"name": "digits", "resolution": 16}, None, "resolution"),
        ({"name": "shapes", "split": "validation"}, None, "split"),
        ({"name": "shapes", "seed": -1}, None, "seed"),
        ({"name": "shapes", "resolution": 4}, None, "resolution"),
        (["digits"], None, "config"),
    ],
)
def test_get_dataset_bad_configs(config, split, argument):
    with pytest.raises(ValueError, match=argument) as info:
        data.get_dataset(config, split=split)
    if argument == "no_such_dataset_xyz":
        assert "digits" in str(info.value) and "shapes" in str(info.value)


def test_get_dataset_fashion_mnist_sample_and_builtins():
    assert {"fashion_mnist", "fashion_mnist_sample"} <= set(data.BUILTIN_DATASETS)
    ds = data.get_dataset({"name": "fashion_mnist_sample", "resolution": 14})
    assert ds.image_shape == (14, 14, 1) and ds.num_classes == 10 and ds.name == "fashion_mnist_sample"
    chex.assert_shape(ds.source["image"], (300, 14, 14, 1))
    batch = data.batch_at(ds.source, 5, batch_size=16, seed=1)
    chex.assert_shape(batch["image"], (16, 14, 14, 1))
    assert batch["label"].dtype == np.int32


def test_get_dataset_fashion_mnist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(data.FashionMnistNotFoundError, match=r"apt-get update && apt-get install -y dataset-fashion-mnist"):
        data.get_dataset({"name": "fashion_mnist", "data_dir": str(tmp_path)}, split="test")
