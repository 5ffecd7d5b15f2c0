"""Fine-tuning the Llama on (prompt, label) pairs with Optax.

Each example is `header + prompt`; the target is its label word at the next
position, read with the same True/False token sets the ICM scorer uses:
loss = -log sum_{t in set(label)} softmax(logits)[t]. The lm head runs at one
position per row (`logit_positions`), so a step costs one forward/backward of
the prompts plus a [B, V] head.

One jitted step takes [grad_accum_steps, micro_batch, T] arrays, scans over the
micro-batches summing per-row losses and gradients, divides by the number of
real rows and applies one clipped AdamW update. Master weights and optimizer
state stay in the params' dtype (float32 for full fine-tuning; with LoRA the
frozen base keeps its stored dtype and the adapters are float32); the forward
computes in `compute_dtype` (bfloat16 on accelerators). The same code runs on one CPU, on
fake CPU devices and on a TPU pod: params and optimizer state are placed by
LLAMA_RULES, batch rows over ('data', 'fsdp').
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
from tqdm.auto import tqdm

from icm_jax.model import forward, masks
from icm_jax.model.config import LlamaConfig
from icm_jax.sharding import (BATCH_AXES, LLAMA_RULES, MeshConfig,
                              batch_divisor, create_mesh, param_shardings,
                              path_to_str)
from icm_jax.tokenization import ExampleTokens
from icm_jax import storage
from icm_jax.training import data, lora
from icm_jax.metrics_log import MetricsLog
from icm_jax.scoring.common import label_log_probs as word_log_probs
from icm_jax.training.checkpointing import (METRICS_FILE, TrainCheckpoints,
                                           run_fingerprint)
from icm_jax.training.config import TrainConfig

# Optimizer-state leaves the param rules do not cover: optax step counters.
OPT_STATE_RULES = ((r"(^|/)count$", P()),)


@dataclasses.dataclass
class TrainResult:
  """Final params and per-step measurements of one `train` call.

  params: same structure and dtype as the input params (placed like them when
    they were jax.Arrays, else by LLAMA_RULES on the mesh).
    With train.lora_rank > 0 these are the merged W + (alpha/r) B·A, so
    evaluation, iterative labelling and HF export use the adapted model.
  adapters: the LoRA adapters (train.lora_rank > 0), else None.
  steps: optimizer steps the run has completed in total (incl. before resume).
  start_step: the step this call resumed from (0 = fresh start); losses,
    step_seconds and tokens_per_step cover steps start_step+1 .. steps.
  """

  params: Any
  steps: int
  losses: np.ndarray
  step_seconds: np.ndarray
  tokens_per_step: np.ndarray
  start_step: int = 0
  adapters: Any = None

  @property
  def mean_step_seconds(self) -> float:
    """Mean wall time per step, excluding this call's first (compiling) step."""
    if len(self.step_seconds) < 2:
      return float("nan")
    return float(np.mean(self.step_seconds[1:]))

  @property
  def tokens_per_second(self) -> float:
    """Real tokens per second, excluding this call's first (compiling) step."""
    if len(self.step_seconds) < 2:
      return float("nan")
    return float(np.sum(self.tokens_per_step[1:]) /
                 np.sum(self.step_seconds[1:]))


def resolve_compute_dtype(name: str) -> str:
  """"auto" -> bfloat16 on TPU/GPU, float32 on CPU."""
  if name != "auto":
    return name
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def label_log_probs(logits: jax.Array, token_sets) -> jax.Array:
  """[B, 2] log P(False), log P(True) from [B, V] next-token logits, exactly
  as the scorer defines them (log-sum-exp over each label's token set)."""
  return jnp.stack(word_log_probs(logits, token_sets), axis=-1)


def make_optimizer(config: TrainConfig, total_steps: int):
  """(optax transform, learning-rate schedule) for a run of total_steps.

  Weight decay applies to kernels and embeddings, not to RMSNorm scales.
  """
  warmup = min(config.warmup_steps, total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=config.learning_rate * config.end_learning_rate_fraction)

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not path_to_str(path).endswith("scale"), params)

  parts = []
  if config.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def make_train_step(model_config: LlamaConfig, optimizer, token_sets,
                    lora_scale: Optional[float] = None) -> Callable:
  """step(state, opt_state, batch) -> (state, opt_state, metrics).

  state: the params, or with `lora_scale` lora.train_state(params, adapters)
  (only the adapters are differentiated; the optimizer freezes the base).
  batch: dict of [A, M, T] tokens and [A, M] lengths / labels / weights.
  metrics: mean loss and accuracy over real rows, pre-clipping grad norm.
  """
  def micro_batch_loss(params, micro):
    tokens, lengths = micro["tokens"], micro["lengths"]
    rows, length = tokens.shape
    logits = forward(params, tokens, masks.default_positions(rows, length),
                     masks.padded_causal_mask(lengths, length),
                     config=model_config,
                     logit_positions=(lengths - 1)[:, None])[:, 0]
    log_p = label_log_probs(logits, token_sets)  # [M, 2]
    labels = micro["labels"][:, None]
    target = jnp.take_along_axis(log_p, labels, axis=1)[:, 0]
    other = jnp.take_along_axis(log_p, 1 - labels, axis=1)[:, 0]
    real = micro["weights"] > 0
    loss_sum = -jnp.sum(jnp.where(real, target * micro["weights"], 0.0))
    correct = jnp.sum(jnp.where(real & (target > other), micro["weights"], 0.0))
    return loss_sum, correct

  if lora_scale is None:
    trainable_loss = lambda params, _, micro: micro_batch_loss(params, micro)
    split = lambda state: (state, None)
    join = lambda trainable, _: trainable
  else:
    def trainable_loss(adapters, base, micro):
      merged = lora.merge(base, adapters, lora_scale,
                          model_config.compute_dtype)
      return micro_batch_loss(merged, micro)
    split = lambda state: (state[lora.ADAPTERS], state[lora.BASE])
    # The frozen base is handed back as it came (the donated buffer aliases
    # the output): no base-sized gradient, update or rewrite.
    join = lambda adapters, base: lora.train_state(base, adapters)
  grad_fn = jax.value_and_grad(trainable_loss, has_aux=True)

  def step(state, opt_state, batch):
    trainable, frozen = split(state)

    def accumulate(carry, micro):
      loss_sum, correct, grads = carry
      (loss, right), g = grad_fn(trainable, frozen, micro)
      return (loss_sum + loss, correct + right,
              jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    start = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, correct, grads), _ = jax.lax.scan(accumulate, start, batch)
    rows = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    grads = jax.tree.map(lambda g: g / rows.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    state = join(optax.apply_updates(trainable, updates), frozen)
    metrics = {"loss": loss_sum / rows, "accuracy": correct / rows,
               "grad_norm": grad_norm}
    return state, opt_state, metrics

  return step


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


BATCH_FIELDS = {"tokens": jnp.int32, "lengths": jnp.int32,
                "labels": jnp.int32, "weights": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ShardedTrainStep:
  """The jitted optimizer step of `train()`, with everything it is placed by.

  fn(state, opt_state, batch) -> (state, opt_state, metrics); state and
  opt_state are donated. The state is the params, or with LoRA
  lora.train_state(params, adapters). `abstract_*` are ShapeDtypeStructs with
  shardings, so the step can also be lowered with no arrays at all
  (icm_jax.aot); abstract_params is the state's.
  """

  fn: Any
  forward_config: LlamaConfig
  optimizer: Any
  schedule: Any
  abstract_params: Any
  abstract_opt_state: Any
  batch_shardings: dict
  lora_scale: Optional[float] = None

  def trainable(self, state):
    """What the optimizer updates and a checkpoint keeps: the params, or with
    LoRA the adapters only (the frozen base is the caller's and is not
    rewritten every save)."""
    return state if self.lora_scale is None else state[lora.ADAPTERS]

  def init_opt_state(self, state):
    """The optimizer state of `state` (of its trainable part), placed."""
    return jax.jit(lambda s: self.optimizer.init(self.trainable(s)),
                   out_shardings=jax.tree.map(lambda x: x.sharding,
                                              self.abstract_opt_state))(state)

  def abstract_batch(self, config: TrainConfig, seq_len: int) -> dict:
    """[grad_accum_steps, micro_batch(, seq_len)] batch arrays of one step."""
    rows = (config.grad_accum_steps, config.micro_batch_size)
    return {name: jax.ShapeDtypeStruct(
                rows + ((seq_len,) if name == "tokens" else ()), dtype,
                sharding=self.batch_shardings[name])
            for name, dtype in BATCH_FIELDS.items()}


def sharded_train_step(model_config: LlamaConfig, param_shapes, config:
                       TrainConfig, total_steps: int, mesh, token_sets,
                       compute_dtype: str) -> ShardedTrainStep:
  """Builds the step for params shaped like `param_shapes` on `mesh`."""
  divisor = batch_divisor(mesh)
  if config.micro_batch_size % divisor:
    raise ValueError(
        f"train.batch_size={config.batch_size} / train.grad_accum_steps="
        f"{config.grad_accum_steps} = {config.micro_batch_size} rows per "
        f"micro-batch must be a multiple of the mesh's data*fsdp={divisor}")
  forward_config = dataclasses.replace(model_config, dtype=compute_dtype,
                                       remat=config.remat)
  optimizer, schedule = make_optimizer(config, total_steps)
  shapes = _abstract(param_shapes)
  rules, lora_scale = LLAMA_RULES, None
  if config.lora_rank:
    adapters = jax.eval_shape(
        lambda: lora.init_adapters(shapes, config.lora_rank,
                                   jax.random.key(0)))
    shapes = lora.train_state(shapes, adapters)
    rules = tuple(LLAMA_RULES) + lora.adapter_rules()
    lora_scale = lora.scale_of(config.lora_rank, config.lora_alpha)
  p_shardings = param_shardings(shapes, mesh, rules)
  opt_shapes = jax.eval_shape(
      optimizer.init, shapes if lora_scale is None else shapes[lora.ADAPTERS])
  o_shardings = param_shardings(opt_shapes, mesh,
                                tuple(rules) + OPT_STATE_RULES)
  batch_shardings = {name: _row_sharding(mesh, 3 if name == "tokens" else 2)
                     for name in BATCH_FIELDS}
  fn = jax.jit(
      make_train_step(forward_config, optimizer, token_sets, lora_scale),
      in_shardings=(p_shardings, o_shardings, batch_shardings),
      out_shardings=(p_shardings, o_shardings, NamedSharding(mesh, P())),
      donate_argnums=(0, 1))
  return ShardedTrainStep(fn, forward_config, optimizer, schedule,
                          _abstract(shapes, p_shardings),
                          _abstract(opt_shapes, o_shardings), batch_shardings,
                          lora_scale)


def _place_like_input(params, input_params):
  """Moves params back to the input's shardings if it had other ones."""
  leaves = jax.tree.leaves(input_params)
  if not all(isinstance(x, jax.Array) for x in leaves):
    return params
  same = all(a.sharding.is_equivalent_to(b.sharding, a.ndim)
             for a, b in zip(jax.tree.leaves(params), leaves))
  if same:
    return params
  return jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                             input_params))


def _row_sharding(mesh, ndim: int) -> NamedSharding:
  """[grad_accum_steps, micro_batch, ...] arrays: rows over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def _is_checkpoint_step(done: int, total: int, every: int) -> bool:
  return done == total or (every > 0 and done % every == 0)


def train(model_config: LlamaConfig, params, examples: ExampleTokens,
          labels: np.ndarray, config: TrainConfig, *, mesh=None,
          workdir: Optional[str] = None,
          metrics_callback: Optional[Callable[[int, dict], None]] = None,
          progress: bool = True) -> TrainResult:
  """Fine-tunes `params` on examples labelled `labels` (0 False, 1 True).

  mesh: the ('data', 'fsdp', 'tensor') mesh; None = one device. Batch rows are
    split over data*fsdp, so batch_size / grad_accum_steps must divide by it.
  workdir: orbax checkpoints + train_state.json + train_metrics.jsonl; an
    existing checkpoint of the same run is resumed (bit-equal to a run never
    interrupted), one of a different run is refused. None = no files.
  metrics_callback(step, record): called after each optimizer step (1-based)
    with the record written to train_metrics.jsonl (step, loss, accuracy,
    learning_rate, grad_norm, seconds, tokens, examples, seq_len).
  The input params are copied, never donated, so the caller keeps them.
  """
  labels = data.check_labels(examples, labels)
  max_len = model_config.max_position_embeddings
  data.check_lengths(examples, max_len)
  if mesh is None:
    mesh = create_mesh(MeshConfig(1, 1, 1), devices=[jax.devices()[0]])
  num_examples = examples.num_examples
  total_steps = data.num_steps(num_examples, config.num_epochs,
                               config.batch_size)
  compute_dtype = resolve_compute_dtype(config.compute_dtype)
  sharded = sharded_train_step(model_config, _abstract(params), config,
                               total_steps, mesh, examples.label_token_sets,
                               compute_dtype)
  step_fn, schedule = sharded.fn, sharded.schedule
  p_shardings = jax.tree.map(lambda x: x.sharding, sharded.abstract_params)
  o_shardings = jax.tree.map(lambda x: x.sharding, sharded.abstract_opt_state)
  batch_shardings = sharded.batch_shardings
  input_params = params
  base_shardings = (p_shardings if sharded.lora_scale is None else
                    p_shardings[lora.BASE])

  def with_base(trainable):
    """The train state around `trainable` (a copy of the caller's base: the
    step donates its state, and the caller keeps theirs)."""
    base = jax.device_put(input_params, base_shardings, may_alias=False)
    if sharded.lora_scale is None:
      return base
    if trainable is None:
      trainable = jax.jit(
          lora.init_adapters, static_argnums=1,
          out_shardings=p_shardings[lora.ADAPTERS])(
              base, config.lora_rank, jax.random.key(config.seed))
    return lora.train_state(base, trainable)

  checkpoints = None
  if workdir is not None:
    checkpoints = TrainCheckpoints(
        workdir, run_fingerprint(config, model_config, compute_dtype,
                                 examples, labels), config.keep_checkpoints)
  losses, seconds, tokens = [], [], []
  start_step = 0
  try:
    with jax.set_mesh(mesh):
      latest = None if checkpoints is None else checkpoints.latest_step()
      if latest is not None:
        if latest > total_steps:
          raise ValueError(f"{workdir}: latest checkpoint is step {latest}, "
                           f"but this run has only {total_steps} steps")
        trainable, opt_state = checkpoints.restore(
            latest, sharded.trainable(sharded.abstract_params),
            sharded.abstract_opt_state)
        state = (trainable if sharded.lora_scale is None else
                 with_base(trainable))
        start_step = latest
        logging.info("train: resumed from step %d of %d in %s", latest,
                     total_steps, workdir)
      else:
        state = with_base(None)
        opt_state = sharded.init_opt_state(state)

      metrics_log = None
      if workdir is not None and jax.process_index() == 0:
        metrics_log = MetricsLog(storage.join(workdir, METRICS_FILE),
                                 resume=start_step, key="step")
      bar = tqdm(total=total_steps, initial=start_step, desc="train",
                 disable=not progress)
      try:
        for step in range(start_step, total_steps):
          began = time.perf_counter()
          indices = data.step_example_indices(
              step, num_examples, config.num_epochs, config.batch_size,
              config.seed)
          host = data.build_batch(examples, labels, indices,
                                  config.grad_accum_steps, config.min_seq_len,
                                  max_len)
          batch = {name: jax.make_array_from_callback(
                       value.shape, batch_shardings[name],
                       lambda index, value=value: value[index])
                   for name, value in host.arrays().items()}
          state, opt_state, metrics = step_fn(state, opt_state, batch)
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - began
          done = step + 1
          record = {
              "step": done,
              "loss": float(metrics["loss"]),
              "accuracy": float(metrics["accuracy"]),
              "learning_rate": float(schedule(step)),
              "grad_norm": float(metrics["grad_norm"]),
              "seconds": elapsed,
              "tokens": host.num_tokens,
              "examples": int(np.sum(host.weights > 0)),
              "seq_len": int(host.tokens.shape[-1]),
          }
          losses.append(record["loss"])
          seconds.append(elapsed)
          tokens.append(host.num_tokens)
          if metrics_log is not None:
            metrics_log.write(record)
          if checkpoints is not None and _is_checkpoint_step(
              done, total_steps, config.checkpoint_every):
            checkpoints.save(done, sharded.trainable(state), opt_state)
          if done % config.log_every == 0 or done == total_steps:
            logging.info("train step %d/%d: loss %.4f acc %.3f lr %.3g "
                         "grad_norm %.3g %.3fs %d tokens", done, total_steps,
                         record["loss"], record["accuracy"],
                         record["learning_rate"], record["grad_norm"],
                         elapsed, host.num_tokens)
          bar.update(1)
          bar.set_postfix(loss=f"{record['loss']:.4f}")
          if metrics_callback is not None:
            metrics_callback(done, record)
      finally:
        bar.close()
        if metrics_log is not None:
          metrics_log.close()
  finally:
    if checkpoints is not None:
      checkpoints.close()

  adapters = None
  if sharded.lora_scale is None:
    params = state
  else:
    adapters = state[lora.ADAPTERS]
    with jax.set_mesh(mesh):
      params = jax.jit(lora.merge, static_argnums=2,
                       out_shardings=base_shardings)(
                           state[lora.BASE], adapters, sharded.lora_scale)
  return TrainResult(params=_place_like_input(params, input_params),
                     steps=total_steps,
                     losses=np.asarray(losses, np.float64),
                     step_seconds=np.asarray(seconds, np.float64),
                     tokens_per_step=np.asarray(tokens, np.int64),
                     start_step=start_step, adapters=adapters)
