"""The Optax trainer: loss against a naive per-example reference, optimizer
steps against an independent optax loop, gradient accumulation, sharding,
orbax resume after SIGKILL, bf16 compute and input validation.

A tiny random Llama and hand-made ExampleTokens keep it fast; prompts use a
few distinct lengths so the per-example (unpadded) references compile little.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from icm_jax.model import LlamaConfig, forward, param_shapes
from icm_jax.sharding import (MeshConfig, create_mesh, param_shardings,
                              shard_params)
from icm_jax.tokenization import ExampleTokens
from icm_jax.training import TrainConfig, train

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   max_position_embeddings=32)
LABEL_SETS = (np.array([5, 9], np.int32), np.array([7], np.int32))
LENGTHS = (5, 11)
MARKER = 11  # labels of the learnable task: is this token in the prompt?


def make_examples(n, seed=0, header=(), lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  prompts = []
  for i in range(n):
    p = rng.integers(12, 64, size=lengths[i % len(lengths)]).astype(np.int32)
    if i % 2:
      p[rng.integers(len(p))] = MARKER
    prompts.append(p)
  return ExampleTokens(
      ids=tuple(f"ex{i}" for i in range(n)), prompts=tuple(prompts),
      label_token=np.array([5, 7], np.int32), separator=np.array([3], np.int32),
      header=np.asarray(header, np.int32), label_token_sets=LABEL_SETS)


def marker_labels(examples):
  return np.array([int(MARKER in p) for p in examples.prompts], np.int32)


def tiny_init(seed=0):
  """Random float32 params built on the host (no init compile): normal(0.02)
  weights, unit norm scales."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, np.float32)
                       if jax.tree_util.keystr(path).endswith("['scale']")
                       else rng.normal(0, 0.02, s.shape).astype(np.float32)),
      param_shapes(TINY))


@pytest.fixture(scope="module")
def tiny_params():
  return tiny_init()


def to_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# -- independent references ---------------------------------------------------

@jax.jit
def _reference_log_probs(params, tokens):
  """[2] log P(False), log P(True) after one unpadded row: full logits."""
  t = tokens.shape[0]
  logits = forward(params, tokens[None], jnp.arange(t)[None],
                   jnp.tril(jnp.ones((1, t, t), bool)), config=TINY)
  log_softmax = jax.nn.log_softmax(logits[0, -1])
  return jnp.stack([jax.nn.logsumexp(log_softmax[s]) for s in LABEL_SETS])


def reference_loss(params, row_tokens, label):
  return -_reference_log_probs(params, row_tokens)[label]


_reference_grad = jax.jit(jax.grad(reference_loss))


def row(examples, i):
  return np.concatenate([examples.header, examples.prompts[i]])


def reference_run(params, examples, labels, cfg):
  """The documented data order + naive mean loss + a plain optax AdamW."""
  n, b = examples.num_examples, cfg.batch_size
  stream = np.concatenate([
      np.random.default_rng([cfg.seed, e]).permutation(n)
      for e in range(cfg.num_epochs)])
  steps = -(-len(stream) // b)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, steps,
      cfg.learning_rate * cfg.end_learning_rate_fraction)
  no_decay_on_norms = lambda p: jax.tree_util.tree_map_with_path(  # noqa
      lambda path, _: "scale" not in str(path[-1]), p)
  opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                    optax.adamw(schedule, cfg.adam_b1, cfg.adam_b2,
                                weight_decay=cfg.weight_decay,
                                mask=no_decay_on_norms))
  state = opt.init(params)
  update = jax.jit(lambda grads, state, params: opt.update(grads, state,
                                                           params))
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  losses, norms = [], []
  for k in range(steps):
    rows = stream[k * b:(k + 1) * b]
    grads = jax.tree.map(jnp.zeros_like, params)
    loss = 0.0
    for i in rows:
      loss += float(reference_loss(params, row(examples, i), int(labels[i])))
      g = _reference_grad(params, row(examples, i), int(labels[i]))
      grads = add(grads, g)
    grads = jax.tree.map(lambda g: g / len(rows), grads)
    losses.append(loss / len(rows))
    norms.append(float(optax.tree.norm(grads)))
    updates, state = update(grads, state, params)
    params = add(params, updates)
  return params, losses, norms


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def recorder():
  records = []
  return records, lambda step, record: records.append((step, dict(record)))


# -- tests ------------------------------------------------------------------


def test_learns_a_fixed_labelling_and_resumes_only_the_same_run(
    tiny_params, tmp_path):
  examples = make_examples(32, seed=1)
  labels = marker_labels(examples)
  cfg = TrainConfig(learning_rate=1e-2, warmup_steps=5, num_epochs=25,
                    batch_size=8, weight_decay=0.0, min_seq_len=16,
                    checkpoint_every=0)
  workdir = str(tmp_path)
  result = train(TINY, tiny_params, examples, labels, cfg, workdir=workdir,
                 progress=False)
  assert result.steps == len(result.losses) == 100
  assert result.losses[-10:].mean() < 0.2 * result.losses[:5].mean()
  correct = [int(np.argmax(_reference_log_probs(result.params, p))) == y
             for p, y in zip(examples.prompts, labels)]
  assert np.mean(correct) >= 0.9
  for leaf in jax.tree.leaves(result.params):
    assert leaf.dtype == jnp.float32
  assert result.tokens_per_step.sum() == sum(
      len(p) for p in examples.prompts) * cfg.num_epochs
  assert result.tokens_per_second > 0 and result.mean_step_seconds > 0
  assert os.listdir(tmp_path / "checkpoints") == ["100"]  # only the final step
  log = read_jsonl(tmp_path / "train_metrics.jsonl")
  assert [r["step"] for r in log] == list(range(1, 101))
  assert [r["loss"] for r in log] == list(result.losses)

  # A finished run is returned, not retrained; the logging and checkpoint
  # cadence may change.
  again = train(TINY, tiny_params, examples, labels,
                TrainConfig(**{**cfg.to_dict(), "log_every": 1,
                               "checkpoint_every": 7}),
                workdir=workdir, progress=False)
  assert again.start_step == again.steps == 100 and len(again.losses) == 0
  jax.tree.map(np.testing.assert_array_equal, to_numpy(again.params),
               to_numpy(result.params))
  # Anything that changes the trajectory is refused.
  changed_lr = TrainConfig(**{**cfg.to_dict(), "learning_rate": 2e-3})
  with pytest.raises(ValueError, match="different training run.*learning_rate"):
    train(TINY, tiny_params, examples, labels, changed_lr, workdir=workdir,
          progress=False)
  with pytest.raises(ValueError, match="labels_sha256"):
    train(TINY, tiny_params, examples, 1 - labels, cfg, workdir=workdir,
          progress=False)
  fewer = make_examples(30, seed=1)
  with pytest.raises(ValueError, match="num_examples"):
    train(TINY, tiny_params, fewer, marker_labels(fewer), cfg,
          workdir=workdir, progress=False)


# 12 examples, batches of 8: the second step holds 4 real rows + 4 padding
# (with 2 micro-batches, the second is all padding); a header is prepended to
# every row; rows are right-padded to 16.
REFERENCE_CFG = dict(learning_rate=1e-3, warmup_steps=1, num_epochs=1,
                     batch_size=8, weight_decay=0.1, max_grad_norm=0.05,
                     min_seq_len=16)


@pytest.fixture(scope="module")
def reference_case(tiny_params):
  examples = make_examples(12, seed=2, header=[1, 2])
  labels = np.random.default_rng(3).integers(0, 2, 12)
  params, losses, norms = reference_run(tiny_params, examples, labels,
                                        TrainConfig(**REFERENCE_CFG))
  return examples, labels, to_numpy(params), losses, norms


@pytest.mark.parametrize("grad_accum_steps, mesh_config", [
    (1, None),
    (2, MeshConfig(data=2, fsdp=2, tensor=2)),
    (1, MeshConfig(data=1, fsdp=8, tensor=1)),
])
def test_steps_match_naive_reference(tiny_params, reference_case,
                                     grad_accum_steps, mesh_config):
  """One device, or sharded over 8 fake devices, with and without gradient
  accumulation: the same losses, grad norms and params as the reference."""
  examples, labels, ref_params, ref_losses, ref_norms = reference_case
  cfg = TrainConfig(**REFERENCE_CFG, grad_accum_steps=grad_accum_steps)
  mesh = shardings = None
  params = tiny_params
  if mesh_config is not None:
    mesh = create_mesh(mesh_config)
    shardings = param_shardings(jax.eval_shape(lambda: tiny_params), mesh)
    params = shard_params(tiny_params, shardings)
  records, callback = recorder()
  result = train(TINY, params, examples, labels, cfg, mesh=mesh,
                 metrics_callback=callback, progress=False)

  assert [s for s, _ in records] == [1, 2]
  np.testing.assert_allclose([r["loss"] for _, r in records], ref_losses,
                             rtol=1e-6)
  np.testing.assert_allclose([r["grad_norm"] for _, r in records], ref_norms,
                             rtol=1e-5)
  assert records[0][1]["learning_rate"] == 0.0  # linear warmup from 0
  assert records[1][1]["examples"] == 4
  assert records[1][1]["tokens"] == sum(
      len(row(examples, i)) for i in
      np.random.default_rng([0, 0]).permutation(12)[8:])
  # Adam's first steps are ~lr * sign(grad): a grad near 0 can turn a 1e-7
  # reduction-order difference into ~1e-6; a wrong update is ~lr = 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                       atol=2e-6),
               to_numpy(result.params), ref_params)
  # The caller's params are not donated (the step donates its own copy).
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params)
                 if isinstance(leaf, jax.Array))
  if mesh is not None:
    # The result is placed like the input: spread over the 8 devices.
    for out, want in zip(jax.tree.leaves(result.params),
                         jax.tree.leaves(shardings)):
      assert out.sharding.is_equivalent_to(want, out.ndim), (out.sharding,
                                                              want)
    assert any(len(leaf.sharding.device_set) == 8 and
               not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(result.params))


RUN_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import jax
    import numpy as np
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, os.path.dirname({tests!r}))  # this checkout's icm_jax
    from test_training import TINY, make_examples, marker_labels, tiny_init
    from icm_jax.training import TrainConfig, train

    workdir, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    examples = make_examples(15, seed=5)
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=2, num_epochs=2,
                      batch_size=5, grad_accum_steps=1, checkpoint_every=2,
                      keep_checkpoints=2, min_seq_len=16,
                      lora_rank=int(sys.argv[4]))

    def callback(step, record):
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

    result = train(TINY, tiny_init(), examples,
                   marker_labels(examples), cfg, workdir=workdir,
                   metrics_callback=callback, progress=False)
    leaves = jax.tree_util.tree_leaves_with_path(
        {{"params": result.params, "adapters": result.adapters}})
    np.savez(out, **{{jax.tree_util.keystr(p): np.asarray(x)
                      for p, x in leaves}})
    print(json.dumps({{"start_step": result.start_step,
                       "steps": result.steps}}))
""")


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_after_kill_is_bit_equal(tmp_path, lora_rank):
  script = tmp_path / "run.py"
  script.write_text(RUN_SCRIPT.format(tests=os.path.dirname(__file__)))

  def start(name, kill_at, cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if cache:  # the resumed process reuses the killed one's executables
      env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / name), str(kill_at),
         str(tmp_path / f"{name}.npz"), str(lora_rank)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  # 6 steps, checkpoints every 2; one run is killed at step 5.
  whole, killed = start("whole", -1), start("killed", 5, cache="cache")
  out, err = killed.communicate(timeout=300)
  assert killed.returncode == -9, err[-3000:]
  assert not (tmp_path / "killed.npz").exists()
  resumed = start("killed", -1, cache="cache")
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  info = json.loads(out.strip().splitlines()[-1])
  assert info["steps"] == 6 and info["start_step"] in (2, 4)
  out, err = whole.communicate(timeout=300)
  assert whole.returncode == 0, err[-3000:]
  assert json.loads(out.strip().splitlines()[-1])["start_step"] == 0

  a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "killed.npz")
  assert sorted(a.files) == sorted(b.files)
  assert any("adapters" in name for name in a.files) == (lora_rank > 0)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  whole_log = read_jsonl(tmp_path / "whole" / "train_metrics.jsonl")
  resumed_log = read_jsonl(tmp_path / "killed" / "train_metrics.jsonl")
  assert [r["step"] for r in resumed_log] == list(range(1, 7))
  assert [r["loss"] for r in resumed_log] == [r["loss"] for r in whole_log]
  assert os.listdir(tmp_path / "killed" / "checkpoints") != []


def test_bfloat16_compute_keeps_float32_master_weights(tiny_params):
  examples = make_examples(8, seed=7)
  labels = marker_labels(examples)
  # min_seq_len 64 > max_position_embeddings 32: rows are padded to 32.
  cfg = TrainConfig(learning_rate=1e-3, warmup_steps=0, num_epochs=1,
                    batch_size=4, compute_dtype="bfloat16", remat=True,
                    min_seq_len=64)
  records, callback = recorder()
  result = train(TINY, tiny_params, examples, labels, cfg,
                 metrics_callback=callback, progress=False)
  assert [r["seq_len"] for _, r in records] == [32, 32]
  first_rows = np.random.default_rng([0, 0]).permutation(8)[:4]
  float32_loss = np.mean([float(reference_loss(tiny_params, examples.prompts[i],
                                               int(labels[i])))
                          for i in first_rows])
  np.testing.assert_allclose(result.losses[0], float32_loss, rtol=2e-2)
  assert np.isfinite(result.losses).all()
  for before, after in zip(jax.tree.leaves(to_numpy(tiny_params)),
                           jax.tree.leaves(to_numpy(result.params))):
    assert after.dtype == np.float32
    assert not np.array_equal(before, after)


def test_bad_labels_and_prompts_name_the_example(tiny_params):
  examples = make_examples(6, seed=8)
  cfg = TrainConfig(batch_size=2, min_seq_len=16)
  for bad in (-1, 2):
    labels = np.zeros(6, int)
    labels[3] = bad
    with pytest.raises(ValueError, match=r"example 'ex3' has label"):
      train(TINY, tiny_params, examples, labels, cfg, progress=False)
  with pytest.raises(ValueError, match="one per example"):
    train(TINY, tiny_params, examples, np.zeros(5, int), cfg, progress=False)
  long = make_examples(6, seed=8, lengths=(4, 33))
  with pytest.raises(ValueError, match=r"example 'ex1' is 33 tokens.*"
                     "max_position_embeddings=32"):
    train(TINY, tiny_params, long, np.zeros(6, int), cfg, progress=False)
  # header + prompt counts: 30 + 3 > 32.
  headed = make_examples(6, seed=8, header=[1] * 30, lengths=(2, 3))
  with pytest.raises(ValueError, match=r"example 'ex1' is 33 tokens"):
    train(TINY, tiny_params, headed, np.zeros(6, int), cfg, progress=False)
  # Rows per micro-batch must split over data*fsdp.
  mesh = create_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match="train.batch_size"):
    train(TINY, tiny_params, examples, np.zeros(6, int),
          TrainConfig(batch_size=4, grad_accum_steps=2), mesh=mesh,
          progress=False)


@pytest.mark.parametrize("key, value", [
    ("learning_rate", -1.0), ("learning_rate", float("nan")),
    ("warmup_steps", -1), ("num_epochs", 0), ("batch_size", 0),
    ("grad_accum_steps", 0), ("weight_decay", -0.1), ("adam_b1", 1.0),
    ("adam_b2", -0.5), ("max_grad_norm", -1.0), ("compute_dtype", "fp8"),
    ("end_learning_rate_fraction", 1.5), ("min_seq_len", 0),
    ("checkpoint_every", -1), ("keep_checkpoints", 0), ("log_every", 0),
    ("seed", 1.5), ("remat", "yes"), ("num_epochs", True), ("lora_rank", -1),
    ("lora_rank", 2.0), ("lora_alpha", 0.0)])
def test_bad_config_values_name_the_key(key, value):
  with pytest.raises(ValueError, match=rf"train\.{key}\b"):
    TrainConfig(**{key: value})


def test_config_from_dict():
  cfg = TrainConfig.from_dict(ml_collections.ConfigDict(
      {"learning_rate": 2e-5, "batch_size": 8, "grad_accum_steps": 4}))
  assert cfg == TrainConfig(learning_rate=2e-5, batch_size=8,
                            grad_accum_steps=4)
  assert cfg.micro_batch_size == 2
  with pytest.raises(ValueError, match=r"train\.batch_size"):
    TrainConfig.from_dict({"batch_size": 6, "grad_accum_steps": 4})
  with pytest.raises(ValueError, match=r"train\.lr\b.*train\.steps"):
    TrainConfig.from_dict({"lr": 1e-5, "steps": 3})
