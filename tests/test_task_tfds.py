"""TFDS builders: prepare into ArrayRecord, read back without TensorFlow."""

import os
import sys

import pytest

from icm_jax.tasks import (DataError, bundled_path, get_task, load_records,
                           split_by_group)
from icm_jax.tasks import tfds_builders
from task_data import (normalized, read_json, shared_file, synthetic_alpaca,
                       synthetic_gsm8k, write_json)


def view(examples):
  return [(e.prompt, e.group, e.key, e.gold) for e in examples]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_truthfulqa_from_bundled_copy(data_dir):
  for split in ("train", "test"):
    records = read_json(bundled_path("truthfulqa", split))
    got = load_records(f"tfds:icm_truthfulqa/{split}", data_dir=data_dir)
    assert got == [normalized(r) for r in records]  # same order too
    task = get_task("truthfulqa")
    assert view(task.examples(got, "tfds")) == view(
        task.examples(records, "json"))
  assert "tensorflow" not in sys.modules


def test_truthfulqa_manual_dir_is_used(tmp_path):
  records = read_json(bundled_path("truthfulqa", "test"))
  manual = tmp_path / "manual"
  manual.mkdir()
  write_json(manual, "train_truthfulqa.json", records[:12])
  write_json(manual, "test_truthfulqa.json", records[12:20])
  got = tfds_builders.tfds_records("icm_truthfulqa/train",
                                   data_dir=str(tmp_path / "tfds"),
                                   manual_dir=str(manual))
  assert got == [normalized(r) for r in records[:12]]


@pytest.mark.parametrize("name,make", [("gsm8k", synthetic_gsm8k),
                                       ("alpaca", synthetic_alpaca)])
def test_single_file_datasets_split_by_group(tmp_path, name, make):
  records = make(n_groups=8) if name == "gsm8k" else make(n_pairs=8)
  manual = tmp_path / "manual"
  manual.mkdir()
  write_json(manual, f"test_{name}.json", records)
  _check_round_trip(name, records, str(tmp_path / "tfds"), str(manual))


@pytest.mark.parametrize("name", ["gsm8k", "alpaca"])
def test_real_files_round_trip(data_dir, name):
  path = shared_file(f"test_{name}.json")
  _check_round_trip(name, read_json(path), data_dir, os.path.dirname(path))


def _check_round_trip(name, records, data_dir, manual_dir):
  train, test = split_by_group(records, test_fraction=0.5, seed=0)
  task = get_task(name)
  for split, expected in (("train", train), ("test", test)):
    got = load_records(f"tfds:icm_{name}/{split}", data_dir=data_dir,
                       manual_dir=manual_dir)
    assert got == [normalized(r) for r in expected]
    assert view(task.examples(got, "tfds")) == view(
        task.examples(expected, "json"))
  assert "tensorflow" not in sys.modules


def test_missing_manual_file(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_json(manual, "other.json", [])
  with pytest.raises(DataError, match="test_gsm8k.json: not found"):
    tfds_builders.tfds_records("icm_gsm8k/test", data_dir=str(tmp_path / "d"),
                               manual_dir=str(manual))


def _prepare_from(tmp_path, name, file_name, records):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_json(manual, file_name, records)
  return tfds_builders.tfds_records(f"{name}/test", data_dir=str(tmp_path / "d"),
                                    manual_dir=str(manual))


def test_bad_records_are_not_written(tmp_path):
  records = synthetic_alpaca()
  records[5]["label"] = "maybe"
  with pytest.raises(DataError, match="test_alpaca.json record 5: field 'label'"):
    _prepare_from(tmp_path, "icm_alpaca", "test_alpaca.json", records)


def test_unknown_field_is_not_dropped(tmp_path):
  records = synthetic_gsm8k()
  records[3]["extra"] = "x"
  with pytest.raises(DataError, match="field 'extra' is not in the icm_gsm8k"):
    _prepare_from(tmp_path, "icm_gsm8k", "test_gsm8k.json", records)


def test_bad_spec():
  with pytest.raises(ValueError, match="'<dataset>/<split>'"):
    tfds_builders.tfds_records("icm_gsm8k")


@pytest.mark.parametrize("field,value", [("category", 3), ("difficulty", "0.5"),
                                         ("difficulty", True)])
def test_badly_typed_field(tmp_path, field, value):
  records = synthetic_gsm8k()
  records[6][field] = value
  manual = tmp_path / "manual"
  manual.mkdir()
  write_json(manual, "test_gsm8k.json", records)
  with pytest.raises(DataError,
                     match=f"test_gsm8k.json record 6: field '{field}' is"):
    tfds_builders.tfds_records("icm_gsm8k/test", data_dir=str(tmp_path / "d"),
                               manual_dir=str(manual))


def test_missing_manual_dir_is_an_error_not_the_bundled_copy(tmp_path):
  from icm_jax.tasks import DataError, load_records
  with pytest.raises(DataError, match="no_such_dir"):
    load_records("tfds:icm_truthfulqa/train", data_dir=str(tmp_path / "d"),
                 manual_dir=str(tmp_path / "no_such_dir"))
