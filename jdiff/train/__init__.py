"""Training: a pure ``train_step`` over a ``TrainState``, checkpoints, and a thin loop."""

from jdiff.train.state import TrainState, create_train_state, make_optimizer
from jdiff.train.step import make_train_step

__all__ = ["TrainState", "create_train_state", "make_optimizer", "make_train_step"]
