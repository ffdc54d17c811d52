"""Training: built-in and user models and data, the loop, checkpoints."""

from lorakit.train.config import TrainConfig
from lorakit.train.job import run
from lorakit.train.state import Trainer

__all__ = ["TrainConfig", "Trainer", "run"]
