"""Cascaded diffusion (jdiff.cascade, the "super_resolution" batch transform, launch.sample
--sr_workdir / --low_res): operators against float64 NumPy transcriptions, the cascade and a
super-resolution stage against the exact mixture (jdiff.testing.cascade_model_fns), and bad
input refused before anything compiles or is written."""

import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jdiff import cascade, schedules, testing
from jdiff.data import fashion_mnist
from jdiff.train import config as config_lib
from jdiff.train import network, transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import fashion_mnist_base14, fashion_mnist_sr  # noqa: E402
import forked  # noqa: E402
from commands import run_commands  # noqa: E402


@dataclasses.dataclass(frozen=True)
class FnModule:
    """A stand-in network whose "params" are an exact model function (jdiff.testing)."""

    image_channels: int = 0
    aug_level_embedding: bool = False
    num_classes: object = None

    def apply(self, variables, x, t, cond=None):
        fn = variables["params"]
        return fn(x, t) if cond is None else fn(x, t, cond)


# ---------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------


def test_downsample_is_the_area_downsampling_of_the_base_stage_data():
    x = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
    for factor in (2, 4, 7):
        np.testing.assert_allclose(cascade.downsample(jnp.asarray(x), factor),
                                   fashion_mnist.area_downsample(x, 28 // factor), atol=1e-6)
    # jdiff.testing's matrix (the exact cascade's A) is built independently, with Kronecker products.
    A = testing.downsample_matrix((28, 28, 1), 4)
    np.testing.assert_allclose((x.reshape(3, -1) @ A.T).reshape(3, 7, 7, 1), cascade.downsample(jnp.asarray(x), 4), atol=1e-6)
    # The shipped images: a 14x14 base stage's data is exactly what the SR stage's input is made of.
    full, _ = fashion_mnist.load_fashion_mnist_sample()
    low, _ = fashion_mnist.load_fashion_mnist_sample(14)
    np.testing.assert_allclose(cascade.downsample(jnp.asarray(full[:20]), 2), low[:20], atol=1e-6)
    with pytest.raises(ValueError, match="factor: 3 does not divide the image size 28x28"):
        cascade.downsample(jnp.asarray(x), 3)
    with pytest.raises(ValueError, match="factor: expected a positive int, got 0"):
        cascade.downsample(jnp.asarray(x), 0)
    with pytest.raises(ValueError, match="method: expected one of .*got 'cubic'"):
        cascade.upsample(jnp.asarray(x), (56, 56), "cubic")


def test_aug_timestep_and_augment_match_a_float64_transcription():
    sch = schedules.cosine(1000)
    np.testing.assert_array_equal(cascade.aug_timestep(np.array([0.0, 0.0004, 0.1, 0.25, 1.0]), 1000),
                                  [-1, -1, 99, 249, 999])
    abar = np.cumprod(1.0 - np.asarray(sch.betas, np.float64))
    rng = np.random.default_rng(1)
    low = rng.normal(size=(4, 7, 7, 1)).astype(np.float32)
    eps = rng.normal(size=low.shape).astype(np.float32)
    s = np.array([-1, 0, 500, 999], np.int32)
    want = np.empty(low.shape, np.float64)
    for b in range(4):  # z_s = sqrt(abar_s) y + sqrt(1 - abar_s) eps (DDPM eq. 4), y itself at s = -1
        a = 1.0 if s[b] < 0 else abar[s[b]]
        want[b] = np.sqrt(a) * low[b] + np.sqrt(1.0 - a) * eps[b]
    np.testing.assert_allclose(cascade.augment(sch, jnp.asarray(low), jnp.asarray(s), jnp.asarray(eps)), want,
                               rtol=1e-5, atol=1e-5)
    for bad in (-0.1, 1.5, "x", True, float("nan")):
        with pytest.raises(ValueError, match="aug_level: expected a fraction of the schedule in \\[0, 1\\]"):
            cascade.check_aug_level(bad)


def test_blur_matches_a_float64_transcription():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 9, 8, 2)).astype(np.float32)
    sigma = np.array([0.0, 0.5, 1.2], np.float32)
    r = 3
    got = np.asarray(cascade.blur(jnp.asarray(x), jnp.asarray(sigma), r))
    for b in range(3):
        if sigma[b] == 0:
            np.testing.assert_array_equal(got[b], x[b])
            continue
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / float(sigma[b])) ** 2)
        k /= k.sum()
        p = np.pad(x[b].astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
        want = np.zeros(x[b].shape)
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                want[i, j] = np.einsum("a,b,abc->c", k, k, p[i : i + 2 * r + 1, j : j + 2 * r + 1])
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
    const = np.full((2, 6, 6, 1), 0.3, np.float32)  # reflected edges: a constant image stays constant
    np.testing.assert_allclose(cascade.blur(jnp.asarray(const), jnp.asarray([0.4, 0.6]), 2), const, atol=1e-6)


# ---------------------------------------------------------------------------
# The training input: the "super_resolution" batch transform
# ---------------------------------------------------------------------------


def _sr_transform(**kw):
    return transforms.get("super_resolution", kw, schedule=schedules.cosine(100))


def test_transform_without_augmentation_is_the_upsampled_area_downsampling():
    x0 = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    out = jax.jit(_sr_transform(factor=2, method="bicubic"))({"image": x0, "cond": {"label": jnp.arange(4)}},
                                                             jax.random.key(0))
    want = cascade.upsample(cascade.downsample(x0, 2), (8, 8), "bicubic")
    np.testing.assert_allclose(out["cond"]["image"], want, atol=1e-6)
    np.testing.assert_array_equal(out["cond"]["aug_level"], -np.ones(4))
    np.testing.assert_array_equal(out["cond"]["label"], np.arange(4))
    np.testing.assert_array_equal(out["image"], x0)


def test_transform_noise_is_the_forward_process_at_the_level_it_reports():
    """Nearest upsampling is undone exactly by the area downsampling, so the noise can be read
    back: (z - alpha_s y) / sigma_s must be N(0, 1), s uniform on [-1, round(a_max T) - 1]."""
    sch = schedules.cosine(100)
    n = 2048
    x0 = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (n, 4, 4, 1)), jnp.float32)
    t = transforms.get("super_resolution", {"factor": 2, "method": "nearest", "max_aug_level": 0.5}, schedule=sch)
    out = jax.jit(t)({"image": x0, "cond": {}}, jax.random.key(5))
    s = np.asarray(out["cond"]["aug_level"]).astype(int)
    assert s.min() == -1 and s.max() == 49 and abs(s.mean() - 24.0) < 1.5  # round(U[0, 50]) - 1
    z = np.asarray(cascade.downsample(out["cond"]["image"], 2))
    y = np.asarray(cascade.downsample(x0, 2))
    alpha, sigma = (np.asarray(v) for v in sch.alpha_sigma(jnp.asarray(s)))
    keep = s >= 0
    e = (z[keep] - alpha[keep, None, None, None] * y[keep]) / sigma[keep, None, None, None]
    assert abs(e.mean()) < 4.0 / np.sqrt(e.size) and abs(e.var() - 1.0) < 0.06, (e.mean(), e.var())
    np.testing.assert_allclose(z[~keep], y[~keep], atol=1e-6)
    # Per-example draws: the first 8 examples alone get the same levels and noise (any mesh).
    part = jax.jit(t)({"image": x0[:8], "cond": {}}, jax.random.key(5))
    np.testing.assert_allclose(part["cond"]["image"], out["cond"]["image"][:8], atol=1e-6)


def test_transform_blurs_a_fraction_blur_prob_of_the_examples():
    x0 = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (1000, 8, 8, 1)), jnp.float32)
    out = jax.jit(_sr_transform(method="nearest", blur_prob=0.3))({"image": x0, "cond": {}}, jax.random.key(7))
    z = np.asarray(cascade.downsample(out["cond"]["image"], 2))
    changed = np.abs(z - np.asarray(cascade.downsample(x0, 2))).max(axis=(1, 2, 3)) > 1e-5
    assert abs(changed.mean() - 0.3) < 0.05, changed.mean()


@pytest.mark.parametrize("kwargs, match", [
    ({"factor": 0}, r"config.data.transform_kwargs.factor: expected a positive int, got 0"),
    ({"method": "cubic"}, r"config.data.transform_kwargs.method: expected one of .*got 'cubic'"),
    ({"max_aug_level": 1.5}, r"config.data.transform_kwargs.max_aug_level: expected a fraction of the schedule in \[0, 1\], got 1.5"),
    ({"blur_prob": -0.5}, r"config.data.transform_kwargs.blur_prob: expected a probability in \[0, 1\], got -0.5"),
    ({"blur_sigma": (0.0, 1.0)}, r"config.data.transform_kwargs.blur_sigma: expected \(low, high\) widths with 0 < low <= high"),
    ({"schedule": None}, r"config.data.transform_kwargs.schedule: set by the run"),
    ({"factr": 2}, r"config.data.transform_kwargs: \{'factr': 2\} do not fit transform 'super_resolution'"),
])
def test_transform_refuses_bad_kwargs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _sr_transform(**kwargs)


def test_transform_needs_a_discrete_schedule():
    with pytest.raises(ValueError, match="schedule: the super_resolution transform noises with a discrete schedule"):
        transforms.get("super_resolution", {}, schedule=schedules.edm(0.002, 80.0, 0.5))
    c = fashion_mnist_sr.get_config("small")
    c.diffusion.process = "edm"
    with pytest.raises(ValueError, match="discrete schedule"):
        network.make_transform(c)


def test_the_configs_build_their_networks_and_inputs():
    for arg, level in (("small", 0.5), ("small_noaug", 0.0), (None, 0.5), ("noaug", 0.0)):
        c = fashion_mnist_sr.get_config(arg)
        config_lib.validate(c)
        assert c.data.transform_kwargs.max_aug_level == level
        model = network.build_model(c)
        assert model.image_channels == 1 and model.aug_level_embedding and model.num_classes == 10
        # Shapes only: the transform's ops need not compile, one by one, for each config.
        batch = jax.eval_shape(lambda: network.example_batch(model, (28, 28, 1), network.make_transform(c)))
        assert batch["cond"]["image"].shape == (1, 28, 28, 1) and batch["cond"]["aug_level"].shape == (1,)
    for arg in ("small", None):
        c = fashion_mnist_base14.get_config(arg)
        config_lib.validate(c)
        assert c.data.resolution == 14 and c.data.transform == ""
    with pytest.raises(ValueError, match="arg: expected None, 'noaug'"):
        fashion_mnist_sr.get_config("big")


# ---------------------------------------------------------------------------
# The cascade on the exact mixture
# ---------------------------------------------------------------------------

N = 4000


@pytest.fixture(scope="module")
def exact():
    d = 16
    gm = testing.gaussian_mixture([0.4, 0.6], np.stack([np.linspace(-0.6, 0.6, d), np.linspace(0.5, -0.3, d)]),
                                  np.stack([np.full(d, 0.25), np.linspace(0.1, 0.4, d)]), (4, 4, 1))
    # DPM-Solver++ with 40 steps: its discretisation error is far inside the sampling error of
    # 4,000 samples, which ancestral DDPM's is not at this cost (50 respaced steps of a 200-step
    # chain moved the base stage's covariance by 6.5 standard errors; 400 steps were needed).
    sch = schedules.cosine(1000)
    base_fn, sr_fn = testing.cascade_model_fns(gm, sch, 2)
    base = cascade.Stage(FnModule(), base_fn, sch, (2, 2, 1), method="dpm_solver++", steps=40, clip=None)
    sr = cascade.Stage(FnModule(1, True), sr_fn, sch, (4, 4, 1), factor=2, upsample_method="nearest",
                       method="dpm_solver++", steps=40, clip=None)
    w, m, s = (np.asarray(v, np.float64) for v in (gm.weights, gm.means, gm.stds))
    mu = w @ m
    cov = np.einsum("k,kd,ke->de", w, m, m) - np.outer(mu, mu) + np.diag(w @ s**2)
    return gm, sch, base, sr, mu, cov, sr_fn


def _moment_errors(x, mu, cov):
    """Max |mean - mu| and |cov - Sigma| in units of their sampling standard errors."""
    n = x.shape[0]
    se_mean = np.sqrt(np.diag(cov) / n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    return np.max(np.abs(x.mean(0) - mu) / se_mean), np.max(np.abs(np.cov(x.T) - cov) / se_cov)


@pytest.mark.parametrize("mode, level", [("non_truncated", 0.0), ("non_truncated", 0.3), ("truncated", 0.3)])
def test_cascade_samples_the_data_distribution(exact, mode, level):
    """Base -> augmentation -> SR composes to p(x) exactly, whatever the level: z_s | y is the
    forward process and the SR model is the exact x | z_s. The errors are z-scores (max over the
    16 means and 136 covariances)."""
    gm, sch, base, sr, mu, cov, _ = exact
    outs = cascade.cascade([base, sr.replace(aug_level=level)], N, jax.random.key(0), aug_mode=mode, return_all=True,
                           batch_size=N)
    assert outs[0].shape == (N, 2, 2, 1) and outs[1].shape == (N, 4, 4, 1)
    mean_z, cov_z = _moment_errors(np.asarray(outs[1], np.float64).reshape(N, -1), mu, cov)
    assert mean_z < 4.5 and cov_z < 4.5, (mean_z, cov_z)


def test_cascade_with_a_model_told_the_wrong_level_fails_the_same_check(exact):
    """The check above can fail: an SR model told the image is clean (s = -1) while it was noised
    to a = 0.3 gives the wrong covariance (measured: a z-score of ~250)."""
    gm, sch, base, sr, mu, cov, sr_fn = exact

    def told_clean(x, t, cond):
        return sr_fn(x, t, {**cond, "aug_level": jnp.full_like(cond["aug_level"], -1.0)})

    x = cascade.cascade([base, sr.replace(aug_level=0.3, params=jax.tree_util.Partial(told_clean))], N,
                        jax.random.key(0), batch_size=N)
    _, cov_z = _moment_errors(np.asarray(x, np.float64).reshape(N, -1), mu, cov)
    assert cov_z > 10.0, cov_z


def test_super_resolve_samples_the_exact_posterior_and_is_consistent(exact):
    """One SR stage on given low-resolution images at a = 0: samples follow x | y (closed form),
    and downsample(SR(y)) = y (the posterior lives on A x = y; mean abs error reported)."""
    gm, sch, base, sr, mu, cov, _ = exact
    A = testing.downsample_matrix((4, 4, 1), 2)
    x, _ = gm.sample(jax.random.key(3), 6)
    y = (np.asarray(x).reshape(6, -1) @ A.T).reshape(6, 2, 2, 1).astype(np.float32)
    reps = 600
    up = np.asarray(cascade.super_resolve(sr, np.repeat(y, reps, 0), jax.random.key(1), batch_size=6 * reps), np.float64)
    consistency = np.abs(np.asarray(cascade.downsample(jnp.asarray(up), 2)) - np.repeat(y, reps, 0)).mean()
    assert consistency < 1e-4, consistency  # measured ~1e-7
    lw, m, c = testing.super_resolution_posterior(gm, jnp.asarray(y), jnp.ones(6), jnp.zeros(6), 2)
    w, m, c = np.exp(np.asarray(lw, np.float64)), np.asarray(m, np.float64), np.asarray(c, np.float64)
    pm = np.einsum("bk,bkd->bd", w, m)
    pc = np.einsum("bk,bkde->bde", w, c) + np.einsum("bk,bkd,bke->bde", w, m, m) - np.einsum("bd,be->bde", pm, pm)
    up = up.reshape(6, reps, -1)
    for b in range(6):
        # The posterior is degenerate along A x = y (zero variance): score the other directions.
        evals, evecs = np.linalg.eigh(pc[b])
        keep = evals > 1e-4
        proj = up[b] @ evecs[:, keep]
        mean_z, cov_z = _moment_errors(proj, pm[b] @ evecs[:, keep], np.diag(evals[keep]))
        assert mean_z < 4.5 and cov_z < 4.5, (b, mean_z, cov_z)


def test_cascade_is_deterministic_per_key_and_labels_reach_class_conditional_stages(exact):
    gm, sch, base, sr, *_ = exact
    a = cascade.cascade([base, sr.replace(aug_level=0.1)], 8, jax.random.key(4))
    b = cascade.cascade([base, sr.replace(aug_level=0.1)], 8, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    c = cascade.cascade([base, sr.replace(aug_level=0.1)], 8, jax.random.key(5))
    assert np.abs(a - c).max() > 0.1


# ---------------------------------------------------------------------------
# Bad input to the Python API: refused before anything compiles
# ---------------------------------------------------------------------------


def test_cascade_refuses_bad_stages(exact):
    gm, sch, base, sr, *_ = exact
    with pytest.raises(ValueError, match=r"stages\[1\]: the stage before makes 2x2x1 images but this SR model takes "
                                         r"4x4x1 \(its output 8x8 / factor 2\)"):
        cascade.cascade([base, sr.replace(image_shape=(8, 8, 1))], 4, jax.random.key(0))
    with pytest.raises(ValueError, match=r"stages\[1\].aug_level: expected a fraction of the schedule in \[0, 1\], got 1.2"):
        cascade.cascade([base, sr.replace(aug_level=1.2)], 4, jax.random.key(0))
    with pytest.raises(ValueError, match=r"stages\[0\]: expected a base stage \(factor 0\)"):
        cascade.cascade([sr], 4, jax.random.key(0))
    with pytest.raises(ValueError, match=r"stages\[1\].module: expected an SR network"):
        cascade.cascade([base, sr.replace(module=FnModule())], 4, jax.random.key(0))
    with pytest.raises(ValueError, match=r"aug_mode: 'truncated' hands stage 0's z_s to stage 1, which needs one forward process"):
        cascade.cascade([base.replace(schedule=schedules.linear(200)), sr.replace(aug_level=0.2)], 4, jax.random.key(0),
                        aug_mode="truncated")
    with pytest.raises(ValueError, match=r"aug_mode: expected one of \('non_truncated', 'truncated'\), got 'cut'"):
        cascade.cascade([base, sr], 4, jax.random.key(0), aug_mode="cut")
    with pytest.raises(ValueError, match=r"stages\[1\].schedule: expected a discrete jdiff.schedules.Schedule"):
        cascade.cascade([base, sr.replace(schedule=schedules.flow())], 4, jax.random.key(0))
    with pytest.raises(ValueError, match=r"low_res: expected images \[N, 2, 2, 1\] \(the SR model's input: its 4x4 "
                                         r"output / factor 2\), got shape \(3, 4, 4, 1\)"):
        cascade.super_resolve(sr, np.zeros((3, 4, 4, 1), np.float32), jax.random.key(0))
    with pytest.raises(ValueError, match=r"stage.aug_level: expected a fraction of the schedule in \[0, 1\], got -0.1"):
        cascade.super_resolve(sr.replace(aug_level=-0.1), np.zeros((3, 2, 2, 1), np.float32), jax.random.key(0))
    with pytest.raises(ValueError, match=r"labels: expected 4 int labels"):
        cascade.cascade([base, sr], 4, jax.random.key(0), labels=np.zeros(3, np.int32))


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def _fake_workdir(path, config):
    """A workdir's config.json without training: launch.sample checks its flags against it before
    it reads any checkpoint."""
    from jdiff.train.checkpoint import Checkpointer

    Checkpointer(str(path)).write_experiment(config)
    return str(path)


CLI_CASES = [
    ("aug-level-range", ["--workdir", "{b}", "--sr_workdir", "{s}", "--aug_level", "1.5"],
     r"--aug_level: expected fractions of the schedule in \[0, 1\], got \[1.5\]"),
    ("aug-level-count", ["--workdir", "{b}", "--sr_workdir", "{s}", "--aug_level", "0.1", "--aug_level", "0.2"],
     r"--aug_level: expected one value or one per SR stage \(1\), got 2"),
    ("base-size", ["--workdir", "{f}", "--sr_workdir", "{s}"],
     r"--sr_workdir .*: takes 14x14x1 images \(28x28 / factor 2\), but --workdir makes 28x28x1"),
    ("not-sr", ["--workdir", "{b}", "--sr_workdir", "{b}"], r"--sr_workdir .*: expected a super-resolution workdir"),
    ("low-res-size", ["--workdir", "{s}", "--low_res", "{d}/img28.png"],
     r"--low_res: expected an image of the SR model's input size 14x14 \(its 28x28 output / factor 2\), got 28x28"),
    ("sr-without-low-res", ["--workdir", "{s}"], r"--low_res: this is a super-resolution model"),
    ("low-res-and-sr", ["--workdir", "{s}", "--low_res", "{d}/img14.png", "--sr_workdir", "{s}"],
     r"--low_res, --sr_workdir: expected one of them"),
    ("sr-base", ["--workdir", "{s}", "--sr_workdir", "{s}"], r"--workdir: expected a base model"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """{case id: (launch.sample's exit code, its stderr, the XLA compiles meanwhile, its --out path)}."""
    d = tmp_path_factory.mktemp("cascade_cli")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(d / "img28.png")
    Image.fromarray(np.zeros((14, 14), np.uint8)).save(d / "img14.png")
    c28 = fashion_mnist_base14.get_config("small")
    c28.data.resolution = None  # a base stage that makes 28x28 images
    dirs = {"b": _fake_workdir(d / "base14", fashion_mnist_base14.get_config("small")),
            "s": _fake_workdir(d / "sr", fashion_mnist_sr.get_config("small")),
            "f": _fake_workdir(d / "base28", c28), "d": str(d)}
    outs = {case_id: d / "out" / case_id / "x.png" for case_id, _, _ in CLI_CASES}
    argvs = [[a.format(**dirs) for a in args] + ["--out", str(outs[case_id])] for case_id, args, _ in CLI_CASES]
    results = run_commands("launch.sample", argvs, timeout=600)
    return {case_id: (*res, outs[case_id]) for (case_id, _, _), res in zip(CLI_CASES, results, strict=True)}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_refuses_bad_cascades(case, cli_runs):
    case_id, _, match = case
    returncode, stderr, compiled, out = cli_runs[case_id]
    assert returncode != 0, stderr[-2000:]
    assert re.search(match, stderr), stderr[-2000:]
    assert compiled == 0, f"{compiled} XLA compiles before the error"
    assert not out.parent.exists(), f"{out} was written"


@pytest.mark.slow  # two tiny training runs and three launch.sample processes
def test_a_cascade_trains_and_samples_through_the_command_line(tmp_path):
    """configs/fashion_mnist_base14.py:small and configs/fashion_mnist_sr.py:small train through
    launch.train; launch.sample runs the cascade (both augmentation modes) and --low_res."""
    def run(*args):
        r = forked.run_module(*args, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    base, sr = str(tmp_path / "base"), str(tmp_path / "sr")
    trains = [forked.popen_module("launch.train", "--config", cfg, "--workdir", w)
              for cfg, w in (("configs/fashion_mnist_base14.py:small", base), ("configs/fashion_mnist_sr.py:small", sr))]
    for p in trains:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    out = tmp_path / "x.npz"
    run("launch.sample", "--workdir", base, "--sr_workdir", sr, "--aug_level", "0.1", "--label", "3", "--num", "4",
        "--out", str(out))
    with np.load(out) as z:
        assert z["samples"].shape == (4, 28, 28, 1) and np.isfinite(z["samples"]).all()
        np.testing.assert_array_equal(z["labels"], [3, 3, 3, 3])
    run("launch.sample", "--workdir", base, "--sr_workdir", sr, "--aug_mode", "truncated", "--aug_level", "0.2",
        "--num", "3", "--sr_steps", "2", "--out", str(tmp_path / "t.png"))
    assert Image.open(tmp_path / "t.png").size[0] >= 28
    full, _ = fashion_mnist.load_fashion_mnist_sample()
    low = np.asarray(cascade.downsample(jnp.asarray(full[:1]), 2))[0, ..., 0]
    Image.fromarray(np.round((low + 1) * 127.5).astype(np.uint8)).save(tmp_path / "low.png")
    run("launch.sample", "--workdir", sr, "--low_res", str(tmp_path / "low.png"), "--num", "2", "--out", str(tmp_path / "up.npz"))
    with np.load(tmp_path / "up.npz") as z:
        assert z["samples"].shape == (2, 28, 28, 1) and np.isfinite(z["samples"]).all()


def test_samples_conditioned_on_test_images_get_their_labels(monkeypatch):
    """evaluate_loaded (and the training grids) condition an SR model on test images' low-
    resolution copies: each sample must be asked for its own image's class, not a balanced one."""
    from jdiff.evaluation import workdir as eval_workdir
    from jdiff.workdir import Loaded

    c = fashion_mnist_sr.get_config("small")
    model = network.build_model(c)
    loaded = Loaded(c, model, None, config_lib.make_schedule(c), (28, 28, 1), 0)
    seen = {}

    def fake_generate(module, params, schedule, image_shape, num, key, *, labels=None, cond=None, **kw):
        seen.update(labels=labels, cond=cond)
        return np.zeros((num,) + tuple(image_shape), np.float32)

    monkeypatch.setattr(eval_workdir, "generate", fake_generate)
    eval_workdir.evaluate_loaded(loaded, 12, jax.random.key(0), evaluator="")  # no scoring: sampling only
    assert seen == {}  # nothing sampled without an evaluator
    eval_workdir.evaluate_loaded(loaded, 12, jax.random.key(0), evaluator="fashion_mnist_sample")
    images, labels = fashion_mnist.load_fashion_mnist_sample()
    np.testing.assert_array_equal(seen["labels"], labels[:12])
    assert seen["cond"]["image"].shape == (12, 28, 28, 1) and seen["cond"]["aug_level"].shape == (12,)
