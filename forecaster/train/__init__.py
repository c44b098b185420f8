"""The offline trainer: history from Kafka or files, baseline choice, fit, evaluation, publish, periodic runs."""

from forecaster.train.history import History, read_history
from forecaster.train.run import TrainOutcome, train_once

__all__ = ["History", "TrainOutcome", "read_history", "train_once"]
