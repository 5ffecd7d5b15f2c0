"""Tasks from a config (dict or ml_collections.ConfigDict), no code needed.

A built-in task: {"name": "truthfulqa", ...its options}. A new dataset:
  {"name": "mydata", "path": "data.jsonl",
   "template": "Q: {question}\\nA: {answer}\\nI think this answer is",
   "group_field": "consistency_id",      # default
   "consistency": "keyed", "key_field": "final_answer",  # or key_from
   "label_field": "label",  # optional; gold for reporting only
   "id_field": None, "false_word": " False", "true_word": " True"}
`path` is not part of the task; `load_examples(task, cfg["path"])` reads it.
"""

from __future__ import annotations

from typing import Any, Mapping

from icm_jax.tasks.builtin import TASKS, get_task
from icm_jax.tasks.task import CONSISTENCY_KINDS, KEY_SOURCES, Task

_TEXT_KEYS = ("name", "path", "template", "false_word", "true_word")
_FIELD_KEYS = ("group_field", "key_field", "label_field", "id_field")
_TUPLE_KEYS = ("pair_fields", "strip_newlines")
GENERIC_KEYS = (_TEXT_KEYS + _FIELD_KEYS + _TUPLE_KEYS +
                ("consistency", "key_from"))


def task_from_config(cfg: Any, prefix: str = "task") -> Task:
  """The task a config describes; errors name the offending key."""
  values = _as_dict(cfg, prefix)
  name = values.get("name", "custom")
  if not isinstance(name, str) or not name:
    raise ValueError(f"{prefix}.name={name!r} must be a non-empty string")
  if "template" not in values:
    if name not in TASKS:
      raise ValueError(f"{prefix}.template missing and {prefix}.name={name!r} "
                       f"is not a built-in task {sorted(TASKS)}")
    options = {k: v for k, v in values.items() if k not in ("name", "path")}
    return get_task(name, **options)
  unknown = sorted(set(values) - set(GENERIC_KEYS))
  if unknown:
    raise ValueError(f"{prefix}: unknown keys {unknown}; known: "
                     f"{list(GENERIC_KEYS)}")
  for key in _TEXT_KEYS:
    if key in values and not isinstance(values[key], str):
      raise ValueError(f"{prefix}.{key}={values[key]!r} must be a string")
  for key in _FIELD_KEYS:
    value = values.get(key)
    if value is not None and (not isinstance(value, str) or not value):
      raise ValueError(f"{prefix}.{key}={value!r} must be a field name or "
                       "None")
  if values.get("consistency", "none") not in CONSISTENCY_KINDS:
    raise ValueError(f"{prefix}.consistency={values['consistency']!r} not in "
                     f"{CONSISTENCY_KINDS}")
  if values.get("key_from") not in (None,) + KEY_SOURCES:
    raise ValueError(f"{prefix}.key_from={values['key_from']!r} not in "
                     f"{(None,) + KEY_SOURCES}")
  for key in _TUPLE_KEYS:
    if key in values:
      value = values[key]
      if (not isinstance(value, (list, tuple)) or
          not all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"{prefix}.{key}={value!r} must be a list of field "
                         "names")
      values[key] = tuple(value)
  values.pop("path", None)
  values["name"] = name
  return Task(**values)


def _as_dict(cfg: Any, prefix: str) -> dict:
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{prefix} must be a dict or ConfigDict, got "
                     f"{type(cfg).__name__}")
  return dict(cfg)
