"""The layer hooks of the built-in models: which dense, convolution and norm layers they use.

A built-in model never names flax.linen.Conv or BatchNorm itself: it calls the
constructors of a `Layers` (plain or masked, in config.model.dtype) and a norm
constructor from the NORMS registry, so that config.sparsity, config.model.norm and
config.model.dtype reach every layer of every built-in model, and of a model of
yours that takes the same hooks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxddp import sparsity
from jaxddp.nn import GhostBatchNorm, MaskedConv, MaskedDense
from jaxddp.registry import Registry

ModuleDef = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Layers:
  """Constructors the built-in models call, taking flax.linen.Conv / Dense's arguments.

  The first layer (its input is the data) and the last (the classifier) have
  their own entries, so that sparse training can keep them dense.
  `layers(config)` binds the computation dtype (config.model.dtype) into each; the
  defaults here compute in the promoted input/parameter dtype.
  """
  first: ModuleDef = nn.Conv  # the model's first layer: a convolution (a patch embedding)
  conv: ModuleDef = nn.Conv  # every other convolution
  dense: ModuleDef = nn.Dense  # every dense layer but the classifier
  last: ModuleDef = nn.Dense  # the classifier


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """config.model.dtype as a dtype: what convolutions, dense and norm layers compute in.

  Parameters stay float32 (every layer keeps param_dtype=float32), and so do the
  batch-norm running statistics and the models' logits.
  """
  return jnp.dtype(config.model.dtype)


def layers(config: ml_collections.ConfigDict) -> Layers:
  """flax's Dense and Conv, or masked ones (jaxddp.nn) for sparse training.

  Under SWAT the masked layers also sparsify their input in the backward pass.
  skip_first_layer / skip_last_layer keep those layers plain (no mask).
  Every layer computes in config.model.dtype, with float32 parameters.
  """
  options = config.sparsity
  method = sparsity.METHODS[options.method]
  dtype = {"dtype": compute_dtype(config)}
  plain_conv = functools.partial(nn.Conv, **dtype)
  plain_dense = functools.partial(nn.Dense, **dtype)
  if not method.masked:
    return Layers(first=plain_conv, conv=plain_conv, dense=plain_dense, last=plain_dense)
  swat = {"activation_sparsity": options.activation_sparsity} if method.sparse_backward else {}
  conv = functools.partial(MaskedConv, **swat, **dtype)
  dense = functools.partial(MaskedDense, **swat, **dtype)
  return Layers(first=plain_conv if options.skip_first_layer else conv, conv=conv, dense=dense,
                last=plain_dense if options.skip_last_layer else dense)


# --- Normalisation layers: config.model.norm -> a constructor taking BatchNorm's arguments.

NORMS: Registry[Callable[[ml_collections.ConfigDict], ModuleDef]] = Registry("norm", "model.norm")

# config.model.bn_variance: mean((x - mean)^2) (two passes over the batch), or flax's
# E[x^2] - E[x]^2 (one pass), which cancels catastrophically when |mean| >> spread.
BN_VARIANCES = ("two_pass", "one_pass")


class NoNorm(nn.Module):
  """config.model.norm = "none": the identity (cast to `dtype` if given), taking a norm
  layer's arguments."""
  use_running_average: bool | None = None
  scale_init: Any = None
  dtype: Any = None

  def __call__(self, x):
    return x if self.dtype is None else x.astype(self.dtype)


@NORMS.register("batch_norm")
def batch_norm(config: ml_collections.ConfigDict) -> ModuleDef:
  """flax's BatchNorm. With sync_batch_stats its statistics are averaged over the "data"
  axis inside the step (cross-device batch norm). The variance takes two passes unless
  config.model.bn_variance says one_pass (see docs/numerics.md)."""
  axis_name = "data" if config.model.sync_batch_stats else None
  return functools.partial(nn.BatchNorm, momentum=config.model.bn_momentum, epsilon=1e-5,
                           axis_name=axis_name, dtype=compute_dtype(config),
                           use_fast_variance=config.model.bn_variance == "one_pass")


@NORMS.register("ghost_batch_norm")
def ghost_batch_norm(config: ml_collections.ConfigDict) -> ModuleDef:
  # No axis_name: train_step averages every running statistic over "data" after
  # each step already, which is what GhostBatchNorm's axis_name would do per layer.
  return functools.partial(GhostBatchNorm, ghost_batch_size=config.model.ghost_batch_size,
                           momentum=config.model.bn_momentum, epsilon=1e-5,
                           dtype=compute_dtype(config))


@NORMS.register("none")
def no_norm(config: ml_collections.ConfigDict) -> ModuleDef:
  return functools.partial(NoNorm, dtype=compute_dtype(config))


def norm_layer(config: ml_collections.ConfigDict) -> ModuleDef:
  """The normalisation layer of the built-in convolutional models, from config.model.

  Every norm layer outputs config.model.dtype; batch norm's statistics are computed
  in float32 and its running averages, scale and bias are float32.
  """
  return NORMS[config.model.norm](config)
