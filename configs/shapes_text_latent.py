"""Text-to-image in latent space (LDM, Rombach et al. 2022): configs/shapes_text.py's TextUNet
and captions, trained on the 8x8x4 latents of a KL autoencoder with f = 2.

python -m launch.train_autoencoder --workdir workdirs/ae16 --data captioned_shapes --resolution 16 --steps 3000
python -m launch.train --config configs/shapes_text_latent.py --workdir workdirs/shapes_text_latent
python -m launch.sample --workdir workdirs/shapes_text_latent --prompt "a large red disc at the top left" --guidance 3 --out x.png

The dataset is encoded once at load (config.data.autoencoder; latents scaled to unit variance)
and samples are decoded back to 16x16 pixels. The U-Net keeps the pixel model's widths and its
cross-attention at the 8x8 level, which is now the latent's full resolution.

The sampler clips the predicted x_0 to [-4, 4], the latents' range (the largest |z| of
workdirs/ae16's training latents is 3.9), not to the pixels' [-1, 1]. Some bound is needed with
the cosine schedule: its last alpha_bar is 2.4e-9, so an unclipped x_0 = (x_T - sqrt(1 -
alpha_bar) eps_hat) / sqrt(alpha_bar) multiplies the first step's eps error by ~2e4 and the
samples diverge (latent std ~1000 with DDIM-50). LDM avoids it with a linear schedule whose last
alpha_bar is 0.0047.
"""

from configs import shapes_text


def get_config(arg=None):
    c = shapes_text.get_config(arg)
    c.data.autoencoder = "workdirs/ae16"
    c.sample.clip = 4.0
    return c
