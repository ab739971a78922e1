"""jdiff against PyTorch diffusers on the same machine, network size, batch and resolution.

    # once: a separate virtualenv with torch (the local CPU wheel) and diffusers
    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install torch==2.13.0 diffusers
    # then, from the repo root, with jdiff's own environment:
    python -m benchmarks.vs_diffusers --torch-python /work/venv-bench/bin/python

jdiff runs in this process; diffusers runs in ``benchmarks/torch_worker.py``, a child process in
the other virtualenv (diffusers and torch are never jdiff dependencies), which times its own work.
Every repetition runs each jdiff case and each diffusers case once, interleaved, and the
reported speed-up is the median of the per-round ratios diffusers time / jdiff time.

The diffusers network is ``UNet2DModel`` built from the jdiff network's fields: the same block
channels, residual blocks per level, attention at the same resolutions with the same head
size, mid-block attention and a class embedding with a null row; the two parameter counts are
reported (for the digits network they are equal). Both use the cosine schedule with T = 1000,
eps prediction, no x_0 clipping, and classifier-free guidance as one batched call on 2B.

Sampling (images/s): DDPM with 100 steps (jdiff's respaced chain; diffusers' DDPMScheduler
with ``set_timesteps(100)``), DDIM eta = 0 with 50 steps, and DPM-Solver++(2M) with 20 steps
(``DPMSolverMultistepScheduler``), each without and with guidance (w = 2, diffusers'
guidance scale 3). Training (examples/s): jdiff's jitted train step (Adam, clipping, EMA)
against diffusers' standard step (``add_noise``, MSE, ``backward``, ``AdamW.step``), jdiff's
steps dispatched as ``launch.train``'s loop does (at most ``MAX_STEPS_IN_FLIGHT`` queued).
torch runs with ``torch.set_num_threads(--threads)`` (default 2, the machine's cores).

jdiff runs with its defaults and on one device. Defaults: the script starts with the one line
``jdiff.parallel.use_cpu_cores()`` (one XLA CPU device per core and freed host memory kept,
``retain_host_memory``, as every ``launch`` command does), then makes plain calls: ``jdiff.sample`` splits the batch over the devices by itself
(``jdiff.parallel.auto_batch_sharding``), and the train step runs on the mesh ``launch.train``
would choose for the network (``launch.common.configure_devices``: all cores for digits8 and
rgb16, one device for tiny8, whose step is too small to gain). "1 device": the same calls with
the params and inputs committed to device 0, what a process without ``use_cpu_cores`` does.
XLA:CPU runs the small convolutions of these networks on about one core per device; one device
per core is how JAX uses the others.
"""

from __future__ import annotations

import os

import jdiff  # noqa: E402  (imports jax; nothing runs on a device yet)

jdiff.parallel.use_cpu_cores()  # the one line: one XLA CPU device per core, before JAX starts

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from jdiff import parallel
from jdiff.models.layers import norm_groups
from jdiff.inference import model_fn_for
from jdiff.train.loop import MAX_STEPS_IN_FLIGHT
from jdiff.train.network import apply_fn as _apply_fn
from jdiff.train.state import create_train_state, make_optimizer
from jdiff.train.step import make_train_step

W = 2.0
METHODS = (("ddpm", "ddpm", 100), ("ddim", "ddim", 50), ("dpm_solver++", "dpmpp", 20))  # (jdiff, worker, steps)
DEFAULT_TORCH_PYTHON = "/work/venv-bench/bin/python"


def diffusers_unet_kwargs(net: common.Net) -> dict:
    """``UNet2DModel`` keyword arguments with the architecture of a jdiff U-Net."""
    m = net.model
    H, _, C = net.image_shape
    channels = [m.base_channels * k for k in m.channel_mult]
    attn = [H // 2**level in m.attention_resolutions for level in range(len(channels))]
    heads_at = [c for c, a in zip(channels, attn) if a] or [channels[-1]]
    return {
        "sample_size": H, "in_channels": C, "out_channels": C, "layers_per_block": m.num_res_blocks,
        "block_out_channels": channels,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": heads_at[0] // m.num_heads,  # diffusers takes the head size, jdiff the count
        "norm_num_groups": norm_groups(m.base_channels),  # one count for all layers; jdiff's divides each
        "num_class_embeds": m.num_classes + 1, "dropout": m.dropout, "add_attention": m.mid_attention,
    }


class TorchWorker:
    def __init__(self, python: str):
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [python, os.path.join(here, "torch_worker.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch worker exited (code {self.proc.wait()}); see its stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self):
        try:
            self.call(cmd="quit")
        finally:
            self.proc.wait(timeout=30)


def _placements(net: common.Net) -> dict:
    """How each jdiff column places its data, ``{prefix: (sample, train)}``, each a pair
    (batch sharding, params sharding): ``jdiff`` the defaults (sampling: plain uncommitted arrays,
    which ``jdiff.sample`` splits over the CPU devices itself; training: the mesh
    ``launch.train`` would choose, ``launch.common.configure_devices``), ``jdiff1dev`` everything
    committed to device 0."""
    from launch.common import MIN_WORK_PER_DEVICE, training_work

    n = len(jax.devices())
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    train = (one, one)
    if n > 1 and net.batch % n == 0 and training_work(net.config, net.image_shape) / n >= MIN_WORK_PER_DEVICE:
        mesh = parallel.make_mesh()
        train = (parallel.data_sharding(mesh), parallel.replicated(mesh))
    return {"jdiff": ((None, None), train), "jdiff1dev": ((one, one), (one, one))}


def _cases(net: common.Net, worker: TorchWorker, train_steps: int, workloads=("sample", "train")) -> dict:
    key = jax.random.key(0)
    cases = {}
    placements = _placements(net)
    optimizer = make_optimizer(net.config.optim)
    batch = {"image": jax.random.uniform(key, net.shape, minval=-1.0, maxval=1.0), "cond": {"label": net.labels}}
    x_T = jax.random.normal(jax.random.key(2), net.shape)

    def put(tree, sharding):
        return tree if sharding is None else jax.device_put(tree, sharding)

    for guided in (False, True) if "sample" in workloads else ():
        for jname, wname, steps in METHODS:
            tag = f"{wname}{steps}" + ("_cfg" if guided else "")
            for prefix, ((shard, repl), _) in placements.items():
                fn = model_fn_for(net.model, put(net.params, repl), put(net.labels, shard), W if guided else 0.0)
                xT = put(x_T, shard)

                def jdiff_case(fn=fn, xT=xT, jname=jname, steps=steps):
                    return common.block(jdiff.sample(fn, net.schedule, xT, key, method=jname, steps=steps))

                cases[f"{prefix}_{tag}"] = jdiff_case

            def torch_case(wname=wname, steps=steps, guided=guided):
                return float(worker.call(cmd="sample", method=wname, steps=steps, guidance=W if guided else None)["seconds"])

            cases[f"diffusers_{tag}"] = torch_case

    train_step = jax.jit(make_train_step(_apply_fn(net.model), net.schedule, optimizer, net.config), donate_argnums=0)
    for prefix, (_, (shard, repl)) in placements.items() if "train" in workloads else ():
        # The state gets its own params and key: the step donates them, and create_train_state
        # keeps the key's buffer (key_data), so donating it would delete the caller's key.
        holder = [put(create_train_state(jax.tree.map(jnp.copy, net.params), optimizer, jax.random.key(1)), repl)]
        b = put(batch, shard)

        def jdiff_train(holder=holder, b=b):
            state, pending = holder[0], []
            for _ in range(train_steps):
                state, metrics = train_step(state, b)
                pending.append(metrics)
                if len(pending) > MAX_STEPS_IN_FLIGHT:  # the training loop's bounded dispatch
                    jax.block_until_ready(pending[-1 - MAX_STEPS_IN_FLIGHT])
            holder[0] = state
            return common.block((state, metrics))

        cases[f"{prefix}_train"] = jdiff_train
    if "train" in workloads:
        cases["diffusers_train"] = lambda: float(worker.call(cmd="train", steps=train_steps)["seconds"])
    return cases


def _row(times: dict, prefixes: list, label: str, tag: str, per_rep: int) -> list:
    """Throughputs (per_rep items per repetition) of each jdiff placement and of diffusers, then
    the speed-up of each placement (median of per-round diffusers time / jdiff time)."""
    tt = times[f"diffusers_{tag}"]
    r = [label] + [per_rep / common.median(times[f"{p}_{tag}"]) for p in prefixes] + [per_rep / common.median(tt)]
    return r + [common.paired_ratio(tt, times[f"{p}_{tag}"]) for p in prefixes]


def _matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """The best float32 n x n matmul rate of one XLA CPU device (the reference for its kernels)."""
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n)), jax.devices()[0])
    mm = jax.jit(jnp.matmul)
    common.block(mm(a, a))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        common.block(mm(a, a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _forward_flops(net: common.Net) -> float:
    """XLA's count of the floating-point operations of one network call on the batch."""
    x = jnp.zeros(net.shape)
    t = jnp.zeros((net.batch,), jnp.int32)
    f = jax.jit(lambda p, x, t: common._apply(net.model, p, x, t, net.labels))
    cost = f.lower(net.params, x, t).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _flops_section(net: common.Net, times: dict, worker_gflops: float, threads: int, train_steps: int) -> str:
    """What fraction of its own matmul rate each side's network reaches (DDIM-50, training)."""
    fwd = _forward_flops(net)
    xla = _matmul_gflops()
    rows = []
    for label, tag, flops in (("DDIM 50 steps", "ddim50", 50 * fwd), ("training step", "train", 3 * fwd * train_steps)):
        if f"diffusers_{tag}" not in times:
            continue
        for prefix, name, peak in (("jdiff", "jdiff, defaults", xla * len(jax.devices())), ("jdiff1dev", "jdiff, 1 device", xla),
                                   ("diffusers", f"diffusers ({threads} threads)", worker_gflops)):
            rate = flops / common.median(times[f"{prefix}_{tag}"]) / 1e9
            rows.append([label, name, rate, peak, rate / peak])
    return (f"Network FLOP/s: {fwd / 1e9:.2f} GFLOP per call on the batch (XLA's count; a training step counted "
            f"as 3 calls). Reference: a float32 1024x1024 matmul, {xla:.1f} GFLOP/s on one XLA CPU device "
            f"(x the device count for the defaults), {worker_gflops:.1f} GFLOP/s in torch.\n\n"
            + common.markdown_table(["workload", "side", "network GFLOP/s", "matmul GFLOP/s", "fraction"], rows))


def run(nets, reps: int, torch_python: str, threads: int, train_steps: int, workloads=("sample", "train")) -> tuple[str, dict]:
    info = common.machine_info()
    sections, raw = [], {"machine": info, "nets": {}}
    for name in nets:
        net = common.make_net(name)
        kwargs = diffusers_unet_kwargs(net)
        worker = TorchWorker(torch_python)
        try:
            setup = worker.call(cmd="setup", image_shape=list(net.image_shape), batch=net.batch, unet=kwargs,
                                threads=threads, seed=0)
            print(f"{name}: jdiff {net.num_params:,} params, diffusers {setup['params']:,} params; {setup}", flush=True)
            times = common.interleaved(_cases(net, worker, train_steps, workloads), reps=reps, warmup=1)
            worker_gflops = float(worker.call(cmd="matmul", n=1024, reps=5)["gflops"])
        finally:
            worker.close()
        placements = _placements(net)
        prefixes = list(placements)
        rows = []

        for guided in (False, True) if "sample" in workloads else ():
            for jname, wname, steps in METHODS:
                label = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)"}[wname]
                rows.append(_row(times, prefixes, f"{label} {steps} steps" + (f", CFG w={W:g}" if guided else ""),
                                 f"{wname}{steps}" + ("_cfg" if guided else ""), net.batch))
        if "train" in workloads:
            rows.append(_row(times, prefixes, f"training step (examples/s), {train_steps} steps per repetition", "train",
                             net.batch * train_steps))
        train_devices = len(placements["jdiff"][1][0].device_set)
        names = {"jdiff": "jdiff, defaults", "jdiff1dev": "jdiff, 1 device"}
        columns = (["workload"] + [f"{names[p]} /s" for p in prefixes] + ["diffusers /s"]
                   + [f"speed-up, {names[p]} (x)" for p in prefixes])
        sections.append(
            f"**{name}**: image {'x'.join(map(str, net.image_shape))}, batch {net.batch}; jdiff U-Net {net.num_params:,} params, "
            f"diffusers UNet2DModel {setup['params']:,} params (`{json.dumps(kwargs)}`); torch {setup['torch']} with "
            f"{setup['threads']} intra-op threads ({setup['interop_threads']} inter-op), diffusers {setup['diffusers']}. "
            f"jdiff defaults: sampling split over {len(jax.devices())} CPU devices, training on {train_devices}.\n\n"
            + common.markdown_table(columns, rows)
            + "\n\n" + _flops_section(net, times, worker_gflops, threads, train_steps)
        )
        raw["nets"][name] = {"network": net.describe(), "diffusers": {"kwargs": kwargs, **setup}, "times": times}
    cmd = ("python -m benchmarks.vs_diffusers " + " ".join(sys.argv[1:])).strip()
    md = common.header("jdiff vs PyTorch diffusers (SPEC 6, issue 7)", cmd, info) + "\n" + "\n\n".join(sections) + "\n"
    return md, raw


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(reps=3)
    p.add_argument("--nets", nargs="+", default=["digits8"], choices=common.NETWORKS)
    p.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON, help="python of a virtualenv with torch and diffusers")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--train-steps", type=int, default=20, help="training steps per repetition")
    p.add_argument("--workloads", nargs="+", default=["sample", "train"], choices=["sample", "train"],
                   help="what to time: sampling (the 6 sampler rows), training (the train step row)")
    args = p.parse_args(argv)
    if not os.path.exists(args.torch_python):
        sys.exit(f"--torch-python: {args.torch_python} does not exist; create the venv as the module docstring shows")
    md, raw = run(args.nets, args.reps, args.torch_python, args.threads, args.train_steps, tuple(args.workloads))
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
