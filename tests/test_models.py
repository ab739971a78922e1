"""jdiff.models: layers against float64 NumPy transcriptions, U-Net / classifier structure.

References: Ho et al. 2020 (DDPM appendix B and the diffusion_tf U-Net: sinusoidal embedding,
residual block, attention block, 35.7M-parameter CIFAR-10 network); Dhariwal & Nichol 2021
(ADM: adaptive group norm, residual up/down blocks, attention pooling); Song et al. 2021
(random Fourier features); Ho & Salimans 2022 (null class of classifier-free guidance).

Cost: three tiny U-Nets (8-16 channels, 8x8 / 16x16), each compiled once in a module-scoped
fixture and run with random parameters drawn in NumPy from ``jax.eval_shape`` (a real init
compiles the random initialisers, so only one network is really initialised).
"""

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdiff import models
from jdiff.models import layers
from jdiff.models.classifier import NoiseAwareClassifier
from jdiff.models.unet import UNet, UNetDecoder, UNetEncoder, cifar10_ddpm_unet

RTOL = ATOL = 1e-5


# ---------------------------------------------------------------- float64 NumPy references


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_groups(c):
    """Largest divisor of c that is <= 32 and leaves >= 2 channels per group (1 for c = 1)."""
    if c == 1:
        return 1
    return max(g for g in range(1, min(32, c // 2) + 1) if c % g == 0)


def np_group_norm(x, p, eps=1e-6):
    """Wu & He 2018, eq. 1-3, over (H, W, channels of the group)."""
    B, H, W, C = x.shape
    G = np_groups(C)
    g = x.reshape(B, H, W, G, C // G)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(B, H, W, C) * p["scale"] + p["bias"]


def np_conv(x, p, stride=1):
    """Cross-correlation, zero padding k // 2, kernel [kh, kw, in, out] (Flax layout)."""
    k = p["kernel"]
    kh = k.shape[0]
    pad = kh // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    B, H, W, _ = x.shape
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kh) // stride + 1
    out = np.zeros((B, Ho, Wo, k.shape[-1]))
    for di in range(kh):
        for dj in range(kh):
            patch = xp[:, di : di + stride * (Ho - 1) + 1 : stride, dj : dj + stride * (Wo - 1) + 1 : stride, :]
            out += patch @ k[di, dj]
    return out + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_avg_pool(x):
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


def np_nearest_up(x):
    B, H, W, C = x.shape
    out = np.zeros((B, 2 * H, 2 * W, C))
    for i in range(2 * H):
        for j in range(2 * W):
            out[:, i, j] = x[:, i // 2, j // 2]
    return out


def np_softmax(a):
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def np_resblock(x, emb, p, scale_shift, resample=None):
    """DDPM resnet_block; with scale_shift, ADM's AdaGN: GN(h) (1 + s) + b."""
    h = np_swish(np_group_norm(x, p["norm1"]))
    if resample == "down":
        h, x = np_avg_pool(h), np_avg_pool(x)
    elif resample == "up":
        h, x = np_nearest_up(h), np_nearest_up(x)
    h = np_conv(h, p["conv1"])
    e = np_dense(np_swish(emb), p["temb_proj"])[:, None, None, :]
    if scale_shift:
        C = h.shape[-1]
        h = np_group_norm(h, p["norm2"]) * (1 + e[..., :C]) + e[..., C:]
    else:
        h = np_group_norm(h + e, p["norm2"])
    h = np_conv(np_swish(h), p["conv2"])
    if "nin_shortcut" in p:
        x = np_conv(x, p["nin_shortcut"])
    return x + h


def np_attention(x, p, num_heads):
    """x + proj_out(concat_h softmax(q_h k_h^T / sqrt(d)) v_h), q, k, v from GN(x)."""
    B, H, W, C = x.shape
    d = C // num_heads
    h = np_group_norm(x, p["norm"]).reshape(B, H * W, C)
    q, k, v = (np_dense(h, p[n]) for n in ("q", "k", "v"))
    out = np.zeros((B, H * W, C))
    for n in range(num_heads):
        s = slice(n * d, (n + 1) * d)
        w = np_softmax(np.einsum("bqd,bkd->bqk", q[..., s], k[..., s]) / np.sqrt(d))
        out[..., s] = np.einsum("bqk,bkd->bqd", w, v[..., s])
    return x + np_dense(out, p["proj_out"]).reshape(B, H, W, C)


def np_attention_pool(x, p, num_heads):
    """CLIP / ADM AttentionPool2d: the mean token attends to [mean; positions] + pos. emb."""
    B, H, W, C = x.shape
    d = C // num_heads
    tok = x.reshape(B, H * W, C)
    tok = np.concatenate([tok.mean(axis=1, keepdims=True), tok], axis=1) + p["positional_embedding"]
    qkv = np_dense(tok, p["qkv"])
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    pooled = np.zeros((B, C))
    for n in range(num_heads):
        s = slice(n * d, (n + 1) * d)
        w = np_softmax(np.einsum("bd,bkd->bk", q[:, 0, s], k[..., s]) / np.sqrt(d))
        pooled[:, s] = np.einsum("bk,bkd->bd", w, v[..., s])
    return np_dense(pooled, p["proj"])


def np_sinusoidal(t, dim):
    """DDPM get_timestep_embedding: frequencies 10000^(-i / (half - 1)), [sin, cos]."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


# ---------------------------------------------------------------- helpers


def random_params(shapes, seed, std=0.3):
    """Random float32 values for every leaf of an ``eval_shape`` tree (no compiled init).
    GroupNorm scales are drawn around 1 so normalised activations keep a sensible size."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return (base + std * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def to64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def layer_case(module, seed, *args, **kwargs):
    """(float32 output of ``module`` under random params, those params)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    params = random_params(shapes, seed)
    return np.asarray(Unoptimised(lambda p, *a: module.apply(p, *a, **kwargs))(params, *args)), params.get("params", {})


def compile_unoptimised(fn, *args):
    """``jit(fn)`` compiled for ``args`` without XLA's backend optimisations: half the compile
    time of a tiny U-Net, a quarter where threefry rounds (parameter initialisers, dropout
    masks) dominate; these tiny programs run fast enough unoptimised."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


class Unoptimised:
    """``jit`` through :func:`compile_unoptimised`, one compilation per argument signature."""

    def __init__(self, fn):
        self.fn, self.cache = fn, {}

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
        if key not in self.cache:
            self.cache[key] = compile_unoptimised(self.fn, *args)
        return self.cache[key](*args)


def param_count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------- layers


def float32_argument_tol(args):
    """sin and cos are 1-Lipschitz, and float32 rounds their argument a to within |a| 2^-24
    (twice: the input t or W and the product), so the achievable accuracy is ~|a| 2^-23."""
    return ATOL + np.abs(args) * 2.0**-22


class TestTimeEmbeddings(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sinusoidal_matches_ddpm_formula(self):
        t = np.array([0, 1, 17, 999], np.int32)
        for dim in (8, 9, 32):
            got = np.asarray(self.variant(layers.sinusoidal_embedding, static_argnums=1)(t, dim), np.float64)
            chex.assert_shape(got, (4, dim))
            want = np_sinusoidal(t, dim)
            half = dim // 2
            args = t[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))[None]
            tol = np.pad(np.concatenate([args, args], 1), ((0, 0), (0, dim % 2)))
            assert np.all(np.abs(got - want) <= float32_argument_tol(tol)), np.abs(got - want).max()
        # Integer and float timesteps of equal value give the same embedding.
        chex.assert_trees_all_close(
            self.variant(layers.sinusoidal_embedding, static_argnums=1)(t.astype(np.float32), 8),
            layers.sinusoidal_embedding(t, 8),
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_fourier_features_match_formula(self):
        t = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
        got = np.asarray(self.variant(layers.fourier_features, static_argnums=(1, 2, 3))(t, 8, 16.0, 3), np.float64)
        # W is the documented constant: N(0, 1) draws from key(seed), times the scale.
        w = np.asarray(jax.random.normal(jax.random.key(3), (4,), jnp.float32), np.float64) * 16.0
        args = 2 * np.pi * t.astype(np.float64)[:, None] * w[None]
        want = np.concatenate([np.sin(args), np.cos(args)], 1)
        assert np.all(np.abs(got - want) <= float32_argument_tol(np.concatenate([args, args], 1)))
        self.assertFalse(np.allclose(got, layers.fourier_features(t, 8, 16.0, 4)))

    def test_sinusoidal_layouts_match_openai_and_diffusers(self):
        # OpenAI's timestep_embedding (flip_sin_to_cos=True, freq_shift=0): [cos, sin] with
        # frequencies exp(-log(10000) i / half); diffusers' Timesteps(dim, flip, shift) in general.
        t = np.array([0, 3, 250, 999], np.int32)
        for flip, shift in ((True, 0.0), (False, 0.0), (True, 1.0)):
            got = np.asarray(layers.sinusoidal_embedding(t, 16, flip_sin_to_cos=flip, freq_shift=shift), np.float64)
            args = t[:, None] * np.exp(-np.log(10000.0) * np.arange(8) / (8 - shift))[None]
            want = np.concatenate([np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)], 1)
            assert np.all(np.abs(got - want) <= float32_argument_tol(np.concatenate([args, args], 1)))
        with pytest.raises(ValueError, match="freq_shift: expected less than dim // 2 = 4"):
            layers.sinusoidal_embedding(t, 8, freq_shift=4)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="t: expected shape"):
            layers.sinusoidal_embedding(jnp.zeros((2, 1)), 8)
        with pytest.raises(ValueError, match="dim"):
            layers.sinusoidal_embedding(jnp.zeros((2,)), 2)
        with pytest.raises(ValueError, match="dim"):
            layers.fourier_features(jnp.zeros((2,)), 7)


def test_downsample_padding_zero_is_tf_same():
    """padding=0 pads the bottom and right only (TF 'SAME' for stride 2): output pixel (i, j) sees
    input rows 2i..2i+2 and columns 2j..2j+2; padding=1 starts one pixel earlier."""
    x = np.random.RandomState(0).randn(1, 6, 6, 2).astype(np.float32)
    for padding, offset in ((0, 0), (1, -1)):
        down = layers.Downsample(True, padding=padding)
        p = down.init(jax.random.key(0), x)["params"]
        got = np.asarray(down.apply({"params": p}, x), np.float64)
        k, b = np.asarray(p["conv"]["kernel"], np.float64), np.asarray(p["conv"]["bias"], np.float64)
        xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))  # index r of x at r + 1
        want = np.zeros((1, 3, 3, 2))
        for i in range(3):
            for j in range(3):
                r, c = 2 * i + offset + 1, 2 * j + offset + 1
                want[0, i, j] = np.einsum("hwc,hwco->o", xp[0, r:r + 3, c:c + 3], k) + b
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding: expected 0"):
        layers.Downsample(True, padding=2).init(jax.random.key(0), x)


@pytest.mark.parametrize("kernel, strides, padding, dilation", [
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # the residual blocks' conv
    ((3, 3), (2, 2), ((0, 1), (0, 1)), (1, 1)),  # Downsample(padding=0)
    ((1, 1), (1, 1), "SAME", (1, 1)),  # a skip projection
    ((3, 3), (1, 1), "SAME", (2, 2)),  # dilated
])
def test_conv_is_flax_conv_in_value_params_and_derivatives(kernel, strides, padding, dilation):
    """layers.Conv against flax.linen.Conv: the same params tree, outputs, input and kernel
    gradients (reverse mode) and tangents (forward mode), in float64 (the same linear maps) and
    in float32 (no more than rounding apart)."""
    import flax.linen as nn

    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((2, 8, 8, 3))
    kw = dict(features=5, kernel_size=kernel, strides=strides, padding=padding, kernel_dilation=dilation)
    ours, ref = layers.Conv(**kw), nn.Conv(**kw)
    p32 = ours.init(jax.random.key(0), x64.astype(np.float32))["params"]
    assert jax.tree.map(np.shape, p32) == jax.tree.map(np.shape, ref.init(jax.random.key(0), x64.astype(np.float32))["params"])

    def derivatives(m, p, x):
        f = lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)))
        grads = jax.grad(f, (0, 1))(p, x)
        tangent = jax.jvp(f, (p, x), (jax.tree.map(jnp.cos, p), jnp.cos(x)))[1]
        return m.apply({"params": p}, x), grads, tangent

    jax.config.update("jax_enable_x64", True)
    try:
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), p32)
        got, want = derivatives(ours, p64, jnp.asarray(x64)), derivatives(ref, p64, jnp.asarray(x64))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)
    got, want = derivatives(ours, p32, x64.astype(np.float32)), derivatives(ref, p32, x64.astype(np.float32))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))


def test_input_gradients_inside_a_loop_compile_to_canonical_convolutions():
    """Why layers.Conv exists: inside a lax.scan (a sampler's loop) the input gradient of flax's
    nn.Conv compiles, on XLA:CPU, to convolutions whose kernel feature axes are named in the
    transposed order (dim_labels ..._01oi->...), which XLA:CPU runs as naive loop nests (20x
    slower per guided step at XLA's defaults, BENCHMARKS.md "Input gradients inside a sampler's
    loop"); layers.Conv's compile to the canonical order (01io), as outside a loop. The control
    (nn.Conv) shows the check detects the slow form on this jaxlib."""
    import flax.linen as nn

    x = jnp.ones((2, 8, 8, 3))

    def compiled(m):
        p = m.init(jax.random.key(0), x)["params"]

        def step(c, _):
            return c - 1e-3 * jax.grad(lambda y: jnp.sum(m.apply({"params": p}, y) ** 2))(c), None

        return jax.jit(lambda c: jax.lax.scan(step, c, None, length=2)[0]).lower(x).compile().as_text()

    ours, ref = compiled(layers.Conv(4, (3, 3))), compiled(nn.Conv(4, (3, 3)))
    assert "_01oi->" in ref and "_01io->" in ref  # the control: flax's forward canonical, its transpose not
    assert "_01oi->" not in ours and "_01io->" in ours


def test_norm_groups_adapt_to_small_channel_counts():
    expected = {1: 1, 2: 1, 6: 3, 8: 4, 16: 8, 24: 12, 32: 16, 40: 20, 64: 32, 96: 32, 128: 32, 256: 32, 512: 32}
    assert {c: layers.norm_groups(c) for c in expected} == expected
    for c in range(1, 300):
        assert layers.norm_groups(c) == np_groups(c)
    with pytest.raises(ValueError, match="channels"):
        layers.norm_groups(0)


def test_group_norm_matches_the_equation_and_flax_and_its_gradients_match_flax():
    """layers.GroupNorm (per-channel moments, then a group sum) against the float64 transcription
    of Wu & He's eq. 1-3 on activations with a large mean and small spread (where a one-pass
    E[x^2] - E[x]^2 variance loses digits), and against flax.linen.GroupNorm: outputs, and the
    gradients of the params and input (the same params tree, so checkpoints load in both)."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    x = (5.0 + 0.05 * rng.standard_normal((3, 4, 5, 16))).astype(np.float32)
    p = {"scale": rng.normal(1.0, 0.3, 16).astype(np.float32), "bias": rng.normal(0.0, 0.3, 16).astype(np.float32)}
    gn = layers.group_norm(16, jnp.float32)
    assert gn.num_groups == np_groups(16) == 8
    out = gn.apply({"params": p}, x)
    # float32 x near 5 has an ulp of 4.8e-7; divided by the spread 0.05 that is ~1e-5 of the
    # normalised output, the accuracy any float32 GroupNorm of this input can have (flax's: 2.0e-5).
    exact = np_group_norm(x.astype(np.float64), p)
    np.testing.assert_allclose(out, exact, rtol=0, atol=2e-5)
    ref = nn.GroupNorm(num_groups=8, epsilon=1e-6, use_fast_variance=False)
    assert jax.tree.map(np.shape, ref.init(jax.random.key(0), x)["params"]) == jax.tree.map(np.shape, p)
    np.testing.assert_allclose(out, ref.apply({"params": p}, x), rtol=0, atol=4e-5)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(3.0 * m.apply({"params": p}, x)))
    g_new, g_ref = jax.grad(loss(gn), (0, 1))(p, x), jax.grad(loss(ref), (0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
    # Any rank [B, *spatial, C] (tokens [B, L, C]), float32 statistics with a bfloat16 output.
    tokens = x.reshape(3, 20, 16)
    np.testing.assert_allclose(gn.apply({"params": p}, tokens), out.reshape(3, 20, 16), rtol=0, atol=1e-6)
    half = layers.group_norm(16, jnp.bfloat16).apply({"params": p}, x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"num_groups: expected a divisor of the channel count 16, got 5"):
        layers.GroupNorm(num_groups=5).init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "scale_shift, resample, c_in, c_out",
    [(False, None, 8, 16), (True, None, 16, 16), (True, "down", 8, 8), (False, "up", 16, 8)],
)
def test_resblock_matches_reference(scale_shift, resample, c_in, c_out):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, c_in)).astype(np.float32)
    emb = rng.standard_normal((2, 12)).astype(np.float32)
    block = layers.ResBlock(c_out, dropout=0.0, scale_shift_norm=scale_shift, resample=resample)
    got, p = layer_case(block, 2, x, emb)
    assert ("nin_shortcut" in p) == (c_in != c_out)
    want = np_resblock(x.astype(np.float64), emb.astype(np.float64), to64(p), scale_shift, resample)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_fresh_blocks_are_identity():
    """Zero-initialised conv2 / proj_out: a freshly initialised block returns its input."""
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 8)).astype(np.float32)
    emb = np.ones((1, 12), np.float32)
    block = layers.ResBlock(8)
    block, attn = layers.ResBlock(8), layers.AttentionBlock(2)
    fresh_block = lambda x, emb: block.apply(block.init(jax.random.key(0), x, emb), x, emb)
    fresh_attn = lambda x: attn.apply(attn.init(jax.random.key(0), x), x)
    np.testing.assert_array_equal(compile_unoptimised(fresh_block, x, emb)(x, emb), x)
    np.testing.assert_array_equal(compile_unoptimised(fresh_attn, x)(x), x)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_block_matches_reference(num_heads):
    x = np.random.default_rng(3).standard_normal((2, 4, 4, 16)).astype(np.float32)
    got, p = layer_case(layers.AttentionBlock(num_heads), 4, x)
    np.testing.assert_allclose(got, np_attention(x.astype(np.float64), to64(p), num_heads), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="num_heads"):
        jax.eval_shape(layers.AttentionBlock(3).init, jax.random.key(0), x)


def test_attention_pool_matches_reference():
    x = np.random.default_rng(5).standard_normal((2, 2, 2, 16)).astype(np.float32)
    got, p = layer_case(layers.AttentionPool2d(out_features=5, num_heads=2), 6, x)
    chex.assert_shape(got, (2, 5))
    np.testing.assert_allclose(got, np_attention_pool(x.astype(np.float64), to64(p), 2), rtol=RTOL, atol=ATOL)


def np_cross_attention(x, context, mask, p, num_heads):
    """x + proj_out(concat_h softmax_masked(q_h k_h^T / sqrt(d)) v_h), q from GN(x), k and v from
    [null token; Dense(context)], the null token always visible (LDM cross-attention)."""
    B, H, W, C = x.shape
    d = C // num_heads
    q = np_dense(np_group_norm(x, p["norm"]).reshape(B, H * W, C), p["q"])
    null = lambda n: np.broadcast_to(p[n], (B, 1, C))
    k = np.concatenate([null("null_key"), np_dense(context, p["k"])], axis=1)
    v = np.concatenate([null("null_value"), np_dense(context, p["v"])], axis=1)
    visible = np.concatenate([np.ones((B, 1), bool), mask], axis=1)[:, None, :]
    out = np.zeros((B, H * W, C))
    for n in range(num_heads):
        s = slice(n * d, (n + 1) * d)
        logits = np.where(visible, np.einsum("bqd,bkd->bqk", q[..., s], k[..., s]) / np.sqrt(d), -np.inf)
        out[..., s] = np.einsum("bqk,bkd->bqd", np_softmax(logits), v[..., s])
    return x + np_dense(out, p["proj_out"]).reshape(B, H, W, C)


def test_cross_attention_matches_reference():
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 2, 2, 8)).astype(np.float32)
    context = rng.standard_normal((2, 3, 5)).astype(np.float32)
    mask = np.array([[True, False, True], [False, False, False]])
    got, p = layer_case(layers.CrossAttention(num_heads=2), 32, x, context, mask)
    assert {"null_key", "null_value", "q", "k", "v", "proj_out", "norm"} <= set(p)
    want = np_cross_attention(x.astype(np.float64), context.astype(np.float64), mask, to64(p), 2)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"context_mask: expected a bool array of shape \(2, 3\)"):
        jax.eval_shape(layers.CrossAttention(2).init, jax.random.key(0), x, context, mask[:, :2])
    with pytest.raises(ValueError, match=r"context: expected shape \[2, L, D\]"):
        jax.eval_shape(layers.CrossAttention(2).init, jax.random.key(0), x, context[0])


def test_fresh_cross_attention_is_identity():
    """Zero-initialised proj_out: a fresh cross-attention block returns its input, whatever the context."""
    rng = np.random.default_rng(33)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    context = rng.standard_normal((2, 3, 5)).astype(np.float32)
    mask = np.array([[True, True, False], [False, False, False]])
    block = layers.CrossAttention(2)
    fresh = lambda x, c, m: block.apply(block.init(jax.random.key(0), x, c, m), x, c, m)
    np.testing.assert_array_equal(compile_unoptimised(fresh, x, context, mask)(x, context, mask), x)


@pytest.mark.parametrize("use_conv", [False, True])
def test_resampling_matches_reference(use_conv):
    x = np.random.default_rng(7).standard_normal((2, 4, 4, 8)).astype(np.float32)
    down, pd = layer_case(layers.Downsample(use_conv), 8, x)
    up, pu = layer_case(layers.Upsample(use_conv), 9, x)
    x64 = x.astype(np.float64)
    want_down = np_conv(x64, to64(pd["conv"]), stride=2) if use_conv else np_avg_pool(x64)
    want_up = np_conv(np_nearest_up(x64), to64(pu["conv"])) if use_conv else np_nearest_up(x64)
    chex.assert_shape(down, (2, 2, 2, 8))
    chex.assert_shape(up, (2, 8, 8, 8))
    np.testing.assert_allclose(down, want_down, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(up, want_up, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- U-Net

CONFIGS = {
    # DDPM-style: additive time embedding, conv resampling, attention at 8x8, dropout.
    "ddpm": (
        dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2, dropout=0.1),
        (2, 16, 16, 3),
    ),
    # ADM-style: scale-shift norm, residual up/down, 4 heads, class-conditional, learned variance.
    "adm": (
        dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=4,
             dropout=0.0, scale_shift_norm=True, resblock_updown=True, num_classes=5, learn_sigma=True),
        (2, 8, 8, 1),
    ),
    # score-SDE-style: Fourier time features, image conditioning, no attention, pool / nearest resampling.
    "cond": (
        dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), mid_attention=False,
             conv_resample=False, image_channels=2, time_embedding="fourier", out_channels=4, dropout=0.0),
        (2, 8, 8, 2),
    ),
}
EXPECTED_OUT_CHANNELS = {"ddpm": 3, "adm": 2, "cond": 4}


class Net:
    """One U-Net configuration: the module, inputs, random params and its compiled apply."""

    def __init__(self, name):
        fields, x_shape = CONFIGS[name]
        rng = np.random.default_rng(11)
        self.name = name
        self.model = UNet(**fields)
        self.x = rng.standard_normal(x_shape).astype(np.float32)
        B = x_shape[0]
        self.t = np.array([3.0, 0.7], np.float32) if fields.get("time_embedding") == "fourier" else np.array([3, 700], np.int32)
        ch = fields.get("image_channels", 0)
        self.cond = {"image": rng.standard_normal((B,) + x_shape[1:3] + (ch,)).astype(np.float32)} if ch else {}
        self.shapes = jax.eval_shape(self.model.init, jax.random.key(0), self.x, self.t, self.cond)
        self.params = random_params(self.shapes, seed=12)
        # One positional signature, so calls that differ only in keywords share a compilation.
        self._eval = Unoptimised(lambda p, x, t, cond, skips: self.model.apply(p, x, t, cond, skip_residuals=skips))
        self._train = None

    def run(self, params=None, *, t=None, cond=None, skip_residuals=None):
        """Evaluation-mode output (train=False) under ``params`` (default: the random ones) and
        ``cond`` (default: the network's own, an image for "cond", else {})."""
        params = self.params if params is None else params
        cond = self.cond if cond is None else cond
        return self._eval(params, self.x, self.t if t is None else t, cond, skip_residuals)

    def run_train(self, dropout_key):
        """Training-mode output (dropout on) under the random params."""
        args = (self.params, self.x, self.t, self.cond, dropout_key)
        if self._train is None:
            train = lambda p, x, t, cond, key: self.model.apply(p, x, t, cond, train=True, rngs={"dropout": key})
            self._train = compile_unoptimised(train, *args)
        return self._train(*args)


@pytest.fixture(scope="module")
def ddpm_net():
    return Net("ddpm")


@pytest.fixture(scope="module")
def adm_net():
    return Net("adm")


@pytest.fixture(scope="module")
def cond_net():
    return Net("cond")


@pytest.fixture(scope="module", params=list(CONFIGS))
def net(request, ddpm_net, adm_net, cond_net):
    return {"ddpm": ddpm_net, "adm": adm_net, "cond": cond_net}[request.param]


def test_output_shape(net):
    out = net.run()
    B, H, W, C = net.x.shape
    chex.assert_shape(out, (B, H, W, EXPECTED_OUT_CHANNELS[net.name]))
    assert out.dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    # Random (non-zero) output weights: the output is not trivially zero, so the zero-init test means something.
    assert np.abs(out).max() > 1e-3


def test_learned_variance_head_has_2c_channels(adm_net):
    out = adm_net.run()
    assert out.shape[-1] == 2 * adm_net.x.shape[-1]
    no_sigma = UNet(**{**CONFIGS["adm"][0], "learn_sigma": False})
    shapes = jax.eval_shape(no_sigma.init, jax.random.key(0), adm_net.x, adm_net.t)
    assert jax.eval_shape(no_sigma.apply, shapes, adm_net.x, adm_net.t).shape[-1] == adm_net.x.shape[-1]


def test_fresh_network_outputs_exactly_zero(adm_net):
    key = jax.random.key(0)
    params = compile_unoptimised(adm_net.model.init, key, adm_net.x, adm_net.t)(key, adm_net.x, adm_net.t)
    out = adm_net.run(params, cond={"label": np.array([0, 4], np.int32)})
    np.testing.assert_array_equal(out, np.zeros_like(out))
    # Only the output projection is zero: the trunk is really initialised.
    assert np.abs(params["params"]["encoder"]["conv_in"]["kernel"]).max() > 0
    assert jax.tree.structure(params) == jax.tree.structure(adm_net.shapes)


def test_null_class(adm_net):
    n = CONFIGS["adm"][0]["num_classes"]
    chex.assert_shape(adm_net.shapes["params"]["encoder"]["class_embed"]["embedding"], (n + 1, 16 * 4))
    out_none = adm_net.run(cond={})
    out_null = adm_net.run(cond={"label": np.full((2,), n, np.int32)})
    out_real = adm_net.run(cond={"label": np.array([0, 1], np.int32)})
    np.testing.assert_array_equal(out_none, out_null)
    assert np.abs(out_real - out_none).max() > 1e-4


def test_output_depends_on_t_and_cond(cond_net):
    c = cond_net
    base = c.run()
    other_t = c.run(t=c.t + 0.5)
    other_cond = c.run(cond={"image": c.cond["image"] + 1.0})
    assert np.abs(base - other_t).max() > 1e-4
    assert np.abs(base - other_cond).max() > 1e-4


def test_dropout_only_with_train_and_rng(ddpm_net):
    n = ddpm_net
    eval_a, eval_b = n.run(), n.run()
    np.testing.assert_array_equal(eval_a, eval_b)
    tr1, tr1_again, tr2 = n.run_train(jax.random.key(1)), n.run_train(jax.random.key(1)), n.run_train(jax.random.key(2))
    np.testing.assert_array_equal(tr1, tr1_again)
    assert np.abs(tr1 - eval_a).max() > 1e-4
    assert np.abs(tr1 - tr2).max() > 1e-4
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda p: n.model.apply(p, n.x, n.t, train=True), n.params)


def test_skip_residuals_reuse_the_encoder(adm_net):
    """ControlNet hook: the encoder's own params run as a standalone UNetEncoder, and residuals
    are added to each skip connection and to the middle output before the decoder."""
    n = adm_net
    fields = CONFIGS["adm"][0]
    p = n.params["params"]
    encoder = UNetEncoder(**{k: v for k, v in fields.items() if k != "learn_sigma"})
    enc = jax.eval_shape(encoder.apply, {"params": p["encoder"]}, n.x, n.t)
    shapes = [s.shape for s in enc.skips] + [enc.h.shape]
    assert len(shapes) == 1 + 2 + 1 + 1  # input conv, 2 levels x 1 block, 1 downsample, middle
    rng = np.random.default_rng(13)
    residuals = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with_res = n.run(skip_residuals=residuals)
    zero_res = n.run(skip_residuals=[np.zeros(s, np.float32) for s in shapes])
    plain = n.run()
    np.testing.assert_array_equal(zero_res, plain)
    decoder = UNetDecoder(
        out_channels=2, **{k: fields[k] for k in ("base_channels", "channel_mult", "num_res_blocks",
                                                   "attention_resolutions", "num_heads", "dropout",
                                                   "resblock_updown", "scale_shift_norm")}
    )

    @Unoptimised
    def manual(residuals):
        enc = encoder.apply({"params": p["encoder"]}, n.x, n.t)
        shifted = enc._replace(skips=tuple(s + r for s, r in zip(enc.skips, residuals[:-1])), h=enc.h + residuals[-1])
        return decoder.apply({"params": p["decoder"]}, shifted)

    manual = manual(residuals)
    np.testing.assert_allclose(with_res, manual, rtol=RTOL, atol=ATOL)
    assert np.abs(with_res - plain).max() > 1e-4
    with pytest.raises(ValueError, match="skip_residuals"):
        jax.eval_shape(n.model.apply, n.params, n.x, n.t, skip_residuals=residuals[:-1])


def test_input_residual_enters_after_input_conv(adm_net):
    n = adm_net
    shape = n.x.shape[:3] + (16,)
    zero = jax.eval_shape(n.model.apply, n.params, n.x, n.t, input_residual=np.zeros(shape, np.float32))
    assert zero.shape == n.x.shape[:3] + (2,)
    with pytest.raises(ValueError, match="input_residual"):
        jax.eval_shape(n.model.apply, n.params, n.x, n.t, input_residual=np.zeros(shape[:3] + (8,), np.float32))


def _shape_of(m, x, t, **kw):
    return jax.eval_shape(m.init, jax.random.key(0), x, t, **kw)


@pytest.mark.parametrize(
    "case, kwargs, match",
    [
        ("rank-3 x", dict(x=np.zeros((2, 8, 8), np.float32)), r"x: expected rank 4"),
        ("int x", dict(x=np.zeros((2, 8, 8, 1), np.int32)), r"x: expected a floating dtype"),
        ("odd size", dict(x=np.zeros((2, 9, 9, 1), np.float32)), r"x: expected height and width divisible by .* = 2"),
        ("t rank 0", dict(t=np.int32(3)), r"t: expected shape \[2\]"),
        ("t batch", dict(t=np.zeros((3,), np.int32)), r"t: expected shape \[2\]"),
        ("image given", dict(cond={"image": np.zeros((2, 8, 8, 1), np.float32)}),
         r"cond\['image'\]: given \(shape \(2, 8, 8, 1\)\) but image_channels=0"),
        ("label shape", dict(cond={"label": np.zeros((2, 1), np.int32)}),
         r"cond\['label'\]: expected shape \[B\] int with B = 2 \(rank 1\), got shape \(2, 1\)"),
        ("label batch", dict(cond={"label": np.zeros((3,), np.int32)}), r"cond\['label'\]: .*B = 2.*got shape \(3,\)"),
        ("label float", dict(cond={"label": np.zeros((2,), np.float32)}), r"cond\['label'\]: expected an int array"),
        ("array cond", dict(cond=np.zeros((2, 8, 8, 1), np.float32)), r"cond: expected a Mapping with keys from"),
        ("unknown key", dict(cond={"labels": np.zeros((2,), np.int32)}),
         r"cond: unknown key\(s\) \['labels'\]; expected keys from \('label', 'image', 'context', 'context_mask', "
         r"'control', 'aug_level', 'tokens'\)"),
        ("control", dict(cond={"control": np.zeros((2, 8, 8, 3), np.float32)}),
         r"cond\['control'\]: given .* ControlNet wrapper consumes"),
        ("context", dict(cond={"context": np.zeros((2, 3, 4), np.float32)}), r"cond\['context'\]: given .*\(context_dim=None\)"),
        ("aug_level", dict(cond={"aug_level": np.zeros((2,), np.float32)}),
         r"cond\['aug_level'\]: given .* aug_level_embedding=False"),
    ],
)
def test_bad_inputs_raise(case, kwargs, match):
    m = UNet(**CONFIGS["adm"][0])
    args = dict(x=np.zeros((2, 8, 8, 1), np.float32), t=np.zeros((2,), np.int32), **{})
    args.update(kwargs)
    x, t = args.pop("x"), args.pop("t")
    with pytest.raises(ValueError, match=match):
        _shape_of(m, x, t, **args)


def test_bad_conditioning_raises(adm_net, cond_net):
    c = cond_net
    with pytest.raises(ValueError, match=r"cond\['image'\]: expected an image \[B, H, W, 2\]"):
        _shape_of(c.model, c.x, c.t)
    with pytest.raises(ValueError, match=r"cond\['image'\]: expected shape \(2, 8, 8, 2\), got shape \(2, 8, 8, 3\)"):
        _shape_of(c.model, c.x, c.t, cond={"image": np.zeros((2, 8, 8, 3), np.float32)})
    with pytest.raises(ValueError, match=r"cond\['label'\]: given .* no class embedding \(num_classes=None\)"):
        _shape_of(c.model, c.x, c.t, cond={**c.cond, "label": np.zeros((2,), np.int32)})
    # Concrete labels outside [0, num_classes] fail before anything runs.
    with pytest.raises(ValueError, match=r"cond\['label'\]: expected labels in \[0, 5\].*max 6"):
        adm_net.model.apply(adm_net.params, adm_net.x, adm_net.t, {"label": np.array([0, 6], np.int32)})


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(channel_mult=()), "channel_mult"),
        (dict(base_channels=7), "base_channels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(time_embedding="learned"), "time_embedding"),
        (dict(num_classes=0), "num_classes"),
        (dict(image_channels=-1), "image_channels"),
        (dict(context_dim=0), "context_dim"),
        (dict(context_dim=4, attention_resolutions=(), mid_attention=False), "context_dim: cross-attention follows"),
        (dict(aug_level_embedding="yes"), "aug_level_embedding"),
        (dict(out_channels=0), "out_channels"),
        (dict(attention_resolutions=16), "attention_resolutions"),
        (dict(num_head_channels=0), "num_head_channels"),
        (dict(norm_num_groups=48), r"norm_num_groups: expected None or a positive divisor of every level's channel count \[128, 256\]"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(downsample_padding=2), "downsample_padding"),
        (dict(flip_sin_to_cos="no"), "flip_sin_to_cos"),
        (dict(freq_shift=64), "freq_shift"),
        (dict(time_scale=0.0), "time_scale"),
    ],
)
def test_bad_fields_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        UNet(**fields)


def test_from_config():
    fields = CONFIGS["adm"][0]
    cfg = ml_collections.ConfigDict({**fields, "channel_mult": list(fields["channel_mult"]), "dtype": "bfloat16"})
    m = UNet.from_config(cfg)
    assert m.channel_mult == (1, 2) and m.dtype == jnp.bfloat16 and m.num_classes == 5 and m.learn_sigma
    x, t = np.zeros((2, 8, 8, 1), np.float32), np.zeros((2,), np.int32)
    from_cfg = jax.eval_shape(m.init, jax.random.key(0), x, t)
    direct = jax.eval_shape(UNet(**fields).init, jax.random.key(0), x, t)
    assert jax.tree.map(lambda s: s.shape, from_cfg) == jax.tree.map(lambda s: s.shape, direct)
    cfg.unlikely_key = 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['unlikely_key'\]"):
        UNet.from_config(cfg)


def test_bfloat16_computes_in_bf16_with_float32_params():
    m = UNet(**{**CONFIGS["adm"][0], "dtype": jnp.bfloat16})
    x, t = np.zeros((2, 8, 8, 1), np.float32), np.zeros((2,), np.int32)
    shapes = jax.eval_shape(m.init, jax.random.key(0), x, t)
    assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out, inter = jax.eval_shape(
        lambda p: m.apply(p, x, t, capture_intermediates=True, mutable=["intermediates"]), shapes
    )
    assert out.dtype == jnp.float32
    assert inter["intermediates"]["encoder"]["__call__"][0].h.dtype == jnp.bfloat16


def test_cifar10_ddpm_parameter_count():
    """Ho et al. 2020, appendix B: 35.7M parameters; diffusion_tf's CIFAR-10 model: 35,746,307."""
    m = cifar10_ddpm_unet()
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))
    n = param_count(shapes)
    assert round(n / 1e6, 1) == 35.7
    assert n == 35_746_307
    # Attention at 16x16 only: level 1 of a 32x32 input (2 down + 3 up) plus the middle block.
    attn = [k for k in {**shapes["params"]["encoder"], **shapes["params"]["decoder"]} if "attn" in k]
    assert sorted(attn) == ["down_1_attn_0", "down_1_attn_1", "mid_attn", "up_1_attn_0", "up_1_attn_1", "up_1_attn_2"]


# ---------------------------------------------------------------- cross-attention and augmentation level

# LDM-style text conditioning and CDM's augmentation level on one tiny class-conditional network:
# cross-attention after the 4x4 self-attention blocks (down, middle, up).
CONTEXT_NET = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
                   dropout=0.0, num_classes=3, context_dim=6, aug_level_embedding=True)


class ContextNet:
    def __init__(self):
        rng = np.random.default_rng(41)
        self.model = UNet(**CONTEXT_NET)
        self.x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
        self.t = np.array([5, 600], np.int32)
        self.context = rng.standard_normal((2, 4, 6)).astype(np.float32)
        self.mask = np.array([[True, True, False, False], [True, False, True, False]])
        self.cond = {"label": np.array([1, 2], np.int32), "context": self.context, "context_mask": self.mask,
                     "aug_level": np.array([0.0, 250.0], np.float32)}
        self.shapes = jax.eval_shape(self.model.init, jax.random.key(0), self.x, self.t, self.cond)
        # Random values everywhere, the zero-initialised projections (proj_out, conv_out) included.
        self.params = random_params(self.shapes, seed=42)
        self._eval = Unoptimised(lambda p, x, t, cond: self.model.apply(p, x, t, cond))

    def run(self, **changes):
        cond = {k: v for k, v in {**self.cond, **changes}.items() if v is not None}
        return np.asarray(self._eval(self.params, self.x, self.t, cond))


@pytest.fixture(scope="module")
def context_net():
    return ContextNet()


def test_cross_attention_after_every_self_attention(context_net):
    enc, dec = context_net.shapes["params"]["encoder"], context_net.shapes["params"]["decoder"]
    attn = sorted(k for k in {**enc, **dec} if k.endswith(("attn", "attn_0", "attn_1")) and "cross" not in k)
    cross = sorted(k for k in {**enc, **dec} if "cross_attn" in k)
    assert cross == sorted(k.replace("attn", "cross_attn") for k in attn)
    assert cross == ["down_1_cross_attn_0", "mid_cross_attn", "up_1_cross_attn_0", "up_1_cross_attn_1"]
    chex.assert_shape(enc["mid_cross_attn"]["k"]["kernel"], (6, 16))
    chex.assert_shape(enc["aug_embed"]["dense1"]["kernel"], (32, 32))
    # Without the new fields the tree is the plain one: no cross-attention, no aug_embed.
    plain = jax.eval_shape(UNet(**{**CONTEXT_NET, "context_dim": None, "aug_level_embedding": False}).init,
                           jax.random.key(0), context_net.x, context_net.t)
    assert param_count(plain) == param_count(context_net.shapes) - sum(
        param_count(tree[k]) for tree in (enc, dec) for k in tree if "cross_attn" in k or k == "aug_embed")


def test_context_changes_the_output_and_masked_tokens_do_not(context_net):
    c = context_net
    base = c.run()
    chex.assert_tree_all_finite(base)
    other = c.context + np.float32(1.0) * np.where(c.mask[..., None], 1.0, 0.0).astype(np.float32)
    assert np.abs(c.run(context=other) - base).max() > 1e-4
    # Tokens whose mask is False have no effect at all: bit-identical output.
    junk = np.where(c.mask[..., None], c.context, np.float32(1e3)).astype(np.float32)
    np.testing.assert_array_equal(c.run(context=junk), base)
    # No mask means every token is real.
    assert np.abs(c.run(context_mask=None) - base).max() > 1e-4
    np.testing.assert_allclose(c.run(context_mask=None), c.run(context_mask=np.ones_like(c.mask)), rtol=RTOL, atol=ATOL)


def test_all_masked_context_is_the_null_context(context_net):
    c = context_net
    empty = c.run(context_mask=np.zeros_like(c.mask))
    chex.assert_tree_all_finite(empty)
    # Only the learned null token is visible: the same output as no context at all, whatever the tokens hold.
    np.testing.assert_array_equal(empty, c.run(context=None, context_mask=None))
    np.testing.assert_array_equal(empty, c.run(context=c.context * 7.0, context_mask=np.zeros_like(c.mask)))
    assert np.abs(empty - c.run()).max() > 1e-4


def test_aug_level_changes_the_output_and_is_required(context_net):
    c = context_net
    assert np.abs(c.run(aug_level=c.cond["aug_level"] + 100.0) - c.run()).max() > 1e-4
    no_aug = {k: v for k, v in c.cond.items() if k != "aug_level"}
    with pytest.raises(ValueError, match=r"cond\['aug_level'\]: expected a \[B\] augmentation level"):
        _shape_of(c.model, c.x, c.t, cond=no_aug)
    with pytest.raises(ValueError, match=r"cond\['aug_level'\]: expected shape \[B\] with B = 2 \(rank 1\), got shape \(2, 1\)"):
        _shape_of(c.model, c.x, c.t, cond={**c.cond, "aug_level": np.zeros((2, 1), np.float32)})


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(context=np.zeros((2, 4, 5), np.float32)), r"cond\['context'\]: expected shape \(2, 4, 6\), got shape \(2, 4, 5\)"),
        (dict(context=np.zeros((2, 4), np.float32)), r"cond\['context'\]: expected shape \[B, L, D\] with B = 2 \(rank 3\), got shape \(2, 4\)"),
        (dict(context_mask=np.ones((2, 3), bool)), r"cond\['context_mask'\]: expected shape \(2, 4\) .* got shape \(2, 3\)"),
        (dict(context_mask=np.ones((2, 4), np.int32)), r"cond\['context_mask'\]: expected a bool array"),
        (dict(context=None), r"cond\['context_mask'\]: given without cond\['context'\]"),
        (dict(label=np.zeros((2,), np.float32)), r"cond\['label'\]: expected an int array, got dtype float32"),
        (dict(control=np.zeros((2, 8, 8, 3), np.float32)), r"cond\['control'\]: .*ControlNet wrapper consumes"),
        (dict(text=np.zeros((2, 4, 6), np.float32)), r"unknown key\(s\) \['text'\]; expected keys from \('label', "),
    ],
)
def test_bad_context_inputs_raise(context_net, change, match):
    c = context_net
    cond = {k: v for k, v in {**c.cond, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        _shape_of(c.model, c.x, c.t, cond=cond)


def test_encoder_carries_the_context_to_the_decoder(context_net):
    c = context_net
    fields = {k: v for k, v in CONTEXT_NET.items()}
    encoder = UNetEncoder(**fields)
    enc = jax.eval_shape(encoder.apply, {"params": c.params["params"]["encoder"]}, c.x, c.t, c.cond)
    assert enc.context.shape == (2, 4, 6) and enc.context_mask.shape == (2, 4)
    null = jax.eval_shape(encoder.apply, {"params": c.params["params"]["encoder"]}, c.x, c.t, {"aug_level": c.cond["aug_level"]})
    assert null.context.shape == (2, 1, 6) and null.context_mask.dtype == jnp.bool_
    decoder = UNetDecoder(out_channels=1, **fields)
    with pytest.raises(ValueError, match=r"enc.context: expected the encoder's \[B, L, 6\] context tokens"):
        jax.eval_shape(decoder.apply, {"params": c.params["params"]["decoder"]}, enc._replace(context=None))
    assert jax.eval_shape(decoder.apply, {"params": c.params["params"]["decoder"]}, enc).shape == (2, 8, 8, 1)


def test_context_network_in_bfloat16(context_net):
    m = UNet(**{**CONTEXT_NET, "dtype": jnp.bfloat16})
    c = context_net
    shapes = jax.eval_shape(m.init, jax.random.key(0), c.x, c.t, c.cond)
    assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(m.apply, shapes, c.x, c.t, c.cond).dtype == jnp.float32


# ---------------------------------------------------------------- registry


class _TinyNet(flax.linen.Module):
    features: int = 3

    @flax.linen.compact
    def __call__(self, x):
        return flax.linen.Dense(self.features)(x)


def test_registry_builds_by_name_and_import_path():
    assert models.MODELS["unet"] is UNet and models.MODELS["classifier"] is NoiseAwareClassifier
    cfg = ml_collections.ConfigDict({**CONFIGS["adm"][0], "channel_mult": [1, 2]})
    m = models.build("unet", cfg, num_heads=2)
    assert isinstance(m, UNet) and m.channel_mult == (1, 2) and m.num_heads == 2 and m.num_classes == 5
    assert models.build("classifier", {"num_classes": 3}).num_classes == 3
    dotted = models.build("jdiff.models.unet:UNet", {"base_channels": 8})
    assert type(dotted) is UNet and dotted.base_channels == 8
    dense = models.build("flax.linen:Dense", None, features=5)
    assert type(dense) is flax.linen.Dense and dense.features == 5
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        models.build("unet", {"bogus": 1})
    with pytest.raises(ValueError, match=r"name: unknown model 'unett'; expected one of \['classifier', 'controlnet', "
                                         r"'embedding_prior', 'lora', 'text_unet', 'unet'"):
        models.build("unett", {})
    with pytest.raises(ValueError, match=r"cannot import module 'jdiff.no_such_module'"):
        models.build("jdiff.no_such_module:Net", {})
    with pytest.raises(ValueError, match=r"has no attribute 'Nope'"):
        models.build("jdiff.models.unet:Nope", {})
    with pytest.raises(ValueError, match=r"expected a flax.linen.Module subclass"):
        models.build("jdiff.models.unet:module_from_config", {})


def test_registry_register():
    models.register("tiny_test_net", _TinyNet)
    try:
        assert models.build("tiny_test_net", {"features": 2}).features == 2
        with pytest.raises(ValueError, match=r"'tiny_test_net' is already registered"):
            models.register("tiny_test_net", _TinyNet)
    finally:
        del models.MODELS["tiny_test_net"]
    with pytest.raises(ValueError, match=r"'unet' is already registered"):
        models.register("unet", _TinyNet)
    with pytest.raises(ValueError, match=r"expected a flax.linen.Module subclass"):
        models.register("not_a_module", dict)
    with pytest.raises(ValueError, match=r"expected a flax.linen.Module subclass"):
        models.register("an_instance", _TinyNet())
    with pytest.raises(ValueError, match=r"name: expected a non-empty string without ':'"):
        models.register("a:b", _TinyNet)
    assert "not_a_module" not in models.MODELS and "an_instance" not in models.MODELS


# ---------------------------------------------------------------- classifier

CLASSIFIER = dict(num_classes=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2)


def test_classifier_logits():
    m = NoiseAwareClassifier(**CLASSIFIER)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    t = np.array([0, 10, 500], np.int32)
    shapes = jax.eval_shape(m.init, jax.random.key(0), x, t)
    assert "attention_pool" in shapes["params"]
    params = random_params(shapes, 22)
    apply = Unoptimised(m.apply)
    logits = apply(params, x, t)
    chex.assert_shape(logits, (3, 4))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)
    # The noise level reaches the logits.
    assert np.abs(apply(params, x, t + 200) - logits).max() > 1e-4

    mean_pool = NoiseAwareClassifier(**{**CLASSIFIER, "pool": "mean"})
    mshapes = jax.eval_shape(mean_pool.init, jax.random.key(0), x, t)
    assert "head" in mshapes["params"] and "attention_pool" not in mshapes["params"]
    assert jax.eval_shape(mean_pool.apply, mshapes, x, t).shape == (3, 4)


def test_classifier_bad_inputs_and_config():
    m = NoiseAwareClassifier(**CLASSIFIER)
    with pytest.raises(ValueError, match=r"t: expected shape \[3\]"):
        jax.eval_shape(m.init, jax.random.key(0), np.zeros((3, 8, 8, 1), np.float32), np.zeros((2,), np.int32))
    with pytest.raises(ValueError, match=r"x: expected height and width divisible"):
        jax.eval_shape(m.init, jax.random.key(0), np.zeros((3, 7, 7, 1), np.float32), np.zeros((3,), np.int32))
    with pytest.raises(ValueError, match="pool"):
        NoiseAwareClassifier(pool="max")
    with pytest.raises(ValueError, match="num_classes"):
        NoiseAwareClassifier(num_classes=0)
    cfg = ml_collections.ConfigDict({**CLASSIFIER, "channel_mult": [1, 2]})
    assert NoiseAwareClassifier.from_config(cfg).channel_mult == (1, 2)
    cfg.learn_sigma = True
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learn_sigma'\]"):
        NoiseAwareClassifier.from_config(cfg)



def test_classifier_takes_the_trunk_conditioning():
    m = NoiseAwareClassifier(**{**CLASSIFIER, "image_channels": 2, "aug_level_embedding": True})
    x, t = np.zeros((3, 8, 8, 1), np.float32), np.zeros((3,), np.int32)
    cond = {"image": np.zeros((3, 8, 8, 2), np.float32), "aug_level": np.zeros((3,), np.float32)}
    shapes = jax.eval_shape(m.init, jax.random.key(0), x, t, cond)
    assert "aug_embed" in shapes["params"]["encoder"]
    assert shapes["params"]["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 8)
    assert jax.eval_shape(m.apply, shapes, x, t, cond).shape == (3, 4)
    with pytest.raises(ValueError, match=r"cond\['image'\]: expected an image \[B, H, W, 2\]"):
        jax.eval_shape(m.init, jax.random.key(0), x, t, {"aug_level": cond["aug_level"]})
    with pytest.raises(ValueError, match=r"cond\['label'\]: given .* a classifier predicts the label"):
        jax.eval_shape(m.init, jax.random.key(0), x, t, {**cond, "label": np.zeros((3,), np.int32)})
    with pytest.raises(ValueError, match=r"cond\['context'\]: given .*\(context_dim=None\)"):
        jax.eval_shape(m.init, jax.random.key(0), x, t, {**cond, "context": np.zeros((3, 2, 4), np.float32)})
    with pytest.raises(ValueError, match="context_dim"):
        NoiseAwareClassifier(**{**CLASSIFIER, "context_dim": -1})
