"""ResNet v1.5 (stride on the 3x3 conv of the bottleneck) for 1-D and 2-D inputs:
config.model.name = resnet18, resnet34, resnet50, resnet101, resnet152."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxddp.models.layers import Layers, ModuleDef, compute_dtype, layers, norm_layer


class _Block(nn.Module):
  """A residual block. Its layers are named conv1, norm1, conv2, ... and shortcut_conv,
  shortcut_norm, whatever their classes (plain or masked, batch or ghost norm)."""
  filters: int
  strides: int
  norm: ModuleDef
  zero_init_residual: bool = False  # start the last norm's scale at 0: the block is the identity
  layers: Layers = Layers()

  def _norm(self, train: bool, name: str, last: bool = False) -> nn.Module:
    options = {"scale_init": nn.initializers.zeros} if last and self.zero_init_residual else {}
    return self.norm(use_running_average=not train, name=name, **options)

  def _shortcut(self, x: jnp.ndarray, y: jnp.ndarray, train: bool) -> jnp.ndarray:
    if x.shape != y.shape:
      d = x.ndim - 2
      x = self.layers.conv(y.shape[-1], (1,) * d, (self.strides,) * d, use_bias=False,
                           name="shortcut_conv")(x)
      x = self._norm(train, "shortcut_norm")(x)
    return nn.relu(x + y)


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.ndim - 2
    y = self.layers.conv(self.filters, (3,) * d, (self.strides,) * d, padding="SAME",
                         use_bias=False, name="conv1")(x)
    y = nn.relu(self._norm(train, "norm1")(y))
    y = self.layers.conv(self.filters, (3,) * d, padding="SAME", use_bias=False, name="conv2")(y)
    y = self._norm(train, "norm2", last=True)(y)
    return self._shortcut(x, y, train)


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50 and up)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.ndim - 2
    y = self.layers.conv(self.filters, (1,) * d, use_bias=False, name="conv1")(x)
    y = nn.relu(self._norm(train, "norm1")(y))
    y = self.layers.conv(self.filters, (3,) * d, (self.strides,) * d, padding="SAME",
                         use_bias=False, name="conv2")(y)
    y = nn.relu(self._norm(train, "norm2")(y))
    y = self.layers.conv(self.filters * 4, (1,) * d, use_bias=False, name="conv3")(y)
    y = self._norm(train, "norm3", last=True)(y)
    return self._shortcut(x, y, train)


class ResNet(nn.Module):
  """Stem (stem_conv, stem_norm), stages of blocks (stage1_block0, ...), head."""
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int
  norm: ModuleDef
  width: int = 64
  stem: str = "auto"  # imagenet | small | auto
  zero_init_residual: bool = False
  layers: Layers = Layers()
  # Computation dtype (`layers` and `norm` must compute in it too): the input is cast to
  # it, the global average pooling sums in float32, and the logits are float32 whatever
  # it is.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.ndim - 2
    x = x.astype(self.dtype)
    stem = self.stem
    if stem == "auto":
      stem = "imagenet" if min(x.shape[1:-1]) >= 64 else "small"
    if stem == "imagenet":
      x = self.layers.first(self.width, (7,) * d, (2,) * d, padding="SAME", use_bias=False,
                            name="stem_conv")(x)
      x = nn.relu(self.norm(use_running_average=not train, name="stem_norm")(x))
      x = nn.max_pool(x, (3,) * d, strides=(2,) * d, padding="SAME")
    else:
      x = self.layers.first(self.width, (3,) * d, padding="SAME", use_bias=False,
                            name="stem_conv")(x)
      x = nn.relu(self.norm(use_running_average=not train, name="stem_norm")(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(self.width * 2**stage, strides, self.norm, self.zero_init_residual,
                       self.layers, name=f"stage{stage + 1}_block{index}")(x, train)
    x = jnp.mean(x, axis=tuple(range(1, 1 + d)), dtype=jnp.float32)
    return self.layers.last(self.num_classes, name="head")(x).astype(jnp.float32)


# config.model.name -> (blocks per stage, block); jaxddp.models registers each.
VARIANTS = {
    "resnet18": ([2, 2, 2, 2], BasicBlock),
    "resnet34": ([3, 4, 6, 3], BasicBlock),
    "resnet50": ([3, 4, 6, 3], BottleneckBlock),
    "resnet101": ([3, 4, 23, 3], BottleneckBlock),
    "resnet152": ([3, 8, 36, 3], BottleneckBlock),
}


def factory(name: str) -> Callable[[ml_collections.ConfigDict, int], ResNet]:
  """The model factory (config, num_classes) -> ResNet of the variant `name`."""
  stage_sizes, block = VARIANTS[name]

  def create(config: ml_collections.ConfigDict, num_classes: int) -> ResNet:
    return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes,
                  norm=norm_layer(config), width=config.model.width, stem=config.model.stem,
                  zero_init_residual=config.model.zero_init_residual, layers=layers(config),
                  dtype=compute_dtype(config))
  return create
