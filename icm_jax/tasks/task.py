"""A task: how records become prompts, consistency groups and keys.

Consistency kinds (between two examples of the same group):
  "none":        no constraint; every key is None.
  "keyed":       different keys cannot both be True; equal keys must agree.
  "comparative": as "keyed", and different keys cannot both be False either
                 (exactly one of "A>B" / "B>A" holds).

Keys come from a record field (`key_field`) or, with `key_from`, from
  "pair_order":      each group is one comparison asked both ways (two rows
                     with the pair fields swapped); the row whose pair sorts
                     first gets key "A>B", its twin "B>A". Label-free.
  "gold_label_leak": "A" if the gold label is 1 else "B", as the official ICM
                     code does for TruthfulQA. The keys then encode the
                     answers, so results are NOT unsupervised; logged loudly.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import string
from typing import Mapping, Optional, Sequence

from icm_jax.tasks.records import (DataError, Example, group_value,
                                   parse_label, record_error, text_field)

CONSISTENCY_KINDS = ("none", "keyed", "comparative")
KEY_SOURCES = ("pair_order", "gold_label_leak")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
  """Turns records into `Example`s.

  `template` is a str.format string over record fields (plain `{name}` only)
  that ends without whitespace; the label words carry their leading space.
  `strip_newlines` names fields whose "\\n" are removed before rendering.
  `label_field` is read only into `Example.gold` (absent field: gold None),
  except with `key_from="gold_label_leak"`. With consistency "none" the
  group field is optional (`group_field=None`, or absent from a record):
  such a record is a group of its own.
  """

  name: str
  template: str
  false_word: str = " False"
  true_word: str = " True"
  consistency: str = "none"
  group_field: Optional[str] = "consistency_id"
  key_field: Optional[str] = None
  key_from: Optional[str] = None
  label_field: Optional[str] = "label"
  id_field: Optional[str] = None
  pair_fields: tuple = ("choice", "choice_2")
  strip_newlines: tuple = ()

  def __post_init__(self):
    if self.consistency not in CONSISTENCY_KINDS:
      raise ValueError(f"task {self.name!r}: consistency {self.consistency!r} "
                       f"not in {CONSISTENCY_KINDS}")
    if self.key_from is not None and self.key_from not in KEY_SOURCES:
      raise ValueError(f"task {self.name!r}: key_from {self.key_from!r} not "
                       f"in {KEY_SOURCES}")
    has_key = self.key_field is not None or self.key_from is not None
    if self.key_field is not None and self.key_from is not None:
      raise ValueError(f"task {self.name!r}: set key_field or key_from, "
                       "not both")
    if self.consistency == "none" and has_key:
      raise ValueError(f"task {self.name!r}: consistency 'none' takes no keys "
                       "(key_field/key_from)")
    if self.consistency != "none" and not has_key:
      raise ValueError(f"task {self.name!r}: consistency "
                       f"{self.consistency!r} needs key_field or key_from")
    if self.consistency != "none" and self.group_field is None:
      raise ValueError(f"task {self.name!r}: consistency "
                       f"{self.consistency!r} needs group_field")
    if self.key_from == "gold_label_leak" and self.label_field is None:
      raise ValueError(f"task {self.name!r}: key_from 'gold_label_leak' needs "
                       "label_field")
    if self.key_from == "pair_order" and len(self.pair_fields) != 2:
      raise ValueError(f"task {self.name!r}: pair_fields must name two fields")
    if not self.template or self.template != self.template.rstrip():
      raise ValueError(
          f"task {self.name!r}: template must be non-empty and end without "
          "whitespace (the label words carry the leading space)")
    for word in (self.false_word, self.true_word):
      if not word.strip():
        raise ValueError(f"task {self.name!r}: empty label word {word!r}")
    self.template_fields  # validates the template's fields

  @property
  def template_fields(self) -> tuple:
    """The record fields the template names, in order of first use."""
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(self.template):
      if name is None:
        continue
      if not name.isidentifier() or spec or conversion:
        raise ValueError(
            f"task {self.name!r}: template field {{{name}"
            f"{'!' + conversion if conversion else ''}"
            f"{':' + spec if spec else ''}}} is not a plain {{field_name}}")
      if name not in fields:
        fields.append(name)
    return tuple(fields)

  def examples(self, records: Sequence[Mapping], source: str) -> list[Example]:
    """One `Example` per record, in record order; `source` names the file."""
    if not records:
      raise DataError(f"{source}: no records")
    if self.key_from == "gold_label_leak":
      _log.warning(
          "task %r: consistency keys are derived from the GOLD labels of %s "
          "(official ICM behaviour); they encode the answers, so results are "
          "not unsupervised", self.name, source)
    rows = []
    for index, record in enumerate(records):
      if not isinstance(record, Mapping):
        raise DataError(f"{source} record {index}: is "
                        f"{type(record).__name__}, expected an object")
      rows.append(self._row(record, source, index))
    if self.key_from == "pair_order":
      keys = self._pair_order_keys(records, rows, source)
      rows = [dataclasses.replace(r, key=k) for r, k in zip(rows, keys)]
    _check_unique_ids(rows, source, self.id_field)
    return rows

  def _row(self, record: Mapping, source: str, index: int) -> Example:
    values = {}
    for field in self.template_fields:
      value = text_field(record, field, source, index)
      values[field] = (value.replace("\n", "") if field in self.strip_newlines
                       else value)
    prompt = self.template.format(**values)
    if prompt != prompt.rstrip():
      raise record_error(source, index, self.template_fields[-1],
                         "ends the prompt with whitespace")
    gold = None
    if self.label_field is not None and self.label_field in record:
      gold = parse_label(record[self.label_field], source, index,
                         self.label_field)
    key = None
    if self.key_field is not None:
      key = text_field(record, self.key_field, source, index).strip()
    elif self.key_from == "gold_label_leak":
      if gold is None:
        raise record_error(source, index, self.label_field,
                           "missing (key_from='gold_label_leak' needs it)")
      key = "A" if gold else "B"
    if self.id_field is not None:
      example_id = text_field(record, self.id_field, source, index)
    else:
      example_id = f"{source}:{index}"
    if self.consistency == "none" and (self.group_field is None or
                                       self.group_field not in record):
      group = example_id  # no constraint between records: a group each
    else:
      group = group_value(record, self.group_field, source, index)
    return Example(id=example_id, prompt=prompt, group=group, key=key,
                   gold=gold, record=dict(record))

  def _pair_order_keys(self, records, rows, source) -> list:
    """"A>B"/"B>A" per row from the order of the pair fields (no labels)."""
    first, second = self.pair_fields
    members = collections.defaultdict(list)
    for index, row in enumerate(rows):
      members[row.group].append(index)
    keys = [None] * len(rows)
    for group, indices in members.items():
      if len(indices) != 2:
        raise record_error(
            source, indices[0], self.group_field,
            f"= {group!r}: a pair_order group must be exactly 2 rows (one "
            f"comparison asked both ways), found {len(indices)}")
      i, j = indices
      a, b = records[i], records[j]
      pair_i = (text_field(a, first, source, i), text_field(a, second, source, i))
      pair_j = (text_field(b, first, source, j), text_field(b, second, source, j))
      if pair_i != pair_j[::-1] or pair_i[0] == pair_i[1]:
        raise record_error(
            source, j, first,
            f"does not mirror record {i}: a pair_order group must be two rows "
            f"with {first!r}/{second!r} swapped and different")
      for field in self.template_fields:
        if field not in self.pair_fields and (
            text_field(a, field, source, i) != text_field(b, field, source, j)):
          raise record_error(source, j, field,
                             f"differs from record {i} in the same pair")
      keys[i], keys[j] = ("A>B", "B>A") if pair_i < pair_j else ("B>A", "A>B")
    return keys


def _check_unique_ids(rows, source, id_field):
  seen = {}
  for index, row in enumerate(rows):
    if row.id in seen:
      raise record_error(source, index, id_field or "id",
                         f"duplicate id {row.id!r} (first at record "
                         f"{seen[row.id]})")
    seen[row.id] = index
