"""The training pipeline: train_step, checkpoints and resume, config errors, the launch scripts."""

import collections
import json
import os
import re
import shutil
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jdiff import data as data_lib
from jdiff import losses
from jdiff.train import config as config_lib
from jdiff.train import loop, network
from jdiff.train.checkpoint import Checkpointer, IncompatibleCheckpointError
from jdiff.train.state import create_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402
import forked  # noqa: E402
from commands import run_commands  # noqa: E402


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


def test_resume_is_bit_identical(trained, tmp_path, monkeypatch):
    """Kill after step 3 (here: the uninterrupted run's workdir as it was then, its step-6
    checkpoint removed), restart: the params equal the uninterrupted run's. The restart
    restores onto the abstract state (shapes and shardings), never building a fresh state
    beside the restored one."""
    workdir, _ = trained
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    assert Checkpointer(resumed).steps() == [3]
    targets, fresh = [], []
    real_restore, real_init = Checkpointer.restore, loop.create_train_state

    def restore(self, target, **kw):
        targets.append(target)
        return real_restore(self, target, **kw)

    def create(params, *a, **kw):
        fresh.append(all(isinstance(p, jax.core.Tracer) for p in jax.tree.leaves(params)))
        return real_init(params, *a, **kw)

    monkeypatch.setattr(Checkpointer, "restore", restore)
    monkeypatch.setattr(loop, "create_train_state", create)
    monkeypatch.setattr(loop, "_PROGRAMS", collections.OrderedDict())  # traced afresh, not the fixture's run's
    loop.train_and_evaluate(tiny_config(), resumed)
    assert len(targets) == 1 and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                                     for x in jax.tree.leaves(targets[0]))
    assert fresh == [True]  # traced once for the shapes (eval_shape), never run
    a, b = _params(workdir, 6), _params(resumed, 6)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(la, lb)


def test_loss_decreases_on_digits(tmp_path):
    """A few dozen steps of the tiny U-Net on digits lower the denoising loss (measured on a
    fixed held-out batch with fixed noise, so the comparison is not noise). The steps are
    train_and_evaluate's with the tiny config, the same compiled programs as the other runs here
    (measured 2026-12-06: after / before = 0.38 at 60 steps, against the bar of 0.5)."""
    c = tiny_config(**{"train.num_steps": 60, "train.checkpoint_every": 60})
    workdir = str(tmp_path / "w")
    loop.train_and_evaluate(c, workdir)
    ds = data_lib.get_dataset(c.data)
    model = network.build_model(c)
    schedule = config_lib.make_schedule(c)
    # The run's initial params: train_and_evaluate's init key (config.seed split three ways); the
    # init program is test_corrupt_checkpoint_falls_back_to_the_previous_one's. Both trees as
    # NumPy, so that held_out_loss compiles once.
    init_key = jax.random.split(jax.random.key(c.seed), 3)[0]
    initial = jax.tree.map(np.asarray, network.init_params(model, ds.image_shape, init_key))
    trained_params = jax.tree.map(np.asarray, _params(workdir, 60)["params"])
    test_images, test_labels = data_lib.load_digits("test")
    x0 = jnp.asarray(test_images[:128])
    t = jax.random.randint(jax.random.key(2), (128,), 0, schedule.num_timesteps)
    noise = jax.random.normal(jax.random.key(3), x0.shape)

    @jax.jit
    def held_out_loss(params):
        fn = lambda x, tt: model.apply({"params": params}, x, tt, cond={"label": jnp.asarray(test_labels[:128])})  # noqa: E731
        return jnp.mean(losses.diffusion_loss(schedule, fn, x0, t, noise).loss)

    before = float(held_out_loss(initial))
    after = float(held_out_loss(trained_params))
    assert after < 0.5 * before, (before, after)


def _tree_digest(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def test_a_repeated_run_reuses_the_programs_of_the_first(trained, tmp_path, monkeypatch):
    """A second train_and_evaluate with the same config, data shape and mesh in one process
    builds no train step, init or state function of its own (nothing traced or looked up
    again): the jitted functions of the first run, kept by (config, shape, mesh, FSDP). The
    run from scratch in a fresh workdir ends with the uninterrupted run's params."""
    built = []
    real = loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **kw: built.append(1) or real(*a, **kw))
    workdir = str(tmp_path / "again")
    loop.train_and_evaluate(tiny_config(), workdir)
    assert built == []
    for la, lb in zip(jax.tree.leaves(_params(trained[0], 6)), jax.tree.leaves(_params(workdir, 6))):
        np.testing.assert_array_equal(la, lb)
    assert 1 <= len(loop._PROGRAMS) <= loop._PROGRAMS_KEPT


def test_sample_num_0_ends_without_a_grid_and_never_samples(trained, tmp_path, monkeypatch):
    """``config.sample.num = 0``: the run draws no grid (no samples.png, no ``samples_png`` in its
    metrics) and never calls the sampler; the training is the same (params equal the run with a grid)."""
    monkeypatch.setattr(loop, "generate", lambda *a, **kw: pytest.fail("the sampler was called"))
    workdir = str(tmp_path / "no_grid")
    metrics = loop.train_and_evaluate(tiny_config(**{"sample.num": 0}), workdir)
    assert metrics["step"] == 6 and "samples_png" not in metrics, metrics
    assert not os.path.exists(os.path.join(workdir, "samples.png"))
    for la, lb in zip(jax.tree.leaves(_params(trained[0], 6)), jax.tree.leaves(_params(workdir, 6))):
        np.testing.assert_array_equal(la, lb)


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
            if os.path.getsize(p) > 64 and os.sep + "d" + os.sep in p:  # the array data files
                with open(p, "r+b") as fh:
                    fh.truncate(16)
    c = tiny_config()
    ds = data_lib.get_dataset(c.data)
    model = network.build_model(c)
    template = create_train_state(network.init_params(model, ds.image_shape, jax.random.key(0)), make_optimizer(c.optim),
                                  jax.random.key(0))
    reader = Checkpointer(workdir)
    assert int(reader.restore(template, move_aside=False).step) == 3  # a reader (sampling) changes nothing
    reader.close()
    assert Checkpointer(workdir).steps() == [3, 6]
    ckpt = Checkpointer(workdir)
    restored = ckpt.restore(template)
    assert int(restored.step) == 3
    # The corrupt step is renamed, never deleted, so the run's next saves at steps <= 6 land
    # (orbax refuses a step at or below its latest: before, saves 4-6 were silently dropped).
    aside = os.path.join(workdir, "checkpoints.corrupt", "6")
    assert os.path.isdir(aside) and any(files for _, _, files in os.walk(aside))
    assert ckpt.steps() == [3]
    for step in (4, 6):
        ckpt.save(restored.replace(step=jnp.asarray(step, jnp.int32)))
    assert ckpt.steps() == [3, 4, 6]
    with pytest.raises(RuntimeError, match="step 5 was not written"):  # a refused save is an error, not a no-op
        ckpt.save(restored.replace(step=jnp.asarray(5, jnp.int32)))
    ckpt.close()


def test_a_checkpoint_of_another_state_structure_is_an_error_not_corruption(trained, tmp_path):
    """A state of another structure (here a network of another width, as a config change outside
    the fingerprint would make) is named as incompatible, not skipped as corrupt; nothing moves."""
    workdir = str(tmp_path / "incompatible")
    shutil.copytree(trained[0], workdir)
    c = tiny_config(**{"model.base_channels": 16})
    model = network.build_model(c)
    shapes = jax.eval_shape(lambda: create_train_state(network.init_params(model, (8, 8, 1), jax.random.key(0)),
                                                       make_optimizer(c.optim), jax.random.key(0)))
    ckpt = Checkpointer(workdir)
    with pytest.raises(IncompatibleCheckpointError, match=r"checkpoint 6 .* leaf .* has shape"):
        ckpt.restore(shapes)
    ckpt.close()
    assert Checkpointer(workdir).steps() == [3, 6] and not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))


def test_launch_sample_writes_png_and_npz(trained, tmp_path):
    """Labels: --label, class-balanced by default, --null_label; stderr shows no INFO logs unless
    --log_dir (which gets them in a file)."""
    workdir, _ = trained
    npz, balanced, null = (str(tmp_path / f"{n}.npz") for n in ("s", "balanced", "null"))
    png = str(tmp_path / "s.png")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    runs = [(npz, ["--label", "3", "--guidance", "1.0"]), (balanced, []), (null, ["--null_label"]),
            (png, ["--log_dir", str(log_dir)])]
    for out, extra in runs:  # 12 samples each (not a multiple of 10): the unguided runs repeat one program
        r = forked.run_module("launch.sample", "--workdir", workdir, "--num", "12", "--out", out, *extra, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not re.search(r"^I\d{4} ", r.stderr, re.M), r.stderr[-2000:]  # no INFO lines by default
        assert "wrote" in r.stdout
    arr = np.load(npz, allow_pickle=False)
    assert arr["samples"].shape == (12, 8, 8, 1) and arr["samples"].dtype == np.float32
    assert arr["samples"].min() >= -1 and arr["samples"].max() <= 1
    np.testing.assert_array_equal(arr["labels"], [3] * 12)
    counts = np.bincount(np.load(balanced)["labels"], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 12
    np.testing.assert_array_equal(np.load(null)["labels"], [10] * 12)
    assert os.path.getsize(png) > 0
    logs = "".join(p.read_text() for p in log_dir.iterdir() if p.is_file())
    assert re.search(r"^I\d{4} ", logs, re.M)  # --log_dir keeps the INFO lines


def test_launch_sample_rejects_bad_flags(trained, tmp_path):
    """Each bad flag makes launch.sample exit non-zero naming the flag, before writing --out (the
    cases run in one process, each through the command's app.run: run_commands)."""
    workdir, _ = trained
    cases = [(["--label", "10"], "--label"), (["--label", "1", "--guidance", "-1"], "--guidance"),
             (["--guidance", "nan", "--label", "1"], "--guidance"), (["--null_label", "--label", "1"], "--null_label"),
             (["--cond_image", "x.png"], "--cond_image")]
    results = run_commands("launch.sample", [["--workdir", workdir, "--num", "2", "--out", str(tmp_path / "x.png"), *extra]
                                             for extra, _ in cases])
    for (extra, msg), (returncode, stderr, compiles) in zip(cases, results, strict=True):
        assert returncode != 0 and msg in stderr and compiles == 0, (extra, compiles, stderr[-1000:])
    assert not os.path.exists(tmp_path / "x.png")


# The kill tests (SIGKILL at random moments and during saves, SIGTERM) are in test_reliability.py.


# --------------------------------------------------------------------------- any module, frozen parts


def _flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree), sep="/")


@pytest.fixture(scope="module")
def fine_tuned(trained, tmp_path_factory):
    """2 steps of the tiny config that train only the decoder, the rest loaded from `trained`."""
    workdir = str(tmp_path_factory.mktemp("fine_tuned"))
    c = tiny_config(**{"train.num_steps": 2, "train.trainable": "decoder/.*", "train.init_from": trained[0]})
    metrics = loop.train_and_evaluate(c, workdir)
    return workdir, metrics


def test_frozen_params_stay_bit_identical_and_only_trainable_ones_have_ema_and_opt_state(trained, fine_tuned):
    from jdiff.workdir import load_params

    source, _ = load_params(trained[0])
    state = _params(fine_tuned[0])
    src = _flat(source)
    frozen, params, ema = _flat(state["frozen"]), _flat(state["params"]), _flat(state["ema_params"])
    assert frozen and all(k.startswith("encoder/") for k in frozen)
    assert params and all(k.startswith("decoder/") for k in params) and set(ema) == set(params)
    assert set(frozen) | set(params) == set(src)
    for k, v in frozen.items():  # loaded from init_from, then untouched by 2 steps
        np.testing.assert_array_equal(v, src[k], err_msg=k)
    assert any(not np.array_equal(params[k], src[k]) for k in params)  # the decoder trained
    opt_paths = {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
    assert not any("encoder" in p for p in opt_paths) and any("decoder" in p for p in opt_paths)
    assert fine_tuned[1]["num_trainable_params"] < fine_tuned[1]["num_params"]


def test_init_from_with_a_mismatched_shape_names_the_path(trained, tmp_path):
    c = tiny_config(**{"model.base_channels": 16, "train.init_from": trained[0]})
    with pytest.raises(ValueError, match=r"config.train.init_from: param '[a-z_0-9/]+' has shape"):
        loop.train_and_evaluate(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


class _Recorder:
    """A fake network: out = w * x_t, and the conditioning it was called with (eagerly)."""

    def __init__(self):
        self.conds = []

    def __call__(self, params, x, t, cond=None, train=False, rngs=None):
        self.conds.append(cond)
        return params["w"] * x


def _fake_step(c, transform=None, num_classes=10):
    from jdiff.train.step import make_train_step

    rec = _Recorder()
    opt = make_optimizer(c.optim)
    state = create_train_state({"w": jnp.asarray(0.5)}, opt, jax.random.key(0))
    step = make_train_step(rec, config_lib.make_schedule(c), opt, c, transform=transform, num_classes=num_classes)
    return rec, state, step


def test_per_example_loss_weights():
    c = tiny_config()
    x0 = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
    _, state, step = _fake_step(c, num_classes=None)
    loss = lambda b: float(step(state, b)[1]["loss"])  # noqa: E731
    plain = loss({"image": x0})
    np.testing.assert_allclose(loss({"image": x0, "loss_weight": jnp.full((4,), 2.0)}), 2 * plain, rtol=1e-6)
    w = jnp.array([1.0, 0.0, 0.0, 0.0])
    garbage = x0.at[1:].set(123.0)
    np.testing.assert_allclose(loss({"image": x0, "loss_weight": w}), loss({"image": garbage, "loss_weight": w}), rtol=1e-6)
    with pytest.raises(ValueError, match=r"batch\['loss_weight'\]"):
        step(state, {"image": x0, "loss_weight": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"batch: unknown key.*'label'.*cond"):
        step(state, {"image": x0, "label": jnp.zeros(4, jnp.int32)})


def test_p_uncond_drops_any_conditioning_to_its_null_value():
    c = tiny_config(**{"diffusion.p_uncond": 0.5})
    c.diffusion.uncond_keys = ("context", "context_mask")
    B = 64
    context = jax.random.normal(jax.random.key(2), (B, 3, 4)) + 5.0
    cond = {"label": jnp.arange(B, dtype=jnp.int32) % 10, "context": context, "context_mask": jnp.ones((B, 3), bool)}
    rec, state, step = _fake_step(c)
    step(state, {"image": jnp.zeros((B, 8, 8, 1)), "cond": cond})
    seen = {k: np.asarray(v) for k, v in rec.conds[-1].items()}
    dropped = ~seen["context_mask"].any(axis=1)
    assert 10 < dropped.sum() < B - 10
    np.testing.assert_array_equal(seen["context"][dropped], 0.0)
    np.testing.assert_array_equal(seen["context"][~dropped], np.asarray(context)[~dropped])
    assert seen["context_mask"][~dropped].all()
    np.testing.assert_array_equal(seen["label"], np.asarray(cond["label"]))  # not in uncond_keys


def test_batch_transforms_run_inside_the_step_with_their_own_key():
    from jdiff.train import transforms

    keys = []

    def zero_weight():
        def transform(batch, key):
            keys.append(jax.random.key_data(key))
            return {**batch, "loss_weight": jnp.zeros(batch["image"].shape[:1])}

        return transform

    transforms.register("test_zero_weight", zero_weight)
    c = tiny_config()
    _, state, step = _fake_step(c, transform=transforms.get("test_zero_weight"), num_classes=None)
    new, m = step(state, {"image": jnp.ones((2, 8, 8, 1))})
    assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0
    step(new, {"image": jnp.ones((2, 8, 8, 1))})
    assert not np.array_equal(keys[0], keys[1])  # a fresh key every step

    down = transforms.get("downsample_image", {"factor": 2})
    x0 = jax.random.uniform(jax.random.key(3), (2, 8, 8, 1), minval=-1, maxval=1)
    out = down({"image": x0, "cond": {"label": jnp.zeros(2, jnp.int32)}}, jax.random.key(0))
    want = jax.image.resize(jax.image.resize(x0, (2, 4, 4, 1), "bilinear"), (2, 8, 8, 1), "bilinear")
    np.testing.assert_allclose(out["cond"]["image"], want)
    assert set(out["cond"]) == {"label", "image"}
    with pytest.raises(ValueError, match="config.data.transform: unknown transform 'nope'"):
        transforms.get("nope")
    with pytest.raises(ValueError, match="config.data.transform_kwargs"):
        transforms.get("downsample_image", {"factr": 2})


class _SmallNet(nn.Module):
    """A network with the U-Net's call signature; ``features`` a tuple (hashable) or a list (not)."""

    features: Any

    @nn.compact
    def __call__(self, x, t, cond=None):
        h = nn.Conv(self.features[0], (3, 3))(x)
        return nn.Dense(x.shape[-1])(nn.swish(h)) * t[:, None, None, None]


def test_init_params_is_module_init_compiled_once_per_module_and_shapes():
    key = jax.random.key(3)
    params = network.init_params(_SmallNet((4,)), (6, 6, 2), key)
    with jax.disable_jit():  # module.init op by op: the values init_params stands for
        eager = _SmallNet((4,)).init({"params": key}, jnp.zeros((1, 6, 6, 2)), jnp.zeros((1,), jnp.int32))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(eager)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params, eager)
    compiled = network._init._cache_size()
    again = network.init_params(_SmallNet((4,)), (6, 6, 2), key)  # an equal module: the same program
    assert network._init._cache_size() == compiled
    jax.tree.map(np.testing.assert_array_equal, params, again)
    network.init_params(_SmallNet((4,)), (5, 5, 2), key)  # other shapes: one more program
    assert network._init._cache_size() == compiled + 1
    # A field that cannot be hashed cannot key the compiled init: module.init runs as it is.
    listed = network.init_params(_SmallNet([4]), (6, 6, 2), key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), listed, eager)
    assert network._init._cache_size() == compiled + 1


def test_warmup_zero_trains_at_full_rate_from_step_zero():
    from jdiff.train.state import learning_rate

    c = tiny_config(**{"optim.warmup_steps": 0})
    assert float(learning_rate(c.optim)(0)) == c.optim.lr
    opt = make_optimizer(c.optim)
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    assert float(jnp.abs(updates["w"]).min()) > 0.5 * c.optim.lr
    assert float(learning_rate(tiny_config(**{"optim.warmup_steps": 4}).optim)(0)) == 0.0


@pytest.mark.parametrize("overrides, match", [
    ({"sample.method": "dpmm"}, r"config.sample.method: expected one of .*'ddim'.*got 'dpmm'"),
    ({"sample.steps": 21}, r"config.sample.steps: expected None or an int in \[1, 20\]"),
    ({"sample.steps": 0}, r"config.sample.steps"),
    ({"sample.method": "ddpm", "sample.eta": 0.5}, r"config.sample .*eta"),
    ({"model.num_classes": None, "diffusion.p_uncond": 0.0, "sample.guidance": 1.0}, r"config.sample.guidance"),
    ({"model.num_classes": None}, r"config.diffusion.p_uncond"),
    ({"eval.evaluator": "inception_fid"}, r"config.eval.evaluator: unknown evaluator 'inception_fid'"),
    ({"data.name": "shapes", "data.resolution": 8, "model.num_classes": None, "diffusion.p_uncond": 0.0,
      "eval.num_samples": 8}, r"config.eval.evaluator: 'digits' scores"),
    ({"data.transform": "nope"}, r"config.data.transform: unknown transform"),
    ({"model.image_channels": 1}, r"config.model.image_channels: 1 needs cond\['image'\]"),
    ({"train.trainable": "no/such/param"}, r"config.train.trainable: 'no/such/param' matches no parameter"),
    ({"train.init_from": "/no/such/workdir"}, r"workdir: '/no/such/workdir' has no config.json"),
    ({"optim.warmup_steps": -1}, r"config.optim.warmup_steps"),
])
def test_sample_eval_and_run_settings_are_checked_before_anything_is_written(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
