"""Ahead-of-time compilation for a TPU topology, on this CPU host.

A tiny Llama's exact-mode scoring call, one-pass cache build and query call
and train step are compiled by libtpu for a v5e:2x2 slice (4 chips). Checked:
the executables target TPU, the per-chip memory numbers are positive and
agree with each other and with the inputs' shardings, the fit check fails
with advice when HBM is made tiny (and when libtpu itself refuses a program
too big for the chip), the static shapes are the ones LOOScorer picks, and
the analytic FLOP count equals the traced program's.

Runs in-process: topology descriptions and TPU compilation leave the CPU
backend (conftest's 8 fake devices) alone; libtpu's process lockfile is
waived by icm_jax.aot because nothing here touches a chip.
"""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")

from conftest import shipped_config  # noqa: E402
from icm_jax import aot, sharding  # noqa: E402
from icm_jax.aot.compile import _parse_oom, _per_chip_bytes  # noqa: E402
from icm_jax.model import LlamaConfig, init_params  # noqa: E402
from icm_jax.scoring import LOOScorer, ScoringConfig  # noqa: E402
from icm_jax.search.config import SearchConfig  # noqa: E402
from icm_jax.tokenization import ExampleTokens  # noqa: E402
from icm_jax.training.config import TrainConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=4096, dtype="bfloat16")
TRAIN = TrainConfig(batch_size=8, remat=True)
N = 16


def workload(n=N, header_len=1, sep_len=2, seed=0):
  rng = np.random.RandomState(seed)
  lengths = tuple(int(x) for x in rng.randint(5, 40, n))
  return aot.Workload(lengths, header_len, sep_len, (2, 2),
                      train_lengths=lengths * 3,
                      groups=tuple(str(i // 4) for i in range(n)),
                      keys=tuple(str(i % 3) for i in range(n)))


@pytest.fixture(scope="module")
def topology():
  return aot.get_topology("v5e:2x2")


@pytest.fixture(scope="module")
def mesh(topology):
  return aot.topology_mesh(topology, dict(data=1, fsdp=-1, tensor=1))


@pytest.fixture(scope="module")
def compiled(mesh):
  """(calls, reports) of exact, parallel cache + query, train; compiled once.

  Under JAX's default matmul precision, as a TPU run: conftest's "highest"
  asks Mosaic for fp32 contractions of the splash kernel's bf16 operands,
  which it rejects ("Bad lhs type").
  """
  model = aot.for_tpu(TINY)
  wl = workload()
  with jax.default_matmul_precision(None):
    calls = aot.scoring_calls(model, mesh, wl, ScoringConfig(),
                              ["exact", "parallel"])
    calls.append(aot.train_call(model, mesh, wl, TRAIN,
                                wl.train_step_length(64, 4096),
                                len(wl.train_lengths)))
    return calls, aot.compile_calls(calls, mesh)


def test_topology(topology, mesh):
  assert topology.num_chips == 4
  assert topology.chip.name == "v5e" and topology.chip.hbm_bytes == 16 << 30
  assert {d.platform for d in topology.devices} == {"tpu"}
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  # The CPU backend (conftest's fake devices) is untouched.
  assert jax.default_backend() == "cpu" and len(jax.devices()) == 8
  v5p = aot.get_topology("v5p:2x2x2")
  assert v5p.num_chips == 8 and v5p.chip.name == "v5p"


@pytest.mark.parametrize("name,match", [
    ("bogus", r"--topology='bogus': expected CHIP:AxB"),
    ("v5e:3x3", r"--topology='v5e:3x3': not a TPU topology libtpu knows"),
    ("v9z:2x2", r"--topology='v9z:2x2'"),
])
def test_bad_topology_names_the_argument(name, match):
  with pytest.raises(aot.AotError, match=match):
    aot.get_topology(name)


def test_bad_values_name_the_argument():
  with pytest.raises(aot.AotError, match=r"--model='llama-9b'.*llama-3.1-8b"):
    aot.model_preset("llama-9b")
  with pytest.raises(aot.AotError, match=r"--lengths \(max\)=0"):
    aot.synthetic_workload(8, 5, 0)
  with pytest.raises(aot.AotError, match=r"--num_examples.*at least 2"):
    aot.synthetic_workload(1, 5, 5)
  with pytest.raises(aot.AotError, match=r"--modes: unknown mode 'fast'"):
    aot.scoring_calls(TINY, None, workload(), ScoringConfig(), ["fast"])


def test_presets():
  eight = aot.model_preset("llama-3.1-8b")
  seventy = aot.model_preset("Llama-3.1-70B")
  assert round(eight.num_params() / 1e9, 2) == 8.03
  assert round(seventy.num_params() / 1e9, 1) == 70.6
  assert eight.rope_scaling.factor == 8 and eight.rope_theta == 500000
  assert not eight.tie_word_embeddings and eight.vocab_size == 128256
  assert (seventy.num_layers, seventy.num_heads, seventy.num_kv_heads) == (
      80, 64, 8)
  one = aot.model_preset("llama-3.2-1b")
  assert round(one.num_params() / 1e9, 2) == 1.24 and one.tie_word_embeddings
  assert aot.for_tpu(eight).attention == "splash"
  assert aot.for_tpu(eight, "xla").attention == "xla"


def test_compiled_for_tpu_with_consistent_memory(compiled):
  calls, reports = compiled
  assert [r.name for r in reports] == ["exact", "parallel_cache",
                                       "parallel_query", "train"]
  for call, r in zip(calls, reports):
    assert r.compiler_error is None
    assert r.device_kinds == ("TPU v5 lite",)
    assert r.hlo_platform == "tpu"   # TPU tiled layouts in the module
    assert r.argument_bytes > 0 and r.temp_bytes >= 0 and r.code_bytes > 0
    assert r.output_bytes > 0 and r.xla_flops > 0 and r.xla_bytes > 0
    assert r.total_bytes == (r.argument_bytes + r.output_bytes -
                             r.alias_bytes + r.temp_bytes + r.code_bytes)
    # XLA's layouts pad small arrays, never shrink them.
    assert r.argument_bytes >= _per_chip_bytes(call.args)
    assert r.compile_seconds > 0
    assert {d.platform for s in jax.tree.leaves(call.compiled.input_shardings)
            for d in s.device_set} == {"tpu"}
  by_name = {r.name: r for r in reports}
  # The query call's arguments hold the cache the build call outputs.
  assert by_name["parallel_query"].argument_bytes >= by_name[
      "parallel_cache"].output_bytes > 0
  # The train step donates params and optimizer state: aliased in/out.
  train = by_name["train"]
  assert 0 < train.alias_bytes <= min(train.argument_bytes,
                                      train.output_bytes)
  params_and_opt = _per_chip_bytes(calls[-1].args[:2])
  assert params_and_opt <= train.alias_bytes
  # Scoring calls alias nothing.
  assert all(r.alias_bytes == 0 for r in reports if r.name != "train")


def test_fit_check_fails_with_advice_when_hbm_is_small(compiled, topology,
                                                       mesh):
  _, reports = compiled
  lines = aot.check_fit(reports, topology.chip, dict(mesh.shape))
  assert all(line.endswith("-> fits") for line in lines)
  with pytest.raises(aot.DoesNotFit) as info:
    aot.check_fit(reports, topology.chip, dict(mesh.shape), hbm_bytes=1024)
  message = str(info.value)
  for name in ("exact", "parallel_cache", "parallel_query", "train"):
    assert f"{name} needs" in message
  assert message.count("Suggestions:") == 4
  assert "grad_accum_steps" in message or "fsdp" in message


def report(name, arguments=0, temp=0, outputs=0, alias=0, **settings):
  return aot.CallReport(name, "", arguments, outputs, temp, alias, 0, 0.0,
                        0.0, 0.0, 0.0, aot.Cost(), ("TPU v5 lite",), "tpu",
                        settings=settings)


@pytest.mark.parametrize("rep,expected,absent", [
    (report("train", arguments=10, temp=1), ["fsdp", "lora_rank"],
     ["grad_accum", "param_dtype"]),
    # What is already in force is never advised again.
    (report("train", arguments=10, temp=1, lora_rank=16,
            param_dtype="bfloat16"), ["fsdp"], ["lora_rank", "param_dtype"]),
    (report("train", arguments=10, temp=1, lora_rank=16,
            param_dtype="float32"), ["fsdp", "param_dtype=bfloat16"],
     ["lora_rank"]),
    (report("train", arguments=1, temp=10, remat=True), ["grad_accum_steps"],
     ["remat"]),
    (report("exact", arguments=10, temp=1, param_dtype="bfloat16"), ["fsdp"],
     ["param_dtype"]),
    (report("train", arguments=1, temp=10), ["grad_accum_steps", "remat"],
     ["param_dtype"]),
    (report("exact", arguments=1, temp=10),
     ["tensor", "label.batch_size", "query_chunk"],
     ["remat", "scoring.mode="]),
    (report("exact", arguments=10, temp=1), ["fsdp", "param_dtype"], []),
    (report("parallel_cache", outputs=10, temp=1),
     ["outputs", "tensor", "rows_per_chunk"], []),
    (report("parallel_query", arguments=1, temp=10),
     ["temporaries", "rows_per_chunk"], []),
])
def test_advice_follows_the_dominant_component(rep, expected, absent):
  advice = " ".join(aot.fit_advice(rep, {"data": 1, "fsdp": 4, "tensor": 1}))
  for word in expected:
    assert word in advice
  for word in absent:
    assert word not in advice


def test_no_tensor_advice_once_it_splits_every_kv_head():
  rep = dataclasses.replace(report("exact", arguments=1, temp=10), kv_heads=2)
  for tensor, wanted in ((1, True), (2, False)):
    advice = " ".join(aot.fit_advice(rep, {"data": 1, "fsdp": 2,
                                           "tensor": tensor}))
    assert ("larger tensor axis" in advice) == wanted
    # No one-pass mode agrees with exact mode: never advised.
    assert "scoring.mode" not in advice


def test_tree_passes_compile_for_tpu(mesh):
  """Every pass of the scorer's tree plan compiles for the v5e mesh; level
  passes donate the pool (aliased in and out), the leaf reads it."""
  model = aot.for_tpu(TINY)
  wl = workload()
  with jax.default_matmul_precision(None):
    calls = aot.scoring_calls(model, mesh, wl, ScoringConfig(tree_tail=1),
                              ["tree"])
    reports = aot.compile_calls(calls, mesh)
  names = [r.name for r in reports]
  assert names[0] == "tree_header" and names[-1] == "tree_leaf"
  assert len(names) >= 4  # header, >= 2 levels (4 groups), leaf
  pool = _per_chip_bytes(calls[0].args[1])
  for r in reports:
    assert r.compiler_error is None and r.hlo_platform == "tpu"
    if r.name == "tree_leaf":
      assert r.alias_bytes == 0 and r.argument_bytes >= pool
    else:
      assert r.alias_bytes >= pool > 0


def test_libtpu_refusal_is_a_does_not_fit_report(topology):
  """Llama-3.1-8B exact mode at N=256 on 4 chips: libtpu refuses to compile
  (temporaries far above 16 GiB); that is a verdict, not a crash."""
  mesh = aot.topology_mesh(topology, dict(data=1, fsdp=-1, tensor=1))
  model = aot.model_preset("llama-3.1-8b", dtype="bfloat16")
  wl = aot.synthetic_workload(256, 190, 660)
  with jax.default_matmul_precision(None):
    [call] = aot.scoring_calls(aot.for_tpu(model), mesh, wl, ScoringConfig(),
                               ["exact"])
    r = aot.compile_call(call, mesh)
  assert r.compiler_error and "RESOURCE_EXHAUSTED" in r.compiler_error
  assert r.temp_bytes > 16 << 30
  # f32 8B params over 4 chips.
  assert r.argument_bytes > model.num_params() * 4 / 4
  with pytest.raises(aot.DoesNotFit, match=r"libtpu refused.*Suggestions"):
    aot.check_fit([r], topology.chip, dict(mesh.shape))


def test_parse_oom_messages():
  assert _parse_oom(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
      "required for HLO temporaries (60.31G) exceeds available HBM (15.75G)."
  ) == ("temp", int(60.31 * (1 << 30)))
  assert _parse_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error."
                    " Ran out of memory in memory space hbm. Used 20.50G "
                    "of 15.75G hbm.") == ("total", int(20.5 * (1 << 30)))
  assert _parse_oom("INVALID_ARGUMENT: bad") is None


# ----------------------------------------------------------------------------
# Static shapes == the scorer's; analytic FLOPs == the traced program's
# ----------------------------------------------------------------------------

SCENARIOS = {
    "all labelled": (lambda n: (np.arange(n) % 2)[None], None),
    "some labelled": (lambda n: np.where(np.arange(n) % 3 == 0, -1,
                                         np.arange(n) % 2)[None], None),
    "prediction": (lambda n: np.where(np.arange(n) < 9, np.arange(n) % 2,
                                      -1)[None],
                   lambda n: (np.arange(n) == 11)[None]),
    "three candidates": (lambda n: np.stack([np.arange(n) % 2,
                                             1 - np.arange(n) % 2,
                                             np.ones(n, int)]), None),
}


def test_layouts_match_the_scorer():
  wl = workload(n=N, header_len=1, sep_len=2, seed=1)
  rng = np.random.RandomState(0)
  examples = ExampleTokens(
      tuple(f"e{i}" for i in range(N)),
      tuple(rng.randint(8, 500, n).astype(np.int32) for n in wl.lengths),
      np.array([1, 2], np.int32), np.array([3, 3], np.int32),
      np.array([4], np.int32),
      (np.array([1, 5], np.int32), np.array([2, 7], np.int32)))
  cpu_mesh = sharding.create_mesh(sharding.MeshConfig(1, 4, 1),
                                  devices=jax.devices()[:4])
  divisor = 4
  params = init_params(TINY.replace(dtype="float32"), jax.random.key(0))
  for mode, shared in (("exact", True), ("exact", False), ("parallel", True),
                       ("shared", True)):
    config = ScoringConfig(mode, rows_per_chunk=6, prefix_sharing=shared)
    scorer = LOOScorer(TINY.replace(dtype="float32"), params, examples,
                       config, mesh=cpu_mesh)
    # Shapes only: the kernel is not run.
    scorer._call = lambda fn, *args, **kw: [np.zeros(args[-1].shape)] * 2
    for name, (labels_fn, queries_fn) in SCENARIOS.items():
      labels = labels_fn(N).astype(np.int32)
      queries = None if queries_fn is None else queries_fn(N)
      scorer.score(labels, queries)
      if mode == "exact" and shared:
        lay = aot.exact_shared_layout(wl, labels, queries, config, divisor)
      elif mode == "exact":
        lay = aot.exact_layout(wl, labels, queries, config, divisor, 4096)
      elif mode == "shared":
        lay = aot.shared_context_layout(wl, labels, queries, config, divisor)
      else:
        lay = aot.parallel_layout(wl, labels, queries, config, divisor)
      assert lay.static == scorer.last_shape, (mode, shared, name)


@pytest.mark.parametrize("train", [
    TrainConfig(batch_size=8, remat=True),
    TrainConfig(batch_size=8, remat=False, grad_accum_steps=2),
], ids=["remat", "accumulate"])
def test_analytic_flops_equal_the_traced_program(mesh, train):
  """XLA attention with one dense block: every FLOP is a traced dot."""
  model = aot.for_tpu(TINY.replace(attention_block_size=0), "xla")
  wl = workload()
  calls = aot.scoring_calls(model, mesh, wl, ScoringConfig(rows_per_chunk=4),
                            ["exact", "exact_unshared", "parallel", "shared"])
  calls += aot.scoring_calls(model, mesh, wl,
                             ScoringConfig(rows_per_chunk=4, tree_tail=1),
                             ["tree"])
  calls.append(aot.train_call(model, mesh, wl, train, 64, 48))
  cache_shapes = jax.eval_shape(calls[2].fn, *calls[2].args)
  calls[3].args = calls[3].args[:2] + (cache_shapes,) + calls[3].args[3:]
  for call in calls:
    traced, stats = aot.jaxpr_matmul_flops(call, mesh)
    g = call.global_cost
    assert traced == pytest.approx(g.matmul_flops + g.attention_dense_flops,
                                   rel=1e-9), call.name
    assert not stats.get("pallas_call")
    # Work split over the 4 chips (no assignment axis smaller than them in
    # the batch-split passes except exact mode's F pass, run on every chip).
    if call.name in ("train", "parallel_query", "exact_unshared"):
      assert call.cost.matmul_flops * 4 == pytest.approx(g.matmul_flops)
    assert g.attention_visible_flops <= g.attention_dense_flops


def test_roofline_plan_accounts_every_search_call(topology):
  wl = workload(n=N)
  target = aot.make_target(TINY, "tiny", topology,
                           dict(data=1, fsdp=-1, tensor=1))
  search = SearchConfig(max_iterations=40)
  calls, result = aot.simulate_search(wl, search)
  predictions = [c for c in calls if c.kind == "prediction"]
  # One prediction call per iteration (+ the final scores of unlabelled).
  assert result.iterations == 40
  assert len(predictions) in (40, 41)
  rows, facts = aot.plan_rows(target, wl, ScoringConfig(), search,
                              TRAIN, modes=("exact", "shared", "parallel"),
                              recorded=(calls, result))
  plan = facts["exact"]
  assert plan.prediction.calls + plan.evaluation.calls == len(calls)
  assert plan.candidates >= plan.evaluation.calls
  # Shared mode runs F once per assignment instead of once per row suffix.
  shared = facts["shared"]
  assert shared.prediction.calls + shared.evaluation.calls == len(calls)
  assert shared.evaluation.cost.matmul_flops < plan.evaluation.cost.matmul_flops
  for row in rows:
    led = row.ledger
    assert led.seconds >= max(led.compute_seconds, led.memory_seconds) * (
        1 - 1e-12)
    assert led.seconds <= led.compute_seconds + led.memory_seconds
  table = aot.markdown_table(rows)
  assert table.count("\n") == len(rows) + 1
  assert "roofline lower bound" in table.splitlines()[0]
  epoch = rows[-1]
  assert epoch.calls == -(-len(wl.train_lengths) // TRAIN.batch_size)


# ----------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------


def run_script(script, *args):
  """tpu_scripts/<script> on configs/tiny.py with small synthetic lengths."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "tpu_scripts", script),
       "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
       "--lengths=20,37", "--num_examples=8", "--train_examples=16", *args],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def run_cli(*args):
  return run_script("aot_check.py", "--cross_check=false", *args)


def test_cli_does_not_fit_exits_1_with_advice():
  result = run_cli("--topology=v5e:2x2", "--modes=train,parallel",
                   "--hbm_gib=0.0001")
  assert result.returncode == 1, result.stdout + result.stderr
  assert "[train] train step: batch 4" in result.stdout
  assert "memory per chip: arguments" in result.stdout
  assert "train: " in result.stdout and "DOES NOT FIT" in result.stdout
  assert "DOES NOT FIT on v5e:2x2" in result.stderr
  assert "Suggestions:" in result.stderr


@pytest.mark.parametrize("args,match", [
    (["--topology=v5e:3x3"], "--topology='v5e:3x3'"),
    (["--topology=v5e:2x2", "--mesh=fsdp=3"], "--mesh='fsdp=3'"),
    (["--topology=v5e:2x2", "--modes=train,fast"], "--modes='train,fast'"),
])
def test_cli_bad_arguments_exit_2_naming_them(args, match):
  result = run_cli(*args)
  assert result.returncode == 2, result.stdout + result.stderr
  assert match in result.stderr


def test_measured_workload_is_the_pipelines_first_batch(smollm2_tokenizer):
  from icm_jax.pipeline.inputs import first_whole_groups
  from icm_jax.tasks import bundled_path, get_task, load_examples
  from icm_jax.tokenization import tokenize_examples
  path = bundled_path("truthfulqa", "train")
  wl = aot.measured_workload("truthfulqa", path, smollm2_tokenizer, 10,
                             split_from_test=False)
  examples = load_examples(get_task("truthfulqa"), path)
  batch = first_whole_groups(examples, 10, "n")
  tokens = tokenize_examples(smollm2_tokenizer, [e.prompt for e in batch])
  assert wl.num_examples == len(batch) <= 10
  assert wl.prompt_lengths == tuple(tokens.prompt_lengths)
  assert (wl.header_len, wl.sep_len) == (len(tokens.header),
                                         len(tokens.separator))
  assert len(wl.train_lengths) == len(examples)
  assert wl.groups == tuple(e.group for e in batch)
  assert wl.consistency_kind == "none"
  with pytest.raises(aot.AotError, match=r"--data='/nonexistent'"):
    aot.measured_workload("truthfulqa", "/nonexistent", smollm2_tokenizer, 8)


def test_measured_workload_of_a_task_given_by_flags(smollm2_tokenizer):
  """configs/custom.py's task section (no built-in name) plans as it runs."""
  from icm_jax.tasks import load_examples, task_from_config
  from icm_jax.tokenization import tokenize_examples
  config = shipped_config("custom")
  task = config.task.to_dict()
  wl = aot.measured_workload(task, config.data.train, smollm2_tokenizer, 8,
                             split_from_test=False)
  examples = load_examples(task_from_config(task), config.data.train)[:8]
  tokens = tokenize_examples(smollm2_tokenizer, [e.prompt for e in examples])
  assert wl.prompt_lengths == tuple(tokens.prompt_lengths)
  assert wl.groups == tuple(e.id for e in examples)  # a group each


def run_plan(*args):
  return run_script("plan.py", *args)


def test_plan_script():
  result = run_plan("--target=llama-3.1-8b@v5e:2x2@data=1,fsdp=2,tensor=2",
                    "--target=llama-3.1-70b@v5p:2x2x2@data=1,fsdp=-1,tensor=1")
  assert result.returncode == 0, result.stdout + result.stderr
  table = [l for l in result.stdout.splitlines() if l.startswith("| ")]
  # Header, then per target: 2 U(D) + cache + 2 searches + epoch.
  assert len(table) == 1 + 2 * 6
  assert sum("llama-3.1-8b on v5e:2x2" in l for l in table) == 6
  assert sum("v5p:2x2x2 (data=1,fsdp=8,tensor=1)" in l for l in table) == 6
  assert "12 iterations" in result.stdout   # configs/tiny.py's search
  assert "LOWER BOUND" in result.stdout
  # Train state per chip, full vs LoRA r=16: full fine-tuning holds float32
  # params + 2 AdamW moments + gradients (4x the params); LoRA keeps the base
  # in its stored bf16 (half the float32 params) with no AdamW state or
  # gradients for it, so a bit more than half.
  memory = [l for l in result.stdout.splitlines() if "train state" in l]
  assert len(memory) == 2
  for line in memory:
    full, lora = (float(x) for x in re.findall(
        r"(?:full fine-tune|LoRA r=16) ([0-9.]+) GiB", line))
    params = float(re.search(r"full fine-tune .*?params ([0-9.]+)",
                             line).group(1))
    assert 3.9 * params < full and 0.5 * params < lora < 0.6 * params, line
    lora_params = float(re.search(r"LoRA r=16 .*?params ([0-9.]+)",
                                  line).group(1))
    assert abs(lora_params - params / 2) < 0.05 * params, line
  bad = run_plan("--target=llama-3.1-8b@v5e:2x2")
  assert bad.returncode == 2 and "--target='llama-3.1-8b@v5e:2x2'" in bad.stderr
