"""Vision Transformer (Dosovitskiy et al. 2021) for 2-D images and 1-D signals.

config.model.name = vit_ti, vit_s or vit_b (width, depth, heads and MLP size of
Touvron et al. 2021's DeiT-Ti and Dosovitskiy et al.'s ViT-S/B), with
config.model.patch_size, .pooling (cls: a class token; mean: the average of the
patch tokens) and .dropout.

This file uses only what a user's model would use: jaxddp.models registers its
factories as it would a user's, and it builds its dense layers and patch
embedding from the same layer hooks as the CNNs (jaxddp.models.layers), so
config.model.dtype and the sparsity methods (masked layers, SWAT) reach it too.
Its layer names (patch_embed, block3/attention/qkv, block3/mlp1, head, ...) do
not depend on those choices, so a checkpoint loads into a dense or masked ViT.

Each block is pre-LN: x + attention(LN(x)), then x + MLP(LN(x)), with dropout on
the attention weights and on each residual branch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxddp.errors import ConfigError
from jaxddp.models.layers import Layers, compute_dtype, layers

# name: (width, depth, heads, MLP size)
VARIANTS = {"vit_ti": (192, 12, 3, 768), "vit_s": (384, 12, 6, 1536),
            "vit_b": (768, 12, 12, 3072)}
POOLINGS = ("cls", "mean")

_dense_init = nn.initializers.xavier_uniform()


class Attention(nn.Module):
  """Multi-head self-attention: one qkv projection, softmax in float32, one output."""
  num_heads: int
  dropout: float
  layers: Layers
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    batch, tokens, width = x.shape
    head_size = width // self.num_heads
    qkv = self.layers.dense(3 * width, kernel_init=_dense_init, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_size), 2, 0)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_size)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
    return self.layers.dense(width, kernel_init=_dense_init, name="out")(out)


class Block(nn.Module):
  """Pre-LN transformer block."""
  num_heads: int
  mlp_size: int
  dropout: float
  layers: Layers
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    x = x + drop(Attention(self.num_heads, self.dropout, self.layers, self.dtype,
                           name="attention")(y, train))
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    y = self.layers.dense(self.mlp_size, kernel_init=_dense_init, name="mlp1")(y)
    y = self.layers.dense(x.shape[-1], kernel_init=_dense_init, name="mlp2")(drop(nn.gelu(y)))
    return x + drop(y)


class ViT(nn.Module):
  """Patch embedding, learned position embedding, pre-LN blocks, final LN, pooling, head.

  Inputs are channels last: (N, L, C) signals or (N, H, W, C) images whose spatial
  sizes are multiples of patch_size. Logits are float32 whatever `dtype` is.
  """
  num_classes: int
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_size: int = 768
  patch_size: int = 16
  pooling: str = "cls"
  dropout: float = 0.0
  layers: Layers = Layers()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    spatial = x.shape[1:-1]
    if any(size % self.patch_size for size in spatial):
      common = math.gcd(*spatial)
      divisors = [d for d in range(1, common + 1) if common % d == 0]
      raise ConfigError(f"config.model.patch_size={self.patch_size} does not divide the input's "
                        f"spatial size {'x'.join(map(str, spatial))}; use one of "
                        f"{', '.join(map(str, divisors))}")
    d = len(spatial)
    x = self.layers.first(self.width, (self.patch_size,) * d, (self.patch_size,) * d,
                          padding="VALID", name="patch_embed")(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pooling == "cls":
      token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, self.width)).astype(x.dtype),
                           x], axis=1)
    position = self.param("pos_embed", nn.initializers.normal(0.02), (1, *x.shape[1:]),
                          jnp.float32)
    x = nn.Dropout(self.dropout, deterministic=not train)(x + position.astype(x.dtype))
    for index in range(self.depth):
      x = Block(self.num_heads, self.mlp_size, self.dropout, self.layers, self.dtype,
                name=f"block{index}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    x = x[:, 0].astype(jnp.float32) if self.pooling == "cls" else \
        jnp.mean(x, axis=1, dtype=jnp.float32)
    return self.layers.last(self.num_classes, name="head")(x).astype(jnp.float32)


def factory(name: str) -> Callable[[ml_collections.ConfigDict, int], ViT]:
  """The model factory (config, num_classes) -> ViT of the variant `name` (VARIANTS)."""
  width, depth, num_heads, mlp_size = VARIANTS[name]

  def create(config: ml_collections.ConfigDict, num_classes: int) -> ViT:
    m = config.model
    if m.pooling not in POOLINGS:
      raise ConfigError(f"config.model.pooling={m.pooling!r} is not valid; choose one of: "
                        f"{', '.join(POOLINGS)}")
    return ViT(num_classes=num_classes, width=width, depth=m.depth or depth, num_heads=num_heads,
               mlp_size=mlp_size, patch_size=m.patch_size, pooling=m.pooling, dropout=m.dropout,
               layers=layers(config), dtype=compute_dtype(config))
  return create
