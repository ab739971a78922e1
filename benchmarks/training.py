"""Train-step overhead (SPEC 6: jdiff's train step at most 1.10x the network's forward+backward).

    python -m benchmarks.training                  # digits8 and rgb16, 5 interleaved repetitions
    python -m benchmarks.training --nets digits8 --steps 20 --reps 3

Cases, per network (``benchmarks.common.make_net``), each ``--steps`` steps on one batch:

  fwd_bwd      the bar's denominator: ``jax.jit(jax.value_and_grad(mse))`` of the network alone,
               mse = mean((net(x_t, t, y, train=True) - noise)^2) on a precomputed x_t, t,
               noise and labels (dropout on, as in training); no optimizer, no EMA;
  fwd_bwd_adam the same plus the config's optimizer (clip + Adam) applied to the params;
  train_step   ``jax.jit(jdiff.train.step.make_train_step(...), donate_argnums=0)`` with the
               digits config: per-example noise, timesteps and label dropout drawn from the
               key, q_sample, the loss, the optimizer, the EMA update and the metrics.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from jdiff import diffusion
from jdiff.train.network import apply_fn as _apply_fn
from jdiff.train.state import create_train_state, make_optimizer
from jdiff.train.step import make_train_step

BAR = 1.10


def _cases(net: common.Net, steps: int) -> dict:
    model, params, labels, sched, config = net.model, net.params, net.labels, net.schedule, net.config
    key = jax.random.key(0)
    k_x, k_n, k_t, k_s = jax.random.split(key, 4)
    x0 = jax.random.uniform(k_x, net.shape, minval=-1.0, maxval=1.0)
    batch = {"image": x0, "cond": {"label": labels}}
    optimizer = make_optimizer(config.optim)

    # -- the network's own forward + backward -------------------------------------------
    noise = jax.random.normal(k_n, net.shape)
    t = jax.random.randint(k_t, (net.batch,), 0, sched.num_timesteps)
    x_t = diffusion.q_sample(sched, x0, t, noise)
    apply = functools.partial(common._apply, model)

    def mse(p, x_t, t, y, noise, k):
        out = apply(p, x_t, t, y, train=True, rngs={"dropout": k})
        return jnp.mean((out - noise) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(mse))

    def fwd_bwd():
        outs = [grad_fn(params, x_t, t, labels, noise, jax.random.fold_in(key, i)) for i in range(steps)]
        return common.block(outs)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def adam_step(p, opt_state, k):
        loss, grads = jax.value_and_grad(mse)(p, x_t, t, labels, noise, k)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    adam_state = [jax.tree.map(jnp.copy, params), optimizer.init(params)]

    def fwd_bwd_adam():
        p, o = adam_state
        for i in range(steps):
            p, o, _ = adam_step(p, o, jax.random.fold_in(key, i))
        adam_state[:] = [p, o]
        return common.block(p)

    # -- jdiff's train step -------------------------------------------------------------
    train_step = jax.jit(make_train_step(_apply_fn(model), sched, optimizer, config), donate_argnums=0)
    holder = [create_train_state(jax.tree.map(jnp.copy, params), optimizer, k_s)]

    def jdiff_train_step():
        state = holder[0]
        for _ in range(steps):
            state, metrics = train_step(state, batch)
        holder[0] = state
        return common.block((state, metrics))

    return {"fwd_bwd": fwd_bwd, "fwd_bwd_adam": fwd_bwd_adam, "train_step": jdiff_train_step}


DESCRIPTIONS = {
    "fwd_bwd": "network forward+backward, `value_and_grad` of a plain MSE (the bar's 1.00)",
    "fwd_bwd_adam": "the same + clip + Adam update (no EMA, no noise sampling)",
    "train_step": "jdiff `make_train_step` (noise, t, label drop, loss, Adam, EMA, metrics)",
}


def run(nets, reps: int, steps: int) -> tuple[str, dict]:
    info = common.machine_info()
    sections, raw = [], {"machine": info, "nets": {}}
    for name in nets:
        net = common.make_net(name)
        print(f"{name}: {net.num_params:,} params, batch {net.batch}, image {net.image_shape}", flush=True)
        times = common.interleaved(_cases(net, steps), reps=reps, warmup=1)
        rows = []
        for case, ts in times.items():
            ratio = common.paired_ratio(ts, times["fwd_bwd"])
            verdict = (("meets" if ratio <= BAR else "MISSES") + f" <= {BAR}") if case == "train_step" else ""
            per_step = common.median(ts) / steps
            rows.append([DESCRIPTIONS[case], f"`{case}`", 1000 * per_step, net.batch / per_step, ratio, verdict])
        sections.append(
            f"**{name}**: {net.num_params:,} params, image {'x'.join(map(str, net.image_shape))}, batch {net.batch}, "
            f"{steps} steps per repetition.\n\n"
            + common.markdown_table(["case", "key", "ms / step", "examples / s", "x fwd_bwd", "bar"], rows)
        )
        raw["nets"][name] = {"network": net.describe(), "steps": steps, "times": times}
    cmd = ("python -m benchmarks.training " + " ".join(sys.argv[1:])).strip()
    md = common.header("Train-step overhead (SPEC 6)", cmd, info) + "\n" + "\n\n".join(sections) + "\n"
    return md, raw


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=["digits8", "rgb16"], choices=common.NETWORKS)
    p.add_argument("--steps", type=int, default=10, help="train steps per repetition")
    args = p.parse_args(argv)
    md, raw = run(args.nets, args.reps, args.steps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
