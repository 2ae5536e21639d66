"""The per-device training and evaluation steps.

Each function sees only its device's slice of the batch and talks to the other
devices through collectives on the axis "data". The same functions run under
both backends (jaxddp.parallel): shard_map, where the state is replicated, and
pmap, where each device holds a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxddp.state import TrainState

AXIS = "data"


def _per_device(tree):
  """Marks replicated values as per-device before differentiating.

  Under shard_map (which tracks which values vary across devices), the gradient
  of a per-device loss with respect to a replicated parameter comes back already
  summed over devices. Casting the parameters to "varying" first gives each
  device its own gradient, as pmap does, and the explicit pmean below averages
  them: the same semantics on both backends.
  """
  return jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to="varying"), tree)


def _classification_sums(logits, labels, weights) -> dict[str, jnp.ndarray]:
  """(sum, count) pairs over the local examples, summed over all devices."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
          "count": jnp.sum(weights)}
  return jax.lax.psum(sums, AXIS)


def train_step(state: TrainState, batch: dict, *, learning_rate_fn,
               sync_batch_stats: bool) -> tuple[TrainState, dict]:
  """One optimizer update from this device's slice of the global batch."""
  params = _per_device(state.params)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     batch["x"], train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, (logits, updates["batch_stats"])

  (_, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  grads = jax.lax.pmean(grads, AXIS)
  if not sync_batch_stats:
    # Each device normalised with its own statistics; keep one shared running average.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
  metrics = _classification_sums(logits, batch["y"], jnp.ones_like(batch["y"], jnp.float32))
  metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  # A finite loss can still be followed by an overflowing update: check the result too.
  finite = [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(state.params)]
  metrics["params_finite"] = jnp.all(jnp.stack(finite)).astype(jnp.float32)
  return state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
  """Masked sums over this device's slice; padded examples (mask 0) count for nothing."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["x"], train=False)
  return _classification_sums(logits, batch["y"], batch["mask"])
