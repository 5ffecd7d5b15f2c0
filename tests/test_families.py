"""Mistral, Qwen2/2.5 and Qwen3 against transformers (PyTorch) as the reference.

Each family is a tiny random model saved by transformers' own
*ForCausalLM class, with large weights, non-zero q/k/v biases and non-unit
norm weights (Qwen3's q_norm/k_norm included), so a dropped bias, a skipped
norm or a mixed-up tensor moves the log-probs far past the tolerance.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from icm_jax.checkpoints import CheckpointError, load_model, save_hf_checkpoint
from icm_jax.model import LlamaConfig, forward, masks, param_shapes
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.sharding import (MeshConfig, create_mesh, make_sharded_forward,
                              param_shardings)
from icm_jax.tokenization import LabelWords, tokenize_examples
from test_checkpoints import write_tiny_gguf  # noqa: E402

TOL = 1e-4
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2/2.5 and Qwen3).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Claim: the sky is blue. This claim is True", " True True true",
          "Claim: two plus two is five. This claim is False", " False false",
          "True False", "true", "false", "Question: is this right?\n\nAnswer:"] * 20


def qwen_style_tokenizer():
  """A byte-level BPE built as Qwen2's is (regex split, then bytes; no BOS),
  trained here on a few sentences: ~300 tokens, nothing downloaded."""
  from tokenizers import (Regex, Tokenizer, decoders, models, normalizers,
                          pre_tokenizers, trainers)
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>",
      pad_token="<|endoftext|>")


TOKENIZER = qwen_style_tokenizer()
VOCAB = len(TOKENIZER)
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5)
FAMILIES = {
    # Tied embeddings, q/k/v biases, rope θ 1e6 (Qwen2.5-0.5B's shape).
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(COMMON, hidden_size=64, intermediate_size=96,
                   tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default",
                                    "rope_theta": 1e6})),
    # Explicit head_dim (16 != 48 / 4), per-head q/k norms, untied head.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(COMMON, hidden_size=48, intermediate_size=80, head_dim=16,
                   tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default",
                                    "rope_theta": 1e6})),
    # A window longer than every row the tests run.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(COMMON, hidden_size=48, intermediate_size=80,
                     head_dim=16, sliding_window=64,
                     tie_word_embeddings=False)),
}


def make_torch_model(family, seed=0):
  config_cls, model_cls, kw = FAMILIES[family]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kw)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:  # weights and biases alike
        p.normal_(0.0, 0.15)
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """(family, torch model, its checkpoint dir with the tokenizer, loaded)."""
  name = request.param
  model = make_torch_model(name)
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  TOKENIZER.save_pretrained(path)
  return name, model, path, load_model(path)


def torch_logprobs(model, tokens):
  with torch.no_grad():
    logits = model(torch.as_tensor(np.asarray(tokens))).logits.float()
  return torch.log_softmax(logits, -1).numpy()


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) -
                             np.asarray(b, np.float64))))


def random_tokens(batch=2, length=40, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def our_logprobs(params, config, tokens, fn=None):
  b, t = tokens.shape
  fn = fn or (lambda *a: forward(*a, config=config))
  # Host arrays: the sharded jit places them itself.
  logits = fn(params, np.asarray(tokens, np.int32),
              np.asarray(masks.default_positions(b, t)),
              np.asarray(masks.causal_mask(b, t)))
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))


def test_import_matches_transformers_also_sharded(family):
  name, model, path, loaded = family
  cfg = loaded.config
  assert cfg.architecture == name
  assert cfg.qkv_bias == (name == "qwen2") and cfg.qk_norm == (name == "qwen3")
  assert cfg.sliding_window == (64 if name == "mistral" else None)
  assert cfg.rope_theta == (1e6 if name.startswith("qwen") else 1e4)
  flat = _flat(loaded.params)
  assert ("layers/self_attn/q_proj/bias" in flat) == cfg.qkv_bias
  assert ("layers/self_attn/k_norm/scale" in flat) == cfg.qk_norm
  assert cfg.num_params() == sum(v.size for v in flat.values())

  tokens = random_tokens()
  ref = torch_logprobs(model, tokens)
  d = max_diff(our_logprobs(loaded.params, cfg, tokens), ref)
  # 8 fake devices: fsdp=2 x tensor=4, params placed by the project's rules.
  mesh = create_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  sharded = load_model(path, with_tokenizer=False, param_shardings=lambda c:
                       param_shardings(param_shapes(c), mesh))
  with jax.set_mesh(mesh):
    d_sharded = max_diff(our_logprobs(sharded.params, cfg, tokens,
                                      make_sharded_forward(cfg, mesh)), ref)
  print(f"{name} import max|dlogp|={d:.2e} sharded={d_sharded:.2e}")
  assert d <= TOL and d_sharded <= TOL


def _flat(params):
  return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def test_export_roundtrip_transformers(family, tmp_path):
  name, model, _, loaded = family
  # Params that are not the source's: the export must write every tensor.
  rng = np.random.default_rng(5)
  params = jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
      loaded.params)
  out = tmp_path / "export"
  save_hf_checkpoint(params, loaded.config, out, tokenizer=loaded.tokenizer)
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["architectures"] == [type(model).__name__]
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  assert type(hf) is type(model)
  tokens = random_tokens(seed=2)
  d = max_diff(our_logprobs(params, loaded.config, tokens),
               torch_logprobs(hf, tokens))
  print(f"{name} export max|dlogp|={d:.2e}")
  assert d <= TOL
  back = load_model(out, with_tokenizer=False)
  assert back.config == loaded.config
  for key, value in _flat(params).items():
    np.testing.assert_array_equal(np.asarray(_flat(back.params)[key]),
                                  np.asarray(value), err_msg=key)


def test_qwen_gguf_matches_transformers(family, tmp_path):
  """llama.cpp's qwen2/qwen3 GGUF layout: HF row order, biases, q/k norms."""
  name, model, _, loaded = family
  if name == "mistral":
    pytest.skip("llama.cpp writes Mistral as a 'llama' GGUF (test_checkpoints)")
  path = tmp_path / f"{name}.gguf"
  write_tiny_gguf(path, model, arch=name)
  gguf = load_model(path, with_tokenizer=False)
  for field in ("architecture", "qkv_bias", "qk_norm", "head_dim",
                "tie_word_embeddings", "rope_theta"):
    assert getattr(gguf.config, field) == getattr(loaded.config, field), field
  tokens = random_tokens(seed=3)
  d = max_diff(our_logprobs(gguf.params, gguf.config, tokens),
               torch_logprobs(model, tokens))
  print(f"{name} gguf max|dlogp|={d:.2e}")
  assert d <= TOL


def test_qwen_tokenizer_label_words():
  """One clean token after the prompt, and every variant spelling found, with
  Qwen's byte-level BPE and split regex (no BOS)."""
  prompts = ["Claim: the sky is blue. This claim is",
             "Claim: two plus two is five. This claim is"]
  ex = tokenize_examples(TOKENIZER, prompts, header="Question:\n\n")
  assert len(ex.header) > 0 and TOKENIZER.bos_token_id is None
  false_ids, true_ids = ex.label_token_sets
  spelled = lambda ids: sorted(TOKENIZER.decode([int(i)]) for i in ids)
  assert spelled(true_ids) == [" True", " true", "True", "true"]
  assert spelled(false_ids) == [" False", " false", "False", "false"]
  assert TOKENIZER.decode([int(t) for t in ex.label_token]) == " False True"
  with pytest.raises(ValueError, match="' purple' is [2-9] tokens"):
    tokenize_examples(TOKENIZER, prompts, words=LabelWords(" purple", " True"))


def test_loo_exact_equals_per_prompt_transformers(family):
  """Exact LOO on the Qwen2 model (biases, tied head) equals running every
  leave-one-out prompt through transformers one at a time."""
  name, model, _, loaded = family
  if name != "qwen2":
    pytest.skip("one family is enough for the scorer")
  prompts = ["Claim: the sky is blue. This claim is",
             "Claim: two plus two is five. This claim is",
             "Claim: true is true. This claim is",
             "Claim: blue is five. This claim is",
             "Claim: sky. This claim is"]
  ex = tokenize_examples(loaded.tokenizer, prompts)
  labels = np.array([1, 0, -1, 1, 0])
  out = LOOScorer(loaded.config, loaded.params, ex, ScoringConfig(
      "exact", rows_per_chunk=2)).score(labels, queries=np.ones(5, bool))
  for i in range(5):
    tokens = list(ex.header)
    for j, y in enumerate(labels):
      if j != i and y >= 0:
        tokens += (list(ex.prompts[j]) + [int(ex.label_token[y])] +
                   list(ex.separator))
    logp = torch_logprobs(model, [tokens + list(ex.prompts[i])])[0, -1]
    ref = [np.logaddexp.reduce(logp[s]) for s in ex.label_token_sets]
    np.testing.assert_allclose([out.log_p_false[i], out.log_p_true[i]], ref,
                               atol=TOL)


def test_sliding_window_shorter_than_row_is_refused(family):
  name, _, _, loaded = family
  if name != "mistral":
    pytest.skip("Mistral carries the window")
  tokens = random_tokens(batch=1, length=65)
  with pytest.raises(ValueError, match="sliding_window=64.* 65 positions"):
    our_logprobs(loaded.params, loaded.config, tokens)


def test_family_fields_are_checked(tmp_path):
  with pytest.raises(ValueError, match="qkv_bias"):
    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                architecture="qwen2")
  base = make_torch_model("qwen3").config.to_dict()
  for edit, needle in (({"attention_bias": True}, "attention_bias"),
                       ({"use_sliding_window": True, "sliding_window": 0,
                         "layer_types": ["sliding_attention"] * 2},
                        "sliding_window=0"),
                       ({"model_type": "qwen2"}, "Qwen3ForCausalLM")):
    conf = dict(base, **edit, architectures=["Qwen3ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=needle):
      load_model(tmp_path, with_tokenizer=False)
  # A Qwen2 whose windowed layers are real gets the window, to be checked.
  conf = dict(make_torch_model("qwen2").config.to_dict(),
              use_sliding_window=True, sliding_window=32, max_window_layers=1)
  conf.pop("layer_types", None)
  assert LlamaConfig.from_hf_config(conf).sliding_window == 32
