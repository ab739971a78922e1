"""The text encoder and the CLIP-style model (jdiff.models.text, jdiff.train.clip)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.data import captions as cap
from jdiff.models.text import CLIP, TextEncoder
from jdiff.train import clip as tc


@pytest.fixture(scope="module")
def encoder():
    enc = TextEncoder(vocab_size=30, max_length=8, width=16, layers=2, heads=2)
    ids = np.array([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12]], np.int32)
    mask = ids > 0
    params = jax.jit(enc.init)(jax.random.key(0), ids, mask)["params"]  # one program, not one per operation
    return enc, params, jax.jit(lambda p, i, m: enc.apply({"params": p}, i, m)), ids, mask


def test_padding_never_changes_the_output(encoder):
    enc, params, apply, ids, mask = encoder
    tokens, pooled = apply(params, ids, mask)
    other = ids.copy()
    other[0, 3:] = [20, 21, 22]  # different ids at padded positions
    tokens2, pooled2 = apply(params, other, mask)
    np.testing.assert_allclose(np.asarray(tokens2)[0, :3], np.asarray(tokens)[0, :3], atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled2)[0], np.asarray(pooled)[0], atol=1e-6)
    assert not np.asarray(tokens)[0, 3:].any(), "padded positions' features are zero"
    # The pooled vector is the mean of the real tokens' features.
    np.testing.assert_allclose(np.asarray(pooled)[0], np.asarray(tokens)[0, :3].mean(axis=0), atol=1e-6)
    # A shorter padding (L = 4) gives the same features for the real tokens.
    t4, p4 = apply(params, ids[:1, :4], mask[:1, :4])
    np.testing.assert_allclose(np.asarray(p4)[0], np.asarray(pooled)[0], atol=1e-5)


def test_the_null_caption_is_zero(encoder):
    _, params, apply, ids, _ = encoder
    tokens, pooled = apply(params, ids, np.zeros_like(ids, bool))
    assert np.isfinite(np.asarray(tokens)).all() and not np.asarray(tokens).any() and not np.asarray(pooled).any()


def test_text_encoder_bad_input(encoder):
    enc, params, _, ids, mask = encoder
    with pytest.raises(ValueError, match=r"ids: expected ids in \[0, 30\)"):
        enc.apply({"params": params}, np.array([[30]], np.int32))
    with pytest.raises(ValueError, match="more than max_length 8"):
        enc.apply({"params": params}, np.zeros((1, 9), np.int32))
    with pytest.raises(ValueError, match="ids: expected int token ids"):
        enc.apply({"params": params}, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="mask: expected a bool array of shape"):
        enc.apply({"params": params}, ids, mask.astype(np.int32))
    with pytest.raises(ValueError, match="heads: expected a divisor of width 16"):
        TextEncoder(vocab_size=30, width=16, heads=3)
    with pytest.raises(ValueError, match="vocab_size: expected a positive int"):
        TextEncoder(vocab_size=0)


def test_clip_loss_is_symmetric_infonce():
    rng = np.random.RandomState(0)
    i, t = rng.randn(5, 4), rng.randn(5, 4)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    s = 7.0
    logits = s * i @ t.T

    def ce(rows):  # -log softmax at the diagonal, per row, in float64
        return np.mean([np.log(np.exp(r).sum()) - r[k] for k, r in enumerate(rows)])

    want = 0.5 * (ce(logits) + ce(logits.T))
    got = float(jax.jit(tc.clip_loss)(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), jnp.float32(s)))
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want))


def test_clip_embeddings_are_unit_vectors():
    tok = cap.Tokenizer()
    scene = cap.scenes(3, 0)
    images, _ = cap.render_scenes(scene, 32)
    ids, mask = tok.encode(cap.captions(scene))
    model = CLIP(vocab_size=tok.vocab_size, max_length=tok.max_length, embed_dim=8, text_width=16, text_heads=2,
                 image_channels_base=8)
    # Jitted: an eager init compiles each of its operations separately (~10 s of the test).
    params = jax.jit(model.init)(jax.random.key(0), images, jnp.zeros((3,), jnp.int32), ids, mask)["params"]
    ie, te, scale = jax.jit(lambda p: model.apply({"params": p}, images, jnp.zeros((3,), jnp.int32), ids, mask))(params)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ie), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(te), axis=1), 1.0, atol=1e-5)
    assert abs(float(scale) - 1 / 0.07) < 1e-3


def test_retrieval_accuracy_by_hand():
    e = np.eye(3)
    texts = ["a", "b", "a"]
    # Image 1 matches text 0 ("a") instead of its own "b": wrong; image 2 retrieves text 0, also "a": right.
    text_emb = np.array([e[0], e[0], e[2]]) * [[1], [0.5], [1]]
    image_emb = np.array([e[0], e[0], e[0]])
    acc = tc.retrieval_accuracy(image_emb, text_emb, texts)
    assert acc["image_to_text"] == 2 / 3


@pytest.mark.slow
def test_clip_learns_zero_shot_retrieval():
    """200 steps of a small CLIP on 16x16 scenes (launch.train_clip's default size): held-out
    image -> caption retrieval among 100 (chance ~1%)."""
    # Measured: 0.77 image -> text and 0.84 text -> image, for a third of the CPU of 32x32 scenes
    # (0.83 and 0.84).
    model, params, _ = tc.train_clip(num_steps=200, batch_size=32, resolution=16, image_channels_base=16, text_width=32,
                                     embed_dim=32, text_heads=2)
    scene = cap.scenes(100, seed=[99, 1])
    images, _ = cap.render_scenes(scene, 16)
    texts = cap.captions(scene)
    ids, mask = cap.Tokenizer().encode(texts)
    ie, te = tc.embed(model, params, images, np.zeros(100, np.int32), ids, mask)
    acc = tc.retrieval_accuracy(ie, te, texts)
    assert acc["image_to_text"] > 0.6 and acc["text_to_image"] > 0.6, acc
