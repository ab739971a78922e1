"""jdiff's GroupNorm (per-channel moments, then a group sum) against flax.linen.GroupNorm, in the
digits8 U-Net on one XLA CPU device: forward, and forward+backward of a plain MSE.

    python -m benchmarks.groupnorm --reps 5

Both networks have the same params (the same tree: ``scale`` and ``bias`` per norm) and compute
the same function (tests/test_models.py checks outputs and gradients against each other and
against the float64 equation); only the order of the reductions differs.
"""

from __future__ import annotations

import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common

STEPS = 5


def _flax_group_norm(channels, dtype, name=None):
    from jdiff.models.layers import norm_groups

    return nn.GroupNorm(num_groups=norm_groups(channels), epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def _cases(net: common.Net) -> dict:
    import jdiff.models.layers as layers
    import jdiff.models.unet as unet

    x = jax.random.normal(jax.random.key(0), net.shape)
    t = jnp.full((net.batch,), 300)
    cases = {}
    for kind in ("jdiff", "flax"):
        original = layers.group_norm
        if kind == "flax":  # the same U-Net with flax's GroupNorm in every norm layer
            layers.group_norm = unet.group_norm = _flax_group_norm
        try:
            model = net.model.clone()
            apply = functools.partial(common._apply, model)
            fwd = jax.jit(lambda p, x, t, apply=apply: apply(p, x, t, net.labels))
            grad = jax.jit(jax.value_and_grad(lambda p, x, t, apply=apply: jnp.mean(apply(p, x, t, net.labels) ** 2)))
            common.block((fwd(net.params, x, t), grad(net.params, x, t)))  # traced with this kind's norm
        finally:
            layers.group_norm = unet.group_norm = original
        cases[f"{kind}_fwd"] = lambda f=fwd: common.block([f(net.params, x, t) for _ in range(STEPS)])
        cases[f"{kind}_fwd_bwd"] = lambda f=grad: common.block([f(net.params, x, t) for _ in range(STEPS)])
    return cases


def run(reps: int) -> tuple[str, dict]:
    info = common.machine_info()
    net = common.make_net("digits8")
    times = common.interleaved(_cases(net), reps=reps, warmup=1)
    rows = []
    for what in ("fwd", "fwd_bwd"):
        j, f = times[f"jdiff_{what}"], times[f"flax_{what}"]
        rows.append([{"fwd": "forward", "fwd_bwd": "forward+backward"}[what], common.median(f) / STEPS * 1e3,
                     common.median(j) / STEPS * 1e3, common.paired_ratio(j, f)])
    cmd = ("python -m benchmarks.groupnorm " + " ".join(sys.argv[1:])).strip()
    md = (common.header("GroupNorm from per-channel moments (issue 13)", cmd, info)
          + f"\ndigits8 (batch {net.batch}), one XLA CPU device, {STEPS} calls per repetition.\n\n"
          + common.markdown_table(["call", "flax.linen.GroupNorm ms", "jdiff GroupNorm ms", "jdiff / flax time (x)"], rows)
          + "\n")
    return md, {"machine": info, "times": times}


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    md, raw = run(args.reps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
