"""OpenAI improved / guided-diffusion checkpoints -> jdiff (jdiff.convert.openai), checked against
guided-diffusion itself (the oracle: the ``guided-diffusion-sdk`` package's ``guided_diffusion``).

The oracle networks are built by guided-diffusion's own ``script_util`` from its own defaults
updated by a case's flags; jdiff converts the saved state dict with the same flags given as a
command-line string, so the defaults, the flag semantics and the weight mapping are all tested.
Every parameter is filled with seeded random values first: guided-diffusion zero-initialises
the output convs and ``proj_out`` (``zero_module``), which would make untrained outputs agree
whatever the mapping. Networks are small (16-64 pixels, 32 base channels) and each jdiff
network is compiled once per module. The measured max abs errors are printed (``-s``) for
BENCHMARKS.md.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from commands import run_commands
from conftest import randomize_torch, require_modules

from jdiff import diffusion, samplers, schedules
from jdiff import workdir as workdir_lib
from jdiff.convert.common import ConversionError, write_workdir
from jdiff.convert.openai import (
    GUIDED_DEFAULTS,
    IMPROVED_DEFAULTS,
    classifier_fields,
    diffusion_settings,
    from_openai,
    parse_flags,
    unet_fields,
)
from jdiff.train import config as config_lib

TOL = 1e-4  # float32 forward passes of the same equations
BATCH = 4

# The cases' flags (over each codebase's defaults).
ADM = dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=2, attention_resolutions="16,8",
           num_head_channels=16, learn_sigma=True, class_cond=True, resblock_updown=True,
           use_scale_shift_norm=True, use_new_attention_order=True)
# improved-diffusion's own flags (its 32x32 channel_mult (1, 2, 2, 2), legacy attention order) and
# its released models' process: 4000 cosine steps, the network fed t * 1000 / 4000 (rescale_timesteps).
IMPROVED = dict(image_size=32, num_channels=32, num_res_blocks=1, num_heads=2, attention_resolutions="16,8",
                use_scale_shift_norm=False, diffusion_steps=4000, noise_schedule="cosine")
CLASSIFIER = dict(image_size=64, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="32,8",
                  classifier_use_scale_shift_norm=True, classifier_resblock_updown=True, classifier_pool="attention")
CLASSIFIER_ADAPTIVE = dict(CLASSIFIER, classifier_pool="adaptive", classifier_use_scale_shift_norm=False,
                           classifier_resblock_updown=False)


def _flag_string(flags: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in flags.items())


@pytest.fixture(scope="module")
def gd():
    with warnings.catch_warnings():  # guided_diffusion.nn's torch.cuda.amp decorators are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        torch, unet, script_util, gaussian_diffusion, respace = require_modules(
            "torch", "guided_diffusion.unet", "guided_diffusion.script_util", "guided_diffusion.gaussian_diffusion",
            "guided_diffusion.respace")
    del unet
    return torch, script_util, gaussian_diffusion, respace


def _inputs(size: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)  # NCHW
    t = np.concatenate([[0], rng.integers(0, 1000, BATCH - 2), [999]]).astype(np.int64)
    y = rng.integers(0, 1000, BATCH).astype(np.int64)
    return x, t, y


class Case:
    """An oracle network, its conversion, and jdiff's compiled forward pass."""

    def __init__(self, torch, model, imported, size, seed, labels):
        self.torch, self.model, self.imported = torch, model, imported
        self.x, self.t, self.y = _inputs(size, seed)
        self.labels = labels
        module = imported.module()
        if labels:
            self.apply = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, {"label": y}))
        else:
            self.apply = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t))

    def torch_out(self, x, t):
        torch = self.torch
        kwargs = {"y": torch.from_numpy(self.y)} if self.labels else {}
        scale = self.imported.model.get("time_scale", 1.0)
        if scale != 1.0:  # guided-diffusion's _scale_timesteps (rescale_timesteps): the network sees t * 1000 / T
            t = t.astype(np.float32) * np.float32(scale)
        with torch.no_grad():
            return self.model(torch.from_numpy(x), torch.from_numpy(t), **kwargs).numpy()

    def jdiff_out(self, x, t):
        """NCHW in; NCHW (U-Net) or [B, classes] out."""
        out = np.asarray(self.apply(self.imported.params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                    jnp.asarray(self.y)))
        return out.transpose(0, 3, 1, 2) if out.ndim == 4 else out

    def max_error(self) -> tuple[float, float]:
        ref = self.torch_out(self.x, self.t)
        out = self.jdiff_out(self.x, self.t)
        assert out.shape == ref.shape
        return float(np.abs(out - ref).max()), float(np.abs(ref).max())


def _model_case(gd, tmp_path_factory, flags, seed, codebase="guided-diffusion", oracle_flags=None):
    torch, script_util, _, _ = gd
    args = {**script_util.model_and_diffusion_defaults(), **(oracle_flags or flags)}
    model, process = script_util.create_model_and_diffusion(**args)
    model = randomize_torch(model, seed)
    path = tmp_path_factory.mktemp("openai") / "model.pt"
    torch.save(model.state_dict(), path)
    imported = from_openai(str(path), _flag_string(flags), codebase=codebase)
    case = Case(torch, model, imported, flags["image_size"], seed, labels=bool(flags.get("class_cond")))
    case.process, case.path = process, path
    return case


@pytest.fixture(scope="module")
def adm(gd, tmp_path_factory):
    return _model_case(gd, tmp_path_factory, ADM, seed=1)


@pytest.fixture(scope="module")
def improved(gd, tmp_path_factory):
    # guided-diffusion builds improved-diffusion's network from these flags once its channel_mult
    # (which improved-diffusion's create_model fixes for 32x32) and rescale_timesteps are spelled out.
    oracle = dict(IMPROVED, channel_mult="1,2,2,2", rescale_timesteps=True)
    case = _model_case(gd, tmp_path_factory, IMPROVED, seed=2, codebase="improved-diffusion", oracle_flags=oracle)
    case.t = np.array([0, 1234, 2777, 3999])  # the whole 4000-step range
    return case


def _classifier_case(gd, tmp_path_factory, flags, seed):
    torch, script_util, _, _ = gd
    args = {**script_util.classifier_defaults(), **flags}
    model = randomize_torch(script_util.create_classifier(**args), seed)
    path = tmp_path_factory.mktemp("openai") / "classifier.pt"
    torch.save(model.state_dict(), path)
    imported = from_openai(str(path), _flag_string(flags), kind="classifier")
    return Case(torch, model, imported, flags["image_size"], seed, labels=False)


@pytest.fixture(scope="module")
def classifier(gd, tmp_path_factory):
    return _classifier_case(gd, tmp_path_factory, CLASSIFIER, seed=3)


@pytest.fixture(scope="module")
def classifier_adaptive(gd, tmp_path_factory):
    return _classifier_case(gd, tmp_path_factory, CLASSIFIER_ADAPTIVE, seed=4)


# ---------------------------------------------------------------------------
# Forward passes against guided-diffusion
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adm", "improved", "classifier", "classifier_adaptive"])
def test_outputs_match_guided_diffusion(name, request):
    case = request.getfixturevalue(name)
    err, scale = case.max_error()
    print(f"\nopenai {name}: max abs error {err:.3g} (outputs up to {scale:.3g})")
    assert scale > 0.1, f"{name}: the oracle's output is near zero ({scale}); the comparison would be vacuous"
    assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL} (outputs up to {scale:.3g})"


def test_imported_network_fields(adm, improved, classifier, classifier_adaptive):
    assert adm.imported.model_name == "unet" and adm.imported.image_shape == (16, 16, 3)
    m = adm.imported.model
    assert (m["learn_sigma"], m["num_classes"], m["resblock_updown"], m["scale_shift_norm"]) == (True, 1000, True, True)
    assert m["attention_resolutions"] == (16, 8) and m["num_head_channels"] == 16
    # jdiff's null class row (classifier-free guidance) is zeros; the 1000 real rows are OpenAI's.
    emb = adm.imported.params["encoder"]["class_embed"]["embedding"]
    assert emb.shape == (1001, 128) and not emb[-1].any()
    np.testing.assert_array_equal(emb[:-1], adm.model.label_emb.weight.detach().numpy())
    assert adm.imported.diffusion["variance"] == "learned_range"
    assert improved.imported.model["channel_mult"] == (1, 2, 2, 2)
    assert improved.imported.model["num_head_channels"] is None and improved.imported.model["num_heads"] == 2
    assert improved.imported.diffusion["variance"] == "fixed_large"
    assert improved.imported.source["flags"]["rescale_timesteps"]  # improved-diffusion's default
    assert improved.imported.model["time_scale"] == 0.25 and "time_scale" not in adm.imported.model
    assert classifier.imported.model_name == "classifier" and classifier.imported.model["pool"] == "attention"
    assert classifier_adaptive.imported.model["pool"] == "mean"
    assert set(classifier.imported.diffusion) == {"process", "num_timesteps", "schedule", "beta_start", "beta_end"}


def test_imported_model_writes_a_valid_workdir(adm, tmp_path):
    path = write_workdir(adm.imported, str(tmp_path / "adm"))
    config = workdir_lib.load_config(path)
    config_lib.validate(config)
    assert config.model_name == "unet" and tuple(config.data.image_shape) == (16, 16, 3)
    assert config.model.learn_sigma and config.diffusion.variance == "learned_range" and config.sample.clip
    assert (config.diffusion.schedule, config.diffusion.num_timesteps) == ("linear", 1000)


def test_imported_classifier_writes_a_workdir_its_params_load_from(classifier, tmp_path):
    """A classifier workdir (for classifier guidance: launch.sample --classifier_workdir)."""
    path = write_workdir(classifier.imported, str(tmp_path / "clf"))
    params, step = workdir_lib.load_params(path)
    assert step == 0
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), params, classifier.imported.params)
    assert all(jax.tree.leaves(same))


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------


def _jdiff_schedule(diffusion_section: dict):
    config = config_lib.base_config()
    for k, v in diffusion_section.items():
        config.diffusion[k] = v
    return config_lib.make_schedule(config)


@pytest.mark.parametrize("name,steps", [("linear", 1000), ("linear", 4000), ("cosine", 1000), ("cosine", 4000)])
def test_schedules_equal_guided(gd, name, steps):
    _, _, gaussian_diffusion, _ = gd
    want = gaussian_diffusion.get_named_beta_schedule(name, steps)
    section, _ = diffusion_settings(parse_flags(f"--noise_schedule {name} --diffusion_steps {steps}"))
    schedule = _jdiff_schedule(section)
    assert schedule.num_timesteps == steps
    # jdiff's tables are float32 roundings of float64 computations: relative 2^-24.
    np.testing.assert_allclose(np.asarray(schedule.betas), want, rtol=2e-7, atol=0)
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), np.cumprod(1.0 - want), rtol=2e-7, atol=0)


@pytest.mark.parametrize("count", [25, 50, 100, 250])
def test_respacing_keeps_guided_timesteps(gd, count):
    _, _, _, respace = gd
    assert sorted(respace.space_timesteps(1000, str(count))) == list(schedules.space_timesteps(1000, count))
    _, sample = diffusion_settings(parse_flags(f"--timestep_respacing {count}"))
    assert sample == {"clip": True, "method": "ddpm", "steps": count}


def test_learned_variance_step_matches_guided(adm):
    """p(x_{t-1} | x_t) with the learned range (improved DDPM eq. 15) and clipping: jdiff's
    p_mean_variance and ddpm_step on the converted network against guided-diffusion's
    p_mean_variance on its own network."""
    torch = adm.torch
    x = adm.x
    t = np.array([0, 1, 500, 999])
    with torch.no_grad():
        ref = adm.process.p_mean_variance(adm.model, torch.from_numpy(x), torch.from_numpy(t), clip_denoised=True,
                                          model_kwargs={"y": torch.from_numpy(adm.y)})
    ref_mean, ref_log_var = ref["mean"].numpy(), ref["log_variance"].numpy()
    d = adm.imported.diffusion
    schedule = _jdiff_schedule(d)
    xt = jnp.asarray(x.transpose(0, 2, 3, 1))
    output = adm.apply(adm.imported.params, xt, jnp.asarray(t), jnp.asarray(adm.y))
    mv = diffusion.p_mean_variance(schedule, output, xt, jnp.asarray(t), d["parameterization"], d["variance"],
                                   clip=adm.imported.sample["clip"])
    mean = np.asarray(mv.mean).transpose(0, 3, 1, 2)
    log_var = np.asarray(mv.log_variance).transpose(0, 3, 1, 2)
    err_mean, err_log_var = np.abs(mean - ref_mean).max(), np.abs(log_var - ref_log_var).max()
    key = jax.random.key(7)
    step = samplers.ddpm_step(schedule, output, xt, jnp.asarray(t), key, variance=d["variance"],
                              parameterization=d["parameterization"], clip=adm.imported.sample["clip"])
    # guided's p_sample: mean + [t > 0] exp(log_var / 2) z, with ddpm_step's own z (drawn from key).
    z = np.asarray(jax.random.normal(key, xt.shape, jnp.float32)).transpose(0, 3, 1, 2)
    ref_step = ref_mean + (t > 0)[:, None, None, None] * np.exp(0.5 * ref_log_var) * z
    err_step = np.abs(np.asarray(step).transpose(0, 3, 1, 2) - ref_step).max()
    print(f"\nopenai learned-range step: max abs error mean {err_mean:.3g}, log variance {err_log_var:.3g}, "
          f"ddpm_step {err_step:.3g}")
    assert err_mean <= TOL and err_log_var <= TOL and err_step <= TOL, (err_mean, err_log_var, err_step)


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------


def test_guided_defaults_are_guideds(gd):
    _, script_util, _, _ = gd
    want = {**script_util.model_and_diffusion_defaults(), **script_util.classifier_defaults()}
    assert {k: v for k, v in GUIDED_DEFAULTS.items() if k != "sigma_small"} == want
    assert GUIDED_DEFAULTS["sigma_small"] is False


def test_readme_flags_to_fields():
    # guided-diffusion's README: the 256x256 class-conditional model and its classifier.
    model_flags = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
                   "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                   "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True")
    flags = parse_flags(model_flags + " --classifier_depth 2")
    assert unet_fields(flags) == dict(
        base_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(32, 16, 8), num_res_blocks=2,
        num_heads=4, num_head_channels=64, dropout=0.0, resblock_updown=True, scale_shift_norm=True,
        num_classes=1000, out_channels=3, learn_sigma=True, conv_resample=True, mid_attention=True,
        time_embedding="sinusoidal", norm_num_groups=32, norm_eps=1e-5, downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0)
    c = classifier_fields(flags)
    assert (c["base_channels"], c["num_res_blocks"], c["attention_resolutions"], c["num_head_channels"], c["pool"]) == (
        128, 2, (32, 16, 8), 64, "attention")
    section, sample = diffusion_settings(flags)
    assert section == dict(process="vp", num_timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02,
                           parameterization="eps", variance="learned_range")
    assert sample == {"clip": True}
    # improved-diffusion's README CIFAR-10 model and diffusion flags.
    imp = parse_flags("--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                      "--diffusion_steps 4000 --noise_schedule cosine", codebase="improved-diffusion")
    assert unet_fields(imp)["channel_mult"] == (1, 2, 2, 2) and unet_fields(imp)["attention_resolutions"] == (16, 8)
    assert unet_fields(imp)["time_scale"] == 0.25
    assert diffusion_settings(imp)[0]["schedule"] == "cosine"


def test_flag_spellings():
    flags = parse_flags("--learn_sigma=yes --class_cond 1 --use_fp16 f --image_size 32 --image_size 64 "
                        "--dropout 0.1 --predict_xstart T")
    assert [flags[k] for k in ("learn_sigma", "class_cond", "use_fp16", "predict_xstart")] == [True, True, False, True]
    assert flags["image_size"] == 64 and flags["dropout"] == 0.1  # argparse: the last value wins
    assert flags["channel_mult"] == (1, 2, 3, 4) and flags["attention_resolutions"] == (16, 8)
    assert parse_flags({"learn_sigma": True, "image_size": "64", "attention_resolutions": (32, 16)}) == parse_flags(
        "--learn_sigma True --image_size 64 --attention_resolutions 32,16")
    assert diffusion_settings(parse_flags("--sigma_small True"))[0]["variance"] == "fixed_small"
    assert diffusion_settings(parse_flags("--predict_xstart True"))[0]["parameterization"] == "x0"
    for codebase, text in (("guided-diffusion", "--image_size 512 --class_cond True"),
                           ("improved-diffusion", "--image_size 32")):
        resolved = parse_flags(text, codebase=codebase)
        assert parse_flags(resolved, codebase=codebase) == resolved
    assert parse_flags(None, codebase="improved-diffusion")["rescale_timesteps"] is True
    assert set(IMPROVED_DEFAULTS) < set(parse_flags("", codebase="improved-diffusion"))


def test_unknown_flag_lists_known_ones():
    with pytest.raises(ConversionError, match=r"--num_chanels.*known: .*num_channels"):
        parse_flags("--num_chanels 128")
    with pytest.raises(ConversionError, match="SuperResModel"):
        parse_flags("--large_size 256 --small_size 64")
    with pytest.raises(ConversionError, match=r"--num_head_channels 64 is not an improved-diffusion flag"):
        parse_flags("--num_head_channels 64", codebase="improved-diffusion")
    with pytest.raises(ConversionError, match=r"--channel_mult \(1, 2\) is not an improved-diffusion flag"):
        parse_flags("--channel_mult 1,2", codebase="improved-diffusion")
    with pytest.raises(ConversionError, match=r"--use_new_attention_order.*not an improved-diffusion flag"):
        parse_flags("--use_new_attention_order True", codebase="improved-diffusion")


@pytest.mark.parametrize("flags,to_fields,match", [
    ("--num_heads 4 --num_heads_upsample 2", unet_fields, r"--num_heads_upsample 2"),
    ("--classifier_pool spatial", classifier_fields, r"--classifier_pool 'spatial'"),
    ("--image_size 512", unet_fields, r"channel_mult \(0\.5, 1, 1, 2, 2, 4, 4\)"),
    ("--image_size 32", unet_fields, r"--channel_mult '' with --image_size 32"),
    ("--image_size 32", classifier_fields, r"--image_size 32: create_classifier"),
    ("--num_channels 48 --channel_mult 1,2", unet_fields, r"--num_channels 48.*divisible by 32"),
    ("--image_size 40 --channel_mult 1,2,2,2,2", unet_fields, r"--image_size 40: expected a multiple of 2\*\*"),
    ("--noise_schedule sqrt", None, r"--noise_schedule 'sqrt'"),
    ("--learn_sigma maybe", None, r"--learn_sigma 'maybe': expected a boolean"),
    ("--num_channels 12.5", None, r"--num_channels '12.5': expected an integer"),
    ("--attention_resolutions 32,,8", None, r"--attention_resolutions '32,,8'"),
    ("--timestep_respacing ddim25", None, r"--timestep_respacing 'ddim25'"),
    ("--timestep_respacing 21", None, r"--timestep_respacing '21': OpenAI's respacing keeps other timesteps"),
    ("--diffusion_steps 20", None, r"--diffusion_steps 20: the linear schedule's last beta"),
    ("--learn_sigma", None, r"--learn_sigma has no value"),
    ("image_size 64", None, r"expected '--name value' pairs"),
])
def test_unsupported_flag_values(flags, to_fields, match):
    with pytest.raises(ConversionError, match=match):
        resolved = parse_flags(flags)
        if to_fields is not None:
            to_fields(resolved)


def test_improved_defaults_rescale_timesteps():
    # improved-diffusion's default rescale_timesteps=True: its 4000-step networks saw t / 4, which
    # jdiff's U-Net reproduces with time_scale (the forward pass above runs over all 4000 steps).
    flags = parse_flags("--diffusion_steps 4000 --noise_schedule cosine", codebase="improved-diffusion")
    assert unet_fields(flags)["time_scale"] == 0.25
    flags = parse_flags("--diffusion_steps 4000 --rescale_timesteps False", codebase="improved-diffusion")
    assert "time_scale" not in unet_fields(flags)
    assert diffusion_settings(flags)[0]["beta_end"] == 0.02 / 4


# ---------------------------------------------------------------------------
# Bad checkpoints and arguments
# ---------------------------------------------------------------------------


def _improved_state(improved):
    return {k: v.clone() for k, v in improved.model.state_dict().items()}


def _convert(state):
    return from_openai(state, _flag_string(IMPROVED), codebase="improved-diffusion")


def test_missing_key_is_named(improved):
    state = _improved_state(improved)
    del state["output_blocks.3.1.proj_out.weight"]
    with pytest.raises(ConversionError, match=r"missing keys \(1\): output_blocks\.3\.1\.proj_out\.weight"):
        _convert(state)


def test_unexpected_key_is_named(improved):
    state = _improved_state(improved)
    state["label_emb.weight"] = improved.torch.zeros(1000, 128)
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): label_emb\.weight"):
        _convert(state)


@pytest.mark.parametrize("key,shape", [
    ("middle_block.1.qkv.weight", (3 * 64 + 6, 64, 1)),  # a wider fused qkv: its selected parts would fit
    ("input_blocks.0.0.weight", (32, 3, 5, 5)),
    ("out.2.bias", (6,)),
])
def test_wrong_shape_is_named(improved, key, shape):
    state = _improved_state(improved)
    state[key] = improved.torch.zeros(shape)
    with pytest.raises(ConversionError, match=r"shape mismatches.*" + key.replace(".", r"\.")):
        _convert(state)


def test_super_resolution_checkpoint_is_refused(improved):
    state = _improved_state(improved)
    state["input_blocks.0.0.weight"] = improved.torch.zeros(32, 6, 3, 3)
    with pytest.raises(ConversionError, match="SuperResModel"):
        _convert(state)


def test_bad_arguments_are_named(improved, tmp_path):
    with pytest.raises(ConversionError, match="path: .*nowhere.pt"):
        from_openai(str(tmp_path / "nowhere.pt"), _flag_string(IMPROVED), codebase="improved-diffusion")
    with pytest.raises(ConversionError, match=r"unknown flag\(s\) --num_chanels"):
        from_openai(str(improved.path), "--num_chanels 32")
    with pytest.raises(ConversionError, match="kind: expected one of"):
        from_openai(str(improved.path), "", kind="decoder")
    with pytest.raises(ConversionError, match="codebase: expected one of"):
        from_openai(str(improved.path), "", codebase="openai")
    with pytest.raises(ConversionError, match="kind: 'classifier' needs codebase 'guided-diffusion'"):
        from_openai(str(improved.path), "", kind="classifier", codebase="improved-diffusion")
    # Right file, wrong flags: the network they describe has other keys and shapes.
    with pytest.raises(ConversionError, match="missing keys"):
        from_openai(str(improved.path), _flag_string(dict(IMPROVED, num_res_blocks=2)), codebase="improved-diffusion")


# ---------------------------------------------------------------------------
# Classifier guidance with an imported model and classifier, from the command line
# ---------------------------------------------------------------------------

GUIDED_MODEL = dict(image_size=64, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="32",
                    num_head_channels=32, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True)
GUIDED_CLASSIFIER = dict(image_size=64, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")


def test_classifier_guidance_from_the_command_line(gd, tmp_path_factory):
    """launch.sample --classifier_workdir on imported ADM workdirs equals jdiff.inference.generate
    with the classifier, and the classifier moves the samples (scale 0 would not)."""
    import forked
    from jdiff.inference import generate

    model = _model_case(gd, tmp_path_factory, GUIDED_MODEL, seed=5)
    clf = _classifier_case(gd, tmp_path_factory, GUIDED_CLASSIFIER, seed=6)
    tmp = tmp_path_factory.mktemp("guided")
    mdir, cdir = write_workdir(model.imported, str(tmp / "adm")), write_workdir(clf.imported, str(tmp / "clf"))
    r = forked.run_module("launch.sample", "--workdir", mdir, "--classifier_workdir", cdir, "--classifier_scale", "300",
                          "--num", "2", "--steps", "2", "--label", "7", "--label", "300", "--out", str(tmp / "x.npz"))
    assert r.returncode == 0, r.stderr[-3000:]
    cli = np.load(tmp / "x.npz")["samples"]
    m, c = workdir_lib.load_for_sampling(mdir), workdir_lib.load_for_sampling(cdir)
    # Two steps (as on the command line above): two already move log p(y | x_0) as far as three.
    kw = dict(method="ddpm", steps=2, clip=True, variance="learned_range", batch_size=2)
    guided = generate(m.model, m.params, m.schedule, m.image_shape, 2, jax.random.key(0), classifier=(c.model, c.params),
                      classifier_scale=300.0, classifier_labels=np.array([7, 300]), **kw)
    plain = generate(m.model, m.params, m.schedule, m.image_shape, 2, jax.random.key(0), **kw)
    np.testing.assert_allclose(cli, guided, atol=1e-5)
    # The classifier pulled the samples towards its labels: log p(y | x) at t = 0 went up. (A random
    # classifier's logits are nearly flat, log p ~ log(1 / 1000): hence the large scale.) One jitted
    # call for both sets: applied eagerly, the 64x64 classifier compiles each of its ~190 ops.
    labels = jnp.array([7, 300, 7, 300])
    log_p = jax.jit(lambda p, x: jax.nn.log_softmax(c.model.apply({"params": p}, x, jnp.zeros((4,), jnp.int32)))[
        jnp.arange(4), labels])
    lp = np.asarray(log_p(c.params, jnp.concatenate([jnp.asarray(guided), jnp.asarray(plain)])))
    assert np.all(lp[:2] > lp[2:]), (lp[:2], lp[2:])
    # The refusals, both in one process (tests/commands.py), before anything is compiled.
    refused = run_commands("launch.sample", [
        ["--workdir", mdir, "--classifier_workdir", cdir, "--classifier_scale", "1", "--label", "1000", "--out",
         str(tmp / "y.npz")],
        ["--workdir", mdir, "--classifier_workdir", mdir, "--classifier_scale", "1", "--out", str(tmp / "y.npz")],
    ])
    for (code, stderr, compiles), message in zip(refused, ["--label: expected labels in [0, 1000)",
                                                           "expected a noise-aware classifier"], strict=True):
        assert code != 0 and message in stderr and compiles == 0, (message, code, compiles, stderr[-2000:])
    assert not (tmp / "y.npz").exists()
