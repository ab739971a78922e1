"""The PyTorch diffusers side of ``benchmarks.vs_diffusers``, run as a child process.

It imports only torch, diffusers and numpy, so it runs in a separate virtualenv that has them
(diffusers is never a dependency of jdiff). The parent writes one JSON command per line to
stdin and reads one JSON reply per line from stdout; timings are taken here, around the work
only, so the pipe costs nothing. Commands:

  {"cmd": "setup", "image_shape": [H, W, C], "batch": B, "unet": {...UNet2DModel kwargs},
   "threads": 2, "seed": 0}                      -> {"params": n, "torch": version, ...}
  {"cmd": "sample", "method": "ddpm"|"ddim"|"dpmpp", "steps": n, "guidance": w}
                                                   -> {"seconds": s}
  {"cmd": "train", "steps": k}                    -> {"seconds": s}
  {"cmd": "matmul", "n": n, "reps": r}           -> {"gflops": best float32 n x n matmul rate}
  {"cmd": "rss"}                                   -> {"max_rss_mib": this process's peak RSS}
  {"cmd": "quit"}

Sampling is the standard diffusers host loop, as in their pipelines: ``set_timesteps``, then per
timestep ``scale_model_input``, one ``UNet2DModel`` call and ``scheduler.step``, under
``torch.no_grad()``. Classifier-free guidance is the pipelines' batched form: the latents are
concatenated with themselves, the labels with the null label, one call on 2B, then
``eps_u + s (eps_c - eps_u)`` with s = 1 + w (jdiff's w). Training is the diffusers
train_unconditional/text_to_image step: ``add_noise``, MSE to the noise, ``backward``,
``AdamW.step``, ``zero_grad`` (no EMA, no gradient clipping).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    import diffusers
    import torch
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UNet2DModel,
    )

    state: dict = {}

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            reply({"ok": True})
            return
        if cmd == "setup":
            torch.set_num_threads(int(msg["threads"]))
            torch.manual_seed(int(msg["seed"]))
            H, W, C = msg["image_shape"]
            B = int(msg["batch"])
            unet = UNet2DModel(**msg["unet"]).eval()
            num_classes = int(msg["unet"]["num_class_embeds"]) - 1  # the last row is the null class
            common = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
            state.update(
                unet=unet, B=B, shape=(B, C, H, W), null=num_classes,
                labels=torch.arange(B) % num_classes,
                schedulers={
                    # no clipping of x_0 in either library, so both do the same arithmetic
                    "ddpm": DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small"),
                    "ddim": DDIMScheduler(**common, clip_sample=False),
                    "dpmpp": DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2),
                },
                opt=torch.optim.AdamW(unet.parameters(), lr=1e-4),
                gen=torch.Generator().manual_seed(0),
            )
            reply({
                "params": int(sum(p.numel() for p in unet.parameters())),
                "torch": torch.__version__, "diffusers": diffusers.__version__,
                "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "mkldnn": bool(torch.backends.mkldnn.is_available()),
            })
        elif cmd == "sample":
            t0 = time.perf_counter()
            _sample(state, msg["method"], int(msg["steps"]), msg.get("guidance"))
            reply({"seconds": time.perf_counter() - t0})
        elif cmd == "train":
            unet = state["unet"].train()
            t0 = time.perf_counter()
            for _ in range(int(msg["steps"])):
                _train_step(state)
            dt = time.perf_counter() - t0
            unet.eval()
            reply({"seconds": dt})
        elif cmd == "matmul":
            n = int(msg["n"])
            a, b = torch.randn(n, n), torch.randn(n, n)
            best = float("inf")
            for _ in range(int(msg["reps"])):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t0)
            reply({"gflops": 2 * n**3 / best / 1e9})
        elif cmd == "rss":
            import resource

            reply({"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        else:
            reply({"error": f"unknown command {cmd!r}"})


def _sample(state: dict, method: str, steps: int, guidance) -> None:
    import torch

    unet, sched, labels = state["unet"], state["schedulers"][method], state["labels"]
    with torch.no_grad():
        sched.set_timesteps(steps)
        x = torch.randn(state["shape"], generator=state["gen"]) * sched.init_noise_sigma
        if guidance is not None:
            y2 = torch.cat([labels, torch.full_like(labels, state["null"])])
        for t in sched.timesteps:
            if guidance is None:
                eps = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
            else:
                x_in = sched.scale_model_input(torch.cat([x, x]), t)
                eps_c, eps_u = unet(x_in, t, class_labels=y2).sample.chunk(2)
                eps = eps_u + (1.0 + guidance) * (eps_c - eps_u)
            x = sched.step(eps, t, x, generator=state["gen"]).prev_sample
    return x


def _train_step(state: dict) -> None:
    import torch
    import torch.nn.functional as F

    unet, opt, sched = state["unet"], state["opt"], state["schedulers"]["ddpm"]
    B, gen = state["B"], state["gen"]
    if "x0" not in state:
        state["x0"] = torch.rand(state["shape"], generator=gen) * 2 - 1
    x0 = state["x0"]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen)
    # label dropout to the null class, as jdiff's step does for classifier-free guidance
    y = torch.where(torch.rand(B, generator=gen) < 0.1, torch.full_like(state["labels"], state["null"]), state["labels"])
    x_t = sched.add_noise(x0, noise, t)
    loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
