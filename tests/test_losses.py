"""jdiff.losses against float64 NumPy transcriptions of the papers' equations.

References: Ho et al. 2020 (DDPM) eqs. 5, 13, 14; Nichol & Dhariwal 2021 (improved DDPM)
eq. 15 and sec. 3.1 (L_hybrid = L_simple + 0.001 L_vlb, stop-gradient on the mean);
Kingma et al. 2021 (VDM, SNR); Salimans & Ho 2022 (v-prediction, truncated SNR weighting);
Hang et al. 2023 (min-SNR-gamma); Choi et al. 2022 (P2 weighting).

As in test_diffusion.py, references start from float64 betas written here, and where float32
must cancel terms the tolerance is relative to the terms' magnitudes (``scale``).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from absl.testing import parameterized

from jdiff import losses, schedules

RTOL = 1e-5
T = 1000
LN2 = math.log(2.0)
WEIGHTINGS = ("uniform", "snr", "truncated_snr", "min_snr", "p2")
TARGETS = ("eps", "x0", "v")
EPS32 = float(np.finfo(np.float32).eps)


def _cosine_betas(T, s=0.008):
    """Improved DDPM eq. 17 with the sec. 3.2 clip at 0.999."""
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)


def _cases():
    """name -> (Schedule under test, float64 betas, the trained-model timestep of each index); T = 1000."""
    rng = np.random.default_rng(0)
    kept = np.sort(np.concatenate([[0, 4 * T - 1], rng.choice(np.arange(1, 4 * T - 1), T - 2, replace=False)]))
    abar_kept = np.cumprod(1.0 - _cosine_betas(4 * T))[kept]
    rnd = rng.uniform(1e-5, 0.03, size=T)
    return {
        "linear": (schedules.linear(T), np.linspace(1e-4, 0.02, T), np.arange(T)),
        "cosine": (schedules.cosine(T), _cosine_betas(T), np.arange(T)),
        "random_betas": (schedules.from_betas(rnd), rnd, np.arange(T)),
        "respaced": (
            schedules.respace(schedules.cosine(4 * T), kept),
            1.0 - abar_kept / np.concatenate([[1.0], abar_kept[:-1]]),
            kept,
        ),
    }


CASES = _cases()
NAMED = [(name, name) for name in CASES]


class Ref:
    """float64 coefficients gathered at t, shaped [B, 1, ..., 1]."""

    def __init__(self, betas, t, ndim=1):
        betas = np.asarray(betas, np.float64)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * betas
        g = lambda a: a[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))  # noqa: E731
        self.beta, self.abar, self.abar_prev = g(betas), g(abar), g(abar_prev)
        self.a, self.s = np.sqrt(self.abar), np.sqrt(1.0 - self.abar)
        self.snr = self.abar / (1.0 - self.abar)
        self.log_beta_tilde_clipped = g(np.log(np.concatenate([beta_tilde[1:2], beta_tilde[1:]])))
        self.coef1 = np.sqrt(self.abar_prev) * self.beta / (1.0 - self.abar)  # DDPM eq. 7
        self.coef2 = np.sqrt(1.0 - self.beta) * (1.0 - self.abar_prev) / (1.0 - self.abar)


def assert_close(actual, expected, scale=0.0, rtol=RTOL, msg=""):
    """Elementwise |actual - expected| <= rtol * (|expected| + scale)."""
    actual = np.asarray(actual, np.float64)
    expected = np.broadcast_to(np.asarray(expected, np.float64), actual.shape)
    bound = rtol * (np.abs(expected) + scale)
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{msg}: |{actual[worst]} - {expected[worst]}| = {err[worst]:.3g} > {bound[worst]:.3g} at {worst}"


f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731


def _timesteps(seed, n=8):
    rng = np.random.default_rng(seed)
    return np.concatenate([[0, T - 1], rng.integers(0, T, size=n - 2)]).astype(np.int32)


def _data(seed, shape):
    """Data on the 256-level grid of [-1, 1], with both edge levels present."""
    x = np.random.default_rng(seed).integers(0, 256, size=shape) * 2.0 / 255.0 - 1.0
    x.reshape(-1)[:2] = [-1.0, 1.0]
    return x.astype(np.float32)


# ---------------------------------------------------------------------------
# Time weightings
# ---------------------------------------------------------------------------


def ref_eps_weight(weighting, snr, gamma=5.0, k=1.0, p2_gamma=1.0):
    """The weight on ||eps - eps_hat||^2 as each paper states it."""
    if weighting in ("uniform", "snr"):  # L_simple (DDPM eq. 14); SNR-weighted x_0 loss == eps loss (VDM)
        return np.ones_like(snr)
    if weighting == "truncated_snr":  # Salimans & Ho: max(||x err||^2, ||eps err||^2) = max(SNR, 1) ||x err||^2
        return np.maximum(snr, 1.0) / snr
    if weighting == "min_snr":  # Hang et al.: min(SNR, gamma) / SNR for eps prediction
        return np.minimum(snr, gamma) / snr
    return 1.0 / (k + snr) ** p2_gamma  # Choi et al.: lambda'_t = lambda_t / (k + SNR(t))^gamma, lambda_t = 1


def ref_x0_weight(weighting, parameterization, snr, **kw):
    """lambda_x0(t), the weight the loss puts on ||x_0 - x0_hat||^2 (||x_0 err||^2 = ||eps err||^2 / SNR)."""
    if weighting == "uniform":  # weight 1 in the target's own space
        return {"eps": snr, "x0": np.ones_like(snr), "v": 1.0 + snr}[parameterization]
    return ref_eps_weight(weighting, snr, **kw) * snr


def ref_target_weight(weighting, parameterization, snr):
    """The weight in the target's own space: lambda_x0 divided by what uniform weighting puts on ||x_0 err||^2."""
    return ref_x0_weight(weighting, parameterization, snr) / ref_x0_weight("uniform", parameterization, snr)


WEIGHT_KWARGS = {
    "default": {},
    "other": dict(min_snr_gamma=1.0, p2_k=2.0, p2_gamma=0.5),
}


class WeightingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_snr(self, name):
        sched, betas, _ = CASES[name]
        t = np.arange(T)  # every step, t = 0 and t = T-1 included
        got = self.variant(losses.snr)(sched, t)
        chex.assert_shape(got, (T,))
        assert_close(got, Ref(betas, t).snr, msg="SNR = abar / (1 - abar)")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((k, k) for k in WEIGHT_KWARGS))
    def test_loss_weight(self, kwargs):
        kw = WEIGHT_KWARGS[kwargs]
        ref_kw = dict(gamma=kw.get("min_snr_gamma", 5.0), k=kw.get("p2_k", 1.0), p2_gamma=kw.get("p2_gamma", 1.0))
        combos = [(weighting, p) for weighting in WEIGHTINGS for p in TARGETS]
        all_weights = self.variant(lambda s, t: {c: losses.loss_weight(s, t, c[1], c[0], **kw) for c in combos})
        t = _timesteps(1, n=64)
        rng = np.random.default_rng(2)
        x0, eps, x0_hat = (rng.normal(size=(64, 5)) for _ in range(3))
        for name, (sched, betas, _) in CASES.items():
            snr = Ref(betas, t).snr
            r = Ref(betas, t, 2)
            # One prediction seen in every space, for the same x_t.
            xt = r.a * x0 + r.s * eps
            eps_hat = (xt - r.a * x0_hat) / r.s
            err = {
                "x0": np.sum((x0 - x0_hat) ** 2, axis=1),
                "eps": np.sum((eps - eps_hat) ** 2, axis=1),
                "v": np.sum(((r.a * eps - r.s * x0) - (r.a * eps_hat - r.s * x0_hat)) ** 2, axis=1),
            }
            weights = all_weights(sched, t)
            for (weighting, p), w in weights.items():
                chex.assert_shape(w, (64,))
                msg = f"{name}/{weighting}/{p}"
                if p == "eps":
                    assert_close(w, ref_eps_weight(weighting, snr, **ref_kw), msg=msg)
                if weighting == "uniform":
                    assert_close(w, np.ones(64), msg=msg)
                # The defining identity: w_target ||target err||^2 == lambda_x0(t) ||x_0 err||^2.
                assert_close(f64(w) * err[p], ref_x0_weight(weighting, p, snr, **ref_kw) * err["x0"], msg=msg + " identity")


# ---------------------------------------------------------------------------
# Gaussian KL, the discretized decoder, the VLB terms
# ---------------------------------------------------------------------------


def ref_normal_kl(m1, lv1, m2, lv2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2, and the
    sum of its terms' magnitudes (the scale of float32's rounding, with that of m1 - m2)."""
    v1, v2 = np.exp(lv1), np.exp(lv2)
    kl = 0.5 * (lv2 - lv1) + (v1 + (m1 - m2) ** 2) / (2.0 * v2) - 0.5
    scale = 0.5 * np.abs(lv2 - lv1) + 1.0 + 0.5 * v1 / v2 + np.abs(m1 - m2) * (np.abs(m1) + np.abs(m2)) / v2
    return kl, scale


def ref_cdf(x):
    """The reference code's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def ref_discretized_log_likelihood(x, mean, log_scale):
    """DDPM eq. 13: the mass of N(mean, sigma^2) on x's bin [x - 1/255, x + 1/255], with the edge bins
    reaching to -inf and +inf, under the reference code's CDF; floored at 1e-12 as it is."""
    sigma = np.exp(log_scale)
    upper = np.where(x > 0.999, 1.0, ref_cdf((x + 1.0 / 255.0 - mean) / sigma))
    lower = np.where(x < -0.999, 0.0, ref_cdf((x - 1.0 / 255.0 - mean) / sigma))
    p = upper - lower
    return np.log(np.maximum(p, 1e-12)), p


class LikelihoodTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_normal_kl(self):
        rng = np.random.default_rng(3)
        m1, m2 = rng.normal(size=(2, 4, 32))
        lv1, lv2 = rng.uniform(-8.0, 1.0, size=(2, 4, 32))
        got = self.variant(losses.normal_kl)(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
        chex.assert_shape(got, (4, 32))
        m1, lv1, m2, lv2 = (f64(np.float32(a)) for a in (m1, lv1, m2, lv2))
        kl, scale = ref_normal_kl(m1, lv1, m2, lv2)
        assert_close(got, kl, scale=scale, msg="KL")
        # Equal Gaussians: exactly zero. Equal variances: exactly the mean term.
        assert float(jnp.max(jnp.abs(self.variant(losses.normal_kl)(m1, lv1, m1, lv1)))) == 0.0
        got = self.variant(losses.normal_kl)(m1, lv1, m2, lv1)
        assert_close(got, (m1 - m2) ** 2 / (2 * np.exp(lv1)), scale=np.abs(m1 - m2) * (np.abs(m1) + np.abs(m2)) / np.exp(lv1))
        # Nearly equal variances (the prior term's case), d = lv1 - lv2 ~ 1e-4: the error must be
        # relative to d (the size of the terms expm1(d) and d), not to 1 as in the textbook -1 + exp(d),
        # whose float32 rounding (6e-8) would exceed the whole prior term.
        d = rng.uniform(-1e-4, 1e-4, size=(4, 32)).astype(np.float32)
        got = self.variant(losses.normal_kl)(0.0, d, 0.0, jnp.zeros_like(d))
        assert_close(got, 0.5 * (np.expm1(f64(d)) - d), scale=np.abs(f64(d)), msg="small d")

    @chex.variants(with_jit=True, without_jit=True)
    def test_approx_standard_normal_cdf(self):
        x = np.linspace(-6.0, 6.0, 481).astype(np.float32)
        got = self.variant(losses.approx_standard_normal_cdf)(x)
        # 0.5 (1 + tanh z) cancels O(1) terms in the lower tail: an absolute float32 error.
        assert_close(got, ref_cdf(f64(x)), scale=1.0, msg="tanh CDF")
        # It is a CDF: within the approximation's known error of the exact Phi (1.8e-4 at worst,
        # measured here on a dense float64 grid) plus float32 rounding.
        grid = np.linspace(-8.0, 8.0, 160_001)
        approx_err = np.max(np.abs(ref_cdf(grid) - scipy.stats.norm.cdf(grid)))
        assert approx_err < 2e-4
        np.testing.assert_array_less(np.abs(f64(got) - scipy.stats.norm.cdf(x)), approx_err + 1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_discretized_gaussian_log_likelihood(self):
        rng = np.random.default_rng(4)
        x = _data(5, (4, 64))
        # A decoder near its data, as at t = 0 (sigma from 0.004 to 0.05 against bins 0.0078 wide),
        # so bin masses are ~1e-2 or more and float32 can hold them to 1e-5.
        log_scale = rng.uniform(-5.5, -3.0, size=x.shape).astype(np.float32)
        mean = (x + np.exp(log_scale) * rng.normal(size=x.shape)).astype(np.float32)
        got = self.variant(losses.discretized_gaussian_log_likelihood)(x, mean, log_scale)
        chex.assert_shape(got, x.shape)
        want, p = ref_discretized_log_likelihood(f64(x), f64(mean), f64(log_scale))
        # Each CDF carries an absolute float32 error (see above); log p turns it into 2 eps / p.
        assert_close(got, want, scale=2.0 / p, msg="log p")
        assert np.any(x == -1.0) and np.any(x == 1.0), "the edge bins (to -inf and +inf) must be tested"
        # A bin 100 sigma from the mean gets the reference code's floor, log 1e-12.
        far = self.variant(losses.discretized_gaussian_log_likelihood)(jnp.zeros(1), jnp.ones(1), jnp.full(1, -4.6))
        np.testing.assert_allclose(float(far[0]), math.log(1e-12), rtol=RTOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_discretized_likelihood_sums_to_one_over_the_256_bins(self):
        levels = (np.arange(256) * 2.0 / 255.0 - 1.0).astype(np.float32)
        fn = self.variant(losses.discretized_gaussian_log_likelihood)
        for mean in (-1.3, -0.9, 0.0, 0.503, 1.0):
            for sigma in (0.004, 0.02):
                logp = fn(levels, jnp.full(256, mean), jnp.full(256, math.log(sigma)))
                # Bins telescope: the edge bins take the tails, so the masses sum to 1.
                np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, rtol=RTOL, err_msg=f"mean {mean}, sigma {sigma}")
                # And each bin's mass is the exact Gaussian's up to the CDF approximation.
                lo = np.where(levels < -0.999, -np.inf, (f64(levels) - 1 / 255 - mean) / sigma)
                hi = np.where(levels > 0.999, np.inf, (f64(levels) + 1 / 255 - mean) / sigma)
                exact = scipy.stats.norm.cdf(hi) - scipy.stats.norm.cdf(lo)
                np.testing.assert_array_less(np.abs(np.exp(f64(logp)) - exact), 2 * 1.8e-4 + 1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_vlb_term(self, name):
        sched, betas, _ = CASES[name]
        t = _timesteps(6)
        rng = np.random.default_rng(7)
        x0 = _data(8, (8, 4, 4, 3))
        xt = rng.normal(size=x0.shape).astype(np.float32)
        r = Ref(betas, t, 4)
        true_mean = r.coef1 * x0 + r.coef2 * xt
        log_var = (r.log_beta_tilde_clipped + rng.uniform(-1.0, 1.0, size=x0.shape)).astype(np.float32)
        mean = (true_mean + np.exp(0.5 * f64(log_var)) * rng.normal(size=x0.shape)).astype(np.float32)
        got = self.variant(losses.vlb_term)(sched, x0, xt, t, mean, log_var)
        chex.assert_shape(got, (8,))
        # t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits/dim (DDPM eq. 5).
        kl, kl_scale = ref_normal_kl(true_mean, r.log_beta_tilde_clipped, f64(mean), f64(log_var))
        true_mean_scale = r.coef1 * np.abs(x0) + r.coef2 * np.abs(xt)
        kl_scale = kl_scale + np.abs(true_mean - mean) * true_mean_scale / np.exp(f64(log_var))
        # t = 0: the discretized decoder -log p(x_0 | x_1) (eq. 13), sigma = exp(log_var / 2).
        dims = (1, 2, 3)
        want, scale = kl.mean(dims) / LN2, kl_scale.mean(dims) / LN2
        dec = t == 0
        logp, p = ref_discretized_log_likelihood(f64(x0[dec]), f64(mean[dec]), 0.5 * f64(log_var[dec]))
        assert np.all(p > 0.0), "the decoder test needs its means near the data"
        want[dec] = -logp.mean(dims) / LN2
        scale[dec] = (2.0 / p).mean(dims) / LN2  # each CDF's absolute float32 error, in log p
        assert t[0] == 0 and t[1] == T - 1
        assert_close(got, want, scale=scale, msg="L_t")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*NAMED)
    def test_prior_bpd(self, name):
        sched, betas, _ = CASES[name]
        x0 = _data(9, (4, 8, 8, 3))
        got = self.variant(losses.prior_bpd)(sched, x0)
        chex.assert_shape(got, (4,))
        # L_T = KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1)) = (-abar_T - log(1 - abar_T) + abar_T x_0^2) / 2,
        # in bits/dim. It is ~1e-5 bits or far less: the test needs the cancellation-free KL.
        abar_T = np.prod(1.0 - betas)
        kl = 0.5 * (-abar_T - np.log1p(-abar_T) + abar_T * f64(x0) ** 2)
        assert_close(got, kl.mean((1, 2, 3)) / LN2, msg="L_T")


# ---------------------------------------------------------------------------
# The training loss
# ---------------------------------------------------------------------------


def _model(x, t):
    """A fixed "network" that uses t, so calling it with the wrong timesteps changes the loss."""
    return 0.3 * x + 1e-4 * t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


class DiffusionLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(parameterization=TARGETS, weighting=WEIGHTINGS)
    def test_mse_for_every_target_and_weighting(self, parameterization, weighting):
        fn = self.variant(
            functools.partial(losses.diffusion_loss, model_fn=_model, parameterization=parameterization, weighting=weighting)
        )
        for seed, (name, (sched, betas, model_t)) in enumerate(CASES.items()):
            t = _timesteps(10 + seed)
            x0 = _data(20 + seed, (8, 4, 4, 3))
            noise = np.random.default_rng(30 + seed).normal(size=x0.shape).astype(np.float32)
            terms = fn(sched, x0=x0, t=t, noise=noise)
            chex.assert_shape(list(terms), (8,))
            r = Ref(betas, t, 4)
            xt = r.a * x0 + r.s * noise
            pred = 0.3 * xt + 1e-4 * model_t[t].reshape(-1, 1, 1, 1)
            target = {"eps": noise, "x0": x0, "v": r.a * noise - r.s * x0}[parameterization]
            w = ref_target_weight(weighting, parameterization, Ref(betas, t).snr)
            want = w * np.mean((target - pred) ** 2, axis=(1, 2, 3))
            msg = f"{name}/{parameterization}/{weighting}"
            assert_close(terms.mse, want, msg=msg)
            assert_close(terms.loss, want, msg=msg)
            assert float(jnp.max(jnp.abs(terms.vlb))) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(name=list(CASES), variance=("learned_range", "learned"))
    def test_hybrid_loss(self, name, variance):
        sched, betas, model_t = CASES[name]
        t = _timesteps(11)
        x0 = _data(21, (8, 4, 4, 3))
        rng = np.random.default_rng(31)
        noise = rng.normal(size=x0.shape).astype(np.float32)
        # A network output: an eps prediction (the noise, perturbed) and the variance channels.
        eps_hat = (noise + 0.3 * rng.normal(size=x0.shape)).astype(np.float32)
        r = Ref(betas, t, 4)
        if variance == "learned_range":
            v = rng.uniform(-1.0, 1.0, size=x0.shape).astype(np.float32)
        else:  # a log variance near the posterior's
            v = (r.log_beta_tilde_clipped + rng.uniform(-0.5, 0.5, size=x0.shape)).astype(np.float32)
        out = np.concatenate([eps_hat, v], axis=-1)
        model_fn = lambda x, tt: jnp.asarray(out)  # noqa: E731
        terms = self.variant(functools.partial(losses.diffusion_loss, model_fn=model_fn, variance=variance))(sched, x0=x0, t=t, noise=noise)
        xt = r.a * x0 + r.s * noise
        x0_hat = (xt - r.s * eps_hat) / r.a
        mean = r.coef1 * x0_hat + r.coef2 * xt
        mean_scale = r.coef1 * (np.abs(xt) + r.s * np.abs(eps_hat)) / r.a + r.coef2 * np.abs(xt)
        if variance == "learned_range":  # improved DDPM eq. 15
            frac = (f64(v) + 1.0) / 2.0
            log_var = frac * np.log(r.beta) + (1.0 - frac) * r.log_beta_tilde_clipped
        else:
            log_var = f64(v)
        true_mean = r.coef1 * x0 + r.coef2 * xt
        kl, kl_scale = ref_normal_kl(true_mean, r.log_beta_tilde_clipped, mean, log_var)
        # The means' own rounding (relative to their terms) enters through (m1 - m2)^2 / v2; the log
        # variance's absolute error ~ rtol (a log, see test_diffusion) through the log and the ratio.
        kl_scale = kl_scale + np.abs(true_mean - mean) * (mean_scale + r.coef1 * np.abs(x0) + r.coef2 * np.abs(xt)) / np.exp(log_var)
        kl_scale = kl_scale + 1.0 + np.exp(r.log_beta_tilde_clipped - log_var) + (true_mean - mean) ** 2 / np.exp(log_var)
        dims = (1, 2, 3)
        vlb, vlb_scale = kl.mean(dims) / LN2, kl_scale.mean(dims) / LN2
        dec = t == 0
        logp, p = ref_discretized_log_likelihood(f64(x0[dec]), mean[dec], 0.5 * log_var[dec])
        assert np.all(p > 0.0), "the decoder test needs its means near the data"
        vlb[dec] = -logp.mean(dims) / LN2
        # The CDFs' absolute errors (2 eps / p), and the mean's: |d log p / d mean| <= 2 phi_max / (sigma p).
        sigma = np.exp(0.5 * log_var[dec])
        vlb_scale[dec] = (2.0 / p + 0.8 * mean_scale[dec] / (sigma * p)).mean(dims) / LN2
        mse = np.mean((noise - eps_hat) ** 2, axis=dims)
        assert_close(terms.vlb, vlb, scale=vlb_scale, msg="vlb")
        assert_close(terms.mse, mse, msg="mse")
        # L_hybrid = L_simple + 0.001 L_vlb, L_vlb = T L_t estimating the whole bound.
        assert_close(terms.loss, mse + 0.001 * T * vlb, scale=0.001 * T * vlb_scale, msg="loss")

    def test_hybrid_loss_stops_the_vlb_gradient_at_the_mean(self):
        sched, betas, _ = CASES["cosine"]
        t = _timesteps(12)
        x0 = _data(22, (8, 4, 4, 3))
        rng = np.random.default_rng(32)
        noise = rng.normal(size=x0.shape).astype(np.float32)
        eps_hat, v = noise + 0.3 * rng.normal(size=x0.shape), rng.uniform(-1, 1, size=x0.shape)
        out = np.concatenate([eps_hat, v], axis=-1).astype(np.float32)

        def terms_of(o):
            return losses.diffusion_loss(sched, lambda x, tt: o, x0, t, noise, variance="learned_range")

        g_vlb = jax.jit(jax.grad(lambda o: terms_of(o).vlb.sum()))(out)
        g_mse = jax.jit(jax.grad(lambda o: terms_of(o).mse.sum()))(out)
        g_loss = jax.jit(jax.grad(lambda o: terms_of(o).loss.sum()))(out)
        mean_ch, var_ch = slice(0, 3), slice(3, 6)
        # L_vlb trains only the variance: no gradient reaches the mean channels from it.
        assert float(jnp.max(jnp.abs(g_vlb[..., mean_ch]))) == 0.0
        assert float(jnp.min(jnp.abs(g_vlb[..., var_ch]))) > 0.0
        assert float(jnp.max(jnp.abs(g_mse[..., var_ch]))) == 0.0
        # So the mean channels see exactly L_simple's gradient, 2 (eps_hat - eps) / D.
        D = 4 * 4 * 3
        eps_hat = f64(out[..., mean_ch])
        assert_close(g_loss[..., mean_ch], 2.0 * (eps_hat - noise) / D, scale=2.0 * (np.abs(eps_hat) + np.abs(noise)) / D)
        # And the variance channels 0.001 T d L_vlb / d v, which for t > 0 is, per element,
        # dKL/dlogvar2 * dlogvar2/dv / (D ln 2), dKL/dlogvar2 = (1 - exp(lv1 - lv2) - (m1 - m2)^2 exp(-lv2)) / 2,
        # dlogvar2/dv = (log beta_t - log beta_tilde_t) / 2 (improved DDPM eq. 15).
        r = Ref(betas, t, 4)
        xt = r.a * x0 + r.s * noise
        x0_hat = (xt - r.s * eps_hat) / r.a
        dm = r.coef1 * (x0 - x0_hat)
        frac = (f64(out[..., var_ch]) + 1.0) / 2.0
        lv2 = frac * np.log(r.beta) + (1.0 - frac) * r.log_beta_tilde_clipped
        dkl = 0.5 * (1.0 - np.exp(r.log_beta_tilde_clipped - lv2) - dm**2 * np.exp(-lv2))
        dlv = (np.log(r.beta) - r.log_beta_tilde_clipped) / 2.0
        want = 0.001 * T * dkl * dlv / (D * LN2)
        # Terms' scale: the exp ratio and the mean term of dkl, and the logs' absolute errors in dlv.
        dkl_scale = 0.5 * (1.0 + (np.exp(r.log_beta_tilde_clipped - lv2) + dm**2 * np.exp(-lv2)) * (2.0 + np.abs(lv2)))
        dkl_scale = dkl_scale + np.abs(dm) * (np.abs(xt) + r.s * np.abs(eps_hat)) / r.a * np.exp(-lv2)
        dlv_scale = (np.abs(np.log(r.beta)) + np.abs(r.log_beta_tilde_clipped) + 2.0) / 2.0
        scale = 0.001 * T * (dkl_scale * np.abs(dlv) + np.abs(dkl) * dlv_scale) / (D * LN2)
        pos = t > 0
        assert_close(f64(g_loss[..., var_ch])[pos], want[pos], scale=scale[pos], msg="variance channels")

    def test_vmap_and_grad_through_a_model(self):
        sched, betas, _ = CASES["linear"]
        t = _timesteps(13)
        x0 = _data(23, (8, 4, 4, 3))
        noises = np.random.default_rng(33).normal(size=(3,) + x0.shape).astype(np.float32)
        w = jnp.float32(0.3)

        def loss(w, noise):
            return losses.diffusion_loss(sched, lambda x, tt: w * x, x0, t, noise, parameterization="v", weighting="min_snr").loss.mean()

        per_draw = jax.jit(jax.vmap(loss, in_axes=(None, 0)))(w, noises)
        grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, noises)
        r = Ref(betas, t, 4)
        weight = np.minimum(r.snr, 5.0) / (r.snr + 1.0)  # min-SNR for v (Hang et al.)
        for k, n in enumerate(noises):
            xt = r.a * x0 + r.s * n
            v = r.a * n - r.s * x0
            per_example = weight * (v - 0.3 * xt) ** 2
            assert_close(per_draw[k], per_example.mean(), msg=f"loss, draw {k}")
            # d/dw of mean(weight (v - w x_t)^2) = mean(-2 weight x_t (v - w x_t)).
            dw = np.mean(-2.0 * weight * xt * (v - 0.3 * xt))
            dw_scale = np.mean(2.0 * weight * np.abs(xt) * (np.abs(v) + 0.3 * np.abs(xt)))
            assert_close(grads[k], dw, scale=dw_scale, msg=f"grad, draw {k}")


# ---------------------------------------------------------------------------
# Bits/dim
# ---------------------------------------------------------------------------


# nll_bpd is a lax.scan that draws noise inside its body, which XLA on CPU takes ~3 s to
# compile; so the tests share one compiled function whose "network" is data: an eps
# prediction affine in (x_t, x_0) with per-timestep coefficients,
# eps_hat = c_xt[t] x_t + c_x0[t] x_0 + offset[t].
NLL_SCHED, NLL_BETAS, _ = CASES["linear"]
NLL_X0 = _data(40, (2, 4, 4, 3))
NLL_KEY = jax.random.PRNGKey(3)
NLL_REF = Ref(NLL_BETAS, np.arange(T), 1)


@jax.jit
def _nll_bpd(c_xt, c_x0, offset):
    def model_fn(xt, t):
        g = lambda c: c[t].reshape((-1,) + (1,) * (xt.ndim - 1))  # noqa: E731
        return g(c_xt) * xt + g(c_x0) * NLL_X0 + g(offset)

    return losses.nll_bpd(NLL_SCHED, model_fn, NLL_X0, NLL_KEY, "eps", "fixed_small", clip=None)


def _nll_bpd_predicting(x0_scale, x0_offset):
    """nll_bpd of the model whose x_0 prediction is x0_scale[t] x_0 + x0_offset[t], whatever x_t is:
    eps_hat = (x_t - a x0_hat) / s."""
    r = NLL_REF
    return _nll_bpd(1.0 / r.s, -r.a * x0_scale / r.s, -r.a * x0_offset / r.s)


def _prior_bpd_ref(x0):
    abar_T = np.prod(1.0 - NLL_BETAS)
    return (0.5 * (-abar_T - np.log1p(-abar_T) + abar_T * f64(x0) ** 2)).mean((1, 2, 3)) / LN2


def test_nll_bpd_of_the_true_eps_leaves_the_prior_and_the_decoder():
    # The exact eps = (x_t - a x_0) / s: the model's mean and variance are the true posterior's.
    bpd = _nll_bpd_predicting(np.ones(T), np.zeros(T))
    chex.assert_shape(bpd.terms, (T, 2))
    chex.assert_shape([bpd.total, bpd.prior], (2,))
    assert_close(bpd.prior, _prior_bpd_ref(NLL_X0), msg="prior")
    # At t = 0 the posterior mean is x_0 itself (coef1 = 1, coef2 = 0), log variance log beta_tilde_1.
    logp, _ = ref_discretized_log_likelihood(f64(NLL_X0), f64(NLL_X0), 0.5 * NLL_REF.log_beta_tilde_clipped[0])
    assert_close(bpd.terms[0], -logp.mean((1, 2, 3)) / LN2, msg="decoder")
    # The KL terms are zero up to float32: x0_hat = (x_t - s eps_hat) / a is off by at most
    # ~8 eps32 (|x_t| + s |eps_hat| + a |x_0|) / a (|x_t| <= 6 here, s |eps_hat| <= 6 + a), the
    # means by coef1 times that plus the rounding of coef2 x_t, and KL = dm^2 / (2 beta_tilde).
    rt = Ref(NLL_BETAS, np.arange(1, T), 2)
    dm = rt.coef1 * 8 * EPS32 * (12.0 + 2.0 * rt.a) / rt.a + 4 * EPS32 * (rt.coef1 + 6.0 * rt.coef2)
    bound = dm**2 / (2.0 * np.exp(rt.log_beta_tilde_clipped)) / LN2
    assert np.all(np.abs(f64(bpd.terms[1:])) <= bound), "KL terms of the true posterior are not zero"
    assert_close(bpd.total, f64(bpd.prior) + f64(bpd.terms).sum(0), msg="total = prior + sum of terms")


def test_nll_bpd_matches_the_whole_bound_for_an_inexact_model():
    # x0_hat = 0.2 - 0.5 x_0 for t > 0 and x_0 + 0.003 at t = 0 (near enough for the decoder's
    # bins to hold mass). Every term is then closed-form, whatever x_t was drawn.
    x0_scale = np.concatenate([[1.0], np.full(T - 1, -0.5)])
    x0_offset = np.concatenate([[0.003], np.full(T - 1, 0.2)])
    bpd = _nll_bpd_predicting(x0_scale, x0_offset)
    r = Ref(NLL_BETAS, np.arange(T), 5)
    x0 = f64(NLL_X0)[None]
    x0_hat = x0_scale.reshape(T, 1, 1, 1, 1) * x0 + x0_offset.reshape(T, 1, 1, 1, 1)
    log_var = r.log_beta_tilde_clipped
    dm = r.coef1 * (x0 - x0_hat)
    kl, _ = ref_normal_kl(dm, log_var, 0.0, log_var)
    want = kl.mean((2, 3, 4)) / LN2
    logp, p = ref_discretized_log_likelihood(x0[0], x0_hat[0], 0.5 * log_var[0])
    want[0] = -logp.mean((1, 2, 3)) / LN2
    # Float32: x0_hat = (x_t - s eps_hat) / a carries the rounding of terms ~(12 + 2 a |x0_hat|) / a
    # (|x_t| <= 6 here), and the two means share coef2 x_t whose rounding does not cancel; both
    # reach the KL through dm^2 / Sigma. At t = 0 the CDFs' absolute errors give 2 eps / p in log p,
    # and the mean's error enters through |d log p / d mean| <= 0.8 / (sigma p).
    mean_scale = r.coef1 * (12.0 + 2.0 * r.a * np.abs(x0_hat)) / r.a + r.coef1 * np.abs(x0) + 6.0 * r.coef2
    scale = (np.abs(dm) * mean_scale / np.exp(log_var)).mean((2, 3, 4)) / LN2
    assert np.all(p > 1e-3), "the decoder test needs x0_hat within the data's bins"
    scale[0] = (2.0 / p + 0.8 * mean_scale[0] / (np.exp(0.5 * log_var[0]) * p)).mean((1, 2, 3)) / LN2
    assert float(jnp.min(bpd.terms[1:])) > 0.0
    assert_close(bpd.terms, want, scale=scale, msg="terms")
    prior = _prior_bpd_ref(NLL_X0)
    assert_close(bpd.prior, prior, msg="prior")
    assert_close(bpd.total, prior + want.sum(0), scale=scale.sum(0), msg="total")


# ---------------------------------------------------------------------------
# Bad input: ValueError naming the argument, before the network runs or anything compiles.
# ---------------------------------------------------------------------------

SCHED = schedules.linear(10, 1e-3, 0.2)
X = jnp.zeros((4, 2, 2, 3))
T_OK = jnp.array([0, 3, 5, 9])


def _never_called(x, t):
    raise AssertionError("the network ran before the arguments were checked")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(parameterization="score"), r"parameterization: expected 'eps', 'x0' or 'v' for a training loss, got 'score'"),
        (dict(parameterization="epsilon"), r"parameterization: expected 'eps', 'x0' or 'v' for a training loss, got 'epsilon'"),
        (dict(weighting="snr_min"), r"weighting: expected one of \('uniform', 'snr', 'truncated_snr', 'min_snr', 'p2'\), got 'snr_min'"),
        (dict(variance="learnt"), r"variance: expected one of \('fixed_small', 'fixed_large', 'learned_range', 'learned'\), got 'learnt'"),
        (dict(t=jnp.array([0, 3, 5, 10])), r"t: expected timesteps in \[0, 10\) .*got min 0, max 10"),
        (dict(t=jnp.array([-1, 3, 5, 9])), r"t: expected timesteps in \[0, 10\) .*got min -1, max 9"),
        (dict(t=jnp.array([0.0, 3.0, 5.0, 9.0])), r"t: expected integer timesteps \(0-indexed\), got dtype float32"),
        (dict(t=jnp.array([0, 3, 5])), r"t: expected shape \[4\] to match the batch of x, got \(3,\)"),
        (dict(noise=X[:, :1]), r"expected equal shapes, got x0: \(4, 2, 2, 3\), noise: \(4, 1, 2, 3\)"),
    ],
)
def test_diffusion_loss_checks_arguments_before_running_the_model(kwargs, match):
    args = dict(t=T_OK, noise=X) | kwargs
    with pytest.raises(ValueError, match=match):
        losses.diffusion_loss(SCHED, _never_called, X, args.pop("t"), args.pop("noise"), **args)


@pytest.mark.parametrize(
    "output,variance,match",
    [
        (jnp.zeros((4, 2, 2, 3)), "learned_range", r"variance='learned_range': expected a model output with 2C channels \(prediction, variance\), got 3 channels"),
        (jnp.zeros((4, 2, 2, 5)), "learned", r"variance='learned': expected a model output with 2C channels .*got 5 channels"),
        (jnp.zeros((4, 2, 2, 2)), "fixed_small", r"model output: expected prediction shape \(4, 2, 2, 3\), got \(4, 2, 2, 2\)"),
        (jnp.zeros((4, 2, 2, 8)), "learned_range", r"model output: expected prediction shape \(4, 2, 2, 3\), got \(4, 2, 2, 4\)"),
    ],
)
def test_diffusion_loss_rejects_bad_model_outputs(output, variance, match):
    with pytest.raises(ValueError, match=match):
        losses.diffusion_loss(SCHED, lambda x, t: output, X, T_OK, X, variance=variance)
    # Under jit the same error comes while tracing, before compilation.
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda x0: losses.diffusion_loss(SCHED, lambda x, t: output, x0, T_OK, X, variance=variance)).lower(X)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: losses.snr(SCHED, jnp.array([0, 10])), r"t: expected timesteps in \[0, 10\)"),
        (lambda: losses.snr(SCHED, jnp.array([-1, 3])), r"t: expected timesteps in \[0, 10\)"),
        (lambda: losses.loss_weight(SCHED, jnp.array([10]), "eps", "snr"), r"t: expected timesteps in \[0, 10\)"),
        (lambda: losses.loss_weight(SCHED, T_OK, "eps", "p3"), r"weighting: expected one of .*got 'p3'"),
        (lambda: losses.loss_weight(SCHED, T_OK, "score", "snr"), r"parameterization: expected 'eps', 'x0' or 'v' .*got 'score'"),
        (lambda: losses.vlb_term(SCHED, X, X, jnp.array([0, 3, 5, 10]), X, X), r"t: expected timesteps in \[0, 10\)"),
        (lambda: losses.vlb_term(SCHED, X, X[:, :1], T_OK, X, X), r"expected equal shapes, got x0: \(4, 2, 2, 3\), xt: \(4, 1, 2, 3\)"),
        (lambda: losses.nll_bpd(SCHED, lambda x, t: x, X, jax.random.PRNGKey(0), variance="learned_range"), r"variance='learned_range': expected a model output with 2C channels"),
        (lambda: losses.nll_bpd(SCHED, lambda x, t: x, X, jax.random.PRNGKey(0), parameterization="noise"), r"parameterization: expected one of .*got 'noise'"),
        (lambda: losses.nll_bpd(SCHED, lambda x, t: x, X, jax.random.PRNGKey(0), variance="small"), r"variance: expected one of .*got 'small'"),
    ],
)
def test_other_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
