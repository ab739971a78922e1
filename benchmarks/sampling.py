"""Scan-loop overhead of ``jdiff.sample`` (issue 3, SPEC 6: at most 1.05x the network calls).

    python -m benchmarks.sampling                  # three networks, 5 interleaved repetitions
    python -m benchmarks.sampling --nets digits8 --reps 3 --json /tmp/sampling.json

For each network (``benchmarks.common.make_net``: the digits U-Net on 8x8x1 at batch 64 and the
same architecture on 16x16x3 at batch 16), one repetition of each case does 100 network calls:

  net_calls        a jitted forward called 100 times from Python, each on the previous output,
                   blocking once at the end (the bar's denominator: what the network costs);
  scan_net_only    the same 100 calls as one ``lax.scan`` in one jit (no sampler arithmetic);
  sample_ddim      ``jdiff.sample(..., method="ddim", steps=100)``, the public call, with one
                   model_fn object reused across calls (params traced, compiled once);
  sample_ddpm      the same with ``method="ddpm", steps=100`` (respaced ancestral chain);
  sample_ddim_new_fn  as sample_ddim, but the model_fn is rebuilt for every call, as
                   ``jdiff.inference.generate`` does per batch;
  sample_ddim_in_jit  ``jdiff.sample`` inside the caller's own ``jax.jit`` (no per-call Python);
  loop_ddim / loop_ddpm  the FlaxDiff style: a jitted *step* (network + ``ddim_step`` /
                   ``ddpm_step``) called from a Python loop over the timesteps.

Reported: median seconds per 100-step sample, and each case's ratio to net_calls (the median
of per-round ratios; the cases of a round run back to back).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from benchmarks import common
from jdiff import samplers
from jdiff.schedules import respace, space_timesteps
from jdiff.inference import model_fn_for

STEPS = 100
BAR = 1.05


def _cases(net: common.Net, steps: int = STEPS) -> dict:
    model, params, labels, sched = net.model, net.params, net.labels, net.schedule
    B = net.batch
    key = jax.random.key(0)
    apply = functools.partial(common._apply, model)

    # -- the bar's denominator: jitted network calls from Python ------------------------
    fwd = jax.jit(lambda p, x, t: apply(p, x, t, labels))
    ts_model = [jnp.full((B,), int(t), jnp.int32) for t in np.linspace(sched.num_timesteps - 1, 0, steps).round()]
    x_T = jax.random.normal(key, net.shape, jnp.float32)

    def net_calls():
        x = x_T
        for t in ts_model:
            x = fwd(params, x, t)
        return common.block(x)

    # -- the same calls as one scan, no sampler arithmetic ------------------------------
    ts_stack = jnp.stack(ts_model)

    @jax.jit
    def scan_fn(p, x, ts):
        return jax.lax.scan(lambda x, t: (apply(p, x, t, labels), None), x, ts)[0]

    def scan_net_only():
        return common.block(scan_fn(params, x_T, ts_stack))

    # -- the public sampler -------------------------------------------------------------
    model_fn = model_fn_for(model, params, labels)

    def sample_ddim():
        return common.block(jdiff.sample(model_fn, sched, net.shape, key, method="ddim", steps=steps))

    def sample_ddpm():
        return common.block(jdiff.sample(model_fn, sched, net.shape, key, method="ddpm", steps=steps))

    def sample_ddim_new_fn():
        fn = model_fn_for(model, params, labels)
        return common.block(jdiff.sample(fn, sched, net.shape, key, method="ddim", steps=steps))

    @jax.jit
    def sample_in_jit(p, k):
        return jdiff.sample(model_fn_for(model, p, labels), sched, net.shape, k, method="ddim", steps=steps)

    def sample_ddim_in_jit():
        return common.block(sample_in_jit(params, key))

    # -- FlaxDiff style: a jitted step per timestep from a Python loop ------------------
    ts, ts_prev = samplers.timestep_pairs(sched, steps)
    t_dev = [jnp.full((B,), int(t), jnp.int32) for t in ts]
    tp_dev = [jnp.full((B,), int(t), jnp.int32) for t in ts_prev]
    idx_dev = [jnp.asarray(i, jnp.int32) for i in range(len(ts))]

    @jax.jit
    def ddim_step_jit(p, x, t, t_prev, k, i):
        eps = apply(p, x, sched.timesteps[t], labels)
        return samplers.ddim_step(sched, eps, x, t, t_prev, 0.0, jax.random.fold_in(k, i))

    def loop_ddim():
        x = x_T
        for t, tp, i in zip(t_dev, tp_dev, idx_dev):
            x = ddim_step_jit(params, x, t, tp, key, i)
        return common.block(x)

    resp = respace(sched, space_timesteps(sched.num_timesteps, steps))
    ddpm_t = [jnp.full((B,), t, jnp.int32) for t in range(resp.num_timesteps - 1, -1, -1)]

    @jax.jit
    def ddpm_step_jit(p, x, t, k, i):
        out = apply(p, x, resp.timesteps[t], labels)
        return samplers.ddpm_step(resp, out, x, t, jax.random.fold_in(k, i))

    def loop_ddpm():
        x = x_T
        for t, i in zip(ddpm_t, idx_dev):
            x = ddpm_step_jit(params, x, t, key, i)
        return common.block(x)

    return {
        "net_calls": net_calls,
        "scan_net_only": scan_net_only,
        "sample_ddim": sample_ddim,
        "sample_ddpm": sample_ddpm,
        "sample_ddim_new_fn": sample_ddim_new_fn,
        "sample_ddim_in_jit": sample_ddim_in_jit,
        "loop_ddim": loop_ddim,
        "loop_ddpm": loop_ddpm,
    }


DESCRIPTIONS = {
    "net_calls": "100 jitted network calls from Python (the bar's 1.00)",
    "scan_net_only": "the 100 calls as one lax.scan (no sampler math)",
    "sample_ddim": "`jdiff.sample` DDIM, 100 steps (public call)",
    "sample_ddpm": "`jdiff.sample` DDPM, 100 steps (public call)",
    "sample_ddim_new_fn": "`jdiff.sample` DDIM, model_fn rebuilt per call (as `generate`)",
    "sample_ddim_in_jit": "`jdiff.sample` DDIM inside the caller's `jax.jit`",
    "loop_ddim": "Python loop over a jitted DDIM step (FlaxDiff style)",
    "loop_ddpm": "Python loop over a jitted DDPM step (FlaxDiff style)",
}

UNDER_BAR = ("sample_ddim", "sample_ddpm")


def run(nets, reps: int) -> tuple[str, dict]:
    info = common.machine_info()
    sections, raw = [], {"machine": info, "nets": {}}
    for name in nets:
        net = common.make_net(name)
        print(f"{name}: {net.num_params:,} params, batch {net.batch}, image {net.image_shape}", flush=True)
        cases = _cases(net)
        times = common.interleaved(cases, reps=reps, warmup=1)
        base = times["net_calls"]
        rows = []
        for case, ts in times.items():
            ratio = common.paired_ratio(ts, base)
            verdict = ("meets" if ratio <= BAR else "MISSES") + f" <= {BAR}" if case in UNDER_BAR else ""
            rows.append([DESCRIPTIONS[case], f"`{case}`", common.median(ts), common.spread(ts), ratio, verdict])
        d = net.describe()
        sections.append(
            f"**{name}**: U-Net {d['params']:,} params (base {d['base_channels']}, mult {d['channel_mult']}, "
            f"{d['num_res_blocks']} res block, attention at {d['attention_resolutions']}, {d['num_classes']} classes), "
            f"image {d['image']}, batch {d['batch']}, {STEPS} network calls per case.\n\n"
            + common.markdown_table(["case", "key", "median s", "min-max s", "x net_calls", "bar"], rows)
        )
        raw["nets"][name] = {"network": d, "times": times}
    cmd = "python -m benchmarks.sampling " + " ".join(sys.argv[1:])
    md = common.header("Scan-loop overhead (SPEC 6, issue 3)", cmd.strip(), info) + "\n" + "\n\n".join(sections) + "\n"
    return md, raw


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=["digits8", "rgb16", "tiny8"], choices=common.NETWORKS)
    args = p.parse_args(argv)
    md, raw = run(args.nets, args.reps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
