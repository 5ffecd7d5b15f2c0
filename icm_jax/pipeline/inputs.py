"""What every stage starts from: the task's train/test examples and the model.

Records are small (thousands of claims), so every host reads them whole; the
big arrays (params, batches) are placed shard by shard, so no host holds more
than its part of those.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import List, Optional, Sequence

import jax

from icm_jax.checkpoints import load_model, load_tokenizer
from icm_jax.model import LlamaConfig, param_shapes
from icm_jax.run_config import ConfigError, RunConfig
from icm_jax.sharding import init_sharded_params, param_shardings
from icm_jax.tasks import (Example, Task, bundled_path, load_examples,
                           split_by_group, task_from_config)
from icm_jax.tasks.bundled import BUNDLED

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Inputs:
  task: Task
  train: List[Example]   # ICM labels these; also the demo/fine-tune pool
  test: List[Example]    # evaluation only


@dataclasses.dataclass
class Model:
  config: LlamaConfig
  params: object
  tokenizer: object
  description: str

  @property
  def max_context(self) -> int:
    return self.config.max_position_embeddings


def _data_file(cfg: RunConfig, split: str, task: Task) -> str:
  value = cfg.data[split]
  if value:
    if not value.startswith("tfds:") and not os.path.exists(value):
      raise ConfigError(f"data.{split}={value!r}: no such file")
    return value
  if (task.name, split) in BUNDLED:
    return bundled_path(task.name, split)
  raise ConfigError(
      f"data.{split} is not set and task {task.name!r} has no bundled {split} "
      f"file; pass --config.data.{split}=<records file or tfds:name/split>")


def _load(cfg: RunConfig, task: Task, split: str) -> List[Example]:
  options = {}
  if cfg.data.tfds_data_dir:
    options["data_dir"] = cfg.data.tfds_data_dir
  if cfg.data.tfds_manual_dir:
    options["manual_dir"] = cfg.data.tfds_manual_dir
  return load_examples(task, _data_file(cfg, split, task), **options)


def first_whole_groups(examples: Sequence[Example], limit: int,
                       key: str) -> List[Example]:
  """The longest prefix of whole consistency groups with <= limit examples."""
  if not limit or limit >= len(examples):
    return list(examples)
  sizes = {}
  for e in examples:
    sizes[e.group] = sizes.get(e.group, 0) + 1
  kept, count = set(), 0
  for e in examples:
    if e.group in kept:
      continue
    if count + sizes[e.group] > limit:
      break
    kept.add(e.group)
    count += sizes[e.group]
  if not kept:
    raise ConfigError(f"{key}={limit} is smaller than the first consistency "
                      f"group ({sizes[examples[0].group]} examples)")
  chosen = [e for e in examples if e.group in kept]
  log.info("%s=%d: using the first %d groups (%d of %d examples)", key, limit,
           len(kept), len(chosen), len(examples))
  return chosen


def load_inputs(cfg: RunConfig) -> Inputs:
  try:
    task = task_from_config(cfg.task)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cfg.data.split_from_test:
    records = _load(cfg, task, "test")
    train, test = split_by_group(records, cfg.data.test_fraction,
                                 seed=cfg.seed)
  else:
    train, test = _load(cfg, task, "train"), _load(cfg, task, "test")
  train = first_whole_groups(train, cfg.data.max_train_examples,
                             "data.max_train_examples")
  test = first_whole_groups(test, cfg.data.max_test_examples,
                            "data.max_test_examples")
  log.info("task %s: %d train examples, %d test examples", task.name,
           len(train), len(test))
  return Inputs(task, train, test)


def compute_dtype(name: str) -> str:
  """'auto' -> bfloat16 on accelerators, float32 on CPU."""
  if name != "auto":
    return name
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_model_for_run(cfg: RunConfig, mesh) -> Model:
  overrides = {"dtype": compute_dtype(cfg.model.dtype),
               "param_dtype": cfg.model.param_dtype,
               "attention": cfg.model.attention}
  if cfg.model.max_context:
    overrides["max_position_embeddings"] = int(cfg.model.max_context)
  if cfg.model.random_init is not None:
    arch = dict(cfg.model.random_init)
    arch.update(overrides)
    try:
      config = LlamaConfig(**arch)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"model.random_init: {e}") from e
    params = init_sharded_params(config, mesh, jax.random.key(cfg.seed))
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    description = f"random {config.num_layers}-layer Llama (seed {cfg.seed})"
  else:
    path = cfg.model.path
    if not os.path.exists(path):
      raise ConfigError(f"model.path={path!r}: no such file or directory")
    loaded = load_model(
        path, config_overrides=overrides,
        param_shardings=lambda c: param_shardings(param_shapes(c), mesh),
        with_tokenizer=not cfg.model.tokenizer)
    config, params, tokenizer = loaded
    if cfg.model.tokenizer:
      tokenizer = load_tokenizer(cfg.model.tokenizer)
    description = os.path.basename(os.path.normpath(path))
  if len(tokenizer) > config.vocab_size:
    raise ConfigError(f"model.tokenizer has {len(tokenizer)} tokens but the "
                      f"model's vocab_size is {config.vocab_size}")
  return Model(config, params, tokenizer, description)


def gold_of(examples: Sequence[Example]) -> Optional[List[int]]:
  """Gold labels, or None when any example lacks one."""
  if any(e.gold is None for e in examples):
    return None
  return [int(e.gold) for e in examples]


def example_tokens(cfg: RunConfig, task: Task, tokenizer,
                   examples: Sequence[Example]):
  """Token pieces of `examples` with the task's label words."""
  from icm_jax.tokenization import LabelWords, tokenize_examples
  words = LabelWords(false=task.false_word, true=task.true_word,
                     rule=cfg.label_rule)
  return tokenize_examples(tokenizer, [e.prompt for e in examples],
                           ids=[e.id for e in examples], words=words)
