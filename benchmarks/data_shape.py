"""What loading a workdir for sampling spends on its dataset: the whole derived dataset against its shape.

    python -m benchmarks.data_shape            # 3 interleaved rounds
    python -m benchmarks.data_shape --reps 5 --json /tmp/bench/data_shape.json

``jdiff.workdir.load_for_sampling`` (every ``launch.sample``, every notebook that samples a
trained workdir) and ``launch.train``'s device setup need only the image shape of the workdir's
data section. They used to get it from ``get_dataset``, which derives everything a training run
needs from the images: a ControlNet's Canny edges of every image, an unCLIP stage's CLIP
embeddings, a latent model's latents. ``image_shape_of`` now reads the shape without deriving
anything (the CLIP's or autoencoder's JSON gives the embedding or latent shape). Side by side
in one run, per data section:

  get_dataset     ``get_dataset(data).image_shape``: what the loaders did before;
  image_shape_of  ``image_shape_of(data)``: what they do now.

The sections: ControlNet Canny edges on Fashion-MNIST's 60,000 training images (the Debian
files; the 300-image sample when they are missing, which the table says), the plain images
area-downsampled to 14x14 (whose shape ``image_shape_of`` now takes from the config), a latent model on
4,000 captioned scenes at 16x16 (an untrained tiny autoencoder: its weights do not change the
cost), and an unCLIP prior on the same scenes (an untrained tiny CLIP). Both paths must give
the same shape; the script stops if they do not.
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jdiff import latent
from jdiff.data import fashion_mnist, get_dataset, image_shape_of
from jdiff.data import captions as cap
from jdiff.models import Autoencoder
from jdiff.models.text import CLIP
from jdiff.train import clip as clip_lib

SCENES = {"name": "captioned_shapes", "resolution": 16, "num_examples": 4000, "max_objects": 1}


def _sections(root: str) -> dict[str, dict]:
    try:
        fashion_mnist.load_fashion_mnist_uint8("train")
        fm = {"name": "fashion_mnist", "control": "canny"}
    except fashion_mnist.FashionMnistNotFoundError:
        fm = {"name": "fashion_mnist_sample", "control": "canny"}
    ae = Autoencoder(image_channels=3, latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)
    ae_params = ae.init({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 3)), jax.random.key(1))["params"]
    latent.save_autoencoder(f"{root}/ae", ae, ae_params, scale=1.0, image_shape=(16, 16, 3))
    clip = CLIP(embed_dim=8, vocab_size=cap.Tokenizer().vocab_size, text_width=16, text_layers=1, text_heads=2,
                image_channels_base=8)
    ids = np.ones((1, clip.max_length), np.int32)
    clip_params = clip.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), np.zeros((1,), np.int32), ids,
                            ids > 0)["params"]
    clip_lib.save_clip(f"{root}/clip", clip, clip_params, resolution=16, noised=False)
    return {f"ControlNet canny, {fm['name']}": fm,
            f"{fm['name']} at 14x14 (the cascade's base)": {"name": fm["name"], "resolution": 14},
            "latent, captioned_shapes 4,000 at 16x16": {**SCENES, "autoencoder": f"{root}/ae"},
            "unCLIP prior, captioned_shapes 4,000 at 16x16": {**SCENES, "clip_workdir": f"{root}/clip",
                                                               "clip_embeddings": "prior"}}


def main() -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    info = common.machine_info()
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as root:
        for name, data in _sections(root).items():
            shapes = {"get_dataset": tuple(get_dataset(data).image_shape), "image_shape_of": image_shape_of(data)}
            if shapes["get_dataset"] != shapes["image_shape_of"]:
                raise SystemExit(f"{name}: the shapes differ: {shapes}")
            print(name, shapes["image_shape_of"])
            times = common.interleaved({"get_dataset": lambda d=data: get_dataset(d).image_shape,
                                        "image_shape_of": lambda d=data: image_shape_of(d)}, args.reps, warmup=0)
            raw[name] = times
            old, new = common.median(times["get_dataset"]), common.median(times["image_shape_of"])
            rows.append([name, str(shapes["image_shape_of"]), old, new,
                         f"{common.paired_ratio(times['get_dataset'], times['image_shape_of']):.0f}x"])
    print(f"\n{info['date']}; jax {info['jax']}, {info['cpu_cores']} CPU cores; load average {info['loadavg_start']} "
          f"at start, {common.loadavg()} at end\n")
    print(common.markdown_table(["data section", "shape", "get_dataset s", "image_shape_of s", "ratio"], rows))
    common.write_json(args.json, {"machine": info, "times": raw})


if __name__ == "__main__":
    main()
