"""The super-resolution stage of the Fashion-MNIST cascade: 14x14 -> 28x28, class-conditional,
with CDM's conditioning augmentation (Ho et al. 2022, sec. 4).

python -m launch.train --config configs/fashion_mnist_sr.py --workdir workdirs/fm_sr
python -m launch.train --config configs/fashion_mnist_sr.py:noaug --workdir workdirs/fm_sr_noaug  # the ablation
python -m launch.train --config configs/fashion_mnist_sr.py:small --workdir /tmp/sr  # test-sized

Training input (the "super_resolution" batch transform, inside the jitted step): the 28x28
image area-downsampled to 14x14 (`jdiff.cascade.downsample`, the base stage's data), blurred
with probability 0.5 by a Gaussian of width U[0.4, 0.6] pixels, noised to z_s with the
model's own cosine schedule at s = round(a T) - 1, a ~ U[0, 0.5] per example, and upsampled
bicubically to 28x28: cond["image"], concatenated to x_t, and cond["aug_level"] = s, embedded
like t and added to the time embedding. ":noaug" turns both augmentations off (a = 0: s = -1
always, no blur). The cascade picks the level at test time (--aug_level); the same model serves
"non-truncated" augmentation (noise the base's finished sample) and "truncated" (stop the
base's reverse process at s), see jdiff.cascade.
"""

from configs import fashion_mnist


def get_config(arg=None):
    small = arg in ("small", "small_noaug")
    if arg not in (None, "", "noaug", "small", "small_noaug"):
        raise ValueError(f"arg: expected None, 'noaug', 'small' or 'small_noaug', got {arg!r}")
    c = fashion_mnist.get_config("small" if small else None)
    c.data.transform = "super_resolution"
    c.data.transform_kwargs.factor = 2  # 28 -> 14 -> 28
    c.data.transform_kwargs.method = "bicubic"
    noaug = arg in ("noaug", "small_noaug")
    c.data.transform_kwargs.max_aug_level = 0.0 if noaug else 0.5
    c.data.transform_kwargs.blur_prob = 0.0 if noaug else 0.5
    c.data.transform_kwargs.blur_sigma = (0.4, 0.6)

    # v-prediction (Salimans & Ho 2022): with eps-prediction, x0 = (x_t - sigma eps) / alpha
    # amplifies the network's error by sigma / alpha at high noise, exactly where the low-
    # resolution input determines x0 best. Measured on 40 test images after 1,000 steps: eps
    # gave speckled samples (PSNR 13.3 dB, consistency |down(SR) - low| 0.33 with DPM-Solver++;
    # 16.9 dB and 0.18 with 100 DDPM steps), v gave 19.1 dB and 0.075 (19.6 dB with DDPM).
    c.diffusion.parameterization = "v"

    c.model.image_channels = 1  # cond["image"]: the upsampled 14x14 image, [B, 28, 28, 1]
    c.model.aug_level_embedding = True  # cond["aug_level"]: s, embedded like t
    c.eval.num_samples = 0  # scored as a cascade (python -m benchmarks.cascade)
    c.eval.evaluator = ""
    if small:
        return c
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = ()  # super-resolution is local: no attention
    c.train.num_steps = 2500
    c.train.checkpoint_every = 500
    c.train.sample_every = 1250
    return c
