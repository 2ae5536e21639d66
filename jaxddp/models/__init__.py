"""Model registry: config.model -> a Flax module called as model(x, train=...)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
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
  """config.model.norm = "none": the identity, taking a norm layer's arguments."""
  use_running_average: bool | None = None
  scale_init: Any = None

  def __call__(self, x):
    return x


def norm_layer(config: ml_collections.ConfigDict):
  """The normalisation layer every built-in model uses, from config.model.

  For batch_norm with sync_batch_stats, the batch statistics are averaged over
  the "data" axis inside the step (cross-device batch norm); the caller must then
  run the model inside pmap/shard_map over that axis when training.
  """
  if config.model.norm == "none":
    return NoNorm
  if config.model.norm == "ghost_batch_norm":
    # No axis_name: train_step averages every running statistic over "data" after
    # each step already, which is what GhostBatchNorm's axis_name would do per layer.
    return functools.partial(GhostBatchNorm, ghost_batch_size=config.model.ghost_batch_size,
                             momentum=config.model.bn_momentum, epsilon=1e-5)
  axis_name = "data" if config.model.sync_batch_stats else None
  return functools.partial(nn.BatchNorm, momentum=config.model.bn_momentum, epsilon=1e-5,
                           axis_name=axis_name)


def layers(config: ml_collections.ConfigDict) -> Layers:
  """flax's Dense and Conv, or masked ones (jaxddp.nn) for sparse training.

  Under SWAT the masked layers also sparsify their input in the backward pass.
  skip_first_layer / skip_last_layer keep those layers plain (no mask).
  """
  sparsity = config.sparsity
  if sparsity.method == "none":
    return Layers()
  swat = {"activation_sparsity": sparsity.activation_sparsity} if sparsity.method == "swat" \
      else {}
  conv = functools.partial(MaskedConv, **swat)
  return Layers(first=nn.Conv if sparsity.skip_first_layer else conv, conv=conv,
                last=nn.Dense if sparsity.skip_last_layer else
                functools.partial(MaskedDense, **swat))


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  name = config.model.name
  norm = norm_layer(config)
  if name == "cnn":
    return CNN(num_classes=num_classes, norm=norm, width=config.model.width,
               layers=layers(config))
  if name in RESNETS:
    stage_sizes, block = RESNETS[name]
    return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, norm=norm,
                  width=config.model.width, stem=config.model.stem,
                  zero_init_residual=config.model.zero_init_residual, layers=layers(config))
  raise ValueError(f"unknown model {name!r}")  # config.validate catches this first
