"""A random 2-layer Llama with SmolLM2's tokenizer: every stage, end to end,
in about a minute on CPU. Used by the tests; also a quick smoke run:

  python main.py --config=configs/tiny.py --workdir=/tmp/icm_tiny
"""

from icm_jax.checkpoints import smollm2_gguf_path
from icm_jax.run_config import default_config


def get_config():
  config = default_config()
  config.model.random_init = dict(
      vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=2048,
      tie_word_embeddings=True)
  config.model.tokenizer = smollm2_gguf_path()
  config.data.max_train_examples = 16
  config.data.max_test_examples = 16
  config.label.batch_size = 8
  config.search.max_iterations = 12
  config.search.checkpoint_every = 4
  config.train.batch_size = 4
  config.train.num_epochs = 1
  config.train.warmup_steps = 0
  config.train.learning_rate = 1e-3
  config.train.checkpoint_every = 2
  config.eval.batch_size = 4
  config.log.progress = False
  return config
