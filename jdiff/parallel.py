"""Device meshes, shardings and multi-host helpers: one code path for 1 CPU, 8 GPUs or a pod.

Sharding is decided once, at the edges, and flows through ``jit``: the batch is split along
the mesh axis ``"data"`` (data parallelism), params and optimizer state are replicated or,
with ``fsdp=True``, split along the same axis (fully-sharded data parallelism, as in ZeRO-3,
Rajbhandari et al. 2020), and XLA's SPMD partitioner inserts the collectives (the gradient
all-reduce, the FSDP all-gathers). No ``pmap``.

Multi-host: every process runs the same program; :func:`initialize_distributed` connects
them (``jax.distributed``), each process reads its own contiguous slice of every global batch
(``jdiff.data.batch_at(process_index=, process_count=)``) and :func:`global_batch` assembles
the global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "FSDP_MIN_SIZE",
    "make_mesh",
    "data_axis_size",
    "data_sharding",
    "replicated",
    "param_shardings",
    "shard_params",
    "check_batch_size",
    "global_batch",
    "to_host",
    "initialize_distributed",
    "cpu_cores",
    "use_cpu_cores",
    "retain_host_memory",
    "use_compilation_cache",
    "auto_batch_sharding",
]

DATA_AXIS = "data"
"""The name of the mesh axis the batch is split along (and, with ``fsdp=True``, params and
optimizer state): the default ``axis_name`` of every function here."""

FSDP_MIN_SIZE = 2**14
"""Leaves with fewer elements stay replicated under FSDP: all-gathering a bias costs more in
latency than its memory is worth. (big_vision's fsdp rule stops at 4 MiB; ``2**14`` elements
also splits the 3x3 kernels of mid-sized U-Nets.)"""


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def use_cpu_cores(num_devices: int | None = None, retain_memory: bool = True) -> int:
    """Expose the host's CPU cores as separate XLA CPU devices; call before JAX starts.

    XLA:CPU runs a U-Net's convolutions on about one core per device, so on a CPU-only host a
    default process uses one of its cores. With one device per core, :func:`jdiff.sample`
    (and :func:`auto_batch_sharding`) split a batch over them and ``launch.train``'s mesh
    trains data-parallel: on 2 cores digits8 samples at 1.9-2.3x and trains at 1.3x the one-device
    rate (BENCHMARKS.md). The one line
    for library users, first thing in the program::

        jdiff.parallel.use_cpu_cores()

    It sets ``jax_num_cpu_devices``, which changes nothing on GPU and TPU hosts (their devices
    are the accelerators). A device count the user gave (``XLA_FLAGS``
    ``--xla_force_host_platform_device_count``, or ``jax_num_cpu_devices`` already set) wins.
    It also calls :func:`retain_host_memory` (the host's freed buffers stay mapped: a
    digits8 train step 0.75x as long), unless ``retain_memory=False``.

    Args:
      num_devices: CPU devices to create (default :func:`cpu_cores`).
      retain_memory: also call :func:`retain_host_memory`.
    Returns:
      the CPU device count the process will have.
    Raises:
      RuntimeError: JAX's backends are already initialised with another CPU device count
        (something ran on a device first).
    """
    if num_devices is None:
        num_devices = cpu_cores()
    if not _is_int(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices: expected a positive int, got {num_devices!r}")
    if retain_memory:
        retain_host_memory()
    if _DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        value = os.environ["XLA_FLAGS"].split(_DEVICE_COUNT_FLAG + "=", 1)[-1].split()[0]
        return int(value) if value.isdigit() else num_devices
    current = jax.config.jax_num_cpu_devices
    if current is not None and current > 0:
        return int(current)
    from jax._src import xla_bridge  # no public query for "has a backend started"

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have != num_devices:
            raise RuntimeError(
                f"use_cpu_cores: JAX already started with {have} CPU device(s); call it before anything "
                f"runs on a device (first thing in the program), or set XLA_FLAGS={_DEVICE_COUNT_FLAG}={num_devices}"
            )
        return have
    jax.config.update("jax_num_cpu_devices", int(num_devices))
    return int(num_devices)


#: glibc's mmap and trim thresholds that :func:`retain_host_memory` sets (1 GiB).
RETAIN_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def retain_host_memory(threshold_bytes: int = RETAIN_THRESHOLD) -> bool:
    """Keep the host memory that XLA frees inside the process instead of returning it to the OS.

    XLA:CPU allocates every execution's buffers afresh and frees them after it. With glibc's
    defaults a block above the mmap threshold (dynamic, at most 32 MiB) is mapped and unmapped
    each time, and the heap is trimmed once 128 KiB at its top are free, so every execution
    faults its buffers' pages in again: a 2-device digits8 train step took 16,400 minor page
    faults (64 MiB) and 40-50 ms of system time, 94-113 ms in all; with both thresholds at
    1 GiB, 0-400 faults, 4-6 ms and 69-85 ms (BENCHMARKS.md, "Where the time goes", point 6).

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with ``mallopt(3)``, the equivalent
    of starting Python with ``MALLOC_MMAP_THRESHOLD_=N MALLOC_TRIM_THRESHOLD_=N``. The cost is
    that the process's RSS stays near its peak instead of shrinking when buffers are freed.
    Call it after ``import jax`` (importing jdiff does that): set before, it removed only half
    of the faults in the measurement above. :func:`use_cpu_cores` and every ``launch``
    command call it.

    Args:
      threshold_bytes: both thresholds, in bytes: allocations below it come from the heap,
        and the heap keeps up to this much free memory at its top.
    Returns:
      True if set; False where the C library is not glibc (no ``mallopt``) or the user set
      glibc's own ``MALLOC_*_`` variables or ``GLIBC_TUNABLES`` (theirs win).
    """
    if not _is_int(threshold_bytes) or not 0 < threshold_bytes < 2**31:
        raise ValueError(f"threshold_bytes: expected an int in [1, 2**31), got {threshold_bytes!r}")
    if any(name in os.environ for name in _GLIBC_MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt: macOS, Windows (musl's returns 0 below)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1


def use_compilation_cache(path: str) -> str:
    """Keep every program JAX compiles in the persistent compilation cache at ``path`` (created if
    missing; ``~`` expanded), whatever its compile time or size, so a new process with the same
    programs loads their executables instead of compiling them. Returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def auto_batch_sharding(batch: int, *trees: Any) -> NamedSharding | None:
    """The sharding :func:`jdiff.sample` gives a batch it was not told how to place, or None.

    The batch is split over the process's devices when that is free to do: one process, more
    than one device, all of them CPU devices (:func:`use_cpu_cores`; on accelerators the user
    places arrays), ``batch`` divisible by their count, and no array leaf of ``trees`` (the
    network's params, the conditioning, x_T) committed to a device by the caller, whose
    placement is then respected. Samples are the same up to float rounding.
    """
    if jax.process_count() != 1:
        return None
    devices = jax.local_devices()
    if len(devices) < 2 or batch % len(devices) or any(d.platform != "cpu" for d in devices):
        return None
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array) and (leaf.committed or len(leaf.sharding.device_set) > 1):
            return None
    return NamedSharding(Mesh(np.array(devices), (DATA_AXIS,)), PartitionSpec(DATA_AXIS))


def make_mesh(num_devices: int | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over the devices of all processes, ordered by (process, device id).

    That order makes each process own one contiguous block of the data axis, so the
    process-local slice of a batch that ``jdiff.data.batch_at`` returns is exactly the rows
    its devices hold.

    Args:
      num_devices: how many devices to use (default: all). In a multi-process job it must be
        a multiple of the process count; each process contributes the same number.
      axis_name: the name of the mesh axis the batch (and FSDP params) are split along.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices is None:
        return Mesh(np.array(devices), (axis_name,))
    processes = sorted({d.process_index for d in devices})
    if not _is_int(num_devices) or not 1 <= num_devices <= len(devices) or num_devices % len(processes):
        raise ValueError(
            f"num_devices: expected an int in [1, {len(devices)}] that is a multiple of the process count "
            f"{len(processes)}, got {num_devices!r}"
        )
    per_process = num_devices // len(processes)
    chosen = [d for p in processes for d in [d for d in devices if d.process_index == p][:per_process]]
    return Mesh(np.array(chosen), (axis_name,))


def data_axis_size(mesh: Mesh, axis_name: str = DATA_AXIS) -> int:
    """The number of devices the batch is split over."""
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh (axes {tuple(mesh.shape)})")
    return int(mesh.shape[axis_name])


def data_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Leading (batch) axis split along ``axis_name``, every other axis whole."""
    data_axis_size(mesh, axis_name)
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _leaf_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool, min_size: int, axis_name: str) -> NamedSharding:
    n = data_axis_size(mesh, axis_name)
    if not fsdp or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    divisible = [i for i, d in enumerate(shape) if d % n == 0]
    if not divisible:
        return replicated(mesh)
    # The largest divisible axis, as in big_vision's fsdp rule; ties go to the last axis (a
    # kernel's output features).
    axis = max(divisible, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[axis] = axis_name
    return NamedSharding(mesh, PartitionSpec(*spec))


def param_shardings(
    tree: Any, mesh: Mesh, fsdp: bool = False, *, min_size: int = FSDP_MIN_SIZE, axis_name: str = DATA_AXIS
) -> Any:
    """The sharding of every leaf of a params / optimizer-state / TrainState pytree.

    Replicated by default. With ``fsdp``, each leaf of at least ``min_size`` elements is split
    along its largest axis divisible by the data-axis size (Adam's moments have the shapes of
    the params, so they are split like them); the rest stay replicated.

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    Returns:
      A pytree of ``NamedSharding`` with the structure of ``tree``.
    """
    if not _is_int(min_size) or min_size < 1:
        raise ValueError(f"min_size: expected a positive int, got {min_size!r}")
    return jax.tree.map(lambda x: _leaf_sharding(tuple(np.shape(x)), mesh, fsdp, min_size, axis_name), tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Across processes every process holds the same host value and contributes its shards.
    host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
    if host is None:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(
    tree: Any, mesh: Mesh, fsdp: bool = False, *, min_size: int = FSDP_MIN_SIZE, axis_name: str = DATA_AXIS
) -> Any:
    """Place a pytree of arrays on ``mesh`` with :func:`param_shardings` (every process must pass
    the same values)."""
    return jax.tree.map(_put, tree, param_shardings(tree, mesh, fsdp, min_size=min_size, axis_name=axis_name))


def _mesh_processes(mesh: Mesh) -> list[int]:
    return sorted({d.process_index for d in mesh.devices.flat})


def check_batch_size(batch_size: int, mesh: Mesh, argument: str = "batch_size", axis_name: str = DATA_AXIS) -> None:
    """Raise ValueError, naming both numbers, unless the global batch splits evenly over the
    devices of the data axis and over the processes."""
    n = data_axis_size(mesh, axis_name)
    processes = len(_mesh_processes(mesh))
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"{argument}: expected a positive int, got {batch_size!r}")
    if batch_size % n:
        raise ValueError(
            f"{argument}: the global batch of {batch_size} examples does not split evenly over the {n} devices of "
            f"mesh axis {axis_name!r}; use a multiple of {n}"
        )
    if batch_size % processes:
        raise ValueError(
            f"{argument}: the global batch of {batch_size} examples does not split evenly over {processes} processes; "
            f"use a multiple of {processes}"
        )


def global_batch(local_batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Assemble the global batch from every process's slice (``jax.make_array_from_process_local_data``).

    Args:
      local_batch: a pytree of host arrays [B / P, ...]: this process's contiguous block of the
        global batch (process p of P holds rows p B/P .. (p+1) B/P - 1, as ``batch_at`` gives).
      mesh: a mesh from :func:`make_mesh`.
    Returns:
      The same pytree of global ``jax.Array`` [B, ...], split along ``axis_name``.
    Raises:
      ValueError: B is not a multiple of the data-axis size or of the process count (before
        anything is compiled).
    """
    sharding = data_sharding(mesh, axis_name)
    processes = _mesh_processes(mesh)
    rank = processes.index(jax.process_index())
    leaves = jax.tree.leaves(local_batch)
    if not leaves:
        raise ValueError("local_batch: expected a pytree with at least one array, got none")
    local_sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(local_sizes) != 1 or None in local_sizes:
        raise ValueError(f"local_batch: expected arrays sharing one leading (batch) dimension, got {sorted(map(str, local_sizes))}")
    global_size = local_sizes.pop() * len(processes)
    check_batch_size(global_size, mesh, "batch_size", axis_name)

    def put(x):
        x = np.asarray(x)
        global_shape = (global_size,) + x.shape[1:]
        rows = {idx[0].indices(global_size)[:2] for idx in sharding.addressable_devices_indices_map(global_shape).values()}
        start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
        if (start, stop) != (rank * x.shape[0], (rank + 1) * x.shape[0]):
            raise ValueError(
                f"mesh: process {jax.process_index()}'s devices hold rows [{start}, {stop}) of the batch, not its "
                f"block [{rank * x.shape[0]}, {(rank + 1) * x.shape[0]}); build the mesh with jdiff.parallel.make_mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local_batch)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as NumPy on every process (an all-gather when it spans processes)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# Set by launchers that start one process per task/host, under which
# ``jax.distributed.initialize()`` finds its own arguments; the value is the process count
# (or the list of hosts). SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: only ``srun`` steps have it,
# so a single process in an ``salloc`` shell is not mistaken for a job.
_CLUSTER_ENV = {
    "SLURM_STEP_NUM_TASKS": "Slurm",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "Cloud TPU (GKE)",
    "MEGASCALE_COORDINATOR_ADDRESS": "Cloud TPU multislice",
}


def _detected_cluster(environ: Mapping[str, str]) -> str | None:
    """The launcher of a multi-process job this process belongs to, if any."""
    for var, name in _CLUSTER_ENV.items():
        value = environ.get(var, "")
        if var == "TPU_WORKER_HOSTNAMES":
            if len(value.split(",")) > 1:
                return name
        elif var == "MEGASCALE_COORDINATOR_ADDRESS":
            if value:
                return name
        elif value.isdigit() and int(value) > 1:
            return name
    return None


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Connect the processes of a multi-host job (``jax.distributed.initialize``); call it first,
    before anything touches a device.

    Arguments left as None come from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``. ``coordinator="auto"`` (or, with no arguments, a Slurm, Open MPI or
    Cloud TPU environment of more than one process) lets JAX detect all three itself; on a
    Cloud TPU VM pod pass ``"auto"``. With nothing to go on, or a single process, nothing is
    done: a single-process run needs no coordinator.

    CPU collectives use gloo, so that processes of one machine (see
    ``launch/local_multiprocess.py``) can all-reduce; the setting only affects the CPU backend.

    Args:
      coordinator: ``host:port`` of process 0, reachable from every process, or ``"auto"``.
      num_processes: the number of processes P >= 1.
      process_id: this process, in [0, P).
      environ: the environment to read (default ``os.environ``).
    Returns:
      True if ``jax.distributed`` was initialised.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int(env, "JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _env_int(env, "JAX_PROCESS_ID")

    if coordinator == "auto" or (coordinator is None and num_processes is None and process_id is None and _detected_cluster(env)):
        if num_processes is not None or process_id is not None:
            raise ValueError(
                f"coordinator='auto' detects num_processes and process_id; got num_processes={num_processes!r}, "
                f"process_id={process_id!r} as well"
            )
        _use_gloo()
        logging.info("jax.distributed: detecting the cluster (%s)", _detected_cluster(env) or "coordinator='auto'")
        jax.distributed.initialize()
        return True
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if num_processes is None or not _is_int(num_processes) or num_processes < 1:
        raise ValueError(f"num_processes: expected a positive int (flag or JAX_NUM_PROCESSES), got {num_processes!r}")
    if num_processes == 1 and coordinator is None and process_id in (None, 0):
        return False
    if process_id is None or not _is_int(process_id) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id: expected an int in [0, {num_processes}) (flag or JAX_PROCESS_ID), got {process_id!r}"
        )
    if coordinator is None or ":" not in coordinator:
        raise ValueError(
            f"coordinator: expected 'host:port' of process 0 (flag or JAX_COORDINATOR_ADDRESS) for "
            f"num_processes={num_processes}, got {coordinator!r}"
        )
    _use_gloo()
    jax.distributed.initialize(coordinator, num_processes=int(num_processes), process_id=int(process_id))
    return True


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}: expected an int, got {env[name]!r}") from None


def _use_gloo() -> None:
    # Without a CPU collectives implementation a multi-process CPU computation cannot
    # all-reduce; on GPU/TPU hosts this only affects the (unused) CPU backend.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
