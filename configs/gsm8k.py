"""GSM8K-verification with the paper's settings, for Llama-3.1-8B / 70B.

  icm-jax --config=gsm8k:llama3.1-8b --workdir=gs://BUCKET/gsm8k \
      --config.model.path=/models/Meta-Llama-3.1-8B \
      --config.data.test=/data/icm/test_gsm8k.json

Claims are LM-written solutions ("cot"); solutions to the same question with
the same final answer must agree (consistency key = the answer). The ICM
release has only a test file, so it is split into train/test by whole
question (data.split_from_test). Search settings: the paper's, which are
SearchConfig's defaults (alpha=50, K=8, T0=10, T_min=0.01, beta=0.99, log
schedule, 3000 iterations), ICM batches of 256 claims.

`:PRESET` (llama3.1-8b, llama3.1-70b) checks the checkpoint's shapes and
sets the mesh that fits (tensor=8, fsdp = the rest). Which scoring mode fits
which slice, per chip (tpu_scripts/aot_check.py --modes=exact,shared;
README "Planning a paper-scale run"):
  Llama-3.1-8B on v5e-16 (v5e:4x4), fsdp=2, tensor=8: exact 8.9 GiB,
    shared 4.3 GiB with the default bf16 params (11.2 / 6.1 GiB with
    float32 params): both fit 16 GiB. With fsdp=16, tensor=1 exact needs
    32.0 GiB with float32 params (the demonstrations' KV cache splits only
    by tensor) and does not fit; shared 13.2 GiB.
  Llama-3.1-70B on v5p-64 (v5p:2x4x4, 32 chips), fsdp=4, tensor=8: exact
    27.3 GiB, shared 17.4 GiB with float32 params: both fit 95 GiB.
Exact (the default) gives the paper's scores; shared is faster and agrees
with it only at larger N (README "Leave-one-out scoring").
`python tpu_scripts/plan.py` gives the search's roofline time.
"""

from icm_jax.run_config import paper_config


def get_config(preset=""):
  config = paper_config("gsm8k", preset)
  config.data.split_from_test = True
  return config
