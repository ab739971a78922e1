"""EDM (Karras et al. 2022) and flow matching (Lipman et al. 2023; Liu et al. 2023) through the
core's samplers and guidance, against the exact Gaussian mixture: its EDM denoiser
D*(x; sigma) = E[x_0 | x] and flow velocity v*(x, t) = E[eps - x_0 | x_t] are closed form
(jdiff.testing), so no network is trained here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import edm, guidance, samplers, schedules
from jdiff.testing import gaussian_mixture

N = 8000
WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-2.0, 0.0], [2.0, 1.0]])
STDS = np.array([0.5, 0.3])


@pytest.fixture(scope="module")
def gm():
    return gaussian_mixture(WEIGHTS, MEANS, STDS)


def assert_matches_mixture(x, std_rtol=0.04, mean_atol=0.05):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    comp = ((x[:, None, :] - MEANS[None]) ** 2).sum(-1).argmin(1)
    for k, w in enumerate(WEIGHTS):
        frac, se = np.mean(comp == k), np.sqrt(w * (1 - w) / len(x))
        assert abs(frac - w) < 3 * se, f"component {k}: weight {frac:.4f}, expected {w} +- {3 * se:.4f}"
        xk = x[comp == k]
        np.testing.assert_allclose(xk.mean(0), MEANS[k], atol=mean_atol, err_msg=f"mean of component {k}")
        np.testing.assert_allclose(xk.std(0), STDS[k], rtol=std_rtol, err_msg=f"std of component {k}")


CASES = [
    # (process, parameterization, method, steps, extra)
    ("edm", "x0", "heun", 32, {}),
    # Churn's spread converges with the steps (measured std of component 0: 0.519 at 40 steps,
    # 0.512 at 80, 0.505 at 160, with S_churn = steps): 80 steps for the 4% tolerance.
    ("edm", "x0", "heun_churn", 80, {"s_churn": 80.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.0}),
    ("edm", "x0", "ddpm", 200, {}),
    ("flow", "flow", "euler", 100, {}),
    ("flow", "flow", "heun", 20, {}),
    ("flow", "flow", "dpm_solver++", 20, {}),
    ("vp", "eps", "heun", 50, {}),  # a VP (eps) model sampled with Heun through s = sigma / alpha (std +4.6% at 25 steps)
]


def _process(name):
    return {"edm": schedules.edm(), "flow": schedules.flow(), "vp": schedules.linear(1000)}[name]


@pytest.mark.parametrize("proc,param,method,steps,extra", CASES)
def test_samplers_reproduce_the_mixture(gm, proc, param, method, steps, extra):
    process = _process(proc)
    x = jdiff.sample(gm.model_fn(process, param), process, (N, 2), jax.random.key(0), method=method, steps=steps,
                     parameterization=param, **extra)
    assert_matches_mixture(x)


@pytest.mark.parametrize("proc,param,spacing", [("edm", "x0", "karras"), ("flow", "flow", "uniform")])
def test_heun_is_second_order_and_euler_first(gm, proc, param, spacing):
    """Error against a 1024-step Heun solve of the same probability-flow ODE from the same x_T:
    doubling the steps divides Euler's (DDIM's) error by ~2 and Heun's by ~4 (measured: Euler
    2.00-2.04, Heun 4.2-4.4 for EDM and 3.6-3.9 for flow, whose first step from t = 1 is Euler)."""
    process = _process(proc)
    scale = 80.0 if proc == "edm" else 1.0
    xT = jax.random.normal(jax.random.key(1), (2000, 2)) * scale
    run = lambda m, n: jdiff.sample(gm.model_fn(process, param), process, xT, jax.random.key(0), method=m, steps=n,  # noqa: E731
                                    parameterization=param, spacing=spacing)
    ref = run("heun", 1024)
    for method, lo, hi in [("ddim", 1.8, 2.25), ("heun", 3.3, 5.0)]:
        errs = [float(jnp.mean(jnp.abs(run(method, n) - ref))) for n in (32, 64, 128)]
        ratios = [a / b for a, b in zip(errs, errs[1:])]
        assert all(lo < r < hi for r in ratios), f"{method}: errors {errs}, ratios {ratios}"


def test_euler_is_ddim_with_eta_zero(gm):
    """Euler on the flow's velocity is DDIM (eta = 0): the same step, x + (t' - t) v, written two
    ways (DDIM: x_0 and eps from v, then recombined). Compared in float64 (x64 on), where the
    two agree to rounding (~1e-15); in float32 their rounding differs by how XLA compiles each
    (after 10 steps: below 1e-6 with one set of compile flags, 1.5e-5 with another)."""
    process = schedules.flow()
    xT = jax.random.normal(jax.random.key(5), (64, 2))
    jax.config.update("jax_enable_x64", True)
    try:
        x64 = jnp.asarray(np.asarray(xT), jnp.float64)
        run = lambda m: jdiff.sample(gm.model_fn(process, "flow"), process, x64, jax.random.key(0), method=m, steps=10,  # noqa: E731
                                     parameterization="flow")
        euler, ddim = run("euler"), run("ddim")
    finally:
        jax.config.update("jax_enable_x64", False)
    assert euler.dtype == ddim.dtype == np.float64
    np.testing.assert_allclose(euler, ddim, rtol=1e-12, atol=1e-12)
    # ... and on the linear path, the rectified-flow step x + (t_next - t) v (float64, one step).
    x = np.asarray(xT[:4], np.float64)
    one = jdiff.sample(gm.model_fn(process, "flow"), process, xT[:4], jax.random.key(0), method="euler", timesteps=[0.8, 0.5],
                       parameterization="flow")
    v = np.asarray(gm.model_fn(process, "flow")(xT[:4], jnp.full((4,), 0.8)), np.float64)
    np.testing.assert_allclose(one, x - 0.3 * v, rtol=1e-5, atol=1e-5)


def test_heun_makes_two_network_calls_per_step_but_the_last(gm):
    process = schedules.edm()
    calls = []

    def counting(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return gm.model_fn(process, "x0")(x, sigma)

    jax.block_until_ready(jdiff.sample(counting, process, (4, 2), jax.random.key(0), method="heun", steps=10, parameterization="x0"))
    jax.effects_barrier()
    assert len(calls) == 2 * 10 - 1


@pytest.mark.parametrize("proc,param", [("flow", "flow"), ("edm", "x0")])
def test_cfg_on_velocities_and_denoisers_is_exact_guidance(gm, proc, param):
    """On the exact model, CFG with weight w is classifier guidance with scale 1 + w in any
    parameterization (weights sum to one), and w = 0 samples the conditional component."""
    process = _process(proc)
    cond = gm.conditional_model_fn(process, param)
    uncond = gm.model_fn(process, param)
    log_prob = gm.class_log_prob_fn(process)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 2)) * 1.5, jnp.float32)
    t = jnp.asarray(np.linspace(0.1, 0.9, 8) * (20.0 if proc == "edm" else 1.0), jnp.float32)
    y = jnp.asarray([0, 1] * 4)
    for w in (0.0, 2.0):
        cfg = guidance.classifier_free(cond, w, num_classes=2)(x, t, y)
        cls = guidance.classifier(uncond, log_prob, 1.0 + w, process, parameterization=param)(x, t, y)
        np.testing.assert_allclose(cfg, cls, rtol=1e-4, atol=1e-4)
    model = guidance.with_label(guidance.classifier_free(cond, 0.0, num_classes=2), jnp.zeros((4000,), jnp.int32))
    s = jdiff.sample(model, process, (4000, 2), jax.random.key(3), method="heun", steps=32, parameterization=param)
    s = np.asarray(s, np.float64)
    np.testing.assert_allclose(s.mean(0), MEANS[0], atol=3 * STDS[0] / np.sqrt(4000) + 0.02)
    np.testing.assert_allclose(s.std(0), STDS[0], rtol=0.05)


def test_preconditioning_matches_table_1():
    sigma = np.array([0.002, 0.1, 1.0, 80.0])
    sd = 0.5
    c = edm.preconditioning(jnp.asarray(sigma), sd)
    np.testing.assert_allclose(c.c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c.c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c.c_noise, np.log(sigma) / 4, rtol=1e-6)


def test_precondition_and_edm_loss(gm):
    """D = c_skip x + c_out F(c_in x, c_noise); the loss is lambda(sigma) ||D - x0||^2, eq. 8."""
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    sigma = jnp.asarray([0.01, 0.1, 0.5, 1.0, 5.0, 40.0], jnp.float32)
    W = jnp.asarray([[0.3, -0.2], [0.1, 0.4]])

    def net(x_in, c_noise):
        return x_in @ W + c_noise[:, None]

    D = edm.precondition(net, 0.5)(x0 + sigma[:, None] * noise, sigma)
    s, x = np.asarray(sigma, np.float64)[:, None], np.asarray(x0 + sigma[:, None] * noise, np.float64)
    c_in, c_skip, c_out = 1 / np.sqrt(s**2 + 0.25), 0.25 / (s**2 + 0.25), s * 0.5 / np.sqrt(s**2 + 0.25)
    want = c_skip * x + c_out * ((c_in * x) @ np.asarray(W, np.float64) + np.log(s) / 4)
    np.testing.assert_allclose(D, want, rtol=1e-5, atol=1e-5)
    lam = (s[:, 0] ** 2 + 0.25) / (s[:, 0] * 0.5) ** 2
    np.testing.assert_allclose(edm.edm_loss(net, x0, sigma, noise, 0.5), lam * np.mean((want - np.asarray(x0)) ** 2, axis=1), rtol=1e-4)


def test_flow_loss_and_time_samplers():
    rng = np.random.default_rng(2)
    x0, noise = (jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0.1, 0.3, 0.5, 0.7, 0.9])
    v = lambda x, t_: 0.5 * x  # noqa: E731
    x_t = (1 - np.asarray(t))[:, None] * np.asarray(x0) + np.asarray(t)[:, None] * np.asarray(noise)
    want = np.mean((0.5 * x_t - (np.asarray(noise) - np.asarray(x0))) ** 2, axis=1)
    np.testing.assert_allclose(edm.flow_loss(v, x0, t, noise), want, rtol=1e-5)
    for kind in edm.TIME_SAMPLERS:
        ts = np.asarray(edm.flow_times(jax.random.key(0), 20000, kind))
        assert 0 < ts.min() and ts.max() < 1
    ln = np.asarray(edm.flow_times(jax.random.key(0), 20000, "logit_normal"))
    assert abs(np.mean(np.log(ln / (1 - ln)))) < 0.03 and abs(np.std(np.log(ln / (1 - ln))) - 1) < 0.03
    sig = np.asarray(edm.edm_sigmas(jax.random.key(1), 20000))
    assert abs(np.mean(np.log(sig)) + 1.2) < 0.03 and abs(np.std(np.log(sig)) - 1.2) < 0.03


def test_karras_sigmas_eq_5():
    sig = schedules.karras_sigmas(4, 0.002, 80.0, 7.0)
    i = np.arange(4) / 3
    np.testing.assert_allclose(sig[:-1], (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    assert sig[-1] == 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda gm: schedules.karras_sigmas(10, 1.0, 0.5), "sigma_min, sigma_max"),
        (lambda gm: schedules.karras_sigmas(10, -0.1, 0.5), "sigma_min, sigma_max"),
        (lambda gm: schedules.karras_sigmas(10, 0.002, 80.0, rho=0.0), "rho"),
        (lambda gm: schedules.edm(sigma_min=5.0, sigma_max=1.0), "sigma_min, sigma_max"),
        (lambda gm: jdiff.sample(gm.model_fn(schedules.edm(), "x0"), schedules.edm(), (4, 2), jax.random.key(0),
                                 method="heun_churn", steps=5, parameterization="x0", s_churn=-1.0), "s_churn"),
        (lambda gm: jdiff.sample(gm.model_fn(schedules.edm(), "x0"), schedules.edm(), (4, 2), jax.random.key(0),
                                 method="heun", steps=5, parameterization="x0", s_churn=1.0), "has no churn"),
        (lambda gm: jdiff.sample(gm.model_fn(schedules.flow(), "flow"), schedules.flow(), (4, 2), jax.random.key(0),
                                 method="euler_maruyama", steps=5, parameterization="flow"), "sde_increments"),
        (lambda gm: jdiff.sample(gm.model_fn(schedules.linear(100)), schedules.linear(100), (4, 2), jax.random.key(0),
                                 method="heun_churn", steps=5, s_churn=1.0), "time_from_scaled_sigma"),
        (lambda gm: jdiff.sample(gm.model_fn(schedules.flow(), "flow"), schedules.flow(), (4, 2), jax.random.key(0),
                                 method="heun", steps=5, parameterization="flow", spacing="karras"), "karras"),
        (lambda gm: edm.precondition(gm.model_fn(schedules.edm()), sigma_data=0.0), "sigma_data"),
        (lambda gm: edm.flow_times(jax.random.key(0), 3, "beta"), "kind"),
    ],
)
def test_bad_input_raises_before_compiling(gm, call, match):
    before = samplers._sample_jit._cache_size()
    with pytest.raises(ValueError, match=match):
        call(gm)
    assert samplers._sample_jit._cache_size() == before
