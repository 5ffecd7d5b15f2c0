"""Tasks from a config (dict or ml_collections.ConfigDict), no code needed.

Every key below is settable from the command line (`--config.task.KEY=...`,
see configs/custom.py); a key left None keeps the task's default.

A built-in task: {"name": "truthfulqa", ...its options}; any generic key
given beside the name replaces that setting of the built-in task. A new
dataset (the records file is data.train / data.test, not a task key):
  {"name": "mydata",
   "template": "Q: {question}\\nA: {answer}\\nI think this answer is",
   "consistency": "keyed", "key_field": "final_answer",  # or key_from
   "group_field": "consistency_id",  # default; optional with consistency none
   "label_field": "label",  # optional; gold for reporting only
   "id_field": None, "false_word": " False", "true_word": " True",
   "pair_fields": ("choice", "choice_2"),  # key_from="pair_order"
   "strip_newlines": ()}
In `template`, false_word and true_word the two-character escapes \\n and \\t
(as a shell passes them) mean newline and tab. An empty string for a field
key (`--config.task.label_field=`) means "no such field".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from icm_jax.tasks.builtin import TASKS, get_task
from icm_jax.tasks.task import CONSISTENCY_KINDS, KEY_SOURCES, Task

_TEXT_KEYS = ("template", "false_word", "true_word")
_FIELD_KEYS = ("group_field", "key_field", "label_field", "id_field")
_TUPLE_KEYS = ("pair_fields", "strip_newlines")
GENERIC_KEYS = (_TEXT_KEYS + _FIELD_KEYS + _TUPLE_KEYS +
                ("consistency", "key_from"))
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def task_from_config(cfg: Any, prefix: str = "task") -> Task:
  """The task a config describes; errors name the offending key."""
  values = _as_dict(cfg, prefix)
  if "path" in values:
    raise ValueError(f"{prefix}.path is not a task key: pass the records "
                     "file as data.train (and data.test)")
  name = values.pop("name", None) or "custom"
  if not isinstance(name, str):
    raise ValueError(f"{prefix}.name={name!r} must be a non-empty string")
  given = {k: values.pop(k) for k in list(values) if k in GENERIC_KEYS}
  settings = {k: _checked(k, v, prefix) for k, v in given.items()
              if v is not None}
  if name in TASKS:
    options = {k: v for k, v in values.items() if v is not None}
    task = get_task(name, **options)
    try:
      return dataclasses.replace(task, **settings)
    except ValueError as e:
      raise ValueError(f"{prefix}: {e}") from None
  unknown = sorted(values)
  if unknown:
    raise ValueError(f"{prefix}: unknown keys {unknown}; known: "
                     f"{['name', *GENERIC_KEYS]}")
  if "template" not in settings:
    raise ValueError(f"{prefix}.template is not set and {prefix}.name="
                     f"{name!r} is not a built-in task {sorted(TASKS)}")
  try:
    return Task(name=name, **settings)
  except ValueError as e:
    raise ValueError(f"{prefix}: {e}") from None


def _checked(key: str, value: Any, prefix: str) -> Any:
  where = f"{prefix}.{key}={value!r}"
  if key in _TEXT_KEYS:
    if not isinstance(value, str):
      raise ValueError(f"{where} must be a string")
    return _unescape(value)
  if key in _FIELD_KEYS:
    if not isinstance(value, str):
      raise ValueError(f"{where} must be a field name")
    return value or None
  if key in _TUPLE_KEYS:
    if isinstance(value, str):
      value = (value,)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, str) for v in value):
      raise ValueError(f"{where} must be field names, e.g. a,b")
    # --config.task.pair_fields=a,b arrives as ("a,b",).
    return tuple(f.strip() for v in value for f in v.split(",") if f.strip())
  if key == "consistency" and value not in CONSISTENCY_KINDS:
    raise ValueError(f"{where} not in {CONSISTENCY_KINDS}")
  if key == "key_from":
    if value == "":
      return None
    if value not in KEY_SOURCES:
      raise ValueError(f"{where} not in {KEY_SOURCES}")
  return value


def _unescape(text: str) -> str:
  out, i = [], 0
  while i < len(text):
    pair = text[i:i + 2]
    if pair in _ESCAPES:
      out.append(_ESCAPES[pair])
      i += 2
    else:
      out.append(text[i])
      i += 1
  return "".join(out)


def _as_dict(cfg: Any, prefix: str) -> dict:
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{prefix} must be a dict or ConfigDict, got "
                     f"{type(cfg).__name__}")
  return dict(cfg)
