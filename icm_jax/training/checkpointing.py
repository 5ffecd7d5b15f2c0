"""Orbax checkpoints of the train state, the run fingerprint and metrics log.

A workdir holds:
  checkpoints/        orbax steps, each {"params", "opt_state"} after that step
  train_state.json    fingerprint of what the run trains (config, model, data
                      hashes); a checkpoint is only resumed by the same run
  train_metrics.jsonl one record per optimizer step; cut back to the restored
                      step on resume, so it never holds a step twice

Every process takes part in orbax saves/restores (orbax coordinates them);
only process 0 writes the JSON files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from icm_jax import storage
from icm_jax.model.config import LlamaConfig
from icm_jax.tokenization import ExampleTokens
from icm_jax.training.config import RESUMABLE_KEYS, TrainConfig

FINGERPRINT_FILE = "train_state.json"
METRICS_FILE = "train_metrics.jsonl"
FORMAT_VERSION = 1


def _sha256(arrays) -> str:
  digest = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a, np.int64))
    digest.update(str(a.shape).encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def run_fingerprint(config: TrainConfig, model_config: LlamaConfig,
                    compute_dtype: str, examples: ExampleTokens,
                    labels: np.ndarray) -> dict:
  """What a checkpoint's trajectory depends on, as plain JSON values."""
  train = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS}
  fingerprint = {
      "format_version": FORMAT_VERSION,
      "train": train,
      "compute_dtype": compute_dtype,
      "model": dataclasses.asdict(model_config),
      "num_examples": examples.num_examples,
      "labels_sha256": _sha256([labels]),
      "tokens_sha256": _sha256([examples.header, examples.label_token,
                                *examples.label_token_sets,
                                *examples.prompts]),
  }
  return json.loads(json.dumps(fingerprint))


def _differences(old: dict, new: dict, prefix: str = "") -> list:
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    name = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


def _write_json_atomic(path: str, value: Any) -> None:
  storage.write_text(path, json.dumps(value, indent=1, sort_keys=True))


class TrainCheckpoints:
  """The orbax CheckpointManager of one workdir, guarded by the fingerprint."""

  def __init__(self, workdir: str, fingerprint: dict, keep: int):
    self.workdir = workdir
    if jax.process_index() == 0:
      storage.makedirs(workdir)
    self.manager = ocp.CheckpointManager(
        storage.as_epath(storage.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep))
    self._check_fingerprint(fingerprint)

  def _check_fingerprint(self, fingerprint: dict) -> None:
    path = storage.join(self.workdir, FINGERPRINT_FILE)
    if self.manager.latest_step() is not None:
      if not storage.exists(path):
        raise ValueError(f"{self.workdir} has checkpoints but no "
                         f"{FINGERPRINT_FILE}; refusing to resume a run whose "
                         "config is unknown")
      old = json.loads(storage.read_text(path))
      diff = _differences(old, fingerprint)
      if diff:
        raise ValueError(
            f"{self.workdir} holds checkpoints of a different training run; "
            "refusing to resume (use a new workdir). Changed: " +
            "; ".join(diff))
    elif jax.process_index() == 0:
      _write_json_atomic(path, fingerprint)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(
        {"params": params, "opt_state": opt_state}), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state) of `step`; abstract targets carry the shardings."""
    state = self.manager.restore(step, args=ocp.args.StandardRestore(
        {"params": abstract_params, "opt_state": abstract_opt_state}))
    return state["params"], state["opt_state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
