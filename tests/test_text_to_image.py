"""Text-conditioned diffusion (issue 19): the "tokens" conditioning kind, TextUNet, captioned
datasets through the training loop, CLIP workdirs, CLIP guidance in jdiff.inference.generate,
and launch.sample --prompt / --clip_workdir with its errors."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import conditioning, guidance, models, samplers, schedules
from jdiff.data import captions as cap
from jdiff.data import get_dataset
from jdiff.inference import generate, model_fn_for
from jdiff.models.text import CLIP, TextEncoder, TextUNet
from jdiff.train import clip as clip_lib
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.train.loop import train_and_evaluate

import forked
from commands import run_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
            dropout=0.0, text_width=16, text_layers=1, text_heads=2)
CLIP_TINY = dict(embed_dim=8, text_width=16, text_layers=1, text_heads=2, image_channels_base=8,
                 image_channel_mult=(1, 2), image_res_blocks=1, image_attention_resolutions=(8,))


def _randomized(params, seed: int, std: float = 0.2):
    """Every parameter redrawn (zero-initialised output projections included), so that a test
    of what the caption changes can fail."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [np.asarray(rng.normal(0, std, np.shape(p)), np.float32) for p in leaves])


@pytest.fixture(scope="module")
def text_unet():
    module = TextUNet(vocab_size=cap.Tokenizer().vocab_size, **TINY)
    x = np.zeros((1, 16, 16, 3), np.float32)
    # Jitted: an eager init compiles each of its operations separately.
    params = jax.jit(module.init)(jax.random.key(0), x, np.zeros((1,), np.int32), {"tokens": np.ones((1, 20), np.int32)})
    params = _randomized(params["params"], 0)
    apply = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    return module, params, apply


def _inputs(B=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, 16, 16, 3)).astype(np.float32), np.array([3, 11] * (B // 2), np.int32)


def test_tokens_kind_checks_nulls_and_drops():
    ids, _ = cap.Tokenizer().encode(["a red disc at the top left", "a blue square at the bottom right"])
    conditioning.check({"tokens": ids}, 2)
    with pytest.raises(ValueError, match=r"cond\['tokens'\]: expected an int array, got dtype float32"):
        conditioning.check({"tokens": ids.astype(np.float32)}, 2)
    with pytest.raises(ValueError, match=r"cond\['tokens'\]: expected shape \[B, L\] int with B = 3"):
        conditioning.check({"tokens": ids}, 3)
    null = conditioning.null({"tokens": ids})
    assert np.asarray(null["tokens"]).dtype == np.int32 and not np.asarray(null["tokens"]).any()
    dropped = conditioning.drop({"tokens": ids}, np.array([True, False]), keys=("tokens",))
    np.testing.assert_array_equal(np.asarray(dropped["tokens"]), np.stack([np.zeros(20, np.int32), ids[1]]))
    assert "tokens" in config_lib.base_config().diffusion.uncond_keys


def test_text_unet_reads_the_caption_and_masks_padding(text_unet):
    module, params, apply = text_unet
    x, t = _inputs()
    tok = cap.Tokenizer()
    ids, _ = tok.encode(["a red disc at the top left", "a blue square at the bottom right"])
    out = np.asarray(apply(params, x, t, {"tokens": ids}))
    other, _ = tok.encode(["a large green triangle at the top right"] * 2)
    assert np.abs(out - np.asarray(apply(params, x, t, {"tokens": other}))).max() > 1e-3, "the caption is read"
    # Trailing padding is inert: the same captions padded to 12 instead of 20 positions.
    np.testing.assert_allclose(np.asarray(apply(params, x, t, {"tokens": ids[:, :12]})), out, atol=1e-5)
    # The null caption (every position padding) is the missing caption.
    null = np.asarray(apply(params, x, t, {"tokens": np.zeros_like(ids)}))
    np.testing.assert_allclose(np.asarray(apply(params, x, t, {})), null, atol=1e-5)
    assert np.abs(null - out).max() > 1e-3
    assert set(params) == {"text", "unet"}


def test_text_unet_equals_a_unet_fed_its_encoder_output(text_unet):
    """TextUNet = UNet(context = TextEncoder(tokens), context_mask = tokens != 0): the wrapper adds
    nothing but the encoder."""
    module, params, apply = text_unet
    x, t = _inputs()
    ids, mask = cap.Tokenizer().encode(["a small yellow square at the bottom left", "a cyan disc at the top right"])
    enc = TextEncoder(module.vocab_size, module.max_length, module.text_width, module.text_layers, module.text_heads)
    fields = {k: getattr(module, k) for k in TINY if not k.startswith("text_")}
    unet = models.UNet(**fields, context_dim=module.text_width)

    @jax.jit  # one program, not one per operation
    def unet_of_encoder(params, x, t, ids, mask):
        context, _ = enc.apply({"params": params["text"]}, ids, mask)
        return unet.apply({"params": params["unet"]}, x, t, {"context": context, "context_mask": mask})

    want = unet_of_encoder(params, x, t, ids, mask)
    np.testing.assert_allclose(np.asarray(apply(params, x, t, {"tokens": ids})), np.asarray(want), atol=1e-5)


def test_text_unet_bad_input(text_unet):
    module, params, _ = text_unet
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"cond\['context'\]: given .* a TextUNet makes its context from cond\['tokens'\]"):
        module.apply({"params": params}, x, t, {"context": np.zeros((2, 3, 16), np.float32)})
    with pytest.raises(ValueError, match="vocab_size: expected the tokenizer's vocabulary size"):
        TextUNet(**TINY)
    with pytest.raises(ValueError, match="context_dim: expected None"):
        TextUNet(vocab_size=21, context_dim=16, **TINY)
    with pytest.raises(ValueError, match="attention_resolutions, mid_attention: a TextUNet reads the caption"):
        TextUNet(vocab_size=21, **{**TINY, "attention_resolutions": ()}, mid_attention=False)
    with pytest.raises(ValueError, match=r"ids: 21 tokens, more than max_length 20"):
        module.apply({"params": params}, x, t, {"tokens": np.ones((2, 21), np.int32)})
    plain = models.UNet(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=())
    with pytest.raises(ValueError, match=r"cond\['tokens'\]: given .* a plain UNet has no text encoder"):
        plain.init(jax.random.key(0), x, t, {"tokens": np.ones((2, 4), np.int32)})
    assert models.resolve("text_unet") is TextUNet


def test_captioned_datasets():
    d = get_dataset(dict(name="captioned_shapes", resolution=16, num_examples=50, seed=3))
    assert d.image_shape == (16, 16, 3) and d.num_classes is None and set(d.source) == {"image", "tokens"}
    scene = cap.scenes(50, [3, 0])
    want_images, _ = cap.render_scenes(scene, 16)
    np.testing.assert_array_equal(d.source["image"], want_images)
    tok = cap.tokenizer_of(dict(name="captioned_shapes"))
    assert tok.decode(d.source["tokens"], d.source["tokens"] != 0) == cap.captions(scene)
    one = get_dataset(dict(name="captioned_shapes", resolution=16, num_examples=50, max_objects=1, split="test"))
    assert all(" and " not in c for c in tok.decode(one.source["tokens"], one.source["tokens"] != 0))
    fm = get_dataset(dict(name="fashion_mnist_sample", captions=True))
    words = cap.tokenizer_of(dict(name="fashion_mnist_sample", captions=True)).decode(fm.source["tokens"], fm.source["tokens"] != 0)
    assert words == cap.fashion_mnist_captions(fm.source["label"])
    with pytest.raises(ValueError, match="resolution: expected at least 16 for captioned_shapes"):
        get_dataset(dict(name="captioned_shapes", resolution=8))
    with pytest.raises(ValueError, match=r"data: dataset 'shapes' \(captions=False\) has no captions"):
        cap.tokenizer_of(dict(name="shapes"))


def test_step_batch_feeds_tokens(text_unet):
    module = text_unet[0]
    data = {"image": np.zeros((2, 16, 16, 3), np.float32), "tokens": np.ones((2, 20), np.int32), "label": np.zeros(2, np.int32)}
    batch = network.step_batch(data, module)
    assert set(batch["cond"]) == {"tokens"}
    assert network.example_cond(module, (16, 16, 3))["tokens"].shape == (1, 20)
    assert network.needs_data_conditioning(module) and network.text_length(module) == 20
    assert network.text_length(CLIP(vocab_size=21)) == 0 and network.text_length(models.UNet()) == 0
    with pytest.raises(ValueError, match="data: the model reads captions .* expected a captioned dataset"):
        network.step_batch({"image": data["image"]}, module)


def _two_step_run(c, guidance: float):
    """The run settings the text-to-image and unCLIP tests share: 2 training steps on a 20-step
    linear schedule with label dropout, a 4-sample DDIM grid, no evaluation."""
    c.diffusion.update(schedule="linear", num_timesteps=20, p_uncond=0.1)
    c.optim.warmup_steps = 1
    c.train.update(num_steps=2, log_every=1, checkpoint_every=2, sample_every=0)
    c.sample.update(num=4, method="ddim", steps=4, guidance=guidance)
    c.eval.update(num_samples=0, evaluator="", bpd_examples=0)


def _text_config(**overrides):
    c = config_lib.base_config()
    c.data.name = "captioned_shapes"
    c.data.resolution = 16
    c.data.num_examples = 64
    c.data.batch_size = 8
    c.model_name = "text_unet"
    c.model.vocab_size = cap.Tokenizer().vocab_size
    for k, v in TINY.items():
        c.model[k] = v
    _two_step_run(c, guidance=2.0)
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("text") / "w")
    metrics = train_and_evaluate(_text_config(), workdir)
    return workdir, metrics


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
    module = CLIP(vocab_size=cap.Tokenizer().vocab_size, **CLIP_TINY)
    x = np.zeros((1, 16, 16, 3), np.float32)
    ids = np.ones((1, 20), np.int32)
    params = _randomized(jax.jit(module.init)(jax.random.key(1), x, np.zeros((1,), np.int32), ids, ids > 0)["params"], 1, 0.1)
    workdir = str(tmp_path_factory.mktemp("clip") / "c")
    clip_lib.save_clip(workdir, module, params, resolution=16, noised=True,
                       schedule={"name": "linear", "num_timesteps": 20})
    return workdir, module, params


def test_a_text_model_trains_and_samples_its_grid(text_workdir):
    workdir, metrics = text_workdir
    assert metrics["step"] == 2 and np.isfinite(metrics["final_loss"])
    assert os.path.isfile(os.path.join(workdir, "samples.png"))


def test_training_refuses_mismatched_captions(tmp_path):
    with pytest.raises(ValueError, match=r"config.data.name: the model reads captions .* dataset 'shapes' has none"):
        train_and_evaluate(_text_config(**{"data.name": "shapes"}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"config.model.vocab_size: 5 is smaller than dataset 'captioned_shapes'"):
        train_and_evaluate(_text_config(**{"model.vocab_size": 5}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"config.model.max_length: 10 is shorter than the captions' config.data.caption_length 20"):
        train_and_evaluate(_text_config(**{"model.max_length": 10}), str(tmp_path / "c"))
    assert not os.listdir(tmp_path)


def test_clip_workdir_round_trip(clip_workdir, tmp_path):
    workdir, module, params = clip_workdir
    m2, p2, info = clip_lib.load_clip(workdir)
    assert m2 == module and info["noised"] and info["schedule"] == {"name": "linear", "num_timesteps": 20}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="workdir: .* has no clip.json and clip.msgpack"):
        clip_lib.load_clip(str(tmp_path))
    with pytest.raises(ValueError, match="schedule: expected"):
        clip_lib.save_clip(str(tmp_path / "x"), module, params, resolution=16, noised=True)


def test_clip_guidance_is_guidance_energy_of_the_clip_logit(text_unet, clip_workdir):
    """generate(clip_model=...) = jdiff.sample of guidance.energy(model_fn, tau f(x_t, t) . g(c), s),
    and the logit of the guided samples' captions rises with s."""
    module, params, _ = text_unet
    _, cmod, cparams = clip_workdir
    schedule = schedules.linear(20)
    tok = cap.Tokenizer()
    ids, _ = tok.encode(["a red disc at the top left", "a large blue square at the bottom right"] * 2)
    key = jax.random.key(5)
    kw = dict(cond={"tokens": ids}, method="ddim", steps=5, clip_model=(cmod, cparams), clip_tokens=ids)
    got = generate(module, params, schedule, (16, 16, 3), 4, key, clip_scale=3.0, **kw)
    batch_key = jax.random.fold_in(key, 0)
    x_T = jax.random.normal(jax.random.split(batch_key)[0], (4, 16, 16, 3))
    fn = model_fn_for(module, params, cond={"tokens": jnp.asarray(ids)})
    sim = lambda x, t: cmod.apply({"params": cparams}, x, t, ids, ids != 0, method=CLIP.similarity)  # noqa: E731
    want = samplers.sample(guidance.energy(fn, sim, 3.0, schedule), schedule, x_T, batch_key, method="ddim", steps=5,
                           clip=True)
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
    plain = generate(module, params, schedule, (16, 16, 3), 4, key, clip_scale=0.0, **kw)
    unguided = generate(module, params, schedule, (16, 16, 3), 4, key, cond={"tokens": ids}, method="ddim", steps=5)
    np.testing.assert_allclose(plain, unguided, atol=1e-6)
    # The randomised CLIP's logit moves little with x: s = 3 raises it by ~1e-7, within float32
    # rounding of ~0.4 (3e-8 an ulp), s = 300 by ~2e-6, s = 3000 by ~2e-5 (2026-12-06). The rise is
    # checked where it is far above rounding, for every sample.
    mid = generate(module, params, schedule, (16, 16, 3), 4, key, clip_scale=300.0, **kw)
    strong = generate(module, params, schedule, (16, 16, 3), 4, key, clip_scale=3000.0, **kw)
    t0 = np.zeros(4, np.int32)
    logit = lambda x: np.asarray(sim(jnp.asarray(x), t0))  # noqa: E731
    assert np.all(logit(strong) > logit(mid)) and np.all(logit(mid) > logit(unguided)), (
        logit(strong), logit(mid), logit(unguided))


def test_clip_guidance_bad_input(text_unet, clip_workdir):
    module, params, _ = text_unet
    _, cmod, cparams = clip_workdir
    schedule = schedules.linear(20)
    ids = np.ones((2, 20), np.int32)
    go = lambda **kw: generate(module, params, schedule, (16, 16, 3), 2, jax.random.key(0), cond={"tokens": ids}, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"clip_tokens: expected \[2, L <= 20\] token ids"):
        go(clip_model=(cmod, cparams), clip_scale=1.0)
    with pytest.raises(ValueError, match="with at least one real \\(non-zero\\) token per caption"):
        go(clip_model=(cmod, cparams), clip_scale=1.0, clip_tokens=np.zeros((2, 20), np.int32))
    with pytest.raises(ValueError, match=r"clip_tokens: expected ids in \[0, 21\)"):
        go(clip_model=(cmod, cparams), clip_scale=1.0, clip_tokens=np.full((2, 20), 21, np.int32))
    with pytest.raises(ValueError, match="clip_scale: expected a finite scale >= 0, got -1"):
        go(clip_model=(cmod, cparams), clip_scale=-1.0, clip_tokens=ids)
    with pytest.raises(ValueError, match="clip_tokens, clip_scale: given without a clip_model"):
        go(clip_scale=1.0)


def _cli(*args, cwd=ROOT):
    return forked.popen_module(*args, cwd=cwd)


def test_launch_sample_prompt_and_clip_guidance(text_workdir, clip_workdir, tmp_path):
    """--prompt / --guidance / --clip_workdir write samples equal to generate()'s; every bad prompt
    or CLIP flag is refused by name before anything is loaded, and nothing is written."""
    workdir, _ = text_workdir
    cdir = clip_workdir[0]
    out = str(tmp_path / "x.npz")
    prompts = ["a red disc at the top left", "a large blue square at the bottom right"]
    ok = _cli("launch.sample", "--workdir", workdir, "--num", "4", "--out", out, "--prompt", prompts[0], "--prompt",
              prompts[1], "--guidance", "2", "--clip_workdir", cdir, "--clip_guidance", "5", "--batch_size", "4")
    bad_out = str(tmp_path / "bad.png")
    cases = {
        "empty": (["--prompt", ""], r"--prompt: texts\[0\]: the caption is empty"),
        "unknown": (["--prompt", "a purple disc"], r"--prompt: texts\[0\]: unknown word\(s\) \['purple'\]"),
        "long": (["--prompt", " ".join(["a"] * 21)], r"--prompt: texts\[0\]: 21 words, longer than max_length 20"),
        "missing": ([], r"--prompt: this is a text-conditioned model .* expected a caption"),
        "clip-no-scale": (["--prompt", prompts[0], "--clip_workdir", cdir], r"--clip_guidance: expected a finite scale > 0"),
        "clip-not-a-clip": (["--prompt", prompts[0], "--clip_workdir", workdir, "--clip_guidance", "1"],
                            r"--clip_workdir: .* has no clip.json"),
        "clip-scale-alone": (["--prompt", prompts[0], "--clip_guidance", "1"], r"--clip_guidance: only with --clip_workdir"),
    }
    lines = {k: ["--workdir", workdir, "--out", bad_out, *a] for k, (a, _) in cases.items()}
    # An unconditional model (configs/tiny.py; the flags are refused before any checkpoint is read).
    from configs import tiny

    plain = tmp_path / "plain"
    plain.mkdir()
    unconditional = tiny.get_config()
    unconditional.model.num_classes = None
    (plain / "config.json").write_text(unconditional.to_json())
    plain_cases = {
        "plain-prompt": (["--prompt", prompts[0]], r"--prompt: this model is not text-conditioned .* only through CLIP guidance"),
        "plain-guidance": (["--guidance", "2"], r"--guidance: classifier-free guidance needs a class- or text-conditional model"),
        "plain-clip-size": (["--prompt", prompts[0], "--clip_workdir", cdir, "--clip_guidance", "1"],
                            r"--clip_workdir: the CLIP sees 16x16 RGB images, the model samples \(8, 8, 1\)"),
    }
    lines.update({k: ["--workdir", str(plain), "--out", bad_out, *a] for k, (a, _) in plain_cases.items()})
    cases.update(plain_cases)
    # The refusals in one process, each through launch.sample's app.run (a fresh process each costs its imports).
    refused = dict(zip(lines, run_commands("launch.sample", list(lines.values())), strict=True))
    assert set(refused) == set(cases)
    for k, (code, err, compiles) in refused.items():
        assert code != 0, k
        assert re.search(cases[k][1], err), (k, err[-2000:])
        assert compiles == 0, (k, compiles)  # refused before anything is loaded
    assert not os.path.exists(bad_out)
    _, err = ok.communicate(timeout=600)
    assert ok.returncode == 0, err[-3000:]
    from jdiff.workdir import load_for_sampling

    loaded = load_for_sampling(workdir)
    ids, _ = cap.Tokenizer().encode(prompts * 2)
    _, cmod, cparams = clip_workdir
    cfg = loaded.config
    want = generate(loaded.model, loaded.params, loaded.schedule, loaded.image_shape, 4, jax.random.key(0),
                    cond={"tokens": ids}, guidance_weight=2.0, batch_size=4, method=cfg.sample.method,
                    steps=cfg.sample.steps, eta=cfg.sample.eta, clip=cfg.sample.clip or None,
                    clip_model=(cmod, cparams), clip_scale=5.0, clip_tokens=ids)
    np.testing.assert_allclose(np.load(out)["samples"], want, atol=1e-4)
