"""Fine-tuning hyperparameters.

Defaults follow the ICM paper's fine-tuning stage (small learning rate, a few
epochs over the labelled set). Every value is validated up front so a typo in
a config file fails before any model is loaded; errors name the key as
`train.<key>`, the way it is spelled in the config file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# Keys a resumed run may change: they do not alter the trajectory.
RESUMABLE_KEYS = ("checkpoint_every", "keep_checkpoints", "log_every")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optax AdamW fine-tuning on (prompt, label) pairs.

  learning_rate: peak learning rate, reached after `warmup_steps` of linear
    warmup from 0, then cosine decay to learning_rate *
    end_learning_rate_fraction at the last step.
  batch_size: examples per optimizer step over all hosts; split into
    `grad_accum_steps` micro-batches run one after another.
  compute_dtype: matmul/activation dtype. "auto" is bfloat16 on TPU/GPU and
    float32 on CPU; the master weights and optimizer state keep the params'
    own dtype (float32).
  min_seq_len: floor of the power-of-two sequence-length buckets that batches
    are right-padded to (few distinct shapes = few compilations).
  checkpoint_every: orbax save interval in optimizer steps (0 = only the final
    step); keep_checkpoints: how many orbax checkpoints to keep.
  seed: the data order (one permutation per epoch) and the LoRA init.
  lora_rank: 0 fine-tunes every parameter; r > 0 trains rank-r LoRA adapters
    on the attention and MLP projections (q/k/v/o, gate/up/down) with the
    base params frozen; the result is the merged W + (lora_alpha / r) B·A.
  lora_alpha: the LoRA scale's numerator (scale = lora_alpha / lora_rank).
  """

  learning_rate: float = 1e-5
  warmup_steps: int = 10
  end_learning_rate_fraction: float = 0.1
  num_epochs: int = 2
  batch_size: int = 32
  grad_accum_steps: int = 1
  weight_decay: float = 0.01
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  max_grad_norm: float = 1.0
  compute_dtype: str = "auto"
  remat: bool = False
  min_seq_len: int = 64
  checkpoint_every: int = 50
  keep_checkpoints: int = 2
  log_every: int = 10
  seed: int = 0
  lora_rank: int = 0
  lora_alpha: float = 16.0

  def __post_init__(self):
    def bad(key, why):
      raise ValueError(f"train.{key} {why}, got {getattr(self, key)!r}")

    def number(key):
      value = getattr(self, key)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value)):
        bad(key, "must be a finite number")
      return value

    def integer(key, minimum):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int):
        bad(key, "must be an int")
      if value < minimum:
        bad(key, f"must be >= {minimum}")
      return value

    if number("learning_rate") <= 0:
      bad("learning_rate", "must be > 0")
    if not 0 <= number("end_learning_rate_fraction") <= 1:
      bad("end_learning_rate_fraction", "must be in [0, 1]")
    if number("weight_decay") < 0:
      bad("weight_decay", "must be >= 0")
    for key in ("adam_b1", "adam_b2"):
      if not 0 <= number(key) < 1:
        bad(key, "must be in [0, 1)")
    if number("max_grad_norm") < 0:
      bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
    integer("warmup_steps", 0)
    integer("num_epochs", 1)
    integer("batch_size", 1)
    integer("grad_accum_steps", 1)
    integer("min_seq_len", 1)
    integer("checkpoint_every", 0)
    integer("keep_checkpoints", 1)
    integer("log_every", 1)
    integer("seed", 0)
    integer("lora_rank", 0)
    if number("lora_alpha") <= 0:
      bad("lora_alpha", "must be > 0")
    if self.batch_size % self.grad_accum_steps:
      bad("batch_size", f"must be a multiple of train.grad_accum_steps="
          f"{self.grad_accum_steps}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      bad("compute_dtype", f"must be one of {COMPUTE_DTYPES}")
    if not isinstance(self.remat, bool):
      bad("remat", "must be a bool")

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum_steps

  @classmethod
  def from_dict(cls, mapping: Mapping[str, Any] | Any) -> "TrainConfig":
    """From a dict or an ml_collections ConfigDict; unknown keys are errors."""
    if hasattr(mapping, "to_dict"):
      mapping = mapping.to_dict()
    if not isinstance(mapping, Mapping):
      raise TypeError(f"train config must be a mapping, got "
                      f"{type(mapping).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
      raise ValueError("unknown train config keys: " +
                       ", ".join(f"train.{k}" for k in unknown) +
                       f"; known keys: {sorted(known)}")
    return cls(**dict(mapping))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
