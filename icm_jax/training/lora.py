"""LoRA: low-rank adapters on every attention and MLP projection.

Each target kernel W [layers, in, out] (our [in, out] orientation) gets
a [layers, in, r] and b [layers, r, out]; the adapted kernel is

    W + (alpha / r) * a @ b        (in HF's [out, in] orientation: W + s·B·A)

b starts at zero, so step 0 is the base model. The train state is
{"base": params, "lora": adapters}: the step differentiates and updates the
adapters only, and hands the base back untouched, in its stored dtype (bf16
on accelerators, so the frozen base costs what scoring's copy costs). Only
the adapters and their AdamW moments are float32. The forward runs on the merged kernels, so
the model, its checkpoints and the scorer need nothing LoRA-specific:
evaluation, iterative labelling and HF export all get `merge(...)`.

Adapters are sharded by the partition rule of the kernel they adapt
(`adapter_rules`): a keeps the kernel's input-dim sharding, b its output-dim
sharding, and the rank dim is replicated.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from icm_jax.model.llama import key_path_names
from icm_jax.sharding import LLAMA_RULES, Rule

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")
BASE, ADAPTERS = "base", "lora"


def _is_target(names: Tuple[str, ...]) -> bool:
  return (len(names) == 4 and names[0] == "layers" and names[2] in TARGETS
          and names[3] == "kernel")


def adapter_rules(rules: Sequence[Rule] = LLAMA_RULES) -> Tuple[Rule, ...]:
  """Partition rules of the adapters, derived from the layer kernels' rules:
  lora_a [L, in, r] as the kernel's (L, in), lora_b [L, r, out] as its
  (L, out)."""
  out = []
  for pattern, spec in rules:
    if pattern.endswith("/kernel$") and "layers/" in pattern:
      stem = pattern[:-len("kernel$")]
      out.append((stem + "lora_a$", P(spec[0], spec[1], None)))
      out.append((stem + "lora_b$", P(spec[0], None, spec[2])))
  return tuple(out)


def init_adapters(params, rank: int, rng: jax.Array):
  """{"layers": {module: {proj: {"lora_a", "lora_b"}}}} for `params` (arrays
  or ShapeDtypeStructs): a ~ U(±1/sqrt(in)) (PEFT's default bound), b = 0,
  float32 whatever the base's dtype: updates at lr ~1e-4 would vanish in
  bf16 adapters (8 mantissa bits)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  targets = [(key_path_names(p), x) for p, x in leaves
             if _is_target(key_path_names(p))]
  if not targets:
    raise ValueError("train.lora_rank: the params have no attention/MLP "
                     f"projection kernels {TARGETS} to adapt")
  adapters: dict = {}
  for (names, kernel), key in zip(targets,
                                  jax.random.split(rng, len(targets))):
    layers, fan_in, fan_out = kernel.shape
    bound = fan_in ** -0.5
    node = adapters.setdefault("layers", {}).setdefault(names[1], {})
    node[names[2]] = {
        "lora_a": jax.random.uniform(key, (layers, fan_in, rank), jnp.float32,
                                     -bound, bound),
        "lora_b": jnp.zeros((layers, rank, fan_out), jnp.float32),
    }
  return adapters


def merge(params, adapters, scale: float, dtype=None):
  """params with every adapted kernel replaced by W + scale * a @ b
  (accumulated in float32, stored in `dtype`, default W's). The train step
  asks for the compute dtype: the Dense layers cast their kernels to it
  anyway, and a bf16 merged copy (and its gradient) is half an f32 one."""

  def one(path, w):
    names = key_path_names(path)
    if not _is_target(names):
      return w
    ab = adapters["layers"][names[1]][names[2]]
    delta = jnp.einsum("lir,lro->lio", ab["lora_a"].astype(jnp.float32),
                       ab["lora_b"].astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(dtype or w.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def train_state(params, adapters) -> dict:
  return {BASE: params, ADAPTERS: adapters}


def scale_of(rank: int, alpha: float) -> float:
  return float(alpha) / rank
