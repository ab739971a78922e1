"""A catalogue of wrong inputs across the public API and the command line (issue 14).

Every case is one row of a table: a call with one wrong argument, and a regex for the error,
which must name the argument, its bad value and what was expected. Each is checked three ways:

- the error is the one in the table (``pytest.raises(..., match=...)``);
- it is raised before any XLA compilation: JAX's caches are cleared, then a
  ``jax.monitoring`` listener on the backend-compile event must stay silent while the call
  runs (the tests at the top show the listener hears a compile, cached or not);
- nothing is written: the files and directories (sizes and mtimes) under the test's tmp dir,
  which is also the working directory, are the same before and after.

Command-line rows run the ``launch.*`` commands in subprocesses, concurrently, against one tiny
workdir trained for the module: one process per command, which runs its rows in turn through
the command's own ``app.run(main)`` (``tests/commands.py``; a fresh process costs seconds of
imports, a row none); each must exit non-zero, name the flag on stderr and leave its ``--out``
(or ``--workdir``) unwritten. The scattered per-module tests check many of the same messages;
this file adds the compile and disk checks and keeps them in one place.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring
from PIL import Image

import jdiff
from jdiff import diffusion, editing, guidance, inference, losses, metrics, parallel, samplers, schedules
from jdiff.train import loop

from commands import finish_commands, start_commands  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402

#: The event JAX records (with ``fun_name``) each time XLA compiles a program.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# ---------------------------------------------------------------------------
# The checks: a compile listener and a snapshot of the disk.
# ---------------------------------------------------------------------------

_compiled: list[str] = []


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    if event == COMPILE_EVENT:
        _compiled.append(str(kwargs.get("fun_name", "?")))


@pytest.fixture(scope="module", autouse=True)
def compile_listener():
    monitoring.register_event_duration_secs_listener(_on_duration)
    yield
    monitoring.unregister_event_duration_listener(_on_duration)


def compiles_during(call: Callable[[], Any]) -> tuple[list[str], BaseException | None]:
    """(names of the programs XLA compiled while ``call()`` ran, the exception it raised). The
    caches are cleared first, so a program compiled by an earlier test still counts."""
    jax.clear_caches()
    start = len(_compiled)
    try:
        call()
        error = None
    except Exception as e:  # noqa: BLE001 - handed to the caller
        error = e
    return _compiled[start:], error


def disk_state(root) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and directory under ``root``."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for p in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (0 if p == dirpath else st.st_size, st.st_mtime_ns)
    return out


def assert_refused(call: Callable[[], Any], error: type, match: str, root) -> BaseException:
    """``call()`` raises ``error`` matching ``match``, compiles nothing and writes nothing under ``root``."""
    before = disk_state(root)
    compiled, raised = compiles_during(call)
    assert raised is not None, f"expected {error.__name__} matching {match!r}, nothing was raised"
    with pytest.raises(error, match=match):
        raise raised
    assert not compiled, f"XLA compiled {compiled} before {type(raised).__name__}: {raised}"
    assert disk_state(root) == before, f"{type(raised).__name__}: {raised} was raised after writing under {root}"
    return raised


# ---------------------------------------------------------------------------
# Positive controls: the checks do catch a compile and a write.
# ---------------------------------------------------------------------------


def test_listener_hears_a_jit_compile():
    compiled, error = compiles_during(lambda: jax.jit(lambda x: x * 3 + 1)(np.ones(3, np.float32)))
    assert error is None and compiled, "the listener heard no compile: is COMPILE_EVENT still JAX's event name?"


def test_listener_hears_an_eager_op_compiled_by_an_earlier_call():
    op = lambda: jnp.asarray(np.ones(5, np.float32)) + 1  # noqa: E731
    op()
    assert compiles_during(op)[0], "clear_caches() did not make a cached program compile again"


def test_assert_refused_fails_on_an_error_after_compiling(tmp_path):
    def late():
        jnp.arange(3) * 2  # an eager op compiles
        raise ValueError("x: expected 1, got 2")

    with pytest.raises(AssertionError, match="XLA compiled"):
        assert_refused(late, ValueError, r"x: expected 1, got 2", tmp_path)


def test_assert_refused_fails_on_an_error_after_writing(tmp_path):
    def writes():
        (tmp_path / "half.npz").write_bytes(b"x")
        raise ValueError("x: expected 1, got 2")

    with pytest.raises(AssertionError, match="after writing"):
        assert_refused(writes, ValueError, r"x: expected 1, got 2", tmp_path)


# ---------------------------------------------------------------------------
# The library: tiny inputs, trivial models, no training.
# ---------------------------------------------------------------------------

T = 10
SCHED = schedules.cosine(T)
KEY = jax.random.key(0)
X = np.zeros((4, 2), np.float32)
IMG = np.zeros((2, 4, 4, 1), np.float32)
KNOWN = np.ones((2, 4, 4, 1), np.float32)


def zeros(x, t):
    return jnp.zeros_like(x)


def zeros_cond(x, t, cond):
    return jnp.zeros_like(x)


def wrong_shape(x, t, *cond):
    """A model whose output has one channel too few."""
    return x[..., :-1]


def t_full(value, dtype=np.int32):
    return np.full((4,), value, dtype)


CFG = guidance.classifier_free(zeros_cond, 1.0, num_classes=3)
STATS_1 = metrics.update(metrics.init(3), np.ones((1, 3), np.float32))
STATS_3 = metrics.init(3)
MESH = parallel.make_mesh()


class TinyNet:
    """Just enough of a Flax module for ``jdiff.inference.generate``: never applied by these cases."""

    num_classes = 3

    def apply(self, variables, x, t, cond=None):
        return jnp.zeros_like(x)


def gen(**kwargs):
    args = dict(module=TinyNet(), params={}, schedule=SCHED, image_shape=(4, 4, 1), num=2, key=KEY, method="ddim", steps=2)
    return inference.generate(**{**args, **kwargs})


def sample(**kwargs):
    args = dict(model_fn=zeros, schedule=SCHED, shape_or_xT=(4, 2), key=KEY, method="ddim", steps=2)
    return jdiff.sample(**{**args, **kwargs})


class Case(NamedTuple):
    id: str
    call: Callable[[], Any]
    match: str
    error: type = ValueError


API_CASES = [
    # jdiff.sample and the samplers
    Case("sample-x-int-dtype", lambda: sample(shape_or_xT=np.zeros((4, 2), np.int32)),
         r"shape_or_xT: expected a shape \(B, \.\.\.\) or a float array .*got dtype int32"),
    Case("sample-shape-negative", lambda: sample(shape_or_xT=(4, -2)),
         r"shape_or_xT: expected a shape \(B, \.\.\.\) with B >= 1 .*got \(4, -2\)"),
    Case("sample-label-batch", lambda: sample(model_fn=zeros_cond, cond={"label": np.zeros(3, np.int32)}),
         r"cond\['label'\]: expected a leading batch dimension of 4 .*got shape \(3,\)"),
    Case("sample-unknown-method", lambda: sample(method="ddmi"), r"method: expected one of \('ddpm', 'ddim', .*got 'ddmi'"),
    Case("sample-steps-0", lambda: sample(steps=0), r"steps: expected an int in \[1, 10\] .*got 0"),
    Case("sample-steps-above-T", lambda: sample(steps=11), r"steps: expected an int in \[1, 10\] .*got 11"),
    Case("sample-timesteps-out-of-range", lambda: sample(steps=None, timesteps=[10, 5, -1]),
         r"timesteps: expected indices in \[-1, 10\) .*got min -1, max 10"),
    Case("sample-model-output-shape", lambda: sample(model_fn=wrong_shape),
         r"model_fn: expected an output of shape \(4, 2\) .*got \(4, 1\)"),
    Case("sample-eta-nan", lambda: sample(eta=float("nan")), r"eta: expected a finite non-negative Python float, got nan"),
    Case("sample-clip-unknown", lambda: sample(clip="sometimes"),
         r"clip: expected None, True, a positive float or 'dynamic', got 'sometimes'"),
    Case("sample-key-not-a-key", lambda: sample(key=0), r"key: expected one PRNG key \(jax.random.key\(seed\)\), got 0"),
    Case("ddim-invert-iterations", lambda: samplers.ddim_invert(zeros, SCHED, X, steps=2, iterations=0),
         r"iterations: expected a positive int, got 0"),
    # the forward process and the losses
    Case("q-sample-t-equals-T", lambda: diffusion.q_sample(SCHED, X, t_full(T), X),
         r"t: expected timesteps in \[0, 10\) .*got min 10, max 10"),
    Case("q-sample-t-negative", lambda: diffusion.q_sample(SCHED, X, t_full(-1), X),
         r"t: expected timesteps in \[0, 10\) .*got min -1, max -1"),
    Case("q-sample-t-float", lambda: diffusion.q_sample(SCHED, X, t_full(1.0, np.float32), X),
         r"t: expected integer timesteps \(0-indexed\), got dtype float32"),
    Case("loss-t-equals-T", lambda: losses.diffusion_loss(SCHED, zeros, X, t_full(T), X),
         r"t: expected timesteps in \[0, 10\) .*got min 10, max 10"),
    Case("loss-model-output-shape", lambda: losses.diffusion_loss(SCHED, wrong_shape, X, t_full(3), X),
         r"model output: expected prediction shape \(4, 2\), got \(4, 1\)"),
    Case("loss-unknown-weighting", lambda: losses.diffusion_loss(SCHED, zeros, X, t_full(3), X, weighting="snrr"),
         r"weighting: expected one of \('uniform', .*got 'snrr'"),
    Case("nll-bpd-model-output-shape", lambda: losses.nll_bpd(SCHED, wrong_shape, X, KEY),
         r"model_output: expected prediction shape \(4, 2\) \(like x_t\), got \(4, 1\)"),
    # schedules
    Case("betas-zero", lambda: schedules.from_betas([0.1, 0.0]), r"betas: expected every value in \(0, 1\], got \[0\.\]"),
    Case("betas-nan", lambda: schedules.from_betas([0.1, float("nan")]), r"betas: expected every value in \(0, 1\], got \[nan\]"),
    Case("num-timesteps-0", lambda: schedules.linear(0), r"num_timesteps: expected a positive int, got 0"),
    Case("num-timesteps-float", lambda: schedules.cosine(2.5), r"num_timesteps: expected a positive int, got 2\.5"),
    Case("respace-beyond-T", lambda: schedules.respace(SCHED, [0, 5, 12]),
         r"timesteps: expected values in \[0, 10\), got min 0, max 12"),
    # guidance
    Case("cfg-weight-negative", lambda: guidance.classifier_free(zeros_cond, -1.0, num_classes=3),
         r"w: expected a finite non-negative float, got -1\.0"),
    Case("cfg-weight-nan", lambda: guidance.classifier_free(zeros_cond, float("nan"), num_classes=3),
         r"w: expected a finite non-negative float, got nan"),
    Case("classifier-scale-negative", lambda: guidance.classifier(zeros, lambda x, t, y: jnp.zeros(x.shape[0]), -2.0, SCHED),
         r"scale: expected a finite non-negative float, got -2\.0"),
    Case("with-label-out-of-range", lambda: guidance.with_label(CFG, 5),
         r"y: expected labels in \[0, 3\] \(3 classes and the null label 3\), got min 5, max 5"),
    # sampling a network: jdiff.inference
    Case("generate-guidance-negative", lambda: gen(labels=np.zeros(2, np.int32), guidance_weight=-1.0),
         r"guidance_weight: expected a finite weight >= 0, got -1\.0"),
    Case("generate-guidance-nan", lambda: gen(labels=np.zeros(2, np.int32), guidance_weight=float("nan")),
         r"guidance_weight: expected a finite weight >= 0, got nan"),
    Case("generate-label-out-of-range", lambda: gen(labels=np.array([0, 4])),
         r"labels: expected ints in \[0, 3\] \(3 = the null class\), got range \[0, 4\]"),
    Case("generate-labels-shape", lambda: gen(labels=np.array([0, 1, 2])), r"labels: expected shape \(2,\), got \(3,\)"),
    Case("generate-unknown-method", lambda: gen(method="nope"), r"method: expected one of \('ddpm', .*got 'nope'"),
    Case("generate-batch-size-0", lambda: gen(batch_size=0), r"batch_size: expected a positive number .*got 0"),
    Case("balanced-labels-0", lambda: inference.balanced_labels(0, 10), r"num: expected a positive number of samples, got 0"),
    # editing
    Case("inpaint-mask-shape", lambda: editing.inpaint(zeros_cond, SCHED, IMG, np.ones((2, 3, 3, 1), np.float32), KEY),
         r"mask: expected a shape broadcastable to x_known's \(2, 4, 4, 1\), got \(2, 3, 3, 1\)"),
    Case("inpaint-mask-not-binary", lambda: editing.inpaint(zeros_cond, SCHED, IMG, np.full((2, 4, 4, 1), 0.5, np.float32), KEY),
         r"mask: expected 1 \(known\) and 0 \(to fill\) only, got values \[0\.5\]"),
    Case("inpaint-steps-above-T", lambda: editing.inpaint(zeros_cond, SCHED, IMG, KNOWN, KEY, steps=11),
         r"steps: expected an int in \[1, 10\] .*got 11"),
    Case("repaint-mask-not-binary", lambda: editing.repaint(zeros, SCHED, IMG, np.full((4, 4, 1), 0.25, np.float32), KEY, steps=4),
         r"mask: expected 1 \(known\) and 0 \(to fill\) only, got values \[0\.25\]"),
    Case("repaint-steps-0", lambda: editing.repaint(zeros, SCHED, IMG, KNOWN, KEY, steps=0), r"steps: expected an int in \[1, 10\], got 0"),
    Case("repaint-jump-too-long", lambda: editing.repaint(zeros, SCHED, IMG, KNOWN, KEY, steps=4, jump_length=4),
         r"jump_length: expected fewer than steps=4 reverse steps to jump back over, got 4"),
    Case("sdedit-t0-equals-T", lambda: editing.sdedit(zeros, SCHED, IMG, T, KEY, steps=2),
         r"t0: expected a model timestep in \[0, 10\) \(0-indexed\), got 10"),
    Case("sdedit-t0-negative", lambda: editing.sdedit(zeros, SCHED, IMG, -1, KEY, steps=2),
         r"t0: expected a model timestep in \[0, 10\) \(0-indexed\), got -1"),
    Case("sdedit-model-output-shape", lambda: editing.sdedit(wrong_shape, SCHED, IMG, 5, KEY, steps=2),
         r"model_fn: expected an output of shape \(2, 4, 4, 1\) .*got \(2, 4, 4, 0\)"),
    Case("random-masks-unknown-kind", lambda: editing.random_masks(KEY, 2, (8, 8), kinds=("box", "circle")),
         r"kinds: expected a non-empty sequence of mask kinds from \('box', .*got \('box', 'circle'\)"),
    Case("random-masks-num-0", lambda: editing.random_masks(KEY, 0, (8, 8)), r"num: expected a positive int, got 0"),
    # parallel
    Case("batch-size-0", lambda: parallel.check_batch_size(0, MESH), r"batch_size: expected a positive int, got 0"),
    Case("batch-size-float", lambda: parallel.check_batch_size(2.5, MESH), r"batch_size: expected a positive int, got 2\.5"),
    Case("batch-axis-unknown", lambda: parallel.check_batch_size(4, MESH, axis_name="model"),
         r"axis_name: 'model' is not an axis of the mesh \(axes \('data',\)\)"),
    # metrics
    Case("fid-feature-dims", lambda: metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)),
         r"mu1: expected shape \[4\] to match mu2, got \(3,\)"),
    Case("fid-mean-nan", lambda: metrics.frechet_distance(np.array([0.0, np.nan, 0.0]), np.eye(3), np.zeros(3), np.eye(3)),
         r"mu1: expected a finite mean, got 1 non-finite entries of 3"),
    Case("fid-one-sample", lambda: metrics.frechet_distance_from_stats(STATS_1, STATS_1),
         r"stats: expected more than ddof=1 feature vectors, got count 1"),
    Case("stats-feature-dims", lambda: metrics.update(STATS_3, np.zeros((5, 4), np.float32)),
         r"features: expected shape \[B, 3\] \(D from stats\), got \(5, 4\)"),
    Case("precision-recall-one-sample", lambda: metrics.precision_recall(np.zeros((1, 3)), np.zeros((5, 3))),
         r"real_features: expected shape \[N, D\] with N >= 2, D >= 1, got \(1, 3\)"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_library_refuses(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative write would land here
    assert_refused(case.call, case.error, case.match, tmp_path)


# ---------------------------------------------------------------------------
# train_and_evaluate: configs/tiny.py with one wrong entry.
# ---------------------------------------------------------------------------


def tiny_config(**overrides):
    c = tiny.get_config()
    c.sample.num = 4
    c.update_from_flattened_dict(overrides)
    return c


CONFIG_CASES = [
    Case("config-unknown-key", lambda: tiny_config(**{"train.num_stepz": 3}),
         r"config: unknown key\(s\) \['train.num_stepz'\]; see jdiff.train.config.base_config for the accepted keys"),
    Case("config-unknown-model-key", lambda: tiny_config(**{"model.widht": 3}),
         r"config.model: .*unknown key\(s\) \['widht'\] for UNet; expected a subset of \['base_channels'"),
    Case("config-schedule", lambda: tiny_config(**{"diffusion.schedule": "cosin"}),
         r"config.diffusion.schedule: expected 'linear', 'cosine' or 'scaled_linear', got 'cosin'"),
    Case("config-batch-size-0", lambda: tiny_config(**{"data.batch_size": 0}), r"config.data.batch_size: expected a positive int, got 0"),
    Case("config-p-uncond", lambda: tiny_config(**{"diffusion.p_uncond": 1.5}),
         r"config.diffusion.p_uncond: expected a probability in \[0, 1\), got 1\.5"),
    Case("config-weighting", lambda: tiny_config(**{"diffusion.weighting": "snrr"}),
         r"config.diffusion.weighting: expected one of \('uniform', .*got 'snrr'"),
    Case("config-sample-guidance", lambda: tiny_config(**{"sample.guidance": -1.0}),
         r"config.sample.guidance: expected a finite weight >= 0, got -1\.0"),
    Case("config-sample-method", lambda: tiny_config(**{"sample.method": "ddmi"}),
         r"config.sample.method: expected one of \('ddpm', .*got 'ddmi'"),
    Case("config-sample-steps", lambda: tiny_config(**{"sample.steps": 21}),
         r"config.sample.steps: expected None or an int in \[1, 20\] \(config.diffusion.num_timesteps\), got 21"),
    Case("config-sample-num", lambda: tiny_config(**{"sample.num": -1}), r"config.sample.num: expected an int >= 0, got -1"),
    Case("config-sample-batch-size", lambda: tiny_config(**{"sample.batch_size": 0}),
         r"config.sample.batch_size: expected an int >= 1, got 0"),
    Case("config-sample-every-without-grids", lambda: tiny_config(**{"sample.num": 0, "train.sample_every": 2}),
         r"config.train.sample_every: 2 asks for a grid every so many steps, but config.sample.num is 0"),
    Case("config-base-channels", lambda: tiny_config(**{"model.base_channels": 0}),
         r"config.model: base_channels: expected an even int >= 4, got 0"),
    Case("config-lr-nan", lambda: tiny_config(**{"optim.lr": float("nan")}), r"optim.lr: expected a positive learning rate, got nan"),
    Case("config-ema-decay", lambda: tiny_config(**{"optim.ema_decay": 1.5}), r"config.optim.ema_decay: expected a decay in \[0, 1\], got 1\.5"),
    Case("config-num-timesteps", lambda: tiny_config(**{"diffusion.num_timesteps": 0}),
         r"config.diffusion.num_timesteps: expected a positive int, got 0"),
    Case("config-skip-nonfinite", lambda: tiny_config(**{"optim.skip_nonfinite": -1}),
         r"config.optim.skip_nonfinite: expected an int >= 0 \(steps skipped in a row\), got -1"),
    Case("config-dataset", lambda: tiny_config(**{"data.name": "no_such_dataset"}),
         r"name: 'no_such_dataset' is not a registered TFDS dataset .*expected a name from tfds.list_builders\(\)"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.id for c in CONFIG_CASES])
def test_train_and_evaluate_refuses(case, tmp_path):
    config = case.call()
    workdir = tmp_path / "workdir"
    assert_refused(lambda: loop.train_and_evaluate(config, str(workdir)), case.error, case.match, tmp_path)
    assert not workdir.exists()


def test_a_workdir_of_another_experiment_is_refused(tmp_path):
    from jdiff.train.checkpoint import Checkpointer

    workdir = tmp_path / "workdir"
    Checkpointer(str(workdir)).write_experiment(tiny_config(**{"model.base_channels": 16}))
    assert_refused(lambda: loop.train_and_evaluate(tiny_config(), str(workdir)), ValueError,
                   r"different experiment.*model.base_channels", tmp_path)


# ---------------------------------------------------------------------------
# The command line: python -m launch.* in subprocesses, run concurrently.
# ---------------------------------------------------------------------------


class CliCase(NamedTuple):
    id: str
    args: list  # {w}: the trained workdir, {d}: this module's inputs, {o}: the output path
    match: str  # on stderr: the flag, the value, the expectation
    out: str = "x.png"


CLI_CASES = [
    CliCase("sample-mask-unreadable", ["launch.sample", "--workdir", "{w}", "--repaint", "{d}/digit.png", "--mask", "{d}/text.png"],
            r"--mask: cannot read '.*text\.png' as a PNG image .*expected a readable \.png file"),
    CliCase("sample-sdedit-image-size", ["launch.sample", "--workdir", "{w}", "--sdedit", "{d}/big.png", "--t0", "5"],
            r"--sdedit: expected an image of the model's size 8x8, got 16x16"),
    CliCase("sample-mask-size", ["launch.sample", "--workdir", "{w}", "--repaint", "{d}/digit.png", "--mask", "{d}/mask4.png"],
            r"--mask: expected a 0/1 mask of the model's size 8x8, got shape \(4, 4\)"),
    CliCase("sample-label-negative", ["launch.sample", "--workdir", "{w}", "--label", "-1"],
            r"--label: expected labels in \[0, 10\), got \[-1\]"),
    CliCase("sample-num-0", ["launch.sample", "--workdir", "{w}", "--num", "0"], r"--num: expected a positive number, got 0"),
    CliCase("sample-steps-above-T", ["launch.sample", "--workdir", "{w}", "--steps", "21"],
            r"--steps: expected an int in \[1, 20\] \(config.diffusion.num_timesteps of the workdir\), got 21"),
    CliCase("train-unknown-config-key", ["launch.train", "--config", "configs/tiny.py", "--workdir", "{o}", "--config.model.widht=3"],
            r"--config.model.widht: unknown config key 'widht'; expected a key of the --config file", out="new_workdir"),
    CliCase("train-cpu-devices-0", ["launch.train", "--config", "configs/tiny.py", "--workdir", "{o}", "--cpu_devices", "0"],
            r"--cpu_devices: expected a positive device count, got 0"),
    CliCase("evaluate-not-a-workdir", ["launch.evaluate", "--workdir", "{d}", "--num", "4"],
            r"--workdir: '.*' has no config.json; expected a directory written by launch.train", out="m.json"),
]


def _write_inputs(d):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(d / "digit.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "big.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(d / "mask4.png")
    (d / "text.png").write_text("not a png")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """{case id: (returncode, stderr, XLA compiles, out path)} of every CLI row, and whether the
    inputs and the workdir were left as they were. The workdir is configs/tiny.py trained for a
    step; the commands whose rows do not read it run while it trains, the others after (one
    process per command: tests/commands.py)."""
    inputs, outputs = tmp_path_factory.mktemp("inputs"), tmp_path_factory.mktemp("outputs")
    _write_inputs(inputs)
    workdir = tmp_path_factory.mktemp("tiny") / "workdir"
    inputs_before = disk_state(inputs)

    def argv(case):
        out = outputs / case.id / case.out
        args = [a.format(w=workdir, d=inputs, o=out) for a in case.args[1:]]
        if not any("{o}" in a for a in case.args):
            args += ["--out", str(out)]
        return args

    def start(module):
        cases = [c for c in CLI_CASES if c.args[0] == module]
        return cases, start_commands(module, [argv(c) for c in cases])

    needs_workdir = lambda module: any("{w}" in a for c in CLI_CASES if c.args[0] == module for a in c.args)  # noqa: E731
    modules = list(dict.fromkeys(c.args[0] for c in CLI_CASES))
    procs = [start(m) for m in modules if not needs_workdir(m)]
    try:
        loop.train_and_evaluate(tiny_config(**{"train.num_steps": 1}), str(workdir))  # one step: one checkpoint
        workdir_before = disk_state(workdir)
        procs += [start(m) for m in modules if needs_workdir(m)]
        runs = {}
        for cases, proc in procs:
            for case, (returncode, stderr, compiles) in zip(cases, finish_commands(proc), strict=True):
                runs[case.id] = (returncode, stderr, compiles, outputs / case.id / case.out)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
    unchanged = disk_state(inputs) == inputs_before and disk_state(workdir) == workdir_before
    return runs, unchanged


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_command_line_refuses(case, cli_runs):
    runs, unchanged = cli_runs
    returncode, stderr, compiles, out = runs[case.id]
    assert returncode != 0, stderr[-2000:]
    assert compiles == 0, f"{compiles} XLA programs compiled before the refusal"
    assert case.match.split(":")[0] in stderr, stderr[-2000:]  # the flag, by name
    assert re.search(case.match, stderr), stderr[-2000:]
    assert not os.path.exists(out) and not os.path.exists(out.parent), f"{out} was written"
    assert unchanged, "a refused command changed its inputs or the workdir"


def test_the_catalogue_has_at_least_30_rows():
    assert len(API_CASES) + len(CONFIG_CASES) + len(CLI_CASES) + 1 >= 30  # + the other-experiment workdir
