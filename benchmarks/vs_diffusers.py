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
against diffusers' standard step (``add_noise``, MSE, ``backward``, ``AdamW.step``).
torch runs with ``torch.set_num_threads(--threads)`` (default 2, the machine's cores).

jdiff runs twice: on one XLA CPU device (what a default process does), and with the batch
sharded over ``os.cpu_count()`` CPU devices (``--xla_force_host_platform_device_count``, set by
this script before jax is imported; params replicated, x_T / labels / the training batch split
on the batch axis with ``jdiff.parallel``'s mesh and shardings, the same jdiff calls). XLA:CPU runs the small
convolutions of these networks on one core however many it has; one device per core is how
JAX uses the second core here.
"""

from __future__ import annotations

import os

# Before jax is imported: expose the cores as separate XLA CPU devices, so that the
# "2 CPU devices" cases can shard the batch over them (data parallel). Arrays that are not
# sharded stay on device 0, which runs exactly as in a default process.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}={os.cpu_count()}".strip()

import json
import subprocess
import sys

import jax
import jax.numpy as jnp

import jdiff
from benchmarks import common
from jdiff import parallel
from jdiff.models.layers import norm_groups
from jdiff.inference import model_fn_for
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
    """How the jdiff cases place their data: ``jdiff`` on the default device (one XLA CPU
    device, as in a default process) and ``jdiff<N>dev`` with the batch split over all N CPU
    devices and the params replicated (``jdiff.parallel.make_mesh`` / ``data_sharding`` /
    ``replicated``, as ``launch.train`` and ``generate`` do)."""
    out = {"jdiff": (None, None)}
    n = len(jax.devices())
    if n > 1 and net.batch % n == 0:
        mesh = parallel.make_mesh()
        out[f"jdiff{n}dev"] = (parallel.data_sharding(mesh), parallel.replicated(mesh))
    return out


def _cases(net: common.Net, worker: TorchWorker, train_steps: int) -> dict:
    key = jax.random.key(0)
    cases = {}
    placements = _placements(net)
    optimizer = make_optimizer(net.config.optim)
    batch = {"image": jax.random.uniform(key, net.shape, minval=-1.0, maxval=1.0), "cond": {"label": net.labels}}
    x_T = jax.random.normal(jax.random.key(2), net.shape)

    def put(tree, sharding):
        return tree if sharding is None else jax.device_put(tree, sharding)

    for guided in (False, True):
        for jname, wname, steps in METHODS:
            tag = f"{wname}{steps}" + ("_cfg" if guided else "")
            for prefix, (shard, repl) in placements.items():
                fn = model_fn_for(net.model, put(net.params, repl), put(net.labels, shard), W if guided else 0.0)
                xT = put(x_T, shard)

                def jdiff_case(fn=fn, xT=xT, jname=jname, steps=steps):
                    return common.block(jdiff.sample(fn, net.schedule, xT, key, method=jname, steps=steps))

                cases[f"{prefix}_{tag}"] = jdiff_case

            def torch_case(wname=wname, steps=steps, guided=guided):
                return float(worker.call(cmd="sample", method=wname, steps=steps, guidance=W if guided else None)["seconds"])

            cases[f"diffusers_{tag}"] = torch_case

    train_step = jax.jit(make_train_step(_apply_fn(net.model), net.schedule, optimizer, net.config), donate_argnums=0)
    for prefix, (shard, repl) in placements.items():
        # The state gets its own params and key: the step donates them, and create_train_state
        # keeps the key's buffer (key_data), so donating it would delete the caller's key.
        holder = [put(create_train_state(jax.tree.map(jnp.copy, net.params), optimizer, jax.random.key(1)), repl)]
        b = put(batch, shard)

        def jdiff_train(holder=holder, b=b):
            state = holder[0]
            for _ in range(train_steps):
                state, metrics = train_step(state, b)
            holder[0] = state
            return common.block((state, metrics))

        cases[f"{prefix}_train"] = jdiff_train
    cases["diffusers_train"] = lambda: float(worker.call(cmd="train", steps=train_steps)["seconds"])
    return cases


def _row(times: dict, prefixes: list, label: str, tag: str, per_rep: int) -> list:
    """Throughputs (per_rep items per repetition) of each jdiff placement and of diffusers, then
    the speed-up of each placement (median of per-round diffusers time / jdiff time)."""
    tt = times[f"diffusers_{tag}"]
    r = [label] + [per_rep / common.median(times[f"{p}_{tag}"]) for p in prefixes] + [per_rep / common.median(tt)]
    return r + [common.paired_ratio(tt, times[f"{p}_{tag}"]) for p in prefixes]


def run(nets, reps: int, torch_python: str, threads: int, train_steps: int) -> tuple[str, dict]:
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
            times = common.interleaved(_cases(net, worker, train_steps), reps=reps, warmup=1)
        finally:
            worker.close()
        prefixes = list(_placements(net))
        rows = []

        for guided in (False, True):
            for jname, wname, steps in METHODS:
                label = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)"}[wname]
                rows.append(_row(times, prefixes, f"{label} {steps} steps" + (f", CFG w={W:g}" if guided else ""),
                                 f"{wname}{steps}" + ("_cfg" if guided else ""), net.batch))
        rows.append(_row(times, prefixes, f"training step (examples/s), {train_steps} steps per repetition", "train", net.batch * train_steps))
        names = {"jdiff": "jdiff, 1 device"} | {p: f"jdiff, {len(jax.devices())} CPU devices" for p in prefixes[1:]}
        columns = (["workload"] + [f"{names[p]} /s" for p in prefixes] + ["diffusers /s"]
                   + [f"speed-up, {names[p]} (x)" for p in prefixes])
        sections.append(
            f"**{name}**: image {'x'.join(map(str, net.image_shape))}, batch {net.batch}; jdiff U-Net {net.num_params:,} params, "
            f"diffusers UNet2DModel {setup['params']:,} params (`{json.dumps(kwargs)}`); torch {setup['torch']} with "
            f"{setup['threads']} intra-op threads ({setup['interop_threads']} inter-op), diffusers {setup['diffusers']}.\n\n"
            + common.markdown_table(columns, rows)
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
    p.add_argument("--train-steps", type=int, default=5, help="training steps per repetition")
    args = p.parse_args(argv)
    if not os.path.exists(args.torch_python):
        sys.exit(f"--torch-python: {args.torch_python} does not exist; create the venv as the module docstring shows")
    md, raw = run(args.nets, args.reps, args.torch_python, args.threads, args.train_steps)
    print("\n" + md)
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
