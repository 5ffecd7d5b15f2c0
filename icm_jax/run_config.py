"""The run configuration: one `ml_collections.ConfigDict` for main.py.

`default_config()` holds every key main.py understands. The stage sections
(`scoring`, `search`, `train`) are generated from the defaults of their
dataclasses, so a config file only sets what differs and `--config.x.y=v`
overrides any key. `parse_config` turns the ConfigDict into typed stage
configs and raises `ConfigError` naming the key on any bad value, before a
model or dataset is loaded.

Sections:
  stages        "label,train,eval" (any subset; each reads what the previous
                stages wrote to the workdir)
  task          a built-in task {"name": ..., its options} or a generic one;
                every generic key (template, consistency, ...) is settable
                (see icm_jax.tasks.config)
  data          train/test files ("" = the task's bundled file), split and
                example limits
  model         checkpoint path (HF dir or .gguf) or a random tiny model
  mesh          ('data', 'fsdp', 'tensor') axis sizes
  scoring       ScoringConfig (LOO kernel)
  search        SearchConfig (annealing) + label batch size
  label         ICM batch size, iterative fine-tuning switch
  train         TrainConfig (fine-tuning)
  eval          which comparisons to run and their context budget
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import ml_collections
from ml_collections import config_dict

from icm_jax.model.config import ATTENTION_IMPLS
from icm_jax.model.presets import preset_name
from icm_jax.tasks.config import GENERIC_KEYS
from icm_jax.scoring.scorer import ScoringConfig
from icm_jax.search.config import SearchConfig
from icm_jax.training.config import TrainConfig

STAGES = ("label", "train", "eval")
EVAL_METHODS = ("zero_shot", "many_shot_gold", "many_shot_icm",
                "many_shot_random", "many_shot_inverted",
                "bootstrap_consistent",
                "icm_no_consistency", "finetune_gold", "finetune_icm",
                "finetune_random", "finetune_inverted")
# Not defaults: icm_no_consistency is a second search per seed, and
# finetune_inverted a fourth fine-tune (the control of the fine-tuning rows).
DEFAULT_EVAL_METHODS = tuple(m for m in EVAL_METHODS
                             if m not in ("icm_no_consistency",
                                          "finetune_inverted"))
# Methods whose row is measured once per label seed.
SEEDED_METHODS = ("many_shot_icm", "many_shot_random", "icm_no_consistency",
                  "finetune_icm")
MODEL_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A bad config value; the message starts with the key."""


def _dataclass_section(cls) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(cls)})


def task_section(name: str) -> ml_collections.ConfigDict:
  """`name` and every generic task key (icm_jax.tasks.config), unset, so any
  of them can be given by --config.task.KEY=... (None keeps the task's own)."""
  tuple_keys = ("pair_fields", "strip_newlines")
  section = {k: config_dict.placeholder(tuple if k in tuple_keys else str)
             for k in GENERIC_KEYS}
  return ml_collections.ConfigDict(dict(section, name=name))


def default_config() -> ml_collections.ConfigDict:
  """Every key main.py reads, with its default."""
  c = ml_collections.ConfigDict()
  c.stages = ",".join(STAGES)
  c.seed = 0
  # Label seeds: "" = one search with search.seed; "0,1,2" runs the label
  # stage once per seed (search.seed = each) and reports mean ± sd.
  c.seeds = ""
  c.task = task_section("truthfulqa")
  c.data = ml_collections.ConfigDict(dict(
      train="",          # records file or "tfds:<name>/<split>"; "" = bundled
      test="",
      # Tasks with one file (GSM8K, Alpaca): split it by whole group.
      split_from_test=False,
      test_fraction=0.5,
      max_train_examples=0,  # 0 = all; else the first whole groups that fit
      max_test_examples=0,
      tfds_data_dir="",
      tfds_manual_dir="",
  ))
  c.model = ml_collections.ConfigDict(dict(
      # Hub id (owner/name, via the HF cache), HF folder or .gguf file, local
      # or gs://.
      path=config_dict.placeholder(str),
      revision="",      # Hub ids only: branch, tag or commit ("" = main)
      # A randomly initialised model of this architecture instead of `path`
      # (tests, smoke runs); `tokenizer` must then name a tokenizer.
      random_init=config_dict.placeholder(dict),
      tokenizer="",     # "" = the checkpoint's own
      dtype="auto",     # compute dtype for scoring/eval: auto = bf16 on TPU/GPU
      # Stored dtype of the params for scoring/eval: auto = bf16 on TPU/GPU
      # (half the memory; fine-tuning still keeps float32 master weights).
      param_dtype="auto",
      max_context=0,    # 0 = the model's max_position_embeddings
      # auto = Pallas splash kernel on TPU, XLA attention on CPU/GPU.
      attention="auto",
      # A base model of icm_jax.model.presets ("llama-3.1-8b"): the
      # checkpoint must have its shapes; set by `--config=FILE:PRESET`.
      preset="",
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.scoring = _dataclass_section(ScoringConfig)
  c.search = _dataclass_section(SearchConfig)
  c.label = ml_collections.ConfigDict(dict(
      batch_size=256,      # claims per ICM search (the paper's K is search.initial_size)
      label_rule="variants",
      # Official README's iterative scheme: label batch 1 with M0, fine-tune
      # -> M1, label batch 2 with M1, ... (each fine-tune starts from M0 and
      # uses every ICM label found so far).
      iterative=False,
  ))
  c.train = _dataclass_section(TrainConfig)
  c.train.export_hf = True     # write the ICM-fine-tuned model as an HF dir
  c.eval = ml_collections.ConfigDict(dict(
      methods=",".join(DEFAULT_EVAL_METHODS),
      max_context=0,     # many-shot budget in tokens; 0 = model.max_context
      batch_size=8,
      demo_seed=0,       # order in which train examples are tried as demos
      bootstrap_rounds=3,  # bootstrap_consistent: many-shot relabelling rounds
  ))
  c.log = ml_collections.ConfigDict(dict(progress=True, tensorboard=True))
  return c


def paper_config(task_name: str,
                 preset: str = "") -> ml_collections.ConfigDict:
  """default_config() for one of the paper's tasks, with its fine-tuning
  settings (Llama-3.1-8B/70B: batch 32, lr 1e-5, remat). The search settings
  are already SearchConfig's defaults. `preset` (the FILE:PRESET of
  --config): see `apply_model_preset`."""
  c = default_config()
  c.task.name = task_name
  c.train.batch_size = 32
  c.train.learning_rate = 1e-5
  c.train.remat = True
  if preset:
    apply_model_preset(c, preset)
  return c


# The mesh each preset's run compiles to within a chip's memory in exact
# scoring mode (tpu_scripts/aot_check.py; README "Ahead-of-time checks"):
# the KV cache of the demonstrations is split only by `tensor`, so 8-way
# tensor parallelism is what makes Llama-3.1-8B fit 16 GiB v5e chips (8.9
# GiB with fsdp=2, bf16 params) and Llama-3.1-70B fit v5p-32 (27.3 GiB with
# fsdp=4, float32 params);
# fsdp=-1 takes the rest of the slice.
PRESET_MESHES = {
    "llama-3.2-1b": dict(data=1, fsdp=-1, tensor=1),
    "llama-3.1-8b": dict(data=1, fsdp=-1, tensor=8),
    "llama-3.1-70b": dict(data=1, fsdp=-1, tensor=8),
}


def apply_model_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  """Sets model.preset (the checkpoint must have that architecture) and the
  mesh that fits it; model.path still names the weights."""
  try:
    name = preset_name(preset)
    mesh = PRESET_MESHES[name]
  except KeyError:
    raise ConfigError(f"config preset {preset!r} unknown; choose from "
                      f"{sorted(PRESET_MESHES)}") from None
  config.model.preset = name
  config.mesh.update(mesh)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Typed view of a validated ConfigDict."""

  stages: Tuple[str, ...]
  seed: int
  task: dict
  data: ml_collections.ConfigDict
  model: ml_collections.ConfigDict
  mesh: dict
  scoring: ScoringConfig
  search: SearchConfig
  label_batch_size: int
  label_rule: str
  iterative: bool
  train: TrainConfig
  export_hf: bool
  seeds: Tuple[int, ...]
  eval_methods: Tuple[str, ...]
  bootstrap_rounds: int
  eval_max_context: int
  eval_batch_size: int
  demo_seed: int
  progress: bool
  tensorboard: bool


def _as_dict(section) -> dict:
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _typed(cls, section, name: str):
  """cls(**section) with unknown keys and bad values reported as name.key."""
  values = _as_dict(section)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"{name}: unknown keys {unknown}; known: {sorted(known)}")
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    message = str(e)
    if not message.startswith(name):
      message = f"{name}: {message}"
    raise ConfigError(message) from e


def _csv(value: Any, key: str, allowed: Tuple[str, ...]) -> Tuple[str, ...]:
  if isinstance(value, str):
    items = tuple(s.strip() for s in value.split(",") if s.strip())
  elif isinstance(value, (list, tuple)):
    items = tuple(value)
  else:
    raise ConfigError(f"{key}={value!r} must be a comma-separated string")
  bad = [s for s in items if s not in allowed]
  if bad:
    raise ConfigError(f"{key}: unknown {bad}; choose from {list(allowed)}")
  return items


def _positive_int(value, key: str, allow_zero: bool = False) -> int:
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value > 0 or (allow_zero and value == 0))
  if not ok:
    raise ConfigError(f"{key}={value!r} must be a "
                      f"{'non-negative' if allow_zero else 'positive'} int")
  return value


def _seeds(value, search_seed: int) -> Tuple[int, ...]:
  """"" -> (search.seed,); "0,1,2" / an int / a list -> distinct ints."""
  if value is None or value == "":
    return (search_seed,)
  if isinstance(value, int) and not isinstance(value, bool):
    items = [value]
  elif isinstance(value, str):
    items = [s.strip() for s in value.split(",")]
  elif isinstance(value, (list, tuple)):
    items = list(value)
  else:
    raise ConfigError(f"seeds={value!r} must be comma-separated ints")
  seeds = []
  for item in items:
    try:
      seed = int(item)
      if isinstance(item, bool) or str(seed) != str(item).strip() or seed < 0:
        raise ValueError
    except (TypeError, ValueError):
      raise ConfigError(f"seeds={value!r}: {item!r} is not a non-negative "
                        "int") from None
    seeds.append(seed)
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"seeds={value!r} repeats a seed")
  return tuple(seeds)


def parse_config(config: ml_collections.ConfigDict) -> RunConfig:
  """Validates everything that can be checked without loading anything."""
  stages = _csv(config.stages, "stages", STAGES)
  if not stages:
    raise ConfigError("stages is empty; choose from label,train,eval")
  task = _as_dict(config.task)
  if not isinstance(task.get("name"), str) or not task["name"]:
    raise ConfigError(f"task.name={task.get('name')!r} must be a task name")
  # Resolve the task now so an unknown name or option fails before loading.
  from icm_jax.tasks import task_from_config
  try:
    task_from_config(task)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  data = config.data
  for key in ("max_train_examples", "max_test_examples"):
    _positive_int(data[key], f"data.{key}", allow_zero=True)
  if not 0.0 < float(data.test_fraction) < 1.0:
    raise ConfigError(f"data.test_fraction={data.test_fraction!r} must be in "
                      "(0, 1)")
  model = config.model
  if model.path is None and model.random_init is None:
    raise ConfigError("model.path is not set: pass --config.model.path=<Hub "
                      "id (owner/name), HF checkpoint folder or .gguf file>")
  if model.path is not None and model.random_init is not None:
    raise ConfigError("model.path and model.random_init are both set; choose "
                      "one")
  if model.random_init is not None and not model.tokenizer:
    raise ConfigError("model.tokenizer must name a tokenizer (HF directory or "
                      ".gguf) when model.random_init is used")
  if model.dtype not in ("auto",) + MODEL_DTYPES:
    raise ConfigError(f"model.dtype={model.dtype!r} not in "
                      f"{('auto',) + MODEL_DTYPES}")
  if model.param_dtype not in ("auto",) + MODEL_DTYPES:
    raise ConfigError(f"model.param_dtype={model.param_dtype!r} not in "
                      f"{('auto',) + MODEL_DTYPES}")
  _positive_int(model.max_context, "model.max_context", allow_zero=True)
  if model.get("preset"):
    try:
      preset_name(model.preset)
    except KeyError:
      raise ConfigError(f"model.preset={model.preset!r} unknown; choose from "
                        f"{sorted(PRESET_MESHES)}") from None
  if model.attention not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention={model.attention!r} not in "
                      f"{ATTENTION_IMPLS}")
  mesh = _as_dict(config.mesh)
  try:
    from icm_jax.sharding import MeshConfig
    MeshConfig.from_any(mesh)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"mesh: {e}") from e
  scoring = _typed(ScoringConfig, config.scoring, "scoring")
  search = _typed(SearchConfig, config.search, "search")
  train_values = _as_dict(config.train)
  export_hf = bool(train_values.pop("export_hf", True))
  train = _typed(TrainConfig, train_values, "train")
  label = config.label
  _positive_int(label.batch_size, "label.batch_size")
  if label.label_rule not in ("exact", "variants"):
    raise ConfigError(f"label.label_rule={label.label_rule!r} not in "
                      "('exact', 'variants')")
  methods = _csv(config.eval.methods, "eval.methods", EVAL_METHODS)
  _positive_int(config.eval.bootstrap_rounds, "eval.bootstrap_rounds",
                allow_zero=True)
  seeds = _seeds(config.get("seeds", ""), search.seed)
  search = dataclasses.replace(search, seed=seeds[0])
  _positive_int(config.eval.max_context, "eval.max_context", allow_zero=True)
  _positive_int(config.eval.batch_size, "eval.batch_size")
  return RunConfig(
      stages=stages, seed=int(config.seed), task=task, data=data, model=model,
      mesh=mesh, scoring=scoring, search=search,
      label_batch_size=label.batch_size, label_rule=label.label_rule,
      iterative=bool(label.iterative), train=train, export_hf=export_hf,
      seeds=seeds, eval_methods=methods,
      bootstrap_rounds=int(config.eval.bootstrap_rounds),
      eval_max_context=int(config.eval.max_context),
      eval_batch_size=int(config.eval.batch_size),
      demo_seed=int(config.eval.demo_seed),
      progress=bool(config.log.progress),
      tensorboard=bool(config.log.tensorboard))
