"""Compile a call for the topology's chips and report its per-chip memory;
the fit check (verdict per call, DoesNotFit with advice)."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from icm_jax.aot.calls import Call
from icm_jax.aot.costs import Cost
from icm_jax.aot.errors import DoesNotFit
from icm_jax.aot.topology import Chip, GiB


@dataclasses.dataclass
class CallReport:
  name: str
  description: str
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  xla_flops: float        # cost_analysis, per chip, loop bodies counted once
  xla_bytes: float
  lower_seconds: float
  compile_seconds: float
  cost: "Cost"            # analytic, per chip
  device_kinds: Tuple[str, ...]
  hlo_platform: str
  # Set when libtpu refused to compile because the program cannot fit:
  # its message; temp_bytes is then the compiler's stated requirement (or
  # its total, see _parse_oom) and the other sizes come from the inputs.
  compiler_error: Optional[str] = None
  kv_heads: int = 0
  settings: dict = dataclasses.field(default_factory=dict)  # Call.settings

  @property
  def total_bytes(self) -> int:
    """Per-chip HBM: arguments + outputs - aliased (donated) + temps + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes + self.code_bytes)


def _hlo_platform(text: str) -> str:
  """'tpu' if the compiled module uses TPU tiled layouts, else 'other'."""
  return "tpu" if re.search(r"\{[0-9,]*:T\([0-9]+,128\)", text) else "other"


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
          "T": 1 << 40}
_OOM_TEMP = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)i?B?\)")
_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT]?)i?B? of ([0-9.]+)([KMGT]?)i?B?"
                       r" hbm")


def _parse_oom(message: str) -> Optional[Tuple[str, int]]:
  """('temp', bytes) or ('total', bytes) from a libtpu out-of-HBM error."""
  if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
    return None
  found = _OOM_TEMP.search(message)
  if found:
    return "temp", int(float(found.group(1)) * _UNITS[found.group(2)])
  found = _OOM_USED.search(message)
  if found:
    return "total", int(float(found.group(1)) * _UNITS[found.group(2)])
  return None


def _per_chip_bytes(tree) -> int:
  """Bytes one chip holds of abstract arrays placed by their shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    if getattr(leaf, "sharding", None) is not None:
      shape = leaf.sharding.shard_shape(shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


def train_state_bytes(call: Call, lora_rank: int) -> Dict[str, int]:
  """Per chip, what a train step (`train_call`) keeps from step to step, by
  its own shardings: the params (with LoRA the frozen base + the adapters),
  the AdamW state, and the gradient accumulator (shaped like the trainable
  part). Activations and temporaries are the compiler's to report."""
  from icm_jax.training import lora
  params, opt_state = call.args[0], call.args[1]
  trainable = params[lora.ADAPTERS] if lora_rank else params
  return {"params": _per_chip_bytes(params),
          "AdamW state": _per_chip_bytes(opt_state),
          "gradients": _per_chip_bytes(trainable)}


def _cache_sharding_guess(out_info, mesh):
  """A DemoCache's shardings: KV heads over 'tensor' when they divide."""
  def one(x):
    spec = [None] * len(x.shape)
    if len(x.shape) == 5 and x.shape[3] % mesh.shape["tensor"] == 0:
      spec[3] = "tensor"
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(one, out_info)


def compile_call(call: Call, mesh, previous: Optional[Call] = None
                 ) -> CallReport:
  """Lowers and compiles `call` for the mesh's devices; per-chip report.

  parallel_query takes the cache built by `previous` (parallel_cache): its
  shapes and output shardings fill the missing argument. When libtpu refuses
  a program that cannot fit in HBM, the report carries its message (see
  CallReport.compiler_error) instead of raising.
  """
  args = call.args
  if call.name == "parallel_query":
    if previous is None or previous.lowered is None:
      raise ValueError("parallel_query needs the lowered parallel_cache")
    if previous.compiled is not None:
      shards = previous.compiled.output_shardings
    else:  # the build did not fit: assume the layout it would have had
      shards = _cache_sharding_guess(previous.lowered.out_info, mesh)
    cache_shapes = jax.tree.map(
        lambda out, s: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=s),
        previous.lowered.out_info, shards)
    args = args[:2] + (cache_shapes,) + args[3:]
    call.args = args
  kinds = tuple(sorted({d.device_kind for d in mesh.devices.flat}))
  with jax.set_mesh(mesh):
    began = time.perf_counter()
    lowered = call.fn.lower(*args)
    call.lowered = lowered
    lowered_at = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only out-of-HBM is reported
      oom = _parse_oom(str(e))
      if oom is None:
        raise
      done = time.perf_counter()
      what, size = oom
      arguments = _per_chip_bytes(args)
      outputs = _per_chip_bytes(lowered.out_info)
      return CallReport(
          name=call.name, description=call.description,
          argument_bytes=arguments, output_bytes=outputs,
          temp_bytes=size if what == "temp" else max(
              size - arguments - outputs, 0),
          alias_bytes=0, code_bytes=0, xla_flops=float("nan"),
          xla_bytes=float("nan"), lower_seconds=lowered_at - began,
          compile_seconds=done - lowered_at, cost=call.cost,
          device_kinds=kinds, hlo_platform="tpu",
          compiler_error=" ".join(str(e).split())[:500],
          kv_heads=call.kv_heads, settings=dict(call.settings))
    done = time.perf_counter()
  call.compiled = compiled
  memory = compiled.memory_analysis()
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else {}
  costs = costs or {}
  return CallReport(
      name=call.name, description=call.description,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      xla_flops=float(costs.get("flops", float("nan"))),
      xla_bytes=float(costs.get("bytes accessed", float("nan"))),
      lower_seconds=lowered_at - began, compile_seconds=done - lowered_at,
      cost=call.cost, device_kinds=kinds,
      hlo_platform=_hlo_platform(compiled.as_text()), kv_heads=call.kv_heads,
      settings=dict(call.settings))


def compile_calls(calls: Sequence[Call], mesh,
                  progress: Optional[Callable[[str], None]] = None
                  ) -> List[CallReport]:
  reports, previous = [], None
  for call in calls:
    if progress:
      progress(f"compiling {call.name}: {call.description}")
    reports.append(compile_call(call, mesh, previous))
    previous = call
  return reports


# -----------------------------------------------------------------------------
# Fit check
# -----------------------------------------------------------------------------


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def fit_advice(report: CallReport, mesh_shape: Dict[str, int]) -> List[str]:
  """What to change, from the component that dominates the footprint."""
  args = report.argument_bytes - report.alias_bytes
  parts = {"arguments": args, "temporaries": report.temp_bytes,
           "outputs": report.output_bytes}
  main = max(parts, key=parts.get)
  fsdp, tensor = mesh_shape.get("fsdp", 1), mesh_shape.get("tensor", 1)
  heads = report.kv_heads
  # A larger tensor axis helps KV caches only while it still splits KV heads.
  more_tensor = ("shard KV heads over a larger tensor axis (--mesh "
                 f"tensor=... > {tensor}"
                 + (f", up to the {heads} KV heads" if heads else "") + ")"
                 if not heads or tensor < heads else None)
  # Never advise what is already in force (an unknown setting counts as not).
  settings = report.settings
  bf16 = settings.get("param_dtype") == "bfloat16"
  lora_on = bool(settings.get("lora_rank"))
  advice = []
  if main == "arguments":
    advice.append(
        f"arguments ({_gib(args)}/chip: params"
        f"{' + optimizer state' if report.name == 'train' else ''}) dominate: "
        f"shard them over more chips (a larger fsdp axis than {fsdp}: "
        "--mesh data=1,fsdp=-1,tensor=1 uses every chip; or a bigger "
        "--topology)")
    if report.name == "train" and not lora_on:
      advice.append("fine-tune LoRA adapters (--config.train.lora_rank=16): "
                    "no AdamW state or gradients for the base, which stays "
                    "in its stored dtype")
    elif not bf16:
      advice.append(("store the frozen base" if report.name == "train" else
                     "store the scoring params") +
                    " in bfloat16 (--config.model.param_dtype=bfloat16)")
  elif report.name == "train":
    remat = ("" if settings.get("remat") else
             ", --config.train.remat=True")
    advice.append(
        f"temporaries ({_gib(report.temp_bytes)}/chip, activations) "
        "dominate: a smaller micro-batch (raise "
        f"--config.train.grad_accum_steps){remat}, or shorter rows; more "
        "chips spread the batch further")
  elif report.name in ("exact", "exact_unshared"):
    advice.append(
        f"temporaries ({_gib(report.temp_bytes)}/chip) dominate: exact-mode "
        "rows are as long as all N demonstrations together, and their KV "
        "cache, [B, T, S] mask and activations grow with N (about "
        "quadratically)")
    if more_tensor:
      advice.append(more_tensor)
    advice.append("use fewer examples per search (--config.label.batch_size "
                  "/ --num_examples)")
    if report.name == "exact":
      advice.append("lower --config.scoring.query_chunk (query tokens per "
                    "chunk of each pass; the masks and activations scale "
                    "with it)")
    # No one-pass mode is advised: none agrees with exact mode's scores
    # (README, "Scoring modes": sign agreement and Spearman, measured).
    if report.name == "exact_unshared":
      advice.append("lower --config.scoring.rows_per_chunk (rows per "
                    "micro-batch; the minimum is the mesh's data*fsdp)")
  else:  # parallel cache / query: outputs or temporaries
    advice.append(
        f"{main} ({_gib(parts[main])}/chip) dominate: the demonstration KV "
        "cache is one sequence, replicated over the data-parallel axes; only "
        "the tensor axis splits it")
    if more_tensor:
      advice.append(more_tensor)
    advice.append("use fewer examples per search (--config.label.batch_size "
                  "/ --num_examples), or lower --config.scoring.rows_per_chunk"
                  " (the minimum is the mesh's data*fsdp)")
  return advice


def fits(report: CallReport, limit: int) -> bool:
  return report.compiler_error is None and report.total_bytes <= limit


def fit_lines(reports: Sequence[CallReport], chip: Chip,
              hbm_bytes: Optional[int] = None) -> List[str]:
  """One verdict line per call."""
  limit = chip.hbm_bytes if hbm_bytes is None else int(hbm_bytes)
  return [f"{r.name}: {_gib(r.total_bytes)} of {_gib(limit)} {chip.name} "
          f"HBM per chip -> {'fits' if fits(r, limit) else 'DOES NOT FIT'}"
          for r in reports]


def check_fit(reports: Sequence[CallReport], chip: Chip, mesh_shape: Dict,
              hbm_bytes: Optional[int] = None) -> List[str]:
  """Verdict lines; raises DoesNotFit (with advice) if any call is too big."""
  limit = chip.hbm_bytes if hbm_bytes is None else int(hbm_bytes)
  failures = []
  for r in reports:
    if fits(r, limit):
      continue
    refused = (f" libtpu refused to compile it ({r.compiler_error})."
               if r.compiler_error else "")
    failures.append(
        f"{r.name} needs {_gib(r.total_bytes)} per chip > {_gib(limit)} "
        f"HBM of a {chip.name} chip (arguments {_gib(r.argument_bytes)}, "
        f"outputs {_gib(r.output_bytes)}, temporaries {_gib(r.temp_bytes)}"
        f", aliased {_gib(r.alias_bytes)}).{refused} Suggestions: " +
        "; ".join(fit_advice(r, mesh_shape)))
  if failures:
    raise DoesNotFit("\n".join(failures))
  return fit_lines(reports, chip, hbm_bytes)
