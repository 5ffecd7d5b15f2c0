"""Tasks: how records become prompts, consistency groups and keys.

Data flows one way (config -> task -> token batches -> scoring -> search); this
package imports none of the later stages. Inside it the layers are
records -> task -> builtin -> tfds_builders -> sources (files or TFDS);
`icm_jax.tasks.tfds_builders` is imported on demand.
"""

from icm_jax.tasks.builtin import TASKS, get_task
from icm_jax.tasks.bundled import bundled_path
from icm_jax.tasks.config import task_from_config
from icm_jax.tasks.records import DataError, Example, parse_label
from icm_jax.tasks.sources import load_examples, load_records
from icm_jax.tasks.splits import split_by_group
from icm_jax.tasks.task import CONSISTENCY_KINDS, KEY_SOURCES, Task

__all__ = [
    "CONSISTENCY_KINDS", "DataError", "Example", "KEY_SOURCES", "TASKS",
    "Task", "bundled_path", "get_task", "load_examples", "load_records",
    "parse_label", "split_by_group", "task_from_config",
]
