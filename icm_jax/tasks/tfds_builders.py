"""TFDS builders for the ICM datasets, stored as ArrayRecord (no TensorFlow).

  icm_truthfulqa: train/test from `manual_dir` (train_truthfulqa.json,
                  test_truthfulqa.json) or, when no manual_dir is given, the
                  copy bundled with the package.
  icm_gsm8k:      `manual_dir`/test_gsm8k.json, split by group (see splits).
  icm_alpaca:     `manual_dir`/test_alpaca.json, split by group.

Records are validated with the built-in task before anything is written. They
keep their fields, with labels stored as 0/1 and `consistency_id` as a string;
optional fields absent from a record are listed in `missing_fields` and
dropped again by `tfds_records`, so a record reads back as it was loaded.
Order is kept (`disable_shuffling=True`). Read them back with
`tfds_records("icm_gsm8k/test", data_dir=...)` or
`load_records("tfds:icm_gsm8k/test", data_dir=...)`; that uses
`builder.as_data_source`, never `as_dataset` (which needs TensorFlow).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from icm_jax.tasks import bundled, splits
from icm_jax.tasks.builtin import get_task
from icm_jax.tasks.records import (DataError, parse_label, read_record_file,
                                   record_error)

_log = logging.getLogger(__name__)

MISSING = "missing_fields"


class _IcmBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared machinery; subclasses declare their schema and source files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ICM paper data (Wen et al. 2025)."}
  TASK = ""               # built-in task that validates the records
  FILES = {}              # split -> file name in the source directory
  TEXT = ()               # text fields
  FLOATS = ()             # float fields (stored as their repr)
  BOOL_LISTS = ()         # lists of bools
  OPTIONAL = ()           # fields some records lack
  DESCRIPTION = ""
  # tfds 4.9.10 derives code_path via `importlib_resources`, a package it only
  # requires on Python < 3.9; naming the file here avoids that import.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord is the format that reads back without TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in self.TEXT}
    # tf.Example floats are float32; the text of a float64 round-trips.
    features.update({name: tfds.features.Text() for name in self.FLOATS})
    features.update({name: tfds.features.Sequence(np.bool_)
                     for name in self.BOOL_LISTS})
    features["consistency_id"] = tfds.features.Text()
    features["label"] = tfds.features.ClassLabel(names=["False", "True"])
    features[MISSING] = tfds.features.Sequence(tfds.features.Text())
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/2506.10139")

  def _source_dir(self, dl_manager) -> str:
    return os.fspath(dl_manager.manual_dir)

  def _split_generators(self, dl_manager):
    folder = self._source_dir(dl_manager)
    return {split: self._generate_examples(records, source)
            for split, (records, source) in self._split_records(folder).items()}

  def _split_records(self, folder: str) -> dict:
    """split -> (validated records, source name for errors)."""
    out = {}
    for split, file_name in self.FILES.items():
      path = os.path.join(folder, file_name)
      if not os.path.exists(path):
        raise DataError(f"{file_name}: not found in {folder}")
      out[split] = (self._validated(read_record_file(path), file_name), file_name)
    return out

  def _validated(self, records: list, source: str) -> list:
    """`records`, after raising DataError (with file indices) if any is bad."""
    get_task(self.TASK).examples(records, source)
    for index, record in enumerate(records):
      self._encode(record, source, index)
    return records

  def _generate_examples(self, records, source):
    for index, record in enumerate(records):
      yield index, self._encode(record, source, index)

  def decode_record(self, example: dict) -> dict:
    """A stored example as the record it was made from (see module doc)."""
    record = _plain(example)
    for name in record.pop(MISSING):
      del record[name]
    for name in self.FLOATS:
      if name in record:
        record[name] = float(record[name])
    return record

  def _encode(self, record: dict, source: str, index: int) -> dict:
    known = set(self.TEXT + self.FLOATS + self.BOOL_LISTS +
                ("consistency_id", "label"))
    unknown = sorted(set(record) - known)
    if unknown:
      raise DataError(f"{source} record {index}: field {unknown[0]!r} is not "
                      f"in the {self.name} schema")
    missing = [f for f in sorted(known) if f not in record]
    required = [f for f in missing if f not in self.OPTIONAL]
    if required:
      raise DataError(f"{source} record {index}: field {required[0]!r} "
                      "missing")
    encoded = {MISSING: missing}
    for names, expected, default in ((self.TEXT, _is_text, ""),
                                     (self.FLOATS, _is_number, 0.0),
                                     (self.BOOL_LISTS, _is_bool_list, [])):
      for name in names:
        value = record.get(name, default)
        if not expected(value):
          raise record_error(source, index, name, f"is {value!r}, expected "
                             f"{expected.__doc__}")
        encoded[name] = repr(float(value)) if names is self.FLOATS else value
    encoded["consistency_id"] = str(record["consistency_id"])
    encoded["label"] = parse_label(record["label"], source, index, "label")
    return encoded


def _is_text(value) -> bool:
  """text"""
  return isinstance(value, str)


def _is_number(value) -> bool:
  """a number"""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bool_list(value) -> bool:
  """a list of booleans"""
  return isinstance(value, list) and all(isinstance(v, bool) for v in value)


class IcmTruthfulqa(_IcmBuilder):
  """ICM's TruthfulQA claims (question, choice, label, consistency_id)."""

  name = "icm_truthfulqa"
  TASK = "truthfulqa"
  FILES = {"train": "train_truthfulqa.json", "test": "test_truthfulqa.json"}
  TEXT = ("question", "choice")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: a directory with train_truthfulqa.json and "
      "test_truthfulqa.json. Without one the bundled copy is used.")
  DESCRIPTION = "TruthfulQA claims as split in the ICM paper."

  def _source_dir(self, dl_manager) -> str:
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # tfds: manual_dir absent or empty
      folder = bundled.bundled_dir("truthfulqa")
      _log.info("icm_truthfulqa: no manual_dir; preparing from the bundled "
                "copy %s", folder)
      return folder


class _SingleFileBuilder(_IcmBuilder, skip_registration=True):
  """A dataset released as one test file: split by whole groups here."""

  SOURCE_FILE = ""

  def _split_records(self, folder: str) -> dict:
    path = os.path.join(folder, self.SOURCE_FILE)
    if not os.path.exists(path):
      raise DataError(f"{self.SOURCE_FILE}: not found in {folder}")
    records = self._validated(read_record_file(path), self.SOURCE_FILE)
    train, test = splits.split_by_group(records, source=self.SOURCE_FILE)
    return {"train": (train, self.SOURCE_FILE + "[train]"),
            "test": (test, self.SOURCE_FILE + "[test]")}


class IcmGsm8k(_SingleFileBuilder):
  """ICM's GSM8K solution-verification data, split by question."""

  name = "icm_gsm8k"
  TASK = "gsm8k"
  SOURCE_FILE = "test_gsm8k.json"
  TEXT = ("question", "answer", "cot", "ref_cot", "ref_answer", "category")
  FLOATS = ("difficulty",)
  OPTIONAL = ("ref_cot", "ref_answer")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "A directory with the ICM paper's test_gsm8k.json.")
  DESCRIPTION = ("LM-written GSM8K solutions labelled correct/incorrect (ICM "
                 "paper); train/test are halves of its test file by question "
                 f"(seed {splits.DEFAULT_SEED}, test fraction "
                 f"{splits.DEFAULT_TEST_FRACTION}).")


class IcmAlpaca(_SingleFileBuilder):
  """ICM's Alpaca pairwise comparisons, split by pair."""

  name = "icm_alpaca"
  TASK = "alpaca"
  SOURCE_FILE = "test_alpaca.json"
  TEXT = ("question", "choice", "choice_2", "hh_type")
  FLOATS = ("confidence",)
  BOOL_LISTS = ("candidate_label",)
  OPTIONAL = ("confidence", "candidate_label")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "A directory with the ICM paper's test_alpaca.json (AlpacaFarm data, "
      "CC BY-NC 4.0).")
  DESCRIPTION = ("AlpacaFarm response pairs, each asked in both orders (ICM "
                 "paper); train/test are halves of its test file by pair "
                 f"(seed {splits.DEFAULT_SEED}, test fraction "
                 f"{splits.DEFAULT_TEST_FRACTION}).")


def tfds_records(spec: str, *, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None,
                 download: bool = True) -> list[dict]:
  """Plain dict records of "<dataset>/<split>", prepared first if needed."""
  name, sep, split = spec.rpartition("/")
  if not sep or not name or not split:
    raise ValueError(f"tfds spec {spec!r} must be '<dataset>/<split>'")
  if manual_dir is not None and not os.path.isdir(manual_dir):
    # Checked here: tfds treats a missing manual_dir like none given, and
    # icm_truthfulqa would then quietly prepare the bundled copy instead.
    raise DataError(f"{spec}: manual_dir {manual_dir!r} is not a directory")
  builder = tfds.builder(name, data_dir=data_dir)
  if download:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
  source = builder.as_data_source(split=split)
  decode = (builder.decode_record if isinstance(builder, _IcmBuilder)
            else _plain)
  return [decode(source[i]) for i in range(len(source))]


def _plain(value):
  """numpy / bytes values as the Python values JSON would give."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (np.ndarray, np.generic)) and not np.ndim(value):
    return _plain(value.item())
  if isinstance(value, (np.ndarray, list, tuple)):
    return [_plain(v) for v in value]
  return value
