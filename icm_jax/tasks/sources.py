"""Where records come from: JSON/JSONL files (local or gs://) or TFDS.

The top of the task layer: it may import the TFDS builders, which are built
on the tasks below them (builtin, task, records), never the other way round.
"""

from __future__ import annotations

import os
from typing import Optional

from icm_jax.tasks.records import Example, read_record_file
from icm_jax.tasks.task import Task

TFDS_PREFIX = "tfds:"


def source_name(path: str) -> str:
  """How errors and example ids name a records path: file name or tfds name."""
  path = str(path)
  if path.startswith(TFDS_PREFIX):
    return path[len(TFDS_PREFIX):]
  return path.replace("\\", "/").rsplit("/", 1)[-1]


def load_records(path: str, *, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None) -> list[dict]:
  """Records of a .json/.jsonl file, or of "tfds:<name>/<split>" (a prepared
  TFDS dataset; `data_dir`/`manual_dir` go to TFDS)."""
  path = os.fspath(path)
  if path.startswith(TFDS_PREFIX):
    # Imported here so JSON users never pay for importing tensorflow_datasets.
    from icm_jax.tasks import tfds_builders
    return tfds_builders.tfds_records(path[len(TFDS_PREFIX):],
                                      data_dir=data_dir, manual_dir=manual_dir)
  return read_record_file(path)


def load_examples(task: Task, path: str, **load_options) -> list[Example]:
  """`task.examples` of the records at `path` (see `load_records`)."""
  return task.examples(load_records(path, **load_options), source_name(path))
