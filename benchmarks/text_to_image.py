"""Text-to-image's measuring tools on captioned shapes scenes (issue 19, in progress): the
attribute judge and the contrastive image-text models.

    python -m benchmarks.text_to_image [--judge_steps 1000] [--clip_steps 300] [--json out.json]

judge: jdiff.evaluation.caption_judge trained --judge_steps steps (batch 64, fresh scenes each
step, 32x32); per-head accuracy on 1,000 held-out scenes, and the caption accuracy of 500
held-out images against their own captions and against another image's caption (a check that
the judge looks at the image).

clip: jdiff.train.clip.train_clip, --clip_steps steps (batch 64, the default CLIP), on clean
images and on noised ones (GLIDE's noised CLIP, cosine schedule, T = 1000); zero-shot
retrieval accuracy among 200 held-out pairs (image -> caption and caption -> image; chance
~0.5%), for the noised model at t = 0, 250, 500, 750.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from benchmarks import common
from jdiff import diffusion, schedules
from jdiff.data import captions as cap
from jdiff.evaluation import caption_judge as cj
from jdiff.train import clip as tc


def judge_rows(steps: int) -> list[list]:
    t0 = time.perf_counter()
    module, params, metrics = cj.train_judge(num_steps=steps)
    took = time.perf_counter() - t0
    scene = cap.scenes(500, seed=[7, 7])
    images, _ = cap.render_scenes(scene, 32)
    read = cj.read_scenes(module, params, images)
    texts = cap.captions(scene)
    own = cj.caption_accuracy(read, texts)
    other = cj.caption_accuracy(read, texts[1:] + texts[:1])
    return [[f"judge, {steps} steps ({took:.0f} s)", f"{metrics['present']:.4f}", f"{metrics['colour']:.4f}",
             f"{metrics['shape']:.4f}", f"{metrics['size']:.4f}", f"{own['caption']:.3f}", f"{other['caption']:.3f}"]]


def clip_rows(steps: int) -> list[list]:
    scene = cap.scenes(200, seed=[99, 1])
    images, _ = cap.render_scenes(scene, 32)
    texts = cap.captions(scene)
    ids, mask = cap.Tokenizer().encode(texts)
    schedule = schedules.cosine(1000)
    rows = []
    for noised in (False, True):
        t0 = time.perf_counter()
        module, params, metrics = tc.train_clip(num_steps=steps, noised=noised, schedule=schedule if noised else None)
        took = time.perf_counter() - t0
        for t in ((0, 250, 500, 750) if noised else (0,)):
            tt = np.full((200,), t, np.int32)
            x = images if t == 0 else np.asarray(diffusion.q_sample(schedule, images, tt, jax.random.normal(
                jax.random.key(t), images.shape)))
            ie, te = tc.embed(module, params, x, tt, ids, mask)
            acc = tc.retrieval_accuracy(ie, te, texts)
            rows.append([f"{'noised' if noised else 'clean'} CLIP, {steps} steps ({took:.0f} s)", t,
                         f"{acc['image_to_text']:.3f}", f"{acc['text_to_image']:.3f}", f"{metrics['loss']:.3f}"])
            print("  ", rows[-1], flush=True)
    return rows


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--judge_steps", type=int, default=1000)
    p.add_argument("--clip_steps", type=int, default=300)
    args = p.parse_args(argv)
    info = common.machine_info()
    judge = judge_rows(args.judge_steps)
    clip = clip_rows(args.clip_steps)
    command = "python -m benchmarks.text_to_image" + "".join(
        f" --{k} {v}" for k, v in (("judge_steps", args.judge_steps), ("clip_steps", args.clip_steps))
        if v != {"judge_steps": 1000, "clip_steps": 300}[k])
    print(common.header("Text-to-image: the judge and CLIP on captioned shapes", command, info))
    print(common.markdown_table(["model", "present", "colour", "shape", "size", "caption acc. (own)",
                                 "caption acc. (other image's)"], judge))
    print()
    print(common.markdown_table(["model", "t", "image -> caption", "caption -> image", "final loss"], clip))
    common.write_json(args.json, {"info": info, "judge": judge, "clip": clip})


if __name__ == "__main__":
    main(sys.argv[1:])
