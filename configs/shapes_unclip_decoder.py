"""unCLIP's decoder (Ramesh et al. 2022, sec. 2.1) on captioned shapes scenes at 16x16: the
pixel text model's U-Net (configs/shapes_text.py) with its cross-attention reading the clean
CLIP's image embedding of each training image as one context token instead of a caption
(dropped with probability 0.1 for classifier-free guidance).

python -m launch.train --config configs/shapes_unclip_decoder.py --workdir workdirs/unclip_decoder
python -m launch.sample --workdir workdirs/unclip_decoder --prior_workdir workdirs/unclip_prior \
    --prompt "a large red disc at the top left" --out x.png

Needs workdirs/clip16 (see configs/shapes_unclip_prior.py). The sample grid of a run is
conditioned on training images' embeddings (reconstructions through CLIP's bottleneck).
"""

from configs import shapes_text


def get_config(arg=None):
    c = shapes_text.get_config(arg)
    c.data.clip_workdir = "workdirs/clip16"
    c.data.clip_embeddings = "decoder"
    c.model_name = "unet"
    for k in ("vocab_size", "max_length", "text_width", "text_layers", "text_heads"):
        del c.model[k]
    c.model.context_dim = 64
    c.train.num_steps = 3000
    return c
