"""A small CNN for 1-D signals (N, L, C) and 2-D images (N, H, W, C)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxddp.models.layers import Layers, ModuleDef


class CNN(nn.Module):
  """Three stages of two conv-norm-relu layers, each stage halving the resolution.

  `dtype` is the computation dtype (`layers` and `norm` must compute in it too; see
  jaxddp.models.create_model): the input is cast to it, the global average pooling
  sums in float32, and the logits are float32 whatever it is.
  """
  num_classes: int
  norm: ModuleDef
  width: int = 64
  layers: Layers = Layers()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    spatial_dims = x.ndim - 2
    x = x.astype(self.dtype)
    kernel = (3,) * spatial_dims
    for stage in range(3):
      for index in range(2):
        conv = self.layers.first if stage == index == 0 else self.layers.conv
        x = conv(self.width * 2**stage, kernel, padding="SAME", use_bias=False)(x)
        x = self.norm(use_running_average=not train)(x)
        x = nn.relu(x)
      if min(x.shape[1:-1]) >= 2:
        x = nn.max_pool(x, (2,) * spatial_dims, strides=(2,) * spatial_dims)
    x = jnp.mean(x, axis=tuple(range(1, 1 + spatial_dims)), dtype=jnp.float32)
    return self.layers.last(self.num_classes)(x).astype(jnp.float32)
