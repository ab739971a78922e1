"""jdiff.diffusion against float64 NumPy transcriptions of the papers' equations.

References: Ho et al. 2020 (DDPM) eqs. 4, 6, 7 and the reference code's clipped log
variance; Nichol & Dhariwal 2021 (improved DDPM) eq. 15; Salimans & Ho 2022
(v-prediction, sec. 4 and appendix D); Song et al. 2021 (score = -eps / sigma);
Saharia et al. 2022 (Imagen, dynamic thresholding, sec. 2.3).

Every reference starts from float64 betas written here (not from the Schedule under test).
Where a result is a difference of terms (values crossing zero), float32 rounds each term, so
the tolerance is relative to the sum of the terms' magnitudes (``scale``), not to the result.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jdiff import diffusion, schedules

RTOL = 1e-5
T = 1000
PARAMS = ("eps", "x0", "v", "score")
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")


def _cosine_betas(T, s=0.008):
    """Improved DDPM eq. 17 with the sec. 3.2 clip at 0.999."""
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)


def _cases():
    """name -> (Schedule under test, its float64 betas). All have T = 1000 steps, so a jitted
    function compiles once for all of them."""
    rng = np.random.default_rng(0)
    cos4k = _cosine_betas(4 * T)
    # 1000 of 4000 steps, unevenly: the first and last always, the rest at random.
    kept = np.sort(np.concatenate([[0, 4 * T - 1], rng.choice(np.arange(1, 4 * T - 1), T - 2, replace=False)]))
    abar_kept = np.cumprod(1.0 - cos4k)[kept]
    rnd = rng.uniform(1e-5, 0.03, size=T)  # unsorted, so no monotonicity is assumed anywhere
    return {
        "linear": (schedules.linear(T), np.linspace(1e-4, 0.02, T)),
        "cosine": (schedules.cosine(T), _cosine_betas(T)),
        "random_betas": (schedules.from_betas(rnd), rnd),
        "respaced": (schedules.respace(schedules.cosine(4 * T), kept), 1.0 - abar_kept / np.concatenate([[1.0], abar_kept[:-1]])),
    }


CASES = _cases()
NAMED = [(name, name) for name in CASES]


class Ref:
    """DDPM's per-timestep coefficients in float64, gathered at t and shaped like [B, 1, 1, 1]."""

    def __init__(self, betas, t, ndim):
        betas = np.asarray(betas, np.float64)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * betas  # eq. 7
        log_beta_tilde_clipped = np.log(np.concatenate([beta_tilde[1:2], beta_tilde[1:]]))
        g = lambda a: a[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))  # noqa: E731
        self.T = betas.shape[0]
        self.beta, self.alpha = g(betas), g(alphas)
        self.abar, self.abar_prev = g(abar), g(abar_prev)
        self.a, self.s = np.sqrt(self.abar), np.sqrt(1.0 - self.abar)  # alpha_t, sigma_t of x_t = a x_0 + s eps
        self.beta_tilde, self.log_beta_tilde_clipped = g(beta_tilde), g(log_beta_tilde_clipped)
        # The reference code's "fixed_large": beta_t, with beta_tilde_1 in place of beta_0.
        self.beta_large = g(np.concatenate([beta_tilde[1:2], betas[1:]]))
        self.coef1 = np.sqrt(self.abar_prev) * self.beta / (1.0 - self.abar)  # eq. 7
        self.coef2 = np.sqrt(self.alpha) * (1.0 - self.abar_prev) / (1.0 - self.abar)

    def to_x0_eps(self, out, xt, parameterization):
        """(x0, eps, x0_scale, eps_scale) from a network output; scales are the terms' magnitudes."""
        a, s = self.a, self.s
        if parameterization == "eps":
            return (xt - s * out) / a, out, (abs(xt) + s * abs(out)) / a, abs(out)
        if parameterization == "x0":
            return out, (xt - a * out) / s, abs(out), (abs(xt) + a * abs(out)) / s
        if parameterization == "v":  # Salimans & Ho: x = alpha z - sigma v, eps = sigma z + alpha v
            return a * xt - s * out, s * xt + a * out, a * abs(xt) + s * abs(out), s * abs(xt) + a * abs(out)
        eps = -s * out  # score = -eps / sigma
        return (xt - s * eps) / a, eps, (abs(xt) + s * abs(eps)) / a, abs(eps)


def assert_close(actual, expected, scale=0.0, rtol=RTOL, msg=""):
    """Elementwise |actual - expected| <= rtol * (|expected| + scale)."""
    actual = np.asarray(actual, np.float64)
    expected = np.broadcast_to(np.asarray(expected, np.float64), actual.shape)
    bound = rtol * (np.abs(expected) + scale)
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{msg}: |{actual[worst]} - {expected[worst]}| = {err[worst]:.3g} > {bound[worst]:.3g} at {worst}"


def _inputs(sched, seed, shape=(6, 4, 4, 3)):
    """Random float32 data and timesteps that always include t = 0 and t = T-1."""
    rng = np.random.default_rng(seed)
    Tn = sched.num_timesteps
    t = np.concatenate([[0, Tn - 1], rng.integers(0, Tn, size=shape[0] - 2)]).astype(np.int32)
    arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    return (t, *arrays)


f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731


class ForwardAndPosteriorTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_q_mean_variance(self, name):
        sched, betas = CASES[name]
        t, x0, _, _ = _inputs(sched, 1)
        r = Ref(betas, t, x0.ndim)
        mean, var, log_var = self.variant(diffusion.q_mean_variance)(sched, x0, t)
        chex.assert_shape([mean, var, log_var], x0.shape)
        # DDPM eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
        assert_close(mean, r.a * x0, msg="mean")
        assert_close(var, 1.0 - r.abar, msg="variance")
        assert_close(log_var, np.log(1.0 - r.abar), msg="log_variance")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_q_sample(self, name):
        sched, betas = CASES[name]
        t, x0, noise, _ = _inputs(sched, 2)
        r = Ref(betas, t, x0.ndim)
        xt = self.variant(diffusion.q_sample)(sched, x0, t, noise)
        chex.assert_shape(xt, x0.shape)
        assert_close(xt, r.a * f64(x0) + r.s * noise, scale=r.a * abs(x0) + r.s * abs(noise), msg="x_t")
        # A scalar t applies to the whole batch.
        xt_scalar = self.variant(diffusion.q_sample)(sched, x0, jnp.int32(t[1]), noise)
        r1 = Ref(betas, np.full_like(t, t[1]), x0.ndim)
        assert_close(xt_scalar, r1.a * f64(x0) + r1.s * noise, scale=r1.a * abs(x0) + r1.s * abs(noise), msg="scalar t")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_q_posterior(self, name):
        sched, betas = CASES[name]
        t, x0, xt, _ = _inputs(sched, 3)
        r = Ref(betas, t, x0.ndim)
        mean, var, log_var = self.variant(diffusion.q_posterior)(sched, x0, xt, t)
        chex.assert_shape([mean, var, log_var], x0.shape)
        # DDPM eq. 7.
        want_mean = r.coef1 * x0 + r.coef2 * xt
        assert_close(mean, want_mean, scale=r.coef1 * abs(x0) + r.coef2 * abs(xt), msg="mean")
        assert_close(var, np.broadcast_to(r.beta_tilde, x0.shape), msg="variance")
        assert_close(log_var, np.broadcast_to(r.log_beta_tilde_clipped, x0.shape), msg="log variance")
        # The same Gaussian by Bayes' rule (eq. 6), for t > 0: prior q(x_{t-1} | x_0) =
        # N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) times likelihood q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t).
        pos = t > 0
        precision = 1.0 / (1.0 - r.abar_prev[pos]) + r.alpha[pos] / r.beta[pos]
        bayes_mean = (np.sqrt(r.abar_prev[pos]) * x0[pos] / (1.0 - r.abar_prev[pos]) + np.sqrt(r.alpha[pos]) * xt[pos] / r.beta[pos]) / precision
        assert_close(np.asarray(mean)[pos], bayes_mean, scale=r.coef1[pos] * abs(x0[pos]) + r.coef2[pos] * abs(xt[pos]), msg="Bayes mean")
        assert_close(np.asarray(var)[pos], np.broadcast_to(1.0 / precision, x0[pos].shape), msg="Bayes variance")
        # t = 0 (the first batch element): a point mass at x_0 whose log variance is clipped to log beta_tilde_1.
        assert t[0] == 0
        assert_close(np.asarray(mean)[0], x0[0], msg="mean at t=0")
        assert float(jnp.max(var[0])) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_predict_x0_and_eps(self, name):
        sched, betas = CASES[name]
        t, xt, eps, x0 = _inputs(sched, 4)
        r = Ref(betas, t, xt.ndim)
        got_x0 = self.variant(diffusion.predict_x0)(sched, xt, t, eps)
        got_eps = self.variant(diffusion.predict_eps)(sched, xt, t, x0)
        chex.assert_shape([got_x0, got_eps], xt.shape)
        # Eq. 4 solved for x_0 and for eps.
        assert_close(got_x0, (xt - r.s * f64(eps)) / r.a, scale=(abs(xt) + r.s * abs(eps)) / r.a, msg="x0")
        assert_close(got_eps, (xt - r.a * f64(x0)) / r.s, scale=(abs(xt) + r.a * abs(x0)) / r.s, msg="eps")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_v_conversions(self, name):
        sched, betas = CASES[name]
        t, x0, eps, xt = _inputs(sched, 5)
        v = eps  # any array: the conversions are linear maps, tested on independent inputs
        r = Ref(betas, t, x0.ndim)
        got_v = self.variant(diffusion.predict_v)(sched, x0, t, eps)
        got_x0 = self.variant(diffusion.predict_x0_from_v)(sched, xt, t, v)
        got_eps = self.variant(diffusion.predict_eps_from_v)(sched, xt, t, v)
        chex.assert_shape([got_v, got_x0, got_eps], x0.shape)
        # Salimans & Ho 2022: v = alpha eps - sigma x, x = alpha z - sigma v, eps = sigma z + alpha v.
        assert_close(got_v, r.a * f64(eps) - r.s * x0, scale=r.a * abs(eps) + r.s * abs(x0), msg="v")
        assert_close(got_x0, r.a * f64(xt) - r.s * v, scale=r.a * abs(xt) + r.s * abs(v), msg="x0 from v")
        assert_close(got_eps, r.s * f64(xt) + r.a * v, scale=r.s * abs(xt) + r.a * abs(v), msg="eps from v")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_score_conversions(self, name):
        sched, betas = CASES[name]
        t, x0, eps, score = _inputs(sched, 6)
        r = Ref(betas, t, x0.ndim)
        got_score = self.variant(diffusion.score_from_eps)(sched, t, eps)
        got_eps = self.variant(diffusion.eps_from_score)(sched, t, score)
        # The score of q(x_t | x_0) = N(a x_0, s^2 I) at x_t = a x_0 + s eps is -(x_t - a x_0) / s^2 = -eps / s.
        xt = r.a * f64(x0) + r.s * eps
        assert_close(got_score, -(xt - r.a * x0) / r.s**2, scale=(abs(xt) + r.a * abs(x0)) / r.s**2, msg="score")
        assert_close(got_score, -f64(eps) / r.s, msg="score")
        assert_close(got_eps, -r.s * f64(score), msg="eps")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_to_x0_eps(self, name):
        sched, betas = CASES[name]
        t, xt, out, _ = _inputs(sched, 7)
        r = Ref(betas, t, xt.ndim)
        for p in PARAMS:
            x0, eps = self.variant(functools.partial(diffusion.to_x0_eps, parameterization=p))(sched, out, xt, t)
            want_x0, want_eps, x0_scale, eps_scale = r.to_x0_eps(f64(out), f64(xt), p)
            assert_close(x0, want_x0, scale=x0_scale, msg=f"{p}: x0")
            assert_close(eps, want_eps, scale=eps_scale, msg=f"{p}: eps")


class PMeanVarianceTest(chex.TestCase):
    """Every parameterization x variance type, on every schedule, compiled and not."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(parameterization=PARAMS, variance=VARIANCES)
    def test_p_mean_variance(self, parameterization, variance):
        fn = self.variant(functools.partial(diffusion.p_mean_variance, parameterization=parameterization, variance=variance))
        for seed, (name, (sched, betas)) in enumerate(CASES.items()):
            t, xt, pred, var_out = _inputs(sched, 100 + seed)
            learned = variance in ("learned_range", "learned")
            if variance == "learned_range":
                var_out = np.tanh(var_out)  # the network's v in [-1, 1]
            out = np.concatenate([pred, var_out], axis=-1) if learned else pred
            pmv = fn(sched, out, xt, t)
            chex.assert_shape(list(pmv), xt.shape)
            r = Ref(betas, t, xt.ndim)
            x0, eps, x0_scale, eps_scale = r.to_x0_eps(f64(pred), f64(xt), parameterization)
            msg = f"{name}/{parameterization}/{variance}"
            assert_close(pmv.pred_x0, x0, scale=x0_scale, msg=msg + ": pred_x0")
            assert_close(pmv.pred_eps, eps, scale=eps_scale, msg=msg + ": pred_eps")
            # The mean is the posterior mean (eq. 7) at the predicted x_0.
            assert_close(pmv.mean, r.coef1 * x0 + r.coef2 * xt, scale=r.coef1 * x0_scale + r.coef2 * abs(xt), msg=msg + ": mean")
            if variance == "fixed_small":
                log_var, var = r.log_beta_tilde_clipped, r.beta_tilde  # variance 0 at t = 0, log clipped
            elif variance == "fixed_large":
                log_var, var = np.log(r.beta_large), r.beta_large
            elif variance == "learned_range":
                # Improved DDPM eq. 15: log Sigma = v log beta_t + (1 - v) log beta_tilde_t, v = (out + 1) / 2.
                frac = (f64(var_out) + 1.0) / 2.0
                log_var = frac * np.log(r.beta) + (1.0 - frac) * r.log_beta_tilde_clipped
                var = np.exp(log_var)
            else:
                log_var, var = f64(var_out), np.exp(f64(var_out))
            # log turns the float32 relative error of its argument into an absolute one, so a log
            # variance near 0 (beta ~ 1 at a respaced schedule's last step) is exact to ~1e-7, not
            # relative to itself. (Both logs in eq. 15 have one sign: the interpolation never cancels.)
            log_var_scale = abs(log_var) + 1.0
            assert_close(pmv.log_variance, np.broadcast_to(log_var, xt.shape), scale=log_var_scale, msg=msg + ": log_variance")
            # exp turns the log's absolute error (rtol * its scale) into a relative one.
            assert_close(pmv.variance, np.broadcast_to(var, xt.shape), scale=np.abs(var) * log_var_scale, msg=msg + ": variance")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("static", True), ("static_float", 1.5), ("dynamic", "dynamic"))
    def test_p_mean_variance_clips_x0_and_recomputes_eps(self, clip):
        sched, betas = CASES["cosine"]
        t, xt, eps, _ = _inputs(sched, 8)
        x0_fn = lambda x0: 0.5 * x0  # noqa: E731  (any user transform of x_0, applied after clipping)
        pmv = self.variant(functools.partial(diffusion.p_mean_variance, clip=clip, x0_fn=x0_fn))(sched, eps, xt, t)
        r = Ref(betas, t, xt.ndim)
        x0, _, x0_scale, _ = r.to_x0_eps(f64(eps), f64(xt), "eps")
        assert np.any(np.abs(x0) > 1.5), "the test needs predicted x_0 outside the clip range"
        x0 = 0.5 * ref_threshold(x0, clip)
        assert_close(pmv.pred_x0, x0, scale=x0_scale, msg="pred_x0")
        eps_want = (xt - r.a * x0) / r.s
        assert_close(pmv.pred_eps, eps_want, scale=(abs(xt) + r.a * (abs(x0) + x0_scale)) / r.s, msg="pred_eps")
        assert_close(pmv.mean, r.coef1 * x0 + r.coef2 * xt, scale=r.coef1 * x0_scale + r.coef2 * abs(xt), msg="mean")


def ref_threshold(x0, clip, percentile=0.995):
    if clip == "dynamic":  # Imagen sec. 2.3: s = max(1, p-th percentile of |x_0|) per example
        s = np.maximum(np.quantile(np.abs(x0).reshape(x0.shape[0], -1), percentile, axis=1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return np.clip(x0, -s, s) / s
    c = 1.0 if clip is True else clip
    return np.clip(x0, -c, c)


class ThresholdTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_threshold_x0(self):
        rng = np.random.default_rng(9)
        x0 = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
        x0[0] *= 0.2  # every |x_0| < 1: dynamic thresholding leaves it alone (s = 1)
        x0[-1] *= 3.0  # the 99.5th percentile is well above 1: rescaled
        for clip in (True, 0.7, 2.0, "dynamic"):
            got = self.variant(functools.partial(diffusion.threshold_x0, clip=clip))(x0)
            chex.assert_shape(got, x0.shape)
            assert_close(got, ref_threshold(f64(x0), clip), msg=str(clip))
        got = self.variant(functools.partial(diffusion.threshold_x0, clip="dynamic", percentile=0.9))(x0)
        assert_close(got, ref_threshold(f64(x0), "dynamic", 0.9), msg="percentile 0.9")
        assert_close(got[0], x0[0], msg="s = 1")
        assert float(jnp.max(jnp.abs(got[-1]))) <= 1.0
        chex.assert_trees_all_equal(diffusion.threshold_x0(x0, None), x0)


# ---------------------------------------------------------------------------
# Properties of the forward process and its posterior
# ---------------------------------------------------------------------------


N_DRAWS = 100_000


def _assert_moments(samples, mean, var, msg):
    """Sample mean and variance within 5 standard errors (fixed key, so deterministic)."""
    n = samples.shape[0]
    m, v = samples.mean(0), samples.var(0)
    np.testing.assert_array_less(np.abs(m - mean), 5.0 * np.sqrt(var / n), err_msg=msg + ": mean")
    np.testing.assert_array_less(np.abs(v - var), 5.0 * var * np.sqrt(2.0 / n), err_msg=msg + ": variance")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_has_the_marginal_mean_and_variance(name):
    sched, betas = CASES[name]
    x0 = np.linspace(-1.0, 1.0, 5).astype(np.float32)
    rng = np.random.default_rng(13)
    for t0 in (0, T // 2, T - 1):
        noise = rng.normal(size=(N_DRAWS, 5)).astype(np.float32)
        xt = diffusion.q_sample(sched, jnp.broadcast_to(x0, (N_DRAWS, 5)), jnp.full((N_DRAWS,), t0), noise)
        r = Ref(betas, [t0], 2)
        _assert_moments(f64(xt), r.a[0] * x0, (1.0 - r.abar[0]) * np.ones(5), f"t={t0}")


@pytest.mark.parametrize("name", list(CASES))
def test_posterior_marginalises_to_q_of_x_t_minus_1(name):
    """int q(x_{t-1} | x_t, x_0) q(x_t | x_0) dx_t = q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})."""
    sched, betas = CASES[name]
    Tn = sched.num_timesteps
    t = np.arange(Tn)
    r = Ref(betas, t, 2)
    one, zero = jnp.ones((Tn, 1)), jnp.zeros((Tn, 1))
    # The posterior mean is coef1 x_0 + coef2 x_t; read both coefficients off q_posterior.
    coef1, var, _ = diffusion.q_posterior(sched, one, zero, t)
    coef2, _, _ = diffusion.q_posterior(sched, zero, one, t)
    # Composing with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: mean coef1 + coef2 sqrt(abar_t),
    # variance beta_tilde_t + coef2^2 (1 - abar_t). At t = 0 both sides are exactly (1, 0).
    assert_close(f64(coef1) + f64(coef2) * r.a, np.sqrt(r.abar_prev), msg="mean")
    assert_close(f64(var) + f64(coef2) ** 2 * (1.0 - r.abar), 1.0 - r.abar_prev, msg="variance")

    # The same by sampling: x_t ~ q(x_t | x_0), then x_{t-1} ~ q(x_{t-1} | x_t, x_0).
    x0 = np.linspace(-1.0, 1.0, 4).astype(np.float32)
    rng = np.random.default_rng(14)
    for t0 in (1, Tn // 3, Tn - 1):
        x0b = jnp.broadcast_to(x0, (N_DRAWS, 4))
        tb = jnp.full((N_DRAWS,), t0)
        xt = diffusion.q_sample(sched, x0b, tb, rng.normal(size=x0b.shape).astype(np.float32))
        mean, var, _ = diffusion.q_posterior(sched, x0b, xt, tb)
        x_prev = mean + jnp.sqrt(var) * rng.normal(size=x0b.shape).astype(np.float32)
        r0 = Ref(betas, [t0], 2)
        _assert_moments(f64(x_prev), np.sqrt(r0.abar_prev[0]) * x0, (1.0 - r0.abar_prev[0]) * np.ones(4), f"t={t0}")


def test_conversions_round_trip():
    """x_0, eps -> x_t, v -> back, for every parameterization, at every timestep."""
    sched, _ = CASES["linear"]
    rng = np.random.default_rng(10)
    t = jnp.arange(T)
    x0 = rng.uniform(-1, 1, size=(T, 3)).astype(np.float32)
    eps = rng.normal(size=(T, 3)).astype(np.float32)
    xt = diffusion.q_sample(sched, x0, t, eps)
    outputs = {
        "eps": eps,
        "x0": x0,
        "v": diffusion.predict_v(sched, x0, t, eps),
        "score": diffusion.score_from_eps(sched, t, eps),
    }
    for p, out in outputs.items():
        got_x0, got_eps = diffusion.to_x0_eps(sched, out, xt, t, p)
        # x_0 from eps divides by sqrt(abar_t) (up to 1/0.0064 here) and eps from x_0 by
        # sqrt(1 - abar_t) (1/0.01 at t = 0): float32 rounding of x_t (6e-8) grows by that much.
        np.testing.assert_allclose(got_x0, x0, atol=1e-5 / float(sched.sqrt_alphas_cumprod[-1]), err_msg=p)
        np.testing.assert_allclose(got_eps, eps, atol=1e-5 / float(sched.sqrt_one_minus_alphas_cumprod[0]), err_msg=p)


# ---------------------------------------------------------------------------
# vmap and grad
# ---------------------------------------------------------------------------


def test_vmap_over_draws_examples_and_schedules():
    sched, betas = CASES["cosine"]
    t, x0, xt, _ = _inputs(sched, 11)
    r = Ref(betas, t, x0.ndim)
    noises = np.random.default_rng(15).normal(size=(3,) + x0.shape).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda n: diffusion.q_sample(sched, x0, t, n)))(noises)
    for k, n in enumerate(noises):
        assert_close(batched[k], r.a * f64(x0) + r.s * n, scale=r.a * abs(x0) + r.s * abs(n), msg=f"draw {k}")

    # Per example, with a traced scalar t (so only shapes are checked).
    out = np.concatenate([x0, np.tanh(xt)], axis=-1)
    per_example = jax.jit(
        jax.vmap(lambda o, x, tt: diffusion.p_mean_variance(sched, o[None], x[None], tt, "v", "learned_range"))
    )(out, xt, t)
    x0_hat, _, x0_scale, _ = r.to_x0_eps(f64(x0), f64(xt), "v")
    assert_close(per_example.mean[:, 0], r.coef1 * x0_hat + r.coef2 * xt, scale=r.coef1 * x0_scale + r.coef2 * abs(xt), msg="mean")
    frac = (np.tanh(f64(xt)) + 1.0) / 2.0
    log_var = frac * np.log(r.beta) + (1.0 - frac) * r.log_beta_tilde_clipped
    assert_close(per_example.log_variance[:, 0], log_var, scale=1.0, msg="log_variance")

    # Over a stack of schedules of the same length.
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), CASES["linear"][0], sched)
    means = jax.jit(jax.vmap(lambda s: diffusion.q_posterior(s, x0, xt, t)[0]))(stacked)
    for k, name in enumerate(("linear", "cosine")):
        rk = Ref(CASES[name][1], t, x0.ndim)
        assert_close(means[k], rk.coef1 * f64(x0) + rk.coef2 * xt, scale=rk.coef1 * abs(x0) + rk.coef2 * abs(xt), msg=name)


def test_grad_matches_the_analytic_derivatives():
    sched, betas = CASES["cosine"]
    t, x0, noise, xt = _inputs(sched, 12)
    r = Ref(betas, t, x0.ndim)
    g_x0, g_noise = jax.jit(jax.grad(lambda a, b: diffusion.q_sample(sched, a, t, b).sum(), argnums=(0, 1)))(x0, noise)
    assert_close(g_x0, np.broadcast_to(r.a, x0.shape), msg="d x_t / d x_0")
    assert_close(g_noise, np.broadcast_to(r.s, x0.shape), msg="d x_t / d eps")
    # d mean / d output = coef1 * d x0_hat / d output (eq. 7 at x0_hat).
    d_x0 = {"eps": -r.s / r.a, "x0": 1.0, "v": -r.s, "score": r.s**2 / r.a}
    for p in PARAMS:
        g = jax.jit(jax.grad(lambda o: diffusion.p_mean_variance(sched, o, xt, t, p).mean.sum()))(noise)
        assert_close(g, np.broadcast_to(r.coef1 * d_x0[p], x0.shape), msg=p)
    # Improved DDPM eq. 15: d log Sigma / d out = (log beta_t - log beta_tilde_t) / 2.
    out = np.concatenate([noise, np.tanh(xt)], axis=-1)
    g = jax.jit(jax.grad(lambda o: diffusion.p_mean_variance(sched, o, xt, t, "eps", "learned_range").log_variance.sum()))(out)
    assert float(jnp.max(jnp.abs(g[..., :3]))) == 0.0
    # The logs carry float32 absolute errors (see test_p_mean_variance) that do not shrink as
    # they cancel, where beta_tilde_t ~ beta_t (at the last step).
    scale = (np.abs(np.log(r.beta)) + np.abs(r.log_beta_tilde_clipped) + 2.0) / 2
    want = (np.log(r.beta) - r.log_beta_tilde_clipped) / 2
    assert_close(g[..., 3:], np.broadcast_to(want, x0.shape), scale=scale, msg="learned_range")


def test_fixed_large_on_a_one_step_schedule():
    # space_timesteps(T, 1) respaces to a single step; its "large" variance is beta_0 itself.
    sched = schedules.respace(schedules.linear(100), schedules.space_timesteps(100, 1))
    xt = jnp.ones((2, 3))
    pmv = diffusion.p_mean_variance(sched, xt, xt, jnp.zeros(2, jnp.int32), variance="fixed_large")
    abar = np.prod(1.0 - np.linspace(1e-4, 0.02, 100))
    assert_close(pmv.variance, np.full((2, 3), 1.0 - abar), msg="variance")
    assert np.all(np.isfinite(np.asarray(pmv.mean)))


# ---------------------------------------------------------------------------
# Bad input: ValueError naming the argument, raised before anything is compiled.
# ---------------------------------------------------------------------------

SCHED = schedules.linear(10, 1e-3, 0.2)
X = jnp.zeros((4, 2, 2, 3))
T_OK = jnp.array([0, 3, 5, 9])

# Every public function of (schedule, ..., t, ...), called with a given t.
CALLS = {
    "q_mean_variance": lambda t: diffusion.q_mean_variance(SCHED, X, t),
    "q_sample": lambda t: diffusion.q_sample(SCHED, X, t, X),
    "q_posterior": lambda t: diffusion.q_posterior(SCHED, X, X, t),
    "predict_x0": lambda t: diffusion.predict_x0(SCHED, X, t, X),
    "predict_eps": lambda t: diffusion.predict_eps(SCHED, X, t, X),
    "predict_v": lambda t: diffusion.predict_v(SCHED, X, t, X),
    "predict_x0_from_v": lambda t: diffusion.predict_x0_from_v(SCHED, X, t, X),
    "predict_eps_from_v": lambda t: diffusion.predict_eps_from_v(SCHED, X, t, X),
    "score_from_eps": lambda t: diffusion.score_from_eps(SCHED, t, X),
    "eps_from_score": lambda t: diffusion.eps_from_score(SCHED, t, X),
    "to_x0_eps": lambda t: diffusion.to_x0_eps(SCHED, X, X, t, "v"),
    "p_mean_variance": lambda t: diffusion.p_mean_variance(SCHED, X, X, t),
}


@pytest.mark.parametrize("fn", list(CALLS))
@pytest.mark.parametrize(
    "t,match",
    [
        (jnp.array([0, 3, 5, 10]), r"t: expected timesteps in \[0, 10\) .*got min 0, max 10"),
        (jnp.array([-1, 3, 5, 9]), r"t: expected timesteps in \[0, 10\) .*got min -1, max 9"),
        (10, r"t: expected timesteps in \[0, 10\)"),
        (jnp.array([0.0, 3.0, 5.0, 9.0]), r"t: expected integer timesteps \(0-indexed\), got dtype float32"),
        (2.0, r"t: expected integer timesteps \(0-indexed\), got dtype float64"),
        (jnp.zeros((4, 1), jnp.int32), r"t: expected shape \[\] or \[batch\], got \(4, 1\)"),
        (jnp.zeros((3,), jnp.int32), r"t: expected shape \[4\] to match the batch of x, got \(3,\)"),
    ],
)
def test_bad_timesteps_raise(fn, t, match):
    with pytest.raises(ValueError, match=match):
        CALLS[fn](t)


def test_the_first_and_last_timesteps_are_accepted():
    for fn in CALLS.values():
        fn(jnp.array([0, 0, 9, 9]))


BAD_SHAPES = {
    "q_sample": (lambda: diffusion.q_sample(SCHED, X, T_OK, X[..., :2]), r"expected equal shapes, got x0: \(4, 2, 2, 3\), noise: \(4, 2, 2, 2\)"),
    "q_posterior": (lambda: diffusion.q_posterior(SCHED, X[:, :1], X, T_OK), r"expected equal shapes, got x0: \(4, 1, 2, 3\), xt: \(4, 2, 2, 3\)"),
    "predict_x0": (lambda: diffusion.predict_x0(SCHED, X, T_OK, X[..., :1]), r"xt: \(4, 2, 2, 3\), eps: \(4, 2, 2, 1\)"),
    "predict_eps": (lambda: diffusion.predict_eps(SCHED, X, T_OK, X[..., :1]), r"xt: \(4, 2, 2, 3\), x0: \(4, 2, 2, 1\)"),
    "predict_v": (lambda: diffusion.predict_v(SCHED, X, T_OK, X[..., :1]), r"x0: \(4, 2, 2, 3\), eps: \(4, 2, 2, 1\)"),
    "predict_x0_from_v": (lambda: diffusion.predict_x0_from_v(SCHED, X, T_OK, X[..., :1]), r"xt: \(4, 2, 2, 3\), v: \(4, 2, 2, 1\)"),
    "predict_eps_from_v": (lambda: diffusion.predict_eps_from_v(SCHED, X, T_OK, X[..., :1]), r"xt: \(4, 2, 2, 3\), v: \(4, 2, 2, 1\)"),
    "p_mean_variance_output": (
        lambda: diffusion.p_mean_variance(SCHED, X[..., :2], X, T_OK),
        r"model_output: expected prediction shape \(4, 2, 2, 3\) \(like x_t\), got \(4, 2, 2, 2\)",
    ),
    "learned_range_odd_channels": (
        lambda: diffusion.p_mean_variance(SCHED, X, X, T_OK, variance="learned_range"),
        r"variance='learned_range': expected a model output with 2C channels \(prediction, variance\), got 3 channels",
    ),
    "learned_odd_channels": (
        lambda: diffusion.p_mean_variance(SCHED, X, X, T_OK, variance="learned"),
        r"variance='learned': expected a model output with 2C channels",
    ),
    "learned_wrong_split": (
        lambda: diffusion.p_mean_variance(SCHED, jnp.zeros((4, 2, 2, 8)), X, T_OK, variance="learned"),
        r"model_output: expected prediction shape \(4, 2, 2, 3\)",
    ),
    "unknown_parameterization": (
        lambda: diffusion.p_mean_variance(SCHED, X, X, T_OK, parameterization="epsilon"),
        r"parameterization: expected one of \('eps', 'x0', 'v', 'score'\), got 'epsilon'",
    ),
    "unknown_parameterization_to_x0_eps": (
        lambda: diffusion.to_x0_eps(SCHED, X, X, T_OK, "sample"),
        r"parameterization: expected one of .*got 'sample'",
    ),
    "unknown_variance": (
        lambda: diffusion.p_mean_variance(SCHED, X, X, T_OK, variance="fixed"),
        r"variance: expected one of \('fixed_small', 'fixed_large', 'learned_range', 'learned'\), got 'fixed'",
    ),
    "threshold_unknown": (lambda: diffusion.threshold_x0(X, "soft"), r"clip: expected None, True, a positive float or 'dynamic', got 'soft'"),
    "threshold_zero": (lambda: diffusion.threshold_x0(X, 0.0), r"clip: expected a positive bound, got 0\.0"),
    "threshold_negative": (lambda: diffusion.threshold_x0(X, -1.0), r"clip: expected a positive bound, got -1\.0"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shapes_and_names_raise(case):
    fn, match = BAD_SHAPES[case]
    with pytest.raises(ValueError, match=match):
        fn()


JIT_CASES = {
    "noise_shape": (lambda x0, t, n: diffusion.q_sample(SCHED, x0, t, n), (X, T_OK, X[..., :2]), r"x0: \(4, 2, 2, 3\), noise: \(4, 2, 2, 2\)"),
    "float_t": (lambda x0, t, n: diffusion.q_sample(SCHED, x0, t, n), (X, T_OK.astype(jnp.float32), X), r"t: expected integer timesteps"),
    "t_batch": (lambda x0, t, n: diffusion.q_sample(SCHED, x0, t, n), (X, T_OK[:3], X), r"t: expected shape \[4\] to match the batch"),
    "eps_shape": (lambda x, t, e: diffusion.predict_x0(SCHED, x, t, e), (X, T_OK, X[..., :1]), r"xt: \(4, 2, 2, 3\), eps: \(4, 2, 2, 1\)"),
    "odd_channels": (
        lambda o, x, t: diffusion.p_mean_variance(SCHED, o, x, t, variance="learned_range"),
        (X, X, T_OK),
        r"variance='learned_range': expected a model output with 2C channels",
    ),
    "parameterization": (
        lambda o, x, t: diffusion.p_mean_variance(SCHED, o, x, t, parameterization="epsilon"),
        (X, X, T_OK),
        r"parameterization: expected one of .*got 'epsilon'",
    ),
}


@pytest.mark.parametrize("case", list(JIT_CASES))
def test_bad_input_raises_while_tracing_under_jit(case):
    # Under jit the checks see abstract shapes, dtypes and static names, so lowering (which
    # comes before compilation) already fails. Timestep values can only be checked eagerly.
    fn, args, match = JIT_CASES[case]
    with pytest.raises(ValueError, match=match):
        jax.jit(fn).lower(*args)
