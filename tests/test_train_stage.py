"""Fine-tuning a model whose params are stored in bfloat16 (the default on
accelerators) trains float32 master weights: at lr 1e-5 an AdamW update is
below bfloat16's spacing and would be lost if added to the stored params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smollm2_gguf_path
from icm_jax.model import LlamaConfig, init_params
from icm_jax.pipeline.inputs import Model
from icm_jax.pipeline.train_stage import finetune
from icm_jax.run_config import default_config, parse_config
from icm_jax.sharding import create_mesh
from icm_jax.tasks import bundled_path, get_task, load_examples


pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None,
                                reason="needs SmolLM2's tokenizer")


def finetune_bfloat16_model(tmp_path, learning_rate, lora_rank=0):
  """A random 1-layer model stored in bf16, fine-tuned through the pipeline
  for 2 steps on 16 TruthfulQA claims: (result, stored params)."""
  from icm_jax.checkpoints import load_tokenizer
  config = default_config()
  config.task.name = "truthfulqa"
  config.model.path = "unused"
  config.train.learning_rate = learning_rate
  config.train.warmup_steps = 0
  config.train.batch_size = 8  # a multiple of the 8 test devices
  config.train.num_epochs = 1
  config.train.checkpoint_every = 0
  config.train.lora_rank = lora_rank
  config.log.progress = False
  cfg = parse_config(config)
  arch = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=512, tie_word_embeddings=True,
                     param_dtype="bfloat16")
  stored = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        init_params(arch, jax.random.key(0)))
  model = Model(arch, stored, load_tokenizer(smollm2_gguf_path()), "tiny")
  task = get_task("truthfulqa")
  examples = load_examples(task, bundled_path("truthfulqa", "train"))[:16]
  result = finetune(cfg, task, model, create_mesh(cfg.mesh), examples,
                    np.array([e.gold for e in examples]), "gold",
                    str(tmp_path))
  assert result.steps == 2
  return result, stored


def test_bfloat16_params_train_float32_master_weights(tmp_path):
  result, stored = finetune_bfloat16_model(tmp_path, learning_rate=1e-5)
  leaves = jax.tree.leaves(result.params)
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
  moved = [np.abs(np.asarray(new) - np.asarray(old, np.float32))
           for new, old in zip(leaves, jax.tree.leaves(stored))]
  # Every weight matrix moved, by less than bfloat16 could have recorded:
  # most updates round back to the stored bfloat16 value.
  assert all(m.max() > 0 for m in moved)
  rounded_back = [np.asarray(jnp.asarray(new).astype(jnp.bfloat16) == old)
                  for new, old in zip(leaves, jax.tree.leaves(stored))]
  assert np.mean(np.concatenate([r.ravel() for r in rounded_back])) > 0.5


def test_lora_keeps_a_bfloat16_base_in_bfloat16(tmp_path):
  """With LoRA the pipeline does not upcast the frozen base: the adapters
  are float32, the merged result stays in the stored bf16."""
  result, _ = finetune_bfloat16_model(tmp_path, learning_rate=1e-3,
                                      lora_rank=4)
  assert {x.dtype for x in jax.tree.leaves(result.params)} == {
      jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(result.adapters)} == {
      jnp.dtype(jnp.float32)}
