"""SDEdit, RePaint and guidance inpainting against the exact Gaussian mixture (jdiff.testing).

SDEdit with the exact score and a stochastic sampler samples p(x_0 | x_t0) given x_t0, so over
the guide's noising its output law is E_{x_t0 ~ q(. | x_guide)} p(x_0 | x_t0): computed here by
averaging the closed-form posterior (GaussianMixture.posterior) over 200,000 float64 draws.
RePaint is not exact; its exact properties are tested here and its error is measured in
benchmarks/editing_mixture.py (BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import jdiff
from jdiff import editing, guidance, samplers, schedules
from jdiff.testing import gaussian_mixture

WEIGHTS = np.array([0.4, 0.6])
MEANS = np.array([[-1.0, -1.5], [1.0, 1.5]])
STDS = np.array([0.5, 0.4])


@pytest.fixture(scope="module")
def gm():
    return gaussian_mixture(WEIGHTS, MEANS, STDS)


@pytest.fixture(scope="module")
def sched():
    return schedules.linear(1000)


def _sdedit_reference(gm, x_guide, alpha, sigma, m=200_000, seed=0):
    """Mean, std and P(x_0[0] > 0) of E_{x_t0} p(x_0 | x_t0), x_t0 = alpha x_guide + sigma eps."""
    rng = np.random.default_rng(seed)
    x_t0 = alpha * np.asarray(x_guide, np.float64) + sigma * rng.standard_normal((m, 2))
    w, mu, s = (np.asarray(a, np.float64) for a in gm.posterior(jnp.asarray(x_t0, jnp.float32), alpha, sigma))
    mean = np.einsum("bk,bkd->d", w, mu) / m
    second = np.einsum("bk,bkd->d", w, s**2 + mu**2) / m
    p_pos = float(np.mean(np.sum(w * norm.cdf(mu[..., 0] / s[..., 0]), axis=1)))
    return mean, np.sqrt(second - mean**2), p_pos


@pytest.mark.parametrize("t0,method,kwargs", [(300, "ddpm", {}), (600, "ddpm", {}), (450, "euler_maruyama", {}),
                                              (450, "ddim", {"eta": 1.0})])
def test_sdedit_samples_the_noised_guide_posterior(gm, sched, t0, method, kwargs):
    n = 6000
    x_guide = np.array([0.2, -0.4])
    x = jdiff.editing.sdedit(gm.model_fn(sched), sched, jnp.broadcast_to(jnp.asarray(x_guide, jnp.float32), (n, 2)), t0,
                             jax.random.key(t0), method=method, **kwargs)
    x = np.asarray(x, np.float64)
    alpha, sigma = (float(v) for v in sched.alpha_sigma(t0))
    mean, std, p_pos = _sdedit_reference(gm, x_guide, alpha, sigma)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 3 * std / np.sqrt(n), err_msg="mean")
    np.testing.assert_array_less(np.abs(x.std(0) - std), 3 * std / np.sqrt(2 * n), err_msg="std")
    frac = np.mean(x[:, 0] > 0)
    assert abs(frac - p_pos) < 3 * np.sqrt(p_pos * (1 - p_pos) / n), f"P(x0 > 0): {frac:.4f} vs {p_pos:.4f}"


def test_sdedit_t0_trades_faithfulness_for_realism(gm, sched):
    """Distance to the guide grows with t0 (the trade-off curve's monotone axis)."""
    x_guide = jnp.broadcast_to(jnp.asarray([0.0, 0.0]), (2000, 2))
    dist = [float(jnp.mean(jnp.linalg.norm(editing.sdedit(gm.model_fn(sched), sched, x_guide, t0, jax.random.key(1)) - x_guide, axis=1)))
            for t0 in (50, 300, 900)]
    assert dist[0] < dist[1] < dist[2]


def test_sdedit_with_guidance_and_few_steps(gm, sched):
    """Any sampler and any guidance wrapper: classifier-free guidance with the exact conditional
    model and 20 DDIM steps from t0."""
    cond = gm.conditional_model_fn(sched)
    model = guidance.with_label(guidance.classifier_free(cond, 2.0, num_classes=2), jnp.ones((500,), jnp.int32))
    x = editing.sdedit(model, sched, jnp.zeros((500, 2)), 700, jax.random.key(2), method="ddim", steps=20)
    assert float(jnp.mean(x[:, 0] > 0)) > 0.95  # guided to component 1


def _reference_schedule_jump(t_T, jump_length, jump_n_sample):
    """The RePaint reference code's get_schedule_jump, transcribed."""
    jumps = {}
    for j in range(0, t_T - jump_length, jump_length):
        jumps[j] = jump_n_sample - 1
    t = t_T
    ts = []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize("n,j,r", [(10, 3, 2), (25, 10, 10), (12, 4, 1), (7, 10, 3)])
def test_repaint_times_match_the_reference(n, j, r):
    got = editing.repaint_times(n, j, r)
    np.testing.assert_array_equal(got, _reference_schedule_jump(n, j, r))
    steps = np.diff(got)
    assert np.all(np.abs(steps) == 1)
    assert np.sum(steps > 0) == (r - 1) * j * len(range(0, n - j, j))


@pytest.mark.parametrize("jump_n_sample", [1, 3])
def test_repaint_exact_properties(gm, sched, jump_n_sample):
    """Known entries end exactly at x_known; nothing known is unconditional sampling; everything
    known returns the input."""
    n = 3000
    x_known = jnp.broadcast_to(jnp.asarray([0.7, -0.2], jnp.float32), (n, 2))
    kw = dict(steps=100, jump_length=10, jump_n_sample=jump_n_sample)
    x = editing.repaint(gm.model_fn(sched), sched, x_known, jnp.asarray([1.0, 0.0]), jax.random.key(3), **kw)
    np.testing.assert_array_equal(x[:, 0], x_known[:, 0])
    assert float(jnp.std(x[:, 1])) > 0.3
    everything = editing.repaint(gm.model_fn(sched), sched, x_known, jnp.ones((1, 2)), jax.random.key(4), **kw)
    np.testing.assert_array_equal(everything, x_known)
    nothing = np.asarray(editing.repaint(gm.model_fn(sched), sched, x_known, jnp.zeros(2), jax.random.key(5), **kw), np.float64)
    # Unconditional: the mixture's weights and means (100 respaced ancestral steps).
    comp = (nothing[:, 0] > 0).astype(int)
    assert abs(comp.mean() - WEIGHTS[1]) < 3 * np.sqrt(WEIGHTS[1] * WEIGHTS[0] / n)
    for k in (0, 1):
        np.testing.assert_allclose(nothing[comp == k].mean(0), MEANS[k], atol=0.06)


def test_repaint_on_images_with_a_broadcast_mask(sched):
    means = np.stack([np.full((4, 4, 1), -1.0), np.full((4, 4, 1), 1.0)])
    gm = gaussian_mixture([0.5, 0.5], means, [0.3, 0.3])
    x_known = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 1)), jnp.float32)
    mask = np.zeros((4, 4, 1), np.float32)
    mask[:, :2] = 1.0
    x = editing.repaint(gm.model_fn(sched), sched, x_known, mask, jax.random.key(6), steps=50, jump_length=5, jump_n_sample=2)
    np.testing.assert_array_equal(x[:, :, :2], x_known[:, :, :2])


def test_inpaint_energy_is_the_masked_x0_error(gm, sched):
    x_known = jnp.asarray([[0.5, 1.0], [0.5, 1.0]])
    mask = jnp.asarray([1.0, 0.0])
    f = editing.inpaint_energy(gm.model_fn(sched), sched, x_known, mask)
    x_t, t = jnp.asarray([[0.1, 0.2], [-0.3, 0.4]]), jnp.asarray([100, 700])
    x0 = jdiff.predict_x0(sched, x_t, t, gm.model_fn(sched)(x_t, t))
    np.testing.assert_allclose(f(x_t, t), -((x0[:, 0] - 0.5) ** 2), rtol=1e-6)
    guided = guidance.energy(gm.model_fn(sched), f, 1.0, sched)
    assert guided(x_t, t).shape == (2, 2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, s: editing.sdedit(m, s, jnp.zeros((2, 2)), 1000, jax.random.key(0)), "t0"),
        (lambda m, s: editing.sdedit(m, s, jnp.zeros((2, 2)), -1, jax.random.key(0)), "t0"),
        (lambda m, s: editing.sdedit(m, s, jnp.zeros((2, 2)), 2.5, jax.random.key(0)), "t0"),
        (lambda m, s: editing.sdedit(m, s, jnp.zeros((2, 2)), 10, jax.random.key(0), steps=20), "steps"),
        (lambda m, s: editing.sdedit(m, s, np.array([[np.nan, 0.0]]), 10, jax.random.key(0)), "x_guide"),
        (lambda m, s: editing.repaint(m, s, jnp.zeros((2, 2)), jnp.zeros((3,)), jax.random.key(0)), "mask"),
        (lambda m, s: editing.repaint(m, s, jnp.zeros((2, 2)), jnp.full((2,), 0.5), jax.random.key(0)), "mask"),
        (lambda m, s: editing.repaint(m, s, jnp.zeros((2, 2)), jnp.zeros((2, 2, 2)), jax.random.key(0)), "mask"),
        (lambda m, s: editing.repaint(m, s, jnp.zeros((2, 2)), jnp.zeros((2,)), jax.random.key(0), jump_n_sample=0), "jump_n_sample"),
        (lambda m, s: editing.repaint(m, s, jnp.zeros((2, 2)), jnp.zeros((2,)), jax.random.key(0), steps=5), "jump_length"),
        (lambda m, s: editing.repaint(m, s, jnp.zeros((2, 2)), jnp.zeros((2,)), jax.random.key(0), steps=2000), "steps"),
    ],
)
def test_bad_input_raises_before_compiling(gm, sched, call, match):
    before = samplers._sample_jit._cache_size()
    with pytest.raises(ValueError, match=match):
        call(gm.model_fn(sched), sched)
    assert samplers._sample_jit._cache_size() == before
