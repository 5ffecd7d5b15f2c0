r"""Fast LOO modes against exact LOO: agreement of s_i and seconds per U(D).

  python experiments/bench_loo_modes.py [--agree_sizes=16,32,64]
      [--time_sizes=16,32,64,128] [--out=experiments/bench_loo_modes.jsonl]
  python experiments/bench_loo_modes.py --tables_from=FILE.jsonl  # tables only

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
  path = (FLAGS.truthfulqa if name == "truthfulqa"
          else bundled_path("sentiment", "train"))
  return task, load_examples(task, path)


def mode_config(mode: str) -> ScoringConfig:
  if mode.startswith("lobo_"):
    return ScoringConfig("exact", context="leave_block_out",
                         blocks=int(mode.split("_")[1]))
  return ScoringConfig(mode.split("_")[0])


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
    for n in map(int, FLAGS.time_sizes):
      timing(model, words, n)
  agree = [r for r in _ROWS if r["kind"] == "agreement"]
  if agree:
    print("\nsign agreement / Spearman of s_i with exact mode\n" +
          agreement_table(agree))
  timed = [r for r in _ROWS if r["kind"] == "timing"]
  if timed:
    print("\n" + timing_table(timed))


if __name__ == "__main__":
  app.run(main)
