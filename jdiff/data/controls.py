"""Control images for ControlNet (Zhang et al. 2023) and how well samples follow them.

A control image is a deterministic function of a data image, so the same function makes the
training pairs, the sample grids' controls and the adherence measurement:

  ``"canny"``  Canny edges (Canny 1986; ``skimage.feature.canny``) of the image's luminance in
               [0, 1]: ``[N, H, W, 1]`` float32, 1 on an edge, 0 elsewhere (the paper's
               "Canny edge" condition).
  ``"mask"``   the shapes generator's object mask, recovered exactly from the image (a pixel
               belongs to the shape iff its colour differs from the black background,
               :mod:`jdiff.data.shapes`): ``[N, H, W, 1]`` float32 in {0, 1} (the paper's
               segmentation-map condition, with one class).

Adherence: :func:`edge_f1` (Canny of a sample against the control edges, with a pixel
tolerance, as edge-detection benchmarks score, Martin et al. 2004) and :func:`mask_iou`
(the generated shape's mask against the control mask). All host-side NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CONTROL_KINDS", "DEFAULT_CANNY_SIGMA", "canny", "mask", "control_images", "from_config",
           "edge_f1", "mask_iou", "shape_mask"]

CONTROL_KINDS = ("canny", "mask")
"""The control images :func:`control_images` computes (``config.data.control``): ``canny`` edges and
the shapes' ``mask``."""

DEFAULT_CANNY_SIGMA = 1.5
"""The Gaussian width (pixels) of :func:`canny`'s smoothing: on 28x28 Fashion-MNIST, 1.0 keeps
texture speckle; 1.5 keeps outlines and folds."""

# A generated pixel belongs to the shape when its brightest channel exceeds this ([-1, 1] scale):
# shapes' colours have HSV value >= 0.6, i.e. a channel >= 0.2, and the background is -1.
SHAPE_THRESHOLD = -0.4


def _check_images(images: Any, name: str = "images") -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected float images [N, H, W, C] in [-1, 1], got shape {x.shape} dtype {x.dtype}")
    return x


def canny(images: Any, sigma: float = DEFAULT_CANNY_SIGMA) -> np.ndarray:
    """Canny edges of ``images`` ``[N, H, W, C]`` in [-1, 1]: ``[N, H, W, 1]`` float32 in {0, 1}.

    Colour images are reduced to their channel mean; ``skimage.feature.canny`` then runs on the
    [0, 1] luminance with Gaussian width ``sigma`` and its default hysteresis thresholds
    (0.1 and 0.2 of the [0, 1] range on the gradient magnitude)."""
    from skimage import feature

    x = _check_images(images)
    if not (isinstance(sigma, (int, float, np.floating)) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a positive Canny Gaussian width, got {sigma!r}")
    lum = (np.clip(x.mean(axis=-1), -1.0, 1.0) + 1.0) / 2.0
    edges = np.stack([feature.canny(im.astype(np.float64), sigma=float(sigma)) for im in lum])
    return edges[..., None].astype(np.float32)


def shape_mask(images: Any, threshold: float = SHAPE_THRESHOLD) -> np.ndarray:
    """``[N, H, W]`` bool: pixels whose brightest channel exceeds ``threshold`` (not background)."""
    return _check_images(images).max(axis=-1) > threshold


def mask(images: Any) -> np.ndarray:
    """The object mask of shapes images ``[N, H, W, 3]``: ``[N, H, W, 1]`` float32 in {0, 1}."""
    return shape_mask(images)[..., None].astype(np.float32)


def control_images(kind: str, images: Any, **kwargs) -> np.ndarray:
    """The ``kind`` control image (:data:`CONTROL_KINDS`) of each image: ``[N, H, W, 1]`` float32."""
    if kind == "canny":
        return canny(images, **kwargs)
    if kind == "mask":
        if kwargs:
            raise ValueError(f"kwargs: the 'mask' control takes none, got {sorted(kwargs)}")
        return mask(images)
    raise ValueError(f"kind: expected one of {CONTROL_KINDS}, got {kind!r}")


def from_config(data: Any, images: Any) -> np.ndarray:
    """The control images a config's data section asks for (``data.control`` with
    ``data.control_kwargs``; a dict or ConfigDict) of ``images``."""
    kwargs = data.get("control_kwargs", None) or {}
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
    return control_images(data.get("control", ""), images, **kwargs)


def _dilate(e: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of ``[N, H, W]`` by a (2r+1)^2 square."""
    if r == 0:
        return e
    p = np.pad(e, ((0, 0), (r, r), (r, r)))
    H, W = e.shape[1:]
    out = np.zeros_like(e)
    for di in range(2 * r + 1):
        for dj in range(2 * r + 1):
            out |= p[:, di:di + H, dj:dj + W]
    return out


def _binary_pair(pred: Any, target: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Two ``[N, H, W(, 1)]`` maps as bool ``[N, H, W]`` (> 0.5), or a ValueError."""
    p, t = (np.asarray(a) > 0.5 for a in (pred, target))
    p, t = (a[..., 0] if a.ndim == 4 else a for a in (p, t))
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred, target: expected two [N, H, W] {what} of one shape, got {p.shape} and {t.shape}")
    return p, t


def edge_f1(pred: Any, target: Any, tolerance: int = 1) -> dict:
    """Edge adherence of predicted edges to target edges, both ``[N, H, W(, 1)]`` in {0, 1}.

    precision = (predicted edge pixels within ``tolerance`` pixels (Chebyshev) of a target
    edge) / (predicted edge pixels); recall the same the other way round; F1 their harmonic
    mean. Returns the pooled ``{"precision", "recall", "f1"}`` over all N images and the
    per-image mean ``"f1_mean"`` (an image with no edges in either scores 1)."""
    p, t = _binary_pair(pred, target, "edge maps")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
        raise ValueError(f"tolerance: expected a non-negative int (pixels), got {tolerance!r}")
    tp_p = (p & _dilate(t, tolerance)).sum(axis=(1, 2))
    tp_t = (t & _dilate(p, tolerance)).sum(axis=(1, 2))
    n_p, n_t = p.sum(axis=(1, 2)), t.sum(axis=(1, 2))
    prec = tp_p.sum() / max(n_p.sum(), 1)
    rec = tp_t.sum() / max(n_t.sum(), 1)
    f1 = 2 * prec * rec / max(prec + rec, 1e-12)
    pi = np.where(n_p > 0, tp_p / np.maximum(n_p, 1), 1.0)
    ri = np.where(n_t > 0, tp_t / np.maximum(n_t, 1), 1.0)
    fi = np.where(pi + ri > 0, 2 * pi * ri / np.maximum(pi + ri, 1e-12), 0.0)
    return {"precision": float(prec), "recall": float(rec), "f1": float(f1), "f1_mean": float(fi.mean())}


def mask_iou(pred: Any, target: Any) -> dict:
    """Intersection over union of binary masks ``[N, H, W(, 1)]``: pooled ``"iou"`` (sum of
    intersections / sum of unions) and the per-image mean ``"iou_mean"`` (empty vs empty = 1)."""
    p, t = _binary_pair(pred, target, "masks")
    inter = (p & t).sum(axis=(1, 2))
    union = (p | t).sum(axis=(1, 2))
    per = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"iou": float(inter.sum() / max(union.sum(), 1)), "iou_mean": float(per.mean())}
