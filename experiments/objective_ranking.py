r"""Does mutual predictability prefer the gold labels? Train split only.

  python experiments/objective_ranking.py [--pairs=8] [--random=12] [--all]

On the first `pairs` train pairs of the bundled sentiment task, scores with
SmolLM2-135M the gold labelling, its inverse and `random` random consistent
labellings (one claim of each pair True), under every scoring mode x
context. I(D) = 0 for all of them, so U ranks them by P(D) alone. Prints, per
setting, the P(D) of gold and inverted gold, gold's rank among all scored
labellings (1 = best) and the Spearman correlation between P(D) and the
labelling's agreement with gold. `--objective` picks P(D)'s form. `--all`
scores every one of the 2^pairs consistent labellings instead (brute force:
gold's rank is then its rank in the whole search space).
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from icm_jax.checkpoints import load_model, smollm2_gguf_path
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.search.objective import mutual_predictability
from icm_jax.tasks import bundled_path, get_task, load_examples
from icm_jax.tokenization import LabelWords, tokenize_examples

FLAGS = flags.FLAGS
flags.DEFINE_integer("pairs", 8, "train pairs (claims = 2 x pairs)")
flags.DEFINE_integer("random", 12, "random consistent labellings")
flags.DEFINE_list("modes", ["parallel", "exact"], "scoring modes")
flags.DEFINE_list("contexts", ["leave_one_out", "leave_group_out"],
                  "scoring contexts")
flags.DEFINE_string("objective", "mean_log_odds", "search.objective")
flags.DEFINE_string("out", "", "append one JSON line per setting here")
flags.DEFINE_bool("all", False, "every consistent labelling (2^pairs)")


def spearman(a, b) -> float:
  ra = np.argsort(np.argsort(a)).astype(float)
  rb = np.argsort(np.argsort(b)).astype(float)
  return float(np.corrcoef(ra, rb)[0, 1])


def main(argv):
  del argv
  config, params, tokenizer = load_model(smollm2_gguf_path())
  task = get_task("sentiment")
  train = load_examples(task, bundled_path("sentiment", "train"))
  examples = train[:2 * FLAGS.pairs]
  tokens = tokenize_examples(tokenizer, [e.prompt for e in examples],
                             ids=[e.id for e in examples], words=LabelWords())
  gold = np.array([e.gold for e in examples])
  rng = np.random.default_rng(0)
  candidates = [gold, 1 - gold]
  if FLAGS.all:
    for code in range(2 ** FLAGS.pairs):
      first = (code >> np.arange(FLAGS.pairs)) & 1
      labelling = np.stack([first, 1 - first], 1).ravel()
      if not any((labelling == c).all() for c in candidates):
        candidates.append(labelling)
  while not FLAGS.all and len(candidates) < 2 + FLAGS.random:
    first = rng.integers(0, 2, FLAGS.pairs)
    candidates.append(np.stack([first, 1 - first], 1).ravel())
  candidates = np.stack(candidates)
  agreement = (candidates == gold).mean(axis=1)
  for mode in FLAGS.modes:
    for context in FLAGS.contexts:
      t = time.perf_counter()
      scorer = LOOScorer(config, params, tokens,
                         ScoringConfig(mode=mode, context=context),
                         groups=[e.group for e in examples])
      scores = scorer.score(candidates)
      p = mutual_predictability(FLAGS.objective, candidates,
                                scores.log_p_false, scores.log_p_true)
      rank = int((p > p[0]).sum()) + 1
      higher = p > p[0]
      row = dict(mode=mode, context=context, objective=FLAGS.objective,
                 claims=len(examples), labellings=len(candidates),
                 P_gold=float(p[0]), P_inverted=float(p[1]),
                 P_random_mean=float(p[2:].mean()), gold_rank=rank,
                 spearman_P_vs_agreement=spearman(p, agreement),
                 gold_agreement_of_those_above_gold=sorted(
                     agreement[higher].round(3).tolist(), reverse=True),
                 seconds=time.perf_counter() - t)
      print(json.dumps(row), flush=True)
      if FLAGS.out:
        with open(FLAGS.out, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
