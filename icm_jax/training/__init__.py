"""Fine-tuning the model on ICM (or gold / random) labels."""

from icm_jax.training.config import TrainConfig
from icm_jax.training.trainer import TrainResult, label_log_probs, train

__all__ = ["TrainConfig", "TrainResult", "label_log_probs", "train"]
