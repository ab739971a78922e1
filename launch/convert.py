"""Import pretrained weights as a jdiff workdir, or export a jdiff U-Net to diffusers.

    # a diffusers model or pipeline folder (config.json + diffusion_pytorch_model.safetensors / .bin)
    python -m launch.convert --from diffusers path/to/ddpm-cifar10-32 --workdir workdirs/ddpm_cifar10
    # an OpenAI improved / guided-diffusion checkpoint with the flags it was trained with
    python -m launch.convert --from openai 64x64_diffusion.pt --workdir workdirs/adm64 \
        --flags "--image_size 64 --num_channels 192 --attention_resolutions 32,16,8 --learn_sigma True ..."
    python -m launch.convert --from openai 64x64_classifier.pt --kind classifier --workdir workdirs/adm64_clf \
        --flags "--image_size 64 --classifier_width 128 ..."
    python -m launch.convert --from openai cifar10_uncond_50M_500K.pt --codebase improved-diffusion --workdir W \
        --flags "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
    # a jdiff workdir (or an imported one) as a diffusers DDPMPipeline folder
    python -m launch.convert --to diffusers --workdir workdirs/ddpm_cifar10 exported/

The written workdir is one ``launch.sample`` and ``launch.evaluate`` take like a trained one:
``config.json`` (the network, the source's schedule, parameterization, variance and clipping,
``data.name = --data``), a step-0 checkpoint whose EMA params are the imported weights, and
``imported_from.json`` (the source path and its own config). ``--data`` names the dataset
evaluation and fine-tuning use (default "none": sampling only). Every check (files, config
fields, checkpoint keys and shapes) runs before anything is written. Reading ``.safetensors``
needs ``safetensors``, reading ``.bin`` / ``.pt`` needs ``torch``: ``pip install 'jdiff[convert]'``.
"""

from __future__ import annotations

import os

from absl import app, flags

from launch import common

_FROM = flags.DEFINE_enum("from", None, ["diffusers", "openai"], "Import: the source format; the source path follows as "
                          "the one positional argument.")
_TO = flags.DEFINE_enum("to", None, ["diffusers"], "Export --workdir to this format; the output folder follows as the "
                        "one positional argument.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The jdiff workdir to write (import) or read (export).", required=True)
_FLAGS = flags.DEFINE_string("flags", "", "--from openai: the checkpoint's script flags, e.g. \"--image_size 64 "
                             "--num_channels 192 --learn_sigma True\" (guided-diffusion's defaults fill the rest).")
_KIND = flags.DEFINE_enum("kind", "model", ["model", "classifier"], "--from openai: the U-Net or the noise-aware classifier.")
_CODEBASE = flags.DEFINE_enum("codebase", "guided-diffusion", ["guided-diffusion", "improved-diffusion"],
                              "--from openai: whose flag defaults apply (improved-diffusion's differ: rescale_timesteps, "
                              "32x32 channel_mult).")
_DATA = flags.DEFINE_string("data", "none", "Import: config.data.name of the written workdir (a dataset evaluation and "
                            "fine-tuning can load, e.g. cifar10); 'none': sampling only.")


def _import(source: str) -> str:
    from jdiff import convert

    if _FROM.value == "diffusers":
        if _FLAGS.value or _KIND.value != "model" or _CODEBASE.value != "guided-diffusion":
            raise app.UsageError("--flags, --kind and --codebase are for --from openai; a diffusers folder carries its own config")
        imported = convert.from_diffusers(source)
    else:
        imported = convert.from_openai(source, _FLAGS.value, kind=_KIND.value, codebase=_CODEBASE.value)
    return convert.write_workdir(imported, _WORKDIR.value, data={"name": _DATA.value})


def _export(out_dir: str) -> str:
    from jdiff import convert
    from jdiff.workdir import load_for_sampling

    if _FLAGS.value or _KIND.value != "model" or _CODEBASE.value != "guided-diffusion" or _DATA.value != "none":
        raise app.UsageError("--flags, --kind, --codebase and --data are for imports (--from)")
    loaded = load_for_sampling(_WORKDIR.value)
    if loaded.config.model_name != "unet":
        raise app.UsageError(f"--workdir: {_WORKDIR.value!r} holds a {loaded.config.model_name!r} network; diffusers "
                             "export takes a U-Net (model_name 'unet')")
    return convert.to_diffusers(out_dir, loaded.config.model.to_dict(), loaded.params, loaded.image_shape,
                                loaded.config.diffusion.to_dict(), loaded.config.sample.to_dict())


def main(argv):
    common.configure_gc()
    common.configure_logging()
    if (_FROM.value is None) == (_TO.value is None):
        raise app.UsageError("expected exactly one of --from (import into --workdir) and --to (export --workdir)")
    if len(argv) != 2:
        what = "the source file or folder" if _FROM.value else "the output folder"
        raise app.UsageError(f"expected one positional argument, {what}; got {argv[1:]}")
    target = argv[1]
    from jdiff.convert import ConversionError

    try:
        if _FROM.value:
            if not os.path.exists(target):
                raise app.UsageError(f"source: {target!r} does not exist")
            done = _import(target)
            print(f"wrote workdir {done} (python -m launch.sample --workdir {done} ...)")
        else:
            common.load_workdir_config(_WORKDIR.value)  # a jdiff workdir, checked before anything is loaded
            done = _export(target)
            print(f"wrote diffusers pipeline {done} (diffusers.DDPMPipeline.from_pretrained({done!r}))")
    except ConversionError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
