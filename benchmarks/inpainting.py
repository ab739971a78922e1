"""Inpainting a trained model's data: naive replacement, RePaint and a mask-channel model, measured.

    python -m benchmarks.inpainting --base workdirs/digits --inpaint workdirs/digits_inpaint \\
        --scratch workdirs/digits_inpaint_scratch --num 500 --steps 100
    python -m benchmarks.inpainting --base workdirs/fashion_mnist --inpaint workdirs/fashion_mnist_inpaint \\
        --num 200 --steps 50

The first ``--num`` test images, each masked by a random mask of one kind (box, half, stroke:
``jdiff.editing.random_masks``, one fixed key per kind), completed by

- replacement (RePaint with r = 1, Lugmayr et al. 2022) and RePaint (jump length 10, r = 10) with
  the base model: ``jdiff.editing.repaint``, ``--steps`` respaced ancestral steps;
- the inpainting model fine-tuned from the base (configs/*_inpaint.py; and the same network trained
  from scratch with ``--scratch``): ``jdiff.editing.inpaint``, the same sampler and steps, known
  pixels pasted back.

Every model is sampled at its null label (unconditional completion; the class must come from the
known pixels). Reported per method: FID of the completed images against the test split in the
dataset's feature network (with the FID of the uncorrupted originals at the same count: the floor
at this sample size), class accuracy of the completions against the originals' labels, the largest
error on the known pixels, the seam measure (``jdiff.metrics.seam_gradient``) as a ratio to the
originals' under the same masks (1 = as smooth as real images), network calls per image and wall
time (one call each, its compilation included, on this machine).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jdiff import data as data_lib
from jdiff import editing, metrics
from jdiff.evaluation import evaluators
from jdiff.inference import model_fn_for
from jdiff.train import network
from jdiff.workdir import load_for_sampling

KINDS = ("box", "half", "stroke")


def test_images(loaded, num: int):
    test = data_lib.get_dataset(loaded.config.data, split="test")
    n = min(num, data_lib.source_length(test.source))
    batch = data_lib.batch_at(test.source, 0, batch_size=n, seed=0, shuffle=False)
    return np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32)


def train_images(loaded, num: int):
    train = data_lib.get_dataset(loaded.config.data)
    n = min(num, data_lib.source_length(train.source))
    batch = data_lib.batch_at(train.source, 0, batch_size=n, seed=0, shuffle=False)
    return np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32)


def null_labels(loaded, n: int):
    k = getattr(loaded.model, "num_classes", None)
    return None if k is None else np.full((n,), k, np.int32)


def score(evaluator, x, y, x_real, mask) -> dict:
    out = evaluator.score(np.clip(np.asarray(x), -1.0, 1.0), y)
    known_err = float(np.max(np.abs(np.asarray(x) - x_real) * np.asarray(mask)))
    seam = float(np.nanmean(metrics.seam_gradient(jnp.asarray(x), mask)) / np.nanmean(metrics.seam_gradient(jnp.asarray(x_real), mask)))
    return {"fid": float(out["fid"]), "class_accuracy": float(out["class_accuracy"]), "known_max_error": known_err,
            "seam_ratio": seam}


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="workdir of the base (plain) model")
    p.add_argument("--inpaint", default=None, help="workdir of the mask-channel inpainting model")
    p.add_argument("--scratch", default=None, help="workdir of the same inpainting network trained from scratch")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--steps", type=int, default=50, help="respaced ancestral steps of every method")
    p.add_argument("--jump_n_sample", type=int, default=10)
    p.add_argument("--jump_length", type=int, default=10)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--methods", default="replace,repaint,model",
                   help="which of replace (RePaint r=1), repaint (r=--jump_n_sample), model (the inpainting workdirs) to run")
    args = p.parse_args()
    info = common.machine_info()
    base = load_for_sampling(args.base)
    evaluator = evaluators.get(base.config.eval.evaluator)
    x_real, y = test_images(base, args.num)
    n = len(x_real)
    hw = tuple(x_real.shape[1:3])
    kw = dict(parameterization=base.config.diffusion.parameterization, variance=base.config.diffusion.variance,
              clip=base.config.sample.clip or None)
    base_fn = model_fn_for(base.model, base.params, null_labels(base, n))
    models = [("fine-tuned inpainting model", args.inpaint), ("inpainting model from scratch", args.scratch)]
    models = [(name, load_for_sampling(w)) for name, w in models if w]
    for name, m in models:
        print(f"{name}: step {m.step}")
        if m.config.data.get("transform", "") != "inpaint":
            raise SystemExit(f"{name}: {m.config.data.transform!r} is not an inpainting workdir (data.transform='inpaint')")

    rows, raw = [], {"args": vars(args), "machine": info, "results": {}}
    real = evaluator.score(x_real, y)
    floor = evaluator.score(*train_images(base, n))
    print(f"originals ({n} test images): FID {real['fid']:.2f}, class accuracy {real['class_accuracy']:.3f}; "
          f"{n} train images: FID {floor['fid']:.2f}")
    raw["originals"] = {"fid": float(real["fid"]), "class_accuracy": float(real["class_accuracy"]),
                        "train_fid": float(floor["fid"])}
    for i, kind in enumerate(args.kinds.split(",")):
        mask = np.asarray(editing.random_masks(jax.random.key(100 + i), n, hw, kinds=(kind,)))
        hidden = float(1 - mask.mean())
        cases = []
        methods = set(args.methods.split(","))
        for r in [r for r, name in ((1, "replace"), (args.jump_n_sample, "repaint")) if name in methods]:
            def run(r=r):
                return editing.repaint(base_fn, base.schedule, x_real, mask, jax.random.key(i), steps=args.steps,
                                       jump_length=args.jump_length, jump_n_sample=r, **kw)
            calls = int(np.sum(np.diff(editing.repaint_times(args.steps, args.jump_length, r)) < 0))
            cases.append(("replacement (RePaint r=1)" if r == 1 else f"RePaint r={r}", run, calls))
        for name, m in (models if "model" in methods else []):
            fn = jax.tree_util.Partial(network.apply_fn(m.model), m.params)  # (x, t, cond) -> output
            labels = null_labels(m, n)
            cond = None if labels is None else {"label": jnp.asarray(labels)}

            def run(fn=fn, cond=cond, m=m):
                return editing.inpaint(fn, m.schedule, x_real, mask, jax.random.key(i), cond=cond, steps=args.steps,
                                       parameterization=m.config.diffusion.parameterization,
                                       variance=m.config.diffusion.variance, clip=m.config.sample.clip or None)
            cases.append((name, run, args.steps))
        for name, run, calls in cases:
            t0 = time.perf_counter()
            x = np.asarray(jax.block_until_ready(run()))
            wall = time.perf_counter() - t0
            s = score(evaluator, x, y, x_real, mask)
            s.update(calls=calls, wall_s=wall, hidden_fraction=hidden)
            raw["results"][f"{kind}/{name}"] = s
            rows.append([kind, name, s["fid"], s["class_accuracy"], f"{s['known_max_error']:.1e}", s["seam_ratio"], calls,
                         f"{wall:.0f}"])
            print(common.markdown_table(["mask", "method", "FID", "class acc", "known max err", "seam ratio",
                                         "calls/image", "wall s"], rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(common.header(f"Inpainting {base.config.data.name}", "python -m benchmarks.inpainting " + " ".join(sys.argv[1:]), info))
    print(f"{n} test images; the originals score FID {real['fid']:.2f} and class accuracy {real['class_accuracy']:.3f}; "
          f"as many train images score FID {floor['fid']:.2f} (the floor at this count: completions keep test pixels, "
          "which the reference shares, so they can score below it).\n")
    print(common.markdown_table(["mask", "method", "FID", "class acc", "known max err", "seam ratio", "calls/image",
                                 "wall s"], rows))
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
