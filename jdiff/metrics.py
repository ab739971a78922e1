"""Sample-quality metrics on a feature network: FID, Inception Score, precision/recall.

Everything here is pure JAX and jit-able. Computation runs in the inputs' floating dtype
(at least float32); with ``jax.enable_x64`` on, float64 inputs give a float64 path.
Matrix products use ``Precision.HIGHEST`` because on TPU the default float32 matmul passes
through bfloat16, far too coarse for covariances and nearest-neighbour distances.

Feature network. The metrics take features and class probabilities, not images. A
feature network is any callable satisfying :class:`FeatureNet`::

    features_fn(images [B, H, W, C] in [-1, 1]) -> (features [B, D], logits [B, K])

(for digits, the classifier trained by jdiff; for natural images, Inception-v3 pool3 and
logits where those weights are available). Accumulate ``features`` with
:func:`update` into a :class:`FeatureStats` for FID, collect ``softmax(logits)`` for
:func:`inception_score`, and keep a few thousand ``features`` for :func:`precision_recall`.

References:
  Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local
    Nash equilibrium" (FID, eq. 6 / sec. 3).
  Salimans et al. 2016, "Improved techniques for training GANs" (Inception Score, sec. 4).
  Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing generative
    models" (k-NN manifolds, eqs. 1-3).
  Chan, Golub & LeVeque 1979 / Welford 1962 (pairwise update of mean and co-moment).
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FeatureNet",
    "frechet_distance",
    "frechet_distance_from_stats",
    "FeatureStats",
    "init",
    "update",
    "merge",
    "merge_stacked",
    "all_reduce",
    "mean_cov",
    "inception_score",
    "precision_recall",
    "class_accuracy",
    "seam_gradient",
]

_HIGHEST = jax.lax.Precision.HIGHEST


@runtime_checkable
class FeatureNet(Protocol):
    """A feature network: ``(images [B, H, W, C] in [-1, 1]) -> (features [B, D], logits [B, K])``.

    ``features`` feed FID and precision/recall, ``logits`` feed the Inception Score (after
    softmax) and :func:`class_accuracy`. Params are closed over, e.g.
    ``functools.partial(model.apply, params)`` wrapped to return the two arrays.
    """

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]: ...


# --------------------------------------------------------------------------- helpers


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def _check_real(name: str, x) -> None:
    dtype = _dtype(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{name}: expected a real (float or integer) array, got dtype {dtype}")


def _dtype(x) -> np.dtype:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _float_dtype(*arrays) -> jnp.dtype:
    """The computation dtype: float64 if an input is float64 and x64 is enabled, else float32.

    Integer and half-precision inputs compute in float32; a float64 input without x64
    enabled is truncated to float32 like everywhere else in JAX.
    """
    wide = any(
        jnp.issubdtype(d, jnp.floating) and jax.dtypes.canonicalize_dtype(d) == jnp.float64
        for d in (_dtype(a) for a in arrays)
    )
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _check_int(name: str, value, low: int, high: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected a Python int{what}, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an int in {bound}{what}, got {value}")
    return int(value)


def _fraction(hits: jax.Array, dtype) -> jax.Array:
    """count(hits) / len(hits), correctly rounded: all hits give exactly 1.

    XLA rewrites a division by a constant into a multiplication by its reciprocal, and
    n * fl(1 / n) is not 1 for every n (61 in float32); the barrier keeps the true division.
    """
    count = jnp.sum(hits, dtype=jnp.int32).astype(dtype)
    return count / jax.lax.optimization_barrier(jnp.asarray(hits.shape[0], dtype))


# --------------------------------------------------------------------------- FID


def _check_gaussian(mu_name: str, mu, sigma_name: str, sigma) -> int:
    _check_real(mu_name, mu)
    _check_real(sigma_name, sigma)
    if len(_shape(mu)) != 1:
        raise ValueError(f"{mu_name}: expected a mean of shape [D], got shape {_shape(mu)}")
    d = _shape(mu)[0]
    if _shape(sigma) != (d, d):
        raise ValueError(f"{sigma_name}: expected a covariance of shape [{d}, {d}] (D from {mu_name}), got shape {_shape(sigma)}")
    if d == 0:
        raise ValueError(f"{mu_name}: expected D >= 1 features, got shape {_shape(mu)}")
    if _is_concrete(mu) and not np.all(np.isfinite(np.asarray(mu, dtype=np.float64))):
        raise ValueError(f"{mu_name}: expected a finite mean, got {int(np.sum(~np.isfinite(np.asarray(mu, np.float64))))} "
                         f"non-finite entries of {d}")
    if _is_concrete(sigma):
        s = np.asarray(sigma, dtype=np.float64)
        scale = np.max(np.abs(s))
        asym = np.max(np.abs(s - s.T))
        # Rounding leaves a covariance symmetric to ~eps * scale; eigh would silently read one
        # triangle of a genuinely non-symmetric matrix, so reject those by value here.
        if not np.isfinite(scale) or asym > 1e-4 * scale:
            raise ValueError(
                f"{sigma_name}: expected a finite symmetric covariance matrix, got max |S - S^T| = {asym:.3g} "
                f"with max |S| = {scale:.3g}"
            )
    return d


def _sqrt_psd(s: jax.Array) -> jax.Array:
    w, v = jnp.linalg.eigh(s)
    # Eigenvalues of a PSD matrix come out of eigh as small negatives by rounding; clip them.
    return jnp.matmul(v * jnp.sqrt(jnp.maximum(w, 0.0)), v.T, precision=_HIGHEST)


@jax.jit
def _frechet_distance(mu1, sigma1, mu2, sigma2):
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    # (S1 S2)^{1/2} is similar to (S1^{1/2} S2 S1^{1/2})^{1/2}, a symmetric PSD matrix, so its
    # trace is real: the sum of the roots of the eigenvalues of X^T X with X = S2^{1/2} S1^{1/2},
    # i.e. the singular values of X. Taking them from an SVD of X rather than from eigh of
    # X^T X keeps small ones to eps ||X|| instead of sqrt(eps ||X^T X||): identical
    # rank-deficient covariances then give ~0 instead of -0.1 at D = 64 in float32. Neither
    # path needs the non-symmetric scipy.linalg.sqrtm or produces its imaginary parts.
    x = jnp.matmul(_sqrt_psd(sigma2), _sqrt_psd(sigma1), precision=_HIGHEST)
    tr_covmean = jnp.sum(jnp.linalg.svd(x, compute_uv=False))
    diff = mu1 - mu2
    return jnp.dot(diff, diff, precision=_HIGHEST) + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * tr_covmean


def frechet_distance(mu1: jax.Array, sigma1: jax.Array, mu2: jax.Array, sigma2: jax.Array) -> jax.Array:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}),

    with Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})), evaluated as the sum
    of the singular values of S2^{1/2} S1^{1/2}; the square roots of S1 and S2 come from
    symmetric eigendecompositions with rounding's tiny negative eigenvalues clipped to 0.
    Rank-deficient covariances (fewer samples than features) need no epsilon offset.

    Args:
      mu1, mu2: means, [D].
      sigma1, sigma2: symmetric PSD covariances, [D, D].

    Returns:
      A scalar in the inputs' float dtype (float32, or float64 with x64 enabled). Rounding
      can leave it slightly negative for (near-)identical Gaussians. With a rank-deficient
      covariance the square root is not Lipschitz at zero eigenvalues, so float32 inputs
      give ~sqrt(float32 eps) relative accuracy there; use x64 when that matters.
    """
    _check_gaussian("mu1", mu1, "sigma1", sigma1)
    d = _check_gaussian("mu2", mu2, "sigma2", sigma2)
    if _shape(mu1) != (d,):
        raise ValueError(f"mu1: expected shape [{d}] to match mu2, got {_shape(mu1)}")
    dtype = _float_dtype(mu1, sigma1, mu2, sigma2)
    return _frechet_distance(*(jnp.asarray(a, dtype) for a in (mu1, sigma1, mu2, sigma2)))


# --------------------------------------------------------------------------- streaming statistics


@flax.struct.dataclass
class FeatureStats:
    """Running mean and co-moment of a stream of feature vectors.

    ``count`` [] int32 (vectors seen), ``mean`` [D] and ``m2`` [D, D] (the centred co-moment
    sum_i (x_i - mean)(x_i - mean)^T) in the stats' float dtype. Keeping the centred moment
    instead of sum x x^T avoids the cancellation of E[x x^T] - mean mean^T in float32 when
    features have a large mean. A pytree: it passes through ``jit``, ``lax.scan`` and
    collectives.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array

    @property
    def dim(self) -> int:
        """D, the feature dimension (the last axis of ``mean``)."""
        return self.mean.shape[-1]


def init(dim: int, dtype=jnp.float32) -> FeatureStats:
    """Empty statistics for ``dim``-dimensional features (count 0, mean 0, m2 0)."""
    dim = _check_int("dim", dim, 1)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    return FeatureStats(count=jnp.zeros((), jnp.int32), mean=jnp.zeros((dim,), dtype), m2=jnp.zeros((dim, dim), dtype))


def _check_stats(name: str, stats) -> None:
    if not isinstance(stats, FeatureStats):
        raise ValueError(f"{name}: expected a FeatureStats (from metrics.init), got {type(stats).__name__}")
    mean_shape = _shape(stats.mean)
    if len(mean_shape) != 1 or _shape(stats.m2) != mean_shape * 2 or _shape(stats.count) != ():
        raise ValueError(
            f"{name}: expected count [], mean [D], m2 [D, D], got {_shape(stats.count)}, {_shape(stats.mean)}, {_shape(stats.m2)}"
        )


@jax.jit
def _merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    dtype = a.mean.dtype
    na = a.count.astype(dtype)
    nb = b.count.astype(dtype)
    n = na + nb
    # Two empty stats merge to empty; the guard keeps 0/0 out of the graph.
    safe_n = jnp.where(n > 0, n, 1.0)
    delta = b.mean.astype(dtype) - a.mean
    mean = a.mean + delta * (nb / safe_n)
    # Chan et al. 1979: M2 = M2_a + M2_b + delta delta^T n_a n_b / n.
    m2 = a.m2 + b.m2.astype(dtype) + jnp.outer(delta, delta) * ((na / safe_n) * nb)
    return FeatureStats(count=a.count + b.count.astype(a.count.dtype), mean=mean, m2=m2)


def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Statistics of the union of two streams (Chan, Golub & LeVeque 1979, pairwise update).

    Exact in exact arithmetic and independent of the order of merging; either side may be
    empty. The result has ``a``'s dtype.
    """
    _check_stats("a", a)
    _check_stats("b", b)
    if a.dim != b.dim:
        raise ValueError(f"b: expected statistics of dimension {a.dim} (like a), got {b.dim}")
    return _merge(a, b)


def update(stats: FeatureStats, features: jax.Array, mask: jax.Array | None = None) -> FeatureStats:
    """Add a batch of feature vectors to ``stats``.

    The batch's own mean and centred co-moment are computed first and then merged with
    :func:`merge`, so accuracy does not degrade as the count grows.

    Args:
      stats: running statistics of dimension D.
      features: [B, D] (B may differ from call to call; each B compiles once under jit).
      mask: optional [B] bool; rows where it is False are ignored (padding of a last,
        partial batch so that every batch keeps one shape).
    """
    _check_stats("stats", stats)
    _check_real("features", features)
    shape = _shape(features)
    if len(shape) != 2 or shape[1] != stats.dim:
        raise ValueError(f"features: expected shape [B, {stats.dim}] (D from stats), got {shape}")
    if mask is not None:
        mask_dtype = _dtype(mask)
        if _shape(mask) != (shape[0],) or mask_dtype != np.bool_:
            raise ValueError(f"mask: expected a bool array of shape [{shape[0]}], got {mask_dtype} {_shape(mask)}")
    if shape[0] == 0:
        return stats
    return _update(stats, jnp.asarray(features).astype(stats.mean.dtype), None if mask is None else jnp.asarray(mask))


@jax.jit
def _update(stats: FeatureStats, x: jax.Array, mask: jax.Array | None) -> FeatureStats:
    if mask is None:
        count = jnp.asarray(x.shape[0], jnp.int32)
        batch_mean = jnp.mean(x, axis=0)
        centred = x - batch_mean
        weighted = centred
    else:
        w = mask.astype(x.dtype)
        count = jnp.sum(mask, dtype=jnp.int32)
        batch_mean = jnp.matmul(w, x, precision=_HIGHEST) / jnp.maximum(jnp.sum(w), 1.0)
        centred = x - batch_mean
        weighted = centred * w[:, None]
    m2 = jnp.matmul(weighted.T, centred, precision=_HIGHEST)
    return _merge(stats, FeatureStats(count=count.astype(stats.count.dtype), mean=batch_mean, m2=m2))


def _combine(stats: FeatureStats, total) -> FeatureStats:
    # sum_i [M2_i + n_i (mean_i - mean)(mean_i - mean)^T] is the co-moment of the union.
    dtype = stats.mean.dtype
    count = total(stats.count)
    n_i = stats.count.astype(dtype)
    n = count.astype(dtype)
    mean = total(n_i[..., None] * stats.mean) / jnp.where(n > 0, n, 1.0)
    delta = stats.mean - mean
    m2 = total(stats.m2 + n_i[..., None, None] * delta[..., :, None] * delta[..., None, :])
    return FeatureStats(count=count, mean=mean, m2=m2)


_merge_stacked = jax.jit(functools.partial(_combine, total=lambda x: jnp.sum(x, axis=0)))


def merge_stacked(stats: FeatureStats) -> FeatureStats:
    """Merge statistics stacked along a leading axis (count [P], mean [P, D], m2 [P, D, D]).

    For statistics gathered from processes, e.g. with
    ``jax.experimental.multihost_utils.process_allgather``.
    """
    if not isinstance(stats, FeatureStats):
        raise ValueError(f"stats: expected a FeatureStats, got {type(stats).__name__}")
    c, m, s = _shape(stats.count), _shape(stats.mean), _shape(stats.m2)
    if len(c) != 1 or len(m) != 2 or m[0] != c[0] or s != (m[0], m[1], m[1]):
        raise ValueError(f"stats: expected count [P], mean [P, D], m2 [P, D, D], got {c}, {m}, {s}")
    return _merge_stacked(stats)


def all_reduce(stats: FeatureStats, axis_name) -> FeatureStats:
    """Merge per-device statistics across a named mapped axis (``shard_map``, ``pmap``, ``vmap``).

    Uses ``lax.psum`` over ``axis_name``: every device gets the statistics of the union.
    """
    _check_stats("stats", stats)
    return _combine(stats, lambda x: jax.lax.psum(x, axis_name))


def mean_cov(stats: FeatureStats, ddof: int = 1) -> tuple[jax.Array, jax.Array]:
    """Mean [D] and covariance [D, D] = m2 / (count - ddof).

    ``ddof=1`` (the default) is the unbiased estimate, matching ``np.cov`` and the reference
    FID code. Raises ValueError if a concrete count is not larger than ``ddof``.
    """
    _check_stats("stats", stats)
    ddof = _check_int("ddof", ddof, 0)
    if _is_concrete(stats.count) and int(stats.count) <= ddof:
        raise ValueError(f"stats: expected more than ddof={ddof} feature vectors, got count {int(stats.count)}")
    n = stats.count.astype(stats.mean.dtype)
    return stats.mean, stats.m2 / (n - ddof)


def frechet_distance_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> jax.Array:
    """FID between two feature streams: :func:`frechet_distance` of their means and covariances."""
    mu1, sigma1 = mean_cov(stats1)
    mu2, sigma2 = mean_cov(stats2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# --------------------------------------------------------------------------- Inception Score


def _check_probs(name: str, probs) -> tuple[int, int]:
    _check_real(name, probs)
    shape = _shape(probs)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name}: expected class probabilities of shape [N, K] with N, K >= 1, got {shape}")
    if _is_concrete(probs):
        p = np.asarray(probs)
        k = shape[1]
        eps = np.finfo(_float_dtype(probs)).eps
        # A float softmax sums to 1 within a few ulps per class.
        tol = 1e-5 + 10 * k * eps
        sums = p.sum(axis=1, dtype=np.float64)
        if not np.all(np.isfinite(p)) or p.min() < 0 or np.max(np.abs(sums - 1.0)) > tol:
            raise ValueError(
                f"{name}: expected rows of non-negative probabilities summing to 1 (apply softmax to logits), "
                f"got min {p.min():.3g}, row sums in [{sums.min():.6g}, {sums.max():.6g}]"
            )
    return shape


@functools.partial(jax.jit, static_argnames=("num_splits",))
def _inception_score(probs, num_splits):
    n = probs.shape[0]
    scores = []
    for i in range(num_splits):
        part = probs[i * n // num_splits : (i + 1) * n // num_splits]
        marginal = jnp.mean(part, axis=0, keepdims=True)
        # xlogy gives 0 log 0 = 0; a class with marginal 0 has p(y|x) = 0 on every row.
        kl = jnp.sum(jax.scipy.special.xlogy(part, part) - jax.scipy.special.xlogy(part, marginal), axis=1)
        scores.append(jnp.exp(jnp.mean(kl)))
    scores = jnp.stack(scores)
    return jnp.mean(scores), jnp.std(scores)


def inception_score(probs: jax.Array, num_splits: int = 1) -> tuple[jax.Array, jax.Array]:
    """Inception Score IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, sec. 4).

    ``p(y)`` is the mean of ``p(y|x)`` over each split. As in the reference code, the N rows
    are cut into ``num_splits`` contiguous parts ``[i N // s, (i + 1) N // s)``, the score is
    computed per part, and the mean and (population, ddof=0) standard deviation are returned.

    Args:
      probs: [N, K] class probabilities p(y|x) (softmax of a classifier's logits).
      num_splits: number of parts, 1 <= num_splits <= N.

    Returns:
      ``(mean, std)`` scalars. IS ranges from 1 (every row the same) to K (confident rows
      with a uniform marginal).
    """
    n, _ = _check_probs("probs", probs)
    num_splits = _check_int("num_splits", num_splits, 1, n, " (at most N, the number of rows of probs)")
    return _inception_score(jnp.asarray(probs, _float_dtype(probs)), num_splits)


# --------------------------------------------------------------------------- precision / recall


def _sq_dists(queries: jax.Array, points: jax.Array) -> jax.Array:
    """Squared Euclidean distances [Q, P] via ||q||^2 + ||p||^2 - 2 q.p (one matmul)."""
    qq = jnp.sum(queries * queries, axis=1)
    pp = jnp.sum(points * points, axis=1)
    d2 = qq[:, None] + pp[None, :] - 2.0 * jnp.matmul(queries, points.T, precision=_HIGHEST)
    return jnp.maximum(d2, 0.0)


def _chunked(fn, queries: jax.Array, chunk_size: int) -> jax.Array:
    """Apply ``fn(chunk [C, D], start) -> [C]`` over row chunks of ``queries`` with ``lax.map``.

    Only one [C, P] distance block is live at a time, so N = M = 10^4 fits in memory.
    """
    q = queries.shape[0]
    c = min(chunk_size, q)
    num_chunks = -(-q // c)
    padded = jnp.pad(queries, ((0, num_chunks * c - q), (0, 0)))
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * c
    out = jax.lax.map(lambda args: fn(*args), (padded.reshape(num_chunks, c, -1), starts))
    return out.reshape(-1)[:q]


def _knn_sq_radii(points: jax.Array, k: int, chunk_size: int) -> jax.Array:
    """Squared distance from each point to its k-th nearest other point, [N]."""
    n = points.shape[0]

    def radii(chunk, start):
        d2 = _sq_dists(chunk, points)
        # Exclude each point from its own neighbours by index, not by a zero distance: an
        # exact duplicate elsewhere in the set is a genuine neighbour at distance 0.
        is_self = (start + jnp.arange(chunk.shape[0]))[:, None] == jnp.arange(n)[None, :]
        d2 = jnp.where(is_self, jnp.inf, d2)
        rows = jnp.arange(d2.shape[0])

        # k - 1 passes that each strike out one nearest point (one occurrence, so tied
        # distances count once each), then a min: O(k C N), against lax.top_k's full sort
        # on CPU (13x slower at N = 10^4, k = 3).
        def strike_nearest(_, d2):
            return d2.at[rows, jnp.argmin(d2, axis=1)].set(jnp.inf)

        return jnp.min(jax.lax.fori_loop(0, k - 1, strike_nearest, d2), axis=1)

    return _chunked(radii, points, chunk_size)


def _fraction_inside(queries: jax.Array, centres: jax.Array, sq_radii: jax.Array, chunk_size: int) -> jax.Array:
    def inside(chunk, start):
        del start
        # Closed balls (<=), as in Kynkaanniemi et al. 2019, eq. 1.
        return jnp.any(_sq_dists(chunk, centres) <= sq_radii[None, :], axis=1)

    return _fraction(_chunked(inside, queries, chunk_size), queries.dtype)


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _precision_recall(real, fake, k, chunk_size):
    # Distances are translation invariant; centring shrinks ||q||^2 + ||p||^2 - 2 q.p's terms,
    # and with them its cancellation error, when features share a large offset.
    real_mean = jnp.mean(real, axis=0)
    real_sq_radii = _knn_sq_radii(real - real_mean, k, chunk_size)
    fake_sq_radii = _knn_sq_radii(fake - jnp.mean(fake, axis=0), k, chunk_size)
    precision = _fraction_inside(fake - real_mean, real - real_mean, real_sq_radii, chunk_size)
    recall = _fraction_inside(real - real_mean, fake - real_mean, fake_sq_radii, chunk_size)
    return precision, recall


def precision_recall(
    real_features: jax.Array, fake_features: jax.Array, k: int = 3, chunk_size: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019, eqs. 1-3).

    Each real point phi_r carries a closed ball of radius ||phi_r - NN_k(phi_r)||, its
    distance to its k-th nearest *other* real point (itself excluded by index, so duplicates
    count as neighbours at distance 0). ``precision`` is the fraction of fake points inside at
    least one real ball; ``recall`` is the fraction of real points inside at least one fake
    ball, the fake balls built the same way from the fake set.

    Args:
      real_features: [N, D].
      fake_features: [M, D].
      k: neighbourhood size, 1 <= k <= min(N, M) - 1 (the paper uses 3).
      chunk_size: rows per block of the pairwise-distance computation; memory is
        O(chunk_size * max(N, M)).

    Returns:
      ``(precision, recall)`` scalars in [0, 1].
    """
    _check_real("real_features", real_features)
    _check_real("fake_features", fake_features)
    rs, fs = _shape(real_features), _shape(fake_features)
    if len(rs) != 2 or rs[0] < 2 or rs[1] < 1:
        raise ValueError(f"real_features: expected shape [N, D] with N >= 2, D >= 1, got {rs}")
    if len(fs) != 2 or fs[0] < 2 or fs[1] != rs[1]:
        raise ValueError(f"fake_features: expected shape [M, {rs[1]}] with M >= 2 (D from real_features), got {fs}")
    k = _check_int("k", k, 1, min(rs[0], fs[0]) - 1, f" (at most min(N, M) - 1 = {min(rs[0], fs[0]) - 1})")
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    dtype = _float_dtype(real_features, fake_features)
    return _precision_recall(jnp.asarray(real_features, dtype), jnp.asarray(fake_features, dtype), k, chunk_size)


# --------------------------------------------------------------------------- accuracy


def class_accuracy(logits_or_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax class equals the label.

    Args:
      logits_or_probs: [N, K] logits or probabilities (argmax is the same for both).
      labels: [N] int class indices in [0, K).

    Returns:
      A float32 scalar in [0, 1].
    """
    _check_real("logits_or_probs", logits_or_probs)
    shape = _shape(logits_or_probs)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"logits_or_probs: expected shape [N, K] with N, K >= 1, got {shape}")
    labels_dtype = _dtype(labels)
    if not jnp.issubdtype(labels_dtype, jnp.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {labels_dtype}")
    if _shape(labels) != (shape[0],):
        raise ValueError(f"labels: expected shape [{shape[0]}] (N from logits_or_probs), got {_shape(labels)}")
    if _is_concrete(labels):
        values = np.asarray(labels)
        if values.min() < 0 or values.max() >= shape[1]:
            raise ValueError(f"labels: expected class indices in [0, {shape[1]}), got min {values.min()}, max {values.max()}")
    predicted = jnp.argmax(jnp.asarray(logits_or_probs), axis=1)
    return _fraction(predicted == jnp.asarray(labels), jnp.float32)


def seam_gradient(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean absolute difference between 4-neighbour pixels on opposite sides of the mask border:
    (1 / |S|) sum_{(p, q) in S} mean_c |x_p - x_q|, S = {horizontally or vertically adjacent
    p, q with m_p != m_q}, per image. A visible seam of a completion raises it above the same
    measure on real images with the same mask (an inpainting seam measure, e.g. Lugmayr et al.
    2022 judge seams by eye; this is the number).

    Args: x [B, H, W, C]; mask [B or 1, H, W, 1] of 0/1 (1 = known). Returns [B] (NaN for an
    image whose mask has no border).
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected images [B, H, W, C], got shape {x.shape}")
    m = jnp.broadcast_to(jnp.asarray(mask, x.dtype), x.shape[:-1] + (1,))
    total = count = 0.0
    for dx, dm in ((x[:, 1:] - x[:, :-1], m[:, 1:] != m[:, :-1]), (x[:, :, 1:] - x[:, :, :-1], m[:, :, 1:] != m[:, :, :-1])):
        border = dm[..., 0].astype(x.dtype)  # vertical, then horizontal neighbour pairs
        total = total + jnp.sum(border * jnp.mean(jnp.abs(dx), axis=-1), axis=(1, 2))
        count = count + jnp.sum(border, axis=(1, 2))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
