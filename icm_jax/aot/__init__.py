"""Ahead-of-time compilation for TPU topologies from any host, and a roofline.

Everything here runs on a CPU machine: `jax.experimental.topologies` describes
the chips of a TPU slice (e.g. "v5e:4x4" = 16 TPU v5 lite chips), the mesh is
built over those devices, and the scoring kernels and the train step are
lowered with `jax.ShapeDtypeStruct` inputs (nothing is allocated) and
compiled by libtpu's compiler. The compiled executable reports, per chip, the
bytes of its arguments, outputs and temporaries, which says whether a run
fits in HBM before any TPU is rented.

    topo = get_topology("v5e:4x4")
    mesh = topology_mesh(topo, MeshConfig(data=1, fsdp=-1, tensor=1))
    model = model_preset("llama-3.1-8b", attention="splash")
    workload = synthetic_workload(256, mean_len=191, max_len=665)
    calls = scoring_calls(model, mesh, workload, ScoringConfig(), ["exact"])
    reports = compile_calls(calls, mesh)
    check_fit(reports, topo.chip, dict(mesh.shape))  # DoesNotFit, advice

Costs. XLA's `cost_analysis()` counts the body of every while loop once, and
our kernels are loops (the decoder layers an `nn.scan`, the LOO rows a
`lax.map`), so its numbers are printed for reference only. The roofline uses
an analytic count instead (`Cost`: matmul FLOPs of every token run, padding
included; attention FLOPs from (query, key) pair counts, "dense" = the whole
padded grid, "visible" = pairs the mask allows, which the roofline uses as a
lower bound; an HBM-traffic lower bound), checked by `jaxpr_matmul_flops`
against the traced program with scan trip counts applied.

One stage per module:
  errors       AotError, DoesNotFit
  topology     chips (HBM, peak FLOP/s, bandwidth), slices, their mesh
  presets      Llama-3.1 8B / 70B architectures; the attention kernel for TPU
  workload     prompt lengths of a search batch and the fine-tuning set
  run_inputs   model, workload, stage configs and mesh from a run config
  layouts      static shapes: the scorer's bucketing for given labels
  calls        jitted kernels and the train step on abstract inputs
  compile      compile and report per-chip memory; the fit check
  costs        analytic per-chip FLOPs and HBM bytes of each call
  jaxpr_flops  trip-count-aware matmul FLOPs of a traced call
  plan         the roofline plan table (one U(D), an ICM search, an epoch)
"""

from icm_jax.aot.calls import (SCORING_MODES, Call, abstract_examples,
                               abstract_params, scoring_calls, train_call)
from icm_jax.aot.compile import (CallReport, check_fit, compile_call,
                                 compile_calls, fit_advice, fit_lines, fits,
                                 train_state_bytes)
from icm_jax.aot.costs import (Cost, exact_cost, exact_shared_cost,
                               forward_cost, parallel_cache_cost,
                               parallel_query_cost, shared_context_cost,
                               train_step_cost)
from icm_jax.aot.errors import AotError, DoesNotFit
from icm_jax.aot.jaxpr_flops import jaxpr_matmul_flops
from icm_jax.aot.layouts import (ExactLayout, ExactSharedLayout,
                                 ParallelLayout, SharedContextLayout,
                                 exact_layout, exact_shared_layout,
                                 parallel_layout, shared_context_layout)
from icm_jax.aot.plan import (Ledger, Row, Target, make_target,
                              markdown_table, plan_rows, simulate_search)
from icm_jax.aot.presets import (PRESETS, attention_impl, for_tpu,
                                 model_preset)
from icm_jax.aot.run_inputs import (model_from_config, parse_mesh,
                                    stage_configs, workload_from_config)
from icm_jax.aot.topology import (CHIPS, TOPOLOGY_EXAMPLES, Chip, GiB,
                                  Topology, get_topology, topology_mesh)
from icm_jax.aot.workload import (GSM8K_LENGTHS, GSM8K_TRAIN_EXAMPLES,
                                  Workload, measured_workload,
                                  synthetic_workload)

__all__ = [
    # errors
    "AotError", "DoesNotFit",
    # topology
    "CHIPS", "TOPOLOGY_EXAMPLES", "Chip", "GiB", "Topology", "get_topology",
    "topology_mesh",
    # presets
    "PRESETS", "attention_impl", "for_tpu", "model_preset",
    # workload
    "GSM8K_LENGTHS", "GSM8K_TRAIN_EXAMPLES", "Workload", "measured_workload",
    "synthetic_workload",
    # run_inputs
    "model_from_config", "parse_mesh", "stage_configs",
    "workload_from_config",
    # layouts
    "ExactLayout", "ExactSharedLayout", "ParallelLayout",
    "SharedContextLayout", "exact_layout", "exact_shared_layout",
    "parallel_layout", "shared_context_layout",
    # calls
    "SCORING_MODES", "Call", "abstract_examples", "abstract_params",
    "scoring_calls", "train_call",
    # compile
    "CallReport", "check_fit", "compile_call", "compile_calls", "fit_advice",
    "fit_lines", "fits", "train_state_bytes",
    # costs
    "Cost", "exact_cost", "exact_shared_cost", "forward_cost",
    "parallel_cache_cost", "parallel_query_cost", "shared_context_cost",
    "train_step_cost",
    # jaxpr_flops
    "jaxpr_matmul_flops",
    # plan
    "Ledger", "Row", "Target", "make_target", "markdown_table", "plan_rows",
    "simulate_search",
]
