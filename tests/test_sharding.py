"""Mesh construction, partition rules and sharded-vs-unsharded forward equality.

Runs on the 8 fake CPU devices set up by conftest.py.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from icm_jax import sharding as sh
from icm_jax.model import (LlamaConfig, forward, init_params, masks,
                           param_shapes)

BATCH = ("data", "fsdp")


def tiny_config(**overrides):
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  kw.update(overrides)
  return LlamaConfig(**kw)


@pytest.fixture(scope="module")
def mesh():
  return sh.create_mesh(dict(data=2, fsdp=2, tensor=2))


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))


def _reference(params, *args, cfg, **kwargs):
  """Single-device forward (jitted: eager flax scan is slow on 2 cores)."""
  fn = jax.jit(lambda p, *a, **kw: forward(p, *a, config=cfg, **kw))
  return fn(params, *args, **kwargs)


def _inputs(cfg, batch=4, length=8, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0,
                              cfg.vocab_size)
  lengths = jnp.array([length, length - 3, 2, length - 1][:batch])
  return (tokens, masks.default_positions(batch, length),
          masks.padded_causal_mask(lengths, length))


def _spec(x):
  return x.sharding.spec


# -- mesh ----------------------------------------------------------------------


def test_mesh_axes_and_types(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("cfg,expected", [
    (None, (1, 8, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": -1, "tensor": 4, "fsdp": 1}, (2, 1, 4)),
    (sh.MeshConfig(data=1, fsdp=1, tensor=-1), (1, 1, 8)),
    (ml_collections.ConfigDict({"data": 4, "fsdp": 2, "tensor": 1}), (4, 2, 1)),
])
def test_mesh_fill(cfg, expected):
  mesh = sh.create_mesh(cfg)
  assert tuple(mesh.shape[a] for a in sh.AXES) == expected


def test_mesh_explicit_devices():
  devices = jax.devices()[4:]
  mesh = sh.create_mesh({"data": 1, "fsdp": 2, "tensor": -1}, devices=devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
  assert {d.id for d in mesh.devices.flat} == {4, 5, 6, 7}


@pytest.mark.parametrize("cfg,match", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"multiply to 3.*8 devices"),
    ({"data": 2, "fsdp": 2, "tensor": 4}, r"'tensor': 4.*multiply to 16.*8"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, r"cannot fill mesh axis 'fsdp'.*8"),
    ({"data": -1, "fsdp": -1}, r"at most one mesh axis may be -1"),
    ({"data": 0}, r"'data' size must be a positive int"),
    ({"model": 2}, r"unknown mesh axes \['model'\]"),
])
def test_mesh_bad_sizes(cfg, match):
  with pytest.raises(ValueError, match=match):
    sh.create_mesh(cfg)


# -- partition rules -------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_param_specs_follow_rules(mesh, tied):
  specs = sh.param_partition_specs(
      param_shapes(tiny_config(tie_word_embeddings=tied)), mesh)
  layers = specs["layers"]
  for name in ("q_proj", "k_proj", "v_proj"):
    assert layers["self_attn"][name]["kernel"] == P(None, "fsdp", "tensor")
  assert layers["self_attn"]["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
  for name in ("gate_proj", "up_proj"):
    assert layers["mlp"][name]["kernel"] == P(None, "fsdp", "tensor")
  assert layers["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert layers["input_layernorm"]["scale"] == P(None, None)
  assert layers["post_attention_layernorm"]["scale"] == P(None, None)
  assert specs["norm"]["scale"] == P(None)
  assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  if tied:
    assert "lm_head" not in specs
  else:
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")


def test_optimizer_state_paths_match(mesh):
  shapes = param_shapes(tiny_config())
  state = ({"mu": shapes, "nu": shapes},)
  specs = sh.param_partition_specs(state, mesh)
  assert specs[0]["nu"]["layers"]["mlp"]["down_proj"]["kernel"] == P(
      None, "tensor", "fsdp")


def test_unmatched_param_is_an_error(mesh):
  shapes = dict(param_shapes(tiny_config()))
  shapes["adapter"] = {"kernel": jax.ShapeDtypeStruct((64, 8), jnp.float32)}
  with pytest.raises(ValueError, match=r"no partition rule.*adapter/kernel"):
    sh.param_shardings(shapes, mesh)


def test_rule_rank_mismatch_is_an_error(mesh):
  shapes = {"norm": {"scale": jax.ShapeDtypeStruct((4, 64), jnp.float32)}}
  with pytest.raises(ValueError, match=r"norm/scale.*shape \(4, 64\)"):
    sh.param_partition_specs(shapes, mesh)


def test_fit_spec_drops_non_dividing_axes(mesh, caplog):
  with caplog.at_level(logging.WARNING):
    spec = sh.fit_spec(P(("data", "fsdp"), "tensor"), (6, 5), mesh, "x")
  assert spec == P("data", None)
  assert "x: dim 1 (size 5)" in caplog.text
  with pytest.raises(ValueError, match="'model'"):
    sh.fit_spec(P("model"), (8,), mesh)
  with pytest.raises(ValueError, match="twice"):
    sh.fit_spec(P("tensor", "tensor"), (8, 8), mesh)


# -- sharded forward ---------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_forward_matches_unsharded(mesh, tied):
  cfg = tiny_config(tie_word_embeddings=tied)
  params = _params(cfg)
  tokens, positions, mask = _inputs(cfg)
  expected = _reference(params, tokens, positions, mask, cfg=cfg)

  shardings = sh.param_shardings(param_shapes(cfg), mesh)
  sharded = sh.shard_params(params, shardings)
  q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert _spec(q) == P(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 32, 32)  # [L, D/2, 64/2]
  emb = sharded["embed_tokens"]["embedding"]
  assert emb.addressable_shards[0].data.shape == (128, 32)

  fwd = sh.make_sharded_forward(cfg, mesh)
  with jax.set_mesh(mesh):
    logits = fwd(sharded, tokens, positions, mask)
  assert logits.shape == (4, 8, 256)
  assert _spec(logits) == P(BATCH, None, "tensor")
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)

  where = jnp.array([[0, 7], [4, 1], [1, 1], [6, 3]])
  fwd_p = sh.make_sharded_forward(cfg, mesh, logit_positions=True)
  with jax.set_mesh(mesh):
    picked = fwd_p(sharded, tokens, positions, mask, where)
  assert _spec(picked) == P(BATCH, None, "tensor")
  np.testing.assert_allclose(
      picked,
      _reference(params, tokens, positions, mask, cfg=cfg,
                 logit_positions=where),
      atol=1e-5, rtol=0)


def test_sharded_kv_cache_continuation(mesh):
  cfg = tiny_config()
  sharded = sh.init_sharded_params(cfg, mesh, jax.random.key(0))
  assert _spec(sharded["lm_head"]["kernel"]) == P("fsdp", "tensor")
  # Same values as the unsharded init (jit may round the last bit).
  np.testing.assert_allclose(
      sharded["lm_head"]["kernel"],
      _params(cfg)["lm_head"]["kernel"], rtol=1e-6)
  params = jax.device_get(sharded)
  tokens, positions, _ = _inputs(cfg, length=12)
  full = masks.causal_mask(4, 12)
  expected = _reference(params, tokens, positions, full, cfg=cfg)

  prefix_fwd = sh.make_sharded_forward(cfg, mesh, return_kv=True,
                                       return_hidden=True)
  rest_fwd = sh.make_sharded_forward(cfg, mesh, kv_cache=True)
  # Slice outside set_mesh: eager ops under it give committed, replicated
  # arrays, which jit refuses to reshard to its batch in_shardings.
  head = (tokens[:, :8], positions[:, :8], full[:, :8, :8])
  tail = (tokens[:, 8:], positions[:, 8:], full[:, 8:])
  with jax.set_mesh(mesh):
    hidden, cache = prefix_fwd(sharded, *head)
    assert _spec(hidden) == P(BATCH, None, None)
    assert _spec(cache.k) == P(None, BATCH, None, "tensor", None)
    logits = rest_fwd(sharded, *tail, cache)
  np.testing.assert_allclose(logits, expected[:, 8:], atol=1e-5, rtol=0)


def test_non_divisible_dims_fall_back_to_replication(mesh, caplog):
  # vocab 255 and intermediate 99 are odd: tensor=2 cannot split them.
  cfg = tiny_config(vocab_size=255, intermediate_size=99)
  with caplog.at_level(logging.WARNING):
    specs = sh.param_partition_specs(param_shapes(cfg), mesh)
  assert specs["embed_tokens"]["embedding"] == P(None, "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", None)
  assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P(None, "fsdp", None)
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, None, "fsdp")
  assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == P(
      None, "fsdp", "tensor")
  assert "embed_tokens/embedding: dim 0 (size 255)" in caplog.text
  assert sh.logits_spec(cfg, mesh) == P(BATCH, None, None)

  params = _params(cfg, seed=3)
  tokens, positions, mask = _inputs(cfg)
  sharded = sh.shard_params(params, sh.param_shardings(params, mesh))
  with jax.set_mesh(mesh):
    logits = sh.make_sharded_forward(cfg, mesh)(sharded, tokens, positions,
                                                mask)
  np.testing.assert_allclose(
      logits, _reference(params, tokens, positions, mask, cfg=cfg),
      atol=1e-5, rtol=0)


# -- batch / cache helpers -----------------------------------------------------------


def test_batch_and_cache_specs(mesh):
  assert sh.batch_spec(2) == P(BATCH, None)
  assert sh.batch_spec(3) == P(BATCH, None, None)
  assert sh.batch_sharding(mesh, 3) == NamedSharding(mesh, P(BATCH, None, None))
  assert sh.batch_divisor(mesh) == 4
  with pytest.raises(ValueError):
    sh.batch_spec(0)
  cache = sh.kv_cache_spec(tiny_config(num_kv_heads=1, num_heads=4), mesh)
  assert cache.k == cache.v == P(None, BATCH, None, None, None)


def test_host_local_batch_to_global(mesh):
  local = {"tokens": np.arange(24, dtype=np.int32).reshape(4, 6),
           "mask": np.ones((4, 6, 6), bool)}
  arrays = sh.host_local_batch_to_global(mesh, local)
  assert _spec(arrays["tokens"]) == P(BATCH, None)
  assert _spec(arrays["mask"]) == P(BATCH, None, None)
  np.testing.assert_array_equal(arrays["tokens"], local["tokens"])


# -- multi-host start-up --------------------------------------------------------------

_MULTIHOST_VARS = (
    "ICM_JAX_MULTIHOST", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES",
    "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
    "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def fake_distributed(monkeypatch):
  for var in _MULTIHOST_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(sh, "_DISTRIBUTED_INITIALIZED", False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: calls.append(kw))
  return calls


@pytest.mark.parametrize("env,multi", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
    ({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
    ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1", "ICM_JAX_MULTIHOST": "0"}, False),
    ({"ICM_JAX_MULTIHOST": "1"}, True),
])
def test_is_multihost_env(env, multi):
  assert sh.is_multihost_env(env) is multi


def test_initialize_distributed_single_host_is_noop(fake_distributed):
  assert sh.initialize_distributed() == (0, 1)
  assert fake_distributed == []


def test_initialize_distributed_multihost(fake_distributed, monkeypatch):
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert sh.initialize_distributed() == (0, 1)
  assert fake_distributed == [{}]
  sh.initialize_distributed()  # idempotent
  assert len(fake_distributed) == 1


def test_initialize_distributed_explicit_coordinator(fake_distributed,
                                                     monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  sh.initialize_distributed()
  assert fake_distributed == [{"coordinator_address": "10.0.0.2:1234",
                               "num_processes": 4, "process_id": 3}]


def test_initialize_distributed_force(fake_distributed, monkeypatch):
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  sh.initialize_distributed(force=False)
  assert fake_distributed == []
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  sh.initialize_distributed(force=True, initialization_timeout=5)
  assert fake_distributed == [{"initialization_timeout": 5}]
