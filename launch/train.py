"""Train a diffusion model.

python -m launch.train --config configs/digits.py --workdir workdirs/digits [--config.optim.lr=1e-3 ...]

Prints a progress bar and the final metrics; absl/JAX/orbax INFO logs only with --verbosity=0
(or -v 0) or, into a file, with --log_dir=DIR (launch/common.py).

Resumes automatically from the newest checkpoint in --workdir (which must belong to the same
experiment). Writes checkpoints, metrics.jsonl, sample grids and metrics.json there.

Runs unchanged on one device, all devices of a host (the global batch is split over them) and
many hosts: start one process per host with --coordinator=HOST:PORT --num_processes=P
--process_id=I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
--coordinator=auto on a Cloud TPU pod, Slurm or Open MPI). See launch/local_multiprocess.py
and launch/tpu_pod.sh.

On a CPU host it trains on one XLA device per core, the batch split over them, when the step is
large enough to gain (--cpu_devices, launch/common.py), and keeps compiled programs in the
persistent compilation cache (--compilation_cache).
"""

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from jdiff import data as data_lib
from jdiff import parallel
from jdiff.train import adapt
from jdiff.train.loop import train_and_evaluate
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Path to a get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.", required=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for a multi-process run, or 'auto' (default: JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default: JAX_NUM_PROCESSES, else 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes) (default: JAX_PROCESS_ID).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to train on (default: all devices of all processes).")
_FSDP = flags.DEFINE_bool("fsdp", False, "Shard params and optimizer state over the devices instead of replicating them.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.configure_gc()
    common.configure_logging()
    config = adapt.resolve_base(_CONFIG.value)  # ControlNet / DreamBooth / LoRA: the base workdir's network
    # Before anything touches a device: the CPU device count, then jax.distributed.
    common.configure_devices(config, data_lib.image_shape_of(config.data))
    common.configure_compilation_cache()
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    metrics = train_and_evaluate(config, _WORKDIR.value, mesh=parallel.make_mesh(_NUM_DEVICES.value),
                                 fsdp=_FSDP.value)
    if jax.process_index() == 0:
        if config.get("base_workdir", "") and config.train.trainable and not metrics.get("preempted"):
            metrics["adapter"] = adapt.export_adapter(_WORKDIR.value)  # the trained part alone (LoRA, ControlNet)
        print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
