"""Inference and the command line apart from training: model functions, balanced labels, and a
cond["image"] model trained and sampled through `python -m launch.train` / `launch.sample`."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import data as data_lib
from jdiff.inference import balanced_labels, generate, model_fn_for
from jdiff.train import config as config_lib
from jdiff.train import network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny, tiny_image_cond  # noqa: E402
import forked  # noqa: E402
from commands import run_commands  # noqa: E402


@pytest.fixture(scope="module")
def conditional():
    c = tiny.get_config()
    model = network.build_model(c)
    return model, network.init_params(model, (8, 8, 1), jax.random.key(0)), config_lib.make_schedule(c)


def test_balanced_labels_differ_by_at_most_one_and_fill_grid_rows():
    for k in (1, 3, 10):
        for num in range(1, 41):
            y = balanced_labels(num, k)
            counts = np.bincount(y, minlength=k)
            assert y.shape == (num,) and counts.max() - counts.min() <= 1, (num, k, counts)
            assert y.min() >= 0 and y.max() < k
        rows = balanced_labels(k * k, k).reshape(k, k)
        np.testing.assert_array_equal(rows, np.repeat(np.arange(k)[:, None], k, axis=1))
    with pytest.raises(ValueError, match="num"):
        balanced_labels(0, 10)


def test_model_fn_for_without_labels_is_the_null_class(conditional):
    model, params, _ = conditional
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t = jnp.array([0, 5, 19])
    out = model_fn_for(model, params, None)(x, t)
    want = model.apply({"params": params}, x, t, cond={"label": jnp.full((3,), model.num_classes, jnp.int32)})
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    labelled = model_fn_for(model, params, jnp.array([1, 2, 3]))(x, t)
    np.testing.assert_allclose(labelled, model.apply({"params": params}, x, t, cond={"label": jnp.array([1, 2, 3])}),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_weight"):
        model_fn_for(model, params, None, 2.0)


def test_generate_takes_a_cond_dict():
    c = tiny_image_cond.get_config()
    model = network.build_model(c)
    params = network.init_params(model, (8, 8, 1), jax.random.key(0))
    schedule = config_lib.make_schedule(c)
    low = np.zeros((3, 8, 8, 1), np.float32)
    x = generate(model, params, schedule, (8, 8, 1), 3, jax.random.key(0), cond={"image": low}, method="ddim", steps=2)
    assert x.shape == (3, 8, 8, 1) and np.isfinite(x).all()
    with pytest.raises(ValueError, match=r"cond\['image'\]"):
        generate(model, params, schedule, (8, 8, 1), 3, jax.random.key(0), cond={"image": low[:, :4]}, method="ddim",
                 steps=2)


def _run(args):
    return forked.run_module(*args)


@pytest.mark.slow  # two CLI processes that compile a U-Net: ~45-60 s
def test_image_conditioned_model_trains_and_samples_through_the_command_line(tmp_path):
    """configs/tiny_image_cond.py: cond["image"] made by the "downsample_image" transform in the
    train step; launch.sample takes it from --cond_image (a low-resolution PNG, or an NPZ)."""
    from PIL import Image

    workdir = str(tmp_path / "sr")
    r = _run(["launch.train", "--config", os.path.join(ROOT, "configs", "tiny_image_cond.py"), "--workdir", workdir,
              "--config.train.num_steps=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "samples.png"))
    digits, _ = data_lib.load_digits("test")
    low = np.asarray(jax.image.resize(jnp.asarray(digits[:2]), (2, 4, 4, 1), "bilinear"))
    png = str(tmp_path / "low.png")
    Image.fromarray(np.clip((low[0, ..., 0] + 1) * 127.5, 0, 255).astype(np.uint8)).save(png)
    npz = str(tmp_path / "low.npz")
    np.savez(npz, image=np.clip(low, -1, 1))
    for cond_image, out in [(png, tmp_path / "a.npz"), (npz, tmp_path / "b.npz")]:
        r = _run(["launch.sample", "--workdir", workdir, "--num", "2", "--out", str(out), "--cond_image", cond_image])
        assert r.returncode == 0, r.stderr[-3000:]
        samples = np.load(out)["samples"]
        assert samples.shape == (2, 8, 8, 1) and np.isfinite(samples).all()
    r = _run(["launch.sample", "--workdir", workdir, "--num", "2", "--out", str(tmp_path / "c.png")])
    assert r.returncode != 0 and "--cond_image" in r.stderr
    assert not os.path.exists(tmp_path / "c.png")


@pytest.mark.slow  # a tiny training run and four launch.sample processes
def test_sdedit_and_repaint_from_the_command_line(tmp_path):
    """launch.sample --sdedit GUIDE --t0 N and --repaint IMG --mask MASK: PNG in, grid / npz out;
    the known pixels of a RePaint come back exactly; bad t0, mask or image size fail before sampling."""
    from PIL import Image

    workdir = str(tmp_path / "tiny")
    r = _run(["launch.train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", workdir,
              "--config.train.num_steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    guide = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(guide).save(tmp_path / "guide.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(guide[:4, :4]).save(tmp_path / "small.png")
    r = _run(["launch.sample", "--workdir", workdir, "--num", "4", "--sdedit", str(tmp_path / "guide.png"), "--t0", "10",
              "--out", str(tmp_path / "sd.npz")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(tmp_path / "sd.npz")["samples"].shape == (4, 8, 8, 1)
    r = _run(["launch.sample", "--workdir", workdir, "--num", "4", "--repaint", str(tmp_path / "guide.png"), "--mask",
              str(tmp_path / "mask.png"), "--steps", "10", "--jump_length", "3", "--jump_n_sample", "2",
              "--out", str(tmp_path / "rp.npz")])
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(tmp_path / "rp.npz")["samples"]
    np.testing.assert_array_equal(x[:, :, :4, 0], np.broadcast_to(guide[:, :4].astype(np.float32) / 127.5 - 1.0, (4, 8, 4)))
    bad = [(["--sdedit", str(tmp_path / "guide.png"), "--t0", "20"], "--t0"),
           (["--sdedit", str(tmp_path / "small.png"), "--t0", "5"], "--sdedit: expected an image of the model's size"),
           (["--repaint", str(tmp_path / "guide.png"), "--mask", str(tmp_path / "small.png")], "--mask"),
           (["--inpaint", str(tmp_path / "guide.png"), "--mask", str(tmp_path / "mask.png")],
            "--inpaint: expected a workdir of an inpainting model"),
           (["--inpaint", str(tmp_path / "guide.png"), "--sdedit", str(tmp_path / "guide.png")], "at most one")]
    # The refusals in one process, each through launch.sample's app.run (a fresh process each costs its imports).
    results = run_commands("launch.sample", [["--workdir", workdir, "--num", "4", *args, "--out", str(tmp_path / "bad.png")]
                                             for args, _ in bad])
    for (args, msg), (returncode, stderr, compiles) in zip(bad, results, strict=True):
        assert returncode != 0 and msg in stderr and compiles == 0, (args, compiles, stderr[-2000:])
    assert not os.path.exists(tmp_path / "bad.png")


@pytest.mark.slow  # a tiny training run and three launch.sample processes
def test_inpainting_model_trains_and_inpaints_through_the_command_line(tmp_path):
    """configs/tiny_inpaint.py (data.transform='inpaint', image_channels = C + 1) trains from the command line, and
    launch.sample --inpaint IMG --mask MASK completes the image with its known pixels exact; a
    wrong or missing mask fails before sampling (a plain model: test_sdedit_and_repaint_...)."""
    from PIL import Image

    workdir = str(tmp_path / "inpaint")
    r = _run(["launch.train", "--config", os.path.join(ROOT, "configs", "tiny_inpaint.py"), "--workdir", workdir,
              "--config.train.num_steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    digits, _ = data_lib.load_digits("test")
    image = np.clip((digits[0, ..., 0] + 1) * 127.5, 0, 255).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "digit.png")
    mask = np.full((8, 8), 255, np.uint8)
    mask[2:6, 2:6] = 0  # a hole in the middle
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = _run(["launch.sample", "--workdir", workdir, "--num", "3", "--inpaint", str(tmp_path / "digit.png"), "--mask",
              str(tmp_path / "mask.png"), "--out", str(tmp_path / "x.npz")])
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(tmp_path / "x.npz")["samples"]
    known = np.broadcast_to(mask > 0, (3, 8, 8))
    np.testing.assert_array_equal(x[..., 0][known], np.broadcast_to(image.astype(np.float32) / 127.5 - 1.0, (3, 8, 8))[known])
    assert np.isfinite(x).all() and not np.allclose(x[:, 2:6, 2:6, 0], 0.0)
    Image.fromarray(mask[:4, :4]).save(tmp_path / "small_mask.png")
    bad = [(["--mask", str(tmp_path / "small_mask.png")], "--mask"), ([], "--mask: --inpaint needs a mask"),
           (["--mask", str(tmp_path / "mask.png"), "--cond_image", str(tmp_path / "digit.png")], "--cond_image")]
    # The refusals in one process, each through launch.sample's app.run (a fresh process each costs its imports).
    results = run_commands("launch.sample", [["--workdir", workdir, "--num", "3", "--inpaint", str(tmp_path / "digit.png"),
                                              *args, "--out", str(tmp_path / "bad.png")] for args, _ in bad])
    for (args, msg), (returncode, stderr, compiles) in zip(bad, results, strict=True):
        assert returncode != 0 and msg in stderr and compiles == 0, (args, compiles, stderr[-2000:])
    assert not os.path.exists(tmp_path / "bad.png")


def test_every_command_sets_the_gc_thresholds_and_so_does_every_process_the_suite_starts():
    """``launch.common.configure_gc`` sets :data:`launch.common.GC_THRESHOLDS`; every command's
    ``main`` calls it first; tests/site/sitecustomize.py gives a process the suite starts the same."""
    import ast
    import gc
    import glob

    from conftest import GC_THRESHOLDS

    from launch import common

    assert common.GC_THRESHOLDS == GC_THRESHOLDS != (700, 10, 10)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        common.configure_gc()
        assert gc.get_threshold() == common.GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)
    checked = []
    for path in sorted(glob.glob(os.path.join(ROOT, "launch", "*.py"))):
        tree = ast.parse(open(path).read())
        mains = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main"]
        if not mains or "app.run(" not in open(path).read():
            continue
        calls = [ast.unparse(n.func) for n in ast.walk(mains[0]) if isinstance(n, ast.Call)]
        assert "common.configure_gc" in calls, f"{path}: main() does not call common.configure_gc()"
        assert calls.index("common.configure_gc") < calls.index("common.configure_logging"), path
        checked.append(os.path.basename(path))
    assert len(checked) == 8 and "train.py" in checked and "sample.py" in checked, checked
    child = subprocess.run([sys.executable, "-c", "import gc; print(tuple(gc.get_threshold()))"], capture_output=True,
                           text=True, check=True)
    assert child.stdout.strip() == str(tuple(common.GC_THRESHOLDS)), child
