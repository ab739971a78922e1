"""diffusers <-> jdiff conversion (jdiff.convert.diffusers, launch.convert) against diffusers itself.

The oracle is diffusers' own ``UNet2DModel`` (and its DDPM / DDIM schedulers) run by PyTorch: no
download, every model is built here with random weights (every parameter redrawn, so the
zero-initialised output convs cannot hide a wrong mapping), saved with ``save_pretrained``,
converted, and run on the same inputs. The measured errors are in BENCHMARKS.md ("Importing
pretrained weights", ``python -m benchmarks.convert``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import forked
from conftest import randomize_torch, require_modules
from flax import traverse_util

from jdiff import convert, schedules
from jdiff import sample as jdiff_sample
from jdiff.convert import ConversionError
from jdiff.convert import diffusers as dconv
from jdiff.models import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # max abs error of a float32 forward pass (the bar); measured ~5e-7

# The layouts: DDPM CIFAR-10's (google/ddpm-cifar10-32's config.json, at a quarter of the width),
# attention at several resolutions with fixed-width heads and a learned variance, and a class
# embedding on 1-channel images with no mid-block attention.
LAYOUTS = {
    "ddpm_cifar10": {**dconv.DDPM_CIFAR10_32, "block_out_channels": [32, 64, 64, 64]},
    "multi_attention": dict(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"], attention_head_dim=16, norm_num_groups=16),
    "class_embedding": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=[32, 64], layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=8, norm_num_groups=8, num_class_embeds=10, add_attention=False),
}
SCHEDULERS = {  # written beside the model: one of each supported beta schedule / prediction
    "ddpm_cifar10": dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, variance_type="fixed_large", clip_sample=True),
    "multi_attention": dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                            variance_type="learned_range", clip_sample=True),
    "class_embedding": dict(_class_name="DDIMScheduler", num_train_timesteps=500, beta_schedule="scaled_linear",
                            beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction", clip_sample=False),
}


@pytest.fixture(scope="module")
def torch_stack():
    torch, diffusers_lib = require_modules("torch", "diffusers")
    torch.set_num_threads(1)
    return torch, diffusers_lib


class Case:
    """A diffusers model saved to disk, its conversion and a jitted jdiff forward."""

    def __init__(self, torch, diffusers_lib, name, tmp, seed=0, safe=True):
        self.name, self.torch = name, torch
        self.model = randomize_torch(diffusers_lib.UNet2DModel(**LAYOUTS[name]), seed)
        self.dir = str(tmp / name)
        self.model.save_pretrained(self.dir, safe_serialization=safe)
        with open(os.path.join(self.dir, "scheduler_config.json"), "w") as f:
            json.dump(SCHEDULERS[name], f)
        self.imported = convert.from_diffusers(self.dir)
        self.module = self.imported.module()
        self.apply = jax.jit(self.module.apply)

    def inputs(self, seed=1, batch=3):
        rng = np.random.RandomState(seed)
        H, W, C = self.imported.image_shape
        x = rng.randn(batch, C, H, W).astype(np.float32)
        t = rng.randint(0, 1000, batch)
        y = rng.randint(0, 10, batch) if self.imported.model.get("num_classes") else None
        return x, t, y

    def torch_out(self, x, t, y=None):
        T = self.torch
        with T.no_grad():
            kwargs = {} if y is None else {"class_labels": T.from_numpy(y)}
            return self.model(T.from_numpy(x), T.from_numpy(t), **kwargs).sample.numpy()

    def jdiff_out(self, x, t, y=None, params=None):
        cond = None if y is None else {"label": jnp.asarray(y)}
        out = self.apply({"params": params or self.imported.params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), cond)
        return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def cases(torch_stack, tmp_path_factory):
    torch, diffusers_lib = torch_stack
    tmp = tmp_path_factory.mktemp("diffusers")
    return {name: Case(torch, diffusers_lib, name, tmp, seed=i, safe=(name != "class_embedding"))
            for i, name in enumerate(LAYOUTS)}


# ----------------------------------------------------------------------------- forward equivalence


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_matches_diffusers(cases, name):
    case = cases[name]
    x, t, y = case.inputs()
    ref, got = case.torch_out(x, t, y), case.jdiff_out(x, t, y)
    err = float(np.abs(got - ref).max())
    assert ref.std() > 0.05, "the reference output is near constant: the test could not see a wrong mapping"
    assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL} (output std {ref.std():.3g})"


def test_converted_fields(cases):
    m = cases["ddpm_cifar10"].imported.model
    assert (m["channel_mult"], m["attention_resolutions"], m["downsample_padding"], m["flip_sin_to_cos"], m["freq_shift"],
            m["norm_num_groups"], m["norm_eps"], m["num_head_channels"]) == ((1, 2, 2, 2), (16,), 0, False, 1.0, 32, 1e-6, None)
    m = cases["multi_attention"].imported.model
    assert m["attention_resolutions"] == (16, 8) and m["num_head_channels"] == 16 and m["learn_sigma"]
    m = cases["class_embedding"].imported.model
    assert m["num_classes"] == 10 and m["mid_attention"] is False
    emb = cases["class_embedding"].imported.params["encoder"]["class_embed"]["embedding"]
    assert emb.shape == (11, 128) and not emb[10].any(), "a diffusers class embedding gains a zero null row"


def test_null_class_row_is_no_class(cases):
    """The added null row is zeros: its output equals a network without the class embedding added."""
    case = cases["class_embedding"]
    x, t, _ = case.inputs()
    null = case.jdiff_out(x, t, np.full(len(t), 10))
    emb = case.model.class_embedding.weight
    with case.torch.no_grad():
        saved = emb.clone()
        emb[0] = 0.0
        ref = case.torch_out(x, t, np.zeros(len(t), np.int64))
        emb.copy_(saved)
    assert np.abs(null - ref).max() <= TOL


def test_deprecated_attention_names(cases, tmp_path):
    """Older checkpoints (the hub's google/ddpm-*) name attention query/key/value/proj_attn."""
    case = cases["multi_attention"]
    state = {k: v for k, v in case.model.state_dict().items()}
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in state.items():
        for a, b in renames.items():
            k = k.replace(a, b)
        old[k] = v
    assert any(".query." in k for k in old)
    shutil.copytree(case.dir, tmp_path / "old")
    os.remove(tmp_path / "old" / dconv.WEIGHT_FILES[0])
    case.torch.save(old, tmp_path / "old" / dconv.WEIGHT_FILES[1])
    again = convert.from_diffusers(str(tmp_path / "old"))
    same = jax.tree.map(np.array_equal, again.params, case.imported.params)
    assert all(jax.tree.leaves(same))


# ----------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_scheduler_maps_to_the_same_process(cases, torch_stack, name):
    _, diffusers_lib = torch_stack
    case, cfg = cases[name], SCHEDULERS[name]
    d, s = case.imported.diffusion, case.imported.sample
    sched = getattr(diffusers_lib, cfg["_class_name"]).from_config(cfg)
    ours = schedules.get(d["schedule"], d["num_timesteps"], **({} if d["schedule"] == "cosine" else
                                                              {"beta_start": d["beta_start"], "beta_end": d["beta_end"]}))
    # diffusers builds its betas in float32; jdiff in float64, rounded once.
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), sched.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-7)
    expected = {"ddpm_cifar10": ("eps", "fixed_large", "ddpm", True), "multi_attention": ("eps", "learned_range", "ddpm", True),
                "class_embedding": ("v", "fixed_small", "ddim", False)}[name]
    assert (d["parameterization"], d["variance"], s["method"], s["clip"]) == expected


def test_scheduler_round_trip():
    for cfg in SCHEDULERS.values():
        d, s = dconv.scheduler_settings(cfg)
        d2, s2 = dconv.scheduler_settings(dconv.scheduler_config(d, s))
        assert d2 == d and s2["clip"] == s["clip"]


# ----------------------------------------------------------------------------- sampling parity


def _jdiff_noise(key, i, shape):
    """The noise jdiff's scan draws at step i (samplers._sample_impl: fold_in(split(key)[1], i))."""
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.split(key)[1], i), shape, jnp.float32))


def _model_fn(case):
    params = case.imported.params
    return jax.tree_util.Partial(lambda p, x, t: case.module.apply({"params": p}, x, t), params)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampling_matches_diffusers(cases, torch_stack, monkeypatch, method):
    """The same x_T and per-step noise through diffusers' scheduler loop and jdiff's scan:
    DDIM (eta 0) and DDPM (fixed_large variance) on diffusers' own 10 timesteps, x_0 clipped.

    DDIM: jdiff re-derives eps from the clipped x_0 (DDIM eq. 12 with both terms from one
    prediction, as GLIDE and guided-diffusion do); diffusers' DDIMScheduler does that with
    ``use_clipped_model_output=True`` and by default mixes the clipped x_0 with the raw eps."""
    torch, diffusers_lib = torch_stack
    case = cases["ddpm_cifar10"]
    cfg = {**SCHEDULERS["ddpm_cifar10"], "_class_name": "DDIMScheduler" if method == "ddim" else "DDPMScheduler"}
    sched = getattr(diffusers_lib, cfg["_class_name"]).from_config(cfg)
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]
    key = jax.random.key(3)
    shape = (2,) + case.imported.image_shape
    x_T = np.asarray(jax.random.normal(jax.random.key(4), shape))
    d = case.imported.diffusion
    out = jdiff_sample(_model_fn(case), schedules.linear(d["num_timesteps"], d["beta_start"], d["beta_end"]),
                       jnp.asarray(x_T), key, method=method, timesteps=np.array(ts + [-1]), clip=True,
                       **({"eta": 0.0} if method == "ddim" else {"variance": d["variance"]}))
    noises = [torch.from_numpy(np.ascontiguousarray(_jdiff_noise(key, i, shape).transpose(0, 3, 1, 2))) for i in range(len(ts))]
    if method == "ddpm":
        import diffusers.schedulers.scheduling_ddpm as ddpm_module

        drawn = iter(noises)
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: next(drawn))
    x = torch.from_numpy(np.ascontiguousarray(x_T.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        for t in sched.timesteps:
            eps = case.model(x, t.expand(len(x))).sample
            x = sched.step(eps, t, x, **({"eta": 0.0, "use_clipped_model_output": True} if method == "ddim" else {})).prev_sample
    ref = x.numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(out) - ref).max())
    assert np.abs(ref).max() > 0.3
    assert err <= 1e-3, f"{method}: 10-step samples differ by {err:.3g}"


# ----------------------------------------------------------------------------- export


def _native_unet():
    """A jdiff-native U-Net with random params, in a layout UNet2DModel can express."""
    fields = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
                  dropout=0.0, num_classes=3, norm_num_groups=8, learn_sigma=True)
    module = UNet(**fields)
    shape = (8, 8, 2)
    params = jax.jit(lambda k: module.init(k, jnp.zeros((1,) + shape), jnp.zeros((1,), jnp.int32),
                                           {"label": jnp.zeros((1,), jnp.int32)})["params"])(jax.random.key(0))
    rng = np.random.RandomState(1)  # NumPy: an eager jax.random call per leaf would compile per shape
    params = jax.tree.map(lambda l: (rng.standard_normal(l.shape) * 0.1).astype(np.float32), params)
    return fields, module, params, shape


def test_round_trip_is_exact_and_diffusers_runs_the_export(torch_stack, tmp_path):
    torch, diffusers_lib = torch_stack
    fields, module, params, shape = _native_unet()
    diffusion = dict(schedule="cosine", num_timesteps=1000, parameterization="eps", variance="learned_range")
    out_dir = dconv.to_diffusers(str(tmp_path / "export"), fields, params, shape, diffusion, {"clip": True})
    back = convert.from_diffusers(out_dir)
    assert {k: back.model[k] for k in fields} == {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    flat_a = traverse_util.flatten_dict(params, sep="/")
    flat_b = traverse_util.flatten_dict(back.params, sep="/")
    assert flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    assert back.diffusion["schedule"] == "cosine" and back.diffusion["variance"] == "learned_range"
    pipe = diffusers_lib.DDPMPipeline.from_pretrained(out_dir)
    rng = np.random.RandomState(0)
    x, t, y = rng.randn(2, 2, 8, 8).astype(np.float32), np.array([5, 900]), np.array([0, 3])
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), {"label": jnp.asarray(y)})
    assert np.abs(np.asarray(got).transpose(0, 3, 1, 2) - ref).max() <= TOL
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    fields, _, params, shape = _native_unet()
    for change, named in ((dict(norm_num_groups=None, base_channels=16, channel_mult=(1, 4)), "norm_num_groups"),
                          (dict(scale_shift_norm=True), "scale_shift_norm"), (dict(resblock_updown=True), "resblock_updown"),
                          (dict(context_dim=8), "context_dim")):
        with pytest.raises(ConversionError, match=named):
            dconv.diffusers_unet_config({**fields, **change}, shape)
    with pytest.raises(ConversionError, match="num_heads"):
        dconv.diffusers_unet_config({**fields, "attention_resolutions": (8, 4)}, shape)
    with pytest.raises(ConversionError, match="image_shape"):
        dconv.diffusers_unet_config(fields, (8, 16, 2))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        dconv.to_diffusers(str(tmp_path / "full"), fields, params, shape)


# ----------------------------------------------------------------------------- bad input


def _copy_case(case, tmp_path, name="bad"):
    d = tmp_path / name
    shutil.copytree(case.dir, d)
    return d


def test_bad_folders(cases, tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        convert.from_diffusers(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert.from_diffusers(str(tmp_path / "empty"))
    d = _copy_case(cases["class_embedding"], tmp_path)
    os.remove(d / dconv.WEIGHT_FILES[1])
    with pytest.raises(ConversionError, match="diffusion_pytorch_model.safetensors"):
        convert.from_diffusers(str(d))


@pytest.mark.parametrize("field,value", [
    ("resnet_time_scale_shift", "scale_shift"), ("down_block_types", ["SkipDownBlock2D", "AttnDownBlock2D"]),
    ("time_embedding_type", "fourier"), ("center_input_sample", True), ("class_embed_type", "timestep"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
])
def test_unsupported_config_fields_are_named(cases, tmp_path, field, value):
    d = _copy_case(cases["class_embedding"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=field):
        convert.from_diffusers(str(d))


def test_fields_unet2dmodel_ignores_are_ignored_with_a_warning(cases, tmp_path):
    d = _copy_case(cases["class_embedding"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["retired_field"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="retired_field"):
        again = convert.from_diffusers(str(d))
    assert again.model == cases["class_embedding"].imported.model


def test_unsupported_scheduler_fields_are_named(cases, tmp_path):
    for field, value in (("beta_schedule", "sigmoid"), ("thresholding", True), ("prediction_type", "flow"),
                         ("_class_name", "LMSDiscreteScheduler"), ("trained_betas", [0.1, 0.2])):
        d = _copy_case(cases["class_embedding"], tmp_path, f"s_{field}")
        cfg = {**SCHEDULERS["class_embedding"], field: value}
        (d / "scheduler_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConversionError, match=field):
            convert.from_diffusers(str(d))


def test_state_dict_errors_list_the_keys(cases, tmp_path, torch_stack):
    torch, _ = torch_stack
    case = cases["class_embedding"]
    state = dict(case.model.state_dict())

    def write(sd, name):
        d = _copy_case(case, tmp_path, name)
        torch.save(sd, d / dconv.WEIGHT_FILES[1])
        return str(d)

    missing = {k: v for k, v in state.items() if k != "conv_in.weight"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): conv_in.weight"):
        convert.from_diffusers(write(missing, "missing"))
    extra = {**state, "surprise.weight": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): surprise.weight"):
        convert.from_diffusers(write(extra, "extra"))
    wrong = {**state, "conv_out.weight": torch.zeros(1, 32, 5, 5)}
    with pytest.raises(ConversionError, match=r"conv_out.weight \(shape \(1, 32, 5, 5\)\) -> decoder/conv_out/kernel"):
        convert.from_diffusers(write(wrong, "wrong"))


def test_pickles_are_read_as_weights_only(cases, tmp_path, torch_stack):
    """A .bin holding anything but tensors is refused: no pickled code runs."""
    torch, _ = torch_stack
    d = _copy_case(cases["class_embedding"], tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"conv_in.weight": Payload()}, d / dconv.WEIGHT_FILES[1])
    with pytest.raises(ConversionError, match="weights only"):
        convert.from_diffusers(str(d))
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- command line


def _run(*args, timeout=300):
    return forked.run_module("launch.convert", *args, timeout=timeout)


def test_command_line_import_sample_export(cases, tmp_path, torch_stack):
    """launch.convert writes a workdir launch.sample takes; --to diffusers gives the same weights back."""
    case = cases["class_embedding"]
    work = tmp_path / "work"
    r = _run("--from", "diffusers", case.dir, "--workdir", str(work))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["data"]["name"] == "none" and cfg["data"]["image_shape"] == [16, 16, 1]
    assert cfg["diffusion"]["parameterization"] == "v" and cfg["sample"]["method"] == "ddim"
    assert json.loads((work / "imported_from.json").read_text())["format"] == "diffusers"
    r = forked.run_module("launch.sample", "--workdir", str(work), "--num", "2", "--steps", "3", "--label", "1",
                          "--label", "2", "--out", str(tmp_path / "s.png"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s.png").exists()
    evaluate = ["launch.evaluate", "--workdir", str(work), "--num", "2", "--steps", "2", "--out", str(tmp_path / "m.json")]
    r = forked.run_module(*evaluate, timeout=300)
    assert r.returncode != 0 and "has no dataset" in r.stderr and not (tmp_path / "m.json").exists(), r.stderr[-2000:]
    r = forked.run_module(*evaluate, "--bpd_examples", "0", timeout=300)
    assert r.returncode == 0 and json.loads((tmp_path / "m.json").read_text())["num_samples"] == 2, r.stderr[-2000:]
    r = _run("--to", "diffusers", "--workdir", str(work), str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr[-2000:]
    back = convert.from_diffusers(str(tmp_path / "exported"))
    same = jax.tree.map(np.array_equal, back.params, case.imported.params)
    assert all(jax.tree.leaves(same)) and back.model == case.imported.model


@pytest.mark.parametrize("args,message", [
    (["--workdir", "W"], "exactly one of --from"),
    (["--from", "diffusers", "--workdir", "W"], "one positional argument"),
    (["--from", "diffusers", "/no/such/dir", "--workdir", "W"], "does not exist"),
    (["--from", "diffusers", "DIR", "--workdir", "W", "--flags", "--image_size 32"], "--flags, --kind and --codebase are for --from openai"),
])
def test_command_line_errors_write_nothing(cases, tmp_path, args, message):
    args = [a.replace("DIR", cases["class_embedding"].dir).replace("W", str(tmp_path / "w")) if a in ("DIR", "W") else a
            for a in args]
    r = _run(*args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_command_line_conversion_error_writes_nothing(cases, tmp_path):
    d = _copy_case(cases["class_embedding"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["resnet_time_scale_shift"] = "scale_shift"
    (d / "config.json").write_text(json.dumps(cfg))
    r = _run("--from", "diffusers", str(d), "--workdir", str(tmp_path / "w"))
    assert r.returncode != 0 and "resnet_time_scale_shift='scale_shift'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_workdir_refuses_to_overwrite(cases, tmp_path):
    work = convert.write_workdir(cases["class_embedding"].imported, str(tmp_path / "w"))
    with pytest.raises(ConversionError, match="already has config.json"):
        convert.write_workdir(cases["class_embedding"].imported, work)


@pytest.mark.slow
def test_full_size_ddpm_cifar10(torch_stack, tmp_path):
    """google/ddpm-cifar10-32's exact config (35.7M parameters), random weights."""
    torch, diffusers_lib = torch_stack
    layout = dconv.DDPM_CIFAR10_32
    model = randomize_torch(diffusers_lib.UNet2DModel(**layout), 7)
    model.save_pretrained(str(tmp_path / "m"))
    imported = convert.from_diffusers(str(tmp_path / "m"))
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    rng = np.random.RandomState(0)
    x, t = rng.randn(2, 3, 32, 32).astype(np.float32), np.array([10, 990])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    got = jax.jit(imported.module().apply)({"params": imported.params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t))
    err = float(np.abs(np.asarray(got).transpose(0, 3, 1, 2) - ref).max())
    assert err <= TOL, f"max abs error {err:.3g}"


def test_missing_extras_are_named(tmp_path, monkeypatch):
    """Without torch / safetensors (the convert extra), reading says what to install."""
    from jdiff.convert.common import read_state_dict

    for name, module in (("w.bin", "torch"), ("w.safetensors", "safetensors.numpy")):
        (tmp_path / name).write_bytes(b"\0" * 16)
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ConversionError, match=r"jdiff\[convert\]"):
            read_state_dict(str(tmp_path / name))
    with pytest.raises(ConversionError, match="expected .safetensors, .bin, .pt or .pth"):
        (tmp_path / "w.ckpt2").write_bytes(b"")
        read_state_dict(str(tmp_path / "w.ckpt2"))


@pytest.mark.slow
def test_a_model_trained_in_jdiff_runs_in_diffusers(torch_stack, tmp_path):
    """configs/tiny.py trained by launch.train (with one GroupNorm group count, as UNet2DModel
    has), exported by launch.convert --to diffusers, run by diffusers' DDPMPipeline's UNet: the
    same outputs as the workdir's EMA params in jdiff. Without the group count the export is
    refused, naming model.norm_num_groups, and nothing is written."""
    torch, diffusers_lib = torch_stack
    grouped = tmp_path / "tiny_g4.py"  # a config file: command-line overrides cannot add a key
    grouped.write_text("import importlib.util\n"
                       f"spec = importlib.util.spec_from_file_location('tiny', {os.path.join(ROOT, 'configs', 'tiny.py')!r})\n"
                       "tiny = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(tiny)\n\n\n"
                       "def get_config():\n    c = tiny.get_config()\n    c.model.norm_num_groups = 4\n    return c\n")
    work, plain = tmp_path / "tiny_g4", tmp_path / "tiny"
    r = forked.run_module("launch.train", "--config", str(grouped), "--workdir", str(work))
    assert r.returncode == 0, r.stderr[-3000:]
    # configs/tiny.py's workdir without a second training run: the grouped one with the group count
    # dropped from its config.json and experiment.json, i.e. configs/tiny.py's config (GroupNorm's
    # params do not depend on the group count, so the checkpoint loads as that network's).
    shutil.copytree(work, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["model"]["norm_num_groups"]
    (plain / "config.json").write_text(json.dumps(cfg, indent=1))
    fingerprint = json.loads((plain / "experiment.json").read_text())
    del fingerprint["model.norm_num_groups"]
    (plain / "experiment.json").write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    r = _run("--to", "diffusers", "--workdir", str(plain), str(tmp_path / "refused"))
    assert r.returncode != 0 and "model.norm_num_groups" in r.stderr and not (tmp_path / "refused").exists(), r.stderr[-2000:]
    r = _run("--to", "diffusers", "--workdir", str(work), str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr[-2000:]
    from jdiff.workdir import load_for_sampling

    loaded = load_for_sampling(str(work))
    pipe = diffusers_lib.DDPMPipeline.from_pretrained(str(tmp_path / "exported"))
    assert pipe.scheduler.config.num_train_timesteps == 20 and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    rng = np.random.RandomState(0)
    x, t, y = rng.randn(3, 1, 8, 8).astype(np.float32), np.array([0, 7, 19]), np.array([0, 5, 10])  # 10: the null class
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    got = jax.jit(loaded.model.apply)({"params": loaded.params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                      {"label": jnp.asarray(y)})
    err = float(np.abs(np.asarray(got).transpose(0, 3, 1, 2) - ref).max())
    assert np.abs(ref).max() > 1e-3 and err <= TOL, err
