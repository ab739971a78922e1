"""Class-conditional DDPM on Fashion-MNIST 28x28 with classifier-free guidance, ~1 hour on 2 CPU cores.

python -m launch.train --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
python -m launch.train --config configs/fashion_mnist.py:small --workdir /tmp/w   # the test-sized variant

Needs the Debian package (apt-get update && apt-get install -y dataset-fashion-mnist) or a
prepared TFDS copy; the "small" variant trains on the 300 images shipped with jdiff instead.
Labels are dropped with probability 0.1, so the same model samples unconditionally (the null
label) and with guidance (python -m launch.sample ... --label 3 --guidance 1).

Sized by measurement, on 2 shared CPU cores where digits8's forward+backward (the
`fwd_bwd` case of `python -m benchmarks.training --nets digits8`) took 184 ms: the train step
of this config ran at 0.7-1.0 s (1.0-1.4 steps/s in metrics.jsonl after compilation), so the
4,000 steps (2.1 epochs) took ~61 minutes (23 for the first 1,600, 38 for the resumed rest while
other jobs shared the cores), plus ~5 minutes for the 100-image grid and 1,000 eval samples.
At 1,600 steps the model was clearly undertrained (BENCHMARKS.md has both).
"""

from jdiff.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"  # 60,000 training images, 28x28x1, 10 classes (jdiff.data.fashion_mnist)
    c.data.batch_size = 32

    c.model.base_channels = 32
    c.model.channel_mult = (1, 2, 2)  # 28 -> 14 -> 7: two downsamplings, the most 28 allows
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (7,)  # 49 tokens: attention is cheap at the bottom
    c.model.num_heads = 2
    c.model.dropout = 0.1
    c.model.num_classes = 10  # + a null class for classifier-free guidance

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.parameterization = "eps"
    c.diffusion.p_uncond = 0.1

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True

    c.train.num_steps = 4000  # 0.7-1.0 s per step on 2 CPU cores: ~1 hour, 2.1 epochs
    c.train.log_every = 100
    c.train.checkpoint_every = 400
    c.train.sample_every = 1200

    c.sample.num = 100  # a 10x10 grid, one row per class
    c.sample.method = "dpm_solver++"  # 25 steps: 10x fewer network calls than DDPM's 250
    c.sample.steps = 25
    c.sample.guidance = 0.0

    # Scored by the Fashion-MNIST classifier against the 10,000 test images, with the FID of
    # 1,000 real train images beside it as the floor (jdiff.evaluation.sample_metrics).
    c.eval.num_samples = 1000
    c.eval.evaluator = "fashion_mnist"

    if arg == "small":
        # Trains in seconds, on the 300 images shipped with jdiff (no dataset needed).
        c.data.name = "fashion_mnist_sample"
        c.data.batch_size = 8
        c.model.base_channels = 8
        c.model.channel_mult = (1, 2)  # 28 -> 14
        c.model.attention_resolutions = ()
        c.model.num_heads = 1
        c.model.dropout = 0.0
        c.diffusion.num_timesteps = 20
        c.optim.warmup_steps = 2
        c.optim.ema_decay = 0.9
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.train.sample_every = 0
        c.train.progress = False
        c.sample.num = 10
        c.sample.method = "ddim"
        c.sample.steps = 3
        c.eval.num_samples = 8
        c.eval.evaluator = "fashion_mnist_sample"  # the same network, the 300 shipped images as reference
    elif arg not in (None, ""):
        raise ValueError(f"arg: expected None or 'small', got {arg!r}")
    return c
