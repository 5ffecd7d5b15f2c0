r"""Does ICM decide the same with a fast scoring mode as with exact mode?

  python experiments/search_modes.py [--num_examples=8] [--seeds=0,1,2]
      [--modes=exact,shared,parallel,tree] [--tree_tail=M]
      [--alpha_rule=fixed|step_spread] [--out=experiments/search_modes.jsonl]

SmolLM2-135M, the first N claims (whole consistency groups) of TruthfulQA
(the paper's ICM file) and of the bundled sentiment task's train split; one
ICM search per (task, mode, seed) with the same search settings and seed
(every claim starts labelled, hard consistency fix, `--iterations` steps,
`--alpha`). Prints per run the wall time, gold agreement of the final labels
(information only) and, for each fast mode, the share of claims whose final
label equals the exact-mode run's with the same seed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from icm_jax.checkpoints import load_model, smollm2_gguf_path
from icm_jax.labelling import model_scorer_factory, run_icm
from icm_jax.scoring import ScoringConfig
from icm_jax.search import SearchConfig
from icm_jax.tasks import bundled_path, get_task, load_examples

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_integer("num_examples", 8, "claims per search")
flags.DEFINE_list("seeds", ["0", "1", "2"], "search seeds")
flags.DEFINE_list("modes", ["exact", "shared", "parallel"], "scoring modes")
flags.DEFINE_list("tasks", ["truthfulqa", "sentiment"], "tasks")
flags.DEFINE_string("context", "leave_one_out", "scoring.context")
flags.DEFINE_integer("iterations", 24, "annealing iterations")
flags.DEFINE_float("alpha", 1000.0, "search.alpha")
flags.DEFINE_string("alpha_rule", "fixed", "search.alpha_rule")
flags.DEFINE_integer("tree_tail", 0, "scoring.tree_tail of the tree mode")
flags.DEFINE_string("truthfulqa", os.path.join(
    HERE, "..", "..", "shared", "data", "icm", "test_truthfulqa.json"),
                    "TruthfulQA ICM file")
flags.DEFINE_string("out", "", "append one JSON line per run here")


def main(argv):
  del argv
  model = load_model(smollm2_gguf_path())
  for task_name in FLAGS.tasks:
    task = get_task(task_name)
    path = (FLAGS.truthfulqa if task_name == "truthfulqa"
            else bundled_path("sentiment", "train"))
    examples = load_examples(task, path)[:FLAGS.num_examples]
    gold = np.array([e.gold for e in examples])
    exact_labels = {}
    for seed in map(int, FLAGS.seeds):
      for mode in FLAGS.modes:
        search = SearchConfig(max_iterations=FLAGS.iterations, seed=seed,
                              alpha=FLAGS.alpha, alpha_rule=FLAGS.alpha_rule,
                              initial_size=FLAGS.num_examples)
        scoring = ScoringConfig(mode=mode, context=FLAGS.context,
                                tree_tail=FLAGS.tree_tail)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
          run = run_icm(examples, task=task, tokenizer=model.tokenizer,
                        scorer_factory=model_scorer_factory(
                            model.config, model.params, scoring),
                        search=search, batch_size=FLAGS.num_examples,
                        workdir=workdir, progress=False)
        wall = time.perf_counter() - t0
        alphas = [b.alpha for b in run.batches]
        labels = np.asarray(run.labels)
        if mode == "exact":
          exact_labels[seed] = labels
        row = dict(task=task_name, n=len(examples), mode=mode,
                   context=FLAGS.context, seed=seed,
                   iterations=FLAGS.iterations, alpha=FLAGS.alpha,
                   alpha_rule=FLAGS.alpha_rule, tree_tail=FLAGS.tree_tail,
                   alpha_used=alphas, wall_s=round(wall, 1),
                   score_calls=sum(b.score_calls for b in run.batches),
                   labels="".join(map(str, labels.tolist())),
                   gold_agreement=float((labels == gold).mean()),
                   same_as_exact=(float((labels == exact_labels[seed]).mean())
                                  if seed in exact_labels else None))
        print(json.dumps(row), flush=True)
        if FLAGS.out:
          with open(FLAGS.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
