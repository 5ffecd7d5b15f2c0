r"""Your own claims, by flags alone: SmolLM2 unless --config.model.path says.

  icm-jax --config=custom --workdir=runs/mine \
      --config.data.train=claims.jsonl \
      --config.task.template='Claim: {claim}\nI think this claim is' \
      --config.task.consistency=none --config.stages=label

claims.jsonl: one JSON object per line holding the template's fields
({"claim": "..."}); optional: "label" (true/false, gold for the report
only), a group field and a key field for consistency. Every task key is a
flag (--config.task.template, .consistency, .group_field, .key_field,
.key_from, .label_field, .id_field, .pair_fields, .strip_newlines,
.true_word, .false_word; README "Your own data"). The shipped example
(configs/examples/claims_{train,test}.jsonl, 24 + 16 general-knowledge
claims written for this project) runs when no file is given:

  icm-jax --config=custom --workdir=runs/custom_example

Another base model: --config.model.path=<HF directory or .gguf>.
"""

import os

from icm_jax.checkpoints import smollm2_gguf_path
from icm_jax.run_config import default_config, task_section

_EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "examples")


def get_config():
  config = default_config()
  config.task = task_section("custom")
  config.task.template = "Claim: {claim}\nI think this claim is"
  config.task.consistency = "none"
  config.model.path = smollm2_gguf_path()
  config.data.train = os.path.join(_EXAMPLES, "claims_train.jsonl")
  config.data.test = os.path.join(_EXAMPLES, "claims_test.jsonl")
  config.stages = "label,eval"
  config.eval.methods = "zero_shot,many_shot_icm,many_shot_random"
  # Exact scoring costs one leave-one-out prompt per claim per step: on a
  # CPU with SmolLM2 a step over 24 claims takes ~30 s, so the default
  # search is short; on an accelerator raise it (the paper runs 3000).
  config.search.max_iterations = 48
  return config
