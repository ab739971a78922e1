"""Shared test setup.

jdiff's math is tested in float32, the dtype users train in; the references the tests compare
against are float64 NumPy, so x64 stays off for JAX.

One persistent compilation cache per test run, shared by the pytest process, its xdist workers
and every subprocess they start (``launch`` commands read ``$JDIFF_COMPILATION_CACHE``, everything
else ``$JAX_COMPILATION_CACHE_DIR``): many tests compile the same programs (the tiny config's
train step, its samplers) from fresh closures or fresh processes, and a hit costs a file read
instead of an XLA compile. The run starts with an empty cache, as CI does, so what a test
computes never depends on an earlier run; a ``JAX_COMPILATION_CACHE_DIR`` already set wins.
The time it saves is in BENCHMARKS.md ("The test suite's wall time").

With pytest-xdist (the README's command, ``-n 2 --dist loadfile``) each file runs in one worker,
so its module-scoped fixtures are built once; the files that take longest are sent first.
"""

import os
import runpy
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before JAX reads its config from the environment
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jdiff-test-xla-")
    os.environ["JDIFF_TEST_OWNS_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JDIFF_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Compile with LLVM's -O0: the suite's time is mostly XLA compiling many small programs, which -O0
# roughly halves, while the tiny networks run about as fast. The workers and every subprocess
# inherit it. It moves float32 rounding slightly (programs compare to their float64 references
# at float32 tolerances either way); the benchmarks, and users, compile with XLA's defaults.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# Two more flags that make compiles cheaper without changing the methods (only rounding, as -O0):
# * XLA:CPU's older LLVM IR emitters instead of its MLIR fusion emitters: a compile of the tiny U-Net's
#   train step or sampler takes about half the CPU (benchmarks/compile_flags.py), the programs run
#   about as fast. Same caveat as -O0: float32 rounding moves in the last bits.
# * LLVM code generation in one piece: XLA:CPU splits a program's LLVM module to compile the parts on
#   several threads, which costs CPU (splitting and cloning the module) to save wall time on idle
#   cores; the suite's cores are busy with its two workers. At -O0 with the emitters above it cuts a
#   compile's CPU by a tenth to a quarter more (benchmarks/compile_flags.py); rounding moves in the
#   last bits at most (digits8's params after 3 train steps: 4e-9 apart; its DDIM-50 sample: equal).
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib knows ``flags`` (XLA aborts the process on an unknown flag in XLA_FLAGS):
    a JAX started with them, in a subprocess (~2 s, once per run: the workers inherit the result)."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True)
    return probe.returncode == 0


_missing = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
if _missing:
    if not _xla_accepts(" ".join(_missing)):  # an older or newer jaxlib: the flags it knows
        _missing = [f for f in _missing if _xla_accepts(f)]
    os.environ["XLA_FLAGS"] = " ".join([os.environ["XLA_FLAGS"], *_missing])


def xla_compile_flags() -> list[str]:
    """The suite's compile flags in this process's ``XLA_FLAGS``: -O0 and those FAST_COMPILE_FLAGS
    this jaxlib accepted, for a subprocess that builds its own ``XLA_FLAGS``."""
    inherited = os.environ.get("XLA_FLAGS", "").split()
    return ["--xla_backend_optimization_level=0"] + [f for f in inherited if f in FAST_COMPILE_FLAGS]


def xla_defaults_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with the suite's compile flags (-O0 and
    FAST_COMPILE_FLAGS) taken out of ``XLA_FLAGS``, for a subprocess that should compile as users
    do: one whose run time, not its compiles, is most of its cost (thousands of training steps,
    which -O0 makes about 2x slower), or one that checks what a reader sees at XLA's defaults."""
    import re

    env = dict(os.environ if env is None else env)
    flags = re.sub(r"--xla_backend_optimization_level=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if f not in FAST_COMPILE_FLAGS)
    return env


# Python's garbage collector at the thresholds the launch commands use (launch.common.GC_THRESHOLDS:
# at Python's defaults its passes took a tenth of a short command's CPU): here, and through
# tests/site/sitecustomize.py, first on PYTHONPATH, in every Python process the suite starts.
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
if SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH", "")) if p)
GC_THRESHOLDS = runpy.run_path(os.path.join(SITE, "sitecustomize.py"))["THRESHOLDS"]  # this process started without it

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

#: Files sent to the xdist workers first, longest first (2 cores: test_parallel's multi-process
#: fixture alone 150-165 s of wall in the 2026-12-03 runs; in a serial run, 2026-12-02,
#: test_train 182 s, test_reliability 165 s, test_bad_input 47 s, ...), so that no long file
#: starts late and runs alone at the end (xdist's own order, by the number
#: of tests in a file, is turned off in pytest_configure).
LONGEST_FIRST = ("test_parallel.py", "test_train.py", "test_reliability.py", "test_unclip.py", "test_latent.py",
                 "test_text_to_image.py", "test_bad_input.py", "test_classifier_training.py", "test_inpainting.py",
                 "test_samplers.py", "test_models.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist sends files by test count unless told not to
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def pytest_unconfigure(config):
    owned = os.environ.get("JDIFF_TEST_OWNS_CACHE")
    if owned and not hasattr(config, "workerinput"):  # the controller (or a plain run) removes it
        shutil.rmtree(owned, ignore_errors=True)


CONVERT_INSTALL = "pip install torch==2.13.0 && pip install -e '.[test,convert]'"


def require_modules(*names: str):
    """The named modules, imported; without one, the test skips, except in CI (``$CI`` set),
    where CI installs them (``.ci/run``) and their absence is a failure. For the converters'
    PyTorch oracles (torch, diffusers, guided_diffusion, safetensors)."""
    import importlib

    import pytest

    out = []
    for name in names:
        try:
            out.append(importlib.import_module(name))
        except ImportError as e:
            message = f"{name} is not installed ({e}); install it with: {CONVERT_INSTALL}"
            if os.environ.get("CI"):
                pytest.fail("CI is set, so the PyTorch oracle tests must run: " + message)
            pytest.skip(message)
    return out[0] if len(out) == 1 else tuple(out)


def randomize_torch(model, seed: int, std: float = 0.1):
    """Redraw every parameter of a torch module from N(0, std^2), seeded, and put it in eval
    mode: the converters' oracles zero-initialise output convs and attention projections, which
    would make an untrained comparison pass whatever the mapping."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
