"""Tests for jdiff.metrics: FID, streaming feature statistics, Inception Score, precision/recall.

Every metric is checked against a float64 NumPy/SciPy transcription written here, and on
inputs whose answer is known in closed form or by hand.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jdiff import metrics

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- references


def fid_scipy(mu1, sigma1, mu2, sigma2):
    """Heusel et al. 2017 with scipy.linalg.sqrtm, as in the reference TTUR/pytorch-fid code."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    tr_covmean = np.trace(covmean)
    # S1 S2 is similar to a PSD matrix: its trace root is real up to sqrtm's own rounding.
    assert abs(tr_covmean.imag) <= 1e-6 * max(1.0, abs(tr_covmean.real))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean.real


def fid_from_factors(mu1, a, mu2, b):
    """The same distance for S1 = A A^T, S2 = B B^T, without any matrix square root.

    The non-zero eigenvalues of A A^T B B^T are those of (B^T A)^T (B^T A), so
    Tr((S1 S2)^{1/2}) is the nuclear norm of B^T A: exact in float64 even when both
    covariances are rank-deficient, where sqrtm loses half its digits.
    """
    diff = mu1 - mu2
    tr_covmean = np.linalg.svd(b.T @ a, compute_uv=False).sum()
    return diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * tr_covmean


def fid_tolerance(eps, a, b, mu1, mu2):
    """First-order error bound of any backward-stable FID computation at precision ``eps``.

    Rounding perturbs S1^{1/2} S2 S1^{1/2} by delta ~ eps ||S1|| ||S2||; an eigenvalue lambda
    then moves by up to delta (Weyl), so sqrt(lambda) moves by min(sqrt(delta),
    delta / (2 sqrt(lambda))): a zero eigenvalue (rank deficiency) costs sqrt(delta), an
    ill-conditioned one delta / (2 sqrt(lambda)). The traces and the sum cost a few ulps.
    """
    s1, s2 = a @ a.T, b @ b.T
    d = s1.shape[0]
    sv = np.linalg.svd(b.T @ a, compute_uv=False)
    lam = np.zeros(d)
    lam[: min(d, sv.size)] = sv[:d] ** 2
    delta = 4 * eps * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    per_eig = np.where(lam > 0, delta / (2 * np.sqrt(np.where(lam > 0, lam, 1.0))), np.inf)
    base = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    return 4 * eps * base + 2 * np.sum(np.minimum(np.sqrt(delta), per_eig))


def cov_stats_numpy(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_score_numpy(probs, splits):
    """Transcription of Salimans et al. 2016's reference code (improved-gan, inception_score.py)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    n = probs.shape[0]
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        py = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return np.mean(scores), np.std(scores)


def precision_recall_numpy(real, fake, k):
    """Brute-force k-NN manifolds (Kynkaanniemi et al. 2019) with explicit distances."""
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)

    def radii(x):
        d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d_fake_real = np.linalg.norm(fake[:, None, :] - real[None, :, :], axis=-1)
    precision = np.mean(np.any(d_fake_real <= radii(real)[None, :], axis=1))
    recall = np.mean(np.any(d_fake_real.T <= radii(fake)[None, :], axis=1))
    return precision, recall


# --------------------------------------------------------------------------- Fréchet distance

# (D, rank of S1, rank of S2): full rank; one or both rank-deficient (fewer samples than
# features, the usual FID situation at small N); a square factor (full rank, ill-conditioned).
FID_CASES = [(1, 4, 4), (1, 1, 3), (3, 9, 9), (3, 1, 9), (3, 2, 1), (16, 37, 37), (16, 8, 37), (16, 8, 5), (64, 133, 133), (64, 32, 20), (64, 64, 64)]


def _factor_case(d, r1, r2, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, r1)) / np.sqrt(r1)
    b = 1.7 * rng.normal(size=(d, r2)) / np.sqrt(r2)
    mu1 = rng.normal(size=d)
    mu2 = mu1 + 0.3 * rng.normal(size=d)
    return mu1, a, mu2, b


@pytest.mark.parametrize("d,r1,r2", FID_CASES)
def test_frechet_distance_float32_matches_scipy(d, r1, r2):
    mu1, a, mu2, b = _factor_case(d, r1, r2, seed=d * 1000 + r1 * 10 + r2)
    s1, s2 = a @ a.T, b @ b.T
    reference = fid_from_factors(mu1, a, mu2, b)
    # The two float64 references agree to float64 accuracy (sqrtm to its sqrt(eps) limit).
    np.testing.assert_allclose(fid_scipy(mu1, s1, mu2, s2), reference, rtol=0, atol=fid_tolerance(EPS64, a, b, mu1, mu2))
    inputs = [np.asarray(x, np.float32) for x in (mu1, s1, mu2, s2)]
    got = metrics.frechet_distance(*inputs)
    assert got.dtype == jnp.float32
    chex.assert_shape(got, ())
    np.testing.assert_allclose(float(got), reference, rtol=0, atol=fid_tolerance(EPS32, a, b, mu1, mu2))


@pytest.mark.parametrize("d,r1,r2", FID_CASES)
def test_frechet_distance_float64_path(d, r1, r2):
    mu1, a, mu2, b = _factor_case(d, r1, r2, seed=d * 1000 + r1 * 10 + r2)
    s1, s2 = a @ a.T, b @ b.T
    with jax.enable_x64(True):
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
        assert got.dtype == jnp.float64
        got = float(got)
    np.testing.assert_allclose(got, fid_from_factors(mu1, a, mu2, b), rtol=0, atol=fid_tolerance(EPS64, a, b, mu1, mu2))


def test_frechet_distance_commuting_closed_form():
    # Diagonal covariances commute: Tr(S1 + S2 - 2 (S1 S2)^{1/2}) = sum_i (sqrt(a_i) - sqrt(b_i))^2,
    # here with zero variances (rank-deficient) in either matrix.
    a = np.array([0.0, 1.0, 4.0, 0.25, 9.0, 0.0])
    b = np.array([1.0, 1.0, 0.0, 2.25, 4.0, 0.0])
    mu1 = np.array([0.0, 1.0, -2.0, 0.5, 3.0, 1.0])
    mu2 = np.array([1.0, 1.0, 0.0, 0.5, -1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    tol = fid_tolerance(EPS32, np.diag(np.sqrt(a)), np.diag(np.sqrt(b)), mu1, mu2)
    np.testing.assert_allclose(float(got), expected, rtol=0, atol=tol)
    # In one dimension: (m1 - m2)^2 + (s1 - s2)^2.
    got_1d = metrics.frechet_distance(np.array([0.5]), np.array([[4.0]]), np.array([-1.0]), np.array([[0.25]]))
    np.testing.assert_allclose(float(got_1d), 1.5**2 + 1.5**2, rtol=1e-6)


@pytest.mark.parametrize("d,rank", [(1, 1), (8, 20), (8, 3), (64, 150), (64, 10)])
def test_frechet_distance_identical_gaussians_is_zero(d, rank):
    rng = np.random.default_rng(d + rank)
    a = rng.normal(size=(d, rank)) / np.sqrt(rank)
    mu = 5.0 * rng.normal(size=d)
    sigma = (a @ a.T).astype(np.float32)
    got = float(metrics.frechet_distance(mu.astype(np.float32), sigma, mu.astype(np.float32), sigma))
    # Tr((S S)^{1/2}) is the sum of the singular values of S^{1/2} S^{1/2} = S, each within a few
    # ulps of lambda_i(S), so the four Tr(S)-sized terms cancel to ~16 ulps each, even for a
    # rank-deficient S: no sqrt(eps) loss here (the eigenvalues of S^{1/2} S S^{1/2} = S^2 would
    # leave ~ -0.1 at D = 64).
    assert abs(got) <= 4 * 16 * EPS32 * np.trace(sigma.astype(np.float64)), got


def test_frechet_distance_from_stats_end_to_end():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 2.0
    y = rng.normal(size=(200, 6)) * 1.5 - 1.0
    stats_x = metrics.update(metrics.init(6), x.astype(np.float32))
    stats_y = metrics.update(metrics.init(6), y.astype(np.float32))
    got = metrics.frechet_distance_from_stats(stats_x, stats_y)
    expected = fid_scipy(*cov_stats_numpy(x.astype(np.float32)), *cov_stats_numpy(y.astype(np.float32)))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), "mu1: expected a mean of shape"),
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), r"sigma1: expected a covariance of shape \[2, 2\]"),
        ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), r"mu1: expected shape \[3\]"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.ones((2, 3))), "sigma2: expected a covariance"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]])), "sigma2: expected a finite symmetric"),
        ((np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2)), "sigma1: expected a finite symmetric"),
        ((np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0))), "mu1: expected D >= 1"),
        ((np.zeros(2, complex), np.eye(2), np.zeros(2), np.eye(2)), "mu1: expected a real"),
    ],
)
def test_frechet_distance_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.frechet_distance(*args)


# --------------------------------------------------------------------------- streaming statistics


@pytest.fixture(scope="module")
def features():
    """[103, 5] features with a large common offset, rounded to float32 (the input we feed)."""
    rng = np.random.default_rng(0)
    x = 100.0 + rng.normal(size=(103, 5)) * np.array([0.5, 1.0, 2.0, 1.0, 0.7]) @ np.triu(np.ones((5, 5)))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def jit_update():
    return jax.jit(metrics.update)


def _stats_tolerances(x):
    # A float32 pass sees each feature to eps * |x| once it is centred, so the mean carries a
    # few ulps of |x| and the covariance a few ulps of |x| * spread. Accumulating sum x x^T
    # instead would lose eps * |x|^2 -- a hundred times more at this offset.
    x = np.asarray(x, np.float64)
    big, spread = np.abs(x).max(), x.std(axis=0).max()
    return 4 * EPS32 * big, 16 * EPS32 * big * spread


def _assert_stats_match(stats, x):
    mean, cov = metrics.mean_cov(stats)
    ref_mean, ref_cov = cov_stats_numpy(x)
    mean_tol, cov_tol = _stats_tolerances(x)
    assert int(stats.count) == x.shape[0]
    chex.assert_shape(mean, ref_mean.shape)
    chex.assert_shape(cov, ref_cov.shape)
    np.testing.assert_allclose(np.asarray(mean, np.float64), ref_mean, rtol=0, atol=mean_tol)
    np.testing.assert_allclose(np.asarray(cov, np.float64), ref_cov, rtol=0, atol=cov_tol)


def test_update_uneven_batches_matches_numpy(features, jit_update):
    stats = metrics.init(5)
    for batch in np.split(features, [1, 18, 18, 58]):  # sizes 1, 17, 0, 40, 45
        stats = jit_update(stats, batch)
    _assert_stats_match(stats, features)
    assert stats.mean.dtype == jnp.float32 and stats.count.dtype == jnp.int32


def test_update_is_far_more_accurate_than_raw_moments(features):
    # The tolerance above must be able to fail: E[x x^T] - mean mean^T in float32 misses it.
    x = jnp.asarray(features)
    n = x.shape[0]
    mean = jnp.sum(x, 0) / n
    naive_cov = (x.T @ x - n * jnp.outer(mean, mean)) / (n - 1)
    _, cov_tol = _stats_tolerances(features)
    assert np.abs(np.asarray(naive_cov, np.float64) - np.cov(np.asarray(features, np.float64), rowvar=False)).max() > cov_tol


def test_merge_is_order_independent(features, jit_update):
    parts = np.split(features, [30, 31, 70])
    s = [jit_update(metrics.init(5), p) for p in parts]
    balanced = metrics.merge(metrics.merge(s[0], s[1]), metrics.merge(s[2], s[3]))
    reversed_chain = metrics.merge(metrics.merge(metrics.merge(s[3], s[2]), s[1]), s[0])
    with_empty = metrics.merge(metrics.init(5), metrics.merge(reversed_chain, metrics.init(5)))
    for stats in (balanced, reversed_chain, with_empty):
        _assert_stats_match(stats, features)
    # Merging two empty statistics stays empty and finite.
    empty = metrics.merge(metrics.init(5), metrics.init(5))
    assert int(empty.count) == 0
    assert np.all(np.asarray(empty.mean) == 0) and np.all(np.asarray(empty.m2) == 0)


def test_masked_update_ignores_padding(features, jit_update):
    rng = np.random.default_rng(1)
    mask = rng.random(features.shape[0]) < 0.6
    stats = jit_update(metrics.init(5), features, mask)
    _assert_stats_match(stats, features[mask])
    # An all-padding batch changes nothing.
    again = jit_update(stats, features, np.zeros(features.shape[0], bool))
    chex.assert_trees_all_close(again, stats, rtol=0, atol=0)


def test_all_reduce_and_merge_stacked(features):
    parts = features[:100].reshape(4, 25, 5)
    per_device = jax.jit(jax.vmap(metrics.update, in_axes=(None, 0)))(metrics.init(5), parts)
    chex.assert_shape(per_device.m2, (4, 5, 5))
    reduced = jax.jit(jax.vmap(functools.partial(metrics.all_reduce, axis_name="devices"), axis_name="devices"))(per_device)
    for i in range(4):
        _assert_stats_match(jax.tree_util.tree_map(lambda leaf: leaf[i], reduced), features[:100])
    _assert_stats_match(metrics.merge_stacked(per_device), features[:100])


def test_stats_float64_path(features):
    rng = np.random.default_rng(2)
    x = 1e3 + rng.normal(size=(57, 4))
    with jax.enable_x64(True):
        stats = metrics.init(4, dtype=jnp.float64)
        for batch in np.split(x, [5, 6, 40]):
            stats = metrics.update(stats, batch)
        mean, cov = metrics.mean_cov(stats)
        assert mean.dtype == jnp.float64 and cov.dtype == jnp.float64
        mean, cov = np.asarray(mean), np.asarray(cov)
    ref_mean, ref_cov = cov_stats_numpy(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=4 * EPS64 * 1e3)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=64 * EPS64 * 1e3 * 4)


def test_mean_cov_ddof():
    x = np.array([[0.0, 1.0], [2.0, 5.0], [4.0, 0.0]], np.float32)
    stats = metrics.update(metrics.init(2), x)
    _, cov0 = metrics.mean_cov(stats, ddof=0)
    np.testing.assert_allclose(np.asarray(cov0), np.cov(x.astype(np.float64), rowvar=False, ddof=0), rtol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.init(0), "dim: expected an int in"),
        (lambda: metrics.init(3, dtype=jnp.int32), "dtype: expected a floating dtype"),
        (lambda: metrics.update(metrics.init(3), np.zeros((4, 2))), r"features: expected shape \[B, 3\]"),
        (lambda: metrics.update(metrics.init(3), np.zeros(3)), r"features: expected shape \[B, 3\]"),
        (lambda: metrics.update(metrics.init(3), np.zeros((4, 3)), np.ones(4)), r"mask: expected a bool array of shape \[4\]"),
        (lambda: metrics.update(metrics.init(3), np.zeros((4, 3)), np.ones(5, bool)), r"mask: expected a bool array of shape \[4\]"),
        (lambda: metrics.update((0, np.zeros(3), np.zeros((3, 3))), np.zeros((4, 3))), "stats: expected a FeatureStats"),
        (lambda: metrics.merge(metrics.init(3), metrics.init(4)), "b: expected statistics of dimension 3"),
        (lambda: metrics.mean_cov(metrics.update(metrics.init(3), np.zeros((1, 3)))), "stats: expected more than ddof=1"),
        (lambda: metrics.mean_cov(metrics.init(3), ddof=-1), "ddof: expected an int in"),
        (lambda: metrics.merge_stacked(metrics.init(3)), r"stats: expected count \[P\]"),
    ],
)
def test_stats_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_one_hot_uniform_marginal_is_k():
    k = 5
    probs = np.eye(k, dtype=np.float32)[np.arange(20) % k]
    mean, std = metrics.inception_score(probs)
    np.testing.assert_allclose(float(mean), k, rtol=4 * EPS32)
    # Four splits of five rows: each still holds every class once.
    mean, std = metrics.inception_score(probs, num_splits=4)
    np.testing.assert_allclose(float(mean), k, rtol=4 * EPS32)
    assert float(std) <= 4 * EPS32 * k


def test_inception_score_identical_rows_is_one():
    row = np.array([0.1, 0.6, 0.0, 0.3], np.float32)
    mean, std = metrics.inception_score(np.tile(row, (12, 1)), num_splits=3)
    np.testing.assert_allclose(float(mean), 1.0, rtol=0, atol=4 * EPS32)
    assert float(std) <= 4 * EPS32


def test_inception_score_hand_computed():
    # p(y) = [3/4, 1/4]; KL(row 1) = log(4/3), KL(row 2) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3);
    # IS = exp(3/4 log(4/3)) = (4/3)^{3/4}.
    mean, std = metrics.inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]))
    np.testing.assert_allclose(float(mean), (4 / 3) ** 0.75, rtol=4 * EPS32)
    assert float(std) == 0.0


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_inception_score_matches_reference_code(num_splits):
    rng = np.random.default_rng(num_splits)
    probs = rng.dirichlet(np.full(10, 0.3), size=20).astype(np.float32)  # 20 rows: uneven splits
    probs /= probs.sum(axis=1, keepdims=True)
    mean, std = metrics.inception_score(probs, num_splits=num_splits)
    ref_mean, ref_std = inception_score_numpy(probs, num_splits)
    np.testing.assert_allclose(float(mean), ref_mean, rtol=1e-5)
    np.testing.assert_allclose(float(std), ref_std, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "probs,num_splits,match",
    [
        (np.full((4, 3), 0.5), 1, "probs: expected rows of non-negative probabilities summing to 1"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), 1, "probs: expected rows of non-negative"),
        (np.array([[np.nan, 1.0], [0.5, 0.5]]), 1, "probs: expected rows of non-negative"),
        (np.full(3, 1 / 3), 1, r"probs: expected class probabilities of shape \[N, K\]"),
        (np.full((4, 2), 0.5), 0, r"num_splits: expected an int in \[1, 4\]"),
        (np.full((4, 2), 0.5), 5, r"num_splits: expected an int in \[1, 4\]"),
        (np.full((4, 2), 0.5), 2.0, "num_splits: expected a Python int"),
    ],
)
def test_inception_score_bad_input(probs, num_splits, match):
    with pytest.raises(ValueError, match=match):
        metrics.inception_score(probs, num_splits=num_splits)


# --------------------------------------------------------------------------- precision / recall


@pytest.fixture(scope="module")
def point_clouds():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(61, 4)).astype(np.float32)
    fake = (0.8 * rng.normal(size=(45, 4)) + np.array([0.7, 0.0, 0.0, 0.3])).astype(np.float32)
    return real, fake


def test_precision_recall_identical_sets(point_clouds):
    real, _ = point_clouds
    precision, recall = metrics.precision_recall(real, real.copy(), k=3)
    assert (float(precision), float(recall)) == (1.0, 1.0)


def test_precision_recall_disjoint_sets(point_clouds):
    real, fake = point_clouds
    precision, recall = metrics.precision_recall(real, fake + 1000.0, k=3, chunk_size=7)
    assert (float(precision), float(recall)) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_fake_subset_of_real(point_clouds, k):
    real, _ = point_clouds
    fake = real[::3]
    precision, recall = metrics.precision_recall(real, fake, k=k)
    ref_precision, ref_recall = precision_recall_numpy(real, fake, k=k)
    assert ref_precision == 1.0 and 0.0 < ref_recall < 1.0  # the case is not degenerate
    assert float(precision) == 1.0
    np.testing.assert_allclose(float(recall), ref_recall, rtol=0, atol=0.5 / real.shape[0])


@pytest.mark.parametrize("k,chunk_size", [(1, 1024), (3, 7), (12, 16)])
def test_precision_recall_matches_brute_force(point_clouds, k, chunk_size):
    # chunk_size 7 and 16 divide neither 61 nor 45, so padded last chunks are exercised.
    real, fake = point_clouds
    precision, recall = metrics.precision_recall(real, fake, k=k, chunk_size=chunk_size)
    ref_precision, ref_recall = precision_recall_numpy(real, fake, k=k)
    assert 0.0 < ref_recall < 1.0  # the case is not degenerate
    np.testing.assert_allclose(float(precision), ref_precision, rtol=0, atol=0.5 / fake.shape[0])
    np.testing.assert_allclose(float(recall), ref_recall, rtol=0, atol=0.5 / real.shape[0])


def test_precision_recall_ties_and_duplicates():
    # Points on a grid of eighths: every distance below is exact in float32, so the closed
    # balls' boundaries (distance == radius) are hit exactly. Means are multiples of 1/8 too,
    # so centring stays exact.
    real = np.array([-3, -1, -1, 0, 0, 1, 1, 6], np.float32)[:, None]
    fake = np.array([-5, -4, -2, -1, 0.5, 2, 4, 4.5], np.float32)[:, None]
    # k = 1. Real radii: -3 -> 2; each duplicated -1, 0, 1 -> 0 (its twin, not itself); 6 -> 5.
    # Fakes inside: -5 (|-5 + 3| = 2 <= 2, on the boundary), -4, -2, -1 (0 <= 0 at a duplicate),
    # 2, 4, 4.5 (within 5 of 6); 0.5 is 0.5 from radius-0 points and outside the rest: 7/8.
    # Fake radii: -5, -4, -2, -1 -> 1; 0.5, 2 -> 1.5; 4, 4.5 -> 0.5. Reals inside: all but 6
    # (-3 is exactly 1 from -4, 0 exactly 1 from -1): 7/8.
    # Excluding self by zero distance would give duplicates radius 1 (precision 1); not
    # excluding it would give radius 0 everywhere (precision 1/8); open balls would give 5/8.
    precision, recall = metrics.precision_recall(real, fake, k=1, chunk_size=3)
    assert (float(precision), float(recall)) == (7 / 8, 7 / 8)
    assert precision_recall_numpy(real, fake, k=1) == (7 / 8, 7 / 8)
    # k = 2 has ties between the 1st and 2nd neighbour (e.g. -3's two neighbours at -1).
    precision, recall = metrics.precision_recall(real, fake, k=2, chunk_size=3)
    assert (float(precision), float(recall)) == precision_recall_numpy(real, fake, k=2)

    # Tied neighbours count once each: with k = 2, -4's neighbours are the two -1s at 3, so its
    # radius is 3, not 5 (the next distinct distance); -8.5 (4.5 away) is outside every real
    # ball (the -1s and 1s have radius 2, 4 has 3), and so is 8.5: precision 2/4.
    real = np.array([-4, -1, -1, 1, 1, 4], np.float32)[:, None]
    fake = np.array([-8.5, -1, 1, 8.5], np.float32)[:, None]
    precision, recall = metrics.precision_recall(real, fake, k=2)
    assert (float(precision), float(recall)) == (0.5, 1.0)
    assert precision_recall_numpy(real, fake, k=2) == (0.5, 1.0)


def test_precision_recall_float64_path(point_clouds):
    real, fake = (x.astype(np.float64) for x in point_clouds)
    with jax.enable_x64(True):
        precision, recall = metrics.precision_recall(real, fake, k=3, chunk_size=16)
        assert precision.dtype == jnp.float64
        got = (float(precision), float(recall))
    assert got == precision_recall_numpy(real, fake, k=3)


@pytest.mark.parametrize(
    "real_shape,fake_shape,kwargs,match",
    [
        ((10, 3), (10, 2), {}, r"fake_features: expected shape \[M, 3\]"),
        ((10,), (10,), {}, r"real_features: expected shape \[N, D\]"),
        ((1, 3), (10, 3), {}, r"real_features: expected shape \[N, D\] with N >= 2"),
        ((10, 3), (10, 3), {"k": 0}, r"k: expected an int in \[1, 9\]"),
        ((10, 3), (5, 3), {"k": 5}, r"k: expected an int in \[1, 4\]"),
        ((10, 3), (10, 3), {"k": 2.0}, "k: expected a Python int"),
        ((10, 3), (10, 3), {"chunk_size": 0}, "chunk_size: expected an int in"),
    ],
)
def test_precision_recall_bad_input(real_shape, fake_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        metrics.precision_recall(np.zeros(real_shape), np.zeros(fake_shape), **kwargs)


# --------------------------------------------------------------------------- class accuracy


def test_class_accuracy_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=50)
    labels[:20] = np.argmax(logits[:20], axis=1)
    expected = np.mean(np.argmax(logits, axis=1) == labels)
    assert float(metrics.class_accuracy(logits, labels)) == pytest.approx(expected, abs=1e-7)
    assert float(metrics.class_accuracy(jax.nn.softmax(logits), labels)) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (np.zeros((4, 3)), np.zeros(4, np.float32), "labels: expected integer class indices"),
        (np.zeros((4, 3)), np.zeros(5, int), r"labels: expected shape \[4\]"),
        (np.zeros((4, 3)), np.array([0, 1, 2, 3]), r"labels: expected class indices in \[0, 3\)"),
        (np.zeros((4, 3)), np.array([0, -1, 2, 2]), r"labels: expected class indices in \[0, 3\)"),
        (np.zeros(4), np.zeros(4, int), r"logits_or_probs: expected shape \[N, K\]"),
    ],
)
def test_class_accuracy_bad_input(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.class_accuracy(logits, labels)


# --------------------------------------------------------------------------- compiled and uncompiled


class CompiledTest(chex.TestCase):
    """Each public function gives the reference answer with and without an outer ``jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_frechet_distance(self):
        mu1, a, mu2, b = _factor_case(8, 20, 5, seed=11)
        inputs = [np.asarray(x, np.float32) for x in (mu1, a @ a.T, mu2, b @ b.T)]
        got = self.variant(metrics.frechet_distance)(*inputs)
        np.testing.assert_allclose(float(got), fid_from_factors(mu1, a, mu2, b), rtol=0, atol=fid_tolerance(EPS32, a, b, mu1, mu2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_update_mean_cov(self):
        rng = np.random.default_rng(12)
        x = rng.normal(size=(30, 3)).astype(np.float32)
        mask = np.arange(30) < 25

        def stats_of(batch_a, batch_b, mask_b):
            stats = metrics.update(metrics.update(metrics.init(3), batch_a), batch_b, mask_b)
            return metrics.mean_cov(stats)

        mean, cov = self.variant(stats_of)(x[:10], x[10:], mask[10:])
        ref_mean, ref_cov = cov_stats_numpy(x[:25])
        chex.assert_trees_all_close((mean, cov), (ref_mean.astype(np.float32), ref_cov.astype(np.float32)), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_inception_score(self):
        probs = np.random.default_rng(13).dirichlet(np.ones(4), size=9).astype(np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        got = self.variant(metrics.inception_score, static_argnames="num_splits")(probs, num_splits=2)
        np.testing.assert_allclose(np.asarray(got), inception_score_numpy(probs, 2), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_precision_recall(self):
        rng = np.random.default_rng(14)
        real = rng.normal(size=(20, 2)).astype(np.float32)
        fake = (rng.normal(size=(15, 2)) + 0.5).astype(np.float32)
        got = self.variant(metrics.precision_recall, static_argnames=("k", "chunk_size"))(real, fake, k=2, chunk_size=6)
        self.assertEqual(tuple(float(v) for v in got), precision_recall_numpy(real, fake, k=2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_class_accuracy(self):
        logits = np.array([[0.0, 2.0], [3.0, 1.0], [0.5, 0.4]], np.float32)
        got = self.variant(metrics.class_accuracy)(logits, np.array([1, 1, 0]))
        self.assertAlmostEqual(float(got), 2 / 3, places=6)
