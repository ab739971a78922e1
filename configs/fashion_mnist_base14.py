"""The base stage of the Fashion-MNIST cascade: class-conditional DDPM on 14x14 Fashion-MNIST.

python -m launch.train --config configs/fashion_mnist_base14.py --workdir workdirs/fm_base14
python -m launch.train --config configs/fashion_mnist_base14.py:small --workdir /tmp/b   # test-sized

The 14x14 images are the 28x28 ones area-downsampled (2x2 block means, data.resolution = 14),
the same operator `jdiff.cascade.downsample` applies to make an SR model's training input, so
the base stage learns exactly the distribution the SR stage is conditioned on. Its samples are
upsampled by configs/fashion_mnist_sr.py (python -m launch.sample --workdir BASE --sr_workdir
SR ...). Labels are dropped with probability 0.1 (classifier-free guidance).
"""

from configs import fashion_mnist


def get_config(arg=None):
    c = fashion_mnist.get_config("small" if arg == "small" else None)
    c.data.resolution = 14
    if arg == "small":
        c.model.channel_mult = (1, 2)  # 14 -> 7
        c.eval.num_samples = 0
        c.eval.evaluator = ""
        return c
    if arg not in (None, ""):
        raise ValueError(f"arg: expected None or 'small', got {arg!r}")
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2)  # 14 -> 7
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (7,)
    c.train.num_steps = 5000
    c.train.checkpoint_every = 500
    c.train.sample_every = 2500
    # The Fashion-MNIST evaluator scores 28x28 images: the cascade is scored at 28x28 instead
    # (python -m benchmarks.cascade), so training ends without an evaluation.
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    return c
