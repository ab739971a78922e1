"""Latent diffusion (issue 19): the KL autoencoder, its loss against an independent float64
quadrature of the KL, the unit-variance scale factor, autoencoder directories, latent datasets,
and a latent text model through the training loop and launch.sample."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import latent
from jdiff.data import captions as cap
from jdiff.data import get_dataset
from jdiff.models import Autoencoder
from jdiff.train import autoencoder as ae_lib
from jdiff.train import clip as clip_lib
from jdiff.train.loop import train_and_evaluate

import forked
from commands import finish_commands, start_commands

AE_TINY = dict(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)
DATA = {"name": "captioned_shapes", "resolution": 16, "num_examples": 200}


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    module = Autoencoder(image_channels=3, **AE_TINY)
    # Jitted: an eager init compiles each of its operations separately.
    params = jax.jit(module.init)({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 3)), jax.random.key(1))["params"]
    images = get_dataset(DATA).source["image"]
    scale = latent.latent_scale(module, params, images)
    directory = str(tmp_path_factory.mktemp("ae") / "ae")
    latent.save_autoencoder(directory, module, params, scale=scale, image_shape=(16, 16, 3), metrics={"psnr_test": 0.0})
    return directory, module, params, scale, images


def test_image_shape_of_reads_the_autoencoder_json_and_encodes_nothing(autoencoder, monkeypatch):
    """The latent shape get_dataset gives, read off the autoencoder's JSON: sampling a latent
    workdir does not encode its training set (nor touch JAX before a launch command sets devices)."""
    from jdiff.data import image_shape_of

    directory = autoencoder[0]
    want = get_dataset({**DATA, "autoencoder": directory}).image_shape

    def refused(*a, **kw):
        raise AssertionError("image_shape_of encoded the dataset or loaded the autoencoder")

    monkeypatch.setattr(latent, "encode", refused)
    monkeypatch.setattr(latent, "load_autoencoder", refused)
    assert image_shape_of({**DATA, "autoencoder": directory}) == want == (8, 8, 4)
    with pytest.raises(ValueError, match=r"was trained on \(16, 16, 3\) images, dataset 'captioned_shapes' has \(32, 32, 3\)"):
        image_shape_of({**DATA, "resolution": 32, "autoencoder": directory})


def test_shapes_and_factor(autoencoder):
    _, module, params, _, images = autoencoder
    # Jitted: one program per method, not one per operation.
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=Autoencoder.encode))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=Autoencoder.decode))
    forward = jax.jit(lambda p, x, key: module.apply({"params": p}, x, key))
    mean, logvar = encode(params, images[:3])
    assert mean.shape == logvar.shape == (3, 8, 8, 4) and module.factor == 2
    assert decode(params, mean).shape == (3, 16, 16, 3)
    rec, m2, _ = forward(params, images[:3], jax.random.key(0))
    assert rec.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(m2), np.asarray(mean), atol=1e-6)
    assert Autoencoder(channel_mult=(1, 2, 2)).factor == 4


def test_autoencoder_bad_input(autoencoder):
    _, module, params, _, _ = autoencoder
    with pytest.raises(ValueError, match=r"x: expected \[B, H, W, 3\] with H and W divisible by 2, got shape \(1, 15, 16, 3\)"):
        module.apply({"params": params}, np.zeros((1, 15, 16, 3), np.float32), method=Autoencoder.encode)
    with pytest.raises(ValueError, match=r"z: expected \[B, H, W, 4\]"):
        module.apply({"params": params}, np.zeros((1, 8, 8, 3), np.float32), method=Autoencoder.decode)
    with pytest.raises(ValueError, match="latent_channels: expected a positive int, got 0"):
        Autoencoder(latent_channels=0)
    with pytest.raises(ValueError, match="channel_mult: expected a non-empty sequence of positive ints"):
        Autoencoder(channel_mult=())
    with pytest.raises(ValueError, match="scale: expected a finite positive scale factor"):
        latent.save_autoencoder("/nonexistent", module, params, scale=0.0, image_shape=(16, 16, 3))


def test_kl_matches_a_float64_quadrature():
    """KL(N(mu, s^2) || N(0, 1)) = integral q log(q / p), computed on a fine grid in float64."""
    mu = np.array([0.0, 0.7, -1.5, 2.0])
    logvar = np.array([0.0, -1.0, 0.5, -3.0])
    got = np.asarray(ae_lib.kl_divergence(jnp.asarray(mu, jnp.float32), jnp.asarray(logvar, jnp.float32)))
    z = np.linspace(-12, 12, 200001)
    want = []
    for m, lv in zip(mu, logvar):
        s2 = np.exp(lv)
        log_q = -0.5 * (z - m) ** 2 / s2 - 0.5 * np.log(2 * np.pi * s2)
        log_p = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
        want.append(np.trapezoid(np.exp(log_q) * (log_q - log_p), z))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 2, 2, 3)
    loss, terms = ae_lib.autoencoder_loss(x + 0.5, x, jnp.asarray(mu[None], jnp.float32), jnp.asarray(logvar[None], jnp.float32), 0.1)
    np.testing.assert_allclose(float(terms["mse"]), 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.25 + 0.1 * np.mean(want), rtol=1e-5)


def test_scaled_latents_have_unit_variance_and_batching_is_exact(autoencoder):
    _, module, params, scale, images = autoencoder
    z = latent.encode(module, params, images, scale, batch_size=64)  # 200 = 3 full batches + a padded one
    assert z.shape == (200, 8, 8, 4)
    np.testing.assert_allclose(z.astype(np.float64).std(), 1.0, rtol=1e-4)
    np.testing.assert_allclose(latent.encode(module, params, images[:7], scale, batch_size=500), z[:7], atol=1e-5)
    x = latent.decode(module, params, z[:70], scale, batch_size=32)
    assert x.shape == (70, 16, 16, 3) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(latent.decode(module, params, z[65:70], scale), x[65:], atol=1e-5)


def test_psnr():
    x = np.zeros((2, 4, 4, 1))
    y = x + np.array([0.1, 0.2]).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(latent.psnr(x, y), np.mean([10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.04)]))
    with pytest.raises(ValueError, match="x, y: expected two"):
        latent.psnr(x, y[:1])


def test_directory_round_trip(autoencoder, tmp_path):
    directory, module, params, scale, _ = autoencoder
    m2, p2, info = latent.load_autoencoder(directory)
    assert m2 == module and info["scale"] == scale and info["image_shape"] == [16, 16, 3]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="has no autoencoder.json and autoencoder.msgpack; expected a directory written by "
                                         "launch.train_autoencoder"):
        latent.load_autoencoder(str(tmp_path))


def test_training_improves_reconstruction():
    # 40 steps: measured 12.07 dB of test PSNR from 4.51 dB at init, 7.6 dB up against the 3 dB
    # asked (80 steps: 16.05 dB, for 1.5x the CPU).
    module, params, metrics = ae_lib.train_autoencoder(DATA, num_steps=40, batch_size=16, scale_examples=200, **AE_TINY)
    test = get_dataset(DATA, split="test").source["image"][:1000]
    init = jax.jit(module.init)({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 3)), jax.random.key(1))["params"]
    s0 = latent.latent_scale(module, init, test)
    before = latent.psnr(latent.decode(module, init, latent.encode(module, init, test, s0), s0), test)
    assert metrics["psnr_test"] > before + 3, (metrics, before)
    assert metrics["latent_shape"] == [8, 8, 4] and np.isfinite(metrics["kl"])
    with pytest.raises(ValueError, match="data_config: autoencoder='x'; an autoencoder trains on pixels"):
        ae_lib.train_autoencoder({**DATA, "autoencoder": "x"})
    with pytest.raises(ValueError, match="num_steps: expected an int >= 1, got 0"):
        ae_lib.train_autoencoder(DATA, num_steps=0)


def test_latent_dataset(autoencoder):
    directory, module, params, scale, images = autoencoder
    d = get_dataset({**DATA, "autoencoder": directory})
    assert d.image_shape == (8, 8, 4) and set(d.source) == {"image", "tokens"}
    np.testing.assert_allclose(d.source["image"], latent.encode(module, params, images, scale), atol=1e-6)
    with pytest.raises(ValueError, match=r"autoencoder: .* was trained on \(16, 16, 3\) images, dataset 'captioned_shapes' has \(32, 32, 3\)"):
        get_dataset({**DATA, "resolution": 32, "autoencoder": directory})
    with pytest.raises(ValueError, match="control: 'mask' with autoencoder"):
        get_dataset({"name": "shapes", "resolution": 16, "num_examples": 10, "control": "mask", "autoencoder": directory})


def _latent_text_config(directory: str):
    from test_text_to_image import _text_config

    c = _text_config()
    c.data.autoencoder = directory
    c.data.num_examples = 200
    c.sample.clip = False
    return c


def test_latent_text_model_trains_and_samples_pixels(autoencoder, tmp_path):
    directory, module, params, scale, _ = autoencoder
    workdir = str(tmp_path / "w")
    bad = _latent_text_config(directory)
    bad.sample.clip = True
    with pytest.raises(ValueError, match=r"config.sample.clip: True clips x_0 to \[-1, 1\], but the model samples latents"):
        train_and_evaluate(bad, workdir)
    metrics = train_and_evaluate(_latent_text_config(directory), workdir)
    assert metrics["step"] == 2
    from PIL import Image

    from jdiff import images as images_lib

    images_lib.save_grid(np.zeros((4, 16, 16, 3), np.float32), str(tmp_path / "pixels.png"))
    grid = np.asarray(Image.open(os.path.join(workdir, "samples.png")))
    assert grid.shape == np.asarray(Image.open(tmp_path / "pixels.png")).shape  # decoded: 16x16 RGB tiles
    out = str(tmp_path / "x.npz")
    r = forked.run_module("launch.sample", "--workdir", workdir, "--num", "3", "--out", out, "--prompt",
                          "a red disc at the top left", "--guidance", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(out)["samples"]
    assert x.shape == (3, 16, 16, 3)
    from jdiff.inference import generate
    from jdiff.workdir import load_for_sampling

    loaded = load_for_sampling(workdir)
    assert loaded.image_shape == (8, 8, 4)
    ids, _ = cap.Tokenizer().encode(["a red disc at the top left"] * 3)
    s = loaded.config.sample
    z = generate(loaded.model, loaded.params, loaded.schedule, loaded.image_shape, 3, jax.random.key(0),
                 cond={"tokens": ids}, guidance_weight=1.0, batch_size=s.batch_size, method=s.method, steps=s.steps,
                 eta=s.eta, clip=None)
    np.testing.assert_allclose(x, latent.decode(module, params, z, scale), atol=1e-4)


def test_training_commands(tmp_path):
    """launch.train_autoencoder and launch.train_clip write directories their loaders read; bad
    flags are refused by name and write nothing."""
    def run(*args):
        return forked.popen_module(*args)

    ae_dir, clip_dir = str(tmp_path / "ae"), str(tmp_path / "clip")
    ok = [run("launch.train_autoencoder", "--workdir", ae_dir, "--steps", "3", "--num_examples", "64", "--batch_size", "8",
              "--base_channels", "8"),
          run("launch.train_clip", "--workdir", clip_dir, "--steps", "2", "--batch_size", "4", "--eval_pairs", "4",
              "--noised", "--num_timesteps", "20", "--schedule", "linear")]
    bad_dir = str(tmp_path / "bad")
    cases = {
        "ae-mult": (["launch.train_autoencoder", "--workdir", bad_dir, "--channel_mult", "1,x"], r"--channel_mult: expected comma-separated"),
        "ae-lr": (["launch.train_autoencoder", "--workdir", bad_dir, "--lr", "-1"], r"--lr: expected a positive learning rate"),
        "ae-data": (["launch.train_autoencoder", "--workdir", bad_dir, "--data", "captioned_shapes", "--resolution", "8"],
                    r"resolution: expected at least 16 for captioned_shapes"),
        "clip-resolution": (["launch.train_clip", "--workdir", bad_dir, "--resolution", "8"], r"--resolution: expected an int >= 16, got 8"),
        "clip-batch": (["launch.train_clip", "--workdir", bad_dir, "--batch_size", "1"], r"--batch_size: expected an int >= 2, got 1"),
    }
    # The refusals of each command in one process, through its app.run (a fresh process each costs its imports).
    modules = dict.fromkeys(args[0] for args, _ in cases.values())
    keys = {module: [k for k, (args, _) in cases.items() if args[0] == module] for module in modules}
    procs = {module: start_commands(module, [cases[k][0][1:] for k in ks]) for module, ks in keys.items()}
    refused = {k: r for module, ks in keys.items() for k, r in zip(ks, finish_commands(procs[module]), strict=True)}
    assert set(refused) == set(cases)
    for k, (code, err, compiles) in refused.items():
        assert code != 0 and re.search(cases[k][1], err), (k, err[-2000:])
        assert compiles == 0, (k, compiles)  # refused before anything is built
    assert not os.path.exists(bad_dir)
    for p in ok:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    module, params, info = latent.load_autoencoder(ae_dir)
    assert module.base_channels == 8 and info["scale"] > 0 and np.isfinite(info["metrics"]["psnr_test"])
    cmod, _, cinfo = clip_lib.load_clip(clip_dir)
    assert cinfo["noised"] and cinfo["schedule"] == {"name": "linear", "num_timesteps": 20}
    assert set(cinfo["metrics"]) == {"loss", "retrieval_t0", "retrieval_t5", "retrieval_t10", "retrieval_t15"}
