"""Task stage: records -> prompts, groups, consistency keys (no gold leaks)."""

import collections
import copy
import dataclasses
import filecmp
import json
import logging
import random

import ml_collections
import pytest

from icm_jax.tasks import (DataError, Task, bundled_path, get_task,
                           load_examples, load_records, split_by_group,
                           task_from_config)
from icm_jax.tasks import templates
from task_data import (read_json, shared_file, synthetic_alpaca,
                       synthetic_gsm8k, write_json)


def by_group(examples):
  groups = collections.defaultdict(list)
  for e in examples:
    groups[e.group].append(e)
  return groups


def view(examples):
  """Everything the search may see: no gold."""
  return [(e.id, e.prompt, e.group, e.key) for e in examples]


# --- built-in tasks on real data -------------------------------------------

@pytest.mark.parametrize("split,n,n_groups", [("train", 2608, 652),
                                              ("test", 1000, 144)])
def test_truthfulqa_bundled(split, n, n_groups):
  path = bundled_path("truthfulqa", split)
  records = read_json(path)
  examples = load_examples(get_task("truthfulqa"), path)
  assert len(examples) == len(records) == n
  assert len(by_group(examples)) == n_groups
  if split == "train":
    assert {len(g) for g in by_group(examples).values()} == {4}
  for e, r in zip(examples, records):
    assert e.prompt == TEMPLATE_TQA.format(q=r["question"], c=r["choice"])
    assert e.group == str(r["consistency_id"])
    assert e.key is None
    assert e.gold == r["label"]
  assert len({e.id for e in examples}) == n


TEMPLATE_TQA = "Question: {q}\nClaim: {c}\nI think this claim is"


@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_truthfulqa_is_the_shared_file(split):
  shared = shared_file(f"{split}_truthfulqa.json")
  assert filecmp.cmp(bundled_path("truthfulqa", split), shared, shallow=False)


def test_truthfulqa_gold_leak_is_explicit_and_logged(caplog):
  path = bundled_path("truthfulqa", "test")
  with caplog.at_level(logging.WARNING):
    leaked = load_examples(
        get_task("truthfulqa", consistency_keys="official_gold_leak"), path)
  assert any(r.levelno == logging.WARNING and "GOLD" in r.getMessage()
             for r in caplog.records)
  assert all(e.key == ("A" if e.gold else "B") for e in leaked)
  assert get_task("truthfulqa", consistency_keys="official_gold_leak"
                  ).consistency == "keyed"
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    load_examples(get_task("truthfulqa"), path)
  assert not caplog.records
  with pytest.raises(ValueError, match="consistency_keys"):
    get_task("truthfulqa", consistency_keys="gold")


def test_gsm8k_real_keys_are_answers():
  path = shared_file("test_gsm8k.json")
  records = read_json(path)
  examples = load_examples(get_task("gsm8k"), path)
  assert len(examples) == len(records) == 2972
  groups = by_group(examples)
  assert len(groups) == 743 and {len(g) for g in groups.values()} == {4}
  for e, r in zip(examples, records):
    assert e.key == r["answer"].strip() and isinstance(e.key, str)
    assert e.prompt.startswith(f"Question: {r['question']}\nClaim: ")
    assert r["cot"] in e.prompt and e.prompt.endswith("I think this claim is")
    assert e.gold == int(bool(r["label"]))
  # Every record has its answer; one (cot "The answer is") has an empty one.
  assert [i for i, e in enumerate(examples) if e.key == ""] == [
      i for i, r in enumerate(records) if not r["answer"].strip()]


def test_alpaca_real_pairs():
  path = shared_file("test_alpaca.json")
  records = read_json(path)
  examples = load_examples(get_task("alpaca"), path)
  assert len(examples) == len(records) == 934
  groups = by_group(examples)
  assert len(groups) == 467
  for members in groups.values():
    assert sorted(e.key for e in members) == ["A>B", "B>A"]
    # The data's pairs are complementary, as "comparative" assumes.
    assert sorted(e.gold for e in members) == [0, 1]
  for e, r in zip(examples, records):
    assert r["choice"].replace("\n", "") in e.prompt
  _assert_pair_keys_label_free(records, "test_alpaca.json")


def test_alpaca_synthetic_pairs():
  records = synthetic_alpaca()
  examples = get_task("alpaca").examples(records, "a.json")
  assert [e.key for e in examples[:2]] == ["A>B", "B>A"]  # "Answer 0a" < "0b"
  assert "\n" not in examples[0].prompt.split("Response 1: ")[1].split(
      "\nResponse 2")[0]
  _assert_pair_keys_label_free(records, "a.json")


def _assert_pair_keys_label_free(records, source):
  task = get_task("alpaca")
  keys = {(r["choice"], r["choice_2"]): e.key
          for r, e in zip(records, task.examples(records, source))}
  shuffled = copy.deepcopy(records)
  random.Random(1).shuffle(shuffled)
  for r in shuffled:
    del r["label"]
  for r, e in zip(shuffled, task.examples(shuffled, source)):
    assert e.key == keys[(r["choice"], r["choice_2"])]
    assert e.gold is None


# --- gold independence -------------------------------------------------------

def _task_records():
  yield "truthfulqa", read_json(bundled_path("truthfulqa", "test"))[:300]
  yield "gsm8k", synthetic_gsm8k()
  yield "alpaca", synthetic_alpaca()


@pytest.mark.parametrize("name,records", list(_task_records()),
                         ids=["truthfulqa", "gsm8k", "alpaca"])
def test_labels_do_not_reach_prompts_groups_keys(name, records):
  task = get_task(name)
  reference = task.examples(records, "x.json")
  no_labels = [{k: v for k, v in r.items() if k != "label"} for r in records]
  labels = [r["label"] for r in records]
  random.Random(0).shuffle(labels)
  shuffled = [dict(r, label=l) for r, l in zip(records, labels)]
  flipped = [dict(r, label=1 - int(bool(r["label"]))) for r in records]
  for variant in (no_labels, shuffled, flipped):
    assert view(task.examples(variant, "x.json")) == view(reference)
  assert all(e.gold is None for e in task.examples(no_labels, "x.json"))


# --- errors -----------------------------------------------------------------

def _gsm8k_without(index, field):
  records = synthetic_gsm8k()
  del records[index][field]
  return records


@pytest.mark.parametrize("label", [2, -1, "yes", "true", 0.5, 1.0, None, []])
def test_bad_label(label):
  records = synthetic_gsm8k()
  records[5]["label"] = label
  with pytest.raises(DataError, match=r"g\.json record 5: field 'label'"):
    get_task("gsm8k").examples(records, "g.json")


@pytest.mark.parametrize("label,gold", [(True, 1), (False, 0), (0, 0), (1, 1),
                                        ("True", 1), ("False", 0), ("0", 0),
                                        ("1", 1)])
def test_accepted_labels(label, gold):
  records = synthetic_gsm8k()
  records[0]["label"] = label
  assert get_task("gsm8k").examples(records, "g.json")[0].gold == gold


@pytest.mark.parametrize("field", ["cot", "question", "answer",
                                   "consistency_id"])
def test_missing_field(field):
  with pytest.raises(DataError,
                     match=f"test_gsm8k.json record 17: field '{field}' missing"):
    get_task("gsm8k").examples(_gsm8k_without(17, field), "test_gsm8k.json")


@pytest.mark.parametrize("value", [None, ["a"], {"a": 1}, True])
def test_non_text_field(value):
  records = synthetic_gsm8k()
  records[3]["cot"] = value
  with pytest.raises(DataError, match="g.json record 3: field 'cot'"):
    get_task("gsm8k").examples(records, "g.json")


@pytest.mark.parametrize("value", [None, "", 1.5, True])
def test_bad_group(value):
  records = synthetic_gsm8k()
  records[2]["consistency_id"] = value
  with pytest.raises(DataError, match="g.json record 2: field 'consistency_id'"):
    get_task("gsm8k").examples(records, "g.json")


def test_template_naming_unknown_field():
  task = Task(name="t", template="Q: {question}\nX: {nosuch}\nI think")
  with pytest.raises(DataError, match="g.json record 0: field 'nosuch' missing"):
    task.examples(synthetic_gsm8k(), "g.json")


@pytest.mark.parametrize("template", ["Q: {}", "Q: {0}", "Q: {q.x}", "Q: {q:>4}",
                                      "Q: {q!r}", "Q: {q} ", ""])
def test_bad_templates(template):
  with pytest.raises(ValueError):
    Task(name="t", template=template)


def test_prompt_ending_in_whitespace():
  task = Task(name="t", template="Q: {question}")
  records = [{"question": "a", "consistency_id": 0},
             {"question": "b \n", "consistency_id": 0}]
  with pytest.raises(DataError, match="t.json record 1: field 'question'"):
    task.examples(records, "t.json")


def test_not_an_object():
  records = synthetic_gsm8k()
  records[4] = ["question", "answer"]
  with pytest.raises(DataError, match="g.json record 4"):
    get_task("gsm8k").examples(records, "g.json")


def test_no_records():
  with pytest.raises(DataError, match="g.json: no records"):
    get_task("gsm8k").examples([], "g.json")


@pytest.mark.parametrize("case", ["three", "one", "not_swapped", "same",
                                  "question"])
def test_bad_alpaca_pairs(case):
  records = synthetic_alpaca()
  if case == "three":
    records.insert(4, dict(records[2]))
    bad = r"record 2: field 'consistency_id' = '1'.*exactly 2 rows.*found 3"
  elif case == "one":
    del records[3]
    bad = r"record 2: field 'consistency_id' = '1'.*found 1"
  elif case == "not_swapped":
    records[3]["choice"] = "something else"
    bad = r"record 3: field 'choice' does not mirror record 2"
  elif case == "same":
    records[2]["choice_2"] = records[2]["choice"]
    records[3]["choice"] = records[3]["choice_2"]
    bad = r"record 3: field 'choice' does not mirror record 2"
  else:
    records[3]["question"] = "Another request"
    bad = r"record 3: field 'question' differs from record 2"
  with pytest.raises(DataError, match="a.json " + bad):
    get_task("alpaca").examples(records, "a.json")


def test_gold_leak_needs_labels():
  records = read_json(bundled_path("truthfulqa", "test"))[:8]
  del records[6]["label"]
  with pytest.raises(DataError, match="t.json record 6: field 'label' missing"):
    get_task("truthfulqa", consistency_keys="official_gold_leak").examples(
        records, "t.json")


def test_duplicate_ids():
  task = Task(name="t", template="Q: {q}", id_field="uid")
  records = [{"q": "a", "uid": "x1", "consistency_id": 0},
             {"q": "b", "uid": "x2", "consistency_id": 0},
             {"q": "c", "uid": "x1", "consistency_id": 1}]
  with pytest.raises(DataError,
                     match=r"u.json record 2: field 'uid' duplicate id 'x1'"):
    task.examples(records, "u.json")
  assert [e.id for e in task.examples(records[:2], "u.json")] == ["x1", "x2"]


# --- files ------------------------------------------------------------------

@pytest.mark.parametrize("name,text,match", [
    ("e.json", "", "e.json: empty file"),
    ("e.json", "  \n", "e.json: empty file"),
    ("e.json", "[]", "e.json: no records"),
    ("e.jsonl", "\n\n", "e.jsonl: empty file"),
    ("o.json", '{"a": 1}', "o.json: expected a JSON list"),
    ("b.json", '[\n{"q": 1},\n{"q": 2,,}\n]', "b.json line 3 column"),
    ("b.jsonl", '{"q": 1}\n{"q": 2}\n{"q": \n', "b.jsonl line 3: invalid JSON"),
    ("n.jsonl", '{"q": 1}\n[1, 2]\n', "n.jsonl record 1: is list"),
    ("x.csv", "q\n1\n", "x.csv: unknown format"),
])
def test_bad_files(tmp_path, name, text, match):
  (tmp_path / name).write_text(text)
  with pytest.raises(DataError, match=match):
    load_records(str(tmp_path / name))


def test_jsonl_equals_json(tmp_path):
  records = synthetic_gsm8k()
  path = tmp_path / "g.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  assert load_records(str(path)) == records
  assert load_records(write_json(tmp_path, "g.json", records)) == records


# --- generic task from config -----------------------------------------------

def test_task_from_config_jsonl(tmp_path):
  rows = [{"uid": f"r{i}", "text": f"claim {i}", "topic": i // 2,
           "final": f" {i % 2} ", "gold": i % 2 == 0} for i in range(6)]
  path = tmp_path / "mine.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  cfg = ml_collections.ConfigDict({
      "name": "mine",
      "template": "Claim: {text}\nThis is", "group_field": "topic",
      "consistency": "keyed", "key_field": "final", "label_field": "gold",
      "id_field": "uid", "true_word": " right", "false_word": " wrong"})
  task = task_from_config(cfg)
  assert (task.true_word, task.false_word) == (" right", " wrong")
  examples = load_examples(task, str(path))
  assert [(e.id, e.prompt, e.group, e.key, e.gold) for e in examples[:2]] == [
      ("r0", "Claim: claim 0\nThis is", "0", "0", 1),
      ("r1", "Claim: claim 1\nThis is", "0", "1", 0)]


def test_task_from_config_builtin_and_pairs():
  assert task_from_config({"name": "gsm8k"}) == get_task("gsm8k")
  assert task_from_config(
      {"name": "truthfulqa", "consistency_keys": "official_gold_leak"}
  ) == get_task("truthfulqa", consistency_keys="official_gold_leak")
  task = task_from_config({"template": templates.ALPACA,
                           "consistency": "comparative",
                           "key_from": "pair_order",
                           "strip_newlines": ["choice", "choice_2"]})
  records = synthetic_alpaca()
  assert view(task.examples(records, "a")) == view(
      get_task("alpaca").examples(records, "a"))


def test_every_generic_key_set_as_flags_would_set_it():
  """Values as absl/ml_collections pass them: escapes unexpanded, tuples as
  one comma-joined string, "" for "no such field", None for "unset"."""
  task = task_from_config({
      "name": "custom", "template": "Claim: {claim}\\nI think this claim is",
      "consistency": "none", "group_field": None, "key_field": None,
      "key_from": None, "label_field": "", "id_field": "uid",
      "false_word": " no", "true_word": " yes", "pair_fields": ("a,b",),
      "strip_newlines": ("claim",)})
  assert task == Task(name="custom", template="Claim: {claim}\nI think this "
                      "claim is", label_field=None, id_field="uid",
                      false_word=" no", true_word=" yes", pair_fields=("a", "b"),
                      strip_newlines=("claim",))
  # A generic key beside a built-in name replaces that setting only.
  sentiment = task_from_config({"name": "sentiment", "true_word": " Yes",
                                "template": None})
  assert sentiment == dataclasses.replace(get_task("sentiment"),
                                          true_word=" Yes")


def test_group_field_is_optional_without_consistency():
  task = Task(name="t", template="Claim: {claim}\nTrue?")
  records = [{"claim": "a", "label": 1}, {"claim": "b", "consistency_id": 5},
             {"claim": "c", "consistency_id": 5}]
  examples = task.examples(records, "f.jsonl")
  assert [e.group for e in examples] == ["f.jsonl:0", "5", "5"]
  alone = Task(name="t", template="Claim: {claim}\nTrue?", group_field=None)
  assert [e.group for e in alone.examples(records, "f")] == ["f:0", "f:1",
                                                             "f:2"]
  keyed = Task(name="t", template="{claim}", consistency="keyed",
               key_field="claim")
  with pytest.raises(DataError, match=r"f record 0: field 'consistency_id' "
                     "missing"):
    keyed.examples(records, "f")


@pytest.mark.parametrize("cfg,match", [
    ({"template": "Q: {q}", "consistency": "foo"},
     r"task.consistency='foo' not in \('none', 'keyed', 'comparative'\)"),
    ({"template": "Q: {q}", "colour": 1}, r"task: unknown keys \['colour'\]"),
    ({"template": "Q: {q}", "key_field": 3}, r"task.key_field=3"),
    ({"template": 7}, r"task.template=7 must be a string"),
    ({"template": "Q: {q}", "key_from": "labels"}, r"task.key_from='labels'"),
    ({"template": "Q: {q}", "consistency": "keyed"}, "needs key_field"),
    ({"template": "Q: {q}", "key_field": "k"}, "consistency 'none' takes no"),
    ({"template": "Q: {q}", "strip_newlines": [3]}, "task.strip_newlines"),
    ({"name": "nosuch"}, r"task.template is not set and task.name='nosuch'"),
    ({"name": "gsm8k", "path": "x"}, r"task.path is not a task key: pass "
     "the records file as data.train"),
    ({"name": "sentiment", "consistency": "none"},
     "consistency 'none' takes no keys"),
    ({"template": "Q: {q}", "consistency": "keyed", "key_field": "k",
      "group_field": ""}, "needs group_field"),
    ({"name": "gsm8k", "colour": 1}, r"task 'gsm8k': bad options"),
    ("gsm8k", "must be a dict"),
])
def test_task_from_config_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    task_from_config(cfg)


# --- splits -----------------------------------------------------------------

def test_split_by_group():
  examples = load_examples(get_task("truthfulqa"),
                           bundled_path("truthfulqa", "train"))
  train, test = split_by_group(examples)
  groups = lambda xs: {e.group for e in xs}
  assert not groups(train) & groups(test)
  assert len(train) + len(test) == len(examples)
  assert sorted(map(id, train + test)) == sorted(map(id, examples))
  assert len(groups(test)) == round(0.5 * 652)
  # Order within each split is the input order.
  position = {id(e): i for i, e in enumerate(examples)}
  assert [position[id(e)] for e in test] == sorted(position[id(e)] for e in test)
  # Deterministic, seed-dependent, independent of input order.
  assert split_by_group(examples, seed=0) == (train, test)
  assert groups(split_by_group(examples, seed=1)[1]) != groups(test)
  reversed_test = split_by_group(examples[::-1])[1]
  assert groups(reversed_test) == groups(test)
  # Records split exactly as their examples.
  records = read_json(bundled_path("truthfulqa", "train"))
  r_train, r_test = split_by_group(records, test_fraction=0.25, seed=3)
  e_train, e_test = split_by_group(examples, test_fraction=0.25, seed=3)
  assert [str(r["consistency_id"]) for r in r_test] == [e.group for e in e_test]
  assert len({e.group for e in e_test}) == round(0.25 * 652)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.01])
def test_split_by_group_rejects_empty_splits(fraction):
  with pytest.raises(ValueError):
    split_by_group(synthetic_gsm8k(n_groups=6), test_fraction=fraction)


# --- tokenization of every built-in task's prompts --------------------------

@pytest.mark.parametrize("name,file", [
    ("truthfulqa", None), ("gsm8k", "test_gsm8k.json"),
    ("alpaca", "test_alpaca.json")])
def test_prompts_tokenize_cleanly(smollm2_tokenizer, name, file):
  from icm_jax.tokenization import LabelWords, tokenize_examples
  path = bundled_path("truthfulqa", "train") if file is None else shared_file(
      file)
  task = get_task(name)
  examples = load_examples(task, path)
  # A few hundred, spread over the file.
  sample = examples[::max(1, len(examples) // 300)]
  pieces = tokenize_examples(
      smollm2_tokenizer, [e.prompt for e in sample], ids=[e.id for e in sample],
      words=LabelWords(false=task.false_word, true=task.true_word))
  assert pieces.num_examples == len(sample) >= 300
  assert list(pieces.label_token) == [4178, 3635]  # " False", " True"


def test_task_stage_imports_no_later_stage():
  import ast
  import pathlib
  import icm_jax.tasks
  later = ("icm_jax.tokenization", "icm_jax.scoring", "icm_jax.search")
  folder = pathlib.Path(icm_jax.tasks.__file__).parent
  for path in folder.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [f"{node.module}.{a.name}" for a in node.names]
               if isinstance(node, ast.ImportFrom) else [])
      assert not [n for n in names if n.startswith(later)], path.name


def test_task_modules_import_only_layers_below_them():
  """records -> task -> builtin -> tfds_builders -> sources: no module of
  the task layer imports one above it (even inside a function)."""
  import ast
  import icm_jax.tasks as package
  import os
  order = ["records", "splits", "templates", "task", "builtin", "config",
           "bundled", "tfds_builders", "sources"]
  layer = {name: i for i, name in enumerate(order)}
  folder = os.path.dirname(package.__file__)
  for name in order:
    tree = ast.parse(open(os.path.join(folder, name + ".py")).read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        parts = node.module.split(".")
        if parts[:2] == ["icm_jax", "tasks"]:
          imported |= ({parts[2]} if len(parts) > 2 else
                       {a.name for a in node.names})
    above = sorted(m for m in imported if layer.get(m, -1) > layer[name])
    assert not above, f"tasks/{name}.py imports {above} from above it"
