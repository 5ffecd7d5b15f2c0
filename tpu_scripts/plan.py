#!/usr/bin/env python3
"""Roofline plan of a paper-scale ICM run: a lower bound on its time.

For each target (model @ TPU slice @ mesh) prints, as one markdown table:
one U(D) evaluation of N examples in exact and one-pass mode (and the
one-pass demo cache), a whole ICM search of the config's iterations (the
calls the real search loop makes, see icm_jax/aot/plan.py), and one epoch of
fine-tuning. Analytic per-chip FLOPs and HBM bytes at the shapes the scorer
and trainer compile; no compilation (tpu_scripts/aot_check.py checks memory).

  python tpu_scripts/plan.py --config=configs/gsm8k.py \\
      --data=/path/to/test_gsm8k.json

Each --target is MODEL@TOPOLOGY@MESH (MESH as data=D,fsdp=F,tensor=T).
"""

from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_TARGETS = (
    "llama-3.1-8b@v5e:4x4@data=1,fsdp=2,tensor=8",
    "llama-3.1-70b@v5p:2x4x4@data=1,fsdp=4,tensor=8",
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "gsm8k.py"),
    "Run config: scoring, search, train and label settings.",
    lock_config=True)
_TARGETS = flags.DEFINE_multi_string(
    "target", list(DEFAULT_TARGETS), "MODEL@TOPOLOGY@MESH; repeat for more.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "N per ICM search (default label.batch_size).")
_MODES = flags.DEFINE_string(
    "modes", "exact,parallel", "Scoring modes to plan: exact, "
    "exact_unshared, parallel, shared, tree (aot_check.py --modes=tree "
    "compiles tree mode's passes for the memory check).")
_LENGTHS = flags.DEFINE_string(
    "lengths", None, "'measured', or MEAN,MAX prompt tokens (default: "
    "measured when data is available, else 191,665).")
_DATA = flags.DEFINE_string("data", None, "Records file for the lengths.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer for measured lengths (default SmolLM2).")
_LORA_RANK = flags.DEFINE_integer(
    "lora_rank", 16, "LoRA rank of the train-state memory line (full "
    "fine-tuning vs LoRA; 0 = no line).")
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", 1484, "Fine-tuning set size with --lengths=MEAN,MAX.")


def _parse_target(text):
  from icm_jax import aot
  parts = text.split("@")
  if len(parts) != 3:
    raise aot.AotError(f"--target={text!r}: expected MODEL@TOPOLOGY@MESH, "
                       "e.g. llama-3.1-8b@v5e:4x4@data=1,fsdp=2,tensor=8")
  return parts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from icm_jax import aot
  try:
    return _run()
  except aot.AotError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run():
  from icm_jax import aot

  config = _CONFIG.value
  scoring, search, train = aot.stage_configs(config)
  modes = tuple(m.strip() for m in _MODES.value.split(",") if m.strip())
  known = aot.SCORING_MODES + ("tree",)
  bad = [m for m in modes if m not in known]
  if bad or not modes:
    raise aot.AotError(f"--modes={_MODES.value!r}: choose from {known}")
  n = _NUM_EXAMPLES.value or int(config.label.batch_size)
  workload = aot.workload_from_config(config, n, _LENGTHS.value, _DATA.value,
                                      _TOKENIZER.value, _TRAIN_EXAMPLES.value)
  recorded = aot.simulate_search(workload, search)
  rows, notes = [], []
  for text in _TARGETS.value:
    model_name, topology_name, mesh_text = _parse_target(text)
    topology = aot.get_topology(topology_name, arg="--target topology")
    mesh = aot.parse_mesh(mesh_text, config.mesh, arg="--target mesh")
    model, label = aot.model_from_config(config, model_name,
                                         arg="--target model")
    try:
      target = aot.make_target(model, label, topology, mesh)
    except ValueError as e:
      raise aot.AotError(f"--target={text!r}: {e}") from None
    target_rows, _ = aot.plan_rows(target, workload, scoring, search, train,
                                   modes, recorded=recorded)
    rows += target_rows
    if _LORA_RANK.value:
      notes.append(_train_memory_line(target, topology, mesh, model,
                                      workload, train))
    notes.append(f"{target.label}: {topology.num_chips} x {target.chip.name}"
                 f" ({target.chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                 f"{target.chip.hbm_bandwidth / 1e9:.0f} GB/s HBM per chip)")
  calls, result = recorded
  print(f"workload: N={workload.num_examples}; {workload.description}; "
        f"header {workload.header_len} + separator {workload.sep_len} tokens")
  print(f"search: {result.iterations} iterations, {result.flips} accepted "
        f"flips, {int((result.labels >= 0).sum())}/{workload.num_examples} "
        f"labelled at the end, {len(calls)} scorer calls (stand-in model "
        "with fixed random log-odds; see icm_jax/aot/plan.py)")
  for note in notes:
    print(note)
  print()
  print(aot.markdown_table(rows))
  print("\nEvery time is a LOWER BOUND (max of compute and HBM time per call "
        "at peak, attention counted on visible (query, key) pairs only, no "
        "communication or host time).")
  return 0


def _train_memory_line(target, topology, mesh, model, workload, train):
  """Per-chip train state, full fine-tuning vs LoRA (from the step's
  shardings; nothing is compiled)."""
  import dataclasses
  from icm_jax import aot
  seq_len = workload.train_step_length(train.min_seq_len,
                                       model.max_position_embeddings)
  devices = aot.topology_mesh(topology, mesh)
  parts = []
  for rank in (0, _LORA_RANK.value):
    # The state does not depend on the batch: one row per data-parallel
    # chip keeps any config's batch valid on this mesh.
    state_train = dataclasses.replace(train, lora_rank=rank,
                                      batch_size=target.divisor,
                                      grad_accum_steps=1)
    call = aot.train_call(model, devices, workload, state_train, seq_len,
                          len(workload.train_lengths) or workload.num_examples)
    state = aot.train_state_bytes(call, rank)
    detail = ", ".join(f"{k} {v / aot.GiB:.2f}" for k, v in state.items())
    what = f"LoRA r={rank}" if rank else "full fine-tune"
    parts.append(f"{what} {sum(state.values()) / aot.GiB:.2f} GiB ({detail})")
  return (f"{target.label}: train state per chip (params + AdamW state + "
          "gradients; activations not included): " + "; ".join(parts))


if __name__ == "__main__":
  app.run(main)
