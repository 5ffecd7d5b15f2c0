"""Stage 2: fine-tune the base model on a set of labels for the train split.

Label sources: "icm" (the label stage's output), "gold" (the dataset's labels,
a baseline), "random" (seeded coin flips, the floor) and "inverted" (gold
flipped: the control that says whether fine-tuned accuracy tells good labels
from bad). Each run lives in
`<workdir>/train_<source>/` (orbax checkpoints, train_metrics.jsonl) and
resumes there; a finished run is not retrained, so the eval stage can ask for
the same fine-tuned params again cheaply. The ICM model is also exported as
an HF checkpoint to `<workdir>/model_icm/`.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from icm_jax import storage
from icm_jax.checkpoints import save_hf_checkpoint
from icm_jax.pipeline.inputs import Model, example_tokens
from icm_jax.run_config import RunConfig
from icm_jax.tasks import Example, Task
from icm_jax.training import TrainResult, train

log = logging.getLogger(__name__)

LABEL_SOURCES = ("icm", "gold", "random", "inverted")
EXPORT_DIR = "model_icm"


def train_dir(workdir: str, name: str) -> str:
  return storage.join(workdir, f"train_{name}")


def training_labels(source: str, examples: Sequence[Example],
                    icm_labels: Optional[Dict[str, Optional[int]]],
                    seed: int) -> Tuple[List[Example], np.ndarray]:
  """(examples, 0/1 labels) to fine-tune on for one label source.

  Examples without a label from this source (ICM never reached them, or the
  record has no gold) are left out, and how many is logged.
  """
  if source == "icm":
    if icm_labels is None:
      raise ValueError("fine-tuning on ICM labels needs the label stage's "
                       "labels")
    missing = [e.id for e in examples if e.id not in icm_labels]
    if missing:
      raise ValueError(f"{len(missing)} train examples have no line in the "
                       f"label stage's labels.jsonl (first: {missing[0]}); "
                       "was it run on other data?")
    chosen = [e for e in examples if icm_labels[e.id] is not None]
    labels = [icm_labels[e.id] for e in chosen]
  elif source in ("gold", "inverted"):
    chosen = [e for e in examples if e.gold is not None]
    labels = [e.gold if source == "gold" else 1 - e.gold for e in chosen]
  elif source == "random":
    chosen = list(examples)
    labels = np.random.default_rng([seed, 7]).integers(0, 2, len(chosen))
  else:
    raise ValueError(f"unknown label source {source!r}; expected one of "
                     f"{LABEL_SOURCES}")
  if len(chosen) < len(examples):
    log.warning("fine-tuning on %s labels: %d of %d train examples have "
                "none and are left out", source, len(examples) - len(chosen),
                len(examples))
  if not chosen:
    raise ValueError(f"no train example has a {source} label to fine-tune on")
  return chosen, np.asarray(labels, np.int32)


def finetune(cfg: RunConfig, task: Task, model: Model, mesh,
             examples: Sequence[Example], labels: np.ndarray, name: str,
             workdir: str, events=None) -> TrainResult:
  """The base model fine-tuned on (examples, labels) in train_<name>/."""
  tokens = example_tokens(cfg, task, model.tokenizer, examples)

  def forward_metrics(step, record):
    if events is not None:
      events.scalars({f"train_{name}/{k}": v for k, v in record.items()
                      if k in ("loss", "learning_rate", "grad_norm")}, step)

  config, params = model.config, model.params
  if not cfg.train.lora_rank:
    # Optimizer updates at lr ~1e-5 vanish when added to bfloat16 weights (8
    # mantissa bits): full fine-tuning trains float32 master weights whatever
    # the stored dtype. LoRA's frozen base stays as stored (its adapters are
    # float32), so it costs no more than the scorer's copy.
    config = config.replace(param_dtype="float32")
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  result = train(config, params, tokens, np.asarray(labels),
                 cfg.train, mesh=mesh, workdir=train_dir(workdir, name),
                 metrics_callback=forward_metrics, progress=cfg.progress)
  if result.steps:
    log.info("train_%s: %d steps, final loss %.4f", name, result.steps,
             float(result.losses[-1]) if len(result.losses) else float("nan"))
  return result


def export_icm_model(model: Model, params, workdir: str) -> str:
  """HF checkpoint of the ICM-fine-tuned model (every process calls this)."""
  out = storage.join(workdir, EXPORT_DIR)
  if not storage.is_url(out):
    save_hf_checkpoint(params, model.config, out, tokenizer=model.tokenizer)
    return out
  # safetensors and tokenizers write local files: stage there, then upload.
  with tempfile.TemporaryDirectory(prefix="icm_jax_export_") as local:
    save_hf_checkpoint(params, model.config, local, tokenizer=model.tokenizer)
    if jax.process_index() == 0:
      storage.copy_tree(local, out)
  return out
