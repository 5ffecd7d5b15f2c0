"""Train label accuracy (the demo's headline) and the inverted-gold control:
hand counts, brute force over every consistent labelling for the chance
level, and the eval stage's own demonstrations for the control row."""

import dataclasses
import itertools

import numpy as np
import pytest

from conftest import shipped_config, smollm2_gguf_path
from icm_jax.evaluation.label_accuracy import (chance_agreement, label_row,
                                               separation)
from icm_jax.evaluation.report import MethodResult
from icm_jax.search.consistency import Consistency


def test_label_accuracy_is_the_hand_count_over_labelled_claims():
  row = label_row("icm", [1, 0, None, 1, 0, 1], [1, 1, 0, 1, 0, 0], seed=3)
  # Labelled: claims 0, 1, 3, 4, 5; right: 0, 3, 4.
  assert (row.num_correct, row.num_examples) == (3, 5)
  assert row.accuracy == 0.6 and row.seed == 3
  assert row.extra["unlabelled"] == 1
  assert row.predicted_true_fraction == 0.6
  with pytest.raises(ValueError, match="no train claim is labelled"):
    label_row("icm", [None, None], [0, 1])


@pytest.mark.parametrize("kind,groups,keys", [
    # Pairs asked both ways, one one-key group.
    ("comparative", ["a", "a", "b", "b", "c", "d", "d"],
     ["x", "y", "u", "v", "w", "p", "q"]),
    # GSM8K-like: answers to one question, two with the same value.
    ("keyed", ["q1", "q1", "q1", "q1", "q2", "q2", "q3"],
     ["5", "7", "5", "9", "1", "2", "4"]),
    ("none", ["a", "b", "c", "d", "e"], [None] * 5),
])
def test_chance_level_is_the_mean_over_every_consistent_labelling(
    kind, groups, keys):
  rule = Consistency.build(groups, keys, kind)
  rng = np.random.default_rng(0)
  for _ in range(3):
    gold = rng.integers(0, 2, len(groups))
    every = np.array(list(itertools.product([0, 1], repeat=len(groups))))
    consistent = every[rule.count(every) == 0]
    expected = np.mean((consistent == gold).mean(axis=1))
    assert chance_agreement(gold, groups, keys, kind) == pytest.approx(
        expected, abs=1e-12)


def _result(method, accuracy, n=64):
  return MethodResult(method, accuracy, n, int(accuracy * n), 0.5,
                      consistent_accuracy=accuracy)


def test_separation_says_when_gold_and_inverted_are_within_noise():
  # 2 SE of a difference at 0.75 / 0.25 on 64 claims is 0.153.
  far = separation(_result("g", 0.75), _result("i", 0.25), "accuracy")
  assert far["separates"] and "separates gold from inverted" in far[
      "statement"]
  near = separation(_result("g", 0.70), _result("i", 0.62), "accuracy")
  assert not near["separates"]
  assert "does not separate" in near["statement"]
  assert "within noise" in near["statement"]
  wrong_way = separation(_result("g", 0.25), _result("i", 0.75), "accuracy")
  assert not wrong_way["separates"]
  assert "inverted labels score higher" in wrong_way["statement"]
  assert near["two_se"] == pytest.approx(
      2 * np.sqrt((0.7 * 0.3 + 0.62 * 0.38) / 64))


@pytest.mark.skipif(smollm2_gguf_path() is None,
                    reason="the tiny config uses SmolLM2's tokenizer")
def test_control_row_is_shown_exactly_the_inverted_gold(monkeypatch,
                                                        tmp_path):
  """The eval stage's many_shot_inverted demonstrations are the gold ones,
  every label flipped (not gold, not coin flips); the label accuracy rows
  cover coin flips per seed and zero-shot; no model weights needed (the
  scorer is replaced by a recorder)."""
  from icm_jax.pipeline import eval_stage
  from icm_jax.pipeline.inputs import load_inputs, load_model_for_run
  from icm_jax.run_config import parse_config
  from icm_jax.sharding import create_mesh

  config = shipped_config("tiny")
  config.task.name = "sentiment"
  config.seeds = "0,1"
  config.eval.methods = ("many_shot_gold,many_shot_inverted,many_shot_random,"
                         "finetune_gold,finetune_inverted")
  cfg = parse_config(config)
  inputs = load_inputs(cfg)
  mesh = create_mesh(cfg.mesh)
  model = load_model_for_run(cfg, mesh, inputs, load_weights=False)
  calls = []

  def recorder(model_config, params, tokens, queries, *, demos=(),
               demo_labels=None, **kw):
    calls.append((list(demos), None if demo_labels is None else
                  [int(l) for l in demo_labels], len(queries)))
    return np.zeros(len(queries)), np.full(len(queries), 0.1)

  monkeypatch.setattr(eval_stage, "label_log_probs", recorder)
  sources = []

  def finetuned(source, seed):
    sources.append((source, seed))
    return {"fine-tuned on": source}
  report = eval_stage.run_eval_stage(cfg, inputs, model, mesh, str(tmp_path),
                                     None, finetuned, write=True)
  assert sources == [("gold", None), ("inverted", None)]
  (demos, gold, _), (same, inverted, _) = calls[:2]
  assert same == demos and len(demos) > 4
  assert gold == [inputs.train[d].gold for d in demos]
  assert inverted == [1 - g for g in gold]
  coins = [labels for _, labels, _ in calls[2:4]]
  assert all(c != inverted for c in coins)
  rows = {(r["method"], r["seed"]) for r in
          report["label_accuracy"]["results"]}
  assert rows == {("coin_flips", 0), ("coin_flips", 1),
                  ("zero_shot_consistent", None)}
  assert report["label_accuracy"]["chance_random_consistent"] == 0.5
  # Both rows score alike under the recorder: within noise, and said so.
  assert report["separation"]["separates"] is False
  assert report["separation"]["statement"].startswith("many-shot")
  assert report["separation_finetune"]["separates"] is False
  assert report["separation_finetune"]["statement"].startswith("fine-tuned")
  assert (tmp_path / "label_accuracy.png").exists()


def test_finetune_inverted_trains_on_exactly_the_flipped_gold():
  """The fine-tuning control's targets: every gold label flipped, over the
  same claims gold trains on (not gold, not coin flips)."""
  from icm_jax.pipeline.train_stage import training_labels
  from icm_jax.tasks import bundled_path, get_task, load_examples

  train = load_examples(get_task("sentiment"),
                        bundled_path("sentiment", "train"))[:24]
  train[3] = dataclasses.replace(train[3], gold=None)  # no gold: left out
  gold_examples, gold = training_labels("gold", train, None, seed=0)
  inv_examples, inverted = training_labels("inverted", train, None, seed=0)
  assert [e.id for e in inv_examples] == [e.id for e in gold_examples]
  assert len(gold_examples) == 23
  np.testing.assert_array_equal(inverted, 1 - gold)
  _, coins = training_labels("random", train, None, seed=0)
  assert not np.array_equal(inverted[:23], coins[:23])
