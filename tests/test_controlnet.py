"""ControlNet (jdiff.models.controlnet, jdiff.controlnet, jdiff.data.controls, adaptation of a base
workdir by jdiff.train.adapt, launch.sample --control): the network equals its base bit for bit
at initialisation (every parameterization, with guidance), its composition against an
independent assembly of the same pieces, the base params untouched by training, control images
and adherence measures against hand-made oracles, and bad input refused before anything compiles
or is written."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jdiff import controlnet, schedules
from jdiff.data import controls, get_dataset
from jdiff.data.shapes import shapes as make_shapes
from jdiff.inference import generate
from jdiff.models import ControlledUNet, ControlNet, UNet
from jdiff.train import adapt, network
from jdiff.train.state import map_params, param_paths
from jdiff.workdir import load_for_sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import fashion_mnist, fashion_mnist_controlnet  # noqa: E402
import forked  # noqa: E402
from commands import run_commands  # noqa: E402

FIELDS = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_classes=3,
              dropout=0.0)


def _perturb(params, seed, scale=0.3):
    """Every leaf plus noise: a "trained" network whose zero-initialised layers are not zero
    (NumPy noise: a JAX draw per leaf shape would compile once per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32)),
                        params)


@pytest.fixture(scope="module")
def nets():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t = jnp.array([0, 5, 11, 19])
    labels = jnp.array([0, 1, 2, 1])
    control = (jax.random.uniform(jax.random.key(1), (4, 8, 8, 2)) > 0.7).astype(jnp.float32)
    cn = ControlledUNet(**FIELDS, control_channels=(2,), hint_channels=(4,))
    params = jax.jit(cn.init)(jax.random.key(2), x, t, {"label": labels, "control": control})["params"]
    # A trained base: the U-Net's own zero-initialised output conv would make every comparison 0 = 0.
    params = {**params, "base": _perturb(params["base"], 3)}
    return dict(x=x, t=t, labels=labels, control=control, cn=cn, params=params, unet=UNet(**FIELDS))


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------


def test_the_copy_has_the_base_encoder_tree_and_the_residuals_the_decoder_takes(nets):
    p = nets["params"]
    assert sorted(p) == ["base", "control_0"]
    enc = jax.tree.map(jnp.shape, p["control_0"]["encoder"])
    assert enc == jax.tree.map(jnp.shape, p["base"]["encoder"])
    res = jax.jit(ControlNet(**FIELDS, hint_channels=(4,)).apply)({"params": p["control_0"]}, nets["x"], nets["t"],
                                                                  nets["control"], {"label": nets["labels"]})
    # One residual per skip (conv_in, 1 block + downsample at 8x8, 1 block at 4x4) and the middle.
    assert [r.shape for r in res] == [(4, 8, 8, 8), (4, 8, 8, 8), (4, 4, 4, 8), (4, 4, 4, 16), (4, 4, 4, 16)]
    assert all(float(jnp.abs(r).max()) == 0.0 for r in res)  # zero convs: exactly zero at init


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_at_init_samples_equal_the_base_models_bit_for_bit(nets, parameterization):
    """Zero convs: the controlled network is the base network, so guided samples with any
    parameterization are the base model's, bit for bit (not just close)."""
    sch = schedules.cosine(20)
    kw = dict(labels=np.asarray(nets["labels"]), guidance_weight=2.0, method="ddim", steps=4, batch_size=4,
              parameterization=parameterization)
    base = generate(nets["unet"], nets["params"]["base"], sch, (8, 8, 1), 4, jax.random.key(5), **kw)
    ctrl = generate(nets["cn"], nets["params"], sch, (8, 8, 1), 4, jax.random.key(5),
                    cond={"control": np.asarray(nets["control"])}, **kw)
    assert np.abs(base).max() > 0.1
    np.testing.assert_array_equal(ctrl, base)


def test_scaled_and_composed_controls_equal_an_independent_assembly(nets):
    """y = F(x; base, skip_residuals = sum_i s_i R_i): ControlledUNet against the U-Net fed with
    residuals computed by separately applied ControlNets (paper eq. 2 and its multi-condition composition)."""
    x, t, labels = nets["x"], nets["t"], nets["labels"]
    trained = _perturb(nets["params"]["control_0"], 7)
    c1, c2 = nets["control"], 1.0 - nets["control"][..., :1]
    cn1 = nets["cn"].clone(control_channels=(1,))
    # The 1-channel ControlNet: the 2-channel one's init with its first hint conv cut to one input
    # channel (the tree and shapes from eval_shape: compiling a second init costs seconds), perturbed.
    shapes = jax.eval_shape(cn1.init, jax.random.key(8), x, t, {"label": labels, "control": c2})["params"]["control_0"]
    other = _perturb(jax.tree.map(lambda a, p: np.asarray(p)[tuple(slice(0, n) for n in a.shape)], shapes,
                                  nets["params"]["control_0"]), 8)
    branch = ControlNet(**FIELDS, hint_channels=(4,))
    r1 = jax.jit(branch.apply)({"params": trained}, x, t, c1, {"label": labels})
    r2 = jax.jit(branch.apply)({"params": other}, x, t, c2, {"label": labels})
    assert float(jnp.abs(r1[0]).max()) > 0.1
    want = jax.jit(nets["unet"].apply)({"params": nets["params"]["base"]}, x, t, {"label": labels},
                                       skip_residuals=[1.5 * a + 0.5 * b for a, b in zip(r1, r2)])
    one = (nets["cn"], {"base": nets["params"]["base"], "control_0": trained})
    two = (cn1, {"base": nets["params"]["base"], "control_0": other})
    module, params = controlnet.compose([one, two], (1.5, 0.5))
    assert module.control_channels == (2, 1) and sorted(params) == ["base", "control_0", "control_1"]
    got = jax.jit(module.apply)({"params": params}, x, t, {"label": labels, "control": jnp.concatenate([c1, c2], -1)})
    np.testing.assert_allclose(got, want, atol=2e-5)
    # Scale 0 is the base model exactly, however trained the ControlNet.
    zero = jax.jit(controlnet.with_scale(nets["cn"], 0.0).apply)({"params": one[1]}, x, t, {"label": labels, "control": c1})
    np.testing.assert_array_equal(zero, jax.jit(nets["unet"].apply)({"params": nets["params"]["base"]}, x, t,
                                                                    {"label": labels}))
    full = jax.jit(nets["cn"].apply)({"params": one[1]}, x, t, {"label": labels, "control": c1})
    assert float(jnp.abs(full - zero).max()) > 1e-3  # and a trained ControlNet does change the output


def test_network_refuses_bad_control(nets):
    x, t = nets["x"], nets["t"]
    apply = lambda cond: nets["cn"].apply({"params": nets["params"]}, x, t, cond)
    with pytest.raises(ValueError, match=r"cond\['control'\]: expected the control image \[B, H, W, 2\]"):
        apply({"label": nets["labels"]})
    with pytest.raises(ValueError, match=r"cond\['control'\]: expected shape \(4, 8, 8, 2\) .* got shape \(4, 8, 8, 1\)"):
        apply({"label": nets["labels"], "control": nets["control"][..., :1]})
    with pytest.raises(ValueError, match=r"cond\['control'\]: expected shape \(4, 8, 8, 2\) .* got shape \(4, 4, 4, 2\)"):
        apply({"label": nets["labels"], "control": nets["control"][:, :4, :4]})
    with pytest.raises(ValueError, match=r"control_channels: expected a non-empty tuple of positive ints"):
        ControlledUNet(**FIELDS, control_channels=(), control_scale=())
    with pytest.raises(ValueError, match=r"control_scale: expected 2 finite float\(s\), one per ControlNet"):
        ControlledUNet(**FIELDS, control_channels=(1, 1), control_scale=(1.0,))
    with pytest.raises(ValueError, match=r"scales: expected one finite control scale or 1"):
        controlnet.with_scale(nets["cn"], (1.0, 2.0))
    with pytest.raises(ValueError, match=r"nets\[1\]: its base params differ from nets\[0\]'s"):
        controlnet.compose([(nets["cn"], nets["params"]),
                            (nets["cn"], {**nets["params"], "base": _perturb(nets["params"]["base"], 9)})])


# ---------------------------------------------------------------------------
# Control images and adherence
# ---------------------------------------------------------------------------


def test_canny_finds_the_outline_of_a_square():
    x = -np.ones((1, 28, 28, 1), np.float32)
    x[0, 8:20, 8:20] = 1.0
    e = controls.canny(x)[0, ..., 0].astype(bool)
    ring = np.zeros((28, 28), bool)
    ring[6:22, 6:22] = True
    ring[10:18, 10:18] = False  # the square's boundary, +- 2 pixels
    assert e.sum() >= 40 and not (e & ~ring).any()
    assert controls.canny(-np.ones((2, 16, 16, 3), np.float32)).sum() == 0  # a flat image has no edge


def test_mask_control_is_the_shapes_generators_own_mask():
    images, _, masks = make_shapes(64, 16, 0)
    np.testing.assert_array_equal(controls.mask(images)[..., 0], masks[..., 0].astype(np.float32))
    ds = get_dataset({"name": "shapes", "num_examples": 16, "resolution": 16, "control": "mask"})
    np.testing.assert_array_equal(ds.source["control"], ds.source["mask"].astype(np.float32))


def test_image_shape_of_computes_no_control_images(monkeypatch):
    """Sampling a ControlNet workdir reads its data shape only: no edges of the training set (on
    Fashion-MNIST's 60,000 images, about 30 s of Canny per load before image_shape_of skipped it)."""
    from jdiff.data import image_shape_of

    config = {"name": "fashion_mnist_sample", "control": "canny"}
    want = get_dataset(config).image_shape

    def refused(*a, **kw):
        raise AssertionError("image_shape_of computed control images")

    monkeypatch.setattr(controls, "from_config", refused)
    assert image_shape_of(config) == want == (28, 28, 1)
    with pytest.raises(ValueError, match=r"control: expected '' or one of \('canny', 'mask'\), got 'edges'"):
        image_shape_of({**config, "control": "edges"})


def test_edge_f1_and_mask_iou_against_hand_counts():
    t = np.zeros((1, 6, 6), bool)
    t[0, 2, 1:5] = True  # 4 target edge pixels on row 2
    p = np.zeros((1, 6, 6), bool)
    p[0, 3, 1:3] = True  # 2 within 1 pixel (row 3) ...
    p[0, 5, 5] = True  # ... and 1 far away
    r = controls.edge_f1(p, t, tolerance=1)
    # precision 2/3; recall: target pixels within 1 of a prediction: columns 1, 2, 3 -> 3/4.
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(2 * (2 / 3) * (3 / 4) / (2 / 3 + 3 / 4))
    assert controls.edge_f1(p, t, tolerance=0)["precision"] == 0.0
    m = controls.mask_iou(np.array([[[1, 1, 0]]]), np.array([[[0, 1, 1]]]))
    assert m["iou"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="tolerance: expected a non-negative int"):
        controls.edge_f1(p, t, tolerance=-1)
    with pytest.raises(ValueError, match=r"pred, target: expected two \[N, H, W\] edge maps of one shape"):
        controls.edge_f1(p, t[:, :5])
    with pytest.raises(ValueError, match="kind: expected one of"):
        controls.control_images("depth", np.zeros((1, 8, 8, 1), np.float32))


def test_map_params_puts_the_base_where_the_adapted_network_wants_it():
    enc = {"conv_in": {"kernel": jnp.ones((3, 3, 1, 8))}, "class_embed": {"embedding": jnp.arange(8.0).reshape(4, 2)}}
    source = {"encoder": enc, "decoder": {"conv_out": {"bias": jnp.zeros(1)}}}
    out = map_params(source, ("base/=", "control_0/encoder/=encoder/"))
    assert sorted(param_paths(out)) == sorted(["base/encoder/conv_in/kernel", "base/encoder/class_embed/embedding",
                                               "base/decoder/conv_out/bias", "control_0/encoder/conv_in/kernel",
                                               "control_0/encoder/class_embed/embedding"])
    grown = map_params(source, (), (1, 0))["encoder"]["class_embed"]["embedding"]
    # 3 classes + null -> rows [E0, E1, E2, E1 (new), E0 (new), E_null].
    np.testing.assert_array_equal(grown, np.arange(8.0).reshape(4, 2)[[0, 1, 2, 1, 0, 3]])
    with pytest.raises(ValueError, match=r"init_new_classes_from: classes \[3\] are not classes of"):
        map_params(source, (), (3,))
    with pytest.raises(ValueError, match=r"init_map: prefix 'base' of 'base=' must be '' or end in '/'"):
        map_params(source, ("base=",))


# ---------------------------------------------------------------------------
# Training against a base workdir, and the command line
# ---------------------------------------------------------------------------


def _small_base_config():
    c = fashion_mnist.get_config("small")
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    # The base tests/test_dreambooth.py trains, exactly: its programs compile once for the suite.
    c.sample.num = 8
    c.sample.guidance = 3.0
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jdiff.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("cn")
    base_dir, cn_dir = str(root / "base"), str(root / "cn")
    train_and_evaluate(_small_base_config(), base_dir)
    c = fashion_mnist_controlnet.get_config("small")
    c.base_workdir = base_dir
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    metrics = train_and_evaluate(c, cn_dir)
    return dict(root=root, base=base_dir, cn=cn_dir, metrics=metrics)


def test_training_leaves_the_base_bit_identical_and_trains_the_zero_convs(trained):
    base = load_for_sampling(trained["base"])
    cn = load_for_sampling(trained["cn"])
    assert isinstance(cn.model, ControlledUNet) and cn.step == 4
    a, b = jax.tree.leaves(base.params), jax.tree.leaves(cn.params["base"])
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    zero_convs = [v for k, v in jax.tree_util.tree_flatten_with_path(cn.params["control_0"])[0] if "zero_conv" in str(k)]
    assert max(float(np.abs(v).max()) for v in zero_convs) > 0  # trained away from zero
    assert trained["metrics"]["num_trainable_params"] == sum(x.size for x in jax.tree.leaves(cn.params["control_0"]))
    saved = json.load(open(os.path.join(trained["cn"], "config.json")))
    assert saved["train"]["init_from"] == trained["base"] and saved["model"]["base_channels"] == 8


def test_the_copy_starts_as_the_base_encoder(trained):
    from jdiff.train.loop import _init_from

    c = fashion_mnist_controlnet.get_config("small")
    c.base_workdir = trained["base"]
    c = adapt.resolve_base(c)
    model = network.build_model(c)
    # Fresh params of the right tree (shapes only: compiling the init would cost seconds), random
    # so that a leaf _init_from did not copy cannot equal the base's.
    shapes = jax.eval_shape(lambda: network.init_params(model, (28, 28, 1), jax.random.key(0),
                                                        cond=network.example_cond(model, (28, 28, 1))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), shapes)
    params = _init_from(c, params, c.train.trainable, None)
    base = load_for_sampling(trained["base"]).params
    for k in ("encoder",):
        for x, y, z in zip(jax.tree.leaves(params["base"][k]), jax.tree.leaves(params["control_0"][k]),
                           jax.tree.leaves(base[k])):
            np.testing.assert_array_equal(x, z)
            np.testing.assert_array_equal(y, z)


def _edges_png(path, size=28, channels=1):
    x = np.zeros((size, size) if channels == 1 else (size, size, channels), np.uint8)
    a, b = size // 4, size - size // 4
    x[a:b, a] = x[a:b, b - 1] = x[a, a:b] = x[b - 1, a:b] = 255
    Image.fromarray(x).save(path)
    return str(path)


def _sample(*args):
    return forked.run_module("launch.sample", *args)


def test_command_line_samples_with_control_scales_and_composition(trained, tmp_path):
    edges = _edges_png(tmp_path / "e.png")
    out = tmp_path / "x.npz"
    r = _sample("--workdir", trained["cn"], "--control", edges, "--control", edges, "--control_workdir", trained["cn"],
                "--control_scale", "1.0", "--control_scale", "0.5", "--num", "4", "--label", "3", "--out", str(out),
                "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(out)["samples"]
    assert x.shape == (4, 28, 28, 1) and np.isfinite(x).all()


BAD_CONTROL = ["no_control", "size", "channels", "range", "count", "plain_model", "scales"]


@pytest.fixture(scope="module")
def refusals(trained, tmp_path_factory):
    """{case: (launch.sample's exit code, its stderr, the XLA compiles meanwhile, its --out path)}."""
    d = tmp_path_factory.mktemp("cn_refusals")
    edges = _edges_png(d / "e.png")
    np.savez(d / "c.npz", image=np.zeros((28, 28, 3), np.float32))
    np.savez(d / "r.npz", image=np.full((28, 28, 1), 2.0, np.float32))
    args = {
        "no_control": ["--workdir", trained["cn"]],
        "size": ["--workdir", trained["cn"], "--control", _edges_png(d / "s.png", 16)],
        "channels": ["--workdir", trained["cn"], "--control", str(d / "c.npz")],
        "range": ["--workdir", trained["cn"], "--control", str(d / "r.npz")],
        "count": ["--workdir", trained["cn"], "--control", edges, "--control", edges],
        "plain_model": ["--workdir", trained["base"], "--control", edges],
        "scales": ["--workdir", trained["cn"], "--control", edges, "--control_scale", "1", "--control_scale", "2"],
    }
    outs = {case: d / case / "never.png" for case in BAD_CONTROL}
    argvs = [args[case] + ["--out", str(outs[case]), "--num", "2"] for case in BAD_CONTROL]
    results = run_commands("launch.sample", argvs, timeout=600)
    return {case: (*res, outs[case]) for case, res in zip(BAD_CONTROL, results, strict=True)}


@pytest.mark.parametrize("case", BAD_CONTROL)
def test_command_line_refuses_bad_control(refusals, case):
    match = {
        "no_control": "--control: .* is a ControlNet \\(1 control channel",
        "size": "--control: expected a control image \\[28, 28, 1\\] .* got shape \\(1, 16, 16, 1\\)",
        "channels": "--control: expected a control image \\[28, 28, 1\\] .* got shape \\(1, 28, 28, 3\\)",
        "range": "--control: expected values in \\[0, 1\\], got range \\[2.0, 2.0\\]",
        "count": "--control: expected 1 control image\\(s\\), one per ControlNet",
        "plain_model": "--control / --control_scale / --control_workdir: .* is not a ControlNet workdir",
        "scales": "--control_scale: expected 1 or 1 values, got 2",
    }[case]
    returncode, stderr, compiled, out = refusals[case]
    assert returncode != 0
    assert __import__("re").search(match, stderr), stderr[-2000:]
    assert "Compiling" not in stderr and compiled == 0 and not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("case", ["missing", "no_base", "not_unet", "shape", "base_field", "control_without_net", "net_without_control"])
def test_adaptation_configs_refuse_bad_bases(trained, tmp_path, case):
    from jdiff.train.loop import train_and_evaluate

    c = fashion_mnist_controlnet.get_config("small")
    c.base_workdir = trained["base"]
    match = {
        "missing": "config.base_workdir: required for model_name 'controlnet'",
        "no_base": "config.base_workdir: .* has no config.json",
        "not_unet": "config.base_workdir: .* holds a 'controlnet' network; expected a trained U-Net",
        "shape": r"config.base_workdir: .* was trained on \(28, 28, 1\) images, but config.data \('digits'\) gives \(8, 8, 1\)",
        "base_field": r"config.model: \['base_channels'\] differ from the base U-Net's fields",
        "control_without_net": "config.data.control: 'canny' makes control images, but the model reads none",
        "net_without_control": "config.data.control: the model reads a 1-channel control image",
    }[case]
    if case == "missing":
        c.base_workdir = ""
    elif case == "no_base":
        c.base_workdir = str(tmp_path / "nothing")
    elif case == "not_unet":
        c.base_workdir = trained["cn"]
    elif case == "shape":
        c.data.name = "digits"
    elif case == "base_field":
        c.model.base_channels = 16
    elif case == "control_without_net":
        c = _small_base_config()
        c.data.control = "canny"
    elif case == "net_without_control":
        c.data.control = ""
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(c, str(workdir))
    assert not workdir.exists()


def test_guidance_keeps_the_control_in_both_halves(nets):
    """Classifier-free guidance on the label of a ControlNet: (1 + w) F(x, y, c) - w F(x, null, c),
    the control c in the unconditional half too (Zhang et al. 2023's default)."""
    from jdiff.inference import model_fn_for

    x, t, labels = nets["x"], nets["t"], nets["labels"]
    params = {"base": nets["params"]["base"], "control_0": _perturb(nets["params"]["control_0"], 11)}
    fn = model_fn_for(nets["cn"], params, labels, 2.0, cond={"control": nets["control"]})
    apply = jax.jit(nets["cn"].apply)
    cond = apply({"params": params}, x, t, {"label": labels, "control": nets["control"]})
    null = apply({"params": params}, x, t, {"label": jnp.full_like(labels, 3), "control": nets["control"]})
    np.testing.assert_allclose(jax.jit(fn)(x, t), 3.0 * cond - 2.0 * null, rtol=1e-5, atol=1e-5)
