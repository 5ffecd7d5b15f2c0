"""Targets and workloads from a run config (main.py's ConfigDict) and the
command-line values of tpu_scripts/aot_check.py and plan.py."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from icm_jax import sharding
from icm_jax.aot.errors import AotError
from icm_jax.aot.presets import PRESETS, for_tpu, model_preset
from icm_jax.model.presets import preset_name
from icm_jax.aot.workload import (GSM8K_LENGTHS, GSM8K_TRAIN_EXAMPLES,
                                  Workload, measured_workload,
                                  synthetic_workload)
from icm_jax.model import LlamaConfig
from icm_jax.scoring.scorer import ScoringConfig
from icm_jax.training.config import TrainConfig


def model_from_config(config, model: Optional[str] = None,
                      attention: Optional[str] = None,
                      arg: str = "--model") -> Tuple[LlamaConfig, str]:
  """(LlamaConfig for a TPU target, display name).

  model: a preset name or an HF checkpoint directory; default the config's
  model.random_init or model.path (a directory with config.json). Compute
  dtype "auto" means bfloat16 (the TPU choice); attention None means the
  config's model.attention unless "auto", else splash.
  """
  import json
  if model:
    if _is_preset(model):
      cfg, label = model_preset(model, arg), preset_name(model)
    else:
      path = os.path.join(model, "config.json")
      if not os.path.isfile(path):
        raise AotError(f"{arg}={model!r}: neither a preset "
                       f"{sorted(PRESETS)} nor a directory with config.json")
      with open(path) as f:
        cfg, label = LlamaConfig.from_hf_config(json.load(f)), model
  elif config.model.random_init is not None:
    try:
      cfg = LlamaConfig(**dict(config.model.random_init))
    except (TypeError, ValueError) as e:
      raise AotError(f"--config.model.random_init: {e}") from None
    label = f"random {cfg.num_layers}-layer Llama (config)"
  elif config.model.path and os.path.isfile(
      os.path.join(config.model.path, "config.json")):
    with open(os.path.join(config.model.path, "config.json")) as f:
      cfg = LlamaConfig.from_hf_config(json.load(f))
    label = config.model.path
  else:
    raise AotError(f"{arg}: pass a preset {sorted(PRESETS)} or an HF "
                   "checkpoint directory (the config has no model.random_init"
                   " and no model.path with a config.json)")
  dtype = config.model.dtype
  param_dtype = config.model.param_dtype
  overrides = {"dtype": "bfloat16" if dtype == "auto" else dtype,
               # auto: what a run on the accelerator stores (bfloat16).
               "param_dtype": "bfloat16" if param_dtype == "auto"
                              else param_dtype}
  if config.model.max_context:
    overrides["max_position_embeddings"] = int(config.model.max_context)
  if attention is None:
    attention = config.model.get("attention", "auto")
    attention = "splash" if attention == "auto" else attention
  return for_tpu(cfg.replace(**overrides), attention), label


def workload_from_config(config, num_examples: int,
                         lengths: Optional[str] = None,
                         data: Optional[str] = None,
                         tokenizer: Optional[str] = None,
                         train_examples: int = GSM8K_TRAIN_EXAMPLES
                         ) -> Workload:
  """lengths: "measured" (tokenize the task's data), "MEAN,MAX", or None
  (measured when a data file is known, else GSM8K_LENGTHS)."""
  from icm_jax.tasks.bundled import BUNDLED, bundled_path
  task = config.task.name
  data_arg = "--data"
  if data:
    if not os.path.isfile(data):
      raise AotError(f"--data={data!r}: no such file")
  else:
    split = "test" if config.data.split_from_test else "train"
    if config.data[split]:
      data, data_arg = config.data[split], f"--config.data.{split}"
    elif (task, split) in BUNDLED:
      data = bundled_path(task, split)
  if lengths in (None, "measured"):
    if data:
      if not tokenizer:
        tokenizer = config.model.tokenizer
      if not tokenizer:
        from icm_jax.checkpoints import CheckpointError, smollm2_gguf_path
        try:
          tokenizer = smollm2_gguf_path()
        except CheckpointError as e:
          raise AotError(f"--tokenizer: {e}") from None
      return measured_workload(
          config.task.to_dict(), data, tokenizer, num_examples,
          test_fraction=float(config.data.test_fraction),
          seed=int(config.seed),
          split_from_test=bool(config.data.split_from_test),
          data_arg=data_arg)
    if lengths == "measured":
      raise AotError(f"--lengths=measured: task {task!r} has no data file; "
                     "pass --data=RECORDS or --lengths=MEAN,MAX")
    lengths = ",".join(map(str, GSM8K_LENGTHS))
  try:
    mean, longest = (int(x) for x in lengths.split(","))
  except ValueError:
    raise AotError(f"--lengths={lengths!r}: expected 'measured' or MEAN,MAX "
                   "(ints)") from None
  return synthetic_workload(num_examples, mean, longest,
                            train_examples=train_examples)


def stage_configs(config):
  """(ScoringConfig, SearchConfig, TrainConfig) of a run config."""
  from icm_jax.search.config import SearchConfig
  try:
    scoring = ScoringConfig(**config.scoring.to_dict())
    search = SearchConfig(**config.search.to_dict())
    values = config.train.to_dict()
    values.pop("export_hf", None)
    train = TrainConfig.from_dict(values)
  except (TypeError, ValueError) as e:
    raise AotError(f"--config: {e}") from None
  return scoring, search, train


def parse_mesh(value: Optional[str], base: Any = None,
               arg: str = "--mesh") -> Dict[str, int]:
  """"data=D,fsdp=F,tensor=T" (any subset) over `base` (a mesh config)."""
  sizes = dict(sharding.MeshConfig.from_any(base).sizes)
  if value:
    for item in value.split(","):
      key, sep, number = item.partition("=")
      key = key.strip()
      if not sep or key not in sharding.AXES:
        raise AotError(f"{arg}={value!r}: expected data=D,fsdp=F,tensor=T "
                       f"with axes from {sharding.AXES}")
      try:
        sizes[key] = int(number)
      except ValueError:
        raise AotError(f"{arg}={value!r}: {key} size {number!r} is not an "
                       "int") from None
  try:
    sharding.MeshConfig.from_any(sizes)
  except ValueError as e:
    raise AotError(f"{arg}={value!r}: {e}") from None
  return sizes


def _is_preset(name: str) -> bool:
  try:
    preset_name(name)
  except KeyError:
    return False
  return True
