"""GSM8K-verification with the paper's settings, for Llama-3.1-8B / 70B.

  python main.py --config=configs/gsm8k.py --workdir=DIR \
      --config.model.path=/models/Meta-Llama-3.1-8B \
      --config.data.test=/data/icm/test_gsm8k.json

Claims are LM-written solutions ("cot"); solutions to the same question with
the same final answer must agree (consistency key = the answer). The ICM
release has only a test file, so it is split into train/test by whole
question (data.split_from_test). Search settings: the paper's, which are
SearchConfig's defaults (alpha=50, K=8, T0=10, T_min=0.01, beta=0.99, log
schedule, 3000 iterations), ICM batches of 256 claims.

Scoring stays exact (the paper's prompts): no faster mode gives the same
scores (README, "Leave-one-out scoring"). With its passes in query chunks
(scoring.query_chunk) it fits Llama-3.1-8B on a v5e-16 with
--config.mesh.fsdp=2 --config.mesh.tensor=8 (11.2 GiB per chip; not with
fsdp=16) and Llama-3.1-70B on 32 v5p chips with fsdp=4, tensor=8:
`python tpu_scripts/aot_check.py` checks a slice before you rent it, and
`python tpu_scripts/plan.py` gives the search's roofline time.
"""

from icm_jax.run_config import paper_config


def get_config(preset=""):
  config = paper_config("gsm8k", preset)
  config.data.split_from_test = True
  return config
