"""unCLIP (issue 19): CLIP-embedded datasets, the EmbeddingPrior, the two-stage pipeline
(jdiff.unclip) and launch.sample --prior_workdir, on tiny models trained for two steps."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest

from jdiff import models
from jdiff.data import captions as cap
from jdiff.data import get_dataset
from jdiff.inference import generate
from jdiff.models import EmbeddingPrior
from jdiff.models.text import CLIP
from jdiff.train import clip as clip_lib
from jdiff.train import config as config_lib
from jdiff.train.loop import train_and_evaluate
from jdiff.unclip import StageSettings, text_embeddings, unclip
from jdiff.workdir import load_for_sampling
import forked
from commands import run_commands
from test_text_to_image import _randomized, _two_step_run

D = 8
CLIP_TINY = dict(embed_dim=D, text_width=16, text_layers=1, text_heads=2, image_channels_base=8,
                 image_channel_mult=(1, 2), image_res_blocks=1, image_attention_resolutions=(8,))
DATA = {"name": "captioned_shapes", "resolution": 16, "num_examples": 64}


def _clip(directory: str, noised: bool = False):
    module = CLIP(vocab_size=cap.Tokenizer().vocab_size, **CLIP_TINY)
    ids = np.ones((1, 20), np.int32)
    # Jitted: an eager init compiles each of its operations separately.
    params = jax.jit(module.init)(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32), np.zeros((1,), np.int32), ids, ids > 0)
    params = _randomized(params["params"], 1, 0.1)
    clip_lib.save_clip(directory, module, params, resolution=16, noised=noised,
                       schedule={"name": "linear", "num_timesteps": 20} if noised else None)
    return module, params


def _config(role: str, clip_dir: str):
    c = config_lib.base_config()
    c.data.update(DATA)
    c.data.batch_size = 8
    c.data.clip_workdir = clip_dir
    c.data.clip_embeddings = role
    if role == "prior":
        c.model_name = "embedding_prior"
        c.model.width = 16
        c.model.depth = 1
        c.model.context_dim = D
        c.diffusion.parameterization = "x0"  # as configs/shapes_unclip_prior.py
    else:
        for k, v in dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
                         dropout=0.0, context_dim=D).items():
            c.model[k] = v
    _two_step_run(c, guidance=1.0)
    c.sample.clip = role == "decoder"
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    clip_dir = str(root / "clip")
    module, params = _clip(clip_dir)
    prior_dir, decoder_dir = str(root / "prior"), str(root / "decoder")
    prior_metrics = train_and_evaluate(_config("prior", clip_dir), prior_dir)
    train_and_evaluate(_config("decoder", clip_dir), decoder_dir)
    return clip_dir, module, params, prior_dir, decoder_dir, prior_metrics


def test_clip_embedded_datasets(trained, tmp_path):
    clip_dir, module, params, *_ = trained
    plain = get_dataset(DATA)
    ids = plain.source["tokens"]
    img, txt = clip_lib.embed(module, params, plain.source["image"], np.zeros(64, np.int32), ids, ids != 0)
    prior = get_dataset({**DATA, "clip_workdir": clip_dir, "clip_embeddings": "prior"})
    assert prior.image_shape == (1, 1, D)
    np.testing.assert_allclose(prior.source["image"], img[:, None, None, :] * np.sqrt(D), atol=1e-5)
    np.testing.assert_allclose(prior.source["context"], txt[:, None, :], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(prior.source["image"], axis=-1), np.sqrt(D), rtol=1e-5)
    decoder = get_dataset({**DATA, "clip_workdir": clip_dir, "clip_embeddings": "decoder"})
    assert decoder.image_shape == (16, 16, 3)
    np.testing.assert_allclose(decoder.source["context"], img[:, None, :], atol=1e-5)
    _clip(str(tmp_path / "noised"), noised=True)
    for cfg, match in (
        ({**DATA, "clip_workdir": str(tmp_path / "noised"), "clip_embeddings": "prior"}, "is a noised CLIP; unCLIP embeds clean images"),
        ({**DATA, "clip_embeddings": "prior"}, "clip_workdir: clip_embeddings='prior' needs a CLIP workdir"),
        ({**DATA, "clip_workdir": clip_dir, "clip_embeddings": "priors"}, r"clip_embeddings: expected '' or one of \('decoder', 'prior'\)"),
        ({**DATA, "resolution": 32, "clip_workdir": clip_dir, "clip_embeddings": "prior"}, r"sees 16x16 RGB images, dataset 'captioned_shapes' has \(32, 32, 3\)"),
        ({"name": "shapes", "resolution": 16, "num_examples": 8, "clip_workdir": clip_dir, "clip_embeddings": "decoder"},
         "needs a captioned in-memory dataset"),
    ):
        with pytest.raises(ValueError, match=match):
            get_dataset(cfg)


def test_image_shape_of_reads_the_clip_json_and_embeds_nothing(trained, monkeypatch):
    """A prior's (1, 1, D) and a decoder's image shape, as get_dataset gives them, without embedding
    the dataset (sampling an unCLIP workdir reads only this shape) or loading the CLIP."""
    from jdiff.data import image_shape_of

    clip_dir = trained[0]
    want = {role: get_dataset({**DATA, "clip_workdir": clip_dir, "clip_embeddings": role}).image_shape
            for role in ("prior", "decoder")}

    def refused(*a, **kw):
        raise AssertionError("image_shape_of embedded the dataset or loaded the CLIP")

    monkeypatch.setattr(clip_lib, "embed", refused)
    monkeypatch.setattr(clip_lib, "load_clip", refused)
    for role in ("prior", "decoder"):
        assert image_shape_of({**DATA, "clip_workdir": clip_dir, "clip_embeddings": role}) == want[role]
    assert want["prior"] == (1, 1, D)
    with pytest.raises(ValueError, match="clip_workdir: clip_embeddings='prior' needs a CLIP workdir"):
        image_shape_of({**DATA, "clip_embeddings": "prior"})


def test_embedding_prior_network():
    net = EmbeddingPrior(width=16, depth=2, context_dim=D)
    x = np.random.default_rng(0).normal(size=(3, 1, 1, D)).astype(np.float32)
    t = np.array([1, 5, 9], np.int32)
    ctx = np.random.default_rng(1).normal(size=(3, 1, D)).astype(np.float32)
    params = _randomized(jax.jit(net.init)(jax.random.key(0), x, t, {"context": ctx})["params"], 2)
    out = net.apply({"params": params}, x, t, {"context": ctx})
    assert out.shape == (3, 1, 1, D)
    null = net.apply({"params": params}, x, t, {"context": ctx, "context_mask": np.zeros((3, 1), bool)})
    np.testing.assert_allclose(np.asarray(net.apply({"params": params}, x, t)), np.asarray(null), atol=1e-6)
    assert np.abs(np.asarray(out) - np.asarray(null)).max() > 1e-3, "the context is read"
    with pytest.raises(ValueError, match=r"x: expected an embedding batch \[B, 1, 1, D\]"):
        net.apply({"params": params}, x.reshape(3, D), t)
    with pytest.raises(ValueError, match=r"cond: keys \['label'\] given, but an EmbeddingPrior reads only"):
        net.apply({"params": params}, x, t, {"label": np.zeros(3, np.int32)})
    with pytest.raises(ValueError, match="width: expected a positive int, got 0"):
        EmbeddingPrior(width=0)
    assert models.resolve("embedding_prior") is EmbeddingPrior


def test_prior_run_writes_embeddings(trained):
    prior_dir, metrics = trained[3], trained[5]
    assert metrics["samples_png"].endswith("samples.npz")
    assert np.load(os.path.join(prior_dir, "samples.npz"))["samples"].shape == (4, D)


def _stages(prior_dir, decoder_dir, pg=1.0, dg=2.0):
    out = []
    for d, g in ((prior_dir, pg), (decoder_dir, dg)):
        l = load_for_sampling(d)  # noqa: E741
        s, c = l.config.sample, l.config
        out.append(StageSettings(l.model, l.params, l.schedule, l.image_shape, s.method, s.steps, s.eta, s.clip or None,
                                 c.diffusion.variance, c.diffusion.parameterization, g))
    return out


def test_unclip_chains_prior_and_decoder(trained):
    """unclip() = generate(prior | CLIP text embedding), renormalised, then generate(decoder | it)."""
    clip_dir, module, params, prior_dir, decoder_dir, _ = trained
    prior, decoder = _stages(prior_dir, decoder_dir)
    prior = prior._replace(params=_randomized(prior.params, 3))  # two steps leave the zero-initialised head near 0
    ids, _ = cap.Tokenizer().encode(["a red disc at the top left", "a blue square at the bottom right", "a green triangle at the top right"])
    key = jax.random.key(3)
    images, emb = unclip(prior, decoder, module, params, ids, key)
    assert images.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    text = text_embeddings(module, params, ids)
    want_txt = module.apply({"params": params}, ids, ids != 0, method=CLIP.encode_text)
    np.testing.assert_allclose(text, np.asarray(want_txt), atol=1e-6)
    z = generate(prior.module, prior.params, prior.schedule, (1, 1, D), 3, jax.random.fold_in(key, 0),
                 cond={"context": text[:, None, :]}, guidance_weight=1.0, method="ddim", steps=4, clip=None,
                 parameterization="x0").reshape(3, D)
    np.testing.assert_allclose(emb, z / np.linalg.norm(z, axis=-1, keepdims=True), atol=1e-5)
    x = generate(decoder.module, decoder.params, decoder.schedule, (16, 16, 3), 3, jax.random.fold_in(key, 1),
                 cond={"context": emb[:, None, :]}, guidance_weight=2.0, method="ddim", steps=4, clip=True)
    np.testing.assert_allclose(images, x, atol=1e-5)
    with pytest.raises(ValueError, match="tokens: expected int ids"):
        unclip(prior, decoder, module, params, np.zeros((2, 20), np.int32), key)
    with pytest.raises(ValueError, match=r"prior.image_shape: expected \(1, 1, 8\)"):
        unclip(decoder, decoder, module, params, ids, key)


def test_launch_sample_unclip(trained, tmp_path):
    clip_dir, module, params, prior_dir, decoder_dir, _ = trained
    out = str(tmp_path / "x.npz")
    prompts = ["a red disc at the top left", "a blue square at the bottom right"]
    ok = forked.popen_module("launch.sample", "--workdir", decoder_dir, "--prior_workdir", prior_dir, "--prompt", prompts[0],
                             "--prompt", prompts[1], "--num", "2", "--guidance", "2", "--prior_guidance", "1", "--out", out)
    bad_out = str(tmp_path / "bad.png")
    cases = {
        "prior-as-workdir": (["--workdir", prior_dir, "--prompt", prompts[0]], r"--workdir: this is unCLIP's prior"),
        "no-prior": (["--workdir", decoder_dir, "--prompt", prompts[0]], r"--prior_workdir: this is unCLIP's decoder"),
        "no-prompt": (["--workdir", decoder_dir, "--prior_workdir", prior_dir], r"--prompt: unCLIP samples from a caption"),
        "bad-word": (["--workdir", decoder_dir, "--prior_workdir", prior_dir, "--prompt", "a purple disc"],
                     r"--prompt: texts\[0\]: unknown word\(s\) \['purple'\]"),
        "prior-not-prior": (["--workdir", decoder_dir, "--prior_workdir", decoder_dir, "--prompt", prompts[0]],
                            r"--prior_workdir: .* is not an unCLIP prior"),
        "with-label": (["--workdir", decoder_dir, "--prior_workdir", prior_dir, "--prompt", prompts[0], "--label", "1"],
                       r"--label: not with unCLIP"),
    }
    # The refusals in one process, each through launch.sample's app.run (a fresh process each costs its imports).
    refused = dict(zip(cases, run_commands("launch.sample", [["--out", bad_out, *a] for a, _ in cases.values()]),
                       strict=True))
    assert set(refused) == set(cases)
    for k, (code, err, compiles) in refused.items():
        assert code != 0 and re.search(cases[k][1], err), (k, err[-2000:])
        assert compiles == 0, (k, compiles)  # refused before anything is loaded
    assert not os.path.exists(bad_out)
    _, err = ok.communicate(timeout=600)
    assert ok.returncode == 0, err[-3000:]
    prior, decoder = _stages(prior_dir, decoder_dir, 1.0, 2.0)
    ids, _ = cap.Tokenizer().encode(prompts)
    want, _ = unclip(prior, decoder, module, params, ids, jax.random.key(0))
    np.testing.assert_allclose(np.load(out)["samples"], want, atol=1e-4)
