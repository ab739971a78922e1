"""DreamBooth (Ruiz et al. 2023) for a class-conditional diffusion model.

The paper fine-tunes a text-to-image model on 3-5 images of one subject, bound to a rare
identifier ("a [V] dog"), with a class-specific prior-preservation loss (eq. 2):

    E_{x, c, eps, eps', t} [ w_t ||x_hat(alpha_t x + sigma_t eps, c) - x||^2
                             + lambda w_t' ||x_hat(alpha_t' x_pr + sigma_t' eps', c_pr) - x_pr||^2 ]

where x_pr are samples of the frozen pre-trained model for the class prompt c_pr ("a dog"),
generated once before fine-tuning. A class-conditional model has no words: the identifier is a
new class row of its label embedding, initialised from the subject's class row (so "[V]" starts
as "bag", as "a [V] bag" does; ``config.train.init_new_classes_from``), and c_pr is the class.

This module makes the fine-tuning set: the subject images (light augmentation: integer shifts
and horizontal flips) with the identifier label and loss weight 1, and the prior samples with the
class label and loss weight lambda, in equal numbers, so a shuffled batch is half each on average
and the train step's mean of ``loss_weight * loss`` is eq. 2 (lambda = 0: the subject alone).
The ``"arrays"`` dataset reads it; the ordinary train step trains on it (launch.finetune).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["load_subject", "augment", "finetune_arrays", "subject_fidelity"]


def load_subject(directory: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The subject's ``.png`` images in ``directory`` as ``[n, H, W, C]`` float32 in [-1, 1]
    (sorted by name; converted to grey for C = 1, RGB for C = 3). A missing folder, one without
    PNGs, or an image of another size is a ValueError naming the file."""
    if not isinstance(directory, str) or not os.path.isdir(directory):
        raise ValueError(f"subject: {directory!r} is not a directory; expected a folder of the subject's .png images")
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".png"))
    if not names:
        raise ValueError(f"subject: {directory!r} holds no .png image; expected 3-5 images of the subject")
    from PIL import Image

    h, w, c = image_shape
    out = []
    for n in names:
        path = os.path.join(directory, n)
        try:
            with Image.open(path) as im:
                x = np.asarray(im.convert("L" if c == 1 else "RGB"), np.float32)
        except OSError as e:
            raise ValueError(f"subject: cannot read {path!r} as a PNG image ({e})") from None
        if x.shape[:2] != (h, w):
            raise ValueError(f"subject: {path!r} is {x.shape[0]}x{x.shape[1]}; expected the model's size {h}x{w}")
        out.append((x.reshape(h, w, c) / 127.5 - 1.0).astype(np.float32))
    return np.stack(out)


def augment(images: np.ndarray, num: int, seed: int = 0, max_shift: int = 2, flip: bool = True,
            background: float = -1.0) -> np.ndarray:
    """``num`` light augmentations of ``images`` ``[n, H, W, C]``, cycling over them: the i-th is
    image ``i mod n`` shifted by integers (dy, dx) ~ U{-max_shift..max_shift} (uncovered pixels
    set to ``background``), flipped left-right with probability 1/2 if ``flip``. The first n are
    the images themselves."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or not len(x):
        raise ValueError(f"images: expected [n, H, W, C] with n > 0, got shape {x.shape}")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < len(x):
        raise ValueError(f"num: expected an int >= the {len(x)} images, got {num!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift: expected a non-negative int (pixels), got {max_shift!r}")
    rng = np.random.default_rng(seed)
    n, H, W, _ = x.shape
    out = np.empty((num,) + x.shape[1:], np.float32)
    out[:n] = x
    for i in range(n, num):
        img = x[i % n][:, ::-1] if flip and rng.random() < 0.5 else x[i % n]
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        canvas = np.full_like(img, background)
        ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
        xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
        canvas[yd, xd] = img[ys, xs]
        out[i] = canvas
    return out


def finetune_arrays(subject: np.ndarray, prior: np.ndarray, identifier: int, subject_class: int, num_classes: int,
                    prior_weight: float, seed: int = 0, max_shift: int = 2, flip: bool = True) -> dict[str, np.ndarray]:
    """The DreamBooth training set (module docstring) for the ``"arrays"`` dataset:
    ``{"image" [2P, H, W, C], "label" [2P], "loss_weight" [2P], "num_classes"}`` with P =
    len(prior): P augmentations of ``subject`` labelled ``identifier`` (weight 1), then the P
    ``prior`` samples labelled ``subject_class`` (weight ``prior_weight``, the paper's lambda)."""
    subject = np.asarray(subject, np.float32)
    prior = np.asarray(prior, np.float32)
    if prior.ndim != 4 or not len(prior) or prior.shape[1:] != subject.shape[1:]:
        raise ValueError(f"prior: expected [P, {', '.join(map(str, subject.shape[1:]))}] samples with P > 0, got shape "
                         f"{prior.shape}")
    if not (isinstance(prior_weight, (int, float)) and not isinstance(prior_weight, bool) and np.isfinite(prior_weight)
            and prior_weight >= 0):
        raise ValueError(f"prior_weight: expected a finite lambda >= 0, got {prior_weight!r}")
    if not 0 <= subject_class < num_classes or not 0 <= identifier < num_classes or identifier == subject_class:
        raise ValueError(f"identifier, subject_class: expected two different classes in [0, {num_classes}), got "
                         f"{identifier} and {subject_class}")
    p = len(prior)
    images = np.concatenate([augment(subject, max(p, len(subject)), seed, max_shift, flip)[:p], prior])
    labels = np.concatenate([np.full(p, identifier), np.full(p, subject_class)]).astype(np.int32)
    weights = np.concatenate([np.ones(p), np.full(p, float(prior_weight))]).astype(np.float32)
    return {"image": images, "label": labels, "loss_weight": weights, "num_classes": np.asarray(num_classes)}


def subject_fidelity(sample_features: np.ndarray, subject_features: np.ndarray, class_features: np.ndarray) -> dict:
    """How much samples look like the subject rather than like their class, in a feature space.

    ``d_subject``: mean distance from each sample to its nearest subject image; ``d_class``: mean
    distance from each sample to the other items of the class (a distance scale: ``ratio`` =
    d_subject / d_class, 1 = no closer to the subject than to a random item of the class);
    ``nn_subject``: the fraction of samples whose nearest neighbour among the subject images and
    the class items is a subject image (chance: n_subject / (n_subject + n_class)).
    Features are ``[N, D]`` arrays."""
    s = np.asarray(sample_features, np.float64)
    sub = np.asarray(subject_features, np.float64)
    cls = np.asarray(class_features, np.float64)

    def dists(a, b):
        return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0))

    ds, dc = dists(s, sub), dists(s, cls)
    d_subject = float(ds.min(1).mean())
    d_class = float(dc.mean())
    nn_subject = float((ds.min(1) < dc.min(1)).mean())
    return {"d_subject": d_subject, "d_class": d_class, "ratio": d_subject / d_class, "nn_subject": nn_subject}
