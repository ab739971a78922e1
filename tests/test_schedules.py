"""jdiff.schedules against float64 NumPy transcriptions of the papers' equations.

References: Ho et al. 2020 (DDPM) sec. 4 and eqs. 4, 6, 7; Nichol & Dhariwal 2021
(improved DDPM) eq. 17 and sec. 3.2 (beta clipping) and sec. 4 (respacing); Song et al.
2021 (score SDE) eq. 33; Ho & Salimans 2022 (classifier-free guidance) sec. 4 (the
truncated cosine log-SNR).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules

RTOL = 1e-5
FIELDS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


# ---------------------------------------------------------------------------
# float64 references, written from the papers
# ---------------------------------------------------------------------------


def ref_linear_betas(T, beta_start=1e-4, beta_end=0.02):
    """DDPM sec. 4: betas increase linearly from beta_1 to beta_T."""
    return beta_start + (beta_end - beta_start) * np.arange(T, dtype=np.float64) / max(T - 1, 1)


def ref_cosine_betas(T, s=0.008, max_beta=0.999):
    """Improved DDPM eq. 17, abar_t = f(t) / f(0), and sec. 3.2, beta_t = min(1 - abar_t / abar_{t-1}, max_beta)."""
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = np.array([f[t] / f[0] for t in range(T + 1)])
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def ref_betas_from_abar(abar, max_beta=0.999):
    abar = np.asarray(abar, np.float64)
    return np.minimum(1.0 - abar / np.concatenate([[1.0], abar[:-1]]), max_beta)


def ref_vp_log_snr(t, beta_min=0.1, beta_max=20.0):
    """Score SDE eq. 33: the VP-SDE's mean coefficient exp(-t^2 (b_max - b_min) / 4 - t b_min / 2)
    is alpha_t, so abar_t = alpha_t^2 and lambda = log(abar / (1 - abar))."""
    abar = np.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)
    return np.log(abar / (1.0 - abar))


def ref_cosine_log_snr(t, logsnr_min=-20.0, logsnr_max=20.0):
    """CFG paper sec. 4: lambda = -2 log tan(a t + b), b = arctan(exp(-lmax / 2)), a = arctan(exp(-lmin / 2)) - b."""
    b = np.arctan(np.exp(-logsnr_max / 2))
    a = np.arctan(np.exp(-logsnr_min / 2)) - b
    return -2.0 * np.log(np.tan(a * t + b))


def ref_fields(betas):
    """Every Schedule field from betas by DDPM eqs. 4, 6, 7 (float64)."""
    betas = np.asarray(betas, np.float64)
    T = betas.shape[0]
    alphas = 1.0 - betas
    abar = np.array([np.prod(alphas[: t + 1]) for t in range(T)])
    abar_prev = np.array([np.prod(alphas[:t]) for t in range(T)])  # empty product: abar_0 = 1
    beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * betas  # eq. 7
    # beta_tilde_0 = 0, so the reference code's log variance uses beta_tilde_1 at t = 0.
    clipped = np.array([beta_tilde[1] if t == 0 else beta_tilde[t] for t in range(T)])
    return dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt((1.0 - abar) / abar),
        posterior_variance=beta_tilde,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=np.sqrt(abar_prev) * betas / (1.0 - abar),  # eq. 7, the x_0 coefficient
        posterior_mean_coef2=np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),  # eq. 7, the x_t coefficient
    )


def _random_betas():
    return np.random.default_rng(0).uniform(1e-4, 0.5, size=37)


def _random_abar():
    # A decreasing abar with one drop steep enough (ratio 1e-4) that beta is clipped at 0.999.
    ratios = np.random.default_rng(1).uniform(0.6, 0.999, size=30)
    ratios[20] = 1e-4
    return np.cumprod(ratios)


_KEPT = np.sort(np.random.default_rng(2).choice(np.arange(1, 999), size=18, replace=False))
_KEPT = np.concatenate([[0], _KEPT, [999]])  # the first and the last step kept explicitly


def _cases():
    """name -> (built schedule, float64 betas written from the paper, expected timesteps)."""
    T = 1000
    lin_abar = np.cumprod(1.0 - ref_linear_betas(T))
    cos_abar = np.cumprod(1.0 - ref_cosine_betas(T))
    spaced = np.round(np.linspace(0, T - 1, 50)).astype(int)
    u = (np.arange(T) + 1.0) / T
    sigmoid = lambda lam: 1.0 / (1.0 + np.exp(-lam))  # noqa: E731
    return {
        "linear": (lambda: schedules.linear(T), ref_linear_betas(T), np.arange(T)),
        "linear_short": (lambda: schedules.linear(10, 1e-3, 0.5), ref_linear_betas(10, 1e-3, 0.5), np.arange(10)),
        "cosine": (lambda: schedules.cosine(T), ref_cosine_betas(T), np.arange(T)),
        "cosine_clipped": (
            lambda: schedules.cosine(20, s=0.02, max_beta=0.3),
            ref_cosine_betas(20, 0.02, 0.3),
            np.arange(20),
        ),
        "from_betas_random": (lambda: schedules.from_betas(_random_betas()), _random_betas(), np.arange(37)),
        "from_alphas_cumprod": (
            lambda: schedules.from_alphas_cumprod(_random_abar()),
            ref_betas_from_abar(_random_abar()),
            np.arange(30),
        ),
        # Respacing keeps abar at the kept steps: beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}.
        "respaced_linear_random": (
            lambda: schedules.respace(schedules.linear(T), _KEPT),
            ref_betas_from_abar(lin_abar[_KEPT], max_beta=1.0),
            _KEPT,
        ),
        "respaced_cosine_spaced": (
            lambda: schedules.respace(schedules.cosine(T), schedules.space_timesteps(T, 50)),
            ref_betas_from_abar(cos_abar[spaced], max_beta=1.0),
            spaced,
        ),
        "log_snr_vp": (
            lambda: schedules.from_log_snr(schedules.vp_linear_log_snr, T),
            ref_betas_from_abar(sigmoid(ref_vp_log_snr(u))),
            np.arange(T),
        ),
        "log_snr_cosine": (
            lambda: schedules.from_log_snr(schedules.cosine_log_snr, T),
            ref_betas_from_abar(sigmoid(ref_cosine_log_snr(u))),
            np.arange(T),
        ),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def built():
    return {name: build() for name, (build, _, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_every_field_matches_ddpm_equations(built, name):
    sched = built[name]
    _, betas, timesteps = CASES[name]
    ref = ref_fields(betas)
    T = betas.shape[0]
    assert sched.num_timesteps == T
    for field in FIELDS:
        value = getattr(sched, field)
        chex.assert_shape(value, (T,))
        assert value.dtype == jnp.float32, field
        np.testing.assert_allclose(np.asarray(value, np.float64), ref[field], rtol=RTOL, atol=0, err_msg=field)
    assert sched.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sched.timesteps), timesteps)


def test_first_and_last_step_explicitly(built):
    lin, cos = built["linear"], built["cosine"]
    # DDPM's stated endpoints, beta_1 = 1e-4 and beta_T = 0.02.
    np.testing.assert_allclose(float(lin.betas[0]), 1e-4, rtol=RTOL)
    np.testing.assert_allclose(float(lin.betas[-1]), 0.02, rtol=RTOL)
    for sched in (lin, cos):
        # t = 0: abar_{-1} = 1, the posterior is a point mass at x_0 (variance 0, mean x_0).
        assert float(sched.alphas_cumprod_prev[0]) == 1.0
        assert float(sched.posterior_variance[0]) == 0.0
        np.testing.assert_allclose(float(sched.posterior_mean_coef1[0]), 1.0, rtol=RTOL)
        assert float(sched.posterior_mean_coef2[0]) == 0.0
        np.testing.assert_allclose(
            float(sched.posterior_log_variance_clipped[0]), math.log(float(sched.posterior_variance[1])), rtol=RTOL
        )
        # t = T-1: x_T is close to pure noise.
        assert 0.0 < float(sched.alphas_cumprod[-1]) < 1e-4
    # f(T) = cos^2(pi / 2) = 0, so the last cosine beta is 1 before clipping at 0.999.
    np.testing.assert_allclose(float(cos.betas[-1]), 0.999, rtol=RTOL)
    assert float(jnp.max(cos.betas)) <= np.float32(0.999)


def test_cosine_alphas_cumprod_is_f_ratio_where_unclipped():
    # Improved DDPM eq. 17 read directly: abar_t = f(t) / f(0) at t = 1..T-1 (paper indexing).
    T, s = 1000, 0.008
    sched = schedules.cosine(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    want = np.array([f(t + 1) / f(0) for t in range(T - 1)])
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod[:-1], np.float64), want, rtol=RTOL)


def test_scaled_linear_is_latent_diffusions_betas():
    # LDM / Stable Diffusion's "scaled_linear", read from its definition: beta_t is the square of
    # the t-th of T evenly spaced points from sqrt(0.00085) to sqrt(0.012); abar the running product.
    T = 1000
    sched = schedules.scaled_linear(T)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * t / (T - 1)) ** 2 for t in range(T)]
    want = np.cumprod([1.0 - b for b in betas])
    np.testing.assert_allclose(np.asarray(sched.betas, np.float64), betas, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod, np.float64), want, rtol=RTOL)
    assert schedules.get("scaled_linear", T).betas.shape == (T,)
    with pytest.raises(ValueError, match=r"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got 0.02, 0.01"):
        schedules.scaled_linear(10, 0.02, 0.01)


def test_respace_with_all_timesteps_is_the_identity(built):
    for name in ("linear", "cosine", "from_betas_random", "respaced_linear_random"):
        sched = built[name]
        same = schedules.respace(sched, np.arange(sched.num_timesteps))
        np.testing.assert_array_equal(np.asarray(same.timesteps), np.asarray(sched.timesteps))
        for field in FIELDS:
            np.testing.assert_allclose(
                np.asarray(getattr(same, field)), np.asarray(getattr(sched, field)), rtol=RTOL, atol=0, err_msg=f"{name}.{field}"
            )


def test_respace_composes_and_keeps_original_timesteps(built):
    lin = built["linear"]
    once = schedules.respace(lin, _KEPT)
    sub = np.array([0, 3, 7, 19])  # indices into the respaced schedule
    twice = schedules.respace(once, sub)
    np.testing.assert_array_equal(np.asarray(twice.timesteps), _KEPT[sub])
    direct = schedules.respace(lin, _KEPT[sub])
    for field in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(twice, field)), np.asarray(getattr(direct, field)), rtol=RTOL, err_msg=field)


def test_respace_to_a_single_step():
    sched = schedules.respace(schedules.linear(100), [99])
    abar = np.prod(1.0 - ref_linear_betas(100))
    np.testing.assert_allclose(float(sched.alphas_cumprod[0]), abar, rtol=RTOL)
    np.testing.assert_allclose(float(sched.betas[0]), 1.0 - abar, rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(sched.timesteps), [99])


@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 7), (10, 4), (10, 10), (37, 36), (5, 2), (8, 1)])
def test_space_timesteps_is_an_even_subsequence(T, steps):
    ts = schedules.space_timesteps(T, steps)
    assert ts.shape == (steps,) and np.issubdtype(ts.dtype, np.integer)
    assert np.all(np.diff(ts) > 0)
    assert ts[-1] == T - 1  # the pure-noise step is always sampled
    if steps > 1:
        assert ts[0] == 0
        # Evenly spread: each kept step is the nearest integer to a uniform grid point.
        grid = np.arange(steps) * (T - 1) / (steps - 1)
        assert np.all(np.abs(ts - grid) <= 0.5)
    if steps == T:
        np.testing.assert_array_equal(ts, np.arange(T))


class ContinuousLogSNRTest(chex.TestCase):
    """The continuous-time log-SNR functions under jit and without, with their t-derivatives."""

    t = np.linspace(0.01, 1.0, 64)

    @chex.variants(with_jit=True, without_jit=True)
    def test_vp_linear_log_snr(self):
        got = self.variant(schedules.vp_linear_log_snr)(jnp.asarray(self.t, jnp.float32))
        # lambda crosses 0 near t = 0.35; there the float32 rounding of its two O(1) terms
        # (log abar and log(1 - abar), each ~1e-7 relative) is the error, not the result's size.
        log_abar = -0.5 * self.t**2 * 19.9 - 0.1 * self.t
        terms = np.abs(log_abar) + np.abs(np.log1p(-np.exp(log_abar)))
        np.testing.assert_allclose(np.asarray(got, np.float64), ref_vp_log_snr(self.t), rtol=RTOL, atol=RTOL * terms.max())
        # d lambda / dt = (d log abar / dt) / (1 - abar), d log abar / dt = -(b_min + (b_max - b_min) t).
        dlam = self.variant(jax.vmap(jax.grad(schedules.vp_linear_log_snr)))(jnp.asarray(self.t, jnp.float32))
        np.testing.assert_allclose(np.asarray(dlam, np.float64), -(0.1 + 19.9 * self.t) / (1.0 - np.exp(log_abar)), rtol=RTOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cosine_log_snr(self):
        fn = self.variant(schedules.cosine_log_snr)
        t = np.concatenate([[0.0], self.t])
        got = np.asarray(fn(jnp.asarray(t, jnp.float32)), np.float64)
        want = ref_cosine_log_snr(t)
        # lambda crosses 0 at t ~ 0.5; the float32 rounding of a t + b (~1e-7 of an O(1) angle)
        # moves lambda by 4 * 1e-7 / sin(2 (a t + b)) <= ~1e-6 there.
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
        # The endpoints are the requested truncation: lambda(0) = logsnr_max, lambda(1) = logsnr_min.
        np.testing.assert_allclose(got[[0, -1]], [20.0, -20.0], rtol=RTOL)
        # Without truncation it is improved DDPM's cosine with s = 0: alpha = cos(pi t / 2), sigma = sin(pi t / 2).
        wide = np.asarray(self.variant(lambda u: schedules.cosine_log_snr(u, -60.0, 60.0))(jnp.asarray(self.t[:-1], jnp.float32)))
        np.testing.assert_allclose(wide, np.log(1.0 / np.tan(np.pi * self.t[:-1] / 2) ** 2), rtol=RTOL, atol=1e-6)
        # d lambda / dt = -4 a / sin(2 (a t + b)).
        dlam = self.variant(jax.vmap(jax.grad(schedules.cosine_log_snr)))(jnp.asarray(self.t, jnp.float32))
        b = np.arctan(np.exp(-10.0))
        a = np.arctan(np.exp(10.0)) - b
        np.testing.assert_allclose(np.asarray(dlam, np.float64), -4.0 * a / np.sin(2.0 * (a * self.t + b)), rtol=RTOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_alpha_sigma_from_log_snr(self):
        lam = np.random.default_rng(3).uniform(-15.0, 15.0, size=(4, 16))
        alpha, sigma = self.variant(schedules.alpha_sigma_from_log_snr)(jnp.asarray(lam, jnp.float32))
        chex.assert_shape([alpha, sigma], (4, 16))
        # Variance preserving with alpha^2 / sigma^2 = exp(lambda).
        np.testing.assert_allclose(np.asarray(alpha, np.float64), np.sqrt(np.exp(lam) / (1.0 + np.exp(lam))), rtol=RTOL)
        np.testing.assert_allclose(np.asarray(sigma, np.float64), np.sqrt(1.0 / (1.0 + np.exp(lam))), rtol=RTOL)


def test_from_log_snr_with_a_user_function():
    # Any jnp function of t works; this one is linear in lambda from 8 down to -8.
    sched = schedules.from_log_snr(lambda t: 8.0 - 16.0 * t, 64)
    u = (np.arange(64) + 1.0) / 64
    abar = 1.0 / (1.0 + np.exp(-(8.0 - 16.0 * u)))
    ref = ref_fields(ref_betas_from_abar(abar))
    for field in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(sched, field), np.float64), ref[field], rtol=RTOL, err_msg=field)


def test_get_by_name(built):
    for name in ("linear", "cosine"):
        got = schedules.get(name, 1000)
        chex.assert_trees_all_equal(got, built[name])
    chex.assert_trees_all_equal(schedules.get("cosine", 20, s=0.02, max_beta=0.3), built["cosine_clipped"])


def test_schedule_is_a_pytree_argument_of_jit(built):
    traces = []

    @jax.jit
    def last_abar(sched):
        traces.append(None)
        return sched.alphas_cumprod[-1]

    # Two schedules of the same length share one compilation: schedules are data, not constants.
    for name in ("linear", "cosine"):
        np.testing.assert_allclose(float(last_abar(built[name])), float(built[name].alphas_cumprod[-1]), rtol=0)
    assert len(traces) == 1
    assert len(jax.tree_util.tree_leaves(built["linear"])) == len(FIELDS) + 1
    # vmap over a stack of schedules.
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), built["linear"], built["cosine"])
    got = jax.vmap(lambda s: s.alphas_cumprod[-1])(stacked)
    np.testing.assert_array_equal(np.asarray(got), [built["linear"].alphas_cumprod[-1], built["cosine"].alphas_cumprod[-1]])


# ---------------------------------------------------------------------------
# Bad input: ValueError naming the argument and the value, raised on the host.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "betas,match",
    [
        ([], r"betas: expected a non-empty 1-D array, got shape \(0,\)"),
        ([[0.1, 0.2]], r"betas: expected a non-empty 1-D array, got shape \(1, 2\)"),
        ([0.1, 0.0, 0.2], r"betas: expected every value in \(0, 1\], got \[0\.\]"),
        ([0.1, -0.1], r"betas: .*got \[-0\.1\]"),
        ([0.1, 1.5], r"betas: .*got \[1\.5\]"),
        ([0.1, float("nan")], r"betas: .*got \[nan\]"),
    ],
)
def test_from_betas_rejects_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        schedules.from_betas(betas)


def test_from_betas_rejects_timesteps_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"timesteps: expected shape \(3,\) to match betas, got \(2,\)"):
        schedules.from_betas([0.1, 0.2, 0.3], timesteps=[0, 1])


@pytest.mark.parametrize("abar", [[0.9, 0.95], [1.0, 0.5], [0.5, 0.0], [[0.9, 0.5]]])
def test_from_alphas_cumprod_rejects_bad_values(abar):
    with pytest.raises(ValueError, match=r"alphas_cumprod: expected a 1-D non-increasing array in \(0, 1\), got"):
        schedules.from_alphas_cumprod(np.array(abar))


@pytest.mark.parametrize("builder", [schedules.linear, schedules.cosine, lambda n: schedules.from_log_snr(schedules.cosine_log_snr, n)])
@pytest.mark.parametrize("num_timesteps", [0, -3, 2.5, "10"])
def test_builders_reject_bad_num_timesteps(builder, num_timesteps):
    with pytest.raises(ValueError, match=f"num_timesteps: expected a positive int, got {num_timesteps!r}"):
        builder(num_timesteps)


@pytest.mark.parametrize("beta_start,beta_end", [(0.0, 0.02), (0.03, 0.02), (1e-4, 1.0), (-1e-4, 0.02)])
def test_linear_rejects_bad_endpoints(beta_start, beta_end):
    with pytest.raises(ValueError, match=rf"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"):
        schedules.linear(100, beta_start, beta_end)


def test_cosine_rejects_negative_offset():
    with pytest.raises(ValueError, match=r"s: expected a non-negative offset, got -0\.1"):
        schedules.cosine(100, s=-0.1)


@pytest.mark.parametrize(
    "timesteps,match",
    [
        ([5, 3, 8], r"timesteps: expected strictly increasing values, got \[5, 3, 8\]"),
        ([3, 3, 8], r"timesteps: expected strictly increasing values, got \[3, 3, 8\]"),
        ([-1, 3], r"timesteps: expected values in \[0, 10\), got min -1, max 3"),
        ([0, 10], r"timesteps: expected values in \[0, 10\), got min 0, max 10"),
        (np.array([0.0, 5.0]), r"timesteps: expected a non-empty 1-D integer array, got array\(\[0\., 5\.\]\)"),
        (np.array([], dtype=int), r"timesteps: expected a non-empty 1-D integer array"),
        ([[0, 5]], r"timesteps: expected a non-empty 1-D integer array"),
    ],
)
def test_respace_rejects_bad_timesteps(timesteps, match):
    with pytest.raises(ValueError, match=match):
        schedules.respace(schedules.linear(10, 1e-3, 0.2), timesteps)


@pytest.mark.parametrize("steps", [0, 11, 2.5, None])
def test_space_timesteps_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match=rf"steps: expected an int in \[1, 10\] \(the schedule's T\), got {steps!r}"):
        schedules.space_timesteps(10, steps)


@pytest.mark.parametrize("name", ["quadratic", "Linear", ""])
def test_get_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=rf"schedule: expected one of \['cosine', 'linear', 'scaled_linear'\], got {name!r}"):
        schedules.get(name, 100)
