"""LoRA fine-tuning (train.lora_rank > 0): frozen base, adapter-only
optimizer state, sharded adapters, learning, merged export against
transformers running the base with the adapters un-merged, and resume.
(SIGKILL + resume bit-equality: test_training.test_resume_after_kill_is_bit_equal.)
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from icm_jax.aot.costs import lora_params
from icm_jax.checkpoints import save_hf_checkpoint
from icm_jax.model import forward, masks
from icm_jax.sharding import MeshConfig, create_mesh
from icm_jax.training import TrainConfig, data, lora, train
from icm_jax.training.trainer import sharded_train_step
from test_training import (TINY, _reference_log_probs, make_examples,
                           marker_labels, tiny_init, to_numpy)

RANK, ALPHA = 4, 8.0


def lora_base():
  """tiny_init with a lm head large enough that adapters on the projections
  alone can move the label logits (the head itself stays frozen)."""
  params = tiny_init()
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
  return params


def _by_path(tree):
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _leaves(tree):
  return {k: np.asarray(x) for k, x in _by_path(tree).items()}


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_step_changes_only_adapters_sharded_by_kernel_rules(base_dtype):
  # A bf16-stored base stays bf16 (no float32 copy of the frozen weights);
  # only the adapters and their AdamW moments are float32.
  base = jax.tree.map(lambda x: x.astype(base_dtype), lora_base())
  examples = make_examples(8, seed=4)
  labels = marker_labels(examples)
  cfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, batch_size=8,
                    weight_decay=0.1, min_seq_len=16, lora_rank=RANK,
                    lora_alpha=ALPHA)
  build = lambda mesh: sharded_train_step(TINY, base, cfg, 2, mesh,
                                          examples.label_token_sets, "float32")
  # On 8 devices (layout only, nothing compiled): a keeps its kernel's
  # (layers, in) sharding, b its (layers, out); Adam's moments follow.
  sharded = build(create_mesh(MeshConfig(data=1, fsdp=2, tensor=4)))
  specs = {k: tuple(x.sharding.spec) for k, x in _by_path(
      sharded.abstract_params["lora"]).items()}
  assert specs["['layers']['self_attn']['q_proj']['lora_a']"] == (
      None, "fsdp", None)
  assert specs["['layers']['self_attn']['q_proj']['lora_b']"] == (
      None, None, "tensor")
  assert specs["['layers']['self_attn']['o_proj']['lora_a']"] == (
      None, "tensor", None)
  assert specs["['layers']['mlp']['down_proj']['lora_b']"] == (
      None, None, "fsdp")
  # Frozen params get no optimizer state: AdamW's mu and nu cover the
  # adapters only (plus scalar step counters).
  adapters = jax.jit(lora.init_adapters, static_argnums=1)(
      base, RANK, jax.random.key(0))
  adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
  assert adapter_size == lora_params(TINY, RANK)  # the plan's count
  assert sum(x.size for x in jax.tree.leaves(sharded.abstract_opt_state)
             if x.shape) == 2 * adapter_size

  mesh = create_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  step = build(mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, step.abstract_params)
  state = jax.device_put(lora.train_state(base, adapters), state_shardings)
  opt_state = step.init_opt_state(state)
  host = data.build_batch(examples, labels, np.arange(8), 1, 16, 32)
  batch = jax.device_put(host.arrays(), step.batch_shardings)
  before = _leaves(state)
  with jax.set_mesh(mesh):
    for _ in range(2):  # b = 0 at step 1, so a first moves at step 2
      state, opt_state, _ = step.fn(state, opt_state, batch)
  after = _leaves(state)
  for key, value in before.items():
    if key.startswith("['base']"):
      assert after[key].dtype == np.dtype(base_dtype), key
      np.testing.assert_array_equal(after[key].view(np.uint8),
                                    value.view(np.uint8), err_msg=key)
    else:
      assert after[key].dtype == np.float32, key
      assert np.abs(after[key] - value).max() > 1e-4, key
  assert {x.dtype for x in jax.tree.leaves(opt_state) if x.ndim} == {
      np.dtype(np.float32)}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora_run")
  examples = make_examples(32, seed=1)
  labels = marker_labels(examples)
  cfg = TrainConfig(learning_rate=1e-2, warmup_steps=3, num_epochs=10,
                    batch_size=8, weight_decay=0.0, min_seq_len=16,
                    checkpoint_every=0, lora_rank=RANK, lora_alpha=ALPHA)
  base = lora_base()
  result = train(TINY, base, examples, labels, cfg, workdir=str(workdir),
                 progress=False)
  return base, examples, labels, cfg, workdir, result


def test_lora_learns_the_planted_task_and_resumes_only_its_rank(lora_run):
  base, examples, labels, cfg, workdir, result = lora_run
  assert result.steps == len(result.losses) == 40
  print(f"lora loss first5={result.losses[:5].mean():.3f} "
        f"last10={result.losses[-10:].mean():.3f}")
  assert result.losses[-10:].mean() < 0.2 * result.losses[:5].mean()
  # result.params is the adapted model: it answers the task.
  correct = [int(np.argmax(_reference_log_probs(result.params, p))) == y
             for p, y in zip(examples.prompts, labels)]
  assert np.mean(correct) >= 0.9
  again = train(TINY, base, examples, labels, cfg, workdir=str(workdir),
                progress=False)
  assert again.start_step == again.steps == 40
  jax.tree.map(np.testing.assert_array_equal, to_numpy(again.params),
               to_numpy(result.params))
  for rank in (0, 8):
    other = TrainConfig(**{**cfg.to_dict(), "lora_rank": rank})
    with pytest.raises(ValueError, match="different training run.*lora_rank"):
      train(TINY, base, examples, labels, other, workdir=str(workdir),
            progress=False)


def _torch_logprobs(model, tokens):
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens)).logits.float()
  return torch.log_softmax(logits, -1).numpy()


def test_merged_export_equals_adapted_forward(lora_run, tmp_path):
  """The merged HF export, loaded by transformers, equals (1) our adapted
  forward and (2) transformers' base model with each projection's output
  plus (alpha/r) x A B added by a hook, i.e. LoRA left un-merged."""
  base, examples, _, _, _, result = lora_run
  save_hf_checkpoint(result.params, TINY, tmp_path / "merged")
  save_hf_checkpoint(base, TINY, tmp_path / "base")
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", dtype=torch.float32).eval()
  unmerged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "base", dtype=torch.float32).eval()
  tokens = np.stack([np.pad(p, (0, 11 - len(p)), constant_values=3)
                     for p in examples.prompts[:4]])
  hf_base = _torch_logprobs(unmerged, tokens)
  scale = ALPHA / RANK
  for module_name, projections in result.adapters["layers"].items():
    for proj, ab in projections.items():
      for i, layer in enumerate(unmerged.model.layers):
        a = torch.as_tensor(np.array(ab["lora_a"][i]))
        b = torch.as_tensor(np.array(ab["lora_b"][i]))
        getattr(getattr(layer, module_name), proj).register_forward_hook(
            lambda m, inp, out, a=a, b=b: out + scale * (inp[0] @ a) @ b)
  ours = np.stack([np.asarray(jax.nn.log_softmax(
      _forward(result.params, row), -1)) for row in tokens])
  hf_merged = _torch_logprobs(merged, tokens)
  hf_unmerged = _torch_logprobs(unmerged, tokens)
  # Probabilities: the x20 head puts log-probs near -20, where float32's
  # own rounding is ~1e-6 per op.
  d_ours = float(np.abs(np.exp(ours) - np.exp(hf_merged)).max())
  d_lora = float(np.abs(np.exp(hf_unmerged) - np.exp(hf_merged)).max())
  d_logp = float(np.abs(ours - hf_merged).max())
  print(f"lora merged export: max|dp| vs ours {d_ours:.2e}, vs un-merged "
        f"{d_lora:.2e}; max|dlogp| vs ours {d_logp:.2e}")
  assert d_ours <= 1e-5 and d_lora <= 1e-5 and d_logp <= 1e-4
  # The adapters did move the model (else the comparison proves nothing).
  assert float(np.abs(np.exp(hf_base) - np.exp(hf_merged)).max()) > 0.1


def _forward(params, row):
  t = len(row)
  return forward(params, np.asarray(row, np.int32)[None],
                 masks.default_positions(1, t), masks.causal_mask(1, t),
                 config=TINY)[0]
