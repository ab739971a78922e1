"""LoRA (Hu et al. 2021): the param-level functions of jdiff.lora and the jdiff.models.LoRA wrapper.

One tiny class-conditional U-Net with attention (8x8 images) is built, initialised and compiled
once per module; every network test shares its jitted apply functions.
"""

import os
import sys

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from jdiff import lora
from jdiff.models import MODELS, LoRA, UNet, build, registry
from jdiff.train import network
from jdiff.train.state import merge_params, param_paths, split_params

TINY_UNET = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=1,
                 dropout=0.0, num_classes=10)
RANK, ALPHA = 2, 3.0  # alpha != rank, so a missing or inverted alpha / r scale shows
IMAGE_SHAPE = (8, 8, 1)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflat(d: dict) -> dict:
    return traverse_util.unflatten_dict(d, sep="/")


def random_like(tree, seed: int, scale: float = 0.1):
    """Gaussian noise of each leaf's shape and dtype."""
    rng = np.random.default_rng(seed)  # cast in NumPy: an eager cast would compile once per leaf shape
    return jax.tree.map(lambda p: jnp.asarray((scale * rng.standard_normal(np.shape(p))).astype(p.dtype)), tree)


def with_random_b(factors, seed: int) -> dict:
    """The factors with every b replaced by nonzero noise (a trained-looking update)."""
    out = dict(flat(factors))
    rng = np.random.default_rng(seed)
    for k in out:
        if k.endswith("/b"):
            out[k] = jnp.asarray((0.1 * rng.standard_normal(out[k].shape)).astype(out[k].dtype))
    return unflat(out)


@pytest.fixture(scope="module")
def net():
    """The wrapper, its params (inner params perturbed so the U-Net's output is not the zeros of
    its zero-initialised head: a stand-in for a trained base), inputs and jitted apply functions."""
    module = LoRA(model_name="unet", model=TINY_UNET, rank=RANK, alpha=ALPHA)
    params = network.init_params(module, IMAGE_SHAPE, jax.random.key(0))  # jitted with the module static
    # Summed in NumPy (float32, as XLA would): an eager add would compile once per leaf shape.
    base = jax.tree.map(lambda p, n: jnp.asarray(np.asarray(p) + np.asarray(n)), params["model"],
                        random_like(params["model"], 1))
    params = {"model": base, "lora": params["lora"]}
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2,) + IMAGE_SHAPE), jnp.float32)
    t = jnp.array([3, 17], jnp.int32)
    cond = {"label": jnp.array([1, 10], jnp.int32)}  # a class and the null class
    wrapped = jax.jit(lambda p: module.apply({"params": p}, x, t, cond=cond))
    inner = jax.jit(lambda p: module.inner.apply({"params": p}, x, t, cond=cond))
    return dict(module=module, params=params, wrapped=wrapped, inner=inner)


# ---------------------------------------------------------------- the wrapper module

def test_params_are_the_inner_tree_under_model_and_the_factors_under_lora(net):
    module, params = net["module"], net["params"]
    inner_own = jax.eval_shape(lambda: module.inner.init(
        jax.random.key(0), jnp.zeros((1,) + IMAGE_SHAPE), jnp.zeros((1,), jnp.int32),
        cond={"label": jnp.zeros((1,), jnp.int32)})["params"])
    shapes = lambda tree: {k: (tuple(v.shape), v.dtype) for k, v in flat(tree).items()}  # noqa: E731
    assert shapes(params["model"]) == shapes(inner_own)
    assert set(params) == {"model", "lora"}
    assert "model/encoder/conv_in/kernel" in param_paths(params)

    factor_paths = param_paths(params["lora"])
    kernels = sorted({p.rpartition("/")[0] for p in factor_paths})
    assert kernels == lora.target_paths(params["model"])
    assert {"encoder/down_1_attn_0/q/kernel", "encoder/mid_attn/proj_out/kernel", "decoder/up_1_attn_0/v/kernel",
            "encoder/down_0_block_0/conv1/kernel", "decoder/up_0_block_1/conv2/kernel"} <= set(kernels)
    assert not any("time_embed" in k or "conv_in" in k or "conv_out" in k or "nin_shortcut" in k for k in kernels)
    model, fl = flat(params["model"]), flat(params["lora"])
    for k in kernels:
        shape = model[k].shape
        assert fl[f"{k}/a"].shape == (int(np.prod(shape[:-1])), RANK) and fl[f"{k}/b"].shape == (RANK, shape[-1]), k
    # Initialisation (Hu et al. sec. 4.1): b = 0, a ~ N(0, 1 / fan_in).
    assert all(not np.any(v) for k, v in fl.items() if k.endswith("/b"))
    a_conv = np.asarray(fl["encoder/down_0_block_0/conv1/kernel/a"])  # [72, 2]
    assert a_conv.std() == pytest.approx(72 ** -0.5, rel=0.25)


def test_at_init_the_wrapper_is_bit_identical_to_the_inner_unet(net):
    params = net["params"]
    out = net["wrapped"](params)
    ref = net["inner"](params["model"])
    chex.assert_shape(out, (2,) + IMAGE_SHAPE)
    assert float(jnp.abs(ref).max()) > 1e-3  # the perturbed head makes the comparison meaningful
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_with_nonzero_factors_the_wrapper_is_the_inner_unet_on_merged_params(net):
    params = net["params"]
    factors = with_random_b(params["lora"], 3)
    out = net["wrapped"]({"model": params["model"], "lora": factors})
    merged = jax.jit(lora.merge, static_argnums=2)(params["model"], factors, ALPHA)  # one program, not op by op
    ref = net["inner"](merged)
    base = net["inner"](params["model"])
    assert float(jnp.abs(out - base).max()) > 1e-3  # the update changes the output...
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)  # ...exactly as merged


def test_gradients_reach_b_and_not_a_at_init(net):
    """With b = 0, dL/da = scale * dL/dW_flat @ b^T = 0 while dL/db = scale * a^T dL/dW_flat != 0
    (the known asymmetry of LoRA's initialisation: only b moves on the first step)."""
    module, params = net["module"], net["params"]
    trainable, frozen = split_params(params, "lora/.*")
    assert set(trainable) == {"lora"} and set(frozen) == {"model"}
    target = jnp.asarray(np.random.default_rng(4).standard_normal((2,) + IMAGE_SHAPE), jnp.float32)
    x = target * 0.5
    t = jnp.array([3, 17], jnp.int32)
    cond = {"label": jnp.array([1, 10], jnp.int32)}

    def loss(train):
        out = module.apply({"params": merge_params(train, frozen)}, x, t, cond=cond)
        return jnp.mean((out - target) ** 2)

    grads = flat(jax.jit(jax.grad(loss))(trainable))
    assert set(grads) == {f"lora/{k}" for k in flat(params["lora"])}
    b_norms = {k: float(jnp.linalg.norm(g)) for k, g in grads.items() if k.endswith("/b")}
    a_grads = {k: g for k, g in grads.items() if k.endswith("/a")}
    assert all(n > 0 for n in b_norms.values()), {k: n for k, n in b_norms.items() if n == 0}
    for k, g in a_grads.items():
        np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=k)


def test_registry_config_hash_and_inner_attributes():
    assert MODELS["lora"] is LoRA and registry.resolve("lora") is LoRA
    cfg = ml_collections.ConfigDict({"model_name": "unet", "model": {**TINY_UNET, "channel_mult": [1, 2]},
                                     "rank": RANK, "alpha": ALPHA})
    module = build("lora", cfg)  # a ConfigDict with a list, as command-line overrides give
    same = LoRA(model=TINY_UNET, rank=RANK, alpha=ALPHA)
    assert module == same and hash(module) == hash(same)
    assert hash(LoRA(model=TINY_UNET, rank=RANK + 1)) != hash(module)
    assert (module.num_classes, module.image_channels, module.context_dim, module.aug_level_embedding,
            module.learn_sigma, module.out_channels, module.control_channels) == (10, 0, None, False, False, None, ())
    assert network.class_conditional(module) and network.example_cond(module, IMAGE_SHAPE).keys() == {"label"}
    sr = LoRA(model={**TINY_UNET, "num_classes": None, "image_channels": 3, "learn_sigma": True, "out_channels": 2})
    assert (sr.num_classes, sr.image_channels, sr.learn_sigma, sr.out_channels) == (None, 3, True, 2)
    assert LoRA(model_name="controlnet", model={**TINY_UNET, "control_channels": (1, 2), "control_scale": (1.0, 1.0)}
                ).control_channels == (1, 2)
    assert module.scale == ALPHA / RANK
    assert build("lora", module.meta) == module  # meta rebuilds the module


def test_a_lora_inside_another_module_adds_no_stray_submodule():
    """The inner network is built detached: constructed inside a parent's compact method, flax
    would otherwise attach it to the parent (a stray "UNet_0" shifting the parent's autonames)."""
    import flax.linen as nn

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x, t, cond):
            return LoRA(model=TINY_UNET, rank=RANK)(x, t, cond=cond) + UNet(**TINY_UNET)(x, t, cond)

    x, t = jnp.zeros((1,) + IMAGE_SHAPE), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: Outer().init(jax.random.key(0), x, t, {"label": jnp.zeros((1,), jnp.int32)}))
    assert set(shapes["params"]) == {"LoRA_0", "UNet_0"}
    assert set(shapes["params"]["LoRA_0"]) == {"model", "lora"}


# ---------------------------------------------------------------- the pure functions

def small_params():
    """A Dense kernel inside an attention module, a conv kernel of a residual block, and leaves
    that must not be touched."""
    rng = np.random.default_rng(5)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"mid_attn": {"q": {"kernel": f32(6, 5), "bias": f32(5)}, "norm": {"scale": f32(6)}},
            "block": {"conv1": {"kernel": f32(3, 3, 4, 5), "bias": f32(5)}, "temb_proj": {"kernel": f32(7, 5)}}}


def merge_reference(params, factors, alpha):
    """W + (alpha / r) a b in float64 NumPy (Hu et al. 2021, eq. 3), a b reshaped to W's shape."""
    out = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
    for k, w in list(out.items()):
        if f"{k}/a" in flat(factors):
            a = np.asarray(flat(factors)[f"{k}/a"], np.float64)
            b = np.asarray(flat(factors)[f"{k}/b"], np.float64)
            out[k] = w + (alpha / a.shape[1]) * (a @ b).reshape(w.shape)
    return out


class PureFunctionsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_matches_float64_numpy_and_unmerge_inverts_it(self):
        params = small_params()
        factors = lora.init(jax.random.key(1), params, rank=3)
        assert sorted(k.rpartition("/")[0] for k in flat(factors) if k.endswith("/a")) == [
            "block/conv1/kernel", "mid_attn/q/kernel"]
        factors = with_random_b(factors, 6)
        alpha = 5.0
        merged = self.variant(lora.merge, static_argnums=2)(params, factors, alpha)
        want = merge_reference(params, factors, alpha)
        got = flat(merged)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == jnp.float32, k
            np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=1e-6, atol=1e-6, err_msg=k)
        for k in ("mid_attn/q/bias", "mid_attn/norm/scale", "block/conv1/bias", "block/temb_proj/kernel"):
            np.testing.assert_array_equal(got[k], flat(params)[k], err_msg=k)
        for k in ("mid_attn/q/kernel", "block/conv1/kernel"):
            assert not np.allclose(got[k], flat(params)[k]), k  # the update is not negligible

        restored = flat(self.variant(lora.unmerge, static_argnums=2)(merged, factors, alpha))
        for k, w in flat(params).items():
            err = float(np.max(np.abs(np.asarray(restored[k], np.float64) - np.asarray(w, np.float64))))
            # Two float32 roundings, each at most half an ulp of |merged| or |W| (plus the update's).
            bound = 4 * np.finfo(np.float32).eps * float(np.max(np.abs(got[k])) + np.max(np.abs(w)))
            assert err <= bound, f"{k}: unmerge(merge(W)) - W max abs error {err:.3g} > {bound:.3g}"

    def test_a_conv_update_is_lora_on_the_im2col_matrix(self):
        """conv(x, W + dW) = conv(x, W) + (alpha / r) patches(x) a b, with patches the [kh, kw, in]
        row-major im2col of x: the reshape in merge puts a's rows on the right taps."""
        rng = np.random.default_rng(7)
        params = {"conv1": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)}}
        factors = with_random_b(lora.init(jax.random.key(2), params, rank=2, targets="conv1/kernel"), 8)
        x = rng.standard_normal((1, 5, 5, 4))
        conv = lambda w: jax.lax.conv_general_dilated(  # noqa: E731
            jnp.asarray(x, jnp.float32), w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        update = conv(lora.merge(params, factors, 2.0)["conv1"]["kernel"]) - conv(params["conv1"]["kernel"])
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = np.stack([xp[0, i:i + 5, j:j + 5, :] for i in range(3) for j in range(3)], axis=2)  # [5, 5, 9, 4]
        a, b = (np.asarray(factors["conv1"]["kernel"][n], np.float64) for n in ("a", "b"))
        want = (2.0 / 2) * patches.reshape(5, 5, 36) @ a @ b
        np.testing.assert_allclose(np.asarray(update[0], np.float64), want, rtol=1e-4, atol=1e-4)

    def test_delta_and_num_params(self):
        a = jnp.arange(6.0).reshape(3, 2)
        b = jnp.ones((2, 4))
        d = lora.delta({"a": a, "b": b}, alpha=4.0, shape=(3, 4))
        np.testing.assert_allclose(d, 2.0 * (np.arange(6.0).reshape(3, 2) @ np.ones((2, 4))))
        factors = lora.init(jax.random.key(0), small_params(), rank=2)
        assert lora.num_params(factors) == (6 * 2 + 2 * 5) + (36 * 2 + 2 * 5)
        assert lora.num_params(small_params()) == 30 + 5 + 6 + 180 + 5 + 35


def test_save_load_round_trip_is_exact_and_small(net, tmp_path):
    module, params = net["module"], net["params"]
    factors = with_random_b(params["lora"], 9)
    path = lora.save(tmp_path / "adapter.lora", factors, module.meta)
    loaded, meta = lora.load(path)
    assert set(flat(loaded)) == set(flat(factors))
    for k, v in flat(factors).items():
        got = flat(loaded)[k]
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, np.asarray(v), err_msg=k)
    assert meta == module.meta and build("lora", meta) == module  # the file alone rebuilds the wrapper

    # (fan_in + out) * r scalars per kernel instead of fan_in * out: here 13% of the U-Net's.
    model = flat(params["model"])
    kernels = lora.target_paths(params["model"])
    n_factors = lora.num_params(factors)
    assert n_factors == sum((int(np.prod(model[k].shape[:-1])) + model[k].shape[-1]) * RANK for k in kernels)
    size = os.path.getsize(path)
    full = len(flax.serialization.msgpack_serialize(jax.device_get(params["model"])))
    assert size < 1.2 * 4 * n_factors, (size, n_factors)  # float32 data plus a little metadata
    assert size / full < 0.2, f"LoRA file {size} bytes is {size / full:.2f} of the inner params' {full} bytes"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, r"rank: expected an int >= 1, got 0"),
    ({"rank": 1.5}, r"rank: expected an int >= 1, got 1.5"),
    ({"rank": True}, r"rank: expected an int >= 1, got True"),
    ({"alpha": 0.0}, r"alpha: expected a finite float > 0"),
    ({"alpha": float("nan")}, r"alpha: expected a finite float > 0"),
    ({"targets": "("}, r"targets: '\(' is not a valid regular expression"),
    ({"targets": ""}, r"targets: expected a non-empty regex"),
    ({"model": {"widht": 3}}, r"model \(the fields of 'unet'\): cfg: unknown key\(s\) \['widht'\]"),
    ({"model": [1, 2]}, r"model: expected the inner network's fields as a mapping"),
    ({"model_name": "no_such_net"}, r"model_name: name: unknown model 'no_such_net'"),
    ({"model_name": "lora"}, r"model_name: 'lora' is a LoRA wrapper"),
])
def test_bad_module_fields_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRA(**{"model": TINY_UNET, **kwargs})


def test_bad_rank_and_targets_of_the_pure_functions():
    params, key = small_params(), jax.random.key(0)
    with pytest.raises(ValueError, match=r"rank: expected an int >= 1, got 0"):
        lora.init(key, params, 0)
    with pytest.raises(ValueError, match=r"rank: expected an int >= 1, got 1.5"):
        lora.init(key, params, 1.5)
    with pytest.raises(ValueError, match=r"rank: .* at most min\(fan_in, out\) .* got 6 .*'mid_attn/q/kernel', \(6, 5\)"):
        lora.init(key, params, 6)  # the Dense kernel [6, 5] has rank at most 5
    with pytest.raises(ValueError, match=r"targets: 'nope/.\*' matches no parameter path .* such as \['block/conv1/bias'"):
        lora.init(key, params, 2, targets="nope/.*")
    with pytest.raises(ValueError, match=r"targets: 'mid_attn/.\*' matches 2 param\(s\) that are not kernels"):
        lora.init(key, params, 2, targets="mid_attn/.*")
    with pytest.raises(ValueError, match=r"alpha: expected a finite float > 0"):
        lora.merge(params, lora.init(key, params, 2), -1.0)
    with pytest.raises(ValueError, match=r"factors: kernel path 'other/kernel' is not in params"):
        lora.merge(params, {"other": {"kernel": {"a": jnp.zeros((2, 1)), "b": jnp.zeros((1, 2))}}}, 1.0)


def test_targets_matching_nothing_in_the_network_fail_at_init():
    module = LoRA(model=TINY_UNET, targets="decoder/nothing/kernel")
    with pytest.raises(ValueError, match=r"targets: 'decoder/nothing/kernel' matches no parameter path .*'decoder/"):
        network.init_params(module, IMAGE_SHAPE, jax.random.key(0))


def test_missing_or_foreign_file(tmp_path):
    with pytest.raises(ValueError, match=r"path: no LoRA file at '.*missing.lora'"):
        lora.load(tmp_path / "missing.lora")
    other = tmp_path / "params.msgpack"
    other.write_bytes(flax.serialization.msgpack_serialize({"kernel": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"path: '.*params.msgpack' is not a jdiff LoRA file"):
        lora.load(other)
    with pytest.raises(ValueError, match=r"meta: expected JSON-serialisable values"):
        lora.save(tmp_path / "x.lora", lora.init(jax.random.key(0), small_params(), 2), {"dtype": jnp.float32})


# ---------------------------------------------------------------- end to end

@pytest.mark.slow  # ~30 s: compiles the LoRA init, train step and DDIM sampler of the tiny config
def test_training_lora_factors_only_leaves_the_base_bit_identical(tmp_path):
    """Two steps with config.train.trainable = "lora/.*". The base here is fresh, so its
    zero-initialised output conv, frozen, would block every gradient (LoRA adapts a trained base);
    the targets add that conv (rank 1: it has one output channel), whose b moves in step 1, and
    the update then reaches the b of blocks upstream in step 2."""
    from jdiff import data as data_lib
    from jdiff.train import loop
    from jdiff.train.checkpoint import Checkpointer

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import tiny

    c = tiny.get_config()
    c.sample.num = 4
    c.model_name = "lora"
    c.model = ml_collections.ConfigDict({"model_name": "unet", "model": c.model.to_dict(), "rank": 1, "alpha": 1.0,
                                         "targets": lora.DEFAULT_TARGETS + "|decoder/conv_out/kernel"})
    c.train.trainable = "lora/.*"
    c.train.num_steps = 2
    c.train.checkpoint_every = 1
    c.optim.warmup_steps = 0  # step 1 trains at full rate
    metrics = loop.train_and_evaluate(c, str(tmp_path))
    assert metrics["step"] == 2 and metrics["num_trainable_params"] < 0.2 * metrics["num_params"]

    ck = Checkpointer(str(tmp_path))
    s1, s2 = (ck.manager.restore(s, args=ocp.args.StandardRestore()) for s in (1, 2))
    ck.close()
    # The loop's initial params (its init key is the first of three split from the seed).
    model = network.build_model(c)
    image_shape = data_lib.get_dataset(c.data).image_shape
    init = flat(network.init_params(model, image_shape, jax.random.split(jax.random.key(c.seed), 3)[0],
                                    cond=network.example_batch(model, image_shape)["cond"]))
    frozen1, trained1, frozen2, trained2 = (flat(s[n]) for s in (s1, s2) for n in ("frozen", "params"))
    assert set(frozen2) == {k for k in init if k.startswith("model/")}
    assert set(trained2) == {k for k in init if k.startswith("lora/")} == set(flat(s2["ema_params"]))
    for k, v in frozen2.items():
        np.testing.assert_array_equal(v, init[k], err_msg=k)
        np.testing.assert_array_equal(frozen1[k], init[k], err_msg=k)
    head = "lora/decoder/conv_out/kernel/b"
    assert not np.any(init[head]) and np.any(trained1[head])
    moved = [k for k in trained2 if k.endswith("/b") and k != head and np.any(trained2[k])]
    assert any("/conv2/" in k for k in moved) and any("/proj_out/" in k for k in moved), moved
