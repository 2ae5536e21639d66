"""Learning-rate schedules and optimizers built from config.optimizer and the recipe.

The recipe (jaxddp.recipe.resolve) has already turned the config into numbers:
the peak learning rate after the scaling rule, warmup steps, total steps and the
step schedule's decay points, all counted in optimizer updates.

Optimizers and schedules are registries (OPTIMIZERS, SCHEDULES): a new one is one
decorated function here, and config validation knows its name at once.

The learning rate of a step comes from one place, `LearningRate`: the schedule at the
step's position, which is the update count, or, for data pruning whose epochs vary in
length, a position the state gives (then the rate is injected into the optimizer's
state by the step instead of the optimizer reading the schedule itself).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxddp.recipe import Recipe
from jaxddp.registry import Registry


# config.optimizer.schedule -> the schedule after warmup, (config, recipe) -> optax schedule
# from the peak rate, counting updates from the end of warmup.
SCHEDULES: Registry[Callable[[ml_collections.ConfigDict, Recipe], optax.Schedule]] = Registry(
    "schedule", "optimizer.schedule")
# config.optimizer.name -> (config.optimizer, schedule, decay mask) -> optax transformation;
# the decay mask (a function of the params) says which parameters weight decay applies to.
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry(
    "optimizer", "optimizer.name")


def _decay_steps(recipe: Recipe) -> int:
  return max(recipe.total_steps - recipe.warmup_steps, 1)


@SCHEDULES.register("cosine")
def cosine(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  return optax.cosine_decay_schedule(recipe.peak_learning_rate, decay_steps=_decay_steps(recipe))


@SCHEDULES.register("polynomial")
def polynomial(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  return optax.polynomial_schedule(recipe.peak_learning_rate, 0.0,
                                   config.optimizer.polynomial_power, _decay_steps(recipe))


@SCHEDULES.register("step")
def step(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  scales = collections.Counter(max(t - recipe.warmup_steps, 0) for t in recipe.decay_steps)
  return optax.piecewise_constant_schedule(
      recipe.peak_learning_rate,
      {t: config.optimizer.decay_factor**count for t, count in scales.items()})


@SCHEDULES.register("constant")
def constant(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  return optax.constant_schedule(recipe.peak_learning_rate)


def learning_rate_schedule(config: ml_collections.ConfigDict, recipe: Recipe) -> optax.Schedule:
  """Linear warmup from 0 to the peak over warmup_steps, then the configured decay.

  With warmup w, total steps T and peak p, the rate of update t (counted from 0) is
  p * t / w during warmup, then with s = (t - w) / (T - w):
  cosine p * (1 + cos(pi * s)) / 2; polynomial p * (1 - s)^power; step p times
  decay_factor for every decay step <= t; constant p.
  """
  after_warmup = SCHEDULES[config.optimizer.schedule](config, recipe)
  warmup = recipe.warmup_steps
  if warmup == 0:
    return after_warmup
  return optax.join_schedules(
      [optax.linear_schedule(0.0, recipe.peak_learning_rate, warmup), after_warmup], [warmup])


def decay_mask(params) -> dict:
  """True for weights: kernels (2 or more dimensions), not biases or norm scales/offsets."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


@OPTIMIZERS.register("adamw")
def adamw(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
          decayed) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=opt.momentum, weight_decay=opt.weight_decay, mask=decayed)


@OPTIMIZERS.register("lars")
def lars(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
         decayed) -> optax.GradientTransformation:
  return optax.lars(schedule, weight_decay=opt.weight_decay, weight_decay_mask=decayed,
                    trust_coefficient=opt.trust_coefficient, trust_ratio_mask=decay_mask,
                    momentum=opt.momentum)


@OPTIMIZERS.register("lamb")
def lamb(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
         decayed) -> optax.GradientTransformation:
  # optax.lamb applies the trust ratio to every parameter; here it skips the
  # biases and normalisation parameters, as LARS does.
  return optax.chain(optax.scale_by_adam(b1=opt.momentum, b2=0.999, eps=1e-6),
                     optax.add_decayed_weights(opt.weight_decay, mask=decayed),
                     optax.masked(optax.scale_by_trust_ratio(), decay_mask),
                     optax.scale_by_learning_rate(schedule))


def _sgd(momentum: bool, nesterov: bool):
  def make(opt: ml_collections.ConfigDict, schedule: optax.Schedule, decayed):
    # Coupled L2 (added to the gradient before momentum), as in Goyal et al.
    return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decayed),
                       optax.sgd(schedule, momentum=opt.momentum if momentum else None,
                                 nesterov=nesterov))
  return make


OPTIMIZERS.register("sgd")(_sgd(momentum=False, nesterov=False))
OPTIMIZERS.register("momentum")(_sgd(momentum=True, nesterov=False))
OPTIMIZERS.register("nesterov")(_sgd(momentum=True, nesterov=True))


@dataclasses.dataclass(frozen=True)
class LearningRate:
  """The learning rate of every step: schedule(position), one function for the run.

  position None: the position is the optimizer's update count (state.step), and the
  optimizer reads the schedule itself. Otherwise position(state) gives it (InfoBatch:
  the run's progress in full-epoch steps), and the rate is a hyperparameter the step
  writes into the optimizer's state (optax.inject_hyperparams) before the update.
  """
  schedule: optax.Schedule
  position: Callable[[Any], jnp.ndarray] | None = None

  @property
  def injected(self) -> bool:
    return self.position is not None

  def __call__(self, state) -> jnp.ndarray:
    """The rate of the update `state` is about to take (float32)."""
    where = state.step if self.position is None else self.position(state)
    return jnp.asarray(self.schedule(where), jnp.float32)

  def into_optimizer(self, state, rate: jnp.ndarray):
    """`state` with `rate` in its optimizer's hyperparameters, if injected (else as is)."""
    if not self.injected:
      return state
    hyperparams = {**state.opt_state.hyperparams, "learning_rate": rate}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def as_learning_rate(learning_rate: LearningRate | optax.Schedule) -> LearningRate:
  """A LearningRate; a plain schedule is one of the update count."""
  if isinstance(learning_rate, LearningRate):
    return learning_rate
  return LearningRate(learning_rate)


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate: LearningRate | optax.Schedule
                     ) -> optax.GradientTransformation:
  """The configured optimizer, with weight decay and trust ratios masked to the weights,
  after global-norm clipping if config.optimizer.grad_clip_norm > 0. Its learning rate
  is `learning_rate`'s (a LearningRate, or a schedule of the update count).
  """
  learning_rate = as_learning_rate(learning_rate)
  opt = config.optimizer
  decayed = (lambda params: jax.tree.map(lambda _: True, params)) if opt.decay_norm_and_bias \
      else decay_mask

  def make(learning_rate) -> optax.GradientTransformation:
    tx = OPTIMIZERS[opt.name](opt, learning_rate, decayed)
    if opt.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx

  if learning_rate.injected:  # the argument's name is the hyperparameter's
    return optax.inject_hyperparams(make)(learning_rate=learning_rate.schedule(0))
  return make(learning_rate.schedule)
