"""Format-independent part of checkpoint import/export.

Every checkpoint format is presented as a `TensorSource`: named tensors in the
HF/PyTorch orientation (`model.layers.{i}.self_attn.q_proj.weight` is
[out, in]) that can be read slice by slice. `build_params` turns a source into
our parameter pytree (layers stacked on axis 0, Dense kernels [in, out]),
placing every parameter straight into its requested sharding with
`jax.make_array_from_callback`, so the host only ever holds the slices of one
tensor that one device needs.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import (Any, Callable, Dict, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple, Union)

import jax
import numpy as np

from icm_jax.model.config import LlamaConfig, RopeScaling
from icm_jax.model.llama import key_path_names, param_shapes


class CheckpointError(ValueError):
  """A checkpoint cannot be read: names the file / tensor at fault."""


# Tensors a Llama checkpoint may carry that are derived data, not weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

Index = Tuple[slice, ...]


class TensorSource:
  """Named tensors in HF orientation, readable by slices. Subclass per format."""

  def names(self) -> Sequence[str]:
    raise NotImplementedError

  def shape(self, name: str) -> Tuple[int, ...]:
    raise NotImplementedError

  def location(self, name: str) -> str:
    """The file holding `name` (for error messages)."""
    raise NotImplementedError

  def read(self, name: str, index: Index) -> np.ndarray:
    """`tensor[index]` as a floating numpy array; `index` has one slice per dim."""
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError


# -- parameter layout ---------------------------------------------------------


path_names = key_path_names


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """How one leaf of our pytree maps to HF tensors.

  hf_name: name template; contains `{i}` for layer-stacked leaves.
  transpose: our leaf (per layer) is the transpose of the HF tensor.
  """

  path: Tuple[str, ...]
  shape: Tuple[int, ...]
  hf_name: str
  stacked: bool
  transpose: bool

  def hf_names(self) -> List[str]:
    if not self.stacked:
      return [self.hf_name]
    return [self.hf_name.format(i=i) for i in range(self.shape[0])]

  @property
  def hf_shape(self) -> Tuple[int, ...]:
    per = self.shape[1:] if self.stacked else self.shape
    return tuple(reversed(per)) if self.transpose else tuple(per)

  @property
  def key(self) -> str:
    return "/".join(self.path)


def _hf_template(path: Tuple[str, ...]) -> Tuple[str, bool, bool]:
  """(HF name template, stacked, transpose) for one of our param paths."""
  fixed = {
      ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False),
      ("norm", "scale"): ("model.norm.weight", False),
      ("lm_head", "kernel"): ("lm_head.weight", True),
  }
  if path in fixed:
    name, transpose = fixed[path]
    return name, False, transpose
  hf_leaf = {"scale": "weight", "kernel": "weight", "bias": "bias"}
  if path[0] == "layers" and len(path) >= 3 and path[-1] in hf_leaf:
    module = ".".join(path[1:-1])
    return (f"model.layers.{{i}}.{module}.{hf_leaf[path[-1]]}", True,
            path[-1] == "kernel")
  raise NotImplementedError(f"no HF tensor name known for parameter {path}")


def param_specs(config: LlamaConfig):
  """(treedef, [ParamSpec]) for the pytree `param_shapes(config)` describes."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  specs = []
  for path, leaf in leaves:
    p = path_names(path)
    name, stacked, transpose = _hf_template(p)
    specs.append(ParamSpec(p, tuple(leaf.shape), name, stacked, transpose))
  return treedef, specs


# -- config overrides ---------------------------------------------------------


def check_overrides(overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  """Validates `config_overrides` keys; turns a rope_scaling dict into RopeScaling."""
  overrides = dict(overrides or {})
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"config_overrides: unknown LlamaConfig field(s) {unknown};"
                     f" valid fields are {sorted(fields)}")
  rs = overrides.get("rope_scaling")
  if isinstance(rs, Mapping):
    rs = dict(rs)
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    overrides["rope_scaling"] = RopeScaling(**rs)
  return overrides


# -- shardings ----------------------------------------------------------------


ShardingsArg = Union[None, Any, Callable[[LlamaConfig], Any]]


def resolve_shardings(param_shardings: ShardingsArg, config: LlamaConfig,
                      specs: Sequence[ParamSpec]) -> List[Any]:
  """Flat list of one Sharding per spec (default device when none given)."""
  if param_shardings is None:
    device = jax.config.jax_default_device
    if not isinstance(device, jax.Device):
      device = jax.devices()[0]
    default = jax.sharding.SingleDeviceSharding(device)
    return [default] * len(specs)
  if callable(param_shardings) and not isinstance(param_shardings, Mapping):
    param_shardings = param_shardings(config)
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  leaves, _ = jax.tree_util.tree_flatten_with_path(param_shardings,
                                                    is_leaf=is_sharding)
  got = {path_names(p): s for p, s in leaves}
  want = [s.path for s in specs]
  missing = ["/".join(p) for p in want if p not in got]
  extra = ["/".join(p) for p in got if p not in set(want)]
  if missing or extra:
    raise ValueError(
        "param_shardings must have the structure of param_shapes(config): "
        f"missing {missing[:8]}, unexpected {extra[:8]}")
  out = []
  for spec in specs:
    s = got[spec.path]
    if not is_sharding(s):
      raise ValueError(f"param_shardings[{spec.key}] is {type(s).__name__}, "
                       "expected a jax.sharding.Sharding")
    out.append(s)
  return out


# -- building the pytree ------------------------------------------------------


def _norm_index(index, shape) -> Index:
  if index is None:
    index = ()
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for ix, dim in zip(index, shape):
    if not isinstance(ix, slice):
      raise TypeError(f"unexpected shard index {index!r}")
    start, stop, step = ix.indices(dim)
    out.append(slice(start, stop, step))
  return tuple(out)


def _slice_len(s: slice) -> int:
  return len(range(s.start, s.stop, s.step))


def validate_source(source: TensorSource, specs: Sequence[ParamSpec], *,
                    strict: bool, allowed_extra: Sequence[str] = ()) -> None:
  """Checks every needed tensor exists with the right shape, before loading."""
  available = set(source.names())
  needed = []
  for spec in specs:
    needed.extend((n, spec) for n in spec.hf_names())
  missing = [n for n, _ in needed if n not in available]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(
        f"{source.describe()}: missing tensor(s) {missing[:5]}{more}; "
        "refusing to leave parameters randomly initialised")
  for name, spec in needed:
    actual = tuple(int(d) for d in source.shape(name))
    if actual != spec.hf_shape:
      raise CheckpointError(
          f"{source.location(name)}: tensor {name!r} has shape {actual}, "
          f"expected {spec.hf_shape} for this config")
  used = {n for n, _ in needed}
  tied_head = "lm_head.weight"
  if tied_head in available and tied_head not in used:
    # Some exporters write the tied head anyway; transformers ignores it too.
    warnings.warn(f"{source.location(tied_head)}: ignoring {tied_head!r} "
                  "because the config ties it to the input embeddings "
                  "(tie_word_embeddings=true)", stacklevel=3)
    used.add(tied_head)
  extra = sorted(n for n in available - used - set(allowed_extra)
                 if not n.endswith(IGNORED_SUFFIXES))
  if extra:
    more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
    msg = (f"{source.describe()}: unexpected tensor(s) {extra[:5]}{more} that "
           "this Llama has no parameter for")
    if strict:
      raise CheckpointError(msg + " (pass strict=False to ignore them)")
    warnings.warn(msg + "; ignoring them", stacklevel=3)


def build_params(source: TensorSource, config: LlamaConfig,
                 param_shardings: ShardingsArg = None, *, strict: bool = True,
                 allowed_extra: Sequence[str] = ()):
  """Reads `source` into our param pytree, each leaf in its sharding.

  Each leaf is created with `jax.make_array_from_callback`; the callback reads
  only the slice of each per-layer tensor that the device shard covers, so host
  memory peaks at about one device-shard of one parameter.
  """
  treedef, specs = param_specs(config)
  shardings = resolve_shardings(param_shardings, config, specs)
  validate_source(source, specs, strict=strict, allowed_extra=allowed_extra)
  dtype = np.dtype(config.params_dtype)
  leaves = []
  for spec, sharding in zip(specs, shardings):
    leaves.append(jax.make_array_from_callback(
        spec.shape, sharding, _reader(source, spec, dtype), dtype=dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _reader(source: TensorSource, spec: ParamSpec, dtype):

  def read_one(name: str, index: Index) -> np.ndarray:
    hf_index = tuple(reversed(index)) if spec.transpose else index
    try:
      arr = np.asarray(source.read(name, hf_index))
    except CheckpointError:
      raise
    except Exception as e:  # corrupt / truncated data surfaces here
      raise CheckpointError(f"{source.location(name)}: cannot read tensor "
                            f"{name!r}: {type(e).__name__}: {e}") from e
    expected = tuple(_slice_len(s) for s in hf_index)
    if arr.shape != expected:
      raise CheckpointError(f"{source.location(name)}: tensor {name!r} read "
                            f"as shape {arr.shape}, expected {expected}")
    if arr.dtype.kind not in "fV":  # V: ml_dtypes.bfloat16 & co.
      raise CheckpointError(f"{source.location(name)}: tensor {name!r} has "
                            f"non-float dtype {arr.dtype}")
    return arr.T if spec.transpose else arr

  def callback(index):
    index = _norm_index(index, spec.shape)
    if not spec.stacked:
      return read_one(spec.hf_name, index).astype(dtype)
    layers = range(index[0].start, index[0].stop, index[0].step)
    out = np.empty(tuple(_slice_len(s) for s in index), dtype)
    for j, i in enumerate(layers):
      out[j] = read_one(spec.hf_name.format(i=i), index[1:])
    return out

  return callback


# -- export side --------------------------------------------------------------


class HFTensor(NamedTuple):
  name: str
  shape: Tuple[int, ...]
  fetch: Callable[[], np.ndarray]  # host numpy array in HF orientation


def _to_host(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def iter_hf_tensors(params, config: LlamaConfig) -> Iterator[HFTensor]:
  """Our params as HF-named tensors, in HF order; each fetched lazily (one
  layer of one parameter at a time)."""
  _, specs = param_specs(config)
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  got = {path_names(p): x for p, x in leaves}
  want = {s.path for s in specs}
  missing = ["/".join(p) for p in want if p not in got]
  extra = ["/".join(p) for p in got if p not in want]
  if missing or extra:
    raise ValueError("params do not match param_shapes(config): missing "
                     f"{sorted(missing)[:8]}, unexpected {sorted(extra)[:8]}")
  for spec in specs:
    shape = tuple(getattr(got[spec.path], "shape", ()))
    if shape != spec.shape:
      raise ValueError(f"params[{spec.key}] has shape {shape}, expected "
                       f"{spec.shape} for this config")

  def fetch(x, i, transpose):
    def f():
      part = x if i is None else x[i]
      host = _to_host(part)
      return host.T if transpose else host
    return f

  by_path = {s.path: s for s in specs}

  def emit(path, i=None):
    spec = by_path[path]
    name = spec.hf_name if i is None else spec.hf_name.format(i=i)
    return HFTensor(name, spec.hf_shape, fetch(got[path], i, spec.transpose))

  yield emit(("embed_tokens", "embedding"))
  layer_paths = [s.path for s in specs if s.stacked]
  order = ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"]
  proj = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
          "gate_proj", "up_proj", "down_proj"]

  def rank(p):
    return (order.index(p[1]) if p[1] in order else 99,
            proj.index(p[2]) if len(p) > 3 and p[2] in proj else 99, p)

  layer_paths.sort(key=rank)
  for i in range(config.num_layers):
    for p in layer_paths:
      yield emit(p, i)
  yield emit(("norm", "scale"))
  if ("lm_head", "kernel") in by_path:
    yield emit(("lm_head", "kernel"))
