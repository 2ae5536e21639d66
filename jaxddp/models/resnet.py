"""ResNet v1.5 (stride on the 3x3 conv of the bottleneck) for 1-D and 2-D inputs."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxddp.models.layers import Layers, ModuleDef


class _Block(nn.Module):
  filters: int
  strides: int
  norm: ModuleDef
  zero_init_residual: bool = False  # start the last norm's scale at 0: the block is the identity
  layers: Layers = Layers()

  def _last_norm_options(self) -> dict[str, Any]:
    return {"scale_init": nn.initializers.zeros} if self.zero_init_residual else {}


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.ndim - 2
    norm = lambda: self.norm(use_running_average=not train)
    y = self.layers.conv(self.filters, (3,) * d, (self.strides,) * d, padding="SAME",
                         use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = self.layers.conv(self.filters, (3,) * d, padding="SAME", use_bias=False)(y)
    y = self.norm(use_running_average=not train, **self._last_norm_options())(y)
    if x.shape != y.shape:
      x = self.layers.conv(self.filters, (1,) * d, (self.strides,) * d, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50 and up)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.ndim - 2
    norm = lambda: self.norm(use_running_average=not train)
    y = self.layers.conv(self.filters, (1,) * d, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = self.layers.conv(self.filters, (3,) * d, (self.strides,) * d, padding="SAME",
                         use_bias=False)(y)
    y = nn.relu(norm()(y))
    y = self.layers.conv(self.filters * 4, (1,) * d, use_bias=False)(y)
    y = self.norm(use_running_average=not train, **self._last_norm_options())(y)
    if x.shape != y.shape:
      x = self.layers.conv(self.filters * 4, (1,) * d, (self.strides,) * d, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int
  norm: ModuleDef
  width: int = 64
  stem: str = "auto"  # imagenet | small | auto
  zero_init_residual: bool = False
  layers: Layers = Layers()
  # Computation dtype (`layers` and `norm` must compute in it too; see
  # jaxddp.models.create_model): the input is cast to it, the global average pooling
  # sums in float32, and the logits are float32 whatever it is.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = x.ndim - 2
    x = x.astype(self.dtype)
    stem = self.stem
    if stem == "auto":
      stem = "imagenet" if min(x.shape[1:-1]) >= 64 else "small"
    if stem == "imagenet":
      x = self.layers.first(self.width, (7,) * d, (2,) * d, padding="SAME", use_bias=False)(x)
      x = nn.relu(self.norm(use_running_average=not train)(x))
      x = nn.max_pool(x, (3,) * d, strides=(2,) * d, padding="SAME")
    else:
      x = self.layers.first(self.width, (3,) * d, padding="SAME", use_bias=False)(x)
      x = nn.relu(self.norm(use_running_average=not train)(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(self.width * 2**stage, strides, self.norm, self.zero_init_residual,
                       self.layers)(x, train)
    x = jnp.mean(x, axis=tuple(range(1, 1 + d)), dtype=jnp.float32)
    return self.layers.last(self.num_classes)(x).astype(jnp.float32)
