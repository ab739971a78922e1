"""The training pipeline: train_step, checkpoints and resume, config errors, the launch scripts."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jdiff import data as data_lib
from jdiff.train import config as config_lib
from jdiff.train import loop
from jdiff.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402


def tiny_config(**overrides):
    c = tiny.get_config()
    c.sample.num = 4
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def _params(workdir, step=None):
    ck = Checkpointer(workdir)
    steps = ck.steps()
    mngr = ck.manager
    restored = mngr.restore(step or steps[-1], args=ocp.args.StandardRestore())
    ck.close()
    return restored


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 uninterrupted steps of the tiny config (checkpoints at 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    metrics = loop.train_and_evaluate(tiny_config(), workdir)
    return workdir, metrics


def test_outputs_of_a_run(trained):
    workdir, metrics = trained
    assert metrics["step"] == 6
    for name in ["samples.png", "metrics.json", "metrics.jsonl", "config.json", "experiment.json"]:
        assert os.path.exists(os.path.join(workdir, name)), name
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # Log steps, plus the checkpoint steps, where pending losses are checked before saving.
    assert [m["step"] for m in lines] == [2, 3, 4, 6]
    assert all(np.isfinite(m["loss"]) for m in lines)
    assert Checkpointer(workdir).steps() == [3, 6]


def test_resume_is_bit_identical(trained, tmp_path):
    """Kill after step 3 (here: stop there), restart: the params equal the uninterrupted run's."""
    workdir, _ = trained
    resumed = str(tmp_path / "resumed")
    loop.train_and_evaluate(tiny_config(**{"train.num_steps": 3}), resumed)
    assert Checkpointer(resumed).steps() == [3]
    loop.train_and_evaluate(tiny_config(), resumed)
    a, b = _params(workdir, 6), _params(resumed, 6)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(la, lb)


def test_loss_decreases_on_digits():
    """A few dozen steps of the tiny U-Net on digits lower the denoising loss (measured on a
    fixed held-out batch with fixed noise, so the comparison is not noise)."""
    c = tiny_config(**{"data.batch_size": 64})
    c.optim.lr = 3e-3
    ds = data_lib.get_dataset(c.data)
    model = loop.build_model(c, ds.image_shape)
    from jdiff.train.state import create_train_state, make_optimizer
    from jdiff.train.step import make_train_step

    opt = make_optimizer(c.optim)
    state = create_train_state(loop.init_params(model, ds.image_shape, jax.random.key(0)), opt, jax.random.key(1))
    schedule = config_lib.make_schedule(c)
    step = jax.jit(make_train_step(loop._apply_fn(model), schedule, opt, c))
    test_images, test_labels = data_lib.load_digits("test")
    x0 = jnp.asarray(test_images[:128])
    t = jax.random.randint(jax.random.key(2), (128,), 0, schedule.num_timesteps)
    noise = jax.random.normal(jax.random.key(3), x0.shape)

    @jax.jit
    def held_out_loss(params):
        from jdiff import losses

        fn = lambda x, tt: model.apply({"params": params}, x, tt, y=jnp.asarray(test_labels[:128]))  # noqa: E731
        return jnp.mean(losses.diffusion_loss(schedule, fn, x0, t, noise).loss)

    before = float(held_out_loss(state.params))
    for s in range(60):
        b = data_lib.batch_at(ds.source, s, batch_size=64, seed=0)
        state, _ = step(state, {"image": b["image"], "label": b["label"]})
    after = float(held_out_loss(state.params))
    assert after < 0.5 * before, (before, after)


def _tree_digest(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def test_other_experiment_in_workdir_is_refused(trained, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained[0], workdir)
    before = _tree_digest(workdir)
    with pytest.raises(ValueError, match=r"different experiment.*model.base_channels"):
        loop.train_and_evaluate(tiny_config(**{"model.base_channels": 16}), workdir)
    assert _tree_digest(workdir) == before


def test_unknown_config_key_and_dataset(tmp_path):
    c = tiny_config()
    c.train.num_stepz = 3
    with pytest.raises(ValueError, match="train.num_stepz"):
        loop.train_and_evaluate(c, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no_such_dataset"):
        loop.train_and_evaluate(tiny_config(**{"data.name": "no_such_dataset"}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown key"):
        loop.train_and_evaluate(tiny_config(**{"model.widht": 3}), str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "c")


def test_non_finite_loss_stops_without_a_bad_checkpoint(trained, tmp_path, monkeypatch):
    workdir = str(tmp_path / "nan")
    shutil.copytree(trained[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # resume from step 3
    real = data_lib.batch_at

    def poisoned(source, step, **kw):
        b = real(source, step, **kw)
        if step == 4:
            b = dict(b, image=np.full_like(b["image"], np.nan))
        return b

    monkeypatch.setattr(loop.data_lib, "batch_at", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="step 5"):
        loop.train_and_evaluate(tiny_config(), workdir)
    assert Checkpointer(workdir).steps() == [3]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(trained[0], workdir)
    newest = os.path.join(workdir, "checkpoints", "6")
    for root, _, files in os.walk(newest):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64 and "METADATA" not in f:
                with open(p, "r+b") as fh:
                    fh.truncate(16)
    c = tiny_config()
    ds = data_lib.get_dataset(c.data)
    model = loop.build_model(c, ds.image_shape)
    from jdiff.train.state import create_train_state, make_optimizer

    template = create_train_state(loop.init_params(model, ds.image_shape, jax.random.key(0)), make_optimizer(c.optim), jax.random.key(0))
    restored = Checkpointer(workdir).restore(template)
    assert int(restored.step) == 3


@pytest.fixture(scope="module")
def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_launch_sample_writes_png_and_npz(trained, tmp_path, cli_env):
    workdir, _ = trained
    npz = str(tmp_path / "s.npz")
    png = str(tmp_path / "s.png")
    for out, extra in [(npz, ["--label", "3", "--guidance", "1.0"]), (png, [])]:
        r = subprocess.run(
            [sys.executable, "-m", "launch.sample", "--workdir", workdir, "--num", "5", "--out", out, *extra],
            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    arr = np.load(npz, allow_pickle=False)
    assert arr["samples"].shape == (5, 8, 8, 1) and arr["samples"].dtype == np.float32
    assert arr["samples"].min() >= -1 and arr["samples"].max() <= 1
    np.testing.assert_array_equal(arr["labels"], [3] * 5)
    assert os.path.getsize(png) > 0


def test_launch_sample_rejects_bad_flags(trained, tmp_path, cli_env):
    workdir, _ = trained
    for extra, msg in [(["--label", "10"], "--label"), (["--label", "1", "--guidance", "-1"], "--guidance"),
                       (["--guidance", "nan", "--label", "1"], "--guidance")]:
        r = subprocess.run(
            [sys.executable, "-m", "launch.sample", "--workdir", workdir, "--num", "2", "--out", str(tmp_path / "x.png"), *extra],
            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300,
        )
        assert r.returncode != 0 and msg in r.stderr, r.stderr[-1000:]
        assert not os.path.exists(tmp_path / "x.png")


@pytest.mark.slow
def test_sigkill_midway_then_resume_is_bit_identical(tmp_path, cli_env):
    """SIGKILL a real `launch.train` process after its second checkpoint, run the same command
    again, and compare the final params with an uninterrupted run's."""
    import signal
    import time

    args = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.train.num_steps=40",
            "--config.train.checkpoint_every=5", "--config.sample.num=4"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    run = lambda wd: subprocess.run([sys.executable, "-m", "launch.train", *args, "--workdir", wd],  # noqa: E731
                                    cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=600)
    assert run(full).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", *args, "--workdir", killed],
                            cwd=ROOT, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, "checkpoints", "10")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = Checkpointer(killed).steps()
    assert steps and steps[-1] < 40, steps
    assert run(killed).returncode == 0
    for a, b in zip(jax.tree.leaves(_params(full, 40)), jax.tree.leaves(_params(killed, 40))):
        np.testing.assert_array_equal(a, b)
