"""Train a noise-aware classifier on noised data (for classifier guidance).

python -m launch.train_classifier --config configs/digits_classifier.py --workdir workdirs/digits_classifier

Writes checkpoints, metrics.jsonl and metrics.json (test accuracy at several noise levels).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from jdiff.train.classifier import train_classifier
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits_classifier.py", "Path to a get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.configure_gc()
    common.configure_logging()
    common.configure_compilation_cache()
    print(json.dumps(train_classifier(_CONFIG.value, _WORKDIR.value), indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
