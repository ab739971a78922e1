"""Cascaded diffusion on Fashion-MNIST (CDM, Ho et al. 2022): super-resolution quality, the
conditioning-augmentation ablation and sweep, and the cascade's cost against one 28x28 model.

    python -m benchmarks.cascade --base workdirs/fm_base14 --sr workdirs/fm_sr --sr_noaug workdirs/fm_sr_noaug \
        --num 1000 --guidance 3 --json cascade.json

Three parts, each printed as a Markdown table:

1. Super-resolution of real test images (the first ``--num_test`` of the 10,000): each is
   area-downsampled to 14x14 (the base stage's data) and upsampled by each SR model at level 0,
   and by bicubic interpolation. Consistency = mean |downsample(SR(y)) - y| over pixels ([-1, 1]
   scale; an SR model that ignored its input would score like an unconditional one), PSNR
   against the 28x28 originals (peak-to-peak 2), the mean L2 distance of the Fashion-MNIST
   classifier's 128-d features to the original's, FID against the 10,000 test images and
   class accuracy.
2. The cascade: ``--num`` class-balanced samples of the base model (DPM-Solver++, ``--steps``,
   guidance ``--guidance``), drawn once and upsampled by each SR model at each level of
   ``--levels`` (non-truncated augmentation: the same base samples noised to s = round(a T) - 1),
   and at ``--truncated_levels`` with truncated augmentation (the base stops at s). FID against
   the test images, class accuracy, precision, recall. Rows "real 14x14" upsample the real
   test images' low-resolution copies instead: what the SR stage does when the base is perfect;
   the row "bicubic" upsamples the base samples by interpolation instead of an SR model.
3. Cost: seconds per 28x28 sample, the cascade (base at 14x14 + SR at 28x28) against the
   single 28x28 model of configs/fashion_mnist.py (same sampler, steps and guidance; random
   params: the time does not depend on the weights), interleaved, ``--reps`` rounds of
   ``--cost_batch`` samples.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jdiff import cascade
from jdiff import data as data_lib
from jdiff.evaluation import evaluators
from jdiff.evaluation.fashion_mnist_classifier import fashion_mnist_features
from jdiff.inference import balanced_labels, generate
from jdiff.train import config as config_lib
from jdiff.train import network
from jdiff.workdir import load_for_sampling


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of 10 log10(peak^2 / MSE), peak = 2 (the [-1, 1] range)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    fa, _ = fashion_mnist_features(np.clip(a, -1, 1))
    fb, _ = fashion_mnist_features(np.clip(b, -1, 1))
    return float(np.mean(np.linalg.norm(np.asarray(fa) - np.asarray(fb), axis=-1)))


def consistency(up: np.ndarray, low: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(cascade.downsample(jnp.asarray(up), 2)) - low)))


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return np.asarray(out), time.perf_counter() - t0


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the 14x14 base workdir (configs/fashion_mnist_base14.py)")
    p.add_argument("--sr", required=True, help="the SR workdir trained with augmentation (configs/fashion_mnist_sr.py)")
    p.add_argument("--sr_noaug", default=None, help="the SR workdir trained without (configs/fashion_mnist_sr.py:noaug)")
    p.add_argument("--num", type=int, default=1000, help="cascade samples per row")
    p.add_argument("--num_test", type=int, default=1000, help="test images for part 1")
    p.add_argument("--levels", default="0,0.05,0.1,0.2,0.4")
    p.add_argument("--truncated_levels", default="0.1,0.2")
    p.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps of every stage")
    p.add_argument("--guidance", type=float, default=3.0, help="the base stage's classifier-free guidance weight")
    p.add_argument("--cost_batch", type=int, default=100)
    p.add_argument("--parts", default="sr,cascade,cost")
    p.add_argument("--no_real", action="store_true", help="skip part 2's rows on real 14x14 inputs")
    args = p.parse_args()
    info = common.machine_info()
    parts = args.parts.split(",")
    levels = [float(v) for v in args.levels.split(",") if v]
    trunc_levels = [float(v) for v in args.truncated_levels.split(",") if v]
    ev = evaluators.get("fashion_mnist")
    base_l = load_for_sampling(args.base)
    srs = {"aug": load_for_sampling(args.sr)}
    if args.sr_noaug:
        srs["noaug"] = load_for_sampling(args.sr_noaug)
    sampler = dict(method="dpm_solver++", steps=args.steps)
    stages = {k: cascade.Stage.from_loaded(v, **sampler, guidance=0.0) for k, v in srs.items()}
    base = cascade.Stage.from_loaded(base_l, **sampler, guidance=args.guidance)
    raw = {"args": vars(args), "machine": info, "results": {}}
    command = "python -m benchmarks.cascade " + " ".join(sys.argv[1:])
    print(common.header("Cascaded diffusion on Fashion-MNIST", command, info))
    headers = ["SR model", "input", "level", "FID", "class acc", "precision", "recall", "consistency", "wall s"]

    test = data_lib.get_dataset(srs["aug"].config.data, split="test")
    n_test = min(args.num_test, data_lib.source_length(test.source))
    batch = data_lib.batch_at(test.source, 0, batch_size=n_test, seed=0, shuffle=False)
    x_hr, y_test = np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32)
    x_lr = np.asarray(cascade.downsample(jnp.asarray(x_hr), 2))

    if "sr" in parts:
        rows = []
        bicubic = np.clip(np.asarray(cascade.upsample(jnp.asarray(x_lr), (28, 28), "bicubic")), -1, 1)
        cands = {"bicubic": (bicubic, 0.0)}
        for name, st in stages.items():
            up, wall = timed(lambda: cascade.super_resolve(st.replace(aug_level=0.0), x_lr, jax.random.key(1),
                                                           labels=y_test))
            cands[f"SR ({name}), a = 0"] = (np.clip(up, -1, 1), wall)
        for name, (up, wall) in cands.items():
            s = ev.score(up, y_test)
            row = [name, consistency(up, x_lr), psnr(up, x_hr), feature_distance(up, x_hr), float(s["fid"]),
                   float(s["class_accuracy"]), f"{wall:.0f}"]
            rows.append(row)
            raw["results"][f"sr/{name}"] = row
            print(row, flush=True)
        orig = ev.score(x_hr, y_test)
        print(f"\n#### 1. Super-resolution of {n_test} test images, 14x14 -> 28x28\n")
        print(f"The originals themselves: FID {orig['fid']:.2f} (they are part of the reference), class accuracy "
              f"{orig['class_accuracy']:.3f}.\n")
        print(common.markdown_table(["upsampler", "consistency", "PSNR dB", "feature dist", "FID", "class acc", "wall s"],
                                    rows))
        print()

    if "cascade" in parts:
        labels = balanced_labels(args.num, 10)
        low, wall_base = timed(lambda: generate(
            base.module, base.params, base.schedule, base.image_shape, args.num, jax.random.key(0), labels=labels,
            guidance_weight=base.guidance, method=base.method, steps=base.steps, clip=base.clip))
        print(f"base: {args.num} samples in {wall_base:.0f} s", flush=True)
        real_low = x_lr[np.resize(np.arange(n_test), args.num)]
        real_labels = y_test[np.resize(np.arange(n_test), args.num)]
        rows, floor = [], {}

        def add(name, source, level, up, lab, wall, low_in):
            up = np.clip(up, -1, 1)
            s = ev.score(up, lab)
            floor["fid"] = float(s["fid_floor"])
            row = [name, source, level, float(s["fid"]), float(s["class_accuracy"]), float(s["precision"]),
                   float(s["recall"]), consistency(up, low_in), f"{wall:.0f}"]
            rows.append(row)
            raw["results"][f"cascade/{name}/{source}/{level}"] = row
            print(row, flush=True)

        add("bicubic", "base", 0.0, np.asarray(cascade.upsample(jnp.asarray(low), (28, 28), "bicubic")), labels, 0.0, low)
        for name, st in stages.items():
            for a in levels:
                up, wall = timed(lambda: cascade.super_resolve(st.replace(aug_level=a), low, jax.random.key(2),
                                                               labels=labels))
                add(name, "base", a, up, labels, wall, low)
            for a in trunc_levels:
                t0 = time.perf_counter()
                outs = cascade.cascade([base, st.replace(aug_level=a)], args.num, jax.random.key(3), labels=labels,
                                       aug_mode="truncated", return_all=True)
                wall = time.perf_counter() - t0
                add(name, "base, truncated", a, outs[-1], labels, wall, outs[0])
            if not args.no_real:
                up, wall = timed(lambda: cascade.super_resolve(st.replace(aug_level=0.0), real_low, jax.random.key(2),
                                                               labels=real_labels))
                add(name, "real 14x14", 0.0, up, real_labels, wall, real_low)
        print(f"\n#### 2. The cascade: {args.num} class-balanced samples, base guidance w = {args.guidance}, "
              f"DPM-Solver++ {args.steps} steps per stage\n")
        print(f"The base samples took {wall_base:.0f} s. FID floor ({args.num} real train images against the same "
              f"reference): {floor.get('fid', float('nan')):.2f}.\n")
        print(common.markdown_table(headers, rows))
        print()

    if "cost" in parts:
        c28 = common.load_config("fashion_mnist")
        m28 = network.build_model(c28)
        p28 = network.init_params(m28, (28, 28, 1), jax.random.key(0))
        s28 = config_lib.make_schedule(c28)
        nb = args.cost_batch
        labels = balanced_labels(nb, 10)
        st = stages["aug"].replace(aug_level=0.1)

        def single():
            return generate(m28, p28, s28, (28, 28, 1), nb, jax.random.key(0), labels=labels,
                            guidance_weight=args.guidance, method="dpm_solver++", steps=args.steps, batch_size=nb)

        def two_stage():
            return cascade.cascade([base, st], nb, jax.random.key(0), labels=labels, batch_size=nb)

        times = common.interleaved({"single 28x28": single, "cascade 14 -> 28": two_stage}, args.reps)
        rows = [[k, common.median(v) / nb * 1000, common.spread([t / nb * 1000 for t in v])] for k, v in times.items()]
        ratio = common.paired_ratio(times["cascade 14 -> 28"], times["single 28x28"])
        raw["results"]["cost"] = {k: v for k, v in times.items()}
        print(f"\n#### 3. Cost per 28x28 sample ({nb} per batch, {args.reps} interleaved rounds)\n")
        print(common.markdown_table(["pipeline", "ms / sample (median)", "min-max"], rows))
        print(f"\ncascade / single (paired): {ratio:.2f}")
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
