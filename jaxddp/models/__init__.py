"""Model registry: config.model -> a Flax module called as model(x, train=...)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxddp.models.cnn import CNN
from jaxddp.models.layers import Layers
from jaxddp.models.resnet import BasicBlock, BottleneckBlock, ResNet
from jaxddp.nn import GhostBatchNorm, MaskedConv, MaskedDense

RESNETS = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], BottleneckBlock),
    "resnet101": ([3, 4, 23, 3], BottleneckBlock),
    "resnet152": ([3, 8, 36, 3], BottleneckBlock),
}


class NoNorm(nn.Module):
  """config.model.norm = "none": the identity (cast to `dtype` if given), taking a norm
  layer's arguments."""
  use_running_average: bool | None = None
  scale_init: Any = None
  dtype: Any = None

  def __call__(self, x):
    return x if self.dtype is None else x.astype(self.dtype)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """config.model.dtype as a dtype: what convolutions, dense and norm layers compute in.

  Parameters stay float32 (every layer keeps param_dtype=float32), and so do the
  batch-norm running statistics and the models' logits.
  """
  return jnp.dtype(config.model.dtype)


def norm_layer(config: ml_collections.ConfigDict):
  """The normalisation layer every built-in model uses, from config.model.

  For batch_norm with sync_batch_stats, the batch statistics are averaged over
  the "data" axis inside the step (cross-device batch norm); the caller must then
  run the model inside pmap/shard_map over that axis when training.

  Every norm layer outputs config.model.dtype; batch norm's statistics are computed
  in float32 and its running averages, scale and bias are float32.
  """
  dtype = compute_dtype(config)
  if config.model.norm == "none":
    return functools.partial(NoNorm, dtype=dtype)
  if config.model.norm == "ghost_batch_norm":
    # No axis_name: train_step averages every running statistic over "data" after
    # each step already, which is what GhostBatchNorm's axis_name would do per layer.
    return functools.partial(GhostBatchNorm, ghost_batch_size=config.model.ghost_batch_size,
                             momentum=config.model.bn_momentum, epsilon=1e-5, dtype=dtype)
  axis_name = "data" if config.model.sync_batch_stats else None
  return functools.partial(nn.BatchNorm, momentum=config.model.bn_momentum, epsilon=1e-5,
                           axis_name=axis_name, dtype=dtype)


def layers(config: ml_collections.ConfigDict) -> Layers:
  """flax's Dense and Conv, or masked ones (jaxddp.nn) for sparse training.

  Under SWAT the masked layers also sparsify their input in the backward pass.
  skip_first_layer / skip_last_layer keep those layers plain (no mask).
  Every layer computes in config.model.dtype, with float32 parameters.
  """
  sparsity = config.sparsity
  dtype = {"dtype": compute_dtype(config)}
  plain_conv = functools.partial(nn.Conv, **dtype)
  plain_dense = functools.partial(nn.Dense, **dtype)
  if sparsity.method == "none":
    return Layers(first=plain_conv, conv=plain_conv, last=plain_dense)
  swat = {"activation_sparsity": sparsity.activation_sparsity} if sparsity.method == "swat" \
      else {}
  conv = functools.partial(MaskedConv, **swat, **dtype)
  return Layers(first=plain_conv if sparsity.skip_first_layer else conv, conv=conv,
                last=plain_dense if sparsity.skip_last_layer else
                functools.partial(MaskedDense, **swat, **dtype))


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  name = config.model.name
  norm = norm_layer(config)
  dtype = compute_dtype(config)
  if name == "cnn":
    return CNN(num_classes=num_classes, norm=norm, width=config.model.width,
               layers=layers(config), dtype=dtype)
  if name in RESNETS:
    stage_sizes, block = RESNETS[name]
    return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, norm=norm,
                  width=config.model.width, stem=config.model.stem,
                  zero_init_residual=config.model.zero_init_residual, layers=layers(config),
                  dtype=dtype)
  raise ValueError(f"unknown model {name!r}")  # config.validate catches this first
