"""Workload: the prompt lengths every static shape derives from.

Those of one search batch (N examples) and of the fine-tuning set: synthetic
(N-1 prompts of a mean length and one of the max) or measured (the task's
data tokenized as the pipeline does).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from icm_jax.aot.errors import AotError
from icm_jax.training import data as train_data

# GSM8K prompts of the ICM split in SmolLM2 tokens (mean, max over the 1484
# train claims): the default length profile when no data file is at hand.
GSM8K_LENGTHS = (191, 665)
GSM8K_TRAIN_EXAMPLES = 1484


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


def measured_workload(task_name, data_path: str, tokenizer,
                      num_examples: int, *, test_fraction: float = 0.5,
                      seed: int = 0, split_from_test: bool = True,
                      data_arg: str = "--data") -> Workload:
  """Real prompt lengths: the task's prompts tokenized as the pipeline does.

  The search batch is the first whole consistency groups of the train split
  with at most `num_examples` examples; train_lengths is the whole split.
  tokenizer: a tokenizer or its path (HF directory or .gguf). task_name: a
  built-in task's name or a run config's task section (any generic task).
  """
  from icm_jax.checkpoints import load_tokenizer
  from icm_jax.pipeline.inputs import first_whole_groups
  from icm_jax.tasks import load_examples, split_by_group, task_from_config
  from icm_jax.tokenization import LabelWords, tokenize_examples

  try:
    task = task_from_config({"name": task_name} if isinstance(task_name, str)
                            else task_name)
  except ValueError as e:
    raise AotError(f"--config.{e}") from None
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
      description=(f"{task.name} ({data_path}), tokenizer {name}: "
                   f"{len(batch)}-example batch mean "
                   f"{np.mean(batch_lengths):.0f} / max {max(batch_lengths)} "
                   f"tokens; {len(train)} train examples mean "
                   f"{lengths.mean():.0f} / max {lengths.max()}"))
