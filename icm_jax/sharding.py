"""Device mesh, parameter/activation sharding and multi-host start-up.

One 3-axis mesh serves every job:

  'data'   pure data parallelism (params replicated across it),
  'fsdp'   data parallelism whose params/optimizer state are sharded (ZeRO-3),
  'tensor' Megatron-style tensor parallelism inside each layer.

The batch axis of activations is split over ('data', 'fsdp'). Params are
placed by a regex-on-path -> PartitionSpec table (`LLAMA_RULES`); a param no
rule matches is an error, and a dim that a mesh axis does not divide is
replicated over that axis (logged) rather than failing inside XLA.

Typical use:

  mesh = create_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
  shardings = param_shardings(param_shapes(config), mesh)
  params = shard_params(params, shardings)
  fwd = make_sharded_forward(config, mesh)
  with jax.set_mesh(mesh):
    logits = fwd(params, tokens, positions, mask)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from icm_jax.model.config import LlamaConfig
from icm_jax.model.llama import (KVCache, forward, init_params, key_path_names,
                                 param_shapes)
# The axis names are the model's: its shard_mapped TPU attention kernel splits
# the batch over BATCH_AXES (both data-parallel axes) and heads over HEAD_AXIS.
from icm_jax.model.splash_attention import BATCH_AXES, HEAD_AXIS

AXES: Tuple[str, str, str] = (*BATCH_AXES, HEAD_AXIS)

PyTree = Any
# (regex searched in the '/'-joined param path, spec with one entry per dim).
Rule = Tuple[str, P]

# -----------------------------------------------------------------------------
# Mesh
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the ('data', 'fsdp', 'tensor') mesh axes; one may be -1 (fill)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def __post_init__(self):
    for axis in AXES:
      size = getattr(self, axis)
      if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
          size < 1 and size != -1):
        raise ValueError(f"mesh axis {axis!r} size must be a positive int or "
                         f"-1 (fill), got {size!r}")
    if sum(getattr(self, a) == -1 for a in AXES) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self.sizes}")

  @property
  def sizes(self) -> dict:
    return {axis: int(getattr(self, axis)) for axis in AXES}

  @classmethod
  def from_any(cls, cfg: Union["MeshConfig", Mapping[str, int], Any, None]
               ) -> "MeshConfig":
    """From a MeshConfig, a dict, an ml_collections ConfigDict or None."""
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise TypeError(f"mesh config must be a MeshConfig or mapping, got "
                      f"{type(cfg).__name__}")
    unknown = set(cfg) - set(AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a "
                       f"subset of {AXES}")
    return cls(**{k: int(v) for k, v in cfg.items()})

  def resolve(self, num_devices: int) -> Tuple[int, int, int]:
    """Axis sizes with -1 filled in; their product must be num_devices."""
    sizes = self.sizes
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [a for a, s in sizes.items() if s == -1]
    if fill:
      if num_devices % fixed:
        raise ValueError(
            f"cannot fill mesh axis {fill[0]!r}: the other axis sizes {sizes} "
            f"multiply to {fixed}, which does not divide the {num_devices} "
            "devices")
      sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
      raise ValueError(
          f"mesh axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
          f"but there are {num_devices} devices")
    return tuple(sizes[a] for a in AXES)


def create_mesh(cfg: Union[MeshConfig, Mapping[str, int], Any, None] = None,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh, all axes AxisType.Auto.

  devices: defaults to jax.devices(); pass e.g. the devices of a
  jax.experimental.topologies topology for AOT compilation. On TPU the device
  order follows the physical topology (mesh_utils); devices spread over
  several slices get a hybrid mesh whose 'data' axis spans the slices (DCN).
  """
  cfg = MeshConfig.from_any(cfg)
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("create_mesh: empty device list")
  shape = cfg.resolve(len(devices))
  device_array = _device_array(shape, devices)
  return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _device_array(shape: Tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    num_slices = len(slices)
    if shape[0] % num_slices:
      raise ValueError(
          f"devices span {num_slices} slices, so the 'data' axis (size "
          f"{shape[0]}) must be a multiple of {num_slices}; mesh sizes "
          f"{dict(zip(AXES, shape))}")
    per_slice = (shape[0] // num_slices,) + tuple(shape[1:])
    return mesh_utils.create_hybrid_device_mesh(
        per_slice, (num_slices,) + (1,) * (len(shape) - 1), devices)
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    try:
      return mesh_utils.create_device_mesh(shape, devices,
                                           allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      logging.warning("no topology-aware device mesh of shape %s (%s); "
                      "using the plain device order", shape, e)
      return np.asarray(devices, dtype=object).reshape(shape)


# -----------------------------------------------------------------------------
# Partition specs
# -----------------------------------------------------------------------------

# Megatron layout: column-parallel projections (q/k/v/gate/up) split their
# output over 'tensor', row-parallel ones (o/down) their input; the other dim
# is FSDP-sharded. The stacked [num_layers] axis is never sharded.
LLAMA_RULES: Tuple[Rule, ...] = (
    (r"(^|/)embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),
    (r"(^|/)layers/self_attn/(q|k|v)_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"(^|/)layers/self_attn/o_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"(^|/)layers/mlp/(gate|up)_proj/kernel$", P(None, "fsdp", "tensor")),
    (r"(^|/)layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"(^|/)layers/(input|post_attention)_layernorm/scale$", P(None, None)),
    (r"(^|/)norm/scale$", P(None)),
    # Qwen2's q/k/v biases follow their kernels' output dim; Qwen3's per-head
    # q/k norms span head_dim only, which 'tensor' splits heads around.
    (r"(^|/)layers/self_attn/(q|k|v)_proj/bias$", P(None, "tensor")),
    (r"(^|/)layers/self_attn/(q|k)_norm/scale$", P(None, None)),
)


def path_to_str(path: Tuple[Any, ...]) -> str:
  """'/'-joined key path, e.g. 'layers/self_attn/q_proj/kernel'."""
  return "/".join(key_path_names(path))


def _axes_of(entry) -> Tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "array"
             ) -> P:
  """`spec` with every mesh axis that does not divide its dim dropped.

  Raises on a rank mismatch, an axis the mesh lacks, or an axis used twice.
  Dropped axes (that dim is replicated over them) are logged.
  """
  shape = tuple(shape)
  if len(spec) != len(shape):
    raise ValueError(f"{name}: partition spec {spec} has {len(spec)} entries "
                     f"but the array has shape {shape}")
  seen = set()
  out = []
  for dim, (size, entry) in enumerate(zip(shape, spec)):
    kept, factor = [], 1
    for axis in _axes_of(entry):
      if axis not in mesh.shape:
        raise ValueError(f"{name}: partition spec {spec} names mesh axis "
                         f"{axis!r}, not one of {tuple(mesh.shape)}")
      if axis in seen:
        raise ValueError(f"{name}: partition spec {spec} uses mesh axis "
                         f"{axis!r} twice")
      seen.add(axis)
      n = mesh.shape[axis]
      if size % (factor * n):
        logging.warning(
            "%s: dim %d (size %d) is not divisible by mesh axis %r (size %d%s);"
            " replicating it over %r", name, dim, size, axis, n,
            f", after {kept}" if kept else "", axis)
        continue
      kept.append(axis)
      factor *= n
    out.append(None if not kept else kept[0] if len(kept) == 1 else
               tuple(kept))
  return P(*out)


def param_partition_specs(shapes: PyTree, mesh: Mesh,
                          rules: Sequence[Rule] = LLAMA_RULES) -> PyTree:
  """PartitionSpec per leaf of `shapes` (arrays or ShapeDtypeStructs).

  The first rule whose regex is found in the leaf's path wins; leaves no rule
  matches raise a ValueError naming them all. Works for optimizer state too
  (paths such as '0/mu/layers/mlp/up_proj/kernel' still match); add rules for
  extra leaves such as step counters.
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
  unmatched = []

  def one(path, leaf):
    name = path_to_str(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        return fit_spec(spec, np.shape(leaf), mesh, name)
    unmatched.append(f"{name} {tuple(np.shape(leaf))}")
    return P()

  specs = jax.tree_util.tree_map_with_path(one, shapes)
  if unmatched:
    raise ValueError("no partition rule matches: " + ", ".join(unmatched))
  return specs


def param_shardings(shapes: PyTree, mesh: Mesh,
                    rules: Sequence[Rule] = LLAMA_RULES) -> PyTree:
  """NamedSharding per leaf; see param_partition_specs."""
  specs = param_partition_specs(shapes, mesh, rules)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def shard_params(params: PyTree, shardings: PyTree) -> PyTree:
  """Places `params` (host or device arrays) according to `shardings`."""
  return jax.device_put(params, shardings)


def init_sharded_params(config: LlamaConfig, mesh: Mesh, rng: jax.Array,
                        rules: Sequence[Rule] = LLAMA_RULES) -> PyTree:
  """Random params created directly in their shards (never whole on one chip)."""
  shardings = param_shardings(param_shapes(config), mesh, rules)
  return jax.jit(functools.partial(init_params, config),
                 out_shardings=shardings)(rng)


# -----------------------------------------------------------------------------
# Activations
# -----------------------------------------------------------------------------


def batch_spec(ndim: int) -> P:
  """[B, ...] arrays: B over ('data', 'fsdp'), the rest replicated."""
  if ndim < 1:
    raise ValueError(f"batch arrays need a leading batch dim, got ndim={ndim}")
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """NamedSharding of batch_spec(ndim). B must divide by data*fsdp."""
  return NamedSharding(mesh, batch_spec(ndim))


def batch_divisor(mesh: Mesh) -> int:
  """Global batch sizes must be multiples of this (data * fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def kv_cache_spec(config: LlamaConfig, mesh: Mesh) -> KVCache:
  """Specs of KVCache(k, v) [L, B, S, kv_heads, head_dim].

  B over ('data', 'fsdp'); kv heads over 'tensor' when it divides them.
  """
  heads = "tensor" if config.num_kv_heads % mesh.shape["tensor"] == 0 else None
  if heads is None:
    logging.warning("num_kv_heads=%d not divisible by tensor=%d; KV cache "
                    "heads replicated", config.num_kv_heads,
                    mesh.shape["tensor"])
  spec = P(None, BATCH_AXES, None, heads, None)
  return KVCache(spec, spec)


def kv_pool_sharding(config: LlamaConfig, mesh: Mesh) -> KVCache:
  """Tree mode's key/value pool [L, tokens, kv_heads, head_dim]: kv heads
  over 'tensor' (as kv_cache_spec), tokens replicated over the batch axes
  (every segment gathers its prefix from any part of the pool)."""
  spec = kv_cache_spec(config, mesh).k
  pool = NamedSharding(mesh, P(None, None, spec[3], None))
  return KVCache(pool, pool)


def kv_cache_sharding(config: LlamaConfig, mesh: Mesh) -> KVCache:
  spec = kv_cache_spec(config, mesh)
  return KVCache(NamedSharding(mesh, spec.k), NamedSharding(mesh, spec.v))


def logits_spec(config: LlamaConfig, mesh: Mesh) -> P:
  """[B, T, V] logits: B over ('data', 'fsdp'), V over 'tensor' if divisible."""
  vocab = "tensor" if config.vocab_size % mesh.shape["tensor"] == 0 else None
  return P(BATCH_AXES, None, vocab)


def make_sharded_forward(config: LlamaConfig, mesh: Mesh, *,
                         kv_cache: bool = False,
                         logit_positions: bool = False,
                         return_kv: bool = False,
                         return_hidden: bool = False,
                         rules: Sequence[Rule] = LLAMA_RULES) -> Callable:
  """jax.jit of `forward` with in/out shardings on `mesh`.

  The result is called positionally as
    fn(params, tokens, positions, attention_mask[, kv_cache][, logit_positions])
  (the optional arguments present iff enabled here) and returns logits [B,T|P,V]
  (or hidden states [B,T|P,D] if return_hidden), plus a KVCache if return_kv.
  Batch dims are split over ('data', 'fsdp'), so B must be a multiple of
  batch_divisor(mesh). `params` must be placed as param_shardings(...) says
  (or be host arrays). Call it under `with jax.set_mesh(mesh):`. The returned
  object is a plain jax.jit, so `.lower(...)` works for AOT compilation.
  """
  p_shard = param_shardings(param_shapes(config), mesh, rules)
  b2, b3 = batch_sharding(mesh, 2), batch_sharding(mesh, 3)
  in_shardings = [p_shard, b2, b2, b3]
  if kv_cache:
    in_shardings.append(kv_cache_sharding(config, mesh))
  if logit_positions:
    in_shardings.append(b2)
  if return_hidden:
    out = NamedSharding(mesh, P(BATCH_AXES, None, None))
  else:
    out = NamedSharding(mesh, logits_spec(config, mesh))
  if return_kv:
    out = (out, kv_cache_sharding(config, mesh))

  def fn(params, tokens, positions, attention_mask, *rest):
    rest = list(rest)
    cache = rest.pop(0) if kv_cache else None
    where = rest.pop(0) if logit_positions else None
    return forward(params, tokens, positions, attention_mask, config=config,
                   kv_cache=cache, logit_positions=where, return_kv=return_kv,
                   return_hidden=return_hidden)

  return jax.jit(fn, in_shardings=tuple(in_shardings), out_shardings=out)


def host_local_batch_to_global(mesh: Mesh, local_batch: PyTree) -> PyTree:
  """Each process's rows of a batch -> global batch-sharded jax.Arrays.

  Leaves are [local_B, ...]; the global batch is their concatenation over
  processes in process order. On one host this is a sharded device_put.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, x.ndim), x)
  return jax.tree_util.tree_map(one, local_batch)


# -----------------------------------------------------------------------------
# Multi-host start-up
# -----------------------------------------------------------------------------

_DISTRIBUTED_INITIALIZED = False


def _env_int(env: Mapping[str, str], key: str) -> Optional[int]:
  value = env.get(key)
  if value is None or not str(value).strip():
    return None
  try:
    return int(value)
  except ValueError:
    return None


def is_multihost_env(env: Optional[Mapping[str, str]] = None) -> bool:
  """Whether the environment says this is one of several JAX processes.

  Looks only at env vars (no JAX backend is touched): ICM_JAX_MULTIHOST=0/1
  overrides; else JAX_COORDINATOR_ADDRESS, Megascale (multi-slice TPU),
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with >1 host, SLURM_NTASKS > 1
  or OMPI_COMM_WORLD_SIZE > 1. Plain GCE TPU VM pods set none of these: set
  ICM_JAX_MULTIHOST=1 there (jax then reads the metadata server).
  """
  env = os.environ if env is None else env
  override = env.get("ICM_JAX_MULTIHOST")
  if override is not None and override.strip():
    return override.strip().lower() in ("1", "true", "yes")
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return (_env_int(env, "JAX_NUM_PROCESSES") or 2) > 1
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or (
      _env_int(env, "MEGASCALE_NUM_SLICES") or 1) > 1:
    return True
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  if "SLURM_JOB_ID" in env and (_env_int(env, "SLURM_NTASKS") or 1) > 1:
    return True
  return (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1


def initialize_distributed(force: Optional[bool] = None,
                           **initialize_kwargs) -> Tuple[int, int]:
  """jax.distributed.initialize() on multi-host runs; a no-op on one host.

  Call before any other JAX work. `force` overrides the env detection
  (is_multihost_env). JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID are passed on when set; otherwise jax auto-detects the
  cluster (TPU, SLURM, Open MPI). Idempotent. Returns
  (jax.process_index(), jax.process_count()).
  """
  global _DISTRIBUTED_INITIALIZED
  multihost = is_multihost_env() if force is None else force
  if (multihost and not _DISTRIBUTED_INITIALIZED and
      not jax.distributed.is_initialized()):
    kwargs = dict(initialize_kwargs)
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
      kwargs.setdefault("coordinator_address",
                        os.environ["JAX_COORDINATOR_ADDRESS"])
      for key, arg in (("JAX_NUM_PROCESSES", "num_processes"),
                       ("JAX_PROCESS_ID", "process_id")):
        if _env_int(os.environ, key) is not None:
          kwargs.setdefault(arg, _env_int(os.environ, key))
    logging.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    _DISTRIBUTED_INITIALIZED = True
  return jax.process_index(), jax.process_count()
