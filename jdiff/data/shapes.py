"""Procedural "shapes": one coloured disc, square or triangle per image, with exact masks.

Cheap ground truth for class conditioning (the label is the shape type), inpainting and
ControlNet (the mask), and super-resolution: a scene is drawn in image-relative
coordinates, so the same seed gives the same scene at every resolution.

Each example is drawn from 7 uniforms (one row of ``rng.random((N, 7))``, so the first k
examples of N are those of k):
  label      floor(3 u0): 0 disc, 1 square, 2 triangle
  size h     0.2 + 0.2 u3, the half-extent as a fraction of the image side: disc radius,
             square half-side, or circumradius of an upright equilateral triangle
  centre     (h + (1 - 2h) u1, h + (1 - 2h) u2) as (x, y), so the shape lies inside
  colour     HSV (u4, 0.6 + 0.4 u5, 0.6 + 0.4 u6) -> RGB, never black
on a black background. A pixel (row i, column j) belongs to the shape when its centre
((j + 0.5) / R, (i + 0.5) / R) does; there is no anti-aliasing, so the mask is exactly
the set of pixels whose colour differs from the background. At R >= 8 every shape covers
at least one pixel centre (its inscribed circle has radius >= 0.1 R >= 0.8 > sqrt(2) / 2).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["SHAPE_NAMES", "ShapeParams", "shape_params", "render_shapes", "shapes", "inside_shape"]

SHAPE_NAMES = ("disc", "square", "triangle")
"""The shapes the generator draws, by label: a disc, an axis-aligned square and an upright triangle."""

MIN_RESOLUTION = 8
_UNIFORMS_PER_EXAMPLE = 7
_MIN_SIZE, _MAX_SIZE = 0.2, 0.4
# Rendering works on this many examples at a time to bound the [n, R, R] temporaries.
_CHUNK = 1024


class ShapeParams(NamedTuple):
    """Scene parameters in image-relative units (the image is [0, 1]^2, y pointing down).

    labels: int32 [N] index into SHAPE_NAMES. centers: float64 [N, 2] as (x, y).
    sizes: float64 [N] half-extents. colors: float64 [N, 3] RGB in [0, 1].
    """

    labels: np.ndarray
    centers: np.ndarray
    sizes: np.ndarray
    colors: np.ndarray


def _check_num_examples(num_examples: int) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"num_examples: expected a non-negative int, got {num_examples!r}")


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution: expected an int >= {MIN_RESOLUTION}, got {resolution!r}")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The standard hexcone model (as colorsys.hsv_to_rgb), vectorised.
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))],
        axis=0,
    )
    return table[i, np.arange(h.shape[0])]


def shape_params(num_examples: int, seed: int | Sequence[int]) -> ShapeParams:
    """Draw the parameters of ``num_examples`` scenes from ``np.random.default_rng(seed)``.

    Args:
      num_examples: N >= 0.
      seed: a non-negative int or sequence of them (a ``np.random.SeedSequence`` entropy).
    """
    _check_num_examples(num_examples)
    if seed is None:  # SeedSequence(None) would draw fresh OS entropy: not reproducible
        raise ValueError("seed: expected a non-negative int or a sequence of them, got None")
    try:
        rng = np.random.default_rng(np.random.SeedSequence(seed))
    except (TypeError, ValueError) as e:
        raise ValueError(f"seed: expected a non-negative int or a sequence of them, got {seed!r} ({e})") from None
    u = rng.random((num_examples, _UNIFORMS_PER_EXAMPLE))
    labels = np.minimum(np.floor(u[:, 0] * len(SHAPE_NAMES)), len(SHAPE_NAMES) - 1).astype(np.int32)
    sizes = _MIN_SIZE + (_MAX_SIZE - _MIN_SIZE) * u[:, 3]
    centers = sizes[:, None] + (1.0 - 2.0 * sizes[:, None]) * u[:, 1:3]
    colors = _hsv_to_rgb(u[:, 4], 0.6 + 0.4 * u[:, 5], 0.6 + 0.4 * u[:, 6])
    return ShapeParams(labels=labels, centers=centers, sizes=sizes, colors=colors)


def inside_shape(label: int, cx: np.ndarray, cy: np.ndarray, h: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether pixel centres (x, y) lie in shapes of type ``label`` (an index into SHAPE_NAMES)
    centred at (cx, cy) with half-extent h: broadcast together, e.g. cx, cy, h [n, 1, 1] and
    x [1, 1, R], y [1, R, 1] give [n, R, R] bool. Image-relative units, y pointing down."""
    dx, dy = x - cx, y - cy
    if label == 0:
        return dx**2 + dy**2 <= h**2
    if label == 1:
        return np.maximum(np.abs(dx), np.abs(dy)) <= h
    # Upright equilateral triangle as three half-planes at distance h/2 (the inradius) from
    # the centre, with outward normals pointing down, up-right and up-left (y points down).
    up = -dy
    sqrt3_2 = np.sqrt(3.0) / 2.0
    return (-up <= h / 2) & (sqrt3_2 * dx + up / 2 <= h / 2) & (-sqrt3_2 * dx + up / 2 <= h / 2)


def render_shapes(params: ShapeParams, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise scenes at ``resolution`` x ``resolution``.

    Returns:
      images: float32 [N, R, R, 3] in [-1, 1] (background exactly -1).
      labels: int32 [N] in 0..2 (see SHAPE_NAMES).
      masks: float32 [N, R, R, 1], 1 on the shape and 0 elsewhere.
    """
    _check_resolution(resolution)
    n = params.labels.shape[0]
    coords = (np.arange(resolution) + 0.5) / resolution
    x, y = coords[None, None, :], coords[None, :, None]
    images = np.empty((n, resolution, resolution, 3), np.float32)
    masks = np.empty((n, resolution, resolution, 1), np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        labels = params.labels[sl]
        inside = np.empty((labels.shape[0], resolution, resolution), bool)
        for label in range(len(SHAPE_NAMES)):
            group = labels == label
            cx, cy = (params.centers[sl][group, i, None, None] for i in (0, 1))
            inside[group] = inside_shape(label, cx, cy, params.sizes[sl][group, None, None], x, y)
        rgb = inside[..., None] * params.colors[sl, None, None, :]
        images[sl] = 2.0 * rgb - 1.0
        masks[sl] = inside[..., None]
    return images, params.labels.astype(np.int32), masks


def shapes(num_examples: int, resolution: int, seed: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num_examples`` shapes images at ``resolution``; a pure function of its arguments.

    Returns (images float32 [N, R, R, 3] in [-1, 1], labels int32 [N], masks float32
    [N, R, R, 1] in {0, 1}); see the module docstring for the distribution.
    """
    _check_resolution(resolution)
    return render_shapes(shape_params(num_examples, seed), resolution)
