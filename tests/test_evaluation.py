"""Evaluation stage: label-word log-probs vs independent references, demo
selection, accuracy reports and plots.

References: a tiny random model run naively (one full concatenated sequence per
query, no cache, no padding) and the real SmolLM2 through transformers/torch on
the whole tokenised text.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax import sharding
from icm_jax.evaluation import (format_table, label_log_probs, method_result,
                                plot_accuracy_bars, plot_search_trajectory,
                                read_metrics, read_report, results_of,
                                select_demonstrations, write_report)
from icm_jax.model import (LlamaConfig, forward, init_params, masks,
                           param_shapes)
from icm_jax.tokenization import ExampleTokens

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=512)
LABEL_SETS = (np.array([1, 5], np.int32), np.array([2, 7], np.int32))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def make_examples(lengths, header=(), sep=(3, 3), seed=0):
  rng = np.random.RandomState(seed)
  prompts = tuple(rng.randint(8, 61, n).astype(np.int32) for n in lengths)
  return ExampleTokens(tuple(f"ex{i}" for i in range(len(lengths))), prompts,
                       np.array([1, 2], np.int32), np.array(sep, np.int32),
                       np.array(header, np.int32), LABEL_SETS)


REF_WIDTH = 128


@jax.jit
def _naive_logits(params, row):
  # Plain causal forward over one row; trailing zeros cannot affect earlier
  # positions of a causal decoder, so one fixed width means one compilation.
  return forward(params, row, masks.default_positions(1, REF_WIDTH),
                 masks.causal_mask(1, REF_WIDTH), config=CFG)


def naive_log_probs(params, sequence, token_sets):
  """One full sequence, no cache; word log-probs after its last token."""
  assert len(sequence) <= REF_WIDTH
  row = np.zeros((1, REF_WIDTH), np.int32)
  row[0, :len(sequence)] = sequence
  logits = _naive_logits(params, jnp.asarray(row))
  logp = np.asarray(jax.nn.log_softmax(logits[0, len(sequence) - 1]),
                    np.float64)
  return tuple(float(np.log(np.exp(logp[s]).sum())) for s in token_sets)


def context_tokens(ex, demos, labels, query):
  seq = list(ex.header)
  for d, y in zip(demos, labels):
    seq += list(ex.prompts[d]) + [int(ex.label_token[y])] + list(ex.separator)
  return seq + list(ex.prompts[query])


# -----------------------------------------------------------------------------
# Tiny random model: cached prefix + padded batches == naive full sequences
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [(), (40, 41)])
def test_tiny_model_matches_naive(params, header):
  lengths = [5, 9, 3, 12, 7, 4, 11, 6, 8]
  ex = make_examples(lengths, header=header, seed=len(header))
  demos, labels = [1, 4, 7], [1, 0, 1]
  queries = [0, 2, 3, 5, 6, 8]
  for use_demos in (False, True):
    d, y = (demos, labels) if use_demos else ([], [])
    lf, lt = label_log_probs(CFG, params, ex, queries, demos=d,
                             demo_labels=y if use_demos else None,
                             batch_size=4, min_seq_len=8)
    assert lf.shape == lt.shape == (len(queries),)
    for k, q in enumerate(queries):
      ref = naive_log_probs(params, context_tokens(ex, d, y, q), LABEL_SETS)
      np.testing.assert_allclose([lf[k], lt[k]], ref, atol=2e-5,
                                 err_msg=f"query {q} demos={use_demos}")


def test_demo_labels_change_the_prediction(params):
  # Guard against a cache that is ignored: flipping demo labels must matter.
  ex = make_examples([6, 6, 6, 6])
  a = label_log_probs(CFG, params, ex, [3], demos=[0, 1, 2],
                      demo_labels=[0, 0, 0])
  b = label_log_probs(CFG, params, ex, [3], demos=[0, 1, 2],
                      demo_labels=[1, 1, 1])
  assert abs(float(a[1][0] - b[1][0])) > 1e-4


def test_one_compilation_per_shape_bucket(params):
  from icm_jax.evaluation import prompting
  rng = np.random.RandomState(4)
  ex = make_examples(list(rng.randint(3, 14, 30)), seed=4)
  kernels = prompting._compiled(CFG, None)
  before = kernels.many_shot._cache_size()
  # 27 queries of lengths 3..13 (one width bucket of 16), 6 batches of 5.
  for labels in ([0, 1, 1], [1, 1, 0]):
    label_log_probs(CFG, params, ex, range(3, 30), demos=[0, 1, 2],
                    demo_labels=labels, batch_size=5, min_seq_len=16)
  assert kernels.many_shot._cache_size() - before == 1


def test_sharded_equals_unsharded(params):
  mesh = sharding.create_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  placed = sharding.shard_params(
      params, sharding.param_shardings(param_shapes(CFG), mesh))
  ex = make_examples([5, 9, 3, 12, 7, 4, 11], seed=3)
  queries = [0, 2, 3, 5, 6]
  for demos, labels in (([], None), ([1, 4], [0, 1])):
    plain = label_log_probs(CFG, params, ex, queries, demos=demos,
                            demo_labels=labels, batch_size=3, min_seq_len=8)
    sharded = label_log_probs(CFG, placed, ex, queries, demos=demos,
                              demo_labels=labels, mesh=mesh, batch_size=3,
                              min_seq_len=8)
    np.testing.assert_allclose(sharded, plain, atol=2e-5)


def test_label_log_probs_errors(params):
  ex = make_examples([5, 9, 3, 12])
  with pytest.raises(ValueError, match="'ex1' is both a demonstration and a query"):
    label_log_probs(CFG, params, ex, [0, 1], demos=[1], demo_labels=[0])
  with pytest.raises(ValueError, match="demo 'ex2': label 2"):
    label_log_probs(CFG, params, ex, [0], demos=[1, 2], demo_labels=[0, 2])
  with pytest.raises(ValueError, match="1 demo_labels for 2 demos"):
    label_log_probs(CFG, params, ex, [0], demos=[1, 2], demo_labels=[0])
  with pytest.raises(ValueError, match="need demo_labels"):
    label_log_probs(CFG, params, ex, [0], demos=[1])
  small = CFG.replace(max_position_embeddings=20)
  # 12-token prompt alone fits 20; with the 5+1+2 token demo 'ex0' it is 20
  # (fits); with 'ex1' (9+1+2) it is 24 > 20.
  label_log_probs(small, params, ex, [3], demos=[0], demo_labels=[1])
  with pytest.raises(ValueError, match=r"query 'ex3': context of 24 tokens"):
    label_log_probs(small, params, ex, [3], demos=[1], demo_labels=[1])
  tiny = CFG.replace(max_position_embeddings=10)
  with pytest.raises(ValueError, match=r"query 'ex3': context of 12 tokens"):
    label_log_probs(tiny, params, ex, [0, 3])


# -----------------------------------------------------------------------------
# select_demonstrations
# -----------------------------------------------------------------------------


def test_select_demonstrations_greedy_prefix():
  ex = make_examples([5, 9, 3, 12, 7, 4], header=(40,), sep=(3,))
  queries = [0, 3]                       # longest query prompt: 12
  candidates = [2, 1, 5, 4]              # demo lengths 5, 11, 6, 9
  base = 1 + 12
  # Exactly fits the first three (base + 22); the fourth would need 9 more.
  assert select_demonstrations(ex, candidates, queries, base + 22) == [2, 1, 5]
  assert select_demonstrations(ex, candidates, queries, base + 22 + 8) == [2, 1, 5]
  assert select_demonstrations(ex, candidates, queries, base + 31) == [2, 1, 5, 4]
  assert select_demonstrations(ex, candidates, queries, base + 21) == [2, 1]
  # Greedy prefix: stops at the first that does not fit, even if a later
  # (shorter) one would.
  assert select_demonstrations(ex, [1, 2], queries, base + 10) == []
  assert select_demonstrations(ex, candidates, queries, base) == []
  with pytest.raises(ValueError, match=r"query 'ex3'.*13 tokens > max_context 12"):
    select_demonstrations(ex, candidates, queries, base - 1)


def test_select_demonstrations_errors():
  ex = make_examples([5, 9, 3])
  with pytest.raises(ValueError, match="no queries"):
    select_demonstrations(ex, [0], [], 100)
  with pytest.raises(ValueError, match="candidate index 7 out of range"):
    select_demonstrations(ex, [7], [0], 100)
  with pytest.raises(TypeError, match="query index"):
    select_demonstrations(ex, [0], ["ex1"], 100)


# -----------------------------------------------------------------------------
# Reports
# -----------------------------------------------------------------------------


def test_method_result_counts():
  rng = np.random.RandomState(0)
  lf, lt = rng.randn(50), rng.randn(50)
  gold = rng.randint(0, 2, 50)
  r = method_result("many_shot_icm", lf, lt, gold, num_demonstrations=7,
                    extra={"seconds": 1.5})
  # Independent count, one example at a time.
  correct = sum(int((t > f) == bool(g)) for f, t, g in zip(lf, lt, gold))
  assert (r.num_correct, r.num_examples) == (correct, 50)
  assert r.accuracy == pytest.approx(correct / 50)
  assert r.predicted_true_fraction == pytest.approx(np.mean(lt > lf))
  assert r.num_demonstrations == 7 and r.extra == {"seconds": 1.5}
  # Perfect and inverted predictors.
  assert method_result("m", -gold, gold - 0.5, gold).accuracy == 1.0
  assert method_result("m", gold - 0.5, -gold, gold).accuracy == 0.0


def test_method_result_errors():
  with pytest.raises(ValueError, match=r"zero_shot: gold label 2 at position 1"):
    method_result("zero_shot", [0, 0, 0], [1, 1, 1], [0, 2, 1])
  with pytest.raises(ValueError, match="differ in length"):
    method_result("m", [0, 0], [1, 1, 1], [0, 1, 1])
  with pytest.raises(ValueError, match="no examples"):
    method_result("m", [], [], [])
  with pytest.raises(ValueError, match="non-finite log-probs at position 0"):
    method_result("m", [np.nan], [0.0], [1])


def test_report_round_trip(tmp_path):
  a = method_result("zero_shot", [0, 1, 0, 1], [1, 0, 0, 2], [1, 0, 1, 1])
  b = method_result("finetune_icm", [0, 0], [1, 1], [1, 1],
                    extra={"steps": np.int64(30)})
  path = str(tmp_path / "out" / "report.json")
  written = write_report(path, [a, b], model="SmolLM2", seed=np.int32(3))
  assert read_report(path) == written
  assert written["model"] == "SmolLM2" and written["seed"] == 3
  assert results_of(written)[0] == a
  assert results_of(written)[1].extra == {"steps": 30}
  assert [r["accuracy"] for r in written["results"]] == [0.75, 1.0]
  assert os.listdir(tmp_path / "out") == ["report.json"]  # no temp left
  table = format_table([a, b]).splitlines()
  assert len(table) == 4
  # method | seeds | consistent accuracy | accuracy | AUC | predicted True |
  # n | demos
  assert table[2].split("|")[1:9] == [" zero_shot ", " - ", " 0.750 ",
                                      " 0.750 ", " 1.000 ", " 0.500 ", " 4 ",
                                      " 0 "]
  assert written["summary"][0]["mean"]["accuracy"] == 0.75
  with pytest.raises(ValueError, match="duplicate"):
    write_report(path, [a, a])
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    read_report(str(tmp_path / "bad.json"))


# -----------------------------------------------------------------------------
# Plots
# -----------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def write_metrics(path, n, gold=True, seed=0):
  rng = np.random.RandomState(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for it in range(n):
      record = {"iteration": it, "U": float(-50 + it + rng.randn()),
                "P": -40.0, "I": 1, "labelled": min(it + 8, 20), "flips": it}
      if gold:
        record["gold_agreement"] = None if it == 0 else float(rng.rand())
      f.write(json.dumps(record) + "\n")


def test_plots_write_png(tmp_path):
  a = method_result("zero_shot", [0, 1, 0, 1], [1, 0, 0, 2], [1, 0, 1, 1])
  b = method_result("many_shot_gold", [0, 0], [1, 1], [1, 1])
  out = plot_accuracy_bars([a, b], str(tmp_path / "plots" / "acc.png"), "t")
  assert out == str(tmp_path / "plots" / "acc.png")
  assert_png(out)
  seeded = [method_result("many_shot_icm", [0, 1], [1, k], [1, 1], seed=k)
            for k in range(3)]
  assert_png(plot_accuracy_bars([a] + seeded, str(tmp_path / "seeds.png"),
                                metric="consistent_accuracy"))
  with pytest.raises(ValueError, match="auc"):
    plot_accuracy_bars([a], str(tmp_path / "x.png"), metric="auc")
  gold_files = [str(tmp_path / f"batch_00{k}" / "metrics.jsonl") for k in (0, 1)]
  for k, p in enumerate(gold_files):
    write_metrics(p, 30 + k, gold=True, seed=k)
  assert_png(plot_search_trajectory(gold_files, str(tmp_path / "traj.png")))
  plain = str(tmp_path / "nogold" / "metrics.jsonl")
  write_metrics(plain, 20, gold=False)
  assert_png(plot_search_trajectory({"run": plain},
                                    str(tmp_path / "traj_nogold.png")))
  assert [r["iteration"] for r in read_metrics(plain)] == list(range(20))


def test_plots_reject_bad_metrics(tmp_path):
  good = str(tmp_path / "good" / "metrics.jsonl")
  write_metrics(good, 5)
  bad = tmp_path / "bad" / "metrics.jsonl"
  bad.parent.mkdir()
  bad.write_text(json.dumps({"iteration": 0, "U": 1.0}) + "\n{oops\n")
  out = str(tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"bad/metrics.jsonl line 2: not valid JSON"):
    plot_search_trajectory([good, str(bad)], out)
  bad.write_text(json.dumps({"iteration": 0}) + "\n")
  with pytest.raises(ValueError, match=r"bad/metrics.jsonl line 1: 'U' missing"):
    plot_search_trajectory([str(bad)], out)
  bad.write_text("\n")
  with pytest.raises(ValueError, match=r"bad/metrics.jsonl is empty"):
    plot_search_trajectory([str(bad)], out)
  with pytest.raises(ValueError, match=r"nothere.jsonl does not exist"):
    plot_search_trajectory([str(tmp_path / "nothere.jsonl")], out)
  assert not os.path.exists(out)


# -----------------------------------------------------------------------------
# Real SmolLM2 vs transformers/torch on the whole tokenised text
# -----------------------------------------------------------------------------


def test_smollm2_matches_transformers(smollm2, torch_smollm2):
  from icm_jax.tasks import get_task, load_examples
  from icm_jax.tasks.bundled import bundled_path
  from icm_jax.tokenization import tokenize_examples
  config, params, tokenizer = smollm2
  torch, reference = torch_smollm2
  examples = load_examples(get_task("truthfulqa"),
                           bundled_path("truthfulqa", "train"))
  # The shortest prompts, so the CPU reference stays fast.
  chosen = sorted(range(len(examples)),
                  key=lambda i: len(examples[i].prompt))[:6]
  prompts = [examples[i].prompt for i in chosen]
  tokens = tokenize_examples(tokenizer, prompts, ids=chosen)
  demos, demo_labels, queries = [0, 1, 2], [1, 0, 1], [3, 4, 5]
  words = (" False", " True")
  settings = (([], []), (demos, demo_labels))
  ours, texts = [], []
  for d, y in settings:
    ours.append(label_log_probs(config, params, tokens, queries, demos=d,
                                demo_labels=y or None, batch_size=2))
    texts += ["".join(prompts[j] + words[label] + "\n\n"
                      for j, label in zip(d, y)) + prompts[q] for q in queries]
  # Reference: each whole text tokenised by the tokenizer, all in one
  # right-padded batch (a causal model's logits at a row's last real token
  # do not depend on what follows it).
  rows = [tokenizer(t)["input_ids"] for t in texts]
  width = max(map(len, rows))
  ids = torch.zeros((len(rows), width), dtype=torch.long)
  attention = torch.zeros((len(rows), width), dtype=torch.long)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = torch.as_tensor(row)
    attention[r, :len(row)] = 1
  with torch.no_grad():
    logits = reference(ids, attention_mask=attention).logits.double()
  for r, row in enumerate(rows):
    logp = torch.log_softmax(logits[r, len(row) - 1], -1)
    ref = [float(torch.logsumexp(logp[torch.as_tensor(s, dtype=torch.long)], 0))
           for s in tokens.label_token_sets]
    setting, k = divmod(r, len(queries))
    np.testing.assert_allclose(
        [ours[setting][0][k], ours[setting][1][k]], ref, atol=1e-3,
        err_msg=f"query {queries[k]} with {len(settings[setting][0])} demos")
  for lf, lt in ours:
    # A real model: the label words carry much of the next-token mass.
    assert np.all(np.logaddexp(lf, lt) > np.log(0.05)), (lf, lt)
  # The demonstrations change the predictions (the prefix is really used).
  assert np.abs(ours[1][1] - ours[0][1]).max() > 0.05
