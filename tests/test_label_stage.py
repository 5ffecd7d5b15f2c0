"""The label stage's variants and seeds reach the search as configured."""

import os

import numpy as np
import pytest

from icm_jax.labelling import ICMRun
from icm_jax.pipeline import label_stage
from icm_jax.pipeline.inputs import Inputs, Model
from icm_jax.run_config import default_config, parse_config
from icm_jax.tasks import bundled_path, get_task, load_examples


@pytest.mark.parametrize("variant,kind", [("icm", "comparative"),
                                          ("icm_no_consistency", "none")])
def test_variant_sets_consistency_and_seed(variant, kind, tmp_path,
                                           monkeypatch):
  seen = {}

  def fake_run_icm(examples, **kw):
    seen.update(kw)
    n = len(examples)
    return ICMRun(tuple(e.id for e in examples), np.zeros(n, np.int8),
                  np.zeros(n), np.zeros(n), [])

  monkeypatch.setattr(label_stage, "run_icm", fake_run_icm)
  monkeypatch.setattr(label_stage, "model_scorer_factory",
                      lambda *a, **k: None)
  config = default_config()
  config.task.name = "sentiment"
  config.model.path = "unused"
  cfg = parse_config(config)
  task = get_task("sentiment")
  train = load_examples(task, bundled_path("sentiment", "train"))[:8]
  from icm_jax.model import LlamaConfig
  model = Model(config=LlamaConfig(vocab_size=64, hidden_size=8,
                                   intermediate_size=8, num_layers=1,
                                   num_heads=1, num_kv_heads=1, head_dim=8),
                params=None, tokenizer=None, description="")
  label_stage.run_label_stage(cfg, Inputs(task, train, []), model, None,
                              str(tmp_path), variant=variant, seed=7)
  assert seen["task"].consistency == kind
  assert seen["task"].template == task.template
  assert seen["search"].seed == 7
  assert seen["workdir"] == label_stage.variant_dir(str(tmp_path), variant, 7)
  assert os.path.basename(seen["workdir"]) == "seed_007"
