"""Learning-rate schedules and optimizers built from config.optimizer and the recipe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxddp.config import Recipe


def learning_rate_schedule(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  """Linear warmup from 0 to the peak over warmup_steps, then cosine or constant."""
  peak = recipe.peak_learning_rate
  decay_steps = recipe.total_steps - recipe.warmup_steps
  if config.optimizer.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(peak, decay_steps=max(decay_steps, 1))
  else:
    after_warmup = optax.constant_schedule(peak)
  if recipe.warmup_steps == 0:
    return after_warmup
  warmup = optax.linear_schedule(0.0, peak, recipe.warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [recipe.warmup_steps])


def decay_mask(params) -> dict:
  """True for weights that get weight decay: kernels, not biases or norm scales/offsets."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.name == "adamw":
    return optax.adamw(schedule, b1=opt.momentum, weight_decay=opt.weight_decay, mask=decay_mask)
  if opt.name == "sgd":
    sgd = optax.sgd(schedule)
  else:
    sgd = optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.name == "nesterov")
  # Coupled L2 (added to the gradient before momentum), as in Goyal et al.
  return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask), sgd)
