"""Pretrained weights in and out: diffusers ``UNet2DModel`` folders and OpenAI improved /
guided-diffusion checkpoints loaded into jdiff's own networks (and jdiff U-Nets exported to
diffusers), so a user samples a real pretrained model with jdiff's scan samplers and guidance.

- :func:`from_diffusers` / :func:`to_diffusers`: :mod:`jdiff.convert.diffusers`.
- :func:`from_openai`: :mod:`jdiff.convert.openai` (the ADM U-Net and its noise-aware classifier).
- :func:`write_workdir`: an :class:`Imported` as a workdir ``launch.sample`` and
  ``launch.evaluate`` take (``python -m launch.convert``).

Reading ``.safetensors`` needs the ``safetensors`` package and PyTorch pickles (``.bin``, ``.pt``)
need ``torch``: ``pip install 'jdiff[convert]'``. Neither is a core dependency; the modules
import them only when a file is read or written.
"""

from jdiff.convert import common, diffusers, openai
from jdiff.convert.common import ConversionError, Imported, read_state_dict, write_workdir
from jdiff.convert.diffusers import from_diffusers, to_diffusers
from jdiff.convert.openai import from_openai

__all__ = ["ConversionError", "Imported", "read_state_dict", "write_workdir", "from_diffusers", "to_diffusers",
           "from_openai", "common", "diffusers", "openai"]
