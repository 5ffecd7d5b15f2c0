"""Records (plain dicts read from JSON / JSONL) and the examples made from them.

Every problem with the data raises `DataError` naming the file, the record
index and the field; nothing is skipped or coerced silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from icm_jax import storage


class DataError(ValueError):
  """Bad input data; the message names the file, record index and field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One claim to label.

  `gold` is the dataset's 0/1 label when the record has one; it is for
  reporting only and must never reach the search.
  """

  id: str              # stable unique id: "<source>:<record index>" or id field
  prompt: str          # rendered template, no trailing whitespace
  group: str           # consistency group
  key: Optional[str]   # consistency key; None when the task has no consistency
  gold: Optional[int]  # 0/1 gold label, or None when the record has none
  # The source record's fields, written next to the label (labels.jsonl);
  # not part of equality (two examples are the same claim, whatever else).
  record: Mapping = dataclasses.field(default_factory=dict, compare=False,
                                      repr=False)


def record_error(source: str, index: int, field: str, problem: str) -> DataError:
  return DataError(f"{source} record {index}: field {field!r} {problem}")


def get_field(record: Mapping, field: str, source: str, index: int) -> Any:
  """record[field], or DataError naming the record when it is missing."""
  if field not in record:
    raise record_error(source, index, field, "missing")
  return record[field]


def text_field(record: Mapping, field: str, source: str, index: int) -> str:
  """A field used as text: str, or an int/float rendered with str()."""
  value = get_field(record, field, source, index)
  # bool is an int subclass, but "True" in a prompt is almost surely a mistake.
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise record_error(source, index, field,
                       f"is {type(value).__name__} {value!r}, expected text")
  return str(value)


def parse_label(value: Any, source: str, index: int, field: str) -> int:
  """0/1 from a bool, the ints 0/1, or exactly "True"/"False"/"0"/"1"."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int) and value in (0, 1):
    return value
  if isinstance(value, str) and value in _LABEL_STRINGS:
    return _LABEL_STRINGS[value]
  raise record_error(source, index, field,
                     f"is {value!r}; labels must be True/False, 0/1, or the "
                     "strings 'True'/'False'/'0'/'1'")


_LABEL_STRINGS = {"True": 1, "False": 0, "1": 1, "0": 0}


def group_value(record: Mapping, field: str, source: str, index: int) -> str:
  """A consistency group id (int or non-empty str) as a string."""
  value = get_field(record, field, source, index)
  if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
    raise record_error(source, index, field,
                       f"is {value!r}; a group id must be an int or a "
                       "non-empty string")
  return str(value)


def read_record_file(path: str) -> list[dict]:
  """Records from a .json file (a list of objects) or .jsonl (one per line),
  local or at a URL (gs://...)."""
  path = os.fspath(path)
  name = storage.basename(path)
  if not storage.exists(path):
    raise DataError(f"{path}: no such file")
  if path.endswith(".jsonl"):
    records = _read_jsonl(path, name)
  elif path.endswith(".json"):
    records = _read_json(path, name)
  else:
    raise DataError(f"{name}: unknown format; expected a .json or .jsonl file")
  if not records:
    raise DataError(f"{name}: no records")
  for index, record in enumerate(records):
    if not isinstance(record, dict):
      raise DataError(f"{name} record {index}: is {type(record).__name__}, "
                      "expected an object")
  return records


def _read_json(path: str, name: str) -> list:
  text = _read_text(path, name)
  if not text.strip():
    raise DataError(f"{name}: empty file")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{name} line {e.lineno} column {e.colno}: invalid JSON "
                    f"({e.msg})") from None
  if not isinstance(data, list):
    raise DataError(f"{name}: expected a JSON list of records, got "
                    f"{type(data).__name__}")
  return data


def _read_jsonl(path: str, name: str) -> list:
  records = []
  for line_number, line in enumerate(_read_text(path, name).splitlines(), 1):
    if not line.strip():
      continue  # blank lines separate nothing; they hold no record
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise DataError(f"{name} line {line_number}: invalid JSON ({e.msg})"
                      ) from None
  if not records:
    raise DataError(f"{name}: empty file")
  return records


def _read_text(path: str, name: str) -> str:
  try:
    return storage.read_text(path)
  except UnicodeDecodeError as e:
    raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})"
                    ) from None
