"""Checkpoint import/export against transformers (PyTorch) as the reference.

Tiny random LlamaForCausalLM models are saved with `save_pretrained` (or
written as GGUF with gguf.GGUFWriter), loaded with `load_model`, and our
forward's log-softmax is compared with torch's on random tokens.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from icm_jax.checkpoints import (CheckpointError, LoadedModel, load_model,
                                 save_hf_checkpoint)
from icm_jax.checkpoints import common as ckpt_common
from icm_jax.checkpoints.hf import SafetensorsSource
from icm_jax.model import forward, masks, param_shapes

TOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# GQA (kv < heads), head_dim != hidden/heads, llama3 rope, untied lm_head.
GQA_UNTIED = dict(vocab_size=96, hidden_size=48, intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, rope_parameters=LLAMA3_ROPE,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)
# Tied embeddings, multi-query attention, default rope.
TIED_MQA = dict(vocab_size=80, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                tie_word_embeddings=True, rms_norm_eps=1e-6)
# Tied, plain multi-head attention.
TIED_MHA = dict(TIED_MQA, num_key_value_heads=4, num_hidden_layers=2)


def make_torch_model(kw, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**kw)
  model = transformers.LlamaForCausalLM(cfg).float().eval()
  # Bigger-than-default weights and non-unit norms, so any mix-up of tensors
  # (transpose, wrong norm, wrong head layout) moves the logits a lot.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def random_tokens(vocab, batch=2, length=20, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def torch_logprobs(model, tokens):
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens)).logits.float()
  return torch.log_softmax(logits, -1).numpy()


def our_logprobs(params, config, tokens):
  b, t = tokens.shape
  logits = forward(params, jnp.asarray(tokens), masks.default_positions(b, t),
                   masks.causal_mask(b, t), config=config)
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) -
                             np.asarray(b, np.float64))))


def tree_allclose(a, b, atol=0.0):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), atol=atol, rtol=0)


def tiny_tokenizer(vocab_size):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
      eos_token="</s>")


# -- HF import ---------------------------------------------------------------


@pytest.mark.parametrize("kw,save_kw", [
    pytest.param(GQA_UNTIED, {}, id="gqa_untied_llama3_headdim"),
    pytest.param(TIED_MQA, {"max_shard_size": "8KB"}, id="tied_mqa_sharded"),
    pytest.param(TIED_MHA, {}, id="tied_mha"),
])
def test_hf_import_matches_transformers(tmp_path, kw, save_kw):
  model = make_torch_model(kw)
  model.save_pretrained(tmp_path, **save_kw)
  files = os.listdir(tmp_path)
  if save_kw:
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
  else:
    assert "model.safetensors" in files

  loaded = load_model(tmp_path, with_tokenizer=False)
  assert isinstance(loaded, LoadedModel) and loaded.tokenizer is None
  cfg = loaded.config
  assert cfg.tie_word_embeddings == kw["tie_word_embeddings"]
  assert ("lm_head" in loaded.params) != kw["tie_word_embeddings"]
  assert cfg.num_kv_heads == kw["num_key_value_heads"]
  if kw.get("head_dim"):
    assert cfg.head_dim == kw["head_dim"] != kw["hidden_size"] // kw[
        "num_attention_heads"]
  if kw["rope_parameters"]["rope_type"] == "llama3":
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
  # Same tree (structure, shapes, dtypes) as the model defines.
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), loaded.params) ==
          jax.tree.map(lambda x: (x.shape, x.dtype), param_shapes(cfg)))

  tokens = random_tokens(kw["vocab_size"], length=40)
  d = max_diff(our_logprobs(loaded.params, cfg, tokens),
               torch_logprobs(model, tokens))
  print(f"hf import max|dlogp|={d:.2e}")
  assert d <= TOL


def test_hf_import_bf16_checkpoint(tmp_path):
  reference = make_torch_model(GQA_UNTIED)
  with torch.no_grad():  # bf16-rounded weights, float32 math (and rope)
    for p in reference.parameters():
      p.copy_(p.bfloat16().float())
  copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  raw = load_file(str(tmp_path / "model.safetensors"))
  assert raw["model.embed_tokens.weight"].dtype == jnp.bfloat16

  loaded = load_model(tmp_path, with_tokenizer=False)  # cast to float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded.params))
  tokens = random_tokens(GQA_UNTIED["vocab_size"])
  d = max_diff(our_logprobs(loaded.params, loaded.config, tokens),
               torch_logprobs(reference, tokens))
  print(f"bf16 import max|dlogp|={d:.2e}")
  assert d <= TOL
  # Exact weights: q_proj of layer 1, transposed.
  q = reference.model.layers[1].self_attn.q_proj.weight.detach().numpy().T
  np.testing.assert_array_equal(
      np.asarray(loaded.params["layers"]["self_attn"]["q_proj"]["kernel"][1]), q)

  bf = load_model(tmp_path, with_tokenizer=False,
                  config_overrides={"param_dtype": "bfloat16",
                                    "dtype": "bfloat16", "remat": True})
  assert bf.config.param_dtype == "bfloat16" and bf.config.remat
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf.params))
  tree_allclose(bf.params, loaded.params)  # bf16 -> f32 -> bf16 is exact


# -- loading into shardings --------------------------------------------------


def last_dim_shardings(config, mesh):
  """Shard the last dim of 2-D/3-D params over 'x' where divisible, and the
  layer axis of stacked ones over 'l' where divisible; else replicate."""
  def one(leaf):
    spec = [None] * leaf.ndim
    if leaf.ndim >= 2 and leaf.shape[-1] % mesh.shape["x"] == 0:
      spec[-1] = "x"
    if leaf.ndim == 3 and leaf.shape[0] % mesh.shape["l"] == 0:
      spec[0] = "l"
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(one, param_shapes(config))


def test_load_into_shardings(tmp_path):
  assert jax.device_count() == 8
  model = make_torch_model(GQA_UNTIED)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  plain = load_model(tmp_path, with_tokenizer=False)
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("l", "x"))
  want = last_dim_shardings(plain.config, mesh)

  for arg in (want, lambda cfg: last_dim_shardings(cfg, mesh)):
    sharded = load_model(tmp_path, with_tokenizer=False, param_shardings=arg)
    tree_allclose(sharded.params, plain.params)
    for arr, s in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(want)):
      assert arr.sharding == s, (arr.sharding, s)
  q = sharded.params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P("l", None, "x")
  assert q.addressable_shards[0].data.shape == (1, 48, 16)

  tokens = random_tokens(GQA_UNTIED["vocab_size"])
  d = max_diff(our_logprobs(sharded.params, sharded.config, tokens),
               torch_logprobs(model, tokens))
  assert d <= TOL


def test_sharded_load_reads_only_slices(tmp_path):
  """Each read is one layer's slice for one device, not a whole tensor."""
  make_torch_model(TIED_MHA).save_pretrained(tmp_path)
  loaded = load_model(tmp_path, with_tokenizer=False)
  config = loaded.config
  mesh = Mesh(np.asarray(jax.devices()).reshape(1, 8), ("l", "x"))
  shardings = last_dim_shardings(config, mesh)
  reads = []

  class Recording(SafetensorsSource):
    def read(self, name, index):
      out = super().read(name, index)
      reads.append((name, out.size, int(np.prod(self.shape(name)))))
      return out

  with Recording(str(tmp_path)) as src:
    params = ckpt_common.build_params(src, config, shardings)
  tree_allclose(params, loaded.params)
  for name, got, full in reads:
    if name.endswith("proj.weight") or name == "model.embed_tokens.weight":
      assert got * 8 == full, (name, got, full)  # 1/8 of one layer's tensor


def test_load_with_project_sharding_rules(tmp_path):
  sharding = pytest.importorskip("icm_jax.sharding")
  make_torch_model(GQA_UNTIED).save_pretrained(tmp_path)
  plain = load_model(tmp_path, with_tokenizer=False)
  mesh = sharding.create_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  shard_fn = lambda cfg: sharding.param_shardings(param_shapes(cfg), mesh)
  loaded = load_model(tmp_path, with_tokenizer=False, param_shardings=shard_fn)
  tree_allclose(loaded.params, plain.params)
  for arr, s in zip(jax.tree.leaves(loaded.params),
                    jax.tree.leaves(shard_fn(plain.config))):
    assert arr.sharding == s


# -- export ------------------------------------------------------------------


def _random_our_params(config, seed=0):
  """Random params in our layout (numpy rng: no compile); large weights and
  non-unit norms, so a swapped or transposed tensor shows in the logits."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if ckpt_common.path_names(path)[-1] == "scale":
      return jnp.asarray(1.0 + 0.3 * x)
    return jnp.asarray(0.15 * x)
  return jax.tree_util.tree_map_with_path(one, param_shapes(config))


@pytest.mark.parametrize("kw,export_kw", [
    pytest.param(GQA_UNTIED, {}, id="untied"),
    pytest.param(TIED_MQA, {"max_shard_size": 6000}, id="tied_sharded"),
])
def test_export_roundtrip_transformers(tmp_path, kw, export_kw):
  config = load_model_config(tmp_path, kw)
  params = _random_our_params(config)
  out = tmp_path / "export"
  tok = tiny_tokenizer(config.vocab_size)
  written = save_hf_checkpoint(params, config, out, tokenizer=tok, **export_kw)
  names = os.listdir(out)
  assert "config.json" in names and "generation_config.json" in names
  if export_kw:
    assert "model.safetensors.index.json" in names
    assert sum(f.endswith(".safetensors") for f in names) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= set(names)
  else:
    assert "model.safetensors" in names
  assert all(os.path.exists(p) for p in written)

  hf = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  tokens = random_tokens(config.vocab_size)
  ours = our_logprobs(params, config, tokens)
  d = max_diff(ours, torch_logprobs(hf, tokens))
  print(f"export max|dlogp|={d:.2e}")
  assert d <= TOL

  back = load_model(out)  # with the tokenizer we saved
  assert back.config == config
  tree_allclose(back.params, params)
  assert back.tokenizer("w5 w7")["input_ids"][-2:] == [5, 7]


def load_model_config(tmp_path, kw):
  src = tmp_path / "src"
  make_torch_model(kw).save_pretrained(src)
  return load_model(src, with_tokenizer=False).config


def test_export_bf16_and_sharded_params(tmp_path):
  config = load_model_config(tmp_path, GQA_UNTIED)
  params = _random_our_params(config, seed=3)
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("l", "x"))
  sharded = jax.device_put(params, last_dim_shardings(config, mesh))
  out = tmp_path / "bf16"
  save_hf_checkpoint(sharded, config, out, dtype="bfloat16")
  raw = load_file(str(out / "model.safetensors"))
  assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == jnp.bfloat16
  assert raw["model.layers.0.self_attn.q_proj.weight"].shape == (64, 48)

  hf = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                         params)
  tokens = random_tokens(config.vocab_size)
  d = max_diff(our_logprobs(rounded, config, tokens),
               torch_logprobs(hf, tokens))
  assert d <= TOL
  # Re-saving into the same dir as float32 single file replaces the old one.
  save_hf_checkpoint(params, config, out, max_shard_size="30KB")
  assert "model.safetensors" not in os.listdir(out)
  tree_allclose(load_model(out, with_tokenizer=False).params, params)


# -- GGUF (tiny, written here) -------------------------------------------------


def _llamacpp_permute(w, n_heads):
  """llama.cpp's convert-time Q/K row order: per head, interleave the two
  rotate-half coordinates ([x0..x_{h-1}, y0..y_{h-1}] -> [x0, y0, x1, y1..])."""
  rows = w.shape[0]
  half = rows // n_heads // 2
  out = np.empty_like(w)
  for h in range(n_heads):
    for c in range(2):
      for i in range(half):
        out[h * 2 * half + 2 * i + c] = w[h * 2 * half + c * half + i]
  return out


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, model, arch="llama", extra=None, replace=None):
  """GGUF of `model` as llama.cpp writes it (F32); `replace` maps GGUF tensor
  names to a substitute array, or None to leave the tensor out. llama.cpp
  interleaves the q/k rotary rows of "llama" files only (Qwen's "neox" rope
  keeps HF's layout); q/k/v biases and q/k norms are written when present."""
  import gguf
  cfg = model.config
  replace = replace or {}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or
                             cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(cfg.vocab_size)
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

  def add(name, t):
    t = replace.get(name, t)
    if t is not None:
      w.add_tensor(name, np.ascontiguousarray(t))

  add("token_embd.weight", sd["model.embed_tokens.weight"])
  permute = arch not in ("qwen2", "qwen3")
  for i in range(cfg.num_hidden_layers):
    for hf_mod, g in _GGUF_NAMES.items():
      for kind in ("weight", "bias"):
        t = sd.get(f"model.layers.{i}.{hf_mod}.{kind}")
        if t is None:
          continue
        if permute and g == "attn_q":
          t = _llamacpp_permute(t, cfg.num_attention_heads)
        elif permute and g == "attn_k":
          t = _llamacpp_permute(t, cfg.num_key_value_heads)
        add(f"blk.{i}.{g}.{kind}", t)
  add("output_norm.weight", sd["model.norm.weight"])
  if not cfg.tie_word_embeddings:
    add("output.weight", sd["lm_head.weight"])
  for name, t in (extra or {}).items():
    add(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


GGUF_GQA = dict(GQA_UNTIED, rope_parameters={"rope_type": "default",
                                             "rope_theta": 1e5})


def test_tiny_gguf_matches_torch_and_shards(tmp_path):
  model = make_torch_model(GGUF_GQA)
  path = tmp_path / "tiny.gguf"
  write_tiny_gguf(path, model)
  loaded = load_model(path, with_tokenizer=False)
  assert loaded.config.num_kv_heads == 2 and loaded.config.head_dim == 16
  assert not loaded.config.tie_word_embeddings
  tokens = random_tokens(GGUF_GQA["vocab_size"])
  d = max_diff(our_logprobs(loaded.params, loaded.config, tokens),
               torch_logprobs(model, tokens))
  print(f"tiny gguf max|dlogp|={d:.2e}")
  assert d <= TOL
  # Sharding the q/k output rows: each device un-permutes only its rows.
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("l", "x"))
  sharded = load_model(path, with_tokenizer=False,
                       param_shardings=lambda c: last_dim_shardings(c, mesh))
  tree_allclose(sharded.params, loaded.params)


def test_gguf_llama3_rope_freqs(tmp_path):
  """llama.cpp stores llama3 rope scaling as a `rope_freqs` tensor: refuse to
  guess; accept the matching rope_scaling given as a config override."""
  model = make_torch_model(GQA_UNTIED)
  hd, theta = GQA_UNTIED["head_dim"], LLAMA3_ROPE["rope_theta"]
  base = 1.0 / theta**(torch.arange(0, hd, 2, dtype=torch.float32) / hd)
  factors = (base / model.model.rotary_emb.inv_freq).numpy().astype(np.float32)
  assert factors.max() > 7  # scaling is really in effect
  path = tmp_path / "llama3.gguf"
  write_tiny_gguf(path, model, extra={"rope_freqs.weight": factors})
  _raises(path, "rope_freqs.weight", "rope_scaling")
  rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
  loaded = load_model(path, with_tokenizer=False,
                      config_overrides={"rope_scaling": rope})
  tokens = random_tokens(GQA_UNTIED["vocab_size"], length=40)
  d = max_diff(our_logprobs(loaded.params, loaded.config, tokens),
               torch_logprobs(model, tokens))
  assert d <= TOL
  wrong = dict(rope, factor=4.0)
  _raises(path, "rope_freqs.weight", config_overrides={"rope_scaling": wrong})


# -- bad input ----------------------------------------------------------------


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  make_torch_model(TIED_MHA).save_pretrained(path)
  return path


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _raises(path, *needles, **kw):
  with pytest.raises(CheckpointError) as e:
    load_model(path, with_tokenizer=False, **kw)
  msg = str(e.value)
  for needle in needles:
    assert str(needle) in msg, f"{needle!r} not in {msg!r}"
  return msg


def test_missing_path_and_config(tmp_path, good_ckpt):
  _raises(tmp_path / "nope", "nope")
  _raises(tmp_path / "nope.gguf", "nope.gguf")
  d = _copy(good_ckpt, tmp_path / "noconf")
  os.remove(d / "config.json")
  _raises(d, "config.json", str(d))
  d2 = _copy(good_ckpt, tmp_path / "noweights")
  os.remove(d2 / "model.safetensors")
  _raises(d2, "model.safetensors")
  (tmp_path / "notes.txt").write_text("hi")
  _raises(tmp_path / "notes.txt", "notes.txt")
  d3 = _copy(good_ckpt, tmp_path / "badjson")
  (d3 / "config.json").write_text("{not json")
  _raises(d3, "config.json")


def test_truncated_or_corrupt_safetensors(tmp_path, good_ckpt):
  d = _copy(good_ckpt, tmp_path / "trunc")
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  _raises(d, "model.safetensors", "truncated")
  f.write_bytes(b"\x00" * 3)
  _raises(d, "model.safetensors")


def test_index_names_missing_shard(tmp_path):
  d = tmp_path / "sharded"
  make_torch_model(TIED_MQA).save_pretrained(d, max_shard_size="8KB")
  shard = sorted(p for p in os.listdir(d) if p.startswith("model-"))[1]
  os.remove(d / shard)
  _raises(d, "model.safetensors.index.json", shard)


def _rewrite(path, edit):
  f = path / "model.safetensors"
  tensors = load_file(str(f))
  edit(tensors)
  save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_tensor(tmp_path, good_ckpt):
  d = _copy(good_ckpt, tmp_path / "missing")
  _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  _raises(d, "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(tmp_path, good_ckpt):
  d = _copy(good_ckpt, tmp_path / "shape")
  name = "model.layers.0.self_attn.k_proj.weight"

  def edit(t):
    t[name] = np.zeros((16, 32), np.float32)  # expected (32, 32)
  _rewrite(d, edit)
  _raises(d, name, "(16, 32)", "(32, 32)")


def test_non_llama_architecture(tmp_path, good_ckpt):
  # Gemma2 is a stretch family icm-jax skips; a Qwen2 class under a llama
  # model_type is a mix-up, not a Llama.
  for arch, model_type in (("Gemma2ForCausalLM", "gemma2"),
                           ("GPT2LMHeadModel", "gpt2"),
                           ("Qwen2ForCausalLM", "llama")):
    d = _copy(good_ckpt, tmp_path / arch)
    conf = json.loads((d / "config.json").read_text())
    conf.update(architectures=[arch], model_type=model_type)
    (d / "config.json").write_text(json.dumps(conf))
    _raises(d, "config.json", arch)


def test_unexpected_extra_tensor(tmp_path, good_ckpt):
  d = _copy(good_ckpt, tmp_path / "extra")
  name = "model.layers.0.self_attn.q_proj.bias"
  _rewrite(d, lambda t: t.update({name: np.zeros(32, np.float32)}))
  _raises(d, name, "unexpected")
  with pytest.warns(UserWarning, match=name):
    loaded = load_model(d, with_tokenizer=False, strict=False)
  good = load_model(good_ckpt, with_tokenizer=False).params
  tree_allclose(loaded.params, good)
  # A tied checkpoint that still carries lm_head.weight: warn, keep tying.
  d2 = _copy(good_ckpt, tmp_path / "tied_head")
  _rewrite(d2, lambda t: t.update(
      {"lm_head.weight": np.ones((80, 32), np.float32)}))
  with pytest.warns(UserWarning, match="lm_head.weight"):
    loaded = load_model(d2, with_tokenizer=False)
  assert "lm_head" not in loaded.params
  tree_allclose(loaded.params, good)


def test_bad_overrides_and_shardings(good_ckpt):
  with pytest.raises(ValueError, match="not_a_field"):
    load_model(good_ckpt, with_tokenizer=False,
               config_overrides={"not_a_field": 1})
  with pytest.raises(ValueError, match="norm/scale"):
    load_model(good_ckpt, with_tokenizer=False,
               param_shardings={"embed_tokens": {"embedding": None}})
  with pytest.raises(CheckpointError, match="tokenizer"):
    load_model(good_ckpt)  # directory has no tokenizer files


def test_bad_gguf(tmp_path):
  model = make_torch_model(GGUF_GQA)
  good = tmp_path / "good.gguf"
  write_tiny_gguf(good, model)
  data = good.read_bytes()

  trunc = tmp_path / "trunc.gguf"
  trunc.write_bytes(data[: len(data) - 1000])
  _raises(trunc, "trunc.gguf")
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(b"GGUF" + b"\xff" * 64)
  _raises(garbage, "garbage.gguf")

  gpt2 = tmp_path / "gpt2.gguf"
  write_tiny_gguf(gpt2, model, arch="gpt2")
  _raises(gpt2, "gpt2.gguf", "gpt2")

  extra = tmp_path / "extra.gguf"
  write_tiny_gguf(extra, model,
                  extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
  _raises(extra, "blk.0.attn_q.bias")

  wrong = tmp_path / "wrong.gguf"
  write_tiny_gguf(wrong, model,
                  replace={"blk.1.attn_v.weight": np.zeros((16, 48), np.float32)})
  _raises(wrong, "model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight",
          "(16, 48)", "(32, 48)")

  missing = tmp_path / "missing.gguf"
  write_tiny_gguf(missing, model, replace={"blk.1.ffn_up.weight": None})
  _raises(missing, "model.layers.1.mlp.up_proj.weight")
