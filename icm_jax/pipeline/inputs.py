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
import numpy as np

from icm_jax import storage
from icm_jax.checkpoints import (CheckpointError, load_model,
                                 load_model_config, load_tokenizer, locate)
from icm_jax.checkpoints.hub import is_hub_id
from icm_jax.model import LlamaConfig, param_shapes
from icm_jax.model.presets import PRESETS, SHAPE_KEYS, preset_name
from icm_jax.run_config import ConfigError, RunConfig
from icm_jax.sharding import init_sharded_params, param_shardings
from icm_jax.tasks import (DataError, Example, Task, bundled_path,
                           load_examples, split_by_group, task_from_config)
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
    if not value.startswith("tfds:") and not storage.exists(value):
      raise ConfigError(f"data.{split}={value!r}: no such file")
    return value
  if (task.name, split) in BUNDLED:
    return bundled_path(task.name, split)
  readers = ",".join(s for s in cfg.stages if split in splits_read_by((s,)))
  raise ConfigError(
      f"data.{split} is not set and task {task.name!r} has no bundled {split} "
      f"file; pass --config.data.{split}=<records file or tfds:name/split> "
      f"(the {readers} stage reads it)")


def splits_read_by(stages: Sequence[str]) -> set:
  """The data splits the stages read: label and train read the train split,
  eval reads the test split and the train split (its demonstration pool)."""
  needed = set()
  for stage in stages:
    needed |= {"label": {"train"}, "train": {"train"},
               "eval": {"train", "test"}}[stage]
  return needed


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
  """The examples the configured stages read, checked before any model
  loads: a split no stage reads is not opened (it stays empty)."""
  try:
    task = task_from_config(cfg.task)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  needed = splits_read_by(cfg.stages)
  train, test = [], []
  if cfg.data.split_from_test:
    records = _load(cfg, task, "test")
    train, test = split_by_group(records, cfg.data.test_fraction,
                                 seed=cfg.seed)
  else:
    if "train" in needed:
      train = _load(cfg, task, "train")
    if "test" in needed:
      test = _load(cfg, task, "test")
  train = first_whole_groups(train, cfg.data.max_train_examples,
                             "data.max_train_examples")
  test = first_whole_groups(test, cfg.data.max_test_examples,
                            "data.max_test_examples")
  if "eval" in cfg.stages:
    _check_gold(task, test, "test")
  log.info("task %s: %d train examples, %d test examples", task.name,
           len(train), len(test))
  return Inputs(task, train, test)


def _check_gold(task: Task, examples: Sequence[Example], split: str) -> None:
  """The eval stage scores against gold: every test example needs one."""
  for e in examples:
    if e.gold is None:
      field = task.label_field
      where = (f"task.label_field is None" if field is None else
               f"field {field!r} missing")
      raise DataError(
          f"{e.id}: {where}; the eval stage needs a gold label on every "
          f"{split} example (or run --config.stages=label)")


def check_prompts_fit(cfg: RunConfig, inputs: Inputs, tokenizer,
                      context: int) -> None:
  """Every prompt the stages build fits the model context, checked with the
  tokenizer before the weights load: one example with its label word, and
  (label stage) every search batch's leave-one-out prompt."""
  from icm_jax.labelling import check_fits_context
  from icm_jax.search import split_into_batches
  examples = list(inputs.train) + list(inputs.test)
  if not examples:
    return
  tokens = example_tokens(cfg, inputs.task, tokenizer, examples)
  lengths = len(tokens.header) + tokens.prompt_lengths + 1
  for i in np.flatnonzero(lengths > context)[:1]:
    raise DataError(f"{examples[i].id}: the prompt is {int(lengths[i])} "
                    f"tokens with its label word, over the model context "
                    f"{context} (model.max_context)")
  if "label" not in cfg.stages:
    return
  groups = [e.group for e in inputs.train]
  for seed in cfg.seeds:
    for b, members in enumerate(split_into_batches(
        groups, cfg.label_batch_size, seed)):
      if len(members) < cfg.search.initial_size:
        raise ConfigError(
            f"search.initial_size={cfg.search.initial_size} > {len(members)} "
            f"train examples in search batch {b}: lower it (or give more "
            "examples)")
      try:
        check_fits_context(tokens.subset(members), context, b)
      except ValueError as e:
        raise ConfigError(f"label.batch_size={cfg.label_batch_size}: {e}"
                          ) from None


def compute_dtype(name: str) -> str:
  """'auto' -> bfloat16 on accelerators, float32 on CPU."""
  if name != "auto":
    return name
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_model_for_run(cfg: RunConfig, mesh, inputs: Inputs,
                       load_weights: bool = True) -> Model:
  """The model, after the checks that need only its config and tokenizer
  (vocabulary, label words, every prompt within the context) have passed;
  `load_weights=False` stops there (params None)."""
  overrides = {"dtype": compute_dtype(cfg.model.dtype),
               "param_dtype": compute_dtype(cfg.model.param_dtype),
               "attention": cfg.model.attention}
  if cfg.model.max_context:
    overrides["max_position_embeddings"] = int(cfg.model.max_context)
  path = cfg.model.path
  if cfg.model.random_init is not None:
    arch = dict(cfg.model.random_init)
    arch.update(overrides)
    try:
      config = LlamaConfig(**arch)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"model.random_init: {e}") from e
    description = f"random {config.num_layers}-layer Llama (seed {cfg.seed})"
  else:
    # A Hub id becomes its HF-cache snapshot, config and tokenizer first
    # (the weights only once every check below has passed); gs:// folders
    # stay URLs, read by ranges.
    path = locate_model(path, cfg.model.revision or None, "model.path",
                        weights=False)
    config = load_model_config(path, overrides)
    description = (cfg.model.path if is_hub_id(cfg.model.path) else
                   storage.basename(os.path.normpath(path)))
  if cfg.model.get("preset"):
    _check_preset(config, cfg.model.preset, cfg.model.path)
  tokenizer = load_tokenizer(
      locate_model(cfg.model.tokenizer, None, "model.tokenizer",
                   weights=False) if cfg.model.tokenizer else path)
  if len(tokenizer) > config.vocab_size:
    raise ConfigError(f"model.tokenizer has {len(tokenizer)} tokens but the "
                      f"model's vocab_size is {config.vocab_size}")
  check_prompts_fit(cfg, inputs, tokenizer, config.max_position_embeddings)
  if not load_weights:
    return Model(config, None, tokenizer, description)
  log.info("loading model weights: %s", description)
  if cfg.model.random_init is not None:
    params = init_sharded_params(config, mesh, jax.random.key(cfg.seed))
  else:
    path = locate_model(cfg.model.path, cfg.model.revision or None,
                        "model.path")
    config, params, _ = load_model(
        path, config_overrides=overrides,
        param_shardings=lambda c: param_shardings(param_shapes(c), mesh),
        with_tokenizer=False)
  return Model(config, params, tokenizer, description)


def locate_model(path: str, revision, key: str, weights: bool = True) -> str:
  """`checkpoints.locate`, its errors as one line naming the config key."""
  try:
    return locate(path, revision, weights)
  except CheckpointError as e:
    message = str(e)  # "<path>[ (revision r)]: why"
    rest = message[len(path):] if message.startswith(path) else ": " + message
    raise ConfigError(f"{key}={path!r}{rest}") from None


def _check_preset(config: LlamaConfig, preset: str, path) -> None:
  """The checkpoint has the architecture the config was chosen for."""
  expected = PRESETS[preset_name(preset)]
  for key in SHAPE_KEYS:
    if getattr(config, key) != expected[key]:
      raise ConfigError(
          f"model.path={path!r} is not a {preset} ({key} "
          f"{getattr(config, key)}, the preset has {expected[key]}); pass "
          "its checkpoint or drop the :PRESET of --config")


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
