"""The training state: everything a checkpoint must hold to resume exactly."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, opt_state, tx) plus batch-norm statistics and
  the weight masks of masked layers (both empty when the model has none)."""
  batch_stats: Any
  masks: Any = struct.field(default_factory=dict)

  def variables(self, params=None) -> dict[str, Any]:
    """What the model is applied to: `params` (default: the state's), statistics, masks."""
    return {"params": self.params if params is None else params,
            "batch_stats": self.batch_stats, "masks": self.masks}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...], seed: int) -> TrainState:
  """Initialises parameters on the host's default device from the seed alone."""
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           masks=variables.get("masks", {}), tx=tx)


def checkpoint_items(state: TrainState) -> dict[str, Any]:
  """The arrays of the state, as the plain nested dict that checkpoints store."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "masks": state.masks, "opt_state": state.opt_state}


def with_checkpoint_items(state: TrainState, items: dict[str, Any]) -> TrainState:
  return state.replace(step=items["step"], params=items["params"],
                       batch_stats=items["batch_stats"], masks=items["masks"],
                       opt_state=items["opt_state"])
