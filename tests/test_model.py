"""Properties of the Llama forward that the LOO kernel and trainer rely on.

Numerical parity with transformers lives in test_checkpoints.py / test_smollm2.py;
here the references are independent runs of the same model on re-laid-out inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax.model import KVCache, LlamaConfig, RopeScaling, forward, init_params, masks

TINY = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80,
                   num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                   rope_theta=1e4, max_position_embeddings=512)


@pytest.fixture(scope="module")
def params():
  return init_params(TINY, jax.random.key(0))


def _run(params, tokens, positions=None, mask=None, config=TINY, **kw):
  tokens = jnp.asarray(tokens)
  b, t = tokens.shape
  positions = masks.default_positions(b, t) if positions is None else positions
  mask = masks.causal_mask(b, t) if mask is None else mask
  return forward(params, tokens, positions, mask, config=config, **kw)


def test_block_diagonal_mask_equals_separate_runs(params):
  """Two packed segments with a block-diagonal mask == each segment alone."""
  rng = np.random.RandomState(1)
  a, b = rng.randint(0, 97, (1, 13)), rng.randint(0, 97, (1, 9))
  packed = np.concatenate([a, b], axis=1)
  seg = jnp.asarray([[0] * 13 + [1] * 9])
  out = _run(params, packed, masks.segment_positions(seg),
             masks.segment_causal_mask(seg))
  np.testing.assert_allclose(out[:, :13], _run(params, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 13:], _run(params, b), atol=1e-5)
  # Without the block mask the second segment does see the first: the check
  # above is not vacuous.
  leaky = _run(params, packed, masks.segment_positions(seg))
  assert np.abs(leaky[:, 13:] - _run(params, b)).max() > 1e-3


def test_positions_are_explicit(params):
  """Shifting every position changes logits (rope is relative only in q.k)."""
  tokens = np.random.RandomState(2).randint(0, 97, (1, 8))
  base = _run(params, tokens)
  shifted = _run(params, tokens, masks.default_positions(1, 8, offset=5))
  # Attention depends only on relative positions: shifting all is a no-op...
  np.testing.assert_allclose(base, shifted, atol=1e-4)
  # ...but moving one token's position is not.
  pos = np.arange(8)[None].copy()
  pos[0, 3] = 20
  moved = _run(params, tokens, jnp.asarray(pos))
  assert np.abs(moved - base).max() > 1e-3


def test_padded_rows_match_unpadded(params):
  rng = np.random.RandomState(3)
  rows = [rng.randint(0, 97, n) for n in (11, 6)]
  tokens = np.zeros((2, 11), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  lengths = jnp.asarray([11, 6])
  out = _run(params, tokens, mask=masks.padded_causal_mask(lengths, 11))
  for i, r in enumerate(rows):
    np.testing.assert_allclose(out[i, :len(r)], _run(params, r[None])[0],
                               atol=1e-5)


def test_kv_cache_prefix_equals_full_sequence(params):
  """Prefix keys/values once + suffix against them == whole sequence."""
  tokens = np.random.RandomState(4).randint(0, 97, (2, 20))
  full = _run(params, tokens)
  _, cache = _run(params, tokens[:, :12], return_kv=True)
  assert isinstance(cache, KVCache)
  assert cache.k.shape == (3, 2, 12, 2, 16)
  idx = np.arange(20)
  suffix_mask = jnp.broadcast_to(idx[12:, None] >= idx[None, :], (2, 8, 20))
  suffix = _run(params, tokens[:, 12:], masks.default_positions(2, 8, 12),
                suffix_mask, kv_cache=cache)
  np.testing.assert_allclose(suffix, full[:, 12:], atol=1e-5)


def test_logit_positions_select_rows(params):
  tokens = np.random.RandomState(5).randint(0, 97, (2, 10))
  full = _run(params, tokens)
  sel = jnp.asarray([[0, 9, 4], [3, 3, 7]])
  out = _run(params, tokens, logit_positions=sel)
  assert out.shape == (2, 3, 97)
  np.testing.assert_allclose(out, np.take_along_axis(full, sel[..., None], 1),
                             atol=1e-6)
  hidden = _run(params, tokens, logit_positions=sel, return_hidden=True)
  assert hidden.shape == (2, 3, 48)


def test_remat_gives_same_gradients(params):
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, 97, (2, 12)))

  def loss(p, cfg):
    logits = _run(p, tokens, config=cfg)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  g0 = jax.grad(loss)(params, TINY)
  g1 = jax.grad(loss)(params, TINY.replace(remat=True))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_close_to_float32(params):
  tokens = np.random.RandomState(7).randint(0, 97, (1, 16))
  cfg16 = TINY.replace(dtype="bfloat16")
  ref = jax.nn.log_softmax(_run(params, tokens))
  out = _run(params, tokens, config=cfg16)
  assert out.dtype == jnp.float32  # logits always come back in float32
  assert np.abs(jax.nn.log_softmax(out) - ref).max() < 0.1
  # bf16 params: storage dtype follows param_dtype.
  p16 = init_params(TINY.replace(param_dtype="bfloat16"), jax.random.key(0))
  assert p16["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16


def test_mask_shape_is_checked(params):
  tokens = jnp.zeros((1, 5), jnp.int32)
  with pytest.raises(ValueError, match="attention_mask"):
    _run(params, tokens, mask=masks.causal_mask(1, 4))


def test_hf_config_round_trip_and_validation():
  cfg = TINY.replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
                     tie_word_embeddings=True)
  assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
  hf = cfg.to_hf_config()
  with pytest.raises(ValueError, match="gemma2"):
    LlamaConfig.from_hf_config({**hf, "model_type": "gemma2",
                                "architectures": ["Gemma2ForCausalLM"]})
  with pytest.raises(ValueError, match="num_hidden_layers"):
    LlamaConfig.from_hf_config({k: v for k, v in hf.items()
                                if k != "num_hidden_layers"})
  with pytest.raises(ValueError, match="yarn"):
    LlamaConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn"}})
  with pytest.raises(ValueError, match="num_kv_heads"):
    TINY.replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    TINY.replace(dtype="float8")


@pytest.mark.parametrize("block", [4, 5, 64])
def test_blocked_attention_equals_dense(params, block):
  """Query blocks that skip future key blocks give the dense result, also
  with a KV-cache prefix and a non-causal-looking (all True) mask."""
  cfg = TINY.replace(attention_block_size=block)
  tokens = np.random.RandomState(8).randint(0, 97, (2, 19))
  dense = _run(params, tokens)
  np.testing.assert_allclose(_run(params, tokens, config=cfg), dense, atol=1e-5)
  all_true = jnp.ones((2, 19, 19), jnp.bool_)  # future keys masked anyway
  np.testing.assert_allclose(_run(params, tokens, mask=all_true, config=cfg),
                             dense, atol=1e-5)
  _, cache = _run(params, tokens[:, :7], return_kv=True)
  suffix = _run(params, tokens[:, 7:], masks.default_positions(2, 12, 7),
                jnp.ones((2, 12, 19), jnp.bool_), kv_cache=cache, config=cfg)
  np.testing.assert_allclose(suffix, dense[:, 7:], atol=1e-5)
