"""Imported weights: how closely converted networks match their PyTorch originals, and what
sampling them with jdiff costs against diffusers' own loop.

    python -m benchmarks.convert [--reps 3] [--json convert.json]

Needs the convert extras (torch, safetensors, diffusers, guided-diffusion-sdk): see README
"Pretrained weights". Nothing is downloaded: every network is built with random weights (every
parameter redrawn with std 0.1, so no zero-initialised layer hides a wrong mapping), saved in its
format, converted with jdiff.convert and run on the same inputs.

equivalence: per layout, the parameter count, the conversion time (read + map + check) and the
max abs difference of the forward pass over a batch of 8 at timesteps spread over [0, 1000),
float32 on both sides (the issue's bar is 1e-4), next to the output's largest magnitude.
Layouts: google/ddpm-cifar10-32's config at full size and at quarter width, attention at several
resolutions with a learned variance, a class embedding; OpenAI's ADM U-Net (ImageNet-64 flags
at reduced width: learn_sigma, classes, BigGAN up/down blocks, scale-shift norm, 64-channel
heads), an improved-diffusion U-Net (legacy attention order), the ADM classifier.

sampling: the full-size CIFAR-10 network, batch 4, x_T and per-step noise shared: DDIM (eta 0,
50 steps) and DDPM (100 steps, fixed_large) on diffusers' timesteps, through diffusers'
scheduler loop and jdiff.sample's scan. Reported: max abs difference of the samples, and the
time per batch of each (interleaved repetitions, median; ratio = the median of per-round
diffusers / jdiff ratios). torch uses both cores (set_num_threads(2)); jdiff runs as launch
commands do (jdiff.parallel.use_cpu_cores(): one XLA CPU device per core, the batch split).
"""

from __future__ import annotations

import jdiff  # noqa: E402  (imports jax; nothing runs on a device yet)

jdiff.parallel.use_cpu_cores()

import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from jdiff import convert, schedules  # noqa: E402
from jdiff.convert import diffusers as dconv  # noqa: E402

CIFAR10 = dconv.DDPM_CIFAR10_32
DIFFUSERS_LAYOUTS = {
    "diffusers: ddpm-cifar10-32 config": CIFAR10,
    "diffusers: ddpm-cifar10-32 layout, 1/4 width": {**CIFAR10, "block_out_channels": [32, 64, 64, 64]},
    "diffusers: attention at 16 and 8, learned variance": dict(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"], attention_head_dim=16, norm_num_groups=16),
    "diffusers: class embedding, 1 channel": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=[32, 64], layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=8, norm_num_groups=8, num_class_embeds=10, add_attention=False),
}
OPENAI_LAYOUTS = {  # (kind, flags over guided-diffusion's defaults, codebase)
    "openai: ADM ImageNet-64 flags, 1/3 width": ("model", dict(
        image_size=64, num_channels=64, num_res_blocks=2, attention_resolutions="32,16,8", learn_sigma=True,
        class_cond=True, resblock_updown=True, use_scale_shift_norm=True, num_head_channels=32,
        use_new_attention_order=True), "guided-diffusion"),
    "openai: improved-diffusion CIFAR-10 flags (4000 steps), 1/4 width": ("model", dict(
        image_size=32, num_channels=32, num_res_blocks=3, learn_sigma=True, dropout=0.3, diffusion_steps=4000,
        noise_schedule="cosine"), "improved-diffusion"),
    "openai: ADM classifier 64x64, 1/2 width": ("classifier", dict(
        image_size=64, classifier_width=64, classifier_depth=2, classifier_attention_resolutions="32,16,8"),
        "guided-diffusion"),
}


def _randomize(torch, model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _diffusers_case(torch, diffusers_lib, layout, tmp, seed):
    model = _randomize(torch, diffusers_lib.UNet2DModel(**layout), seed)
    path = os.path.join(tmp, f"d{seed}")
    model.save_pretrained(path)
    t0 = time.perf_counter()
    imported = convert.from_diffusers(path)
    took = time.perf_counter() - t0

    def reference(x, t, y):
        kwargs = {} if y is None else {"class_labels": torch.from_numpy(y)}
        return model(torch.from_numpy(x), torch.from_numpy(t), **kwargs).sample.numpy()

    return model, imported, took, reference, layout.get("num_class_embeds")


def _openai_case(torch, kind, flags, codebase, tmp, seed):
    from guided_diffusion import script_util

    if kind == "model":
        oracle = {**script_util.model_and_diffusion_defaults(), **flags}
        if codebase == "improved-diffusion":  # its 32x32 channel_mult and default timestep rescaling, spelled out
            oracle.update(channel_mult="1,2,2,2", rescale_timesteps=True)
        model, _ = script_util.create_model_and_diffusion(**oracle)
        classes = 1000 if flags.get("class_cond") else None
    else:
        model = script_util.create_classifier(**{**script_util.classifier_defaults(), **flags})
        classes = None
    model = _randomize(torch, model, seed)
    path = os.path.join(tmp, f"o{seed}.pt")
    torch.save(model.state_dict(), path)
    t0 = time.perf_counter()
    imported = convert.from_openai(path, " ".join(f"--{k} {v}" for k, v in flags.items()), kind=kind, codebase=codebase)
    took = time.perf_counter() - t0
    scale = imported.model.get("time_scale", 1.0)

    def reference(x, t, y):
        kwargs = {} if y is None else {"y": torch.from_numpy(y)}
        t = torch.from_numpy(t) if scale == 1.0 else torch.from_numpy(t).float() * scale  # _scale_timesteps
        return model(torch.from_numpy(x), t, **kwargs).numpy()

    return model, imported, took, reference, classes


def equivalence(torch, diffusers_lib, tmp) -> list[list]:
    rows = []
    cases = [(n, lambda s, l=l: _diffusers_case(torch, diffusers_lib, l, tmp, s)) for n, l in DIFFUSERS_LAYOUTS.items()]
    cases += [(n, lambda s, k=k, f=f, c=c: _openai_case(torch, k, f, c, tmp, s)) for n, (k, f, c) in OPENAI_LAYOUTS.items()]
    for seed, (name, build) in enumerate(cases):
        model, imported, took, reference, classes = build(seed)
        H, W, C = imported.image_shape
        rng = np.random.RandomState(seed)
        x = rng.randn(8, C, H, W).astype(np.float32)
        T = int(imported.diffusion.get("num_timesteps", 1000))
        t = np.linspace(0, T - 1, 8).astype(np.int64)
        y = rng.randint(0, classes, 8) if classes else None
        with torch.no_grad():
            ref = reference(x, t, y)
        cond = None if y is None else {"label": jnp.asarray(y)}
        got = jax.jit(imported.module().apply)({"params": imported.params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                               jnp.asarray(t), cond)
        got = np.asarray(got)
        got = got.transpose(0, 3, 1, 2) if got.ndim == 4 else got
        n = sum(p.numel() for p in model.parameters())
        rows.append([name, f"{n:,}", f"{took:.2f}", f"{np.abs(got - ref).max():.1e}", f"{np.abs(ref).max():.2f}"])
        print("  ", rows[-1], flush=True)
    return rows


def sampling(torch, diffusers_lib, tmp, reps: int) -> tuple[list[list], dict]:
    from jdiff import sample as jdiff_sample

    model, imported, _, _, _ = _diffusers_case(torch, diffusers_lib, CIFAR10, tmp, 100)
    module, params = imported.module(), imported.params
    fn = jax.tree_util.Partial(lambda p, x, t: module.apply({"params": p}, x, t), params)
    schedule = schedules.linear(1000, 1e-4, 0.02)
    shape = (4,) + imported.image_shape
    x_T = np.asarray(jax.random.normal(jax.random.key(0), shape))
    key = jax.random.key(1)
    noise = lambda i: torch.from_numpy(np.ascontiguousarray(np.asarray(  # noqa: E731  the noise of jdiff's step i
        jax.random.normal(jax.random.fold_in(jax.random.split(key)[1], i), shape)).transpose(0, 3, 1, 2)))
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    rows, times = [], {}
    for method, steps in (("ddim", 50), ("ddpm", 100)):
        cfg = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True,
                   variance_type="fixed_large")
        sched = (diffusers_lib.DDIMScheduler if method == "ddim" else diffusers_lib.DDPMScheduler).from_config(cfg)
        sched.set_timesteps(steps)
        ts = np.array([int(t) for t in sched.timesteps] + [-1])
        extra = {"eta": 0.0} if method == "ddim" else {"variance": "fixed_large"}

        def run_jdiff():
            return common.block(jdiff_sample(fn, schedule, jnp.asarray(x_T), key, method=method, timesteps=ts, clip=True, **extra))

        def run_diffusers():
            drawn = iter([noise(i) for i in range(steps)])
            ddpm_module.randn_tensor = lambda *a, **k: next(drawn)
            x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                for t in sched.timesteps:
                    eps = model(x, t.expand(len(x))).sample
                    kw = {"eta": 0.0, "use_clipped_model_output": True} if method == "ddim" else {}
                    x = sched.step(eps, t, x, **kw).prev_sample
            return x.numpy().transpose(0, 2, 3, 1)

        err = float(np.abs(np.asarray(run_jdiff()) - run_diffusers()).max())
        tm = common.interleaved({"jdiff": run_jdiff, "diffusers": run_diffusers}, reps, warmup=0)
        times[method] = tm
        rows.append([f"{method} ({steps} steps, batch 4)", f"{err:.1e}", f"{common.median(tm['jdiff']):.2f}",
                     f"{common.median(tm['diffusers']):.2f}", f"{common.paired_ratio(tm['diffusers'], tm['jdiff']):.2f}x"])
        print("  ", rows[-1], flush=True)
    return rows, times


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(reps=3)
    args = p.parse_args(argv)
    import diffusers as diffusers_lib
    import torch

    torch.set_num_threads(2)
    info = common.machine_info()
    info["torch"], info["diffusers"] = torch.__version__, diffusers_lib.__version__
    with tempfile.TemporaryDirectory() as tmp:
        eq = equivalence(torch, diffusers_lib, tmp)
        samp, times = sampling(torch, diffusers_lib, tmp, args.reps)
    command = "python -m benchmarks.convert" + (f" --reps {args.reps}" if args.reps != 3 else "")
    print(common.header("Importing pretrained weights", command, info))
    print(f"torch {info['torch']}, diffusers {info['diffusers']}.\n")
    print(common.markdown_table(["network", "params", "convert (s)", "max abs error", "max abs output"], eq))
    print()
    print(common.markdown_table(["sampler", "max abs difference", "jdiff (s)", "diffusers (s)", "diffusers / jdiff"], samp))
    common.write_json(args.json, {"info": info, "equivalence": eq, "sampling": samp, "times": times})


if __name__ == "__main__":
    main(sys.argv[1:])
