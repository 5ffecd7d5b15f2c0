"""Alpaca pairwise preferences (comparative consistency), paper settings.

  python main.py --config=configs/alpaca.py --workdir=DIR \
      --config.model.path=/models/Meta-Llama-3.1-8B \
      --config.data.test=/data/icm/test_alpaca.json

Each pair of responses appears twice, in both orders; exactly one order can
be "True" (comparative consistency). Only a test file is released, so it is
split by whole pair. Search settings: the paper's = SearchConfig's defaults.
"""

from icm_jax.run_config import paper_config


def get_config(preset=""):
  config = paper_config("alpaca", preset)
  config.data.split_from_test = True
  return config
