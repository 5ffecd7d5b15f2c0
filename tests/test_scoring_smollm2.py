"""LOO scoring on the real SmolLM2-135M (GGUF) with real TruthfulQA records."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax.model import forward, masks
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.tasks import bundled_path
from icm_jax.tasks.templates import TRUTHFULQA
from icm_jax.tokenization import LabelWords, label_token_sets, tokenize_examples

def truthfulqa_records(split):
  # The package's bundled copy of the ICM TruthfulQA files (byte-identical to
  # ../shared/data/icm), so these tests run on every checkout.
  with open(bundled_path("truthfulqa", split)) as f:
    return json.load(f)


def prompts_of(records):
  return [TRUTHFULQA.format(**r) for r in records]


def test_label_words_are_clean_tokens_on_every_record(smollm2_tokenizer):
  tok = smollm2_tokenizer
  for split in ("train", "test"):
    records = truthfulqa_records(split)
    # Raises naming the record if any boundary merges across pieces.
    pieces = tokenize_examples(tok, prompts_of(records),
                               ids=[f"{split}/{i}" for i in range(len(records))])
    assert pieces.num_examples == len(records)
    assert list(pieces.label_token) == [4178, 3635]  # " False", " True"
    assert list(pieces.separator) == [198, 198]      # "\n\n" before "Question"
    assert len(pieces.header) == 0                   # SmolLM2 adds no BOS


def test_trailing_space_template_is_rejected(smollm2_tokenizer):
  with pytest.raises(ValueError, match="must not end with a space"):
    tokenize_examples(smollm2_tokenizer, ["Question: x\nI think this claim is "])


def test_label_token_sets(smollm2_tokenizer):
  false_ids, true_ids = label_token_sets(smollm2_tokenizer, LabelWords())
  # ' False' 'False' ' false' 'false' / ' True' 'True' ' true' 'true'
  assert sorted(false_ids) == [4178, 4245, 7065, 21642]
  assert sorted(true_ids) == [2629, 2787, 3635, 10469]
  exact = label_token_sets(smollm2_tokenizer, LabelWords(rule="exact"))
  assert [list(s) for s in exact] == [[4178], [3635]]


def test_multi_token_label_word_fails_at_setup(smollm2_tokenizer):
  with pytest.raises(ValueError, match=r"' Truthfully' is 2 tokens"):
    tokenize_examples(smollm2_tokenizer, ["Claim: x"],
                      words=LabelWords(true=" Truthfully"))


def test_exact_mode_equals_whole_text_prompts(smollm2):
  """The official way: build each LOO prompt as text, tokenise it whole."""
  config, params, tok = smollm2
  records = truthfulqa_records("test")[:6]
  prompts = prompts_of(records)
  labels = np.array([r["label"] for r in records], np.int32)
  labels[2] = -1
  words = LabelWords()
  pieces = tokenize_examples(tok, prompts, words=words)
  scorer = LOOScorer(config, params, pieces, ScoringConfig("exact", rows_per_chunk=2))
  out = scorer.score(labels, queries=np.ones(len(records), bool))
  sets = [jnp.asarray(s) for s in pieces.label_token_sets]
  for i in range(len(records)):
    text = "".join(prompts[j] + (words.true if labels[j] else words.false) + "\n\n"
                   for j in range(len(records)) if j != i and labels[j] >= 0)
    ids = tok(text + prompts[i], add_special_tokens=False)["input_ids"]
    t = len(ids)
    logits = forward(params, jnp.asarray([ids]), masks.default_positions(1, t),
                     masks.causal_mask(1, t), config=config)[0, -1]
    logp = jax.nn.log_softmax(logits)
    ref = [float(jax.nn.logsumexp(logp[s])) for s in sets]
    assert abs(out.log_p_false[i] - ref[0]) <= 1e-3
    assert abs(out.log_p_true[i] - ref[1]) <= 1e-3
    # A clean label token is a plausible continuation, not a ~-10 outlier.
    assert max(ref) > -6
