"""The exact Gaussian-mixture model against float64 NumPy transcriptions of its noised density."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules
from jdiff.testing import gaussian_mixture

WEIGHTS = np.array([0.2, 0.5, 0.3])
MEANS = np.array([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]])
STDS = np.array([[0.4, 0.6], [0.3, 0.3], [0.8, 0.2]])


def np_log_components(x, abar):
    """log(pi_k N(x; sqrt(abar) mu_k, diag(abar s_k^2 + 1 - abar))), float64, [B, K]."""
    x = np.asarray(x, np.float64)
    var = abar[:, None, None] * STDS[None] ** 2 + (1 - abar[:, None, None])
    diff = x[:, None, :] - np.sqrt(abar)[:, None, None] * MEANS[None]
    return np.log(WEIGHTS)[None] - 0.5 * np.sum(diff**2 / var + np.log(2 * np.pi * var), -1)


def np_log_density(x, abar):
    lc = np_log_components(x, abar)
    m = lc.max(1, keepdims=True)
    return (m + np.log(np.exp(lc - m).sum(1, keepdims=True)))[:, 0]


@pytest.fixture(scope="module")
def setup():
    sched = schedules.cosine(100)
    gm = gaussian_mixture(WEIGHTS, MEANS, STDS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2)) * 1.5
    t = rng.integers(0, 100, size=16)
    abar = np.cumprod(1 - np.asarray(sched.betas, np.float64))[t]
    return sched, gm, x, t, abar


def test_eps_is_the_scaled_score_of_the_noised_mixture(setup):
    sched, gm, x, t, abar = setup
    h = 1e-5
    grad = np.stack(
        [(np_log_density(x + h * e, abar) - np_log_density(x - h * e, abar)) / (2 * h) for e in np.eye(2)], axis=1
    )
    eps = gm.model_fn(sched)(jnp.asarray(x, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(eps, -np.sqrt(1 - abar)[:, None] * grad, rtol=1e-4, atol=1e-5)
    score = gm.model_fn(sched, "score")(jnp.asarray(x, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(score, grad, rtol=1e-4, atol=1e-5)


def test_x0_and_v_outputs_are_tweedie(setup):
    sched, gm, x, t, abar = setup
    eps = np.asarray(gm.model_fn(sched)(jnp.asarray(x, jnp.float32), jnp.asarray(t)), np.float64)
    x0 = (x - np.sqrt(1 - abar)[:, None] * eps) / np.sqrt(abar)[:, None]
    np.testing.assert_allclose(gm.model_fn(sched, "x0")(jnp.asarray(x, jnp.float32), jnp.asarray(t)), x0, rtol=1e-4, atol=1e-4)
    v = np.sqrt(abar)[:, None] * eps - np.sqrt(1 - abar)[:, None] * x0
    np.testing.assert_allclose(gm.model_fn(sched, "v")(jnp.asarray(x, jnp.float32), jnp.asarray(t)), v, rtol=1e-4, atol=1e-4)


def test_class_posterior(setup):
    sched, gm, x, t, abar = setup
    lc = np_log_components(x, abar)
    want = lc - np.log(np.exp(lc).sum(1, keepdims=True))
    got = gm.class_log_posterior(jnp.asarray(x, jnp.float32), jnp.asarray(abar, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    y = jnp.arange(16) % 3
    lp = gm.class_log_prob_fn(sched)(jnp.asarray(x, jnp.float32), jnp.asarray(t), y)
    np.testing.assert_allclose(lp, want[np.arange(16), np.asarray(y)], rtol=1e-5, atol=1e-5)


def test_conditional_eps(setup):
    sched, gm, x, t, abar = setup
    xj, tj = jnp.asarray(x, jnp.float32), jnp.asarray(t)
    cond = gm.conditional_model_fn(sched)
    np.testing.assert_array_equal(cond(xj, tj, jnp.full((16,), 3)), gm.model_fn(sched)(xj, tj))
    # Component k alone: eps = sqrt(1 - abar) (x - sqrt(abar) mu_k) / (abar s_k^2 + 1 - abar).
    for k in range(3):
        var = abar[:, None] * STDS[k] ** 2 + 1 - abar[:, None]
        want = np.sqrt(1 - abar)[:, None] * (x - np.sqrt(abar)[:, None] * MEANS[k]) / var
        np.testing.assert_allclose(cond(xj, tj, jnp.full((16,), k)), want, rtol=1e-5, atol=1e-6)


def test_sample_statistics():
    gm = gaussian_mixture(WEIGHTS, MEANS, STDS)
    x, comp = gm.sample(jax.random.key(0), 20000)
    x, comp = np.asarray(x), np.asarray(comp)
    for k in range(3):
        assert abs(np.mean(comp == k) - WEIGHTS[k]) < 3 * np.sqrt(WEIGHTS[k] * (1 - WEIGHTS[k]) / 20000)
        np.testing.assert_allclose(x[comp == k].mean(0), MEANS[k], atol=0.03)
        np.testing.assert_allclose(x[comp == k].std(0), STDS[k], rtol=0.05)


def test_image_shaped_events():
    means = np.random.default_rng(1).normal(size=(2, 4, 4, 3))
    gm = gaussian_mixture([1.0, 3.0], means, 0.5)
    assert gm.event_shape == (4, 4, 3)
    np.testing.assert_allclose(gm.weights, [0.25, 0.75])
    x, _ = gm.sample(jax.random.key(0), 5)
    assert x.shape == (5, 4, 4, 3)
    sched = schedules.linear(10, beta_end=0.2)
    assert gm.model_fn(sched)(x, jnp.zeros((5,), jnp.int32)).shape == (5, 4, 4, 3)


def test_bad_input():
    with pytest.raises(ValueError, match="weights"):
        gaussian_mixture([0.5, -0.5], MEANS[:2], 0.1)
    with pytest.raises(ValueError, match="means"):
        gaussian_mixture(WEIGHTS, MEANS[:2], 0.1)
    with pytest.raises(ValueError, match="stds"):
        gaussian_mixture(WEIGHTS, MEANS, 0.0)
    gm = gaussian_mixture(WEIGHTS, MEANS, STDS)
    with pytest.raises(ValueError, match="x: expected shape"):
        gm.score(jnp.zeros((4, 3)), jnp.ones((4,)))
