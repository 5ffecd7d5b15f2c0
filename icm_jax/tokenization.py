"""Prompts and label words → token pieces the scoring kernel assembles.

The kernel never tokenises: it concatenates, per example, the prompt tokens, one
label token and the separator tokens. That is only valid if tokenising the whole
concatenated text gives the same ids, which `tokenize_examples` verifies for
every example at every boundary (prompt|label, label|separator, separator|next
prompt) before anything is scored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

LABEL_TOKEN_RULES = ("exact", "variants")


@dataclasses.dataclass(frozen=True)
class LabelWords:
  """How labels are written after a prompt and read back as log-probs.

  `false`/`true` are the words appended to a demonstration; each must be exactly
  one token right after a prompt (so prompts end *without* a trailing space and
  the words carry the space: "... this claim is" + " True").
  rule "variants": log P(label) is the log-sum-exp over every vocabulary token
  that spells the word up to case and leading spaces (" True", "True",
  " true", "true"); rule "exact": only the appended token.
  """

  false: str = " False"
  true: str = " True"
  rule: str = "variants"

  def __post_init__(self):
    if self.rule not in LABEL_TOKEN_RULES:
      raise ValueError(f"label rule {self.rule!r} not in {LABEL_TOKEN_RULES}")
    if _spelling(self.false) == _spelling(self.true):
      raise ValueError(f"label words {self.false!r} and {self.true!r} coincide")


@dataclasses.dataclass(frozen=True)
class ExampleTokens:
  """Token pieces for N examples; label index 0 = False, 1 = True."""

  ids: tuple                 # example ids (for error messages)
  prompts: tuple             # N int32 arrays: prompt tokens, no label
  label_token: np.ndarray    # [2] the single token appended for False/True
  separator: np.ndarray      # tokens after a label, before the next prompt
  header: np.ndarray         # tokens before the first demonstration (BOS...)
  label_token_sets: tuple    # (false_ids, true_ids) int32 arrays for logsumexp

  @property
  def num_examples(self) -> int:
    return len(self.prompts)

  @property
  def prompt_lengths(self) -> np.ndarray:
    return np.array([len(p) for p in self.prompts], np.int32)

  def demo_length(self, index: int) -> int:
    return len(self.prompts[index]) + 1 + len(self.separator)

  def subset(self, indices) -> "ExampleTokens":
    """The pieces of the examples at `indices`, in that order."""
    return dataclasses.replace(self, ids=tuple(self.ids[i] for i in indices),
                               prompts=tuple(self.prompts[i] for i in indices))


def _spelling(word: str) -> str:
  return word.strip().casefold()


def _encode(tokenizer, text: str) -> list:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_token_sets(tokenizer, words: LabelWords):
  """(false_ids, true_ids): every vocab token spelling each word (per rule)."""
  appended = [_single_token(tokenizer, w) for w in (words.false, words.true)]
  if words.rule == "exact":
    return tuple(np.array([t], np.int32) for t in appended)
  targets = [_spelling(words.false), _spelling(words.true)]
  found = ([], [])
  vocab_size = len(tokenizer)
  for token_id in range(vocab_size):
    text = tokenizer.decode([token_id])
    spelled = _spelling(text)
    for k in (0, 1):
      if spelled == targets[k] and not text.lstrip(" ").startswith(("\n", "\t")):
        found[k].append(token_id)
  for k in (0, 1):
    if appended[k] not in found[k]:
      found[k].append(appended[k])
  return tuple(np.array(sorted(f), np.int32) for f in found)


def _single_token(tokenizer, word: str) -> int:
  ids = _encode(tokenizer, word)
  if len(ids) != 1:
    raise ValueError(
        f"label word {word!r} is {len(ids)} tokens {ids} in this tokenizer; it "
        "must be exactly one (put the leading space in the word, not the prompt)")
  return ids[0]


def tokenize_examples(tokenizer,
                      prompts: Sequence[str],
                      ids: Optional[Sequence] = None,
                      words: LabelWords = LabelWords(),
                      separator: str = "\n\n",
                      header: str = "") -> ExampleTokens:
  """Tokenises each piece once and checks concatenation == whole-text tokens.

  Raises ValueError naming the example whose boundary the tokenizer merges.
  """
  ids = tuple(range(len(prompts))) if ids is None else tuple(ids)
  if len(ids) != len(prompts):
    raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
  if not prompts:
    raise ValueError("no examples to tokenise")
  label_token = np.array([_single_token(tokenizer, words.false),
                          _single_token(tokenizer, words.true)], np.int32)
  bos = [] if tokenizer.bos_token_id is None or not _adds_bos(tokenizer) else [
      tokenizer.bos_token_id]
  header_ids = bos + (_encode(tokenizer, header) if header else [])
  prompt_ids = []
  for example_id, text in zip(ids, prompts):
    if not text or text != text.rstrip(" "):
      raise ValueError(
          f"example {example_id!r}: prompt must be non-empty and must not end "
          "with a space (the label word carries its own leading space)")
    prompt_ids.append(np.array(_encode(tokenizer, text), np.int32))

  # The separator as it tokenises in context (before a following prompt), which
  # may differ from tokenising it alone (e.g. "\n\n" + "Question").
  sep_ids = _separator_in_context(tokenizer, separator, prompts[0], ids[0])
  pieces = ExampleTokens(ids, tuple(prompt_ids), label_token,
                         np.array(sep_ids, np.int32),
                         np.array(header_ids, np.int32),
                         label_token_sets(tokenizer, words))
  _verify_boundaries(tokenizer, pieces, prompts, words, separator, header)
  return pieces


def _adds_bos(tokenizer) -> bool:
  probe = tokenizer("a", add_special_tokens=True)["input_ids"]
  return bool(probe) and probe[0] == tokenizer.bos_token_id


def _separator_in_context(tokenizer, separator, next_prompt, example_id):
  whole = _encode(tokenizer, separator + next_prompt)
  tail = _encode(tokenizer, next_prompt)
  if not separator:
    return []
  if len(whole) <= len(tail) or whole[len(whole) - len(tail):] != tail:
    raise ValueError(
        f"separator {separator!r} merges with the start of example "
        f"{example_id!r}'s prompt in this tokenizer; choose another separator")
  return whole[:len(whole) - len(tail)]


def _verify_boundaries(tokenizer, pieces: ExampleTokens, prompts, words,
                       separator, header):
  """Every demo followed by the next example's prompt, for both labels."""
  n = pieces.num_examples
  label_words = (words.false, words.true)
  for i in range(n):
    nxt = (i + 1) % n
    for label in (0, 1):
      text = prompts[i] + label_words[label] + separator + prompts[nxt]
      expected = _encode(tokenizer, text)
      got = (list(pieces.prompts[i]) + [int(pieces.label_token[label])] +
             list(pieces.separator) + list(pieces.prompts[nxt]))
      if got != expected:
        raise ValueError(
            f"example {pieces.ids[i]!r}: tokenising the pieces (prompt | "
            f"{label_words[label]!r} | separator | next prompt) differs from "
            f"tokenising the whole text: {got} vs {expected}. Adjust the "
            "template's ending or the separator so no token spans a boundary")
  if header:
    expected = _encode(tokenizer, header + prompts[0])
    if _encode(tokenizer, header) + list(pieces.prompts[0]) != expected:
      raise ValueError(f"header {header!r} merges with the first prompt "
                       f"(example {pieces.ids[0]!r}); end it with the separator")
