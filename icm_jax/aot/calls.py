"""The calls to compile: jitted scoring kernels and the train step on abstract
inputs (`jax.ShapeDtypeStruct`s placed on the mesh; nothing is allocated),
each with its analytic per-chip and global cost."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from icm_jax import sharding
from icm_jax.aot.costs import (Cost, exact_cost, exact_shared_cost,
                               parallel_cache_cost, parallel_query_cost,
                               shared_context_cost, train_step_cost,
                               tree_pass_cost)
from icm_jax.aot.errors import AotError
from icm_jax.aot.layouts import (exact_layout, exact_shared_layout,
                                 parallel_layout, shared_context_layout,
                                 tree_call_plan)
from icm_jax.aot.workload import Workload
from icm_jax.model import LlamaConfig, param_shapes
from icm_jax.scoring import exact, layout, parallel, shared_context, tree
from icm_jax.scoring.common import ExampleArrays
from icm_jax.scoring.scorer import ScoringConfig
from icm_jax.training import data as train_data
from icm_jax.training.config import TrainConfig


def abstract_params(config: LlamaConfig, mesh) -> Any:
  shapes = param_shapes(config)
  shards = sharding.param_shardings(shapes, mesh)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shards)


def _replicated(mesh, shape, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype,
                              sharding=NamedSharding(mesh, P()))


def abstract_examples(workload: Workload, mesh) -> ExampleArrays:
  n, w = workload.num_examples, workload.width
  return ExampleArrays(
      _replicated(mesh, (n, w)), _replicated(mesh, (n,)),
      _replicated(mesh, (2,)), _replicated(mesh, (max(workload.sep_len, 1),)),
      _replicated(mesh, (max(workload.header_len, 1),)))


@dataclasses.dataclass
class Call:
  """One jitted function and abstract arguments, ready to lower."""

  name: str
  description: str
  fn: Callable          # a jax.jit
  args: tuple
  cost: "Cost"           # analytic, per chip
  global_cost: "Cost"    # analytic, whole program (every chip's work)
  kv_heads: int = 0      # the model's, for advice on the tensor axis
  # Settings in force that the fit advice must not suggest again:
  # param_dtype, and for the train step lora_rank and remat.
  settings: dict = dataclasses.field(default_factory=dict)
  # Filled by compile_call for a later call that consumes this one's output.
  lowered: Any = None
  compiled: Any = None


SCORING_MODES = ("exact", "exact_unshared", "parallel", "shared", "tree")


def scoring_calls(model: LlamaConfig, mesh, workload: Workload,
                  scoring: ScoringConfig, modes: Sequence[str],
                  labels: Optional[np.ndarray] = None) -> List[Call]:
  """The kernels of one U(D) evaluation (default: all N labelled, C = 1).

  modes: "exact" (exact mode with prefix sharing: the default scorer),
  "exact_unshared" (exact, prefix_sharing=False), "parallel" (the demo cache
  build and the query call), "shared" (one pass over F, then the queries),
  "tree" (one call per pass of the scorer's plan: the header and each
  level write into the key/value pool, the leaf reads the scores).
  """
  bad = [m for m in modes if m not in SCORING_MODES]
  if bad:
    raise AotError(f"--modes: unknown mode {bad[0]!r}; choose from "
                   f"{SCORING_MODES + ('train',)}")
  divisor = sharding.batch_divisor(mesh)
  tensor = mesh.shape["tensor"]
  n = workload.num_examples
  if labels is None:
    labels = (np.arange(n) % 2)[None].astype(np.int32)
  labels = np.atleast_2d(labels)
  batch_fn = functools.partial(sharding.batch_sharding, mesh)
  params = abstract_params(model, mesh)
  data = abstract_examples(workload, mesh)
  common = dict(model_config=model, token_sets=workload.token_sets)
  calls = []
  for mode in modes:
    if mode == "exact":
      lay = exact_shared_layout(workload, labels, None,
                                dataclasses.replace(scoring,
                                                    prefix_sharing=True),
                                divisor)
      fn = jax.jit(functools.partial(
          exact.exact_shared_scores, full_len=lay.plan.full_len,
          packed_len=lay.plan.packed_len, header_len=workload.header_len,
          sep_len=workload.sep_len, groups=divisor,
          query_chunk=scoring.query_chunk, batch_sharding_fn=batch_fn,
          **common))
      slots = [_replicated(mesh, (lay.plan.num_seq, 2)) for _ in range(4)]
      args = (params, data, _replicated(mesh, (lay.plan.candidates, n))) + tuple(slots)
      calls.append(Call(
          "exact", f"exact (prefix sharing): one U(D), {lay.num_rows} rows "
          f"packed two a sequence into {lay.plan.num_seq} sequences of "
          f"{lay.plan.packed_len} tokens against F = all demonstrations, "
          f"{int(lay.plan.full[0])} tokens (bucket {lay.plan.full_len})",
          fn, args, exact_shared_cost(model, lay, divisor, tensor),
          exact_shared_cost(model, lay, 1, 1)))
    elif mode == "exact_unshared":
      lay = exact_layout(workload, labels, None, scoring, divisor,
                         model.max_position_embeddings)
      chunk = layout.chunk_rows(scoring.rows_per_chunk, divisor)
      fn = jax.jit(functools.partial(
          exact.exact_scores, seq_len=lay.seq_len,
          header_len=workload.header_len, sep_len=workload.sep_len,
          rows_per_chunk=chunk, batch_sharding_fn=batch_fn, **common))
      args = (params, data, _replicated(mesh, (lay.cands, n)),
              _replicated(mesh, (lay.rows,)), _replicated(mesh, (lay.rows,)))
      calls.append(Call(
          "exact_unshared", f"exact (no sharing): one U(D), {lay.rows} rows "
          f"of {lay.seq_len} tokens, {chunk} per micro-batch", fn, args,
          exact_cost(model, lay, divisor, tensor),
          exact_cost(model, lay, 1, 1)))
    elif mode == "shared":
      lay = shared_context_layout(workload, labels, None, scoring, divisor)
      plan = lay.plan
      fn = jax.jit(functools.partial(
          shared_context.shared_context_scores, full_len=plan.full_len,
          header_len=workload.header_len, sep_len=workload.sep_len,
          groups=divisor, query_chunk=scoring.query_chunk,
          batch_sharding_fn=batch_fn, **common))
      args = (params, data, _replicated(mesh, (plan.candidates, n)),
              _replicated(mesh, (n,)), _replicated(mesh, (plan.num_seq,)),
              _replicated(mesh, plan.seq_query.shape))
      calls.append(Call(
          "shared", f"shared: one U(D), F = all demonstrations, "
          f"{int(lay.full[0])} tokens (bucket {plan.full_len}), then "
          f"{len(lay.query_lengths)} queries packed {plan.seq_query.shape[1]}"
          f" to a sequence in {plan.num_seq} sequences", fn, args,
          shared_context_cost(model, lay, divisor, tensor),
          shared_context_cost(model, lay, 1, 1)))
    elif mode == "tree":
      calls += _tree_calls(model, mesh, workload, scoring, labels, params,
                           batch_fn, common)
    else:  # parallel
      lay = parallel_layout(workload, labels, None, scoring, divisor)
      cache_fn = jax.jit(functools.partial(
          parallel.build_demo_cache, model_config=model,
          header_len=workload.header_len, sep_len=workload.sep_len,
          end_position=lay.end_position, rows_per_chunk=lay.chunk,
          batch_sharding_fn=batch_fn))
      calls.append(Call(
          "parallel_cache", f"parallel: demo KV cache of {2 * n} (example, "
          f"label) slots of {lay.width + 1 + workload.sep_len} tokens, "
          f"{lay.chunk} per micro-batch -> {lay.cache_len} keys",
          cache_fn, (params, data),
          parallel_cache_cost(model, workload, lay, divisor, tensor),
          parallel_cache_cost(model, workload, lay, 1, 1)))
      query_fn = jax.jit(functools.partial(
          parallel.parallel_scores, end_position=lay.end_position,
          rows_per_chunk=lay.chunk, groups=divisor,
          batch_sharding_fn=batch_fn, **common))
      # The cache's shape (and, once compiled, its sharding) is the build's.
      query_args = (params, data, None, _replicated(mesh, (lay.cands, n)),
                    _replicated(mesh, (lay.rows,)),
                    _replicated(mesh, (lay.rows,)))
      calls.append(Call(
          "parallel_query", f"parallel: one U(D), {lay.rows} query rows of "
          f"{lay.width} tokens, {lay.chunk} per micro-batch, each against "
          f"the {lay.cache_len}-key cache", query_fn, query_args,
          parallel_query_cost(model, lay, divisor, tensor),
          parallel_query_cost(model, lay, 1, 1)))
  for call in calls:
    call.kv_heads = model.num_kv_heads
    call.settings = {"param_dtype": model.param_dtype}
  return calls


def _tree_calls(model, mesh, workload, scoring, labels, params, batch_fn,
                common) -> List[Call]:
  """Tree mode's passes as LOOScorer runs them for `labels` (every labelled
  claim queried), each on an abstract pool with the scorer's sharding."""
  cand_idx, query_idx = layout.scored_rows(labels)
  divisor = sharding.batch_divisor(mesh)
  plan = tree_call_plan(workload, labels, cand_idx, query_idx, scoring,
                        divisor)
  pool_sharding = sharding.kv_pool_sharding(model, mesh)
  shape = (model.num_layers, plan.pool_tokens, model.num_kv_heads,
           model.head_dim)
  pool = type(pool_sharding)(*(jax.ShapeDtypeStruct(
      shape, jnp.dtype(model.compute_dtype), sharding=s)
                               for s in pool_sharding))
  calls = []
  names = ((["tree_header"] if plan.header else []) +
           [f"tree_level{l + 1}" for l in range(len(plan.levels))] +
           ["tree_leaf"])
  for name, p in zip(names, plan.passes):
    write = p is not plan.leaf
    s, w, r, prefix, rows = p.shape
    fn = jax.jit(functools.partial(
        tree.tree_pass, prefix_len=prefix, rows=rows,
        query_chunk=scoring.query_chunk, write=write,
        batch_sharding_fn=batch_fn, **common),
                 donate_argnums=(1,) if write else ())
    args = (params, pool, _replicated(mesh, (s, w)), _replicated(mesh, (s,)),
            _replicated(mesh, (s,)), _replicated(mesh, (s, r, 2)),
            _replicated(mesh, (s,)))
    what = "writes keys/values" if write else "reads the label scores"
    calls.append(Call(
        name, f"tree: {s} segments of {w} tokens ({rows} per micro-batch) "
        f"against prefixes of <= {prefix} pool keys; {what} "
        f"(pool {plan.pool_tokens} tokens, depth {plan.depth}, tail "
        f"{scoring.tree_tail})", fn, args,
        tree_pass_cost(model, p, write, divisor, mesh.shape["tensor"]),
        tree_pass_cost(model, p, write, 1, 1)))
  return calls


def train_call(model: LlamaConfig, mesh, workload: Workload,
               train: TrainConfig, seq_len: int, num_train_examples: int,
               compute_dtype: str = "bfloat16") -> Call:
  """The trainer's jitted step, as `train()` builds it, on abstract inputs."""
  from icm_jax.training.trainer import (resolve_compute_dtype,
                                        sharded_train_step)
  total_steps = train_data.num_steps(max(num_train_examples, 1),
                                     train.num_epochs, train.batch_size)
  dtype = (compute_dtype if train.compute_dtype == "auto"
           else resolve_compute_dtype(train.compute_dtype))
  try:
    # Full fine-tuning trains float32 master weights; LoRA keeps the base in
    # its stored dtype (pipeline/train_stage.py).
    if not train.lora_rank:
      model = model.replace(param_dtype="float32")
    step = sharded_train_step(model, param_shapes(model), train, total_steps,
                              mesh, workload.token_sets, dtype)
  except ValueError as e:
    raise AotError(f"--config.{e}") from None
  divisor = sharding.batch_divisor(mesh)
  forward_config = step.forward_config
  a, m = train.grad_accum_steps, train.micro_batch_size
  args = (step.abstract_params, step.abstract_opt_state,
          step.abstract_batch(train, seq_len))
  fn = step.fn
  return Call(
      "train", f"train step: batch {train.batch_size} ({a} x {m} rows) of "
      f"{seq_len} tokens, compute {dtype}, remat={train.remat}, AdamW" +
      (f", LoRA r={train.lora_rank}" if train.lora_rank else ""),
      fn, args,
      train_step_cost(forward_config, seq_len, train, divisor,
                      mesh.shape["tensor"], sharding_chips=mesh.size),
      train_step_cost(forward_config, seq_len, train, 1, 1, 1),
      kv_heads=model.num_kv_heads,
      settings={"param_dtype": model.param_dtype,
                "lora_rank": train.lora_rank, "remat": train.remat})
