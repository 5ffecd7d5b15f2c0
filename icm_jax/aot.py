"""Ahead-of-time compilation for TPU topologies from any host, and a roofline.

Everything here runs on a CPU machine: `jax.experimental.topologies` describes
the chips of a TPU slice (e.g. "v5e:4x4" = 16 TPU v5 lite chips), the mesh is
built over those devices, and the scoring kernels and the train step are
lowered with `jax.ShapeDtypeStruct` inputs (params, examples, labels, batches:
nothing is allocated) and compiled by libtpu's compiler. The compiled
executable reports, per chip, the bytes of its arguments, outputs and
temporaries (`memory_analysis`), which says whether a run fits in HBM before
any TPU is rented.

    topo = get_topology("v5e:4x4")
    mesh = topology_mesh(topo, MeshConfig(data=1, fsdp=-1, tensor=1))
    model = model_preset("llama-3.1-8b", attention="splash")
    workload = synthetic_workload(256, mean_len=191, max_len=665)
    for call in scoring_calls(model, mesh, workload, ScoringConfig()):
      report = compile_call(call, mesh)
    check_fit(reports, topo.chip)          # raises DoesNotFit, with advice

Costs. XLA's `cost_analysis()` of a compiled TPU module is per chip but
counts the body of every while loop ONCE (a `lax.scan` of 10 matmuls reports
the FLOPs of one; checked on this libtpu), and our kernels are loops: the
decoder layers are an `nn.scan` and the LOO rows a `lax.map`. So its numbers
are printed for reference only. The roofline instead uses an analytic count
(`Cost`: matmul FLOPs of every token the chip runs, padding included;
attention FLOPs from (query, key) pair counts; an HBM-traffic lower bound),
which `jaxpr_matmul_flops` checks against the traced program with scan trip
counts applied. The Mosaic splash-attention kernel is one custom call that
neither count sees, hence the analytic attention FLOPs: "dense" = every pair
of the padded [T, S] grid, "visible" = pairs the mask allows (what a
tile-skipping kernel approaches; the roofline uses it, as a lower bound).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from icm_jax import sharding
from icm_jax.model import LlamaConfig, RopeScaling, param_shapes
from icm_jax.scoring import exact, layout, parallel
from icm_jax.scoring.common import ExampleArrays
from icm_jax.scoring.scorer import ScoringConfig
from icm_jax.training import data as train_data
from icm_jax.training.config import TrainConfig

GiB = 1 << 30


class AotError(ValueError):
  """A bad argument; the message starts with the argument's name."""


class DoesNotFit(RuntimeError):
  """A compiled call needs more memory per chip than the chip's HBM."""


# -----------------------------------------------------------------------------
# Chips and topologies
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip HBM capacity, peak dense bf16 FLOP/s and HBM bandwidth."""

  name: str
  device_kind: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float


CHIPS: Tuple[Chip, ...] = (
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9),
)
_CHIP_BY_KIND = {c.device_kind: c for c in CHIPS}
_TOPOLOGY_RE = re.compile(r"^([A-Za-z0-9_ ]+)[=_:]([0-9]+(x[0-9]+)*)"
                          r"(_twisted|_untwisted)?$")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5p:2x2x2, v5p:2x4x4, v6e:4x4"


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: Tuple[Any, ...]
  chip: Chip

  @property
  def num_chips(self) -> int:
    return len(self.devices)


def get_topology(name: str, arg: str = "--topology") -> Topology:
  """The devices of a TPU slice such as "v5e:4x4" (libtpu, any host)."""
  if not isinstance(name, str) or not _TOPOLOGY_RE.match(name.strip()):
    raise AotError(f"{arg}={name!r}: expected CHIP:AxB or CHIP:AxBxC, e.g. "
                   f"{TOPOLOGY_EXAMPLES}")
  name = name.strip()
  # Compiling touches no chip, so several processes may load libtpu at once
  # (libtpu otherwise takes /tmp/libtpu_lockfile for the process lifetime).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:  # the `tpu` extra's compiler
    raise AotError(f"{arg}={name!r}: compiling for TPU needs libtpu: "
                   "pip install -e '.[tpu]'")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # JaxRuntimeError / RuntimeError from libtpu
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if "lockfile" in message:
      raise AotError(f"{arg}={name!r}: another process holds libtpu "
                     f"({message}); set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before "
                     "JAX loads libtpu") from None
    raise AotError(f"{arg}={name!r}: not a TPU topology libtpu knows "
                   f"({message}); examples: {TOPOLOGY_EXAMPLES}") from None
  devices = tuple(topo.devices)
  kind = devices[0].device_kind
  if kind not in _CHIP_BY_KIND:
    raise AotError(f"{arg}={name!r}: chip kind {kind!r} has no HBM/peak "
                   f"entry; supported: {[c.name for c in CHIPS]}")
  return Topology(name, devices, _CHIP_BY_KIND[kind])


def topology_mesh(topology: Topology, mesh_config: Any = None):
  """The ('data', 'fsdp', 'tensor') mesh over the topology's chips."""
  return sharding.create_mesh(sharding.MeshConfig.from_any(mesh_config),
                              devices=topology.devices)


# -----------------------------------------------------------------------------
# Model presets
# -----------------------------------------------------------------------------

_LLAMA31 = dict(
    vocab_size=128256, head_dim=128, num_kv_heads=8, rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=131072, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001)

PRESETS: Dict[str, dict] = {
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672,
                          num_layers=80, num_heads=64),
}


def has_attention_field() -> bool:
  """Whether LlamaConfig has the `attention` kernel switch."""
  return "attention" in {f.name for f in dataclasses.fields(LlamaConfig)}


def for_tpu(config: LlamaConfig, attention: Optional[str] = "splash"
            ) -> LlamaConfig:
  """`config` with the attention kernel fixed for a TPU target.

  "auto" would resolve from the *host's* backend (CPU here), so AOT for TPU
  names the kernel explicitly. A no-op while LlamaConfig has no such field.
  """
  if attention is None or not has_attention_field():
    return config
  return dataclasses.replace(config, attention=attention)


def attention_impl(config: LlamaConfig) -> str:
  return getattr(config, "attention", "xla")


def model_preset(name: str, arg: str = "--model", **overrides) -> LlamaConfig:
  """Llama-3.1-8B / 70B architecture (no weights)."""
  key = name.strip().lower()
  if key not in PRESETS:
    raise AotError(f"{arg}={name!r}: unknown preset; choose from "
                   f"{sorted(PRESETS)} or pass an HF checkpoint directory")
  return LlamaConfig(**dict(PRESETS[key], **overrides))


# -----------------------------------------------------------------------------
# Workload: prompt lengths of one search batch and of the fine-tuning set
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
  """Token lengths the kernels' shapes derive from.

  prompt_lengths: [N] prompt tokens of the N examples of one ICM search.
  train_lengths: prompt tokens of every fine-tuning example (the epoch).
  groups / keys: consistency structure of the N examples (search accounting).
  """

  prompt_lengths: Tuple[int, ...]
  header_len: int
  sep_len: int
  label_set_sizes: Tuple[int, int] = (4, 4)
  train_lengths: Tuple[int, ...] = ()
  groups: Tuple[str, ...] = ()
  keys: Tuple[Optional[str], ...] = ()
  consistency_kind: str = "keyed"
  description: str = ""

  def __post_init__(self):
    if len(self.prompt_lengths) < 2:
      raise AotError(f"--num_examples: need at least 2 examples, got "
                     f"{len(self.prompt_lengths)}")
    if min(self.prompt_lengths) < 1:
      raise AotError("prompt lengths must be >= 1 token")
    if self.header_len < 0 or self.sep_len < 0:
      raise AotError("header_len and sep_len must be >= 0")

  @property
  def num_examples(self) -> int:
    return len(self.prompt_lengths)

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray(self.prompt_lengths, np.int64)

  @property
  def width(self) -> int:
    return int(max(self.prompt_lengths))

  @property
  def demo_lengths(self) -> np.ndarray:
    return self.lengths + 1 + self.sep_len

  @property
  def full_length(self) -> int:
    """header + every demonstration: the F of exact mode, all labelled."""
    return int(self.header_len + self.demo_lengths.sum())

  @property
  def token_sets(self) -> tuple:
    f, t = self.label_set_sizes
    return (tuple(range(1, 1 + f)), tuple(range(1 + f, 1 + f + t)))

  def train_step_length(self, min_seq_len: int, max_len: int) -> int:
    """Longest bucketed train row (header + prompt) of the epoch."""
    longest = max(self.train_lengths or self.prompt_lengths) + self.header_len
    return train_data.bucket_length(int(longest), min_seq_len, max_len)


def synthetic_workload(num_examples: int, mean_len: int, max_len: int, *,
                       header_len: int = 1, sep_len: int = 1,
                       train_examples: int = 0, group_size: int = 4
                       ) -> Workload:
  """N-1 prompts of `mean_len` tokens and one of `max_len`."""
  for name, value in (("--num_examples", num_examples),
                      ("--lengths (mean)", mean_len),
                      ("--lengths (max)", max_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise AotError(f"{name}={value!r} must be a positive int")
  if max_len < mean_len:
    raise AotError(f"--lengths: max {max_len} < mean {mean_len}")
  lengths = [mean_len] * (num_examples - 1) + [max_len]
  groups = tuple(str(i // group_size) for i in range(num_examples))
  keys = tuple(str(i % 3) for i in range(num_examples))
  train = tuple([mean_len] * max(train_examples - 1, 0) +
                ([max_len] if train_examples else []))
  return Workload(tuple(lengths), header_len, sep_len, train_lengths=train,
                  groups=groups, keys=keys,
                  description=f"synthetic: {num_examples - 1} prompts of "
                  f"{mean_len} tokens + 1 of {max_len}")


def measured_workload(task_name: str, data_path: str, tokenizer,
                      num_examples: int, *, test_fraction: float = 0.5,
                      seed: int = 0, split_from_test: bool = True,
                      data_arg: str = "--data") -> Workload:
  """Real prompt lengths: the task's prompts tokenized as the pipeline does.

  The search batch is the first whole consistency groups of the train split
  with at most `num_examples` examples; train_lengths is the whole split.
  tokenizer: a tokenizer or its path (HF directory or .gguf).
  """
  from icm_jax.checkpoints import load_tokenizer
  from icm_jax.pipeline.inputs import first_whole_groups
  from icm_jax.tasks import get_task, load_examples, split_by_group
  from icm_jax.tokenization import LabelWords, tokenize_examples

  try:
    task = get_task(task_name)
  except ValueError as e:
    raise AotError(f"--config.task.name: {e}") from None
  try:
    records = load_examples(task, data_path)
  except (OSError, ValueError) as e:
    raise AotError(f"{data_arg}={data_path!r}: {e}") from None
  train = (split_by_group(records, test_fraction, seed=seed)[0]
           if split_from_test else records)
  batch = first_whole_groups(train, num_examples, "--num_examples")
  name = tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__
  if isinstance(tokenizer, str):
    tokenizer = load_tokenizer(tokenizer)
  words = LabelWords(task.false_word, task.true_word)
  tokens = tokenize_examples(tokenizer, [e.prompt for e in train],
                             ids=[e.id for e in train], words=words)
  lengths = tokens.prompt_lengths
  index = {e.id: i for i, e in enumerate(train)}
  batch_lengths = tuple(int(lengths[index[e.id]]) for e in batch)
  return Workload(
      batch_lengths, len(tokens.header), len(tokens.separator),
      tuple(len(s) for s in tokens.label_token_sets),
      train_lengths=tuple(int(x) for x in lengths),
      groups=tuple(e.group for e in batch),
      keys=tuple(e.key for e in batch), consistency_kind=task.consistency,
      description=(f"{task_name} ({data_path}), tokenizer {name}: "
                   f"{len(batch)}-example batch mean "
                   f"{np.mean(batch_lengths):.0f} / max {max(batch_lengths)} "
                   f"tokens; {len(train)} train examples mean "
                   f"{lengths.mean():.0f} / max {lengths.max()}"))


# -----------------------------------------------------------------------------
# From a run config (main.py's ConfigDict) and command-line values
# -----------------------------------------------------------------------------

# GSM8K prompts of the ICM split in SmolLM2 tokens (mean, max over the 1484
# train claims): the default length profile when no data file is at hand.
GSM8K_LENGTHS = (191, 665)
GSM8K_TRAIN_EXAMPLES = 1484


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
    if model.strip().lower() in PRESETS:
      cfg, label = model_preset(model, arg), model.strip().lower()
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
  overrides = {"dtype": "bfloat16" if dtype == "auto" else dtype,
               "param_dtype": config.model.param_dtype}
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
          task, data, tokenizer, num_examples,
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


# -----------------------------------------------------------------------------
# Static shapes: the scorer's bucketing, for given labels and queries
# -----------------------------------------------------------------------------


def chunk_rows(scoring: ScoringConfig, divisor: int) -> int:
  """LOOScorer's micro-batch: rows_per_chunk rounded up to the divisor."""
  return -(-scoring.rows_per_chunk // divisor) * divisor


def _rows(labels, queries) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels [C, N], cand_idx, query_idx) as LOOScorer.score derives them."""
  labels = np.atleast_2d(np.asarray(labels)).astype(np.int32)
  queries = labels >= 0 if queries is None else np.broadcast_to(
      np.asarray(queries, bool), labels.shape)
  cand_idx, query_idx = np.nonzero(queries)
  return labels, cand_idx, query_idx


def _example_lengths(workload: Workload) -> layout.ExampleLengths:
  return layout.ExampleLengths(workload.header_len, workload.lengths,
                               workload.sep_len)


@dataclasses.dataclass(frozen=True)
class ExactSharedLayout:
  """What LOOScorer passes in exact mode with prefix sharing: the scorer's
  own plan (icm_jax.scoring.layout.shared_layout) plus what costs need."""

  plan: layout.SharedLayout
  groups: int             # packed sequences per micro-batch
  num_rows: int           # LOO rows scored

  @property
  def cands(self) -> int:
    return self.plan.candidates

  @property
  def num_seq(self) -> int:
    return self.plan.num_seq

  @property
  def full_len(self) -> int:
    return self.plan.full_len

  @property
  def packed_len(self) -> int:
    return self.plan.packed_len

  @property
  def full(self) -> np.ndarray:
    return self.plan.full

  @property
  def slot_start(self) -> np.ndarray:
    return self.plan.slot_start

  @property
  def slot_len(self) -> np.ndarray:
    return self.plan.slot_len

  @property
  def static(self) -> tuple:
    return (self.cands, self.num_seq, self.full_len, self.packed_len)


def exact_shared_layout(workload: Workload, labels: np.ndarray,
                        queries: Optional[np.ndarray], scoring: ScoringConfig,
                        divisor: int) -> ExactSharedLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  plan = layout.shared_layout(
      _example_lengths(workload), labels, cand_idx, query_idx,
      min_rows=scoring.min_rows, min_seq_len=scoring.min_seq_len,
      groups=divisor)
  return ExactSharedLayout(plan, divisor, len(query_idx))


@dataclasses.dataclass(frozen=True)
class ExactLayout:
  """What LOOScorer passes in exact mode without sharing."""

  cands: int
  rows: int
  seq_len: int
  row_lengths: np.ndarray  # [num real rows]
  chunk: int               # rows per micro-batch

  @property
  def static(self) -> tuple:
    return (self.cands, self.rows, self.seq_len)


def exact_layout(workload: Workload, labels: np.ndarray,
                 queries: Optional[np.ndarray], scoring: ScoringConfig,
                 divisor: int, max_positions: int) -> ExactLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  chunk = chunk_rows(scoring, divisor)
  rows = layout.row_layout(labels.shape[0], cand_idx, query_idx,
                           min_rows=scoring.min_rows, chunk=chunk)
  lengths = layout.exact_row_lengths(_example_lengths(workload), labels,
                                     cand_idx, query_idx)
  seq_len = layout.exact_seq_len(lengths, min_seq_len=scoring.min_seq_len,
                                 context=max_positions)
  return ExactLayout(rows.candidates, rows.rows, seq_len, lengths, chunk)


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
  """Shapes of parallel mode: the demo cache and one query call."""

  cands: int
  rows: int
  chunk: int
  groups: int
  width: int
  end_position: int
  cache_len: int
  num_queries: int
  query_lengths: np.ndarray        # [num real rows] prompt tokens
  visible_cache_keys: np.ndarray   # [num real rows] cache keys each sees

  @property
  def static(self) -> tuple:
    return (self.cands, self.rows)


def parallel_layout(workload: Workload, labels: np.ndarray,
                    queries: Optional[np.ndarray], scoring: ScoringConfig,
                    divisor: int) -> ParallelLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  n, width, h = workload.num_examples, workload.width, workload.header_len
  tail = 1 + workload.sep_len
  chunk = chunk_rows(scoring, divisor)
  rows = layout.row_layout(labels.shape[0], cand_idx, query_idx,
                           min_rows=scoring.min_rows, chunk=chunk)
  prompts = workload.lengths[query_idx]
  # A query sees the header and every other labelled demonstration: the
  # exact-mode row without its own prompt.
  visible = layout.exact_row_lengths(_example_lengths(workload), labels,
                                     cand_idx, query_idx) - prompts
  return ParallelLayout(
      cands=rows.candidates, rows=rows.rows, chunk=chunk, groups=divisor,
      width=width, end_position=h + width + tail,
      cache_len=h + n * width + 2 * n * tail, num_queries=len(query_idx),
      query_lengths=prompts, visible_cache_keys=visible)


# -----------------------------------------------------------------------------
# Abstract inputs and the calls to compile
# -----------------------------------------------------------------------------


def abstract_params(config: LlamaConfig, mesh) -> Any:
  shapes = param_shapes(config)
  shards = sharding.param_shardings(shapes, mesh)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shards)


def _replicated(mesh, shape, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype,
                              sharding=NamedSharding(mesh, P()))


def abstract_examples(workload: Workload, mesh) -> ExampleArrays:
  n, w = workload.num_examples, workload.width
  return ExampleArrays(
      _replicated(mesh, (n, w)), _replicated(mesh, (n,)),
      _replicated(mesh, (2,)), _replicated(mesh, (max(workload.sep_len, 1),)),
      _replicated(mesh, (max(workload.header_len, 1),)))


@dataclasses.dataclass
class Call:
  """One jitted function and abstract arguments, ready to lower."""

  name: str
  description: str
  fn: Callable          # a jax.jit
  args: tuple
  cost: "Cost"           # analytic, per chip
  global_cost: "Cost"    # analytic, whole program (every chip's work)
  kv_heads: int = 0      # the model's, for advice on the tensor axis
  # Filled by compile_call for a later call that consumes this one's output.
  lowered: Any = None
  compiled: Any = None


SCORING_MODES = ("exact", "exact_unshared", "parallel")


def scoring_calls(model: LlamaConfig, mesh, workload: Workload,
                  scoring: ScoringConfig, modes: Sequence[str],
                  labels: Optional[np.ndarray] = None) -> List[Call]:
  """The kernels of one U(D) evaluation (default: all N labelled, C = 1).

  modes: "exact" (exact mode with prefix sharing: the default scorer),
  "exact_unshared" (exact, prefix_sharing=False), "parallel" (the demo cache
  build and the query call).
  """
  bad = [m for m in modes if m not in SCORING_MODES]
  if bad:
    raise AotError(f"--modes: unknown mode {bad[0]!r}; choose from "
                   f"{SCORING_MODES + ('train',)}")
  divisor = sharding.batch_divisor(mesh)
  tensor = mesh.shape["tensor"]
  n = workload.num_examples
  if labels is None:
    labels = (np.arange(n) % 2)[None].astype(np.int32)
  labels = np.atleast_2d(labels)
  batch_fn = functools.partial(sharding.batch_sharding, mesh)
  params = abstract_params(model, mesh)
  data = abstract_examples(workload, mesh)
  common = dict(model_config=model, token_sets=workload.token_sets)
  calls = []
  for mode in modes:
    if mode == "exact":
      lay = exact_shared_layout(workload, labels, None,
                                dataclasses.replace(scoring,
                                                    prefix_sharing=True),
                                divisor)
      fn = jax.jit(functools.partial(
          exact.exact_shared_scores, full_len=lay.full_len,
          packed_len=lay.packed_len, header_len=workload.header_len,
          sep_len=workload.sep_len, groups=divisor,
          batch_sharding_fn=batch_fn, **common))
      slots = [_replicated(mesh, (lay.num_seq, 2)) for _ in range(4)]
      args = (params, data, _replicated(mesh, (lay.cands, n))) + tuple(slots)
      calls.append(Call(
          "exact", f"exact (prefix sharing): one U(D), {lay.num_rows} rows "
          f"packed two a sequence into {lay.num_seq} sequences of "
          f"{lay.packed_len} tokens against F = all demonstrations, "
          f"{int(lay.full[0])} tokens (bucket {lay.full_len})",
          fn, args, exact_shared_cost(model, lay, divisor, tensor),
          exact_shared_cost(model, lay, 1, 1)))
    elif mode == "exact_unshared":
      lay = exact_layout(workload, labels, None, scoring, divisor,
                         model.max_position_embeddings)
      chunk = chunk_rows(scoring, divisor)
      fn = jax.jit(functools.partial(
          exact.exact_scores, seq_len=lay.seq_len,
          header_len=workload.header_len, sep_len=workload.sep_len,
          rows_per_chunk=chunk, batch_sharding_fn=batch_fn, **common))
      args = (params, data, _replicated(mesh, (lay.cands, n)),
              _replicated(mesh, (lay.rows,)), _replicated(mesh, (lay.rows,)))
      calls.append(Call(
          "exact_unshared", f"exact (no sharing): one U(D), {lay.rows} rows "
          f"of {lay.seq_len} tokens, {chunk} per micro-batch", fn, args,
          exact_cost(model, lay, divisor, tensor),
          exact_cost(model, lay, 1, 1)))
    else:  # parallel
      lay = parallel_layout(workload, labels, None, scoring, divisor)
      cache_fn = jax.jit(functools.partial(
          parallel.build_demo_cache, model_config=model,
          header_len=workload.header_len, sep_len=workload.sep_len,
          end_position=lay.end_position, rows_per_chunk=lay.chunk,
          batch_sharding_fn=batch_fn))
      calls.append(Call(
          "parallel_cache", f"parallel: demo KV cache of {2 * n} (example, "
          f"label) slots of {lay.width + 1 + workload.sep_len} tokens, "
          f"{lay.chunk} per micro-batch -> {lay.cache_len} keys",
          cache_fn, (params, data),
          parallel_cache_cost(model, workload, lay, divisor, tensor),
          parallel_cache_cost(model, workload, lay, 1, 1)))
      query_fn = jax.jit(functools.partial(
          parallel.parallel_scores, end_position=lay.end_position,
          rows_per_chunk=lay.chunk, groups=divisor,
          batch_sharding_fn=batch_fn, **common))
      # The cache's shape (and, once compiled, its sharding) is the build's.
      query_args = (params, data, None, _replicated(mesh, (lay.cands, n)),
                    _replicated(mesh, (lay.rows,)),
                    _replicated(mesh, (lay.rows,)))
      calls.append(Call(
          "parallel_query", f"parallel: one U(D), {lay.rows} query rows of "
          f"{lay.width} tokens, {lay.chunk} per micro-batch, each against "
          f"the {lay.cache_len}-key cache", query_fn, query_args,
          parallel_query_cost(model, lay, divisor, tensor),
          parallel_query_cost(model, lay, 1, 1)))
  for call in calls:
    call.kv_heads = model.num_kv_heads
  return calls



def train_call(model: LlamaConfig, mesh, workload: Workload,
               train: TrainConfig, seq_len: int, num_train_examples: int,
               compute_dtype: str = "bfloat16") -> Call:
  """The trainer's jitted step, as `train()` builds it, on abstract inputs."""
  from icm_jax.training.trainer import (OPT_STATE_RULES, _abstract,
                                        _row_sharding, make_optimizer,
                                        make_train_step, resolve_compute_dtype)
  divisor = sharding.batch_divisor(mesh)
  if train.micro_batch_size % divisor:
    raise AotError(
        f"--config.train.batch_size={train.batch_size} / grad_accum_steps="
        f"{train.grad_accum_steps} = {train.micro_batch_size} rows per "
        f"micro-batch must be a multiple of the mesh's data*fsdp={divisor}")
  total_steps = train_data.num_steps(max(num_train_examples, 1),
                                     train.num_epochs, train.batch_size)
  dtype = (compute_dtype if train.compute_dtype == "auto"
           else resolve_compute_dtype(train.compute_dtype))
  forward_config = dataclasses.replace(model, dtype=dtype, remat=train.remat)
  optimizer, _ = make_optimizer(train, total_steps)
  shapes = param_shapes(model)
  abstract = _abstract(shapes)
  p_shardings = sharding.param_shardings(abstract, mesh)
  abstract_opt = jax.eval_shape(optimizer.init, abstract)
  o_shardings = sharding.param_shardings(abstract_opt, mesh, OPT_STATE_RULES)
  batch_shardings = {"tokens": _row_sharding(mesh, 3)}
  for name in ("lengths", "labels", "weights"):
    batch_shardings[name] = _row_sharding(mesh, 2)
  fn = jax.jit(
      make_train_step(forward_config, optimizer, workload.token_sets),
      in_shardings=(p_shardings, o_shardings, batch_shardings),
      out_shardings=(p_shardings, o_shardings, NamedSharding(mesh, P())),
      donate_argnums=(0, 1))
  a, m = train.grad_accum_steps, train.micro_batch_size
  batch = {"tokens": jax.ShapeDtypeStruct((a, m, seq_len), jnp.int32,
                                          sharding=batch_shardings["tokens"])}
  for name, dtype_ in (("lengths", jnp.int32), ("labels", jnp.int32),
                       ("weights", jnp.float32)):
    batch[name] = jax.ShapeDtypeStruct((a, m), dtype_,
                                       sharding=batch_shardings[name])
  args = (_abstract(abstract, p_shardings), _abstract(abstract_opt,
                                                      o_shardings), batch)
  return Call(
      "train", f"train step: batch {train.batch_size} ({a} x {m} rows) of "
      f"{seq_len} tokens, compute {dtype}, remat={train.remat}, AdamW",
      fn, args,
      train_step_cost(forward_config, seq_len, train, divisor,
                      mesh.shape["tensor"], sharding_chips=mesh.size),
      train_step_cost(forward_config, seq_len, train, 1, 1, 1),
      kv_heads=model.num_kv_heads)


# -----------------------------------------------------------------------------
# Compile and report
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class CallReport:
  name: str
  description: str
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  xla_flops: float        # cost_analysis, per chip, loop bodies counted once
  xla_bytes: float
  lower_seconds: float
  compile_seconds: float
  cost: "Cost"            # analytic, per chip
  device_kinds: Tuple[str, ...]
  hlo_platform: str
  # Set when libtpu refused to compile because the program cannot fit:
  # its message; temp_bytes is then the compiler's stated requirement (or
  # its total, see _parse_oom) and the other sizes come from the inputs.
  compiler_error: Optional[str] = None
  kv_heads: int = 0

  @property
  def total_bytes(self) -> int:
    """Per-chip HBM: arguments + outputs - aliased (donated) + temps + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes + self.code_bytes)


def _hlo_platform(text: str) -> str:
  """'tpu' if the compiled module uses TPU tiled layouts, else 'other'."""
  return "tpu" if re.search(r"\{[0-9,]*:T\([0-9]+,128\)", text) else "other"


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
          "T": 1 << 40}
_OOM_TEMP = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)i?B?\)")
_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT]?)i?B? of ([0-9.]+)([KMGT]?)i?B?"
                       r" hbm")


def _parse_oom(message: str) -> Optional[Tuple[str, int]]:
  """('temp', bytes) or ('total', bytes) from a libtpu out-of-HBM error."""
  if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
    return None
  found = _OOM_TEMP.search(message)
  if found:
    return "temp", int(float(found.group(1)) * _UNITS[found.group(2)])
  found = _OOM_USED.search(message)
  if found:
    return "total", int(float(found.group(1)) * _UNITS[found.group(2)])
  return None


def _per_chip_bytes(tree) -> int:
  """Bytes one chip holds of abstract arrays placed by their shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    if getattr(leaf, "sharding", None) is not None:
      shape = leaf.sharding.shard_shape(shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


def _cache_sharding_guess(out_info, mesh):
  """A DemoCache's shardings: KV heads over 'tensor' when they divide."""
  def one(x):
    spec = [None] * len(x.shape)
    if len(x.shape) == 5 and x.shape[3] % mesh.shape["tensor"] == 0:
      spec[3] = "tensor"
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(one, out_info)


def compile_call(call: Call, mesh, previous: Optional[Call] = None
                 ) -> CallReport:
  """Lowers and compiles `call` for the mesh's devices; per-chip report.

  parallel_query takes the cache built by `previous` (parallel_cache): its
  shapes and output shardings fill the missing argument. When libtpu refuses
  a program that cannot fit in HBM, the report carries its message (see
  CallReport.compiler_error) instead of raising.
  """
  args = call.args
  if call.name == "parallel_query":
    if previous is None or previous.lowered is None:
      raise ValueError("parallel_query needs the lowered parallel_cache")
    if previous.compiled is not None:
      shards = previous.compiled.output_shardings
    else:  # the build did not fit: assume the layout it would have had
      shards = _cache_sharding_guess(previous.lowered.out_info, mesh)
    cache_shapes = jax.tree.map(
        lambda out, s: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=s),
        previous.lowered.out_info, shards)
    args = args[:2] + (cache_shapes,) + args[3:]
    call.args = args
  kinds = tuple(sorted({d.device_kind for d in mesh.devices.flat}))
  with jax.set_mesh(mesh):
    began = time.perf_counter()
    lowered = call.fn.lower(*args)
    call.lowered = lowered
    lowered_at = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only out-of-HBM is reported
      oom = _parse_oom(str(e))
      if oom is None:
        raise
      done = time.perf_counter()
      what, size = oom
      arguments = _per_chip_bytes(args)
      outputs = _per_chip_bytes(lowered.out_info)
      return CallReport(
          name=call.name, description=call.description,
          argument_bytes=arguments, output_bytes=outputs,
          temp_bytes=size if what == "temp" else max(
              size - arguments - outputs, 0),
          alias_bytes=0, code_bytes=0, xla_flops=float("nan"),
          xla_bytes=float("nan"), lower_seconds=lowered_at - began,
          compile_seconds=done - lowered_at, cost=call.cost,
          device_kinds=kinds, hlo_platform="tpu",
          compiler_error=" ".join(str(e).split())[:500],
          kv_heads=call.kv_heads)
    done = time.perf_counter()
  call.compiled = compiled
  memory = compiled.memory_analysis()
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else {}
  costs = costs or {}
  return CallReport(
      name=call.name, description=call.description,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      xla_flops=float(costs.get("flops", float("nan"))),
      xla_bytes=float(costs.get("bytes accessed", float("nan"))),
      lower_seconds=lowered_at - began, compile_seconds=done - lowered_at,
      cost=call.cost, device_kinds=kinds,
      hlo_platform=_hlo_platform(compiled.as_text()), kv_heads=call.kv_heads)


def compile_calls(calls: Sequence[Call], mesh,
                  progress: Optional[Callable[[str], None]] = None
                  ) -> List[CallReport]:
  reports, previous = [], None
  for call in calls:
    if progress:
      progress(f"compiling {call.name}: {call.description}")
    reports.append(compile_call(call, mesh, previous))
    previous = call
  return reports


# -----------------------------------------------------------------------------
# Fit check
# -----------------------------------------------------------------------------


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def fit_advice(report: CallReport, mesh_shape: Dict[str, int]) -> List[str]:
  """What to change, from the component that dominates the footprint."""
  args = report.argument_bytes - report.alias_bytes
  parts = {"arguments": args, "temporaries": report.temp_bytes,
           "outputs": report.output_bytes}
  main = max(parts, key=parts.get)
  fsdp, tensor = mesh_shape.get("fsdp", 1), mesh_shape.get("tensor", 1)
  heads = report.kv_heads
  # A larger tensor axis helps KV caches only while it still splits KV heads.
  more_tensor = ("shard KV heads over a larger tensor axis (--mesh "
                 f"tensor=... > {tensor}"
                 + (f", up to the {heads} KV heads" if heads else "") + ")"
                 if not heads or tensor < heads else None)
  advice = []
  if main == "arguments":
    advice.append(
        f"arguments ({_gib(args)}/chip: params"
        f"{' + optimizer state' if report.name == 'train' else ''}) dominate: "
        f"shard them over more chips (a larger fsdp axis than {fsdp}: "
        "--mesh data=1,fsdp=-1,tensor=1 uses every chip; or a bigger "
        "--topology)")
    if report.name != "train":
      advice.append("store the scoring params in bfloat16 "
                    "(--config.model.param_dtype=bfloat16)")
  elif report.name == "train":
    advice.append(
        f"temporaries ({_gib(report.temp_bytes)}/chip, activations) "
        "dominate: a smaller micro-batch (raise "
        "--config.train.grad_accum_steps), --config.train.remat=True if it is "
        "off, or shorter rows; more chips spread the batch further")
  elif report.name in ("exact", "exact_unshared"):
    advice.append(
        f"temporaries ({_gib(report.temp_bytes)}/chip) dominate: exact-mode "
        "rows are as long as all N demonstrations together, and their KV "
        "cache, [B, T, S] mask and activations grow with N (about "
        "quadratically)")
    if more_tensor:
      advice.append(more_tensor)
    advice.append("use fewer examples per search (--config.label.batch_size "
                  "/ --num_examples), or one-pass scoring "
                  "(--config.scoring.mode=parallel)")
    if report.name == "exact_unshared":
      advice.append("lower --config.scoring.rows_per_chunk (rows per "
                    "micro-batch; the minimum is the mesh's data*fsdp)")
  else:  # parallel cache / query: outputs or temporaries
    advice.append(
        f"{main} ({_gib(parts[main])}/chip) dominate: the demonstration KV "
        "cache is one sequence, replicated over the data-parallel axes; only "
        "the tensor axis splits it")
    if more_tensor:
      advice.append(more_tensor)
    advice.append("use fewer examples per search (--config.label.batch_size "
                  "/ --num_examples), or lower --config.scoring.rows_per_chunk"
                  " (the minimum is the mesh's data*fsdp)")
  return advice


def fits(report: CallReport, limit: int) -> bool:
  return report.compiler_error is None and report.total_bytes <= limit


def fit_lines(reports: Sequence[CallReport], chip: Chip,
              hbm_bytes: Optional[int] = None) -> List[str]:
  """One verdict line per call."""
  limit = chip.hbm_bytes if hbm_bytes is None else int(hbm_bytes)
  return [f"{r.name}: {_gib(r.total_bytes)} of {_gib(limit)} {chip.name} "
          f"HBM per chip -> {'fits' if fits(r, limit) else 'DOES NOT FIT'}"
          for r in reports]


def check_fit(reports: Sequence[CallReport], chip: Chip, mesh_shape: Dict,
              hbm_bytes: Optional[int] = None) -> List[str]:
  """Verdict lines; raises DoesNotFit (with advice) if any call is too big."""
  limit = chip.hbm_bytes if hbm_bytes is None else int(hbm_bytes)
  failures = []
  for r in reports:
    if fits(r, limit):
      continue
    refused = (f" libtpu refused to compile it ({r.compiler_error})."
               if r.compiler_error else "")
    failures.append(
        f"{r.name} needs {_gib(r.total_bytes)} per chip > {_gib(limit)} "
        f"HBM of a {chip.name} chip (arguments {_gib(r.argument_bytes)}, "
        f"outputs {_gib(r.output_bytes)}, temporaries {_gib(r.temp_bytes)}"
        f", aliased {_gib(r.alias_bytes)}).{refused} Suggestions: " +
        "; ".join(fit_advice(r, mesh_shape)))
  if failures:
    raise DoesNotFit("\n".join(failures))
  return fit_lines(reports, chip, hbm_bytes)


# -----------------------------------------------------------------------------
# Analytic costs (per chip)
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Cost:
  """Per-chip work of one call.

  matmul_flops: projections + MLP of every token run (padding included) and
    the lm head at the positions read; attention_visible_flops /
    attention_dense_flops: 4 * heads * head_dim * layers per (query, key)
    pair the mask allows / of the whole padded grid; hbm_bytes: a lower bound on HBM
    traffic (weights once per micro-batch pass, KV cache reads, each matmul's
    activation input and output once, optimizer update).
  """

  matmul_flops: float = 0.0
  attention_visible_flops: float = 0.0
  attention_dense_flops: float = 0.0
  hbm_bytes: float = 0.0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(*(a + b for a, b in zip(dataclasses.astuple(self),
                                        dataclasses.astuple(other))))

  def __mul__(self, k: float) -> "Cost":
    return Cost(*(a * k for a in dataclasses.astuple(self)))

  __rmul__ = __mul__

  @property
  def flops(self) -> float:
    """Matmul + visible-pair attention FLOPs (the roofline's compute)."""
    return self.matmul_flops + self.attention_visible_flops

  def seconds(self, chip: Chip) -> Tuple[float, float]:
    """(compute-bound, memory-bound) seconds on one chip at peak."""
    return self.flops / chip.peak_flops, self.hbm_bytes / chip.hbm_bandwidth

  def roofline(self, chip: Chip) -> float:
    return max(self.seconds(chip))


def _layer_matmul_params(cfg: LlamaConfig) -> int:
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return d * (q + 2 * kv) + q * d + 3 * d * f


def _activation_elements(cfg: LlamaConfig) -> int:
  """Per token per layer: each projection's input and output once."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return (d + q + 2 * kv) + (q + d) + (d + 2 * f) + (f + d)


def _kv_bytes_per_token(cfg: LlamaConfig) -> int:
  """K and V of one token over all layers, in the compute dtype."""
  return (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim *
          cfg.compute_dtype.itemsize)


def _heads_split(cfg: LlamaConfig, tensor: int) -> int:
  return tensor if cfg.num_heads % tensor == 0 else 1


def _kv_split(cfg: LlamaConfig, tensor: int) -> int:
  return tensor if cfg.num_kv_heads % tensor == 0 else 1


def forward_cost(cfg: LlamaConfig, *, tokens: float, logits: float,
                 visible_pairs: float, dense_pairs: float,
                 cache_keys_read: float = 0.0, kv_written: float = 0.0,
                 passes: float = 1.0, tensor: int = 1) -> Cost:
  """One chip's forward over `tokens` tokens in `passes` micro-batch passes.

  cache_keys_read: prefix keys read (summed over rows); kv_written: tokens
  whose keys/values are returned (a KV cache output).
  """
  item = cfg.compute_dtype.itemsize
  lp = _layer_matmul_params(cfg) * cfg.num_layers
  head = cfg.hidden_size * cfg.vocab_size
  per_pair = (4 * cfg.num_heads * cfg.head_dim * cfg.num_layers /
              _heads_split(cfg, tensor))
  weights = (lp + (head if logits else 0)) * item * passes
  activations = tokens * _activation_elements(cfg) * cfg.num_layers * item
  kv = (cache_keys_read + kv_written) * _kv_bytes_per_token(cfg) / _kv_split(
      cfg, tensor)
  return Cost(
      matmul_flops=(2 * lp * tokens + 2 * head * logits) / tensor,
      attention_visible_flops=per_pair * visible_pairs,
      attention_dense_flops=per_pair * dense_pairs,
      hbm_bytes=(weights + activations) / tensor + kv)


def _causal_pairs(n) -> float:
  n = np.asarray(n, np.float64)
  return n * (n + 1) / 2


def _share(global_rows: int, divisor: int) -> Tuple[int, float]:
  """(rows a chip runs, its share of the real work) of a batch split over
  `divisor` chips; an uneven batch is padded, so C < divisor rows are run
  in full on every chip."""
  rows = -(-global_rows // divisor)
  return rows, rows / global_rows


def exact_shared_cost(cfg: LlamaConfig, lay: ExactSharedLayout, divisor: int,
                      tensor: int) -> Cost:
  """F's keys/values per assignment, then the packed suffix sequences."""
  rows, _ = _share(lay.cands, divisor)
  prefix = forward_cost(
      cfg, tokens=rows * lay.full_len, logits=0,
      visible_pairs=rows * _causal_pairs(lay.full.max()),
      dense_pairs=rows * lay.full_len ** 2, kv_written=rows * lay.full_len,
      tensor=tensor)
  batches = lay.num_seq // lay.groups
  seqs, share = _share(lay.groups, divisor)
  real = lay.slot_len > 0
  visible = (np.where(real, lay.slot_len * lay.slot_start, 0).sum() +
             _causal_pairs(lay.slot_len)[real].sum())
  suffixes = forward_cost(
      cfg, tokens=batches * seqs * lay.packed_len, logits=2 * batches * seqs,
      visible_pairs=visible * share,
      dense_pairs=batches * seqs * lay.packed_len * (lay.full_len +
                                                     lay.packed_len),
      # Each micro-batch gathers its candidates' F cache (a copy), reads it.
      cache_keys_read=2 * batches * seqs * lay.full_len, passes=batches,
      tensor=tensor)
  return prefix + suffixes


def exact_cost(cfg: LlamaConfig, lay: ExactLayout, divisor: int,
               tensor: int) -> Cost:
  batches = lay.rows // lay.chunk
  rows, share = _share(lay.chunk, divisor)
  return forward_cost(
      cfg, tokens=batches * rows * lay.seq_len, logits=batches * rows,
      visible_pairs=_causal_pairs(lay.row_lengths).sum() * share,
      dense_pairs=batches * rows * lay.seq_len ** 2, passes=batches,
      tensor=tensor)


def parallel_cache_cost(cfg: LlamaConfig, workload: Workload,
                        lay: ParallelLayout, divisor: int, tensor: int
                        ) -> Cost:
  n, h = workload.num_examples, workload.header_len
  row_len = lay.width + 1 + workload.sep_len
  batches = -(-2 * n // lay.chunk)
  rows, share = _share(lay.chunk, divisor)
  real = np.concatenate([workload.lengths, workload.lengths]) + 1 + \
      workload.sep_len
  header = forward_cost(cfg, tokens=h, logits=0,
                        visible_pairs=_causal_pairs(h), dense_pairs=h * h,
                        kv_written=h, tensor=tensor) if h else Cost()
  demos = forward_cost(
      cfg, tokens=batches * rows * row_len, logits=0,
      visible_pairs=(_causal_pairs(real).sum() + real.sum() * h) * share,
      dense_pairs=batches * rows * row_len * (row_len + h),
      cache_keys_read=batches * rows * h, kv_written=batches * rows * row_len,
      passes=batches, tensor=tensor)
  return header + demos


def parallel_query_cost(cfg: LlamaConfig, lay: ParallelLayout, divisor: int,
                        tensor: int) -> Cost:
  per_group = lay.chunk // lay.groups
  q_len = per_group * lay.width
  batches = lay.rows // lay.chunk
  seqs, share = _share(lay.groups, divisor)
  visible = ((lay.query_lengths * lay.visible_cache_keys).sum() +
             _causal_pairs(lay.query_lengths).sum())
  return forward_cost(
      cfg, tokens=batches * seqs * q_len, logits=batches * seqs * per_group,
      visible_pairs=visible * share,
      dense_pairs=batches * seqs * q_len * (lay.cache_len + q_len),
      cache_keys_read=batches * seqs * lay.cache_len, passes=batches,
      tensor=tensor)


def train_step_cost(cfg: LlamaConfig, seq_len: int, train: TrainConfig,
                    divisor: int, tensor: int, sharding_chips: int,
                    real_lengths: Optional[np.ndarray] = None) -> Cost:
  """Forward, backward (2x) and, with remat, the recomputed forward; AdamW.

  The recomputation (remat) skips what the backward pass does not need: the
  lm head and each layer's down projection (whose output only feeds the next
  layer). real_lengths: the rows' true lengths (visible attention pairs);
  default every row full.
  """
  batches = train.grad_accum_steps
  rows, share = _share(train.micro_batch_size, divisor)
  if real_lengths is None:
    real_lengths = np.full(train.batch_size, seq_len)
  tokens, logits = batches * rows * seq_len, batches * rows
  fwd = forward_cost(
      cfg, tokens=tokens, logits=logits,
      visible_pairs=_causal_pairs(real_lengths).sum() * share,
      dense_pairs=batches * rows * seq_len ** 2, passes=batches,
      tensor=tensor)
  total = fwd * 3.0
  if cfg.remat:
    skipped = 2.0 * cfg.hidden_size * (
        cfg.intermediate_size * cfg.num_layers * tokens +
        cfg.vocab_size * logits) / tensor
    total = total + dataclasses.replace(
        fwd, matmul_flops=fwd.matmul_flops - skipped)
  # AdamW in the params' dtype: read p, g, mu, nu; write p, mu, nu; the
  # gradient accumulator written once.
  update = Cost(hbm_bytes=8 * cfg.num_params() * cfg.params_dtype.itemsize /
                sharding_chips)
  return total + update


# -----------------------------------------------------------------------------
# Trip-count-aware matmul FLOPs of a traced program (the analytic check)
# -----------------------------------------------------------------------------


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params["dimension_numbers"]
  k = math.prod(lhs.shape[d] for d in contract)
  return 2.0 * k * math.prod(eqn.outvars[0].aval.shape)


def _sub_jaxprs(value):
  from jax.extend import core as jex_core
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _count_jaxpr(jaxpr, stats: Dict[str, int]) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _count_jaxpr(eqn.params["jaxpr"].jaxpr,
                                                  stats)
    elif name == "cond":
      total += max(_count_jaxpr(b.jaxpr, stats) for b in eqn.params["branches"])
    elif name == "while":
      stats["while"] = stats.get("while", 0) + 1   # trip count unknown: once
      total += _count_jaxpr(eqn.params["body_jaxpr"].jaxpr, stats)
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      axes = eqn.params.get("newly_manual_axes") or eqn.params.get(
          "manual_axes") or mesh.axis_names
      shards = math.prod(dict(mesh.shape)[a] for a in axes)
      total += shards * _count_jaxpr(eqn.params["jaxpr"], stats)
    elif name == "pallas_call":
      stats["pallas_call"] = stats.get("pallas_call", 0) + 1
    else:
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _count_jaxpr(sub, stats)
  return total


def jaxpr_matmul_flops(call: Call, mesh, args: Optional[tuple] = None
                       ) -> Tuple[float, Dict[str, int]]:
  """Global dot_general FLOPs of the traced call after dead-code removal.

  Scan bodies count `length` times; pallas_call kernels (splash attention)
  are not counted (stats["pallas_call"] says how many were skipped).
  """
  from jax._src.interpreters import partial_eval as pe
  with jax.set_mesh(mesh):
    closed = call.fn.trace(*(call.args if args is None else args)).jaxpr
  jaxpr = closed.jaxpr
  try:
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars),
                            instantiate=True)
  except Exception:  # pragma: no cover - private API drift: count without DCE
    pass
  stats: Dict[str, int] = {}
  return _count_jaxpr(jaxpr, stats), stats
