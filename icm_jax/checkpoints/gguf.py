"""GGUF (llama.cpp) import for `general.architecture` "llama", "qwen2" and
"qwen3" files (llama.cpp writes Mistral as "llama").

Tensors are dequantized with `gguf.quants.dequantize`, a row block at a time:
only the rows a device shard needs are dequantized. llama.cpp stores the rows of
attn_q / attn_k with each head's rotary pairs interleaved ([x0, y0, x1, y1..]);
we undo that permutation to HF's "rotate half" layout ([x0, x1, .., y0, y1..])
on the fly, as transformers' GGUF loader does. Qwen files keep HF's layout
(llama.cpp runs them with "neox" rope), so their rows are read as they are.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from icm_jax.checkpoints.common import (CheckpointError, Index, ShardingsArg,
                                        TensorSource, build_params,
                                        check_overrides, param_specs)
from icm_jax.model.config import FAMILY_FEATURES, LlamaConfig
from icm_jax.model.layers import rope_inverse_frequencies

# HF tensor name -> GGUF tensor name (llama.cpp's standard llama names).
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# GGUF architecture -> our family; llama.cpp permutes q/k rows of "llama" only.
GGUF_FAMILIES = ("llama", "qwen2", "qwen3")
ROPE_FREQS = "rope_freqs.weight"


def hf_to_gguf_name(name: str) -> str:
  if name in _TOP:
    return _TOP[name]
  m = _LAYER_RE.match(name)
  if m and m.group(2) in _LAYER:
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
  raise KeyError(name)


def _open_reader(path: str):
  import gguf
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not a file")
  try:
    reader = gguf.GGUFReader(path, "r")
  except Exception as e:
    raise CheckpointError(f"{path}: corrupt or truncated GGUF file: "
                          f"{type(e).__name__}: {e}") from e
  for t in reader.tensors:
    if t.data.nbytes != t.n_bytes:
      raise CheckpointError(f"{path}: tensor {t.name!r} has {t.data.nbytes} "
                            f"bytes of data, expected {t.n_bytes} (truncated "
                            "file?)")
  return reader


def _field(reader, key: str, default: Any = None, *, path: str = "",
           required: bool = False):
  f = reader.fields.get(key)
  if f is None:
    if required:
      raise CheckpointError(f"{path}: missing GGUF metadata key {key!r}")
    return default
  try:
    return f.contents()
  except Exception as e:
    raise CheckpointError(f"{path}: cannot read GGUF metadata key {key!r}: "
                          f"{e}") from e


def gguf_config(reader, path: str,
                config_overrides: Optional[Mapping[str, Any]] = None
                ) -> LlamaConfig:
  """LlamaConfig from the `<arch>.*` metadata of an open GGUFReader."""
  arch = _field(reader, "general.architecture", path=path, required=True)
  if arch not in GGUF_FAMILIES:
    raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; "
                          f"icm-jax loads {GGUF_FAMILIES} only")
  need = lambda k: _field(reader, f"{arch}.{k}", path=path, required=True)
  opt = lambda k, d=None: _field(reader, f"{arch}.{k}", d, path=path)
  rope_type = opt("rope.scaling.type", "none")
  if rope_type not in ("none", None):
    raise CheckpointError(f"{path}: {arch}.rope.scaling.type={rope_type!r} is "
                          "not supported")
  names = {t.name: t for t in reader.tensors}
  num_heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  head_dim = opt("attention.key_length") or opt("rope.dimension_count") or (
      hidden // num_heads)
  vocab = opt("vocab_size")
  if vocab is None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
      vocab = len(tokens.data)
    elif "token_embd.weight" in names:
      vocab = int(names["token_embd.weight"].shape[-1])
    else:
      raise CheckpointError(f"{path}: cannot tell the vocabulary size")
  kwargs = dict(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(opt("attention.head_count_kv") or num_heads),
      head_dim=int(head_dim),
      rms_norm_eps=float(opt("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(opt("rope.freq_base", 10000.0)),
      max_position_embeddings=int(opt("context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      architecture=arch,
      **FAMILY_FEATURES[arch],
  )
  kwargs.update(check_overrides(config_overrides))
  try:
    return LlamaConfig(**kwargs)
  except ValueError as e:
    raise CheckpointError(f"{path}: invalid {arch} metadata: {e}") from e


def _unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
  """perm[hf_row] = gguf_row, undoing llama.cpp's per-head pair interleave."""
  if n_rows % (2 * n_heads):
    raise ValueError(f"{n_rows} rows do not split into {n_heads} heads of "
                     "rotary pairs")
  return (np.arange(n_rows).reshape(n_heads, n_rows // n_heads // 2, 2)
          .transpose(0, 2, 1).reshape(-1))


class GGUFSource(TensorSource):
  """GGUF tensors presented under HF names and in HF layout."""

  def __init__(self, reader, path: str, config: LlamaConfig):
    self.reader, self.path = reader, path
    self.by_gguf = {t.name: t for t in reader.tensors}
    self._hf: Dict[str, str] = {}
    for name in self.by_gguf:
      self._hf[name] = name  # unmapped names keep their GGUF name
    _, specs = param_specs(config)
    for spec in specs:
      for hf_name in spec.hf_names():
        g = hf_to_gguf_name(hf_name)
        if g in self.by_gguf:
          del self._hf[g]
          self._hf[hf_name] = g
    self._perm_heads = {}
    for i in range(config.num_layers if config.architecture == "llama" else 0):
      self._perm_heads[f"model.layers.{i}.self_attn.q_proj.weight"] = (
          config.num_heads)
      self._perm_heads[f"model.layers.{i}.self_attn.k_proj.weight"] = (
          config.num_kv_heads)

  def describe(self) -> str:
    return self.path

  def names(self) -> Sequence[str]:
    return list(self._hf)

  def location(self, name: str) -> str:
    g = self._hf.get(name, name)
    return f"{self.path} (GGUF tensor {g!r})" if g != name else self.path

  def shape(self, name: str) -> Tuple[int, ...]:
    # GGUF lists dims innermost-first; numpy/HF order is the reverse.
    return tuple(int(d) for d in reversed(self.by_gguf[self._hf[name]].shape))

  def read(self, name: str, index: Index) -> np.ndarray:
    from gguf.quants import dequantize
    t = self.by_gguf[self._hf[name]]
    shape = self.shape(name)
    if len(shape) == 1:
      return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)[index]
    if len(shape) != 2:
      raise CheckpointError(f"{self.location(name)}: {len(shape)}-D tensors "
                            "are not supported")
    rows = np.arange(shape[0])[index[0]]
    if name in self._perm_heads:
      rows = _unpermute_rows(shape[0], self._perm_heads[name])[rows]
    raw = np.asarray(t.data)[rows] if t.data.ndim == 2 else None
    if raw is None:
      raise CheckpointError(f"{self.location(name)}: unexpected data layout "
                            f"{t.data.shape}")
    out = dequantize(raw, t.tensor_type).reshape(len(rows), shape[1])
    return out[:, index[1]]


def _check_rope_freqs(reader, path: str, config: LlamaConfig) -> None:
  """llama.cpp encodes llama3 rope scaling as a `rope_freqs` tensor of
  per-frequency divisors; accept it only if `config.rope_scaling` (given via
  config_overrides) reproduces it."""
  t = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
  if t is None:
    return
  from gguf.quants import dequantize
  factors = dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
  if config.rope_scaling is None:
    if np.allclose(factors, 1.0):
      return
    raise CheckpointError(
        f"{path}: tensor {ROPE_FREQS!r} encodes rope scaling; pass the "
        "matching rope_scaling (e.g. the llama3 parameters from the original "
        "config.json) in config_overrides")
  base = 1.0 / (config.rope_theta**(
      np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim))
  ours = base / rope_inverse_frequencies(config)
  if ours.shape != factors.shape or not np.allclose(ours, factors, rtol=1e-3):
    raise CheckpointError(f"{path}: tensor {ROPE_FREQS!r} does not match "
                          f"config_overrides rope_scaling={config.rope_scaling}")


def load_gguf(path: str, *, param_shardings: ShardingsArg = None,
              config_overrides: Optional[Mapping[str, Any]] = None,
              strict: bool = True):
  """(LlamaConfig, params) from a llama/qwen2/qwen3 GGUF file (any
  dequantizable type)."""
  path = os.fspath(path)
  reader = _open_reader(path)
  config = gguf_config(reader, path, config_overrides)
  _check_rope_freqs(reader, path, config)
  source = GGUFSource(reader, path, config)
  params = build_params(source, config, param_shardings, strict=strict,
                        allowed_extra=(ROPE_FREQS,))
  return config, params


def load_gguf_config(path: str,
                     config_overrides: Optional[Mapping[str, Any]] = None
                     ) -> LlamaConfig:
  """The LlamaConfig of a GGUF file from its header alone (no tensor data)."""
  return gguf_config(_open_reader(os.fspath(path)), path, config_overrides)
