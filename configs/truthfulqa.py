"""TruthfulQA with the paper's settings, for Llama-3.1-8B / 70B.

  python main.py --config=configs/truthfulqa.py --workdir=DIR \
      --config.model.path=/models/Meta-Llama-3.1-8B

The search settings are the paper's (Wen et al. 2025, official code) and are
SearchConfig's defaults: alpha=50, initial_size K=8, T0=10, T_min=0.01,
beta=0.99, log schedule, 3000 iterations; ICM batches of 256 claims. Data:
the ICM paper's TruthfulQA train/test split, bundled with the package.
"""

from icm_jax.run_config import paper_config


def get_config(preset=""):
  config = paper_config("truthfulqa", preset)
  return config
