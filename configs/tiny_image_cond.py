"""A tiny super-resolution model for tests: the network sees cond["image"], a bilinearly down-
then up-sampled copy of the digit (8x8 -> 4x4 -> 8x8), concatenated to x_t.

python -m launch.train --config configs/tiny_image_cond.py --workdir /tmp/tiny_sr
python -m launch.sample --workdir /tmp/tiny_sr --cond_image low_res.png --num 4 --out sr.png

The "downsample_image" batch transform (jdiff.train.transforms) makes the conditioning inside the
jitted train step; sampling takes it from --cond_image (or cond={"image": ...} in
jdiff.inference.generate). Otherwise the values of configs/tiny.py.
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.transform = "downsample_image"  # cond["image"] = up(down(x0)), inside the train step
    c.data.transform_kwargs.factor = 2  # 8x8 -> 4x4 -> 8x8

    c.model_name = "unet"
    c.model.num_classes = None  # conditioned on the low-resolution image only
    c.model.image_channels = 1  # cond["image"]: [B, 8, 8, 1]

    c.diffusion.p_uncond = 0.0  # an image has no null value: nothing to drop

    c.sample.num = 4

    c.eval.evaluator = ""  # the digits classifier scores digits, not their super-resolution
    return c
