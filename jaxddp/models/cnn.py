"""A small CNN for 1-D signals (N, L, C) and 2-D images (N, H, W, C): config.model.name=cnn."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxddp.models.layers import Layers, ModuleDef, compute_dtype, layers, norm_layer


class CNN(nn.Module):
  """Three stages of two conv-norm-relu layers, each stage halving the resolution.

  Layers are named by place (stage1_conv1, stage1_norm1, ..., head), not by class, so
  a checkpoint loads whatever norm or masked layers a run uses (config.init_from).
  `dtype` is the computation dtype (`layers` and `norm` must compute in it too): the
  input is cast to it, the global average pooling sums in float32, and the logits are
  float32 whatever it is.
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
    for stage in range(1, 4):
      for index in range(1, 3):
        conv = self.layers.first if stage == index == 1 else self.layers.conv
        x = conv(self.width * 2**(stage - 1), kernel, padding="SAME", use_bias=False,
                 name=f"stage{stage}_conv{index}")(x)
        x = self.norm(use_running_average=not train, name=f"stage{stage}_norm{index}")(x)
        x = nn.relu(x)
      if min(x.shape[1:-1]) >= 2:
        x = nn.max_pool(x, (2,) * spatial_dims, strides=(2,) * spatial_dims)
    x = jnp.mean(x, axis=tuple(range(1, 1 + spatial_dims)), dtype=jnp.float32)
    return self.layers.last(self.num_classes, name="head")(x).astype(jnp.float32)


def cnn(config: ml_collections.ConfigDict, num_classes: int) -> CNN:
  """config.model.name=cnn (registered by jaxddp.models)."""
  return CNN(num_classes=num_classes, norm=norm_layer(config), width=config.model.width,
             layers=layers(config), dtype=compute_dtype(config))
