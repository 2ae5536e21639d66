"""The per-device training and evaluation steps.

Each function sees only its device's slice of the batch and talks to the other
devices through collectives on the axis "data". The same functions run under
both backends (jaxddp.parallel): shard_map, where the state is replicated, and
pmap, where each device holds a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxddp import losses
from jaxddp.losses import LossFn
from jaxddp.optim import LearningRate
from jaxddp.pruning.tables import ExampleTables
from jaxddp.sparsity import Sparsity
from jaxddp.state import TrainState, step_rngs

AXIS = "data"


def per_device(tree):
  """Marks replicated values as per-device (parameters before differentiating, and the
  starting values of the accumulation loop's carry, which becomes per-device).

  Under shard_map (which tracks which values vary across devices), the gradient
  of a per-device loss with respect to a replicated parameter comes back already
  summed over devices. Casting the parameters to "varying" first gives each
  device its own gradient, as pmap does, and the explicit pmean below averages
  them: the same semantics on both backends.
  """
  return jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to="varying"), tree)


def _local_sums(logits, labels, weights, loss_fn: LossFn) -> dict[str, jnp.ndarray]:
  """(sum, count) pairs over this device's examples."""
  losses = loss_fn(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
          "count": jnp.sum(weights)}


def gather_batch(x: jnp.ndarray) -> jnp.ndarray:
  """This device's slice of the batch -> the whole global batch, on every device, in
  order (device 0's examples first). A psum of zeros with this device's values in
  its place: exact, and replicated as far as shard_map can tell (an all_gather's
  result counts as per-device)."""
  size = x.shape[0]
  whole = jnp.zeros((size * jax.lax.psum(1, AXIS), *x.shape[1:]), x.dtype)
  whole = jax.lax.dynamic_update_slice_in_dim(whole, x, jax.lax.axis_index(AXIS) * size, 0)
  return jax.lax.psum(whole, AXIS)


def train_step(state: TrainState, batch: dict, *, learning_rate: LearningRate,
               train_loss: LossFn = losses.cross_entropy,
               eval_loss: LossFn = losses.cross_entropy, accumulation_steps: int = 1,
               sparsity: Sparsity | None = None,
               tables: ExampleTables = ExampleTables()) -> tuple[TrainState, dict]:
  """One optimizer update from this device's slice of the (effective) global batch.

  The model minimises the mean of train_loss over the examples; the reported loss is
  eval_loss's (they differ only with label smoothing). The gradients, batch-norm
  statistics and metrics come from `_gradients` (accumulation, random streams).

  With `sparsity`, the weight masks are first recomputed if this is one of the
  schedule's update steps (from the replicated weights: the same on every device),
  and the step's FLOPs are added to state.train_flops.

  Data pruning (jaxddp.pruning) keeps per-example `tables` in state.examples, indexed by
  batch["index"]: each example's loss may be weighted, and the tables are updated from
  the whole global batch. The learning rate is `learning_rate(state)` (jaxddp.optim).
  """
  if sparsity is not None:
    state = sparsity.update(state)
  grads, batch_stats, metrics, per_example, correct = _gradients(
      state, batch, train_loss, eval_loss, accumulation_steps, tables)
  if state.examples:
    state = state.replace(examples=tables.update(
        state.examples, gather_batch(batch["index"]), gather_batch(per_example),
        gather_batch(correct)))
  metrics["learning_rate"] = learning_rate(state)
  state = learning_rate.into_optimizer(state, metrics["learning_rate"])
  if sparsity is not None:
    metrics["flops"] = jnp.asarray(sparsity.train_step_flops(state.masks), jnp.float32)
    state = state.add_flops(metrics["flops"])
    metrics["train_flops_high"], metrics["train_flops_low"] = state.train_flops
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  # A finite loss can still be followed by an overflowing update, or by running
  # statistics that overflow (a variance of activations near 1e19): check the result too.
  finite = [jnp.all(jnp.isfinite(p))
            for p in jax.tree.leaves((state.params, state.batch_stats))]
  metrics["params_finite"] = jnp.all(jnp.stack(finite)).astype(jnp.float32)
  return state, metrics


def _gradients(state: TrainState, batch: dict, train_loss: LossFn, eval_loss: LossFn,
               accumulation_steps: int, tables: ExampleTables):
  """(gradients, batch statistics, metric sums, per-example losses, correctness) of this
  device's slice, the first three averaged or summed over the devices.

  With accumulation_steps = k the slice is split into k consecutive micro-batches,
  run one after another (a scan: the memory of one micro-batch); their gradients
  are averaged, so the update equals one step on the whole effective batch for a
  model without batch-dependent layers. Batch-norm statistics update after each
  micro-batch, as they would over k separate steps. The model's random streams
  (dropout, ...) draw from keys of (state.rng, step, device, micro-batch):
  jaxddp.state.step_rngs.
  """
  params = per_device(state.params)
  device = jax.lax.axis_index(AXIS)

  def loss_fn(params, batch_stats, micro_batch, micro_index):
    variables = {**state.variables(params), "batch_stats": batch_stats}
    logits, updates = state.apply_fn(variables, micro_batch["x"], train=True,
                                     mutable=["batch_stats"],
                                     rngs=step_rngs(state.rng, state.step, device, micro_index))
    per_example = train_loss(logits, micro_batch["y"])
    weights = tables.weights(state.examples, micro_batch["index"]) if state.examples else None
    weighted = per_example if weights is None else per_example * weights
    return weighted.mean(), (logits, updates["batch_stats"], per_example)

  def micro_step(carry, micro):
    micro_batch, micro_index = micro
    grads_sum, batch_stats, sums = carry
    (_, (logits, batch_stats, per_example)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, micro_batch, micro_index)
    local = _local_sums(logits, micro_batch["y"], jnp.ones_like(micro_batch["y"], jnp.float32),
                        eval_loss)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    correct = (jnp.argmax(logits, axis=-1) == micro_batch["y"]).astype(jnp.float32)
    return (add(grads_sum, grads), batch_stats, add(sums, local)), (per_example, correct)

  micro_batches = jax.tree.map(
      lambda x: x.reshape(accumulation_steps, x.shape[0] // accumulation_steps, *x.shape[1:]),
      batch)
  zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")}
  # The scan's carry must keep its type: per-device ("varying") from the start.
  carry = (jax.tree.map(jnp.zeros_like, params), per_device(state.batch_stats),
           per_device(zero_sums))
  if accumulation_steps == 1:  # no loop: XLA optimises a plain step better than a scan of one
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (grads, batch_stats, sums), (per_example, correct) = micro_step(carry, (first, 0))
  else:
    (grads, batch_stats, sums), (per_example, correct) = jax.lax.scan(
        micro_step, carry, (micro_batches, jnp.arange(accumulation_steps)))
  grads = jax.lax.pmean(jax.tree.map(lambda g: g / accumulation_steps, grads), AXIS)
  # One shared running average. Synchronised batch norm already computed the same
  # statistics on every device; per-device batch norm did not, and is averaged here.
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  return (grads, batch_stats, jax.lax.psum(sums, AXIS), per_example.reshape(-1),
          correct.reshape(-1))


def eval_step(state: TrainState, batch: dict, *,
              loss_fn: LossFn = losses.cross_entropy) -> dict:
  """Masked sums over this device's slice; padded examples (mask 0) count for nothing."""
  logits = state.apply_fn(state.variables(), batch["x"], train=False)
  return jax.lax.psum(_local_sums(logits, batch["y"], batch["mask"], loss_fn), AXIS)
