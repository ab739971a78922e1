"""Input gradients inside a sampler's loop: jdiff's Conv against flax's nn.Conv (issue 21).

    python -m benchmarks.input_grad                 # both classifiers, 5 interleaved repetitions
    python -m benchmarks.input_grad --reps 3 --steps 10

Classifier guidance (``jdiff.guidance.classifier``) samples with grad_x log p(y | x_t, t) at
every step, inside the sampler's ``lax.scan``. XLA:CPU runs the convolutions of that gradient as
Eigen calls outside a loop but, with the kernel axes named the way JAX's transpose rule names
them, as naive loop nests inside one. ``jdiff.models.layers.Conv`` gives the same values and
gradients with the axes named canonically. Cases, per classifier (a digits-sized one, 8x8x1,
and an ADM-style one, 64x64x3), all DDIM with ``--steps`` steps on the same batch and noise:

  jdiff_conv   the classifier as jdiff builds it (``layers.Conv``);
  flax_conv    the same classifier with every conv a plain ``flax.linen.Conv``
               (``lax.conv_general_dilated``'s own derivative), params unchanged;
  unrolled     ``flax_conv``'s guided step in a Python loop of jitted steps: the gradient
               outside any loop, what XLA does best with it (the floor).

The guided samples of ``jdiff_conv`` and ``flax_conv`` are compared (max |difference| relative to
max |sample|). Outside a loop nothing should change; the second table times the params
gradient of a plain MSE through the digits8 U-Net (``benchmarks.training``'s ``fwd_bwd``), both
ways.
XLA's flags come from the environment: ``XLA_FLAGS=--xla_backend_optimization_level=0`` shows
the suite's compile mode.
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from benchmarks import common
from jdiff import guidance, schedules
from jdiff.models import NoiseAwareClassifier, layers, unet
from jdiff.train.classifier import init_classifier, log_prob_fn

CLASSIFIERS = {
    # configs/digits_classifier.py's trunk, 8x8x1, batch 16
    "digits8": dict(shape=(8, 8, 1), batch=16, num_classes=10, fields=dict(
        base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2)),
    # the ADM classifier of tests/test_convert_openai.py's guided case, 64x64x3, batch 2
    "adm64": dict(shape=(64, 64, 3), batch=2, num_classes=1000, fields=dict(
        base_channels=32, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attention_resolutions=(8,), num_heads=1)),
}


class _FlaxConv(nn.Conv):
    pass


@contextlib.contextmanager
def _flax_convs():
    """Every conv jdiff's modules build is a plain flax.linen.Conv (same param names and shapes)."""
    with mock.patch.object(layers, "Conv", _FlaxConv), mock.patch.object(unet, "Conv", _FlaxConv):
        yield


def _zero_eps(x, t):
    return jnp.zeros_like(x)


def _flax_log_prob(module, params, x, t, y):
    # A function of its own, so that jit's caches never hand one case the other's trace.
    return log_prob_fn(module, params)(x, t, y)


def _cases(name: str, steps: int) -> tuple[dict, dict]:
    spec = CLASSIFIERS[name]
    module = NoiseAwareClassifier(num_classes=spec["num_classes"], pool="attention", dropout=0.0, **spec["fields"])
    params = init_classifier(module, spec["shape"], jax.random.key(0))
    sched = schedules.cosine(1000)
    key = jax.random.key(1)
    shape = (spec["batch"],) + spec["shape"]
    labels = jnp.arange(spec["batch"]) % spec["num_classes"]

    def guided_fn(log_prob):
        return guidance.with_label(guidance.classifier(_zero_eps, log_prob, 30.0, sched), labels)

    jdiff_fn = guided_fn(log_prob_fn(module, params))
    flax_fn = guided_fn(jax.tree_util.Partial(_flax_log_prob, module, params))
    sample = jax.jit(lambda: jdiff.sample(jdiff_fn, sched, shape, key, method="ddim", steps=steps))
    sample_flax = jax.jit(lambda: jdiff.sample(flax_fn, sched, shape, key, method="ddim", steps=steps))
    # The floor: one jitted guided eps call per step from Python (the gradient outside any loop).
    ts = np.linspace(999, 0, steps).round().astype(np.int32)
    eps_call = jax.jit(lambda x, t: flax_fn(x, jnp.full((shape[0],), t, jnp.int32)))
    x_init = jax.random.normal(key, shape)

    def unrolled():
        x = x_init
        for t in ts:
            x = x - 1e-3 * eps_call(x, t)  # the step's arithmetic is negligible against the gradient
        return common.block(x)

    with _flax_convs():  # traced and compiled under the patch; later calls hit jit's cache
        ref = common.block(sample_flax())
        common.block(eps_call(x_init, ts[0]))
    out = common.block(sample())
    cases = {"jdiff_conv": lambda: common.block(sample()), "flax_conv": lambda: common.block(sample_flax()),
             "unrolled": unrolled}
    info = {"num_params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), "batch": spec["batch"],
            "shape": spec["shape"],
            "max_rel_diff": float(np.max(np.abs(np.asarray(out) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref))))}
    return cases, info


def _training_cases() -> tuple[dict, float]:
    """value_and_grad of a plain MSE w.r.t. the digits8 U-Net's params, jdiff's Conv and flax's."""
    net = common.make_net("digits8")
    key = jax.random.key(2)
    x = jax.random.normal(key, net.shape)
    t = jax.random.randint(key, (net.batch,), 0, 1000)

    def loss(params, x):
        return jnp.mean((net.model.apply({"params": params}, x, t, {"label": net.labels}) - x) ** 2)

    def flax_loss(params, x):  # a function of its own: its own trace
        return loss(params, x)

    grad, flax_grad = jax.jit(jax.value_and_grad(loss)), jax.jit(jax.value_and_grad(flax_loss))
    with _flax_convs():
        ref = common.block(flax_grad(net.params, x))
    out = common.block(grad(net.params, x))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(b)))), 1e-30))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    return {"jdiff_conv": lambda: common.block(grad(net.params, x)),
            "flax_conv": lambda: common.block(flax_grad(net.params, x))}, diff


def run(names, reps: int, steps: int) -> tuple[str, dict]:
    info = common.machine_info()
    rows, raw = [], {"machine": info, "classifiers": {}}
    for name in names:
        cases, desc = _cases(name, steps)
        print(f"{name}: {desc}", flush=True)
        times = common.interleaved(cases, reps=reps, warmup=1)
        rows.append([
            name, f"{desc['num_params']:,}", desc["batch"], common.median(times["jdiff_conv"]),
            common.median(times["flax_conv"]), common.median(times["unrolled"]),
            common.paired_ratio(times["flax_conv"], times["jdiff_conv"]), f"{desc['max_rel_diff']:.1e}",
        ])
        raw["classifiers"][name] = {**desc, "times": times}
    cases, diff = _training_cases()
    print("digits8 train gradient", flush=True)
    times = common.interleaved(cases, reps=reps, warmup=1)
    raw["training"] = {"times": times, "max_rel_diff": diff}
    train_row = [["digits8 U-Net, batch 64", common.median(times["jdiff_conv"]), common.median(times["flax_conv"]),
                  common.paired_ratio(times["flax_conv"], times["jdiff_conv"]), f"{diff:.1e}"]]
    cmd = ("python -m benchmarks.input_grad " + " ".join(sys.argv[1:])).strip()
    md = (
        common.header("Input gradients inside a sampler's loop (issue 21)", cmd, info)
        + f"\nClassifier guidance, DDIM {steps} steps (grad_x log p(y | x_t, t) at every step, inside the scan).\n\n"
        + common.markdown_table(
            ["classifier", "params", "batch", "jdiff Conv s", "flax nn.Conv s", "unrolled (floor) s",
             "nn.Conv / Conv", "max abs sample diff / max abs sample"], rows)
        + "\n\nOutside a loop: value_and_grad of a plain MSE w.r.t. the params (a training step's gradient).\n\n"
        + common.markdown_table(
            ["network", "jdiff Conv s", "flax nn.Conv s", "nn.Conv / Conv", "max abs grad diff / max abs grad (per leaf)"],
            train_row)
        + "\n"
    )
    return md, raw


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--classifiers", nargs="+", default=list(CLASSIFIERS), choices=list(CLASSIFIERS))
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    md, raw = run(args.classifiers, args.reps, args.steps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
