"""Training: built-in and user models and data, the loop, checkpoints."""

from lorakit.train.trainer import TrainConfig, Trainer, run

__all__ = ["TrainConfig", "Trainer", "run"]
