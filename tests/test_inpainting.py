"""Mask-channel inpainting: the masks, the conditioning, the "inpaint" batch transform, the
zero-initialised input channels of a fine-tune, and ``editing.inpaint`` against the exact
conditional of a Gaussian mixture.

An inpainting network that were perfect would predict the noise of p(x_unknown | x_known): for
the 2-D mixture of tests/test_editing.py with x_1 known, that conditional is the 1-D mixture
with weights proportional to pi_k N(x_1; mu_k1, s_k^2) and components N(mu_k2, s_k^2), whose
noise prediction at x_t is closed form. ``editing.inpaint`` with that network (which reads x_1
and the mask from cond["image"], per example) must sample it; RePaint, with the unconditional
score, does not (benchmarks/editing_mixture.py measures by how much).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jdiff import editing, samplers, schedules
from jdiff.models import UNet
from jdiff.train import network, transforms
from jdiff.train.state import overlay_params

WEIGHTS = np.array([0.4, 0.6])
MEANS = np.array([[-1.0, -1.5], [1.0, 1.5]])
STDS = np.array([0.5, 0.4])


@pytest.mark.parametrize("kind", editing.MASK_KINDS)
@pytest.mark.parametrize("hw", [(8, 8), (7, 12)])
def test_masks_are_binary_and_of_their_kind(kind, hw):
    h, w = hw
    m = np.asarray(editing.random_masks(jax.random.key(0), 16, hw, kinds=(kind,)))
    assert m.shape == (16, h, w, 1) and set(np.unique(m)) <= {0.0, 1.0}
    m = m[..., 0]
    unknown = 1 - m
    assert np.all(unknown.sum((1, 2)) > 0) and np.all(m.sum((1, 2)) > 0), "every mask hides and keeps something"
    for k, u in zip(m.astype(bool), unknown):
        r, c = np.nonzero(u)
        if kind == "box":  # one rectangle, sides within [1/4, 3/4] of the image's
            hh, ww = r.max() - r.min() + 1, c.max() - c.min() + 1
            assert u.sum() == hh * ww and max(1, h // 4) <= hh <= 3 * h // 4 and max(1, w // 4) <= ww <= 3 * w // 4
        elif kind == "half":  # one side's half
            halves = [np.arange(w) < (w + 1) // 2, np.arange(w) >= w // 2]
            vert = [np.arange(h) < (h + 1) // 2, np.arange(h) >= h // 2]
            options = [np.broadcast_to(hv[None, :], (h, w)) for hv in halves] + [np.broadcast_to(v[:, None], (h, w)) for v in vert]
            assert any(np.array_equal(u.astype(bool), o) for o in options)
        elif kind == "border":  # an unknown frame of one width
            kr, kc = np.nonzero(k)
            top, left = kr.min(), kc.min()
            assert top == left and h - 1 - kr.max() == top and w - 1 - kc.max() == top
            assert k.sum() == (h - 2 * top) * (w - 2 * top)
        else:  # strokes: connected blobs, never the whole image
            assert 0 < u.mean() < 1


def test_random_masks_are_per_example_functions_of_the_key():
    key = jax.random.key(7)
    a = editing.random_masks(key, 12, (28, 28))
    b = editing.random_masks(key, 5, (28, 28))
    np.testing.assert_array_equal(a[:5], b)  # example i depends on fold_in(key, i) only
    assert not np.array_equal(a, editing.random_masks(jax.random.key(8), 12, (28, 28)))
    jitted = jax.jit(lambda k: editing.random_masks(k, 12, (28, 28)))(key)
    np.testing.assert_array_equal(jitted, a)


def test_random_masks_follow_the_weights():
    m = np.asarray(editing.random_masks(jax.random.key(1), 400, (8, 8), kinds=("half", "border"), weights=(3, 1)))[..., 0]
    is_half = np.asarray([u.sum() == 32 and (np.all(u[:, :4] == u[:, :1]) or np.all(u[:4] == u[:1])) for u in 1 - m])
    # P(half) = 0.75; a border mask never hides exactly half in these rows/columns.
    assert abs(is_half.mean() - 0.75) < 3 * np.sqrt(0.75 * 0.25 / 400)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: editing.random_masks(jax.random.key(0), 4, (8, 8), kinds=("circle",)), "kinds"),
        (lambda: editing.random_masks(jax.random.key(0), 4, (8, 8), kinds=()), "kinds"),
        (lambda: editing.random_masks(jax.random.key(0), 4, (8, 8), kinds=("box", "half"), weights=(1,)), "weights"),
        (lambda: editing.random_masks(jax.random.key(0), 4, (8, 8), weights=(1, -1, 1, 1)), "weights"),
        (lambda: editing.random_masks(jax.random.key(0), 0, (8, 8)), "num"),
        (lambda: editing.random_masks(jax.random.key(0), 4, (8,)), "shape"),
        (lambda: editing.mask(jax.random.key(0), "ellipse", (8, 8)), "kind"),
        (lambda: editing.inpaint_cond(np.zeros((2, 4, 4, 1), np.float32), np.zeros((2, 4, 4, 2))), "mask"),
        (lambda: editing.inpaint_cond(np.zeros((2, 4, 4, 1), np.float32), np.full((2, 4, 4, 1), 0.5)), "mask"),
        (lambda: editing.inpaint_cond(np.zeros((2, 16), np.float32), np.ones((2, 16))), "x_known"),
        (lambda: transforms.get("inpaint", {"kinds": ("box", "blob")}), "kinds"),
    ],
)
def test_bad_mask_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_inpaint_cond_and_the_training_transform_agree():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
    key = jax.random.key(3)
    batch = jax.jit(transforms.get("inpaint"))({"image": x, "cond": {"label": jnp.arange(6)}}, key)
    m = editing.random_masks(key, 6, (8, 8))
    np.testing.assert_array_equal(batch["cond"]["image"], editing.inpaint_cond(x, m)["image"])
    np.testing.assert_array_equal(batch["cond"]["image"][..., 1:], m)
    np.testing.assert_array_equal(batch["cond"]["image"][..., :1], np.where(m > 0, x, 0.0))
    np.testing.assert_array_equal(batch["cond"]["label"], np.arange(6))  # the rest of the conditioning passes
    np.testing.assert_array_equal(batch["image"], x)  # the loss target is the whole image
    one = editing.inpaint_cond(x, m[:1])["image"]  # one mask for the whole batch broadcasts
    np.testing.assert_array_equal(one[..., 1:], np.broadcast_to(m[:1], m.shape))


def test_a_finetune_with_zero_initialised_mask_channels_starts_as_the_base():
    kw = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=1,
              num_classes=3)
    base, inp = UNet(**kw), UNet(**kw, image_channels=2)
    rng = np.random.default_rng(0)

    def random_params(module):  # "trained" values, without compiling the init (shapes only)
        shapes = jax.eval_shape(lambda: network.init_params(module, (8, 8, 1), jax.random.key(0)))
        return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype), shapes)

    base_params, fresh = random_params(base), random_params(inp)
    params, loaded = overlay_params(fresh, base_params)
    assert len(loaded) == len(jax.tree.leaves(base_params))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([0, 10, 500, 999])
    y = jnp.asarray([0, 1, 2, 3])
    ref = jax.jit(network.apply_fn(base))(base_params, x, t, cond={"label": y})
    cond_image = editing.inpaint_cond(x, editing.random_masks(jax.random.key(2), 4, (8, 8)))["image"]
    apply = jax.jit(network.apply_fn(inp))
    got = apply(params, x, t, cond={"label": y, "image": cond_image})
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    random_start = apply(fresh, x, t, cond={"label": y, "image": cond_image})
    assert float(jnp.max(jnp.abs(random_start - ref))) > 0.1  # the check can fail
    with pytest.raises(ValueError, match="expected equal shapes"):  # any other shape change still fails
        overlay_params(random_params(UNet(**{**kw, "base_channels": 16})), base_params)


def _conditional_eps(sched, x_t, t, cond):
    """The exact noise prediction of p(x_2 | x_1) for the mixture, x_1 and the mask read from
    cond["image"] ([B, 1, 2, 2]: the masked image and the mask; x_1 is entry 0)."""
    image = cond["image"]
    x1, known = image[:, 0, 0, 0], image[:, 0, 0, 1]
    logw = (np.log(WEIGHTS) + norm.logpdf(0.0, 0.0, STDS))[None] - 0.5 * (x1[:, None] - MEANS[None, :, 0]) ** 2 / STDS**2
    alpha, sigma = sched.alpha_sigma(t)
    alpha, sigma = alpha[:, None], sigma[:, None]
    var = alpha**2 * STDS[None] ** 2 + sigma**2  # [B, K] of q_t(x_2 | x_1)
    x2 = x_t[:, 0, 1, 0][:, None]
    r = jax.nn.softmax(logw - 0.5 * (x2 - alpha * MEANS[None, :, 1]) ** 2 / var - 0.5 * jnp.log(var), axis=1)
    eps2 = sigma[:, 0] * jnp.sum(r * (x2 - alpha * MEANS[None, :, 1]) / var, axis=1)
    eps = jnp.zeros_like(x_t).at[:, 0, 1, 0].set(eps2)
    return jnp.where(known[:, None, None, None] > 0, eps, jnp.nan)  # NaN unless the mask reached the network


def _exact_conditional(x1):
    logw = np.log(WEIGHTS) - 0.5 * (x1 - MEANS[:, 0]) ** 2 / STDS**2 - np.log(STDS)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mu, s = MEANS[:, 1], STDS
    mean = np.sum(w * mu)
    second = np.sum(w * (s**2 + mu**2))
    fourth = np.sum(w * (mu**4 + 6 * mu**2 * s**2 + 3 * s**4))  # E[x^4] of each Gaussian component
    return mean, np.sqrt(second - mean**2), second, np.sqrt(fourth - second**2), float(np.sum(w * norm.sf(0.0, mu, s)))


def test_inpaint_with_the_exact_conditional_network_samples_p_unknown_given_known():
    sched = schedules.linear(1000)
    n = 4000
    x1 = np.repeat(np.asarray([0.3, -0.6], np.float32), n // 2)  # two known values in one batch
    x_known = np.zeros((n, 1, 2, 1), np.float32)
    x_known[:, 0, 0, 0] = x1
    x_known[:, 0, 1, 0] = 5.0  # the unknown entry's value must not matter
    mask = np.zeros((1, 1, 2, 1), np.float32)
    mask[0, 0, 0, 0] = 1.0
    model_fn = jax.tree_util.Partial(_conditional_eps, sched)
    x = np.asarray(editing.inpaint(model_fn, sched, x_known, mask, jax.random.key(0), steps=200), np.float64)
    np.testing.assert_array_equal(x[:, 0, 0, 0], x1)  # pasted exactly
    for half, v in ((slice(0, n // 2), 0.3), (slice(n // 2, n), -0.6)):
        got = x[half, 0, 1, 0]
        mean, std, second, second_sd, p_pos = _exact_conditional(v)
        m = len(got)
        assert abs(got.mean() - mean) < 3.5 * std / np.sqrt(m), (v, got.mean(), mean)
        assert abs(np.mean(got**2) - second) < 3.5 * second_sd / np.sqrt(m), (v, np.mean(got**2), second)
        assert abs(np.mean(got > 0) - p_pos) < 3.5 * np.sqrt(p_pos * (1 - p_pos) / m), (v, np.mean(got > 0), p_pos)
    raw = editing.inpaint(model_fn, sched, x_known, mask, jax.random.key(0), steps=200, paste=False)
    assert not np.array_equal(np.asarray(raw)[:, 0, 0, 0], x1)  # without paste, the network's own values
    with pytest.raises(ValueError, match="cond\\['image'\\]"):
        editing.inpaint(model_fn, sched, x_known, mask, jax.random.key(0), cond={"image": x_known})
    assert samplers._sample_jit._cache_size() >= 1


def _seam_loop(x, m):
    """The seam measure by explicit loops over pixel pairs (float64)."""
    out = []
    for xi, mi in zip(np.asarray(x, np.float64), np.broadcast_to(np.asarray(m), x.shape[:-1] + (1,))):
        diffs = []
        h, w = xi.shape[:2]
        for i in range(h):
            for j in range(w):
                for di, dj in ((1, 0), (0, 1)):
                    if i + di < h and j + dj < w and mi[i, j, 0] != mi[i + di, j + dj, 0]:
                        diffs.append(np.mean(np.abs(xi[i, j] - xi[i + di, j + dj])))
        out.append(np.mean(diffs) if diffs else np.nan)
    return np.asarray(out)


def test_seam_gradient_matches_the_pixel_pair_definition():
    from jdiff import metrics

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (5, 6, 7, 2)).astype(np.float32)
    m = np.array(editing.random_masks(jax.random.key(0), 5, (6, 7)))
    m[4] = 1.0  # no border: NaN
    got = np.asarray(metrics.seam_gradient(x, m))
    np.testing.assert_allclose(got[:4], _seam_loop(x, m)[:4], rtol=1e-5)
    assert np.isnan(got[4])
    smooth = np.broadcast_to(np.linspace(-1, 1, 7, dtype=np.float32)[None, None, :, None], (5, 6, 7, 1))
    m[:] = 0
    m[:, :, :3] = 1  # a vertical border: the constant step 2/6 of the ramp
    np.testing.assert_allclose(metrics.seam_gradient(smooth, m), np.full(5, 2 / 6), rtol=1e-5)


def _config(name, arg=None):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("name,base,arg", [("digits_inpaint", "digits", None), ("digits_inpaint", "digits", "scratch"),
                                           ("fashion_mnist_inpaint", "fashion_mnist", None),
                                           ("fashion_mnist_inpaint", "fashion_mnist", "scratch")])
def test_inpaint_configs_fine_tune_their_base(name, base, arg):
    """Each inpainting config validates, its transform's cond["image"] fits the network, and the
    base config's params overlay onto it completely (only the first conv's input channels grow)."""
    from jdiff.train import config as config_lib

    c, b = _config(name, arg), _config(base)
    config_lib.validate(c)
    assert c.data.transform == "inpaint" and c.model.image_channels == 2
    assert c.train.init_from == ("" if arg == "scratch" else f"workdirs/{base}")
    shape = (8, 8, 1) if base == "digits" else (28, 28, 1)
    model, base_model = network.build_model(c), network.build_model(b)
    # Shapes only, as for the params below: the transform's masks need not compile.
    batch = jax.eval_shape(lambda: network.example_batch(model, shape, network.make_transform(c)))
    assert batch["cond"]["image"].shape == (1,) + shape[:2] + (2,)
    cond = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), batch["cond"])
    params = jax.eval_shape(lambda: network.init_params(model, shape, jax.random.key(0), cond=cond))
    base_params = jax.eval_shape(lambda: network.init_params(base_model, shape, jax.random.key(0)))
    zeros = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)  # noqa: E731 - NumPy: no compiles
    _, loaded = overlay_params(zeros(params), zeros(base_params))
    assert len(loaded) == len(jax.tree.leaves(base_params)) == len(jax.tree.leaves(params))


def test_inpaint_configs_reject_unknown_variants():
    with pytest.raises(ValueError, match="arg"):
        _config("digits_inpaint", "large")
    with pytest.raises(ValueError, match="arg"):
        _config("fashion_mnist_inpaint", "large")
