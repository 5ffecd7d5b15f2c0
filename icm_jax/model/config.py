"""Llama-family model configuration and its mapping to/from HF `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

# The families we load, by HF `model_type`, with their HF architecture class.
# Every one is the Llama decoder (RMSNorm, rotary, SwiGLU, GQA) plus the
# differences `FAMILY_FEATURES` names, each a LlamaConfig field.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
# The value of each family-fixed field: the HF modeling code of each family
# hard-wires them, so a config that disagrees would not round-trip.
#   qkv_bias: biases on the q/k/v projections (Qwen2/2.5).
#   qk_norm: per-head RMSNorm of q and k before rope (Qwen3).
FAMILY_FEATURES = {
    "llama": {"qkv_bias": False, "qk_norm": False},
    "mistral": {"qkv_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True},
}
ATTENTION_IMPLS = ("auto", "xla", "splash", "splash_interpret")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def dtype_from_name(name) -> jnp.dtype:
  if not isinstance(name, str):
    return jnp.dtype(name)
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style ("llama3") frequency-dependent rope scaling."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int
  rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture + numerics of a Llama-family decoder.

  `architecture` is the HF family (a key of ARCHITECTURES; it names the
  export's config.json), and the fields after it are its differences from
  the Llama block. `sliding_window`: the family's attention window (Mistral,
  Qwen); icm-jax runs full causal attention, which equals windowed attention
  only while every row fits the window, so longer calls are refused.

  `dtype` is the compute dtype of matmuls/activations; `param_dtype` the dtype
  parameters are stored in. Attention logits, softmax, RMSNorm statistics and
  the final log-softmax are always computed in float32.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: Optional[int] = None
  eos_token_id: Any = None
  architecture: str = "llama"
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: Optional[int] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Rematerialise each decoder layer in the backward pass (trainer memory).
  remat: bool = False
  # Query-block size of causal attention (0 = one dense block). Blocks skip
  # key blocks in their future: fewer FLOPs on long sequences on CPU/GPU.
  attention_block_size: int = 256
  # Attention kernel: "xla" (jnp; the CPU/GPU path), "splash" (Pallas TPU
  # splash kernel), "splash_interpret" (the same kernel interpreted: tests on
  # CPU, slow) or "auto" (splash on TPU, xla elsewhere; see `resolved_attention`).
  attention: str = "auto"

  def __post_init__(self):
    positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim",
                "max_position_embeddings")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if not isinstance(self.attention_block_size, int) or self.attention_block_size < 0:
      raise ValueError("LlamaConfig.attention_block_size must be an int >= 0, "
                       f"got {self.attention_block_size!r}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"LlamaConfig.attention={self.attention!r} not in "
                       f"{ATTENTION_IMPLS}")
    if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
      raise ValueError("LlamaConfig.rms_norm_eps and rope_theta must be > 0")
    dtype_from_name(self.dtype)
    dtype_from_name(self.param_dtype)
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"LlamaConfig.architecture={self.architecture!r} not in "
                       f"{tuple(ARCHITECTURES)}")
    for name, value in FAMILY_FEATURES[self.architecture].items():
      if getattr(self, name) != value:
        raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}, but "
                         f"{self.architecture} models have {name}={value}")
    if self.sliding_window is not None:
      if self.architecture == "llama":
        raise ValueError("LlamaConfig.sliding_window: llama has no sliding "
                         "window attention")
      if not isinstance(self.sliding_window, int) or self.sliding_window <= 0:
        raise ValueError("LlamaConfig.sliding_window must be None or a "
                         f"positive int, got {self.sliding_window!r}")

  def check_window(self, num_keys: int) -> None:
    """Refuses a call whose rows are longer than the attention window.

    Full causal attention equals the family's sliding-window attention
    exactly when no query is `sliding_window` or more keys after a key it
    sees, which holds for every row of `num_keys` keys iff num_keys <= window.
    """
    if self.sliding_window is not None and num_keys > self.sliding_window:
      raise ValueError(
          f"sliding_window={self.sliding_window} ({self.architecture} "
          f"config.json) is shorter than this call's rows of {num_keys} "
          "positions; icm-jax does not implement sliding-window attention, "
          "so it refuses rather than attend past the window (shorten the "
          "prompts, or set model.max_context <= the window so the scorer "
          "and many-shot prompts stay inside it)")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return dtype_from_name(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return dtype_from_name(self.param_dtype)

  def resolved_attention(self, platform: Optional[str] = None) -> str:
    """The kernel "auto" means on `platform` (default: jax's default backend).

    Pass the target platform when compiling for devices other than the
    local ones (ahead-of-time compilation for a TPU topology from a CPU host).
    """
    if self.attention != "auto":
      return self.attention
    if platform is None:
      platform = jax.default_backend()
    return "splash" if platform == "tpu" else "xla"

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    if self.qkv_bias:
      per_layer += q + 2 * kv
    if self.qk_norm:
      per_layer += 2 * self.head_dim
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + self.num_layers * per_layer + d + head

  # -- HF config.json ---------------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from an HF `config.json` dict (Llama 2/3/3.1/3.2,
    SmolLM2, Mistral, Qwen2/2.5, Qwen3)."""
    where = "config.json"
    model_type = hf.get("model_type", "llama")
    family = model_type if model_type in ARCHITECTURES else None
    archs = hf.get("architectures") or [ARCHITECTURES.get(model_type)]
    if family is None or set(archs) != {ARCHITECTURES[family]}:
      raise ValueError(
          f"{where}: unsupported architecture {archs} (model_type={model_type!r});"
          f" icm-jax implements {SUPPORTED_ARCHITECTURES} only")
    # Qwen2's q/k/v biases are hard-wired (no flag); Llama, Mistral and
    # Qwen3 would put `attention_bias` on o_proj too, which we do not model.
    flags = ("mlp_bias",) if family == "qwen2" else ("attention_bias", "mlp_bias")
    for flag in flags:
      if hf.get(flag):
        raise ValueError(f"{where}: {flag}=true is not supported for "
                         f"{family}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{where}: hidden_act={act!r} is not supported (need 'silu')")

    def need(key):
      if key not in hf:
        raise ValueError(f"{where}: missing required key {key!r}")
      return hf[key]

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = hf.get("head_dim") or hidden // num_heads
    # transformers>=5 writes `rope_parameters` (holding rope_theta too); older
    # checkpoints write `rope_theta` and `rope_scaling` at the top level.
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling")
    rope_theta = hf.get("rope_theta")
    for source in (hf.get("rope_parameters"), hf.get("rope_scaling")):
      if rope_theta is None and isinstance(source, Mapping):
        rope_theta = source.get("rope_theta")
    kwargs = dict(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=_rope_scaling_from_hf(rope_params, where),
        max_position_embeddings=need("max_position_embeddings"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        architecture=family,
        sliding_window=_sliding_window_from_hf(hf, family, where),
        **FAMILY_FEATURES[family],
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_config(self, dtype: str = "float32") -> dict:
    """The `config.json` dict that transformers' *ForCausalLM of this
    family loads."""
    hf = {
        "architectures": [ARCHITECTURES[self.architecture]],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "dtype": dtype,  # transformers>=5 spelling (was torch_dtype)
    }
    if self.architecture != "qwen2":
      hf.update(attention_bias=False, mlp_bias=False)
    if self.architecture == "mistral":
      hf["sliding_window"] = self.sliding_window
    elif self.architecture in ("qwen2", "qwen3"):
      # Every layer windowed (max_window_layers=0), as we read it back.
      hf.update(use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window, max_window_layers=0)
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rs = self.rope_scaling
      rope = {
          "rope_type": rs.rope_type,
          "rope_theta": self.rope_theta,
          "factor": rs.factor,
          "low_freq_factor": rs.low_freq_factor,
          "high_freq_factor": rs.high_freq_factor,
          "original_max_position_embeddings": rs.original_max_position_embeddings,
      }
      hf["rope_scaling"] = dict(rope)
    hf["rope_parameters"] = rope
    if self.bos_token_id is not None:
      hf["bos_token_id"] = self.bos_token_id
    if self.eos_token_id is not None:
      hf["eos_token_id"] = self.eos_token_id
    return hf


def _rope_scaling_from_hf(rope: Any, where: str) -> Optional[RopeScaling]:
  if not rope:
    return None
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return None
  if kind != "llama3":
    raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported "
                     "(supported: default, llama3)")
  try:
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(
            rope["original_max_position_embeddings"]),
    )
  except KeyError as e:
    raise ValueError(f"{where}: rope_scaling is missing key {e.args[0]!r}") from None


def _sliding_window_from_hf(hf: Mapping[str, Any], family: str, where: str
                            ) -> Optional[int]:
  """The attention window if any layer of this config uses one.

  Mistral windows every layer when `sliding_window` is set. Qwen2/3 window
  only with use_sliding_window=true, and then only the layers `layer_types`
  (or max_window_layers) marks; a window on some layers is still a window
  the rows must fit, so any windowed layer counts.
  """
  window = hf.get("sliding_window")
  if family == "llama" or window is None:
    return None
  if family in ("qwen2", "qwen3"):
    if not hf.get("use_sliding_window"):
      return None
    layer_types = hf.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
      return None
    if layer_types is None and hf.get("max_window_layers", 0) >= hf.get(
        "num_hidden_layers", 0):
      return None
  if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
    raise ValueError(f"{where}: sliding_window={window!r} is not a positive "
                     "int")
  return window
