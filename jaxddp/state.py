"""The training state: everything a checkpoint must hold to resume exactly."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, opt_state, tx) plus what else a resumed run needs.

  * batch_stats, masks: batch-norm statistics and the weight masks of masked layers
    (empty when the model has none);
  * rng: the run's PRNG key (raw uint32 key data). Step t on device d draws from
    fold_in(fold_in(rng, t), d) (see step_rngs): nothing to advance, nothing lost on
    a resume;
  * examples: per-example tables of data pruning (jaxddp.pruning), each of one value
    per training example in the dataset's index order, and the dynamic epoch's
    bookkeeping: {} without data pruning;
  * train_flops: the training FLOPs so far (jaxddp.sparsity's count), as a float32
    pair (high, low) summed with compensation, which keeps about 48 bits: a float32
    alone would lose whole steps' FLOPs once the total is 2^24 times a step's.
  """
  batch_stats: Any
  masks: Any = struct.field(default_factory=dict)
  rng: Any = None
  train_flops: Any = None
  examples: Any = struct.field(default_factory=dict)

  def variables(self, params=None) -> dict[str, Any]:
    """What the model is applied to: `params` (default: the state's), statistics, masks."""
    return {"params": self.params if params is None else params,
            "batch_stats": self.batch_stats, "masks": self.masks}

  def add_flops(self, flops: jnp.ndarray) -> "TrainState":
    """train_flops + flops: Knuth's TwoSum keeps the rounding error of high + flops in
    low, then Fast2Sum renormalises the pair."""
    high, low = self.train_flops[0], self.train_flops[1]
    total = high + flops
    rounded = total - high
    error = (high - (total - rounded)) + (flops - rounded)
    low = low + error
    high = total + low  # renormalise: high holds the sum, low what float32 rounds off
    return self.replace(train_flops=jnp.stack([high, low - (high - total)]))


def total_flops(pair) -> float:
  """A (high, low) train_flops pair as one float64 number (host side)."""
  high, low = (float(v) for v in jax.device_get(pair))
  return high + low


def step_rngs(rng: jnp.ndarray, step: jnp.ndarray, device_index: jnp.ndarray,
              micro_step: int | jnp.ndarray = 0) -> dict[str, jax.Array]:
  """The keys a model's make_rng draws from at one (micro-)step on one device: "dropout",
  and "params", which flax falls back on for any other stream name."""
  key = jax.random.wrap_key_data(rng)
  for value in (step, device_index, micro_step):
    key = jax.random.fold_in(key, value)
  dropout, other = jax.random.split(key)
  return {"dropout": dropout, "params": other}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...], seed: int) -> TrainState:
  """Initialises parameters on the host's default device from the seed alone."""
  key = jax.random.key(seed)
  variables = jax.jit(model.init, static_argnames="train")(
      key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           masks=variables.get("masks", {}), tx=tx,
                           # a stream apart from the initialisation's
                           rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                           train_flops=jnp.zeros((2,), jnp.float32))


_ITEMS = ("step", "params", "batch_stats", "masks", "opt_state", "rng", "train_flops")


def _items(state: TrainState) -> tuple[str, ...]:
  # examples only when there are any: checkpoints of runs without data pruning keep
  # the layout they had before it existed.
  return _ITEMS + ("examples",) if state.examples else _ITEMS


def checkpoint_items(state: TrainState) -> dict[str, Any]:
  """The arrays of the state, as the plain nested dict that checkpoints store."""
  return {name: getattr(state, name) for name in _items(state)}


def with_checkpoint_items(state: TrainState, items: dict[str, Any]) -> TrainState:
  return state.replace(**{name: items[name] for name in _items(state)})


def local_value(x) -> np.ndarray:
  """This process's copy of a replicated array (works when other processes hold copies too)."""
  return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
