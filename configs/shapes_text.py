"""Text-to-image in pixel space (GLIDE-style, Nichol et al. 2022): a TextUNet on captioned shapes
scenes at 16x16, one or two objects each ("a small red disc at the top left and a large blue
square at the bottom right"; jdiff.data.captions).

python -m launch.train --config configs/shapes_text.py --workdir workdirs/shapes_text
python -m launch.sample --workdir workdirs/shapes_text --prompt "a large red disc at the top left" --guidance 3 --out x.png

The text encoder is trained jointly with the U-Net and read through cross-attention at 8x8 and
in the middle block; captions are dropped to the empty caption with probability 0.1
(classifier-free guidance). No feature network scores scenes: the caption judge does
(python -m benchmarks.text_to_image samples).
"""

from jdiff.data.captions import SHAPES_VOCABULARY
from jdiff.train.config import base_config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"arg: expected None, got {arg!r}")
    c = base_config()
    c.data.name = "captioned_shapes"
    c.data.resolution = 16
    c.data.num_examples = 20000
    c.data.batch_size = 64
    c.model_name = "text_unet"
    c.model.vocab_size = len(SHAPES_VOCABULARY) + 1
    c.model.max_length = 20
    c.model.text_width = 64
    c.model.text_layers = 2
    c.model.text_heads = 4
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)
    c.model.num_heads = 2
    c.model.dropout = 0.0
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    c.diffusion.p_uncond = 0.1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True
    c.train.num_steps = 5000
    c.train.log_every = 200
    c.train.checkpoint_every = 1000
    c.train.sample_every = 0
    c.sample.num = 36
    c.sample.method = "dpm_solver++"
    c.sample.steps = 25
    c.sample.guidance = 3.0
    c.eval.num_samples = 0
    c.eval.evaluator = ""
    return c
