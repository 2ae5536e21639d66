"""Losses by name: config.train.loss -> loss_fn(logits, labels) -> per-example losses.

The training step averages a loss over its examples (and devices); evaluation reports
it next to the accuracy. A loss of your own is registered here with
`LOSSES.register(name)`, named by an import path (`--config.train.loss=my_losses:focal`),
or passed as `jaxddp.train_and_evaluate(..., loss_fn=...)`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxddp.errors import ConfigError
from jaxddp.registry import Registry, first_line, is_import_path, resolve_import_path

LossFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
LOSSES: Registry[LossFn] = Registry("loss", "train.loss")


@LOSSES.register("cross_entropy")
def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Softmax cross-entropy against integer labels, per example."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def smoothed_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                           label_smoothing: float) -> jnp.ndarray:
  """Cross-entropy against one-hot labels smoothed by `label_smoothing`, per example."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def get(config: ml_collections.ConfigDict, loss_fn: LossFn | None = None) -> tuple[LossFn, LossFn]:
  """(training loss, evaluation loss): `loss_fn` if given, else config.train.loss.

  config.train.label_smoothing smooths the training cross-entropy only; it is an error
  with any other loss."""
  name = config.train.loss
  if loss_fn is not None and not callable(loss_fn):
    raise ConfigError(f"train_and_evaluate(loss_fn={loss_fn!r}) takes a function loss_fn(logits, "
                      "labels) -> per-example losses; a loss's name goes in config.train.loss")
  if loss_fn is None:
    if is_import_path(name):
      loss_fn = resolve_import_path("train.loss", name)
      if not callable(loss_fn):
        raise ConfigError(f"config.train.loss={name!r} names an object of type "
                          f"{type(loss_fn).__name__}, not a function loss_fn(logits, labels) -> "
                          "per-example losses")
    else:
      loss_fn = LOSSES[name]
  smoothing = config.train.label_smoothing
  if not smoothing:
    return loss_fn, loss_fn
  if loss_fn is not cross_entropy:
    raise ConfigError(f"config.train.label_smoothing={smoothing} smooths the built-in "
                      "cross_entropy loss only; set it to 0 with a loss of your own")
  return functools.partial(smoothed_cross_entropy, label_smoothing=smoothing), loss_fn


def check(loss_fn: LossFn, num_classes: int) -> None:
  """A one-line error unless loss_fn(logits (batch, classes), labels (batch,)) returns one
  loss per example (checked from shapes alone)."""
  logits = jax.ShapeDtypeStruct((3, num_classes), jnp.float32)
  labels = jax.ShapeDtypeStruct((3,), jnp.int32)
  what = getattr(loss_fn, "__name__", repr(loss_fn))
  try:
    losses = jax.eval_shape(loss_fn, logits, labels)
  except Exception as error:
    raise ConfigError(f"the loss {what}(logits, labels) fails on logits of shape (3, "
                      f"{num_classes}) and labels of shape (3,): {type(error).__name__}: "
                      f"{first_line(error)}") from None
  if getattr(losses, "shape", None) != (3,):
    raise ConfigError(f"the loss {what}(logits, labels) returns "
                      f"{getattr(losses, 'shape', type(losses).__name__)} for 3 examples; it "
                      "must return one loss per example, shape (3,)")
