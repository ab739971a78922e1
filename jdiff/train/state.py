"""The training state: step, trainable params, their EMA and optimizer state, the frozen
params, and the base PRNG key.

A regex over '/'-joined parameter paths (``config.train.trainable``) splits the network's
params in two (:func:`split_params`): the trainable part is what the optimizer updates and
the EMA averages; the frozen part rides along unchanged (bit for bit) and is merged back
(:func:`merge_params`) for every network call. With the default ``""`` everything is
trainable and ``frozen`` is empty.
"""

from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-identically (data order is a function of step).

    ``params``, ``ema_params`` and ``opt_state`` cover only the trainable params; ``frozen``
    holds the rest (an empty dict when everything trains). ``rng`` holds raw key data
    (uint32) so checkpoints need no special key handling; step s draws its randomness from
    ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = flax.struct.field(default_factory=dict)

    @property
    def key(self) -> jax.Array:
        """``rng`` as a typed PRNG key (``jax.random.wrap_key_data``)."""
        return jax.random.wrap_key_data(self.rng)

    def full_params(self) -> Any:
        """The whole network's params: trainable merged with frozen."""
        return merge_params(self.params, self.frozen)

    def full_ema_params(self) -> Any:
        """The EMA of the trainable params merged with the frozen ones (what sampling uses)."""
        return merge_params(self.ema_params, self.frozen)


def param_paths(params: Any) -> list[str]:
    """The '/'-joined paths of a nested params dict, e.g. ``encoder/conv_in/kernel``."""
    return list(traverse_util.flatten_dict(_plain(params), sep="/"))


def _plain(tree: Any) -> dict:
    # FrozenDicts and ConfigDict-free plain dicts flatten alike.
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)


def compile_trainable(pattern: str, name: str = "config.train.trainable") -> re.Pattern | None:
    """The compiled regex of a trainable mask; ``""`` (everything trains) gives None."""
    if not isinstance(pattern, str):
        raise ValueError(f"{name}: expected a regex string over '/'-joined param paths, got {pattern!r}")
    if pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({e})") from None


def split_params(params: Any, trainable: str = "", name: str = "config.train.trainable") -> tuple[dict, dict]:
    """``(trainable, frozen)``: the params whose '/'-joined path ``re.fullmatch``-es
    ``trainable`` and the rest, as two nested dicts (``""``: all trainable, frozen ``{}``).

    Raises ValueError naming ``name`` if the regex is invalid or matches no param.
    """
    regex = compile_trainable(trainable, name)
    if regex is None:
        return _plain(params), {}
    flat = traverse_util.flatten_dict(_plain(params), sep="/")
    train = {k: v for k, v in flat.items() if regex.fullmatch(k)}
    if not train:
        shown = sorted(flat)[:6]
        raise ValueError(
            f"{name}: {trainable!r} matches no parameter path (re.fullmatch over '/'-joined paths such as {shown}); "
            "expected a regex selecting the params to train, or '' for all"
        )
    frozen = {k: v for k, v in flat.items() if k not in train}
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/") if frozen else {}


def merge_params(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split_params` (a structural merge; works inside jit)."""
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(_plain(trainable), sep="/")
    flat.update(traverse_util.flatten_dict(_plain(frozen), sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def learning_rate(optim) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps`` steps (DDPM: 5000); a constant
    ``lr`` when ``warmup_steps`` is 0 (step 0 already trains at full rate)."""
    warmup = int(optim.warmup_steps)
    if warmup < 0:
        raise ValueError(f"optim.warmup_steps: expected an int >= 0, got {optim.warmup_steps!r}")
    if warmup == 0:
        return optax.constant_schedule(optim.lr)
    return optax.linear_schedule(0.0, optim.lr, warmup)


def make_optimizer(optim) -> optax.GradientTransformation:
    """optax chain from the config's ``optim`` section: global-norm clipping, then Adam(W)
    with a linear warm-up to ``lr`` (DDPM: Adam, lr 2e-4, warm-up 5000, clip 1.0), wrapped in
    ``optax.apply_if_finite`` when ``skip_nonfinite`` > 0.

    It is applied to the trainable params only (:class:`TrainState`), so its state never
    covers frozen params.
    """
    if optim.optimizer not in ("adam", "adamw"):
        raise ValueError(f"optim.optimizer: expected 'adam' or 'adamw', got {optim.optimizer!r}")
    if not optim.lr > 0:
        raise ValueError(f"optim.lr: expected a positive learning rate, got {optim.lr}")
    lr = learning_rate(optim)
    if optim.optimizer == "adam":
        opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    else:
        opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    chain = [opt]
    if optim.grad_clip:
        chain.insert(0, optax.clip_by_global_norm(optim.grad_clip))
    tx = optax.chain(*chain)
    skip = optim.get("skip_nonfinite", 0)
    if skip:
        # A step whose gradients are not finite updates nothing (at most ``skip`` in a row; the
        # training loop stops before the next one would be applied).
        tx = optax.apply_if_finite(tx, max_consecutive_errors=int(skip))
    return tx


def create_train_state(
    params, optimizer: optax.GradientTransformation, key: jax.Array, trainable: str = "", frozen: Any = None
) -> TrainState:
    """A fresh state at step 0; the EMA starts at the initial (trainable) params.

    ``params`` is the whole network's; ``trainable`` (a regex, :func:`split_params`) selects
    the part that trains. Alternatively pass the trainable part as ``params`` and the rest as
    ``frozen`` (then ``trainable`` must be ``""``).
    """
    if frozen is not None:
        if trainable:
            raise ValueError(f"trainable: expected '' when frozen params are given explicitly, got {trainable!r}")
        train = _plain(params)
    else:
        train, frozen = split_params(params, trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=train,
        ema_params=jax.tree.map(jnp.array, train),
        opt_state=optimizer.init(train),
        rng=jnp.array(jax.random.key_data(key)),  # a copy: train_step donates the state
        frozen=frozen,
    )


def overlay_params(params: Any, source: Any, name: str = "config.train.init_from") -> tuple[dict, list[str]]:
    """``params`` with every leaf whose '/'-joined path is also in ``source`` replaced by the
    source's value (cast to the target dtype); returns ``(params, loaded_paths)``.

    A conv or dense ``kernel`` whose input-channel axis (the second to last) grew, all else
    equal, gets the source in its leading input channels and zeros in the new ones: extra
    ``cond["image"]`` channels concatenated after x_t (an inpainting model's masked image and
    mask, GLIDE sec. 4) then start with no effect, so the network starts as the source model.

    Raises ValueError naming ``name`` and the path if a shared path has other different shapes,
    or if the two trees share no path at all (the source is a different network).
    """
    flat = traverse_util.flatten_dict(_plain(params), sep="/")
    src = traverse_util.flatten_dict(_plain(source), sep="/")
    shared = sorted(k for k in src if k in flat)
    if not shared:
        raise ValueError(
            f"{name}: the source params share no path with this network's (source paths such as {sorted(src)[:4]}, "
            f"this network's such as {sorted(flat)[:4]}); expected a workdir of a network with matching param names"
        )
    grown = []
    for k in shared:
        s_shape, t_shape = tuple(src[k].shape), tuple(flat[k].shape)
        if s_shape == t_shape:
            continue
        if (k.endswith("kernel") and len(s_shape) == len(t_shape) >= 2 and s_shape[-2] < t_shape[-2]
                and s_shape[:-2] == t_shape[:-2] and s_shape[-1] == t_shape[-1]):
            grown.append(k)
            continue
        raise ValueError(f"{name}: param {k!r} has shape {s_shape} in the source but {t_shape} in this network; "
                         "expected equal shapes at every shared path (or a kernel with more input channels)")
    out = dict(flat)
    for k in shared:
        value = jnp.asarray(src[k], dtype=flat[k].dtype)
        if k in grown:
            value = jnp.zeros(flat[k].shape, flat[k].dtype).at[..., : value.shape[-2], :].set(value)
        out[k] = value
    return traverse_util.unflatten_dict(out, sep="/"), shared


def parse_init_map(init_map: Any, name: str = "config.train.init_map") -> list[tuple[str, str]]:
    """``("dst=src", ...)`` -> ``[(dst, src), ...]``, checked (each entry one "=" and prefixes
    that are "" or end in "/"); an empty map is ``[("", "")]`` (every path to itself)."""
    if isinstance(init_map, str) or not isinstance(init_map, (tuple, list)):
        raise ValueError(f"{name}: expected a tuple of 'destination_prefix=source_prefix' strings, got {init_map!r}")
    pairs = []
    for entry in init_map:
        if not isinstance(entry, str) or entry.count("=") != 1:
            raise ValueError(f"{name}: expected 'destination_prefix=source_prefix' strings (one '='), got {entry!r}")
        dst, src = entry.split("=")
        for p in (dst, src):
            if p and not p.endswith("/"):
                raise ValueError(f"{name}: prefix {p!r} of {entry!r} must be '' or end in '/' (a whole module path)")
        pairs.append((dst, src))
    return pairs or [("", "")]


def map_params(source: Any, init_map: Any = (), new_classes_from: Any = (), name: str = "config.train.init_from") -> dict:
    """Another network's params moved to this network's paths (what ``config.train.init_from``
    loads, before :func:`overlay_params`).

    ``init_map`` (:func:`parse_init_map`): every source path starting with ``src`` appears again
    as ``dst + rest``, once per pair, so one source can fill several places (a ControlNet's frozen
    base U-Net ``base/...`` and the trainable copy of its encoder ``control_0/encoder/...``).
    ``new_classes_from`` ``(c_1, ..., c_n)``: every class embedding (a path ending in
    ``class_embed/embedding``, ``[K + 1, D]`` with the null class last) gains n rows, the i-th a
    copy of row c_i, before the null row: ``[E_0..E_{K-1}, E_{c_1}..E_{c_n}, E_null]`` (the
    "[V] class" identifier of DreamBooth, Ruiz et al. 2023, starting as its class).
    """
    flat = traverse_util.flatten_dict(_plain(source), sep="/")
    new_from = [int(c) for c in new_classes_from]
    out = {}
    for dst, src in parse_init_map(init_map):
        for k, v in flat.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
    if new_from:
        tables = [k for k in out if k.endswith("class_embed/embedding")]
        if not tables:
            raise ValueError(f"config.train.init_new_classes_from: {tuple(new_from)} adds classes, but {name} has no class "
                             "embedding (a 'class_embed/embedding' param); expected a class-conditional source model")
        for k in tables:
            table = jnp.asarray(out[k])
            num_classes = table.shape[0] - 1
            bad = [c for c in new_from if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"config.train.init_new_classes_from: classes {bad} are not classes of {name} "
                                 f"({num_classes} classes, 0..{num_classes - 1})")
            out[k] = jnp.concatenate([table[:num_classes], table[jnp.asarray(new_from)], table[num_classes:]], axis=0)
    return traverse_util.unflatten_dict(out, sep="/")
