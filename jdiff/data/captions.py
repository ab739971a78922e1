"""Captioned scenes for text-to-image models: one or two shapes with discrete attributes, their
exact captions, and a fixed-vocabulary tokenizer with padding masks.

A scene holds one or two objects. Each object is drawn independently, with:
  colour    one of COLOUR_NAMES (saturated RGB, far apart);
  shape     one of SHAPE_NAMES (disc, square, upright triangle, as :mod:`jdiff.data.shapes` draws them);
  size      "small" (half-extent 0.12 of the image side) or "large" (0.2);
  position  a quadrant: "top left", "top right", "bottom left", "bottom right".
Two objects sit in different quadrants, so they never overlap. Each centre is its quadrant's
centre moved by at most 0.25 - h in x and y, so the object stays inside its quadrant. The
caption is built from these attributes. It lists the objects in quadrant order (top left first):
"a small red disc at the top left and a large blue square at the bottom right". The attributes
come back with the images, so any caption accuracy can be judged exactly. Pixels are rendered
exactly as in :mod:`jdiff.data.shapes` (no anti-aliasing, black background), at any resolution
>= 16 from the same scene.

Fashion-MNIST's class names give a second caption set (:func:`fashion_mnist_captions`).

:class:`Tokenizer` maps captions to int32 ids ``[N, L]`` and a bool mask ``[N, L]`` (True =
a real token). Id 0 is padding. An unknown word, an empty caption or one longer than
``max_length`` raises a ValueError naming it. Classifier-free guidance's null caption is
:meth:`Tokenizer.null`: every position masked.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

from jdiff.data.shapes import SHAPE_NAMES, inside_shape

__all__ = [
    "COLOUR_NAMES",
    "COLOURS",
    "SIZE_NAMES",
    "SIZES",
    "POSITION_NAMES",
    "FASHION_MNIST_CLASS_WORDS",
    "Scene",
    "scenes",
    "render_scenes",
    "captions",
    "parse_caption",
    "fashion_mnist_captions",
    "Tokenizer",
    "SHAPES_VOCABULARY",
    "FASHION_MNIST_VOCABULARY",
    "MIN_RESOLUTION",
    "CAPTIONED_DATASETS",
    "tokenizer_of",
]

COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
"""The objects' colour words, in the order of :data:`COLOURS` (a scene's ``colour`` indexes both)."""

COLOURS = np.array([(0.9, 0.1, 0.1), (0.1, 0.75, 0.15), (0.15, 0.3, 0.95), (0.95, 0.85, 0.1), (0.85, 0.15, 0.85),
                    (0.1, 0.85, 0.85)])
"""``[6, 3]`` RGB in [0, 1] of each of :data:`COLOUR_NAMES`: saturated and far apart, so a
sample's colour can be judged exactly; rendered to [-1, 1] on the black (-1) background."""

SIZE_NAMES = ("small", "large")
"""The objects' size words, in the order of :data:`SIZES`."""

SIZES = np.array([0.12, 0.2])
"""The half-extents of :data:`SIZE_NAMES`' objects, as fractions of the image side."""

POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right")
"""The four quadrants an object sits in, in caption order (top left first); two objects of a
scene never share one."""

_QUADRANT_CENTRES = np.array([(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)])  # (x, y), y down
MIN_RESOLUTION = 16
"""The smallest image side :func:`render_scenes` draws: a small triangle's inradius is 0.06 R, so
at 16 pixels it still covers pixel centres."""

MAX_OBJECTS = 2
FASHION_MNIST_CLASS_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                             "ankle boot")
"""Fashion-MNIST's classes as caption words, by label (the article of
:func:`fashion_mnist_captions` comes from the first letter)."""

_GLUE = ("a", "an", "and", "at", "the", "top", "bottom", "left", "right")
SHAPES_VOCABULARY = tuple(sorted(set(_GLUE) | set(COLOUR_NAMES) | set(SHAPE_NAMES) | set(SIZE_NAMES)))
"""The sorted vocabulary of the captioned-shapes captions: the colour, shape and size words and
the glue words ("a", "at", "the", "top", ...); the default of :class:`Tokenizer`."""

FASHION_MNIST_VOCABULARY = tuple(sorted({"a", "an"} | {w for name in FASHION_MNIST_CLASS_WORDS for w in name.split()}))
"""The sorted vocabulary of the Fashion-MNIST captions: "a", "an" and the words of the class names."""


class Scene(NamedTuple):
    """Scenes' attributes, per example and object slot (slot 1 is -1 / nan for one-object scenes).

    count: int32 [N], 1 or 2. colour, shape, size, position: int32 [N, 2] indices into
    COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES and POSITION_NAMES (objects in increasing position).
    centre: float64 [N, 2, 2] as (x, y) in image-relative units.
    """

    count: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    position: np.ndarray
    centre: np.ndarray


def scenes(num_examples: int, seed: int | Sequence[int], max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw ``num_examples`` scenes from ``np.random.default_rng(seed)``; a pure function of its
    arguments. ``max_objects`` 1 gives one object per scene, 2 one or two (each with probability 1/2)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"num_examples: expected a non-negative int, got {num_examples!r}")
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects: expected 1 or 2, got {max_objects!r}")
    if seed is None:
        raise ValueError("seed: expected a non-negative int or a sequence of them, got None")
    try:
        rng = np.random.default_rng(np.random.SeedSequence(seed))
    except (TypeError, ValueError) as e:
        raise ValueError(f"seed: expected a non-negative int or a sequence of them, got {seed!r} ({e})") from None
    n = num_examples
    count = np.where(rng.random(n) < 0.5, 1, 2) if max_objects == 2 else np.ones(n, np.int64)
    # Two distinct quadrants per scene, in increasing order (the caption's reading order).
    order = np.argsort(rng.random((n, len(POSITION_NAMES))), axis=1)[:, :MAX_OBJECTS]
    position = np.sort(order, axis=1)
    colour = rng.integers(0, len(COLOUR_NAMES), (n, MAX_OBJECTS))
    shape = rng.integers(0, len(SHAPE_NAMES), (n, MAX_OBJECTS))
    size = rng.integers(0, len(SIZE_NAMES), (n, MAX_OBJECTS))
    jitter = (rng.random((n, MAX_OBJECTS, 2)) * 2.0 - 1.0) * (0.25 - SIZES[size])[..., None]
    centre = _QUADRANT_CENTRES[position] + jitter
    absent = np.arange(MAX_OBJECTS)[None, :] >= count[:, None]
    for a in (colour, shape, size, position):
        a[absent] = -1
    centre[absent] = np.nan
    i32 = lambda a: a.astype(np.int32)  # noqa: E731
    return Scene(i32(count), i32(colour), i32(shape), i32(size), i32(position), centre)


def render_scenes(scene: Scene, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise scenes at ``resolution`` x ``resolution`` (>= 16).

    Returns:
      images: float32 [N, R, R, 3] in [-1, 1] (background exactly -1).
      masks: float32 [N, R, R, 2], object slot k's pixels in channel k (0 for an absent slot).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution: expected an int >= {MIN_RESOLUTION}, got {resolution!r}")
    n = len(scene.count)
    coords = (np.arange(resolution) + 0.5) / resolution
    x, y = coords[None, None, :], coords[None, :, None]
    rgb = np.zeros((n, resolution, resolution, 3))
    masks = np.zeros((n, resolution, resolution, MAX_OBJECTS), np.float32)
    for k in range(MAX_OBJECTS):
        for label in range(len(SHAPE_NAMES)):
            group = scene.shape[:, k] == label
            if not group.any():
                continue
            cx, cy = (scene.centre[group, k, i, None, None] for i in (0, 1))
            h = SIZES[scene.size[group, k]][:, None, None]
            inside = inside_shape(label, cx, cy, h, x, y)
            masks[group, ..., k] = inside
            colour = COLOURS[scene.colour[group, k]]
            rgb[group] = np.where(inside[..., None], colour[:, None, None, :], rgb[group])
    return (2.0 * rgb - 1.0).astype(np.float32), masks


def _object_phrase(colour: int, shape: int, size: int, position: int) -> str:
    return f"a {SIZE_NAMES[size]} {COLOUR_NAMES[colour]} {SHAPE_NAMES[shape]} at the {POSITION_NAMES[position]}"


def captions(scene: Scene) -> list[str]:
    """The caption of every scene: its objects' phrases in position order, joined by "and"."""
    out = []
    for i in range(len(scene.count)):
        phrases = [_object_phrase(scene.colour[i, k], scene.shape[i, k], scene.size[i, k], scene.position[i, k])
                   for k in range(int(scene.count[i]))]
        out.append(" and ".join(phrases))
    return out


_PHRASE = re.compile(r"a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) at the (?P<row>\w+) (?P<column>\w+)")


def parse_caption(text: str) -> list[dict[str, int]]:
    """The objects a shapes caption describes: a list of {"colour", "shape", "size", "position"}
    indices, the inverse of :func:`captions` (for prompts written by hand, too). Raises a
    ValueError naming the part that is not "a SIZE COLOUR SHAPE at the ROW COLUMN [and ...]"."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text: expected a caption such as 'a small red disc at the top left', got {text!r}")
    phrases = " ".join(text.lower().split()).split(" and ")
    if len(phrases) > MAX_OBJECTS:
        raise ValueError(f"text: {text!r} describes {len(phrases)} objects; expected at most {MAX_OBJECTS}")
    objects = []
    names = {"size": SIZE_NAMES, "colour": COLOUR_NAMES, "shape": SHAPE_NAMES}
    for phrase in phrases:
        m = _PHRASE.fullmatch(phrase)
        if m is None:
            raise ValueError(f"text: {phrase!r} (in {text!r}) is not 'a SIZE COLOUR SHAPE at the ROW COLUMN', "
                             f"e.g. 'a small red disc at the top left'")
        obj = {}
        for key, allowed in names.items():
            if m.group(key) not in allowed:
                raise ValueError(f"text: {m.group(key)!r} (in {text!r}) is not a {key}; expected one of {list(allowed)}")
            obj[key] = allowed.index(m.group(key))
        where = f"{m.group('row')} {m.group('column')}"
        if where not in POSITION_NAMES:
            raise ValueError(f"text: {where!r} (in {text!r}) is not a position; expected one of {list(POSITION_NAMES)}")
        obj["position"] = POSITION_NAMES.index(where)
        objects.append(obj)
    if len({o["position"] for o in objects}) != len(objects):
        raise ValueError(f"text: {text!r} puts two objects at the same position; expected different quadrants")
    return objects


def fashion_mnist_captions(labels: np.ndarray) -> list[str]:
    """"a t-shirt", ..., "an ankle boot" for Fashion-MNIST labels (ints in [0, 10))."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any() or (labels >= 10).any():
        raise ValueError(f"labels: expected a [N] int array of Fashion-MNIST classes in [0, 10), got "
                         f"shape {labels.shape} dtype {labels.dtype}")
    return [("an " if FASHION_MNIST_CLASS_WORDS[y][0] in "aeiou" else "a ") + FASHION_MNIST_CLASS_WORDS[y]
            for y in labels.tolist()]


class Tokenizer:
    """Whitespace tokenizer over a fixed vocabulary (lower-cased words). Id 0 is padding; word
    ``vocabulary[i]`` is id ``i + 1``.

    ``max_length`` (default 20) bounds a caption's words: a two-object shapes caption has 17.
    ``encode(texts) -> (ids int32 [N, max_length], mask bool [N, max_length])``, left-aligned,
    padded with 0 / False. ``null(n)`` is the null conditioning of classifier-free guidance
    (everything masked). ``decode(ids, mask)`` inverts ``encode``.
    """

    def __init__(self, vocabulary: Sequence[str] = SHAPES_VOCABULARY, max_length: int = 20):
        words = list(vocabulary)
        if not words or any(not isinstance(w, str) or not w or w != w.lower() or " " in w for w in words):
            raise ValueError(f"vocabulary: expected non-empty lower-case words without spaces, got {vocabulary!r}")
        if len(set(words)) != len(words):
            raise ValueError(f"vocabulary: expected distinct words, got duplicates in {vocabulary!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        self.vocabulary = tuple(words)
        self.max_length = int(max_length)
        self._ids = {w: i + 1 for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, padding included."""
        return len(self.vocabulary) + 1

    def encode(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 ``[N, max_length]`` and mask bool ``[N, max_length]`` (True = a word) of
        ``texts`` (one string or N), left-aligned and padded with 0 / False; a ValueError names an empty
        caption, one longer than ``max_length`` or an unknown word."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        ids = np.zeros((len(texts), self.max_length), np.int32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for n, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{n}]: expected a string, got {type(text).__name__}")
            words = text.lower().split()
            if not words:
                raise ValueError(f"texts[{n}]: the caption is empty; expected at least one word (classifier-free "
                                 "guidance's unconditional caption is Tokenizer.null, not an empty string)")
            if len(words) > self.max_length:
                raise ValueError(f"texts[{n}]: {len(words)} words, longer than max_length {self.max_length}: {text!r}")
            unknown = [w for w in words if w not in self._ids]
            if unknown:
                raise ValueError(f"texts[{n}]: unknown word(s) {unknown} in {text!r}; the vocabulary is "
                                 f"{list(self.vocabulary)}")
            ids[n, : len(words)] = [self._ids[w] for w in words]
            mask[n, : len(words)] = True
        return ids, mask

    def null(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` null captions: ids 0, mask all False (what classifier-free guidance drops to)."""
        return np.zeros((n, self.max_length), np.int32), np.zeros((n, self.max_length), bool)

    def decode(self, ids: np.ndarray, mask: np.ndarray) -> list[str]:
        """The captions of ``ids`` and ``mask`` (two ``[N, L]`` arrays, as :meth:`encode` returns): the
        words at the unmasked positions, joined by spaces; a ValueError if an unmasked id is not a word."""
        ids, mask = np.asarray(ids), np.asarray(mask, bool)
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(f"ids, mask: expected two [N, L] arrays of one shape, got {ids.shape} and {mask.shape}")
        if (ids[mask] < 1).any() or (ids[mask] >= self.vocab_size).any():
            raise ValueError(f"ids: expected ids in [1, {self.vocab_size}) at unmasked positions")
        return [" ".join(self.vocabulary[i - 1] for i in row[m]) for row, m in zip(ids, mask)]


CAPTIONED_DATASETS = {"captioned_shapes": SHAPES_VOCABULARY, "fashion_mnist": FASHION_MNIST_VOCABULARY,
                      "fashion_mnist_sample": FASHION_MNIST_VOCABULARY}
"""Datasets whose examples carry captions (the Fashion-MNIST sets with ``captions=True``), and the
vocabulary of each: what :func:`tokenizer_of` builds its :class:`Tokenizer` from."""


def tokenizer_of(data_config) -> Tokenizer:
    """The tokenizer of a captioned data section (``name`` "captioned_shapes", or a Fashion-MNIST
    set with ``captions=True``): its fixed vocabulary and ``caption_length`` (default 20)."""
    if not hasattr(data_config, "get"):
        raise ValueError(f"data_config: expected the data section as a dict or ConfigDict, got {type(data_config).__name__}")
    name = data_config.get("name", None)
    captioned = name == "captioned_shapes" or (name in CAPTIONED_DATASETS and data_config.get("captions", False))
    if not captioned:
        raise ValueError(f"data: dataset {name!r} (captions={data_config.get('captions', False)!r}) has no captions; "
                         "expected name 'captioned_shapes', or 'fashion_mnist' with captions=True")
    return Tokenizer(CAPTIONED_DATASETS[name], data_config.get("caption_length", None) or 20)
