"""Text-to-image on captioned shapes scenes (issue 19): the measuring tools (the attribute judge,
the contrastive image-text models) and the caption accuracy of samples.

    python -m benchmarks.text_to_image [tools] [--judge_steps 1000] [--clip_steps 300] [--json out.json]
    python -m benchmarks.text_to_image samples --workdir W --clip_workdir C [--num 200] [--cfg 0,1,3,5]
        [--clip 1,3,10] [--clip_uncond 3,10,30]
    python -m benchmarks.text_to_image unclip --decoder_workdir D --prior_workdir P [--unclip 0:0,1:0,1:3,3:3]
    python -m benchmarks.text_to_image speed [--configs shapes_text,shapes_text_latent] [--reps 5] [--steps 10]

samples: a text model's workdir (launch.train, e.g. configs/shapes_text.py) sampled once per
caption of --num held-out scenes (seed [11, 11]; never a training scene, whose seeds are
[seed, 0]) with the config's sampler, and read by a judge trained at the model's resolution
(3,000 steps). Rows: the real renders of those scenes (the judge's ceiling); classifier-free
guidance at each weight w of --cfg; GLIDE's CLIP guidance with the noised CLIP of
--clip_workdir at each scale s of --clip on the caption-conditioned model (w = 0), and of
--clip_uncond on the same model given the empty caption (CLIP alone carries the text). Each
row: per-attribute accuracy (colour, shape, size; position = an object found in the caption's
quadrant), all four right ("object"), the whole caption right ("caption"), the noised CLIP's
logit tau f(x_0, 0) . g(c) of sample and caption, and sampling images/s (compiled; a latent
model's include decoding). A latent workdir (configs/shapes_text_latent.py) is decoded before
judging; pass --clip "" --clip_uncond "" for it (the CLIP sees pixels).

unclip: the same captions through jdiff.unclip.unclip (prior, renormalise, decoder) for each
prior_w:decoder_w pair; also the mean cosine between the prior's embedding and the clean CLIP's
embedding of the true render of the caption's scene.

speed: each config's jitted train step on one batch, --steps steps per repetition, and sampling 64
captions with w = 3 and the config's sampler (a latent model's decoding included), interleaved
--reps times (benchmarks.common.interleaved); examples/s = batch / median step time, and the
first config's times over each one's.

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

import shlex
import sys
import time

import jax
import jax.numpy as jnp
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


ACCURACY_COLUMNS = ("colour", "shape", "size", "position", "object", "caption")


def _accuracy_row(name: str, judge, jparams, images, scene, *extra) -> list:
    """``[name, accuracy per column..., *extra]`` of ``images`` judged against ``scene``, printed."""
    acc = cj.caption_accuracy(cj.read_scenes(judge, jparams, images), scene)
    r = [name] + [f"{acc[k]:.3f}" for k in ACCURACY_COLUMNS] + list(extra)
    print("  ", r, flush=True)
    return r


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def sample_rows(workdir: str, clip_workdir: str, num: int, cfg_weights, clip_scales, clip_uncond_scales) -> list[list]:
    from jdiff import latent
    from jdiff.inference import generate
    from jdiff.workdir import load_for_sampling

    loaded = load_for_sampling(workdir)
    cfg = loaded.config
    ae = latent.autoencoder_of(cfg.data)
    R = latent.load_autoencoder(ae)[2]["image_shape"][0] if ae else loaded.image_shape[0]  # the pixels' side
    t0 = time.perf_counter()
    judge, jparams, jmetrics = cj.train_judge(resolution=R, num_steps=3000)
    print(f"  judge at {R}x{R}: {jmetrics} ({time.perf_counter() - t0:.0f} s)", flush=True)
    scene = cap.scenes(num, seed=[11, 11])
    texts = cap.captions(scene)
    tokenizer = cap.tokenizer_of(cfg.data)
    ids, _ = tokenizer.encode(texts)
    cmod, cparams, cinfo = tc.load_clip(clip_workdir)
    logit = jax.jit(lambda x: cmod.apply({"params": cparams}, x, np.zeros(len(x), np.int32), ids, ids != 0,
                                         method=cmod.similarity))

    def row(name, images, rate):
        return _accuracy_row(name, judge, jparams, images, scene, f"{float(np.mean(logit(images))):.1f}",
                             "" if rate is None else f"{rate:.1f}")

    real, _ = cap.render_scenes(scene, R)
    rows = [row("real images of the captions (judge ceiling)", real, None)]
    s = cfg.sample
    common_kw = dict(batch_size=num, method=s.method, steps=s.steps, eta=s.eta, clip=s.clip or None,
                     variance=cfg.diffusion.variance, parameterization=cfg.diffusion.parameterization)
    null = np.zeros_like(ids)
    runs = [(f"CFG w = {w:g}", ids, w, 0.0) for w in cfg_weights]
    runs += [(f"CLIP guidance s = {c:g} (caption-conditioned, w = 0)", ids, 0.0, c) for c in clip_scales]
    runs += [(f"CLIP guidance s = {c:g} (empty caption)", null, 0.0, c) for c in clip_uncond_scales]
    compiled = set()
    for name, model_ids, w, c in runs:
        kw = dict(common_kw, cond={"tokens": model_ids}, guidance_weight=w)
        if c:
            kw.update(clip_model=(cmod, cparams), clip_scale=c, clip_tokens=ids)
        if (w > 0, c > 0) not in compiled:  # weights and scales are traced: one compile per kind of sampler
            generate(loaded.model, loaded.params, loaded.schedule, loaded.image_shape, num, jax.random.key(1), **kw)
            compiled.add((w > 0, c > 0))
        t0 = time.perf_counter()
        x = generate(loaded.model, loaded.params, loaded.schedule, loaded.image_shape, num, jax.random.key(0), **kw)
        x = latent.decode_samples(cfg.data, x)  # a latent model's samples, decoded (timed with them)
        rows.append(row(name, x, num / (time.perf_counter() - t0)))
    return rows


def unclip_rows(decoder_workdir: str, prior_workdir: str, num: int, settings) -> list[list]:
    """unCLIP's caption accuracy for (prior w, decoder w) pairs, on the held-out captions."""
    from jdiff.unclip import StageSettings, unclip
    from jdiff.workdir import load_for_sampling

    stages = []
    for d in (prior_workdir, decoder_workdir):
        l = load_for_sampling(d)  # noqa: E741
        c = l.config
        stages.append(StageSettings(l.model, l.params, l.schedule, l.image_shape, c.sample.method, c.sample.steps,
                                    c.sample.eta, c.sample.clip or None, c.diffusion.variance,
                                    c.diffusion.parameterization))
    cfg = load_for_sampling(decoder_workdir).config
    cmod, cparams, _ = tc.load_clip(cfg.data.clip_workdir)
    R = stages[1].image_shape[0]
    judge, jparams, _ = cj.train_judge(resolution=R, num_steps=3000)
    scene = cap.scenes(num, seed=[11, 11])
    ids, _ = cap.tokenizer_of(cfg.data).encode(cap.captions(scene))
    real, _ = cap.render_scenes(scene, R)
    true_emb, _ = tc.embed(cmod, cparams, real, np.zeros(num, np.int32), ids, ids != 0)
    rows = []
    from jdiff.inference import generate

    for dw in sorted({dw for _, dw in settings}):  # the decoder alone, given the true image's embedding
        d = stages[1]
        x = generate(d.module, d.params, d.schedule, d.image_shape, num, jax.random.key(0),
                     cond={"context": true_emb[:, None, :]}, guidance_weight=dw, batch_size=num, method=d.method,
                     steps=d.steps, eta=d.eta, clip=d.clip, variance=d.variance, parameterization=d.parameterization)
        rows.append(_accuracy_row(f"decoder alone, w = {dw:g}, given the true render's CLIP image embedding",
                                  judge, jparams, x, scene, "1", ""))
    for pw, dw in settings:
        prior, decoder = stages[0]._replace(guidance=pw), stages[1]._replace(guidance=dw)
        unclip(prior, decoder, cmod, cparams, ids[:2], jax.random.key(1))
        t0 = time.perf_counter()
        x, emb = unclip(prior, decoder, cmod, cparams, ids, jax.random.key(0), batch_size=num)
        rate = num / (time.perf_counter() - t0)
        cos = float(np.mean(np.sum(emb * true_emb, axis=-1)))
        rows.append(_accuracy_row(f"unCLIP, prior w = {pw:g}, decoder w = {dw:g}", judge, jparams, x, scene,
                                  f"{cos:.3f}", f"{rate:.1f}"))
    return rows


def speed_rows(configs: list[str], reps: int, steps: int, num_samples: int = 64) -> list[list]:
    """Training examples/s of each config's train step (one batch, jitted) and sampling images/s
    (``num_samples`` captions, w = 3, the config's sampler, a latent model's decoding included),
    all timed side by side. Speed does not depend on the weights: params are the init's."""
    from jdiff import data as data_lib
    from jdiff import latent
    from jdiff.inference import generate
    from jdiff.train import config as config_lib
    from jdiff.train import network
    from jdiff.train.state import create_train_state, make_optimizer
    from jdiff.train.step import make_train_step

    cases, sizes = {}, {}
    for name in configs:
        config = common.load_config(name)
        config.data.num_examples = 256
        dataset = data_lib.get_dataset(config.data)
        model = network.build_model(config)
        B = config.data.batch_size
        batch = network.step_batch(data_lib.batch_at(dataset.source, 0, batch_size=B, seed=0), model)
        params = network.init_params(model, dataset.image_shape, jax.random.key(0),
                                     cond={k: v[:1] for k, v in batch["cond"].items()})
        optimizer = make_optimizer(config.optim)
        step = jax.jit(make_train_step(network.apply_fn(model), config_lib.make_schedule(config), optimizer, config),
                       donate_argnums=0)
        holder = [create_train_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(1))]  # donated

        def run(step=step, holder=holder, batch=batch):
            state = holder[0]
            for _ in range(steps):
                state, metrics = step(state, batch)
            holder[0] = state
            return common.block((state, metrics))

        def sample(model=model, params=params, config=config, shape=tuple(dataset.image_shape),
                   ids=np.asarray(batch["cond"]["tokens"][:1]).repeat(num_samples, 0)):
            s = config.sample
            x = generate(model, params, config_lib.make_schedule(config), shape, num_samples, jax.random.key(0),
                         cond={"tokens": ids}, guidance_weight=3.0, batch_size=num_samples, method=s.method,
                         steps=s.steps, clip=s.clip or None)
            return latent.decode_samples(config.data, x)

        cases[name] = run
        cases[name + " sampling"] = sample
        sizes[name] = (B, tuple(dataset.image_shape), sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)))
    times = common.interleaved(cases, reps=reps, warmup=1)
    first = configs[0]
    rows = []
    for name in configs:
        B, shape, n = sizes[name]
        ts, ss = times[name], times[name + " sampling"]
        per_step = common.median(ts) / steps
        rows.append([f"configs/{name}.py", "x".join(map(str, shape)), f"{n:,}", B, f"{1000 * per_step:.0f}",
                     f"{B / per_step:.0f}", f"{common.paired_ratio(times[first], ts):.2f}",
                     f"{num_samples / common.median(ss):.1f}", f"{common.paired_ratio(times[first + ' sampling'], ss):.2f}"])
    return rows


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", default="tools", choices=("tools", "samples", "unclip", "speed"))
    p.add_argument("--prior_workdir", default="workdirs/unclip_prior")
    p.add_argument("--decoder_workdir", default="workdirs/unclip_decoder")
    p.add_argument("--unclip", default="0:0,1:0,1:3,3:3", help="prior_w:decoder_w pairs")
    p.add_argument("--configs", default="shapes_text,shapes_text_latent")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--judge_steps", type=int, default=1000)
    p.add_argument("--clip_steps", type=int, default=300)
    p.add_argument("--workdir", default="workdirs/shapes_text")
    p.add_argument("--clip_workdir", default="workdirs/clip16_noised")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--cfg", default="0,1,3,5")
    p.add_argument("--clip", default="1,3,10")
    p.add_argument("--clip_uncond", default="3,10,30")
    args = p.parse_args(argv)
    info = common.machine_info()
    if args.part == "speed":
        rows = speed_rows(args.configs.split(","), args.reps, args.steps)
        command = f"python -m benchmarks.text_to_image speed --configs {args.configs} --reps {args.reps} --steps {args.steps}"
        print(common.header("Text-to-image: training speed, pixel vs latent", command, info))
        print(common.markdown_table(["config", "model input", "params", "batch", "train ms / step", "train examples / s",
                                     f"train speed-up vs {args.configs.split(',')[0]}", "sampling images / s",
                                     "sampling speed-up"], rows))
        common.write_json(args.json, {"info": info, "speed": rows})
        return
    if args.part == "unclip":
        pairs = [tuple(float(v) for v in pair.split(":")) for pair in args.unclip.split(",")]
        rows = unclip_rows(args.decoder_workdir, args.prior_workdir, args.num, pairs)
        command = (f"python -m benchmarks.text_to_image unclip --decoder_workdir {args.decoder_workdir} --prior_workdir "
                   f"{args.prior_workdir} --num {args.num} --unclip {args.unclip}")
        print(common.header("Text-to-image: unCLIP's caption accuracy", command, info))
        print(common.markdown_table(["sampling", "colour", "shape", "size", "position", "object", "caption",
                                     "cos(prior sample, true image emb.)", "images/s"], rows))
        common.write_json(args.json, {"info": info, "unclip": rows})
        return
    if args.part == "samples":
        rows = sample_rows(args.workdir, args.clip_workdir, args.num, _floats(args.cfg), _floats(args.clip),
                           _floats(args.clip_uncond))
        q = shlex.quote
        command = (f"python -m benchmarks.text_to_image samples --workdir {args.workdir} --clip_workdir "
                   f"{args.clip_workdir} --num {args.num} --cfg {q(args.cfg)} --clip {q(args.clip)} --clip_uncond {q(args.clip_uncond)}")
        print(common.header("Text-to-image: caption accuracy of samples", command, info))
        print(common.markdown_table(["sampling", "colour", "shape", "size", "position", "object", "caption",
                                     "CLIP logit", "images/s"], rows))
        common.write_json(args.json, {"info": info, "samples": rows})
        return
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
