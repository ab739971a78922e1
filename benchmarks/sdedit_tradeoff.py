"""SDEdit's trade-off (Meng et al. 2022, fig. 3): t0 against faithfulness to a coarse guide and realism.

    python -m benchmarks.sdedit_tradeoff --workdir workdirs/fashion_mnist --num 200 --png docs/sdedit_tradeoff.png
    python -m benchmarks.sdedit_tradeoff --workdir workdirs/digits --num 500

Guides are made from the first ``--num`` test images in three coarse ways: ``blur`` (area
downsampling by 4, by 2 for 8x8 digits, bilinear back up), ``quantize`` (4 grey levels) and ``paint`` (a stroke-painting
stand-in: 4x4-pixel (2x2 for digits) blocks of the block mean, quantized to 3 levels, as a quick colour sketch).
Each guide is edited by ``jdiff.editing.sdedit`` from t0 in ``--t0s`` (of T = 1000, 0-indexed),
with DDPM ancestral steps at the density of ``--steps`` per 1000 timesteps, at the null label.
Reported: the RMS distance of the edit to its guide (faithfulness; the guide's own distance to
the original beside it), the FID of the edits against the test split (realism; the guides' own
FID in the rows "guide", and as many train images' FID as the floor) and the class accuracy of the edits against the originals' labels.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.inpainting import null_labels, test_images, train_images
from jdiff import editing
from jdiff.evaluation import evaluators
from jdiff.inference import model_fn_for
from jdiff.workdir import load_for_sampling

T0S = (99, 199, 299, 399, 499, 599, 699, 799)


def _blocks(x: np.ndarray, f: int) -> np.ndarray:
    b, h, w, c = x.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    pad = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    means = pad.reshape(b, hp // f, f, wp // f, f, c).mean((2, 4))
    return np.repeat(np.repeat(means, f, 1), f, 2)[:, :h, :w]


def _quantize(x: np.ndarray, levels: int) -> np.ndarray:
    q = np.round((x + 1) / 2 * (levels - 1)) / (levels - 1)
    return (q * 2 - 1).astype(np.float32)


def make_guides(x: np.ndarray) -> dict[str, np.ndarray]:
    h, w = x.shape[1:3]
    f = 4 if min(h, w) >= 16 else 2
    low = jnp.asarray(_blocks(x, f)[:, ::f, ::f])  # area downsampling by f
    blur = np.asarray(jax.image.resize(low, x.shape, "bilinear"), np.float32)
    return {"blur": np.clip(blur, -1, 1), "quantize": _quantize(x, 4), "paint": _quantize(_blocks(x, f), 3)}


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def main():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--steps", type=int, default=100, help="DDPM steps per 1000 timesteps of the chain SDEdit runs")
    p.add_argument("--t0s", default=",".join(str(t) for t in T0S))
    p.add_argument("--png", default=None, help="write the trade-off chart (distance to guide vs FID) here")
    args = p.parse_args()
    info = common.machine_info()
    loaded = load_for_sampling(args.workdir)
    cfg = loaded.config
    evaluator = evaluators.get(cfg.eval.evaluator)
    x, y = test_images(loaded, args.num)
    n = len(x)
    fn = model_fn_for(loaded.model, loaded.params, null_labels(loaded, n))
    T = loaded.schedule.num_timesteps
    t0s = [int(v) for v in args.t0s.split(",")]
    kw = dict(parameterization=cfg.diffusion.parameterization, variance=cfg.diffusion.variance, clip=cfg.sample.clip or None)
    real = evaluator.score(x, y)
    floor = evaluator.score(*train_images(loaded, n))
    rows, raw, series, labels = [], {"args": vars(args), "machine": info, "results": {}}, {}, {}
    for gi, (kind, guide) in enumerate(make_guides(x).items()):
        g = evaluator.score(guide, y)
        rows.append([kind, "guide", rms(guide, guide), rms(guide, x), float(g["fid"]), float(g["class_accuracy"]), 0, "-"])
        series[kind], labels[kind] = [(0.0, float(g["fid"]))], ["guide"]
        for t0 in t0s:
            steps = max(1, round(args.steps * (t0 + 1) / T))
            t_start = time.perf_counter()
            out = editing.sdedit(fn, loaded.schedule, guide, t0, jax.random.key(1000 * gi + t0), steps=steps, **kw)
            out = np.clip(np.asarray(jax.block_until_ready(out)), -1, 1)
            wall = time.perf_counter() - t_start
            s = evaluator.score(out, y)
            row = [kind, t0, rms(out, guide), rms(out, x), float(s["fid"]), float(s["class_accuracy"]), steps, f"{wall:.0f}"]
            rows.append(row)
            raw["results"][f"{kind}/{t0}"] = dict(zip(["guide", "t0", "rms_to_guide", "rms_to_original", "fid",
                                                       "class_accuracy", "calls", "wall_s"], row))
            series[kind].append((row[2], row[4]))
            labels[kind].append(str(t0))
            print(common.markdown_table(["guide", "t0", "RMS to guide", "RMS to original", "FID", "class acc", "calls",
                                         "wall s"], [row]).splitlines()[-1], flush=True)
    print()
    print(common.header(f"SDEdit trade-off, {cfg.data.name}", "python -m benchmarks.sdedit_tradeoff " + " ".join(sys.argv[1:]), info))
    print(f"{n} test images: the originals score FID {real['fid']:.2f} (they are part of the reference) and class "
          f"accuracy {real['class_accuracy']:.3f}; as many train images score FID {floor['fid']:.2f} (the floor at this "
          "count). Rows 'guide' score the guides themselves.\n")
    print(common.markdown_table(["guide", "t0", "RMS to guide", "RMS to original", "FID", "class acc", "calls", "wall s"], rows))
    if args.png:
        from benchmarks.plot import line_chart

        line_chart(args.png, series, title=f"SDEdit on {cfg.data.name}: t0 trades faithfulness for realism",
                   xlabel="RMS distance to the guide", ylabel="FID (lower = more realistic)", log_x=False,
                   xticks=[round(v, 2) for v in np.linspace(0, max(a for s in series.values() for a, _ in s), 6)],
                   labels=labels)
        print(f"\nwrote {args.png}")
    common.write_json(args.json, raw)


if __name__ == "__main__":
    main()
