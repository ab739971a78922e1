"""Train the KL autoencoder of latent diffusion and write an autoencoder directory.

python -m launch.train_autoencoder --workdir workdirs/ae16 --data captioned_shapes --resolution 16 --steps 3000

Writes autoencoder.msgpack and autoencoder.json: the fields, the latent scale factor (1 / std of
the training images' latents, so they have unit variance), the test-split reconstruction PSNR.
A diffusion config then trains in its latent space with config.data.autoencoder=DIR (e.g.
configs/shapes_text_latent.py): the dataset is encoded once at load, and samples are decoded
back to pixels (jdiff.latent).
"""

import json

import numpy as np
from absl import app, flags

from jdiff.train import autoencoder as ae_lib
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for autoencoder.msgpack and autoencoder.json.", required=True)
_DATA = flags.DEFINE_string("data", "captioned_shapes", "The dataset (config.data.name; its train split trains).")
_RESOLUTION = flags.DEFINE_integer("resolution", 16, "config.data.resolution of the dataset (None: its own).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 20000, "Generated datasets: how many training images.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per step.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (Adam, warmup then cosine decay).")
_KL = flags.DEFINE_float("kl_weight", 1e-6, "Weight of the mean KL term (LDM's KL-regularised first stage).")
_LATENT = flags.DEFINE_integer("latent_channels", 4, "Latent channels c.")
_BASE = flags.DEFINE_integer("base_channels", 32, "Width of the first level.")
_MULT = flags.DEFINE_list("channel_mult", ["1", "2"], "Width multipliers per level; f = 2**(levels - 1).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init, the batch order and the posterior noise.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        mult = tuple(int(m) for m in _MULT.value)
    except ValueError:
        raise app.UsageError(f"--channel_mult: expected comma-separated positive ints, got {_MULT.value}") from None
    if not np.isfinite(_LR.value) or _LR.value <= 0:
        raise app.UsageError(f"--lr: expected a positive learning rate, got {_LR.value}")
    common.configure_gc()
    common.configure_logging()
    common.configure_compilation_cache()
    data = {"name": _DATA.value, "resolution": _RESOLUTION.value, "num_examples": _NUM_EXAMPLES.value}
    try:
        module, params, metrics = ae_lib.train_autoencoder(
            data, _STEPS.value, _BATCH.value, _SEED.value, learning_rate=_LR.value, kl_weight=_KL.value,
            latent_channels=_LATENT.value, base_channels=_BASE.value, channel_mult=mult)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    from jdiff import latent
    from jdiff.data import image_shape_of

    latent.save_autoencoder(_WORKDIR.value, module, params, scale=metrics["scale"], image_shape=image_shape_of(data),
                            metrics={**metrics, "data": data, "steps": _STEPS.value})
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
