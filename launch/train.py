"""Train a diffusion model.

python -m launch.train --config configs/digits.py --workdir workdirs/digits [--config.optim.lr=1e-3 ...]

Resumes automatically from the newest checkpoint in --workdir (which must belong to the same
experiment). Writes checkpoints, metrics.jsonl, sample grids and metrics.json there.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from jdiff.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Path to a get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # orbax logs every checkpoint phase at INFO; keep the console for our own progress.
    logging.getLogger("absl").addFilter(lambda record: "orbax" not in record.pathname or record.levelno >= logging.WARNING)
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    app.run(main)
