"""A tiny mask-channel inpainting model for tests: configs/tiny.py's network with cond["image"] =
[m * x0, m] (the "inpaint" batch transform: random boxes, strokes, halves and borders).

python -m launch.train --config configs/tiny_inpaint.py --workdir /tmp/tiny_inpaint
python -m launch.sample --workdir /tmp/tiny_inpaint --inpaint digit.png --mask mask.png --num 4 --out x.png
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.transform = "inpaint"
    c.model.image_channels = 2  # the masked image and the mask
    c.eval.evaluator = ""  # completions are scored against their own images (benchmarks/inpainting.py)
    return c
