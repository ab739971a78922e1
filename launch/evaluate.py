"""Evaluate a trained workdir and write the numbers to JSON.

python -m launch.evaluate --workdir workdirs/digits --num 1000 --out metrics.json

Samples --num images (class-balanced for conditional models) from the newest checkpoint's EMA
params, clips them to [-1, 1] (reporting the fraction that was outside) and scores them with the
evaluator of the config or --evaluator (jdiff.evaluation.evaluators; "digits": FID, Inception
Score, precision, recall, class accuracy with the digits classifier), and adds the bits/dim bound
on --bpd_examples test images. Logging as launch.train (--verbosity, --log_dir).
"""

import json
import os

import jax
import numpy as np
from absl import app, flags

from jdiff.data import NO_DATASET
from jdiff.evaluation.workdir import evaluate_loaded
from jdiff.workdir import load_for_sampling
from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_NUM = flags.DEFINE_integer("num", 1000, "Number of samples to score.")
_OUT = flags.DEFINE_string("out", "metrics.json", "Output JSON file.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w >= 0.")
_METHOD = flags.DEFINE_string("method", None, "Sampler (default: config).")
_STEPS = flags.DEFINE_integer("steps", None, "Network calls (default: config).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: config).")
_EVALUATOR = flags.DEFINE_string("evaluator", None, "Evaluator scoring the samples (jdiff.evaluation.evaluators; "
                                  "'' for none; default: config.eval.evaluator).")
_BPD = flags.DEFINE_integer("bpd_examples", 300, "Test images for bits/dim (0: skip; T network calls each batch).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.configure_gc()
    common.configure_logging()
    if _NUM.value < 1:
        raise app.UsageError(f"--num: expected a positive number of samples, got {_NUM.value}")
    if not np.isfinite(_GUIDANCE.value) or _GUIDANCE.value < 0:
        raise app.UsageError(f"--guidance: expected a finite weight >= 0, got {_GUIDANCE.value}")
    cfg = common.load_workdir_config(_WORKDIR.value)  # a training workdir, checked before anything is loaded
    if cfg.data.name == NO_DATASET:  # an imported model (launch.convert) without a dataset
        evaluator = cfg.eval.evaluator if _EVALUATOR.value is None else _EVALUATOR.value
        if _BPD.value or evaluator:
            raise app.UsageError(
                f"--workdir: {_WORKDIR.value!r} has no dataset (data.name {NO_DATASET!r}: an imported model), so "
                f"bits/dim (--bpd_examples {_BPD.value}) and the evaluator {evaluator!r} have no test images; pass "
                "--bpd_examples 0 --evaluator '' for sample statistics alone, or convert with --data NAME")
    common.configure_devices()  # one XLA CPU device per core: the samples are split over them
    common.configure_compilation_cache()
    loaded = load_for_sampling(_WORKDIR.value)
    result = evaluate_loaded(
        loaded, _NUM.value, jax.random.key(_SEED.value), guidance_weight=_GUIDANCE.value,
        method=_METHOD.value, steps=_STEPS.value, eta=_ETA.value, bpd_examples=_BPD.value, evaluator=_EVALUATOR.value,
    )
    out = _OUT.value
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
