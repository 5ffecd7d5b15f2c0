"""Forward throughput: our jitted JAX Llama vs transformers' PyTorch Llama (CPU).

Builds a SmolLM2-135M-shaped Llama with random weights (speed does not depend on
the values, so no checkpoint is needed), copies the same weights into
`transformers.LlamaForCausalLM` (SDPA attention), checks that both produce the
same logits, then times one full forward (float32 logits [B, T, V]) of each,
alternating JAX and PyTorch runs so that machine noise hits both alike.

  python experiments/bench_forward.py                  # 1 x 2048 tokens, fp32
  python experiments/bench_forward.py --seq-len 512 --repeats 3
  python experiments/bench_forward.py --config attention_block_size=256
  python experiments/bench_forward.py --xla-flags="--xla_cpu_experimental_ynn_fusion_type="
  python experiments/bench_forward.py --jax-impl package --jax-impl my_variant.py:forward

`--jax-impl FILE.py:FN` times an alternative forward side by side with the
package one; FN must have the signature of `icm_jax.model.forward`
(params, tokens, positions, attention_mask, *, config).

Timings are only comparable when nothing else runs: on a shared machine both
sides slow down, PyTorch's OpenMP threads far more than XLA's, so the ratio
flatters JAX. The script prints the load average; 'cpu s' (process CPU time)
is less sensitive to other load than wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5,
                 help="timed forwards per implementation (interleaved)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed forwards per implementation after compilation")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute and parameter dtype of both models")
  p.add_argument("--model", default="smollm2-135m", choices=sorted(_SHAPES),
                 help="model shape (random weights)")
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: CPUs this process may use)")
  p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                 help="override a LlamaConfig field of the JAX model, e.g. "
                      "attention_block_size=256 (repeatable)")
  p.add_argument("--xla-flags", default="",
                 help="extra XLA_FLAGS, appended before jax is imported")
  p.add_argument("--jax-impl", action="append", default=None, metavar="SPEC",
                 help="'package' (icm_jax.model.forward) or FILE.py:FN; "
                      "repeatable, default: package")
  p.add_argument("--no-torch", action="store_true",
                 help="time only the JAX implementation(s)")
  p.add_argument("--no-check", action="store_true",
                 help="skip the logits comparison")
  p.add_argument("--atol", type=float, default=None,
                 help="max |logits_jax - logits_torch| allowed by the check "
                      "(default 1e-3 for float32, 0.1 for bfloat16)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gguf", default=None,
                 help="(not implemented yet) take shape and weights from a GGUF")
  return p.parse_args(argv)


# Llama shapes, as LlamaConfig keyword arguments.
_SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rope_theta=1e5,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    # Tiny shape for a quick smoke run of the script itself.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=True,
                 max_position_embeddings=8192),
}


def _usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _load_impl(spec: str):
  """'package' -> icm_jax.model.forward; 'path/to/file.py:fn' -> that fn."""
  if spec == "package":
    from icm_jax.model import forward
    return forward
  path, _, fn = spec.rpartition(":")
  if not path or not fn:
    raise SystemExit(f"--jax-impl {spec!r}: expected 'package' or FILE.py:FN")
  name = "_bench_impl_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return getattr(module, fn)


def _torch_model(config, params, dtype_name: str):
  """transformers LlamaForCausalLM (SDPA) holding the same weights as params."""
  import numpy as np
  import torch
  import transformers

  hf_config = transformers.LlamaConfig.from_dict(config.to_hf_config())
  hf_config._attn_implementation = "sdpa"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  model = transformers.LlamaForCausalLM(hf_config).to(torch_dtype).eval()
  assert model.config._attn_implementation == "sdpa"

  def t(x, transpose=False):
    x = np.asarray(x, np.float32)
    if transpose:
      x = x.T
    # A writable C-contiguous copy (jax's host buffers are read-only).
    return torch.from_numpy(np.array(x, order="C", copy=True)).to(torch_dtype)

  state = {"model.embed_tokens.weight": t(params["embed_tokens"]["embedding"]),
           "model.norm.weight": t(params["norm"]["scale"])}
  layers = params["layers"]
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
      for name in names:
        state[f"{pre}{block}.{name}.weight"] = t(
            layers[block][name]["kernel"][i], transpose=True)
    for name in ("input_layernorm", "post_attention_layernorm"):
      state[f"{pre}{name}.weight"] = t(layers[name]["scale"][i])
  if config.tie_word_embeddings:
    assert model.lm_head.weight is model.model.embed_tokens.weight
  else:
    state["lm_head.weight"] = t(params["lm_head"]["kernel"], transpose=True)
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [m for m in missing if not (config.tie_word_embeddings and
                                        m == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"weight copy: missing {missing}, unexpected {unexpected}")
  return model


def main(argv=None):
  args = _parse_args(argv)
  if args.atol is None:
    args.atol = 1e-3 if args.dtype == "float32" else 0.1
  if args.gguf:
    raise SystemExit("--gguf is not implemented yet; the benchmark uses random "
                     "weights of the --model shape")
  # XLA reads XLA_FLAGS once, when jax initialises its backend.
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               args.xla_flags).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import jax.numpy as jnp
  import numpy as np

  from icm_jax.model import LlamaConfig, init_params, masks

  threads = args.threads or _usable_cpus()
  torch = None
  if not (args.no_torch and args.no_check):
    import torch
    torch.set_num_threads(threads)

  config = LlamaConfig(**_SHAPES[args.model], dtype=args.dtype,
                       param_dtype=args.dtype)
  overrides = {}
  for item in args.config:
    key, sep, value = item.partition("=")
    if not sep or not hasattr(config, key):
      raise SystemExit(f"--config {item!r}: expected FIELD=VALUE with a "
                       "LlamaConfig field")
    current = getattr(config, key)
    if isinstance(current, bool):
      overrides[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(current, (int, float)):
      overrides[key] = type(current)(value)
    else:
      overrides[key] = value
  config = config.replace(**overrides)
  batch, length = args.batch, args.seq_len
  if length > config.max_position_embeddings:
    config = config.replace(max_position_embeddings=length)
  tokens_np = np.random.default_rng(args.seed).integers(
      0, config.vocab_size, (batch, length), dtype=np.int32)

  print(f"python {platform.python_version()}  jax {jax.__version__}  "
        f"backend {jax.default_backend()}  devices {jax.devices()}")
  print(f"cpus: os.cpu_count()={os.cpu_count()}  usable={_usable_cpus()}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if var in os.environ:
      print(f"{var}={os.environ[var]}")
  if torch is not None:
    import transformers
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  "
          f"torch.get_num_threads()={torch.get_num_threads()}  "
          f"get_num_interop_threads()={torch.get_num_interop_threads()}  "
          f"mkldnn={torch.backends.mkldnn.is_available()}")
  print(f"load average at start: {os.getloadavg()[0]:.1f} "
        f"(> {threads} means other processes compete for the CPUs)")
  if overrides:
    print(f"LlamaConfig overrides: {overrides}")
  print(f"model {args.model}: {config.num_params() / 1e6:.1f}M params, "
        f"{config.num_layers} layers, dtype {args.dtype}, attention_block_size="
        f"{getattr(config, 'attention_block_size', 'n/a')}; input {batch}x{length}; "
        f"logits [{batch}, {length}, {config.vocab_size}] float32")

  params = init_params(config, jax.random.key(args.seed))
  params = jax.tree.map(lambda x: x.block_until_ready(), params)

  # name -> zero-argument callable returning host-side (materialised) logits.
  runners = {}
  specs = args.jax_impl or ["package"]
  tokens = jnp.asarray(tokens_np)
  for spec in specs:
    impl = _load_impl(spec)

    def jax_forward(params, tokens, impl=impl):
      b, t = tokens.shape
      # Built inside jit, as callers of the package do (masks.py).
      return impl(params, tokens, masks.default_positions(b, t),
                  masks.causal_mask(b, t), config=config)

    compiled_fn = jax.jit(jax_forward)
    t0 = time.perf_counter()
    compiled = compiled_fn.lower(params, tokens).compile()
    label = f"jax[{os.path.basename(spec)}]"
    print(f"{label} compile: {time.perf_counter() - t0:.1f}s")
    runners[label] = (
        lambda compiled=compiled: compiled(params, tokens).block_until_ready())

  if torch is not None:
    model = _torch_model(config, params, args.dtype)
    torch_tokens = torch.from_numpy(tokens_np.astype(np.int64))

    def torch_forward():
      with torch.inference_mode():
        # attention_mask=None: causal, SDPA gets is_causal=True.
        return model(input_ids=torch_tokens, use_cache=False,
                     logits_to_keep=0).logits.float()

    if not args.no_torch:
      runners["torch"] = torch_forward

  if not args.no_check:
    reference = torch_forward().numpy()
    for name, run in runners.items():
      if name == "torch":
        continue
      logits = np.asarray(run(), np.float32)
      diff = float(np.max(np.abs(logits - reference)))
      scale = float(np.max(np.abs(reference)))
      status = "ok" if diff <= args.atol else "MISMATCH"
      print(f"check {name} vs torch: max|diff|={diff:.2e} "
            f"(max|logit|={scale:.2e}, atol {args.atol:g}) {status}")
      if diff > args.atol:
        raise SystemExit(f"{name}: logits differ from torch by {diff:.2e}")
    del reference

  for _ in range(args.warmup):
    for run in runners.values():
      run()

  times = {name: [] for name in runners}
  cpu_times = {name: [] for name in runners}
  names = list(runners)
  for rep in range(args.repeats):
    # Alternate the order each round so neither side always runs first.
    order = names if rep % 2 == 0 else names[::-1]
    for name in order:
      c0, t0 = time.process_time(), time.perf_counter()
      out = runners[name]()
      times[name].append(time.perf_counter() - t0)
      cpu_times[name].append(time.process_time() - c0)
      del out
    print(f"round {rep + 1}/{args.repeats}: " + "  ".join(
        f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)

  n_tokens = batch * length
  print()
  print(f"{'implementation':<40} {'median s':>9} {'min s':>8} {'tokens/s':>9}"
        f" {'vs torch':>9} {'cpu s':>7}")
  torch_median = statistics.median(times["torch"]) if "torch" in times else None
  for name in names:
    med = statistics.median(times[name])
    ratio = f"{med / torch_median:9.2f}" if torch_median else f"{'-':>9}"
    print(f"{name:<40} {med:9.3f} {min(times[name]):8.3f} "
          f"{n_tokens / med:9.0f} {ratio} {statistics.median(cpu_times[name]):7.2f}")
  if torch_median:
    print("(vs torch = median wall time / torch median wall time; < 1 means "
          "faster than PyTorch. cpu s = median process CPU time, all threads.)")
  if os.getloadavg()[0] > threads + 0.5:
    print(f"WARNING: load average {os.getloadavg()[0]:.1f} > {threads} threads: "
          "other processes share the CPUs, absolute times are inflated")


if __name__ == "__main__":
  main()
