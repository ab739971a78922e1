"""Sample from a trained workdir.

python -m launch.sample --workdir workdirs/digits --num 64 --out samples.png
python -m launch.sample --workdir workdirs/digits --num 64 --out samples.npz --label 3 --guidance 2.0

--out FILE.png writes a grid; FILE.npz writes the raw float32 array "samples" [N, H, W, C] in
[-1, 1] (and "labels" for conditional models). Uses the EMA params of the newest checkpoint.

Each batch is split over all devices (of all processes, with --coordinator / --num_processes /
--process_id as for launch.train; process 0 writes --out); for the same --seed and
--batch_size the array is the same whatever the number of devices, e.g. with
XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU.
"""

import os

import jax
import numpy as np
from absl import app, flags

from jdiff import images, parallel
from jdiff.train.generate import generate
from jdiff.train.restore import load_for_sampling

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_OUT = flags.DEFINE_string("out", "samples.png", "Output .png (grid) or .npz (raw arrays).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_LABEL = flags.DEFINE_multi_integer("label", None, "Class label(s); repeated labels cycle over the samples.")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w >= 0.")
_METHOD = flags.DEFINE_string("method", None, "ddpm | ddim | euler_maruyama | ode | dpm_solver++ (default: config).")
_STEPS = flags.DEFINE_integer("steps", None, "Network calls (default: config).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: config).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Samples per compiled batch (default: config).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run, or 'auto' (default: JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default: JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes) (default: JAX_PROCESS_ID).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = _OUT.value
    if not out.endswith((".png", ".npz")):
        raise app.UsageError(f"--out: expected a .png or .npz path, got {out!r}")
    if _NUM.value < 1:
        raise app.UsageError(f"--num: expected a positive number, got {_NUM.value}")
    g = _GUIDANCE.value
    if not np.isfinite(g) or g < 0:
        raise app.UsageError(f"--guidance: expected a finite weight >= 0, got {g}")
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    mesh = parallel.make_mesh()
    loaded = load_for_sampling(_WORKDIR.value, mesh)
    cfg, model = loaded.config, loaded.model
    labels = None
    if _LABEL.value:
        if model.num_classes is None:
            raise app.UsageError("--label: this model is not class-conditional")
        bad = [y for y in _LABEL.value if not 0 <= y < model.num_classes]
        if bad:
            raise app.UsageError(f"--label: expected labels in [0, {model.num_classes}), got {bad}")
        labels = np.resize(np.asarray(_LABEL.value, np.int32), _NUM.value)
    elif g and model.num_classes is not None:
        raise app.UsageError("--guidance: classifier-free guidance needs --label")
    s = cfg.sample
    x = generate(
        model, loaded.params, loaded.schedule, loaded.image_shape, _NUM.value, jax.random.key(_SEED.value),
        labels=labels, guidance_weight=g, batch_size=_BATCH.value or s.batch_size,
        method=_METHOD.value or s.method, steps=_STEPS.value if _STEPS.value is not None else s.steps,
        eta=_ETA.value if _ETA.value is not None else s.eta, clip=s.clip or None,
        variance=cfg.diffusion.variance, parameterization=cfg.diffusion.parameterization, mesh=mesh,
    )
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".npz"):
        tmp = out + ".tmp.npz"
        arrays = {"samples": x.astype(np.float32)}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    else:
        images.save_grid(x, out)
    print(f"wrote {out}: {x.shape[0]} samples of shape {x.shape[1:]} from step {loaded.step}")


if __name__ == "__main__":
    app.run(main)
