r"""Chooses the bundled sentiment task's wording on the TRAIN split only.

  python experiments/sentiment_wordings.py [--pairs=40] [--demos=32]

For each candidate template: zero-shot and gold many-shot label log-probs of
train claims with SmolLM2-135M. Many-shot queries are the first `pairs`
train pairs; the demonstrations are later train pairs with gold labels (no
query's twin is in its context). Prints accuracy thresholded at 0, AUC of the
log-odds, pair (group-consistent) accuracy and the fraction predicted True.
Test labels are never read.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from icm_jax.checkpoints import load_model, smollm2_gguf_path
from icm_jax.evaluation.decoding import group_consistent_labels, roc_auc
from icm_jax.evaluation.prompting import label_log_probs, select_demonstrations
from icm_jax.tasks import Task, bundled_path, load_examples
from icm_jax.tokenization import LabelWords, tokenize_examples

FLAGS = flags.FLAGS
flags.DEFINE_integer("pairs", 40, "train pairs used as queries")
flags.DEFINE_integer("demos", 32, "gold demonstrations (from other pairs)")

WORDINGS = {
    "word_ab": ("Word A: {word_a}\nWord B: {word_b}\nClaim: Word A is more "
                "positive than Word B.\nI think this claim is"),
    "quoted": ('Word 1: "{word_a}"\nWord 2: "{word_b}"\nClaim: "{word_a}" is '
               'a more positive word than "{word_b}".\nI think this claim is'),
    "compare": ("Compare the sentiment of two words.\nFirst word: {word_a}\n"
                "Second word: {word_b}\nClaim: The first word is more "
                "positive than the second word.\nI think this claim is"),
}


def measure(name, lf, lt, examples, task):
  gold = np.array([e.gold for e in examples])
  s = lt - lf
  pred = (s > 0).astype(int)
  pairs = group_consistent_labels(lf, lt, [e.group for e in examples],
                                  [e.key for e in examples], task.consistency)
  return (f"{name}: accuracy {np.mean(pred == gold):.3f}  AUC "
          f"{roc_auc(s, gold):.3f}  pair accuracy {np.mean(pairs == gold):.3f}"
          f"  predicted True {pred.mean():.3f}")


def main(argv):
  del argv
  config, params, tokenizer = load_model(smollm2_gguf_path())
  for wording, template in WORDINGS.items():
    task = Task(name="sentiment", template=template,
                consistency="comparative", key_from="pair_order",
                pair_fields=("word_a", "word_b"), id_field="id")
    train = load_examples(task, bundled_path("sentiment", "train"))
    tokens = tokenize_examples(tokenizer, [e.prompt for e in train],
                               ids=[e.id for e in train], words=LabelWords())
    queries = list(range(2 * FLAGS.pairs))
    pool = list(range(2 * FLAGS.pairs, len(train)))
    rng = np.random.default_rng(0)
    candidates = [int(i) for i in rng.permutation(pool)[:FLAGS.demos]]
    demos = select_demonstrations(tokens, candidates, queries, 2048)
    subset = [train[q] for q in queries]
    lf, lt = label_log_probs(config, params, tokens, queries, batch_size=16)
    print(wording, measure("zero-shot", lf, lt, subset, task), flush=True)
    lf, lt = label_log_probs(config, params, tokens, queries, demos=demos,
                             demo_labels=[train[d].gold for d in demos],
                             batch_size=16)
    print(wording, measure(f"gold {len(demos)}-shot", lf, lt, subset, task),
          flush=True)


if __name__ == "__main__":
  app.run(main)
