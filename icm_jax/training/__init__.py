"""Fine-tuning the model on ICM (or gold / random) labels.

  result = train(model_config, params, example_tokens, labels, TrainConfig(),
                 mesh=mesh, workdir="runs/x/train")
"""

from icm_jax.training.config import TrainConfig
from icm_jax.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
