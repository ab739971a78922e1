"""Cost of classifier-free guidance (issue 5, SPEC 6: at most 2.05x an unguided sample).

    python -m benchmarks.guidance                  # digits8 and rgb16, 5 interleaved repetitions
    python -m benchmarks.guidance --nets digits8 --reps 3

Cases, per network (``benchmarks.common.make_net``), all DDIM with 50 steps on the same batch:

  unguided      ``jdiff.sample(with_label(model, y), ...)``: one network call per step on B;
  guided        ``jdiff.sample(with_label(classifier_free(model, 2.0, num_classes=K), y), ...)``:
                one batched call per step on 2B (conditional and null label), then
                (1 + w) eps_c - w eps_null;
  net_B / net_2B  50 jitted network calls on B and on 2B examples: what doubling the batch
                costs the network itself, which is the floor of the guided/unguided ratio.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

import jdiff
from benchmarks import common
from jdiff import guidance

STEPS = 50
W = 2.0
BAR = 2.05


def _conditional(model, params, x, t, y):
    return model.apply({"params": params}, x, t, {"label": y})


def _cases(net: common.Net) -> dict:
    model, params, labels, sched = net.model, net.params, net.labels, net.schedule
    key = jax.random.key(0)
    cond = jax.tree_util.Partial(_conditional, model, params)
    unguided_fn = guidance.with_label(cond, labels)
    guided_fn = guidance.with_label(guidance.classifier_free(cond, W, num_classes=net.num_classes), labels)

    def unguided():
        return common.block(jdiff.sample(unguided_fn, sched, net.shape, key, method="ddim", steps=STEPS))

    def guided():
        return common.block(jdiff.sample(guided_fn, sched, net.shape, key, method="ddim", steps=STEPS))

    fwd = jax.jit(functools.partial(_conditional, model))

    def calls(batch_factor):
        B = net.batch * batch_factor
        x0 = jax.random.normal(key, (B,) + net.image_shape)
        y = jnp.tile(labels, batch_factor)
        ts = [jnp.full((B,), t, jnp.int32) for t in range(999, 0, -1000 // STEPS)][:STEPS]

        def run():
            x = x0
            for t in ts:
                x = fwd(params, x, t, y)
            return common.block(x)

        return run

    return {"unguided": unguided, "guided": guided, "net_B": calls(1), "net_2B": calls(2)}


def run(nets, reps: int) -> tuple[str, dict]:
    info = common.machine_info()
    rows, raw = [], {"machine": info, "nets": {}}
    for name in nets:
        net = common.make_net(name)
        print(f"{name}: {net.num_params:,} params, batch {net.batch}, image {net.image_shape}", flush=True)
        times = common.interleaved(_cases(net), reps=reps, warmup=1)
        ratio = common.paired_ratio(times["guided"], times["unguided"])
        floor = common.paired_ratio(times["net_2B"], times["net_B"])
        rows.append([
            name, net.batch, common.median(times["unguided"]), common.median(times["guided"]), ratio,
            floor, ("meets" if ratio <= BAR else "MISSES") + f" <= {BAR}",
        ])
        raw["nets"][name] = {"network": net.describe(), "times": times}
    cmd = ("python -m benchmarks.guidance " + " ".join(sys.argv[1:])).strip()
    md = (
        common.header("Classifier-free guidance cost (SPEC 6, issue 5)", cmd, info)
        + f"\nDDIM, {STEPS} steps, w = {W}; guided = one batched network call on 2B per step.\n\n"
        + common.markdown_table(
            ["net", "batch B", "unguided s", "guided s", "guided / unguided", "net(2B) / net(B)", "bar"], rows
        )
        + "\n"
    )
    return md, raw


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=["digits8", "rgb16"], choices=common.NETWORKS)
    args = p.parse_args(argv)
    md, raw = run(args.nets, args.reps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
