"""jdiff.conditioning: the conditioning pytree's check, null values and per-example dropping
(classifier-free guidance training, Ho & Salimans 2022, Algorithm 1)."""

import chex
import jax
import numpy as np
import pytest

from jdiff import conditioning

B, K = 4, 10


def full_cond(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "label": np.array([0, 3, 9, 10], np.int32),
        "image": rng.standard_normal((B, 4, 4, 2)).astype(np.float32),
        "context": rng.standard_normal((B, 3, 5)).astype(np.float32),
        "context_mask": np.array([[True, True, False], [True, False, False], [True, True, True], [False, False, False]]),
        "control": rng.standard_normal((B, 4, 4, 3)).astype(np.float32),
        "aug_level": np.array([0.0, 0.1, 0.5, 0.9], np.float32),
        "tokens": np.array([[3, 4, 0], [5, 0, 0], [0, 0, 0], [1, 2, 3]], np.int32),
    }


def test_kinds():
    assert conditioning.KINDS == ("label", "image", "context", "context_mask", "control", "aug_level", "tokens")
    assert set(conditioning.DROPPABLE) <= set(conditioning.KINDS)


def test_check_accepts_valid_and_partial_conds():
    conditioning.check(full_cond(), B)
    conditioning.check({}, B)
    conditioning.check({"label": np.zeros((B,), np.int32)}, B)
    conditioning.check({"context": np.zeros((B, 2, 3), np.float32)}, B)  # no mask: every token real
    # Static shapes only: works on abstract values.
    conditioning.check(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), full_cond()), B)


@pytest.mark.parametrize(
    "cond, match",
    [
        ([1, 2], r"cond: expected a Mapping with keys from \('label', 'image', 'context', 'context_mask', 'control', "
                 r"'aug_level', 'tokens'\), got list"),
        ({"labels": np.zeros((B,), np.int32)}, r"cond: unknown key\(s\) \['labels'\]; expected keys from \('label', "),
        ({"label": np.zeros((3,), np.int32)}, r"cond\['label'\]: expected shape \[B\] int with B = 4 \(rank 1\), got shape \(3,\)"),
        ({"label": np.int32(3)}, r"cond\['label'\]: expected shape \[B\] int .* got shape \(\)"),
        ({"image": np.zeros((B, 4, 4), np.float32)}, r"cond\['image'\]: expected shape \[B, H, W, Ci\] with B = 4 \(rank 4\), got shape \(4, 4, 4\)"),
        ({"image": np.zeros((5, 4, 4, 1), np.float32)}, r"cond\['image'\]: .* got shape \(5, 4, 4, 1\)"),
        ({"context": np.zeros((2, 3, 5), np.float32)}, r"cond\['context'\]: expected shape \[B, L, D\] with B = 4 .* got shape \(2, 3, 5\)"),
        ({"aug_level": np.zeros((B, 1), np.float32)}, r"cond\['aug_level'\]: expected shape \[B\] with B = 4 .* got shape \(4, 1\)"),
        ({"control": np.zeros((B, 4, 4), np.float32)}, r"cond\['control'\]: expected shape \[B, H, W, Cc\]"),
        ({"label": np.zeros((B,), np.float32)}, r"cond\['label'\]: expected an int array, got dtype float32"),
        ({"context": np.zeros((B, 3, 5), np.float32), "context_mask": np.ones((B, 3), np.int32)},
         r"cond\['context_mask'\]: expected a bool array"),
        ({"context_mask": np.ones((B, 3), bool)}, r"cond\['context_mask'\]: given without cond\['context'\]"),
        ({"context": np.zeros((B, 3, 5), np.float32), "context_mask": np.ones((B, 2), bool)},
         r"cond\['context_mask'\]: expected shape \(4, 3\) .* got shape \(4, 2\)"),
    ],
)
def test_check_rejects(cond, match):
    with pytest.raises(ValueError, match=match):
        conditioning.check(cond, B)


def test_check_uses_the_given_name():
    with pytest.raises(ValueError, match=r"null_cond\['label'\]"):
        conditioning.check({"label": np.zeros((3,), np.int32)}, B, name="null_cond")


def test_null_values_per_key():
    cond = full_cond()
    out = conditioning.null(cond, K)
    assert set(out) == set(cond)
    for k in cond:
        chex.assert_shape(out[k], cond[k].shape)
        assert out[k].dtype == cond[k].dtype, k
    np.testing.assert_array_equal(out["label"], np.full((B,), K))
    np.testing.assert_array_equal(out["context"], np.zeros_like(cond["context"]))
    np.testing.assert_array_equal(out["context_mask"], np.zeros((B, 3), bool))
    np.testing.assert_array_equal(out["control"], np.zeros_like(cond["control"]))
    np.testing.assert_array_equal(out["tokens"], np.zeros_like(cond["tokens"]))  # every position padding
    # Not conditioning that classifier-free guidance removes: kept as they are.
    np.testing.assert_array_equal(out["image"], cond["image"])
    np.testing.assert_array_equal(out["aug_level"], cond["aug_level"])
    assert conditioning.null({}, K) == {}


def test_null_adds_an_empty_mask_to_unmasked_context():
    cond = {"context": np.ones((B, 3, 5), np.float32)}
    out = conditioning.null(cond)
    np.testing.assert_array_equal(out["context_mask"], np.zeros((B, 3), bool))
    np.testing.assert_array_equal(out["context"], np.zeros((B, 3, 5)))


def test_null_label_needs_num_classes():
    with pytest.raises(ValueError, match=r"num_classes: expected the number of classes"):
        conditioning.null({"label": np.zeros((B,), np.int32)})


class TestDrop(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_drop_touches_only_listed_keys_and_dropped_rows(self):
        cond = full_cond(1)
        flags = np.array([True, False, False, True])
        drop = self.variant(conditioning.drop, static_argnums=(2, 3))
        out = drop(cond, flags, K, ("label", "context", "context_mask"))
        assert set(out) == set(cond)
        null = conditioning.null(cond, K)
        for k in ("label", "context", "context_mask"):
            np.testing.assert_array_equal(out[k][flags], null[k][flags])
            np.testing.assert_array_equal(out[k][~flags], cond[k][~flags])
            assert out[k].dtype == cond[k].dtype
        # Unlisted keys: every row as it was.
        for k in ("image", "control", "aug_level"):
            np.testing.assert_array_equal(out[k], cond[k])
        # Only the label.
        only_label = drop(cond, flags, K, ("label",))
        np.testing.assert_array_equal(only_label["label"], np.where(flags, K, cond["label"]))
        for k in set(cond) - {"label"}:
            np.testing.assert_array_equal(only_label[k], cond[k])
        # The control image can be dropped too when asked.
        ctrl = drop(cond, flags, K, ("control",))
        np.testing.assert_array_equal(ctrl["control"], np.where(flags[:, None, None, None], np.float32(0.0), cond["control"]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_drop_with_defaults_and_traced_flags(self):
        cond = {"label": np.array([1, 2, 3, 4], np.int32), "aug_level": np.ones((B,), np.float32)}

        def train_step_like(cond, key):
            # Ho & Salimans 2022, Algorithm 1: c <- null with probability p_uncond.
            return conditioning.drop(cond, jax.random.bernoulli(key, 0.5, (B,)), num_classes=K)

        out = self.variant(train_step_like)(cond, jax.random.key(3))
        dropped = np.asarray(out["label"]) == K
        np.testing.assert_array_equal(np.asarray(out["label"])[~dropped], cond["label"][~dropped])
        np.testing.assert_array_equal(out["aug_level"], cond["aug_level"])
        all_drop = self.variant(conditioning.drop, static_argnums=2)(cond, np.ones((B,), bool), K)
        np.testing.assert_array_equal(all_drop["label"], np.full((B,), K))

    def test_drop_masks_unmasked_context(self):
        cond = {"context": np.ones((B, 2, 3), np.float32)}
        flags = np.array([False, True, False, True])
        out = conditioning.drop(cond, flags)
        np.testing.assert_array_equal(out["context_mask"], np.repeat(~flags[:, None], 2, axis=1))
        np.testing.assert_array_equal(out["context"], np.broadcast_to(np.where(flags[:, None, None], 0.0, 1.0), (B, 2, 3)))
        assert set(conditioning.drop(cond, flags, keys=("context",))) == {"context"}

    def test_drop_of_empty_cond_is_empty(self):
        assert conditioning.drop({}, np.ones((B,), bool)) == {}

    def test_drop_rejects(self):
        cond = full_cond()
        flags = np.zeros((B,), bool)
        with pytest.raises(ValueError, match=r"keys: \['image'\] cannot be dropped .* expected a subset of \('label', "):
            conditioning.drop(cond, flags, K, keys=("label", "image"))
        with pytest.raises(ValueError, match=r"keys: \['aug_level'\] cannot be dropped"):
            conditioning.drop(cond, flags, K, keys=("aug_level",))
        with pytest.raises(ValueError, match=r"drop: expected a bool array of shape \[4\] .* got shape \(3,\)"):
            conditioning.drop(cond, np.zeros((3,), bool), K)
        with pytest.raises(ValueError, match=r"drop: expected a bool array .* dtype float32"):
            conditioning.drop(cond, np.zeros((B,), np.float32), K)
        with pytest.raises(ValueError, match=r"num_classes: expected the number of classes"):
            conditioning.drop(cond, flags)
        with pytest.raises(ValueError, match=r"cond\['control'\]: expected shape \[B, H, W, Cc\] with B = 4"):
            conditioning.drop({**cond, "control": np.zeros((3, 4, 4, 3), np.float32)}, flags, K)
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['mask'\]"):
            conditioning.drop({**cond, "mask": flags}, flags, K)
