"""Trip-count-aware matmul FLOPs of a traced call: the check of the analytic
count (scan bodies times their length; pallas kernels skipped)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import jax

from icm_jax.aot.calls import Call


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params["dimension_numbers"]
  k = math.prod(lhs.shape[d] for d in contract)
  return 2.0 * k * math.prod(eqn.outvars[0].aval.shape)


def _sub_jaxprs(value):
  from jax.extend import core as jex_core
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _count_jaxpr(jaxpr, stats: Dict[str, int]) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _count_jaxpr(eqn.params["jaxpr"].jaxpr,
                                                  stats)
    elif name == "cond":
      total += max(_count_jaxpr(b.jaxpr, stats) for b in eqn.params["branches"])
    elif name == "while":
      stats["while"] = stats.get("while", 0) + 1   # trip count unknown: once
      total += _count_jaxpr(eqn.params["body_jaxpr"].jaxpr, stats)
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      axes = eqn.params.get("newly_manual_axes") or eqn.params.get(
          "manual_axes") or mesh.axis_names
      shards = math.prod(dict(mesh.shape)[a] for a in axes)
      total += shards * _count_jaxpr(eqn.params["jaxpr"], stats)
    elif name == "pallas_call":
      stats["pallas_call"] = stats.get("pallas_call", 0) + 1
    else:
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _count_jaxpr(sub, stats)
  return total


def jaxpr_matmul_flops(call: Call, mesh, args: Optional[tuple] = None
                       ) -> Tuple[float, Dict[str, int]]:
  """Global dot_general FLOPs of the traced call after dead-code removal.

  Scan bodies count `length` times; pallas_call kernels (splash attention)
  are not counted (stats["pallas_call"] says how many were skipped).
  """
  from jax._src.interpreters import partial_eval as pe
  with jax.set_mesh(mesh):
    closed = call.fn.trace(*(call.args if args is None else args)).jaxpr
  jaxpr = closed.jaxpr
  try:
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars),
                            instantiate=True)
  except Exception:  # pragma: no cover - private API drift: count without DCE
    pass
  stats: Dict[str, int] = {}
  return _count_jaxpr(jaxpr, stats), stats
