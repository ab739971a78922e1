"""Training: a pure ``train_step`` over a ``TrainState`` (trainable params, their EMA and
optimizer state, frozen params), batch transforms, checkpoints, and a thin loop that trains the
network the config names (``jdiff.train.network``)."""

from jdiff.train.state import TrainState, create_train_state, make_optimizer, merge_params, split_params
from jdiff.train.step import make_train_step

__all__ = ["TrainState", "create_train_state", "make_optimizer", "make_train_step", "merge_params", "split_params"]
