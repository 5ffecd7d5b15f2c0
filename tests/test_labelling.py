"""run_icm: task examples → token batches → scorer → search, end to end."""

import json
import os
import sys

import numpy as np
import pytest

from icm_jax.labelling import model_scorer_factory, run_icm
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.search import SearchConfig
from icm_jax.tasks import bundled_path, get_task, load_records
from icm_jax.tokenization import LabelWords, tokenize_examples

sys.path.insert(0, os.path.dirname(__file__))
from planted import PlantedScorer  # noqa: E402


def truthfulqa_records(n):
  return load_records(bundled_path("truthfulqa", "train"))[:n]


def planted_factory(truth_by_prompt):
  """A planted scorer that 'knows' each claim's truth from its prompt text,
  the way an LM would: independent of the records' label field."""
  def build(tokens, examples):
    del tokens
    truth = [truth_by_prompt[e.prompt] for e in examples]
    return PlantedScorer(truth, noise=0.6, seed=len(examples))
  return build


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("alpha_rule", ["fixed", "step_spread"])
def test_gold_labels_never_reach_the_search(tmp_path, smollm2_tokenizer,
                                            alpha_rule):
  """Gold deleted or shuffled: the same search, step for step, the
  step_spread alpha included (it must be computed without gold)."""
  task = get_task("truthfulqa")
  records = truthfulqa_records(64)
  truth = {e.prompt: e.gold for e in task.examples(records, "train.json")}
  rng = np.random.default_rng(0)
  shuffled_labels = rng.permutation([r["label"] for r in records])
  variants = {
      "gold": records,
      "no_labels": [{k: v for k, v in r.items() if k != "label"}
                    for r in records],
      "shuffled": [dict(r, label=int(l)) for r, l in zip(records,
                                                          shuffled_labels)],
  }
  runs = {}
  for name, recs in variants.items():
    examples = task.examples(recs, "train.json")
    runs[name] = run_icm(
        examples, task=task, tokenizer=smollm2_tokenizer,
        scorer_factory=planted_factory(truth),
        search=SearchConfig(max_iterations=150, seed=5,
                            alpha_rule=alpha_rule), batch_size=32,
        workdir=str(tmp_path / name), progress=False)
  assert len(runs["gold"].batches) == 2

  def trajectory(name):
    out = []
    for b in range(2):
      for m in read_jsonl(tmp_path / name / f"batch_{b:03d}" / "metrics.jsonl"):
        m.pop("gold_agreement", None)
        out.append(m)
    return out
  alphas = [b.alpha for b in runs["gold"].batches]
  if alpha_rule == "fixed":
    assert alphas == [50.0, 50.0]
  else:
    assert all(a != 50.0 for a in alphas)
  for name in ("no_labels", "shuffled"):
    assert [b.alpha for b in runs[name].batches] == alphas
    assert np.array_equal(runs[name].labels, runs["gold"].labels)
    assert trajectory(name) == trajectory("gold")
  # Gold shows up only in the report, and only when there is gold.
  assert runs["no_labels"].gold_agreement is None
  assert runs["gold"].gold_agreement > 0.8
  metrics = read_jsonl(tmp_path / "gold" / "batch_000" / "metrics.jsonl")
  assert all("gold_agreement" in m for m in metrics)


@pytest.mark.parametrize("mode,n,iterations", [("parallel", 16, 8),
                                               ("exact", 8, 5)])
def test_icm_on_smollm2_end_to_end(tmp_path, smollm2, mode, n, iterations):
  config, params, tokenizer = smollm2
  task = get_task("truthfulqa")
  examples = task.examples(truthfulqa_records(n), "train_truthfulqa.json")
  scoring = ScoringConfig(mode=mode)
  search = SearchConfig(max_iterations=iterations, initial_size=4,
                        checkpoint_every=2)
  run = run_icm(examples, task=task, tokenizer=tokenizer,
                scorer_factory=model_scorer_factory(config, params, scoring),
                search=search, batch_size=n, workdir=str(tmp_path),
                context_length=config.max_position_embeddings, progress=False)
  labels = read_jsonl(tmp_path / "labels.jsonl")
  assert [r["id"] for r in labels] == [e.id for e in examples]
  assert [r["label"] for r in labels] == [None if l < 0 else int(l)
                                          for l in run.labels]
  assert all(np.isfinite(r["log_odds"]) for r in labels)
  metrics = read_jsonl(tmp_path / "batch_000" / "metrics.jsonl")
  assert [m["iteration"] for m in metrics] == list(range(iterations + 1))
  for m in metrics:
    assert m["U"] == pytest.approx(50 * m["P"] - m["I"])
    assert m["I"] == 0  # TruthfulQA has no key-based consistency by default
    assert 4 <= m["labelled"] <= n
  assert metrics[-1]["labelled"] == int((run.labels >= 0).sum())
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["batches"][0]["iterations"] == iterations
  # The final scores are the LOO scores of the final labels: recompute them
  # with a fresh scorer.
  tokens = tokenize_examples(tokenizer, [e.prompt for e in examples],
                             ids=[e.id for e in examples], words=LabelWords())
  fresh = LOOScorer(config, params, tokens, scoring)
  labelled = run.labels >= 0
  expect = fresh.score(run.labels).s
  np.testing.assert_allclose(run.scores[labelled], expect[labelled],
                             rtol=1e-5, atol=1e-5)
  by_id = {r["id"]: r for r in read_jsonl(tmp_path / "batch_000" /
                                          "labels.jsonl")}
  for e, s in zip(examples, run.scores):
    assert by_id[e.id]["log_odds"] == pytest.approx(float(s), abs=1e-6)
