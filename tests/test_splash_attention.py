"""The TPU splash-attention path, run by the Pallas interpreter on CPU.

Reference: the XLA path (`jax.nn.dot_product_attention`'s math, itself checked
against transformers in test_model/test_smollm2). The masks are the real LOO
masks the scoring kernels build — padded causal rows, prefix-sharing suffixes
against a cached prefix, one-pass queries against the demonstration cache —
plus random masks, with GQA, padding to the 128-lane tiles and a mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax import sharding
from icm_jax.model import LlamaConfig, forward, init_params, masks
from icm_jax.model.layers import causal_attention
from icm_jax.model.splash_attention import splash_attention
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.tokenization import ExampleTokens

TOL = 1e-5
CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=2048, attention="xla")
SPLASH = CFG.replace(attention="splash_interpret")
LABEL_SETS = (np.array([1, 5], np.int32), np.array([2, 7], np.int32))


def qkv(batch, length, keys, heads, kv_heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, length, heads, dim))
  k = rng.normal(size=(batch, keys, kv_heads, dim))
  v = rng.normal(size=(batch, keys, kv_heads, dim))
  return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))


def max_err(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) -
                               jnp.asarray(b, jnp.float32))))


@pytest.mark.parametrize("prefix,length,heads,kv_heads", [
    (0, 100, 4, 2),     # padded to one 128 tile, GQA
    (37, 200, 6, 3),    # cached prefix, T and S both off the tile grid
    (300, 64, 2, 2),    # long prefix, short chunk (the prefix-sharing shape)
])
def test_kernel_equals_xla_on_random_masks(prefix, length, heads, kv_heads):
  batch, dim = 3, 16
  q, k, v = qkv(batch, length, prefix + length, heads, kv_heads, dim)
  rng = np.random.default_rng(1)
  mask = rng.random((batch, length, prefix + length)) < 0.4
  # Every query keeps its own key: no empty softmax rows (as in every LOO mask).
  mask[:, np.arange(length), prefix + np.arange(length)] = True
  mask = jnp.asarray(mask)
  kw = dict(scale=dim**-0.5, prefix_len=prefix)
  want = causal_attention(q, k, v, mask, **kw, impl="xla")
  got = jax.jit(lambda *a: causal_attention(*a, **kw, impl="splash_interpret")
                )(q, k, v, mask)
  assert got.shape == want.shape
  assert max_err(got, want) <= TOL


def test_fully_masked_tiles_are_skipped():
  # Keys 512..1023 (one whole key tile of the 512-key tiling) are hidden
  # from every query, and hold NaN. Any arithmetic on them (even weight 0 x NaN) poisons the
  # output, as it does on the XLA path; splash skips empty tiles entirely.
  batch, length, keys, dim = 2, 128, 1536, 8
  q, k, v = qkv(batch, length, keys, 2, 1, dim, seed=3)
  k = k.at[:, 512:1024].set(jnp.nan)
  v = v.at[:, 512:1024].set(jnp.nan)
  qi = np.arange(length)[:, None] + keys - length
  visible = np.broadcast_to(np.arange(keys)[None, :] <= qi, (batch, length, keys)).copy()
  visible[:, :, 512:1024] = False
  visible = jnp.asarray(visible)
  out = jax.jit(lambda *a: splash_attention(*a, scale=dim**-0.5,
                                            interpret=True))(q, k, v, visible)
  assert bool(jnp.all(jnp.isfinite(out)))
  clean = lambda a: a.at[:, 512:1024].set(0.0)
  want = causal_attention(q, clean(k), clean(v), visible, scale=dim**-0.5,
                          prefix_len=keys - length, impl="xla")
  assert max_err(out, want) <= TOL
  poisoned = causal_attention(q, k, v, visible, scale=dim**-0.5,
                              prefix_len=keys - length, impl="xla")
  assert not bool(jnp.all(jnp.isfinite(poisoned)))


def test_gradients_equal_xla():
  # The trainer differentiates through attention (backward splash kernels).
  batch, length, prefix, dim = 2, 96, 0, 8
  q, k, v = qkv(batch, length, prefix + length, 4, 2, dim, seed=5)
  lengths = jnp.array([96, 60])
  mask = masks.padded_causal_mask(lengths, length)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=q.shape),
                        jnp.float32)
  real = (jnp.arange(length)[None, :] < lengths[:, None])[..., None, None]

  def loss(impl):
    def f(q, k, v):
      out = causal_attention(q, k, v, mask, scale=dim**-0.5, prefix_len=0,
                             impl=impl)
      return jnp.sum(jnp.where(real, out * weights, 0))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  for got, want in zip(loss("splash_interpret"), loss("xla")):
    assert bool(jnp.all(jnp.isfinite(got)))
    assert max_err(got, want) <= TOL


def make_examples(n, header_len, seed=0):
  rng = np.random.RandomState(seed)
  prompts = tuple(rng.randint(8, 61, rng.randint(3, 12)).astype(np.int32)
                  for _ in range(n))
  return ExampleTokens(tuple(f"ex{i}" for i in range(n)), prompts,
                       np.array([1, 2], np.int32), np.array([3, 3], np.int32),
                       np.arange(40, 40 + header_len, dtype=np.int32),
                       LABEL_SETS)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


# (mode, prefix_sharing, query_chunk): every kernel the search calls; the
# chunked exact passes (16-token query chunks, several per pass) too.
LOO_KERNELS = [("exact", False, 0), ("exact", True, 0), ("exact", True, 16),
               ("parallel", True, 0), ("shared", True, 0)]


@pytest.mark.parametrize("mode,shared,query_chunk", LOO_KERNELS)
def test_loo_scores_equal_xla(params, mode, shared, query_chunk):
  """Whole LOO scoring calls: padding, GQA, header, candidates, partial labels."""
  ex = make_examples(9, header_len=3)
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, (3, 9))
  labels[1, [0, 4]] = -1           # unlabelled examples are left out of context
  config = ScoringConfig(mode=mode, prefix_sharing=shared, rows_per_chunk=4,
                         query_chunk=query_chunk)
  want = LOOScorer(CFG, params, ex, config).score(labels)
  got = LOOScorer(SPLASH, params, ex, config).score(labels)
  scored = ~np.isnan(want.log_p_true)
  assert scored.sum() == (labels >= 0).sum()
  np.testing.assert_array_equal(np.isnan(got.log_p_true), ~scored)
  for g, w in ((got.log_p_true, want.log_p_true),
               (got.log_p_false, want.log_p_false)):
    assert np.max(np.abs(g[scored] - w[scored])) <= TOL


@pytest.mark.parametrize("mesh_sizes", [
    dict(data=2, fsdp=2, tensor=2),   # heads (4) and KV heads (2) split
    dict(data=1, fsdp=8, tensor=1),
])
def test_sharded_loo_scores_equal_unsharded_xla(params, mesh_sizes):
  # On a mesh the kernel runs under shard_map (Mosaic calls cannot be
  # partitioned by XLA): batch over data/fsdp, heads over tensor.
  mesh = sharding.create_mesh(mesh_sizes)
  ex = make_examples(6, header_len=2, seed=1)
  labels = np.array([1, 0, 1, 1, 0, -1])
  config = ScoringConfig(mode="parallel")
  want = LOOScorer(CFG, params, ex, config).score(labels)
  shardings = sharding.param_shardings(jax.eval_shape(lambda: params), mesh)
  placed = sharding.shard_params(params, shardings)
  got = LOOScorer(SPLASH, placed, ex, config, mesh=mesh).score(labels)
  scored = labels >= 0
  assert np.max(np.abs(got.s[scored] - want.s[scored])) <= TOL


def test_model_forward_equals_xla_bf16(params):
  # bf16 compute as on TPU: same rounding points, so agreement is at bf16
  # resolution of the logits rather than bit-exact.
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 61, (2, 70)))
  lengths = jnp.array([70, 41])
  mask = masks.padded_causal_mask(lengths, 70)
  pos = masks.default_positions(2, 70)
  want = forward(params, tokens, pos, mask, config=CFG.replace(dtype="bfloat16"))
  got = forward(params, tokens, pos, mask,
                config=SPLASH.replace(dtype="bfloat16"))
  real = np.arange(70)[None, :] < np.asarray(lengths)[:, None]
  assert max_err(np.asarray(got)[real], np.asarray(want)[real]) <= 0.05


def test_auto_selects_splash_only_on_tpu():
  auto = CFG.replace(attention="auto")
  assert auto.resolved_attention("tpu") == "splash"
  assert auto.resolved_attention("cpu") == "xla"
  assert auto.resolved_attention("gpu") == "xla"
  assert auto.resolved_attention() == "xla"   # this CPU test machine
  assert SPLASH.resolved_attention("tpu") == "splash_interpret"
  with pytest.raises(ValueError, match="attention='flash'"):
    CFG.replace(attention="flash")


def test_multi_pass_precision_with_bf16_is_a_clear_error():
  # libtpu cannot lower the kernel's bf16 matmuls at "highest" precision
  # (checked by compiling for a v5e topology: "Bad lhs type"); say so at
  # trace time, naming the setting, instead of failing inside the compiler.
  q, k, v = (a.astype(jnp.bfloat16) for a in qkv(1, 8, 8, 2, 1, 8))
  mask = jnp.asarray(np.tril(np.ones((1, 8, 8), bool)))
  run = lambda interpret: jax.eval_shape(
      lambda *a: splash_attention(*a, scale=0.5, interpret=interpret),
      q, k, v, mask)
  with jax.default_matmul_precision("highest"):
    with pytest.raises(ValueError, match="jax_default_matmul_precision"):
      run(False)
    assert run(True).shape == q.shape     # the interpreter has no such limit
  with jax.default_matmul_precision("default"):
    assert run(False).shape == q.shape
