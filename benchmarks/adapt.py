"""Adapting the Fashion-MNIST model: ControlNet adherence, DreamBooth fidelity vs prior drift, training cost.

    python -m benchmarks.adapt controlnet --base workdirs/fm28 --cn workdirs/fm28_cn [--cn_lora workdirs/fm28_cn_lora] \
        --num 500 --guidance 3
    python -m benchmarks.adapt dreambooth --base workdirs/fm28 --subject workdirs/subject --subject_class 9 \
        --db lambda1=workdirs/fm28_db --db lambda0=workdirs/fm28_db0 --db lora_lambda1=workdirs/fm28_db_lora
    python -m benchmarks.adapt cost --base workdirs/fm28 --subject workdirs/subject --subject_class 9
    python -m benchmarks.adapt controlnet_shapes --base workdirs/shapes16 --cn workdirs/shapes16_cn --num 500

controlnet: the first --num test images' Canny edges (sigma 1.5, jdiff.data.controls) are the
controls, their labels the labels; each ControlNet samples them (DPM-Solver++ --steps, guidance
--guidance on the label, the control in both halves) at control scales 0, 0.5, 1, 1.5 (scale 0 is
the base model without control, bit for bit). Adherence: edge F1 (1-pixel tolerance) between
Canny(sample) and the control; quality: FID against the 10,000 test images and class accuracy
(the Fashion-MNIST classifier). The row "real" scores the test images themselves (F1 of their own
edges is 1 by construction: it shows the FID floor at this sample count).

controlnet_shapes: the same on the shapes test split at 16x16 with the object masks as controls;
adherence is the IoU of the generated shape's mask (pixels brighter than the background) with the
control mask (jdiff.data.controls.mask_iou).

dreambooth: for the base and each fine-tuned workdir, --num_subject samples of "[V]" (label 10)
and --num_class samples of the plain subject class, both at guidance --guidance. Fidelity:
feature distance (the classifier's 128-d features) from each [V] sample to the nearest subject
image, against the mean distance to the other test items of the class (ratio < 1: closer to the
subject), and the fraction whose nearest neighbour is a subject image. Prior drift of the class
samples: class accuracy, FID against the class's 1,000 test items, diversity (mean pairwise
feature distance) and the same subject-nearest fraction (a collapsed class is all subject).

cost: per train step of each adaptation (batch 32, one device, the config's network), side by
side in one run: trainable params, the median step time (--reps interleaved rounds of --steps
steps), and XLA's compiled memory estimate (arguments + outputs + temporaries, bytes; CPU has no
peak-memory counter) against fine-tuning the whole U-Net.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from benchmarks import common
from jdiff import metrics
from jdiff.data import controls
from jdiff.data import fashion_mnist as fm
from jdiff.evaluation import evaluators
from jdiff.evaluation.fashion_mnist_classifier import fashion_mnist_features
from jdiff.inference import generate
from jdiff.models.lora import merged
from jdiff.workdir import load_for_sampling


def _sample(loaded, num, key, labels, guidance, steps, cond=None, model=None):
    model_, params = merged(loaded.model, loaded.params)
    c = loaded.config
    t0 = time.perf_counter()
    x = generate(model or model_, params, loaded.schedule, loaded.image_shape, num, key, labels=labels, cond=cond or {},
                 guidance_weight=guidance, method="dpm_solver++", steps=steps, batch_size=100,
                 variance=c.diffusion.variance, parameterization=c.diffusion.parameterization)
    return np.asarray(x), time.perf_counter() - t0


def controlnet_part(a):
    from jdiff import controlnet

    ev = evaluators.get("fashion_mnist")
    x_test, y_test = fm.load_fashion_mnist("test", None, None)
    x, y = x_test[: a.num], y_test[: a.num].astype(np.int32)
    edges = controls.canny(x)
    key = jax.random.key(a.seed)
    rows = []
    s = ev.score(x, y)
    rows.append(["real test images", "-", 1.0, 1.0, 1.0, float(s["fid"]), float(s["class_accuracy"]), "-"])
    print(common.markdown_table(["model", "scale", "edge F1", "precision", "recall", "FID", "class acc", "s"], rows),
          flush=True)
    nets = [("ControlNet", a.cn)] + ([("ControlNet-LoRA", a.cn_lora)] if a.cn_lora else [])
    for name, w in nets:
        loaded = load_for_sampling(w)
        module, _ = merged(loaded.model, loaded.params)
        for scale in (a.scales if name == "ControlNet" else (1.0,)):
            m = controlnet.with_scale(module, scale)
            out, secs = _sample(loaded, a.num, key, y, a.guidance, a.steps, {"control": edges}, model=m)
            f = controls.edge_f1(controls.canny(out), edges)
            s = ev.score(out, y)
            label = f"{name}" + (" = base, no control" if scale == 0 else "")
            rows.append([label, scale, f["f1"], f["precision"], f["recall"], float(s["fid"]),
                         float(s["class_accuracy"]), round(secs, 1)])
            print(common.markdown_table(["model", "scale", "edge F1", "precision", "recall", "FID", "class acc", "s"],
                                        rows[-1:]), flush=True)
    print(common.markdown_table(["model", "scale", "edge F1", "precision", "recall", "FID", "class acc", "s"], rows))
    return rows


def controlnet_shapes_part(a):
    """Mask adherence on the shapes test split: IoU of the generated shape's mask (pixels brighter
    than the background) with the control mask, per scale; no feature network scores shapes."""
    from jdiff import controlnet
    from jdiff.data import get_dataset

    ds = get_dataset({"name": "shapes", "split": "test", "resolution": 16, "num_examples": a.num})
    x, y = ds.source["image"], ds.source["label"].astype(np.int32)
    masks = controls.mask(x)
    key = jax.random.key(a.seed)
    header = ["model", "scale", "mask IoU", "per-image IoU", "s"]
    rows = [["real test images", "-", 1.0, 1.0, "-"]]
    loaded = load_for_sampling(a.cn)
    module, _ = merged(loaded.model, loaded.params)
    for scale in a.scales:
        out, secs = _sample(loaded, a.num, key, y, a.guidance, a.steps, {"control": masks},
                            model=controlnet.with_scale(module, scale))
        r = controls.mask_iou(controls.mask(out), masks)
        rows.append(["ControlNet" + (" = base, no control" if scale == 0 else ""), scale, r["iou"], r["iou_mean"],
                     round(secs, 1)])
        print(common.markdown_table(header, rows[-1:]), flush=True)
        if a.grid_dir:
            from jdiff import images

            images.save_grid(np.concatenate([masks[:8].repeat(3, -1) * 2 - 1, out[:8]]),
                             os.path.join(a.grid_dir, f"shapes_controlnet_{scale}.png"), ncols=8)
    print(common.markdown_table(header, rows))
    return rows


def _fid(fa, fb) -> float:
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    return float(metrics.frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False)))


def _diversity(f) -> float:
    f = np.asarray(f, np.float64)
    d = np.sqrt(np.maximum((f * f).sum(1)[:, None] + (f * f).sum(1)[None] - 2 * f @ f.T, 0))
    return float(d[np.triu_indices(len(f), 1)].mean())


def dreambooth_part(a):
    from jdiff import dreambooth

    subject = dreambooth.load_subject(a.subject, (28, 28, 1))
    x_test, y_test = fm.load_fashion_mnist("test", None, None)
    same = x_test[y_test == a.subject_class]
    # The other items of the class: not the subject (its exact copy in the test set is dropped).
    keep = np.abs(same - subject[0]).reshape(len(same), -1).max(1) > 1e-3
    cls_feat = np.asarray(fashion_mnist_features(same[keep])[0])
    sub_feat = np.asarray(fashion_mnist_features(subject)[0])
    key = jax.random.key(a.seed)
    header = ["model", "[V]: d_subject / d_class", "[V]: nearest is subject", "[V]: class acc",
              "class: acc", "class: FID", "class: diversity", "class: nearest is subject", "class: d_subject"]
    rows = []
    for name, w in [("base (before)", a.base)] + [tuple(d.split("=", 1)) for d in a.db]:
        loaded = load_for_sampling(w)
        k = getattr(merged(loaded.model, loaded.params)[0], "num_classes")
        v_label = a.subject_class if name.startswith("base") else k - 1  # the base has no [V]: its class
        v, _ = _sample(loaded, a.num_subject, jax.random.fold_in(key, 1), np.full(a.num_subject, v_label, np.int32),
                       a.guidance, a.steps)
        c, _ = _sample(loaded, a.num_class, jax.random.fold_in(key, 2), np.full(a.num_class, a.subject_class, np.int32),
                       a.guidance, a.steps)
        vf, vl = (np.asarray(t) for t in fashion_mnist_features(v))
        cf, cl = (np.asarray(t) for t in fashion_mnist_features(c))
        fv = dreambooth.subject_fidelity(vf, sub_feat, cls_feat)
        fc = dreambooth.subject_fidelity(cf, sub_feat, cls_feat)
        rows.append([name, fv["ratio"], fv["nn_subject"], float((vl.argmax(-1) == a.subject_class).mean()),
                     float((cl.argmax(-1) == a.subject_class).mean()), _fid(cf, cls_feat), _diversity(cf),
                     fc["nn_subject"], fc["d_subject"]])
        print(common.markdown_table(header, rows[-1:]), flush=True)
        if a.grid_dir:
            from jdiff import images

            images.save_grid(np.concatenate([v[:10], c[:10]]), os.path.join(a.grid_dir, f"dreambooth_{name}.png"), ncols=10)
    print(common.markdown_table(header, rows))
    return rows


def cost_part(a):
    """Train-step cost of each adaptation, side by side (one device, batch 32)."""
    import ml_collections

    from configs import fashion_mnist_controlnet, fashion_mnist_dreambooth
    from jdiff.train import adapt, network
    from jdiff.train import config as config_lib
    from jdiff.train.state import create_train_state, make_optimizer
    from jdiff.train.step import make_train_step

    def build(cfg):
        cfg = adapt.resolve_base(cfg)
        model = network.build_model(cfg)
        shape = (28, 28, 1)
        params = network.init_params(model, shape, jax.random.key(0), cond=network.example_cond(model, shape))
        opt = make_optimizer(cfg.optim)
        state = create_train_state(params, opt, jax.random.key(1), cfg.train.trainable)
        step = jax.jit(make_train_step(network.apply_fn(model), config_lib.make_schedule(cfg), opt, cfg,
                                       num_classes=getattr(model, "num_classes", None)), donate_argnums=0)
        b = 32
        rng = np.random.default_rng(0)
        batch = {"image": rng.uniform(-1, 1, (b,) + shape).astype(np.float32), "cond": {}}
        if getattr(model, "num_classes", None):
            batch["cond"]["label"] = rng.integers(0, 10, b).astype(np.int32)
        if network.control_channels(model):
            batch["cond"]["control"] = (rng.random((b, 28, 28, 1)) > 0.8).astype(np.float32)
        compiled = step.lower(state, batch).compile()
        mem = compiled.memory_analysis()
        mem_bytes = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                 + mem.temp_size_in_bytes)
        trainable = sum(int(x.size) for x in jax.tree.leaves(state.params))
        total = trainable + sum(int(x.size) for x in jax.tree.leaves(state.frozen))
        return dict(step=step, state=state, batch=batch, mem=mem_bytes, trainable=trainable, total=total)

    def base_cfg():
        c = fashion_mnist_dreambooth.get_config()
        c.base_workdir = a.base
        c.dreambooth.subject_class = a.subject_class
        c.data = ml_collections.ConfigDict(load_base_data(a.base))
        c.data.batch_size = 32
        return c

    cases = {}
    c = base_cfg()
    c.train.init_new_classes_from = (a.subject_class,)
    cases["full U-Net fine-tune (DreamBooth)"] = c
    c = base_cfg()
    c.train.init_new_classes_from = (a.subject_class,)
    lora = fashion_mnist_dreambooth.get_config("lora")
    with c.unlocked():
        c.model_name, c.model, c.train.trainable = lora.model_name, lora.model, lora.train.trainable
    cases["LoRA r4 (DreamBooth)"] = c
    for arg, name in ((None, "ControlNet"), ("lora", "ControlNet-LoRA r8")):
        c = fashion_mnist_controlnet.get_config(arg)
        c.base_workdir = a.base
        c.data.batch_size = 32
        cases[name] = c
    built = {k: build(v) for k, v in cases.items()}
    times = {k: [] for k in built}
    for _ in range(a.reps):
        for k, b in built.items():
            state = b["state"]
            state, m = b["step"](state, b["batch"])  # warm
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(a.steps_cost):
                state, m = b["step"](state, b["batch"])
            jax.block_until_ready(m)
            times[k].append((time.perf_counter() - t0) / a.steps_cost)
            b["state"] = state
    ref = common.median(times["full U-Net fine-tune (DreamBooth)"])
    rows = [[k, f"{b['trainable']:,}", f"{b['total']:,}", round(1e3 * common.median(times[k]), 1),
             round(common.median(times[k]) / ref, 2), "-" if b["mem"] is None else f"{b['mem'] / 2**20:.1f}"]
            for k, b in built.items()]
    header = ["adaptation", "trainable params", "all params", "ms / step", "x full fine-tune", "compiled memory MiB"]
    print(common.markdown_table(header, rows))
    return rows


def load_base_data(base):
    from jdiff.workdir import load_config

    return load_config(base).data.to_dict()


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("part", choices=["controlnet", "controlnet_shapes", "dreambooth", "cost"])
    p.add_argument("--base", required=True)
    p.add_argument("--cn", default=None)
    p.add_argument("--cn_lora", default=None)
    p.add_argument("--db", action="append", default=[], help="name=workdir (repeat)")
    p.add_argument("--subject", default=None)
    p.add_argument("--subject_class", type=int, default=9)
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--num_subject", type=int, default=100)
    p.add_argument("--num_class", type=int, default=500)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--steps_cost", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid_dir", default=None)
    a = p.parse_args()
    info = common.machine_info()
    print(common.header(f"Adaptation: {a.part}", "python -m benchmarks.adapt " + " ".join(sys.argv[1:]), info), flush=True)
    rows = {"controlnet": controlnet_part, "controlnet_shapes": controlnet_shapes_part, "dreambooth": dreambooth_part, "cost": cost_part}[a.part](a)
    common.write_json(a.json, {"info": info, "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
