r"""Fast LOO modes against exact LOO: agreement of s_i and seconds per U(D).

  python experiments/bench_loo_modes.py [--agree_sizes=16,32,64]
      [--time_sizes=16,32,64,128] [--out=experiments/bench_loo_modes.jsonl]
  python experiments/bench_loo_modes.py --tables_from=FILE.jsonl  # tables only
  python experiments/bench_loo_modes.py --floor_sizes=16 --agree_sizes= \
      --time_sizes= --out=experiments/bench_tree_floor.jsonl   # issue 22
  # modes: exact, shared, parallel, lobo_B, tree, tree_tailM (tree mode
  # with scoring.tree_tail=M)

Floor (`--floor_sizes`, `--contexts`, `--floor_tasks`): for tree and
shared mode, in each scoring context, per-claim agreement with exact mode
beside the order-noise floor measured in the same run: exact mode on the
same claims with the consistency groups in `--floor_shuffles` seeded
shuffled orders (groups kept together), against exact mode in example order.
Tasks: sentiment, truthfulqa and gsm8k (keyed: groups of 4 answers to one
question; ../shared/data/icm/test_gsm8k.json). With `--rank_labellings=K`
(sentiment, consistent pairs), also the ranking of P(D) over gold, its
inverse and K random consistent labellings (what the search decides on):
Spearman of each mode's P(D) with exact's, beside the shuffled exact's.

SmolLM2-135M-Instruct (GGUF, float32) on this machine, two tasks:
TruthfulQA (the paper's ICM file, ../shared/data/icm/test_truthfulqa.json,
first N claims) and the bundled sentiment task (train split, first N claims).

Agreement: for gold, random (coin flips) and one-label (all True)
assignments, every labelled claim's s_i = log P(True) - log P(False) under
each mode, against exact mode (the paper's leave-one-out prompts): sign
agreement, Spearman, max |s - s_exact|. Modes:
  shared           one causal pass over F, each query masks its own demo
  lobo_B           exact prompts leaving the query's fold of B folds out
  parallel         every demonstration encoded alone (today's one-pass mode)
  parallel_centred parallel minus its mean over the assignment's queries
  parallel_cf      parallel minus a content-free claim's s (every template
                   field "N/A") under the same demonstrations

Timing (sentiment, gold labels, one assignment per call = one U(D)
evaluation): medians of interleaved repeats, compile time excluded. Exact
mode above --exact_repeat_max is run once and jax's own compile-time events
are subtracted. Prints each mode's ratio to exact, and the token-count cost
model's ratio next to it.
"""

from __future__ import annotations

import json
import os
import statistics
import string
import time

import jax
import jax.monitoring
import numpy as np
from absl import app, flags

from icm_jax.checkpoints import load_model, smollm2_gguf_path
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.tasks import bundled_path, get_task, load_examples
from icm_jax.tokenization import LabelWords, tokenize_examples

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_list("agree_sizes", ["16", "32", "64"], "N for agreement")
flags.DEFINE_list("time_sizes", ["16", "32", "64", "128"], "N for timing")
flags.DEFINE_list("tasks", ["truthfulqa", "sentiment"], "tasks to score")
flags.DEFINE_list("blocks", ["4", "8", "16"], "B of the lobo_B modes")
flags.DEFINE_list("time_modes", ["exact", "shared", "lobo_4", "parallel"],
                  "modes to time")
flags.DEFINE_integer("repeats", 3, "interleaved timing repeats")
flags.DEFINE_integer("exact_repeat_max", 32,
                     "above this N exact mode is timed once")
flags.DEFINE_string("truthfulqa", os.path.join(
    HERE, "..", "..", "shared", "data", "icm", "test_truthfulqa.json"),
                    "TruthfulQA ICM file")
flags.DEFINE_list("floor_sizes", [], "N for the agreement-vs-floor rows")
flags.DEFINE_list("floor_tasks", ["sentiment", "truthfulqa", "gsm8k"],
                  "tasks of the floor rows")
flags.DEFINE_list("floor_modes", ["tree", "shared"], "modes judged on the floor")
flags.DEFINE_list("contexts", ["leave_one_out", "leave_group_out"],
                  "scoring contexts of the floor rows")
flags.DEFINE_integer("floor_shuffles", 2, "shuffled exact orders per cell")
flags.DEFINE_integer("rank_labellings", 0,
                     "random consistent labellings ranked (sentiment)")
flags.DEFINE_string("gsm8k", os.path.join(
    HERE, "..", "..", "shared", "data", "icm", "test_gsm8k.json"),
                    "GSM8K ICM file")
flags.DEFINE_string("out", "", "append one JSON line per result here")
flags.DEFINE_string("tables_from", "", "only print the tables of this JSONL")

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event, duration, **kwargs):
  del kwargs
  if event in _COMPILE_EVENTS:
    _compile_seconds[0] += duration


def spearman(a, b) -> float:
  ra = np.argsort(np.argsort(a)).astype(float)
  rb = np.argsort(np.argsort(b)).astype(float)
  return float(np.corrcoef(ra, rb)[0, 1])


def content_free_prompt(task) -> str:
  fields = {f for _, f, _, _ in string.Formatter().parse(task.template) if f}
  return task.template.format(**{f: "N/A" for f in fields})


def load_task(name):
  task = get_task(name)
  path = {"truthfulqa": FLAGS.truthfulqa,
          "gsm8k": FLAGS.gsm8k}.get(name) or bundled_path("sentiment", "train")
  return task, load_examples(task, path)


def mode_config(mode: str, context: str = "leave_one_out") -> ScoringConfig:
  """lobo_B: exact leaving one of B folds out; tree_tailM: tree mode with
  scoring.tree_tail=M; otherwise the mode (its first word) in `context`."""
  if mode.startswith("lobo_"):
    return ScoringConfig("exact", context="leave_block_out",
                         blocks=int(mode.split("_")[1]))
  if mode.startswith("tree_tail"):
    return ScoringConfig("tree", context=context,
                         tree_tail=int(mode[len("tree_tail"):]))
  return ScoringConfig(mode.split("_")[0], context=context)


_ROWS = []


def emit(row):
  _ROWS.append(row)
  print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                    for k, v in row.items()}), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps(row) + "\n")


def agreement(model, tokenizer_words, task_name, n):
  config, params, tokenizer = model
  task, examples = load_task(task_name)
  examples = examples[:n]
  prompts = [e.prompt for e in examples]
  ids = [e.id for e in examples]
  groups = [e.group for e in examples]
  tokens = tokenize_examples(tokenizer, prompts, ids=ids,
                             words=tokenizer_words)
  gold = np.array([e.gold for e in examples], np.int32)
  rng = np.random.default_rng(n)
  assignments = {"gold": gold, "random": rng.integers(0, 2, n).astype(np.int32),
                 "one_label": np.ones(n, np.int32)}
  labels = np.stack(list(assignments.values()))
  s = {}
  for mode in ["exact", "shared", "parallel"] + [
      f"lobo_{b}" for b in FLAGS.blocks]:
    t0 = time.perf_counter()
    scorer = LOOScorer(config, params, tokens, mode_config(mode),
                       groups=groups)
    s[mode] = scorer.score(labels).s
    print(f"  {task_name} N={n} {mode}: {time.perf_counter() - t0:.1f}s",
          flush=True)
  s["parallel_centred"] = s["parallel"] - s["parallel"].mean(axis=1,
                                                             keepdims=True)
  # Content-free claim: an extra unlabelled example, queried under the same
  # demonstrations (an unlabelled example is never in anyone's context).
  cf_tokens = tokenize_examples(tokenizer, prompts + [content_free_prompt(task)],
                                ids=ids + ["content_free"],
                                words=tokenizer_words)
  cf_labels = np.concatenate([labels, -np.ones((len(labels), 1), np.int32)], 1)
  queries = np.ones_like(cf_labels, bool)
  cf = LOOScorer(config, params, cf_tokens, ScoringConfig("parallel"),
                 groups=groups + ["content_free"]).score(cf_labels, queries).s
  s["parallel_cf"] = cf[:, :n] - cf[:, n:]
  for k, name in enumerate(assignments):
    ref = s["exact"][k]
    for mode, values in s.items():
      if mode == "exact":
        continue
      v = values[k]
      emit(dict(kind="agreement", task=task_name, n=n, assignment=name,
                mode=mode, sign_agreement=float(np.mean(np.sign(v) ==
                                                        np.sign(ref))),
                spearman=spearman(v, ref),
                max_abs_diff=float(np.abs(v - ref).max()),
                mean_abs_diff=float(np.abs(v - ref).mean()),
                exact_s_mean=float(ref.mean()), mode_s_mean=float(v.mean())))


def group_shuffle(groups, seed):
  """A seeded order of the examples with whole groups shuffled."""
  names = list(dict.fromkeys(groups))
  np.random.default_rng(seed).shuffle(names)
  return np.array([i for g in names for i in range(len(groups))
                   if groups[i] == g])


def per_claim(v, ref):
  return dict(sign_agreement=float(np.mean(np.sign(v) == np.sign(ref))),
              spearman=spearman(v, ref),
              max_abs_diff=float(np.abs(v - ref).max()))


def floor_cell(model, tokenizer_words, task_name, n, context):
  """Tree/shared vs exact, beside exact (shuffled groups) vs exact."""
  config, params, tokenizer = model
  _, examples = load_task(task_name)
  examples = examples[:n]
  groups = [e.group for e in examples]
  gold = np.array([e.gold for e in examples], np.int32)
  rng = np.random.default_rng(n)
  labellings = {"gold": gold,
                "random": rng.integers(0, 2, n).astype(np.int32),
                "one_label": np.ones(n, np.int32)}
  if FLAGS.rank_labellings and task_name == "sentiment":
    first_of = {}
    for i, g in enumerate(groups):  # pairs: one claim of each group True
      first_of.setdefault(g, i)
    firsts = np.array([first_of[g] == i for i, g in enumerate(groups)])
    labellings["inverse"] = 1 - gold
    for k in range(FLAGS.rank_labellings):
      flip = np.random.default_rng(1000 + k).integers(0, 2, len(first_of))
      per_group = dict(zip(first_of, flip))
      labellings[f"consistent_{k}"] = np.array(
          [per_group[g] if f else 1 - per_group[g]
           for g, f in zip(groups, firsts)], np.int32)
  names = list(labellings)
  labels = np.stack([labellings[k] for k in names])

  def scores(mode, order=None):
    order = np.arange(n) if order is None else order
    sub = [examples[i] for i in order]
    tokens = tokenize_examples(tokenizer, [e.prompt for e in sub],
                               ids=[e.id for e in sub], words=tokenizer_words)
    t0 = time.perf_counter()
    sc = LOOScorer(config, params, tokens, mode_config(mode, context),
                   groups=[e.group for e in sub]).score(labels[:, order])
    back = np.empty(n, np.int64)
    back[order] = np.arange(n)
    print(f"  {task_name} N={n} {context} {mode}: "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return sc.log_p_false[:, back], sc.log_p_true[:, back]

  from icm_jax.search.objective import mutual_predictability
  def p_of(lf, lt):
    return mutual_predictability("mean_log_odds", labels, lf, lt)

  ref_f, ref_t = scores("exact")
  ref, ref_p = ref_t - ref_f, p_of(ref_f, ref_t)
  results = {}
  for k in range(FLAGS.floor_shuffles):
    lf, lt = scores("exact", group_shuffle(groups, k))
    results[f"exact_shuffled_{k}"] = (lt - lf, p_of(lf, lt))
  for mode in FLAGS.floor_modes:
    lf, lt = scores(mode)
    results[mode] = (lt - lf, p_of(lf, lt))
  per_claim_names = ["gold", "random", "one_label"]
  for name, (s, p) in results.items():
    for a in per_claim_names:
      k = names.index(a)
      emit(dict(kind="floor", task=task_name, n=n, context=context,
                assignment=a, mode=name, **per_claim(s[k], ref[k])))
    if len(names) > 3:
      emit(dict(kind="ranking", task=task_name, n=n, context=context,
                mode=name, labellings=len(names),
                spearman_P=spearman(p, ref_p),
                gold_rank=int((p > p[0]).sum()) + 1,
                exact_gold_rank=int((ref_p > ref_p[0]).sum()) + 1))


def floor_table(rows) -> str:
  """Markdown: per cell, each mode's 'sign / Spearman' beside the floor's
  mean (min..max over the shuffles)."""
  cells = sorted({(r["task"], r["n"], r["context"], r["assignment"])
                  for r in rows})
  modes = sorted({r["mode"] for r in rows if not r["mode"].startswith("exact")})
  lines = ["| task | N | context | labels | floor sign | floor Spearman | " +
           " | ".join(f"{m} sign / Spearman" for m in modes) + " |",
           "|---|---:|---|---|---:|---:|" + "---:|" * len(modes)]
  for cell in cells:
    here = [r for r in rows if (r["task"], r["n"], r["context"],
                                r["assignment"]) == cell]
    fl = [r for r in here if r["mode"].startswith("exact_shuffled")]
    fmt = lambda key: (f"{np.mean([r[key] for r in fl]):.2f} "
                       f"({min(r[key] for r in fl):.2f}..{max(r[key] for r in fl):.2f})")
    by = {r["mode"]: r for r in here}
    lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | "
                 f"{fmt('sign_agreement')} | {fmt('spearman')} | " + " | ".join(
                     f"{by[m]['sign_agreement']:.2f} / {by[m]['spearman']:.2f}"
                     if m in by else "-" for m in modes) + " |")
  return "\n".join(lines)


def timing(model, tokenizer_words, n):
  config, params, tokenizer = model
  _, examples = load_task("sentiment")
  examples = examples[:n]
  tokens = tokenize_examples(tokenizer, [e.prompt for e in examples],
                             ids=[e.id for e in examples],
                             words=tokenizer_words)
  groups = [e.group for e in examples]
  gold = np.array([e.gold for e in examples], np.int32)
  scorers, times, setup = {}, {}, {}
  for mode in FLAGS.time_modes:
    t0 = time.perf_counter()
    scorer = LOOScorer(config, params, tokens, mode_config(mode),
                       groups=groups)
    scorers[mode] = scorer
    if mode == "exact" and n > FLAGS.exact_repeat_max:
      before = _compile_seconds[0]
      scorer.score(gold)
      compile_s = _compile_seconds[0] - before
      times[mode] = [time.perf_counter() - t0 - compile_s]
      setup[mode] = compile_s
      continue
    scorer.score(gold)
    setup[mode] = time.perf_counter() - t0
    times[mode] = []
  for _ in range(FLAGS.repeats):
    for mode in FLAGS.time_modes:
      if mode == "exact" and n > FLAGS.exact_repeat_max:
        continue
      t0 = time.perf_counter()
      scorers[mode].score(gold)
      times[mode].append(time.perf_counter() - t0)
  med = {m: statistics.median(v) for m, v in times.items()}
  demo = tokens.prompt_lengths + 1 + len(tokens.separator)
  # Token-forwards per evaluation (cost model): exact with prefix sharing
  # runs F once and each row's suffix F[end_i:] + prompt_i; shared runs F
  # and the prompts; lobo_B runs B copies of F minus one fold, plus prompts.
  suffix = np.cumsum(demo[::-1])[::-1] - demo
  model_tokens = {"exact": demo.sum() + suffix.sum() + tokens.prompt_lengths.sum(),
                  "shared": demo.sum() + tokens.prompt_lengths.sum(),
                  "parallel": tokens.prompt_lengths.sum()}
  for mode in scorers:  # tree modes: their plan's real (unpadded) tokens
    if mode.startswith("tree"):
      plan = scorers[mode].last_plan
      model_tokens[mode] = sum(int(p.length.sum()) for p in plan.passes)
  for mode in FLAGS.time_modes:
    if mode.startswith("lobo_"):
      b = int(mode.split("_")[1])
      model_tokens[mode] = (b - 1) * demo.sum() + tokens.prompt_lengths.sum()
  load = os.getloadavg()[0]
  for mode in FLAGS.time_modes:
    emit(dict(kind="timing", task="sentiment", n=n, mode=mode,
              seconds=med[mode], setup_s=setup[mode],
              repeats=len(times[mode]), speedup_vs_exact=med["exact"] / med[mode],
              model_tokens=int(model_tokens.get(mode, 0)),
              cost_model_ratio=float(model_tokens["exact"] /
                                     model_tokens.get(mode, np.nan)),
              load_average_1min=load))


def agreement_table(rows) -> str:
  """Markdown: per mode and N, 'sign / Spearman' per task and assignment."""
  cols = sorted({(r["task"], r["assignment"]) for r in rows})
  cells = {(r["mode"], r["n"], r["task"], r["assignment"]):
           f"{r['sign_agreement']:.2f} / {r['spearman']:.2f}" for r in rows}
  keys = sorted({(r["mode"], r["n"]) for r in rows})
  lines = ["| mode | N | " + " | ".join(f"{t} {a}" for t, a in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
  for mode, n in keys:
    lines.append(f"| {mode} | {n} | " + " | ".join(
        cells.get((mode, n, t, a), "-") for t, a in cols) + " |")
  return "\n".join(lines)


def timing_table(rows) -> str:
  lines = ["| N | mode | s per U(D) | exact / mode | cost model | load |",
           "|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['n']} | {r['mode']} | {r['seconds']:.2f} | "
                 f"{r['speedup_vs_exact']:.1f}x | "
                 f"{r['cost_model_ratio']:.1f}x | "
                 f"{r['load_average_1min']:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.tables_from:
    with open(FLAGS.tables_from) as f:
      _ROWS.extend(json.loads(line) for line in f)
  else:
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    model = load_model(smollm2_gguf_path())
    words = LabelWords()
    print(f"jax {jax.__version__} devices={jax.devices()} "
          f"load={os.getloadavg()}", flush=True)
    for n in map(int, FLAGS.agree_sizes):
      for task_name in FLAGS.tasks:
        agreement(model, words, task_name, n)
    for n in map(int, FLAGS.floor_sizes):
      for task_name in FLAGS.floor_tasks:
        for context in FLAGS.contexts:
          floor_cell(model, words, task_name, n, context)
    for n in map(int, FLAGS.time_sizes):
      timing(model, words, n)
  agree = [r for r in _ROWS if r["kind"] == "agreement"]
  if agree:
    print("\nsign agreement / Spearman of s_i with exact mode\n" +
          agreement_table(agree))
  floor = [r for r in _ROWS if r["kind"] == "floor"]
  if floor:
    print("\nper claim, agreement of s_i with exact mode: the order-noise "
          "floor (exact, groups shuffled) and each mode\n" + floor_table(floor))
  for r in (r for r in _ROWS if r["kind"] == "ranking"):
    print(f"ranking {r['task']} N={r['n']} {r['context']} {r['mode']}: "
          f"Spearman of P(D) with exact {r['spearman_P']:.2f} over "
          f"{r['labellings']} labellings, gold rank {r['gold_rank']} "
          f"(exact {r['exact_gold_rank']})")
  timed = [r for r in _ROWS if r["kind"] == "timing"]
  if timed:
    print("\n" + timing_table(timed))


if __name__ == "__main__":
  app.run(main)
