"""Alpaca pairwise preferences (comparative consistency), paper settings.

  python main.py --config=configs/alpaca.py --workdir=DIR \
      --config.model.path=/models/Meta-Llama-3.1-8B \
      --config.data.test=/data/icm/test_alpaca.json

Each pair of responses appears twice, in both orders; exactly one order can
be "True" (comparative consistency). Only a test file is released, so it is
split by whole pair. Search settings: the paper's = SearchConfig's defaults.
"""

from icm_jax.run_config import default_config


def get_config():
  config = default_config()
  config.task.name = "alpaca"
  config.data.split_from_test = True
  config.train.batch_size = 32
  config.train.learning_rate = 1e-5
  config.train.remat = True
  return config
