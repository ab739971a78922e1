"""Train a CLIP-style image-text model on captioned shapes scenes and write a CLIP workdir.

python -m launch.train_clip --workdir workdirs/clip16 --resolution 16 --steps 1500
python -m launch.train_clip --workdir workdirs/clip16_noised --resolution 16 --steps 3000 --noised

--noised trains GLIDE's noised CLIP (Nichol et al. 2022, sec. 2.3): images are x_t at a uniform
t of --schedule / --num_timesteps, with t as the image tower's input. Such a workdir guides
sampling: python -m launch.sample --workdir W --prompt "..." --clip_workdir C --clip_guidance S,
for a model of the same image size and noise schedule. Scenes are drawn fresh every step
(jdiff.train.clip.train_clip). Writes clip.msgpack and clip.json with the zero-shot retrieval
accuracy among --eval_pairs held-out pairs (at t = 0, and at t = T/4, T/2, 3T/4 when noised).
"""

import json

import numpy as np
from absl import app, flags

from jdiff import schedules
from jdiff.data import captions as cap
from jdiff.train import clip as clip_lib
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for clip.msgpack and clip.json.", required=True)
_RESOLUTION = flags.DEFINE_integer("resolution", 16, "Image side (>= 16).")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Pairs per step (the contrastive loss's negatives).")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (AdamW, warmup then cosine decay).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the scenes and the init.")
_NOISED = flags.DEFINE_bool("noised", False, "Train on x_t with t as input (GLIDE's noised CLIP, for guidance).")
_SCHEDULE = flags.DEFINE_enum("schedule", "cosine", ["cosine", "linear", "scaled_linear"], "The noised CLIP's schedule.")
_T = flags.DEFINE_integer("num_timesteps", 1000, "The noised CLIP's number of timesteps T.")
_EMBED = flags.DEFINE_integer("embed_dim", 64, "Width of the joint embedding.")
_EVAL_PAIRS = flags.DEFINE_integer("eval_pairs", 200, "Held-out pairs of the retrieval accuracy.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name, flag, lo in (("--resolution", _RESOLUTION, cap.MIN_RESOLUTION), ("--steps", _STEPS, 1),
                           ("--batch_size", _BATCH, 2), ("--num_timesteps", _T, 1), ("--embed_dim", _EMBED, 1),
                           ("--eval_pairs", _EVAL_PAIRS, 2)):
        if flag.value < lo:
            raise app.UsageError(f"{name}: expected an int >= {lo}, got {flag.value}")
    if not np.isfinite(_LR.value) or _LR.value <= 0:
        raise app.UsageError(f"--lr: expected a positive learning rate, got {_LR.value}")
    common.configure_gc()
    common.configure_logging()
    common.configure_compilation_cache()
    schedule = schedules.get(_SCHEDULE.value, _T.value) if _NOISED.value else None
    module, params, metrics = clip_lib.train_clip(
        _STEPS.value, _BATCH.value, _RESOLUTION.value, _SEED.value, noised=_NOISED.value, schedule=schedule,
        learning_rate=_LR.value, embed_dim=_EMBED.value)
    tokenizer = cap.Tokenizer()
    scene = cap.scenes(_EVAL_PAIRS.value, seed=[_SEED.value + 1, 10**9])  # not a training batch ([seed, step])
    images, _ = cap.render_scenes(scene, _RESOLUTION.value)
    texts = cap.captions(scene)
    ids, mask = tokenizer.encode(texts)
    times = [0] + ([_T.value // 4, _T.value // 2, 3 * _T.value // 4] if _NOISED.value else [])
    for t in times:
        x = images
        if t:
            import jax

            from jdiff import diffusion

            eps = np.asarray(jax.random.normal(jax.random.key(_SEED.value + t), images.shape))
            x = np.asarray(diffusion.q_sample(schedule, images, np.full((len(images),), t), eps))
        ie, te = clip_lib.embed(module, params, x, np.full((len(x),), t, np.int32), ids, mask)
        metrics[f"retrieval_t{t}"] = clip_lib.retrieval_accuracy(ie, te, texts)
    clip_lib.save_clip(_WORKDIR.value, module, params, resolution=_RESOLUTION.value, noised=_NOISED.value,
                       schedule={"name": _SCHEDULE.value, "num_timesteps": _T.value} if _NOISED.value else None,
                       metrics=metrics)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
