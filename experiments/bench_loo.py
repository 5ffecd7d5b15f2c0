"""LOO scoring benchmark: transformers per-prompt baseline vs our two modes.

One full evaluation = the N leave-one-out scores of N labelled TruthfulQA
claims (gold labels), SmolLM2-135M-Instruct (GGUF, float32) on this machine:

  (a) transformers PyTorch, one forward per LOO prompt (SDPA attention),
  (b) icm-jax exact mode (one jitted call),
  (c) icm-jax parallel mode (one-pass LOO, demo KV cache built once).

Timings are medians of interleaved repeats, compile/cache-build time excluded
and reported separately. Also prints how far parallel is from exact (Spearman
of s_i, sign agreement).

    python experiments/bench_loo.py --sizes 8,16,32,64 --torch_max 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from icm_jax.checkpoints import load_model, smollm2_gguf_path  # noqa: E402
from icm_jax.scoring import LOOScorer, ScoringConfig  # noqa: E402
from icm_jax.tasks.templates import TRUTHFULQA  # noqa: E402
from icm_jax.tokenization import LabelWords, tokenize_examples  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def spearman(a, b):
  ra = np.argsort(np.argsort(a)).astype(float)
  rb = np.argsort(np.argsort(b)).astype(float)
  return float(np.corrcoef(ra, rb)[0, 1])


class TorchBaseline:
  """What a user would write: one transformers forward per LOO prompt."""

  def __init__(self, gguf, tokenizer, token_sets):
    import torch
    import transformers
    directory, name = os.path.split(gguf)
    self.torch = torch
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32,
        attn_implementation="sdpa").eval()
    self.tok = tokenizer
    self.sets = [torch.as_tensor(s, dtype=torch.long) for s in token_sets]

  def evaluate(self, prompts, labels, words):
    out = []
    with self.torch.inference_mode():
      for i in range(len(prompts)):
        text = "".join(prompts[j] + (words.true if labels[j] else words.false)
                       + "\n\n" for j in range(len(prompts)) if j != i)
        ids = self.tok(text + prompts[i], add_special_tokens=False)["input_ids"]
        logits = self.model(self.torch.tensor([ids])).logits[0, -1]
        logp = self.torch.log_softmax(logits.float(), -1)
        lf, lt = (self.torch.logsumexp(logp[s], 0).item() for s in self.sets)
        out.append(lt - lf)
    return np.array(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gguf", default=None)
  parser.add_argument("--data", default=os.path.join(
      HERE, "..", "..", "shared", "data", "icm", "test_truthfulqa.json"))
  parser.add_argument("--sizes", default="8,16,32,64")
  parser.add_argument("--torch_max", type=int, default=32,
                      help="largest N for the (slow) per-prompt baseline")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rows_per_chunk", type=int, default=8)
  parser.add_argument("--exact_warm_max", type=int, default=32,
                      help="above this N, exact mode is timed once, compile "
                      "included")
  parser.add_argument("--unshared", action="store_true",
                      help="also time exact mode without prefix sharing")
  parser.add_argument("--json", default=None, help="write results here")
  args = parser.parse_args()
  gguf = args.gguf or smollm2_gguf_path()
  sizes = [int(s) for s in args.sizes.split(",")]

  with open(args.data) as f:
    records = json.load(f)
  model = load_model(gguf)
  words = LabelWords()
  torch_baseline = None
  print(f"jax {jax.__version__} devices={jax.devices()}")
  rows = []
  for n in sizes:
    recs = records[:n]
    prompts = [TRUTHFULQA.format(**r) for r in recs]
    labels = np.array([int(bool(r["label"])) for r in recs], np.int32)
    pieces = tokenize_examples(model.tokenizer, prompts, words=words)
    if torch_baseline is None and n <= args.torch_max:
      torch_baseline = TorchBaseline(gguf, model.tokenizer,
                                     pieces.label_token_sets)
    runners, setup = {}, {}
    modes = {"exact": ScoringConfig("exact", rows_per_chunk=args.rows_per_chunk),
             "parallel": ScoringConfig("parallel",
                                       rows_per_chunk=args.rows_per_chunk)}
    if args.unshared:
      modes["exact_unshared"] = ScoringConfig(
          "exact", rows_per_chunk=args.rows_per_chunk, prefix_sharing=False)
    single_shot = {}
    for mode, scoring_config in modes.items():
      t0 = time.perf_counter()
      scorer = LOOScorer(model.config, model.params, pieces, scoring_config)
      runners[mode] = (lambda sc=scorer: sc.score(labels).s)
      if mode.startswith("exact") and n > args.exact_warm_max:
        # Too slow to run twice: one timed call, compilation included (this
        # overstates exact mode's time, so (b)/(c) ratios are conservative).
        single_shot[mode] = runners[mode]()
        setup[mode] = time.perf_counter() - t0
        continue
      scorer.score(labels)  # compile (+ demo cache) excluded from timings
      setup[mode] = time.perf_counter() - t0
    if n <= args.torch_max:
      runners["torch"] = lambda: torch_baseline.evaluate(prompts, labels, words)
    times = {k: [] for k in ("torch", "exact_unshared", "exact", "parallel")
             if k in runners}
    results = dict(single_shot)
    for mode in single_shot:
      times[mode] = [setup[mode]]
    for _ in range(args.repeats):  # interleaved
      for k in times:
        if k in single_shot:
          continue
        t0 = time.perf_counter()
        results[k] = runners[k]()
        times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Tokens in the N LOO prompts: every demo appears in N-1 of them.
    tokens = int((n - 1) * sum(pieces.demo_length(j) for j in range(n)) +
                 pieces.prompt_lengths.sum())
    row = dict(n=n, loo_tokens=tokens, setup_exact_s=setup["exact"],
               setup_parallel_s=setup["parallel"],
               **{f"{k}_s": v for k, v in med.items()})
    if "torch" in med:
      row["exact_speedup_vs_torch"] = med["torch"] / med["exact"]
      row["max_abs_diff_exact_vs_torch"] = float(
          np.abs(results["exact"] - results["torch"]).max())
    if "exact_unshared" in med:
      row["prefix_sharing_speedup"] = med["exact_unshared"] / med["exact"]
      row["max_abs_diff_shared_vs_unshared"] = float(
          np.abs(results["exact"] - results["exact_unshared"]).max())
    row["parallel_speedup_vs_exact"] = med["exact"] / med["parallel"]
    row["spearman_parallel_exact"] = spearman(results["parallel"], results["exact"])
    row["sign_agreement_parallel_exact"] = float(
        np.mean(np.sign(results["parallel"]) == np.sign(results["exact"])))
    rows.append(row)
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                      for k, v in row.items()}), flush=True)

  print("\n| N | LOO tokens | (a) torch per-prompt s | exact, no prefix "
        "sharing s | (b) exact s | (c) parallel s | (a)/(b) | (b)/(c) | "
        "spearman (c)~(b) | sign agree |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    fmt = lambda k, f="{:.3f}": f.format(r[k]) if k in r else "-"
    print(f"| {r['n']} | {r['loo_tokens']} | {fmt('torch_s')} | "
          f"{fmt('exact_unshared_s')} | {fmt('exact_s')} "
          f"| {fmt('parallel_s')} | {fmt('exact_speedup_vs_torch', '{:.2f}x')} | "
          f"{fmt('parallel_speedup_vs_exact', '{:.1f}x')} | "
          f"{fmt('spearman_parallel_exact', '{:.3f}')} | "
          f"{fmt('sign_agreement_parallel_exact', '{:.2f}')} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
