"""Captioned scenes and the tokenizer (jdiff.data.captions): the data layer of text-to-image."""

from __future__ import annotations

import numpy as np
import pytest

from jdiff.data import captions as cap
from jdiff.data.shapes import SHAPE_NAMES


@pytest.fixture(scope="module")
def drawn():
    scene = cap.scenes(400, seed=3)
    images, masks = cap.render_scenes(scene, 32)
    return scene, images, masks


def test_scenes_are_a_function_of_the_seed():
    a, b, c = cap.scenes(50, 1), cap.scenes(50, 1), cap.scenes(50, 2)
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))
    assert not np.array_equal(a.colour, c.colour)


def test_attributes_and_layout(drawn):
    scene, _, _ = drawn
    n = len(scene.count)
    assert set(np.unique(scene.count)) == {1, 2} and 0.4 < (scene.count == 2).mean() < 0.6
    two = scene.count == 2
    assert (scene.position[two, 0] < scene.position[two, 1]).all(), "objects in reading order, distinct quadrants"
    for a, k in ((scene.colour, 6), (scene.shape, 3), (scene.size, 2), (scene.position, 4)):
        assert ((a[:, 0] >= 0) & (a[:, 0] < k)).all() and (a[~two, 1] == -1).all() and (a[two, 1] >= 0).all()
    # Each object lies inside its quadrant: |centre - quadrant centre| + h <= 0.25.
    for k in range(2):
        present = scene.count > k
        q = cap._QUADRANT_CENTRES[scene.position[present, k]]
        h = cap.SIZES[scene.size[present, k]]
        assert (np.abs(scene.centre[present, k] - q).max(axis=1) + h <= 0.25 + 1e-12).all()
    assert np.isnan(scene.centre[~two, 1]).all() and n == 400
    # Every combination of attributes occurs.
    assert len({(c, s, z) for c, s, z in zip(scene.colour[:, 0], scene.shape[:, 0], scene.size[:, 0])}) == 36


def test_rendering_is_exact(drawn):
    scene, images, masks = drawn
    assert images.shape == (400, 32, 32, 3) and masks.shape == (400, 32, 32, 2)
    background = (images == -1.0).all(axis=-1)
    union = masks.sum(axis=-1)
    assert union.max() == 1.0, "two objects never overlap"
    np.testing.assert_array_equal(~background, union > 0)
    for k in range(2):
        present = scene.count > k
        assert (masks[present, ..., k].sum(axis=(1, 2)) > 0).all(), "every object covers pixels at 32x32"
        assert not masks[~present, ..., k].any()
        want = (2.0 * cap.COLOURS[scene.colour[present, k]] - 1.0).astype(np.float32)
        for img, m, w in zip(images[present], masks[present, ..., k], want):
            np.testing.assert_array_equal(img[m > 0], np.broadcast_to(w, (int(m.sum()), 3)))
        # The mask lies in the object's quadrant.
        rows = np.arange(32)[None, :, None] < 16
        cols = np.arange(32)[None, None, :] < 16
        top, left = scene.position[present, k] < 2, scene.position[present, k] % 2 == 0
        inside = (rows == top[:, None, None]) & (cols == left[:, None, None])
        assert not (masks[present, ..., k] * ~inside).any()


def test_small_objects_are_smaller(drawn):
    scene, _, masks = drawn
    area = masks[:, :, :, 0].sum(axis=(1, 2))
    for s in range(3):
        small = area[(scene.shape[:, 0] == s) & (scene.size[:, 0] == 0)]
        large = area[(scene.shape[:, 0] == s) & (scene.size[:, 0] == 1)]
        assert small.max() < large.min(), SHAPE_NAMES[s]


def test_captions_read_the_attributes():
    scene = cap.Scene(count=np.array([2, 1], np.int32), colour=np.array([[0, 2], [3, -1]], np.int32),
                      shape=np.array([[0, 1], [2, -1]], np.int32), size=np.array([[0, 1], [1, -1]], np.int32),
                      position=np.array([[0, 3], [2, -1]], np.int32), centre=np.full((2, 2, 2), 0.5))
    assert cap.captions(scene) == ["a small red disc at the top left and a large blue square at the bottom right",
                                   "a large yellow triangle at the bottom left"]


def test_parse_caption_inverts_captions(drawn):
    scene, _, _ = drawn
    for i, text in enumerate(cap.captions(scene)):
        objects = cap.parse_caption(text)
        assert len(objects) == scene.count[i]
        for k, o in enumerate(objects):
            assert (o["colour"], o["shape"], o["size"], o["position"]) == (
                scene.colour[i, k], scene.shape[i, k], scene.size[i, k], scene.position[i, k])
    assert cap.parse_caption("A  Small RED disc at the top left") == [dict(size=0, colour=0, shape=0, position=0)]


@pytest.mark.parametrize("text,match", [
    ("", "expected a caption"),
    ("a small red disc", "is not 'a SIZE COLOUR SHAPE at the ROW COLUMN'"),
    ("a small purple disc at the top left", "'purple' .* is not a colour"),
    ("a tiny red disc at the top left", "'tiny' .* is not a size"),
    ("a small red disc at the middle left", "'middle left' .* is not a position"),
    ("a small red disc at the top left and a large blue disc at the top left", "same position"),
    (" and ".join(["a small red disc at the top left"] * 3), "3 objects"),
])
def test_parse_caption_names_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        cap.parse_caption(text)


def test_fashion_mnist_captions():
    assert cap.fashion_mnist_captions(np.array([0, 9, 8, 1])) == ["a t-shirt", "an ankle boot", "a bag", "a trouser"]
    tok = cap.Tokenizer(cap.FASHION_MNIST_VOCABULARY, max_length=3)
    ids, mask = tok.encode(cap.fashion_mnist_captions(np.arange(10)))
    assert mask.sum(axis=1).tolist() == [2] * 9 + [3]
    with pytest.raises(ValueError, match=r"labels: expected a \[N\] int array"):
        cap.fashion_mnist_captions(np.array([10]))


def lengths_max(texts):
    return max(len(t.split()) for t in texts)


def test_tokenizer_round_trip_and_padding(drawn):
    scene, _, _ = drawn
    texts = cap.captions(scene)
    tok = cap.Tokenizer()
    ids, mask = tok.encode(texts)
    assert ids.shape == mask.shape == (400, 20) and lengths_max(texts) == 17 and ids.dtype == np.int32 and mask.dtype == bool
    assert tok.decode(ids, mask) == texts
    lengths = np.array([len(t.split()) for t in texts])
    np.testing.assert_array_equal(mask.sum(axis=1), lengths)
    assert (ids[~mask] == 0).all() and (ids[mask] > 0).all()
    assert mask[:, 0].all() and (np.diff(mask.astype(int), axis=1) <= 0).all(), "left-aligned"
    null_ids, null_mask = tok.null(3)
    assert null_ids.shape == (3, 20) and not null_ids.any() and not null_mask.any()
    assert tok.vocab_size == len(cap.SHAPES_VOCABULARY) + 1
    assert tok.encode("A small red disc at the top left")[0][0, 0] == cap.SHAPES_VOCABULARY.index("a") + 1


@pytest.mark.parametrize("texts,match", [
    ([""], r"texts\[0\]: the caption is empty"),
    (["a small red disc", "   "], r"texts\[1\]: the caption is empty"),
    (["a small red dog at the top left"], r"unknown word\(s\) \['dog'\]"),
    ([" ".join(["a"] * 21)], r"21 words, longer than max_length 20"),
    ([3], r"texts\[0\]: expected a string"),
])
def test_tokenizer_bad_input(texts, match):
    with pytest.raises(ValueError, match=match):
        cap.Tokenizer().encode(texts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocabulary: expected distinct"):
        cap.Tokenizer(["a", "a"])
    with pytest.raises(ValueError, match="vocabulary: expected non-empty lower-case"):
        cap.Tokenizer(["A"])
    with pytest.raises(ValueError, match="max_length"):
        cap.Tokenizer(max_length=0)
    with pytest.raises(ValueError, match="resolution: expected an int >= 16"):
        cap.render_scenes(cap.scenes(2, 0), 8)
    with pytest.raises(ValueError, match="max_objects"):
        cap.scenes(2, 0, max_objects=3)
    with pytest.raises(ValueError, match="seed"):
        cap.scenes(2, None)
    one = cap.scenes(100, 0, max_objects=1)
    assert (one.count == 1).all()
