"""What every command line shares: quiet logging by default, flag errors that name the flag, and
the speed defaults of a CPU host (one XLA device per core, freed host memory kept in the
process, the persistent compilation cache) and of Python (the garbage collector's thresholds).

A command prints its progress bar, its results, warnings and errors; the INFO lines of absl, JAX
(backend probing) and orbax (every checkpoint phase and read rate) stay out of the terminal.
absl's own flags show more: ``--verbosity=0`` (or ``-v 0``) logs INFO to stderr, ``--log_dir=DIR``
writes a log file at INFO (or the given ``--verbosity``) while stderr keeps warnings and errors.
"""

from __future__ import annotations

import gc
import os
import re
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None,
    "XLA CPU devices to create on a CPU host, the batch split over them (default: one per core when it "
    "helps, see launch/common.py; set XLA_FLAGS=--xla_force_host_platform_device_count=N to pin it).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("JDIFF_COMPILATION_CACHE", os.path.join("~", ".cache", "jdiff", "xla")),
    "Directory of JAX's persistent compilation cache (default $JDIFF_COMPILATION_CACHE or ~/.cache/jdiff/xla); "
    "'' turns it off.")

#: Below this estimate of the work of one training step per device (params x pixels x
#: examples, :func:`training_work`), the batch is not split over CPU devices: for configs/tiny.py
#: (45K params, 8x8, batch 16: 2.3e7 per device on 2) splitting halves the step rate, for
#: configs/digits.py (703K params, 8x8, batch 64: 1.4e9 per device on 2) it speeds it up 1.3x
#: (BENCHMARKS.md, "jdiff vs PyTorch diffusers"). The threshold sits between the two.
MIN_WORK_PER_DEVICE = 2.5e8

#: absl verbosity of the terminal unless --verbosity / -v is given: warnings and errors only.
DEFAULT_VERBOSITY = -1


#: Python's cyclic garbage collector thresholds in a command (``gc.set_threshold``): a young
#: collection every 10,000 net allocations instead of Python's default 700, an older one every 10
#: of those. Tracing and lowering a program (a U-Net is thousands of flax and jaxpr objects) and
#: orbax's per-array checkpoint writes allocate millions of short-lived objects, and at the
#: defaults the collector's passes over the objects alive (1.4 x 10^5 once jax, flax, orbax and
#: jdiff are imported, more while tracing) cost a tenth of a short command's CPU: ``launch.train``
#: of configs/tiny.py for 40 steps with 8 checkpoints, its programs in the compilation cache,
#: 11.4 -> 10.2 CPU s, and ``launch.sample`` of 64 images 3.4 -> 3.1 (``python -m
#: benchmarks.gc_thresholds``, BENCHMARKS.md "Python's garbage collector"). Memory is freed as
#: before: arrays by reference counting, garbage in reference cycles at most ~10^6 allocations later.
GC_THRESHOLDS = (10_000, 10, 10)


def configure_gc() -> None:
    """Set :data:`GC_THRESHOLDS` (call in ``main`` before anything is traced; a command owns its process)."""
    gc.set_threshold(*GC_THRESHOLDS)


def configure_logging() -> None:
    """Apply the quiet default (call first thing in ``main``, after absl parsed the flags)."""
    verbosity_given = FLAGS["verbosity"].present
    if FLAGS.log_dir:
        if not verbosity_given:
            FLAGS.verbosity = 0  # the file gets INFO
        if not FLAGS["stderrthreshold"].present:
            FLAGS.stderrthreshold = "warning"  # the terminal still sees warnings and errors
        logging.get_absl_handler().use_absl_log_file()
    elif not verbosity_given:
        FLAGS.verbosity = DEFAULT_VERBOSITY


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``, with an override of a
    config key that does not exist (``--config.model.widht=3``) reported like any bad flag, naming
    it: ml_collections raises a bare AttributeError for it from inside the parser."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(text))
            message = message.args[0]
        message = str(message)
        found = re.match(r"""^["']*([^"'\n]+)""", message)
        key = found.group(1) if found else ""
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if key in o.split(".")[1:]] or overrides
        hint = " ".join(line.strip() for line in message.splitlines()[1:])
        sys.stderr.write(f"FATAL Flags parsing error: {', '.join(named) or '--config'}: unknown config key {key!r}; expected "
                         f"a key of the --config file's get_config() (jdiff.train.config.base_config){'; ' + hint if hint else ''}\n")
        sys.exit(1)


def load_workdir_config(workdir: str):
    """The config of ``--workdir`` (:func:`jdiff.workdir.load_config`), a directory that is not a
    training workdir reported as a usage error of the flag."""
    from jdiff.workdir import load_config

    try:
        return load_config(workdir)
    except ValueError as e:
        message = str(e)
        raise app.UsageError("--" + message if message.startswith("workdir: ") else f"--workdir: {workdir!r}: {message}") from None


def training_work(config, image_shape) -> float:
    """A size of one training step: the network's parameter count x pixels x batch (proportional
    to a convolutional network's FLOPs). Abstract evaluation only: starts no JAX backend."""
    import jax

    from jdiff.train import network

    model = network.build_model(config)
    shapes = jax.eval_shape(lambda: network.init_params(model, tuple(image_shape), jax.random.key(0)))
    params = sum(int(x.size) for x in jax.tree.leaves(shapes))
    return float(params) * image_shape[0] * image_shape[1] * config.data.batch_size


def configure_devices(config=None, image_shape=None) -> int:
    """One XLA CPU device per core on a CPU host (``jdiff.parallel.use_cpu_cores``, which also
    keeps freed host memory mapped: ``retain_host_memory``), before JAX starts: ``launch``
    splits every batch over them. ``--cpu_devices=N`` sets the count. With a
    training ``config`` (and its ``image_shape``) the default is 1 when the batch does not
    divide or a step is too small to gain (:data:`MIN_WORK_PER_DEVICE`). Nothing changes on a
    GPU or TPU host, or when XLA_FLAGS already gives a device count. Returns the CPU device
    count asked for."""
    from jdiff import parallel

    n = _CPU_DEVICES.value
    if n is not None and n < 1:
        raise app.UsageError(f"--cpu_devices: expected a positive device count, got {n}")
    if n is None:
        n = parallel.cpu_cores()
        if config is not None and n > 1:
            batch = config.data.batch_size
            if batch % n or training_work(config, image_shape) / n < MIN_WORK_PER_DEVICE:
                n = 1
    try:
        return parallel.use_cpu_cores(n)
    except RuntimeError as e:  # something started JAX first: run as it is, and say so
        logging.warning("%s; running on the devices JAX has", e)
        import jax

        return len(jax.devices("cpu"))


def configure_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``--compilation_cache`` (every compiled
    program, whatever its compile time): a second run of the same command loads its executables
    instead of compiling them (BENCHMARKS.md: the train step's one-off cost 8.4 s -> 2.3 s).
    Returns the directory, or None when turned off."""
    from jdiff import parallel

    path = _COMPILATION_CACHE.value
    return parallel.use_compilation_cache(path) if path else None
