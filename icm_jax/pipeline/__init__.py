"""main.py's job: config → task → labels (ICM) → fine-tuning → evaluation.

    run(config, workdir)   # config: ml_collections.ConfigDict (run_config)

Stage modules, one file each: `inputs` (task records and the model),
`label_stage`, `train_stage`, `eval_stage`. Each stage reads what the previous
one wrote to the workdir, so `--config.stages=eval` re-runs only the
comparison. On multi-host runs every process computes every stage (SPMD);
process 0 writes the run's files, the others keep their search state in
`<workdir>/.process_NNN/` (so each resumes from its own identical copy) and
share orbax checkpoints, which every process writes collectively.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Dict, Optional

import jax
import ml_collections
import numpy as np

from icm_jax import storage
from icm_jax.labelling import gold_agreement
from icm_jax.pipeline.eval_stage import needed_variants, run_eval_stage
from icm_jax.pipeline.inputs import load_inputs, load_model_for_run
from icm_jax.pipeline.label_stage import (LABEL_DIR, labels_path, read_labels,
                                          run_label_stage)
from icm_jax.pipeline.train_stage import (export_icm_model, finetune,
                                          training_labels)
from icm_jax.run_config import ConfigError, parse_config
from icm_jax.sharding import create_mesh, initialize_distributed
from icm_jax.pipeline.events import EventWriter

log = logging.getLogger(__name__)

TRAJECTORY_PLOT = "search_trajectory.png"
CONFIG_FILE = "config.json"


def process_workdir(workdir: str, process_index: int) -> str:
  """Where this process keeps its own (non-collective) files."""
  if process_index == 0:
    return workdir
  return storage.join(workdir, f".process_{process_index:03d}")


def trajectory_files(label_dir: str) -> Dict[str, str]:
  files = storage.find(label_dir, "metrics.jsonl")
  return {storage.relpath(storage.dirname(f), label_dir): f for f in files}


def run(config: ml_collections.ConfigDict, workdir: str,
        check_only: bool = False) -> dict:
  """Runs the configured stages; returns {name: path} of what was written.

  check_only: run every check that needs no weights (config, data files and
  records, workdir, earlier stages' labels, the model's config and
  tokenizer, every prompt within the context, the mesh), then stop."""
  cfg = parse_config(config)
  process_index, process_count = initialize_distributed()
  writer = process_index == 0
  own_dir = process_workdir(workdir, process_index)
  storage.check_writable(own_dir)
  inputs = load_inputs(cfg)
  needed = needed_variants(cfg.eval_methods, inputs.task.consistency)
  variants = ["icm"] + [v for v in needed if v != "icm"]
  multi_seed = len(cfg.seeds) > 1

  def layout_seed(seed):  # the single-seed layout has no seed_NNN/ folder
    return seed if multi_seed else None

  # Earlier stages' labels are read before the model loads (a missing file
  # fails in seconds).
  label_sets = {}
  if "label" not in cfg.stages and {"train", "eval"} & set(cfg.stages):
    for variant in variants:
      for seed in cfg.seeds:
        try:
          label_sets[(variant, seed)] = read_labels(own_dir, variant,
                                                    layout_seed(seed))
        except FileNotFoundError:
          if "train" in cfg.stages or variant in needed:
            raise
  if writer and not check_only:
    storage.write_text(storage.join(workdir, CONFIG_FILE),
                       config.to_json_best_effort(indent=1, sort_keys=True))
  log.info("process %d of %d; %d devices (%s); workdir %s", process_index,
           process_count, jax.device_count(), jax.default_backend(), workdir)
  try:
    mesh = create_mesh(cfg.mesh)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  model = load_model_for_run(cfg, mesh, inputs, load_weights=not check_only)
  if check_only:
    log.info("checks passed: %d train and %d test examples, model %s; "
             "weights not loaded", len(inputs.train), len(inputs.test),
             model.description)
    return {"checked": workdir}
  events = EventWriter(storage.join(workdir, "tensorboard"),
                       enabled=writer and cfg.tensorboard)
  outputs = {}
  finetuned_cache = {}

  def finetuned(source: str, labels=None, name: Optional[str] = None):
    name = name or source
    if name not in finetuned_cache:
      examples, targets = training_labels(source, inputs.train, labels,
                                          cfg.seed)
      finetuned_cache[name] = finetune(cfg, inputs.task, model, mesh, examples,
                                       targets, name, workdir, events).params
    return finetuned_cache[name]

  def finetuned_on(source: str, seed: Optional[int]):
    if source != "icm":
      return finetuned(source)
    name = "icm" if not multi_seed else f"icm_seed_{seed:03d}"
    return finetuned("icm", label_sets[("icm", seed)], name=name)

  with events:
    if "label" in cfg.stages:
      t = time.perf_counter()
      for variant in variants:
        for seed in cfg.seeds:
          def iterate(examples, labels, name, seed=seed):
            found = {e.id: (None if l < 0 else int(l))
                     for e, l in zip(examples, labels)}
            suffix = "" if not multi_seed else f"_seed_{seed:03d}"
            return finetuned("icm", found, name=f"icm{suffix}_{name}")

          log.info("label stage: %s, seed %d", variant, seed)
          label_sets[(variant, seed)] = run_label_stage(
              cfg, inputs, model, mesh, own_dir, finetune=iterate,
              variant=variant, seed=layout_seed(seed))
      log.info("label stage: %.1f s", time.perf_counter() - t)
      outputs["labels"] = labels_path(workdir, seed=layout_seed(cfg.seeds[0]))
      _log_search_events(events, storage.join(own_dir, LABEL_DIR))
    if "train" in cfg.stages:
      t = time.perf_counter()
      for seed in cfg.seeds:
        params = finetuned_on("icm", seed)
        if cfg.export_hf and seed == cfg.seeds[0]:
          outputs["model"] = export_icm_model(model, params, workdir)
      log.info("train stage: %.1f s", time.perf_counter() - t)
    if "eval" in cfg.stages:
      t = time.perf_counter()
      metadata = dict(task=inputs.task.name, model=model.description,
                      stages=list(cfg.stages), seeds=list(cfg.seeds),
                      icm={str(seed): _icm_summary(
                          inputs, label_sets.get(("icm", seed)))
                           for seed in cfg.seeds})
      report = run_eval_stage(cfg, inputs, model, mesh, workdir, label_sets,
                              finetuned_on, writer, events, metadata)
      log.info("eval stage: %.1f s", time.perf_counter() - t)
      outputs["report"] = storage.join(workdir, "report.json")
      if "label_accuracy" in report:
        outputs["label_accuracy_plot"] = storage.join(workdir,
                                                      "label_accuracy.png")
      outputs["accuracy_plot"] = storage.join(workdir, "accuracy.png")
  if writer:
    files = trajectory_files(storage.join(workdir, LABEL_DIR))
    if files:
      from icm_jax.evaluation.plots import plot_search_trajectory
      outputs["trajectory_plot"] = plot_search_trajectory(
          files, storage.join(workdir, TRAJECTORY_PLOT))
    if cfg.tensorboard:
      outputs["tensorboard"] = storage.join(workdir, "tensorboard")
  return outputs


def _icm_summary(inputs, icm_labels) -> Optional[dict]:
  if icm_labels is None:
    return None
  labels = np.array([-1 if icm_labels.get(e.id) is None else icm_labels[e.id]
                     for e in inputs.train])
  gold = np.array([-1 if e.gold is None else e.gold for e in inputs.train])
  labelled = labels[labels >= 0]
  return {
      "labelled": int(labelled.size),
      "true_fraction": float(labelled.mean()) if labelled.size else None,
      "gold_agreement": gold_agreement(labels, gold),
  }


def _log_search_events(events, label_dir: str) -> None:
  """The searches' metrics.jsonl as TensorBoard scalars (U, P, I, agreement)."""
  for name, path in trajectory_files(label_dir).items():
    for line in storage.read_text(path).splitlines():
      record = json.loads(line)
      values = {f"search/{name}/{k}": record[k]
                for k in ("U", "P", "I", "gold_agreement", "labelled")
                if record.get(k) is not None}
      events.scalars(values, int(record["iteration"]))
