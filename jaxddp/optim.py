"""Learning-rate schedules and optimizers built from config.optimizer and the recipe.

The recipe (jaxddp.config.resolve) has already turned the config into numbers:
the peak learning rate after the scaling rule, warmup steps, total steps and the
step schedule's decay points, all counted in optimizer updates.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxddp.config import Recipe


def learning_rate_schedule(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  """Linear warmup from 0 to the peak over warmup_steps, then the configured decay.

  With warmup w, total steps T and peak p, the rate of update t (counted from 0) is
  p * t / w during warmup, then with s = (t - w) / (T - w):
  cosine p * (1 + cos(pi * s)) / 2; polynomial p * (1 - s)^power; step p times
  decay_factor for every decay step <= t; constant p.
  """
  peak, warmup = recipe.peak_learning_rate, recipe.warmup_steps
  decay_steps = max(recipe.total_steps - warmup, 1)
  opt = config.optimizer
  if opt.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(peak, decay_steps=decay_steps)
  elif opt.schedule == "polynomial":
    after_warmup = optax.polynomial_schedule(peak, 0.0, opt.polynomial_power, decay_steps)
  elif opt.schedule == "step":
    scales = collections.Counter(max(step - warmup, 0) for step in recipe.decay_steps)
    after_warmup = optax.piecewise_constant_schedule(
        peak, {step: opt.decay_factor**count for step, count in scales.items()})
  else:
    after_warmup = optax.constant_schedule(peak)
  if warmup == 0:
    return after_warmup
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])


def decay_mask(params) -> dict:
  """True for weights: kernels (2 or more dimensions), not biases or norm scales/offsets."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """The configured optimizer, with weight decay and trust ratios masked to the weights."""
  opt = config.optimizer
  decayed = (lambda params: jax.tree.map(lambda _: True, params)) if opt.decay_norm_and_bias \
      else decay_mask
  if opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.momentum, weight_decay=opt.weight_decay, mask=decayed)
  elif opt.name == "lars":
    tx = optax.lars(schedule, weight_decay=opt.weight_decay, weight_decay_mask=decayed,
                    trust_coefficient=opt.trust_coefficient, trust_ratio_mask=decay_mask,
                    momentum=opt.momentum)
  elif opt.name == "lamb":
    # optax.lamb applies the trust ratio to every parameter; here it skips the
    # biases and normalisation parameters, as LARS does.
    tx = optax.chain(optax.scale_by_adam(b1=opt.momentum, b2=0.999, eps=1e-6),
                     optax.add_decayed_weights(opt.weight_decay, mask=decayed),
                     optax.masked(optax.scale_by_trust_ratio(), decay_mask),
                     optax.scale_by_learning_rate(schedule))
  else:
    momentum = None if opt.name == "sgd" else opt.momentum
    # Coupled L2 (added to the gradient before momentum), as in Goyal et al.
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decayed),
                     optax.sgd(schedule, momentum=momentum, nesterov=opt.name == "nesterov"))
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx
