"""Ghost batch normalization (Hoffer, Hubara and Soudry, 2017) as a Linen layer.

In training, a device's batch of n examples is split into consecutive "ghost"
batches x[0:g], x[g:2g], ... of g = ghost_batch_size examples, and each is
normalised with its own mean and biased variance. A large batch then sees the
noisy statistics of small ones, which is what closes part of the large-batch
generalization gap. Evaluation normalises with the running statistics, exactly
as flax.linen.BatchNorm does, and the layer's variables have the same names and
shapes as flax's (params: scale, bias; batch_stats: mean, var).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Any


def _feature_axes(ndim: int, axis: int | tuple[int, ...]) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(sorted(a % ndim for a in axes))
  if 0 in axes:
    raise ValueError("GhostBatchNorm: axis 0 is the batch axis that ghost batches split; "
                     "it cannot be a feature axis")
  return axes


class GhostBatchNorm(nn.Module):
  """flax.linen.BatchNorm over ghost batches of `ghost_batch_size` examples.

  Training (use_running_average=False), for ghost batches i = 0..k-1 of a local
  batch of n = k * ghost_batch_size examples (batch axis 0):
    * ghost batch i is normalised with its own mean_i and biased var_i, taken
      over every axis but the feature axes; ghost batches never pool statistics
      across devices;
    * the running statistics take one update per ghost batch, in order:
      mean <- momentum * mean + (1 - momentum) * mean_i (and var alike);
    * with axis_name set (inside pmap/shard_map), the updated running statistics
      are then averaged over that axis, so every replica holds the same values.
  A ghost_batch_size of n or more gives a single ghost batch: ordinary per-device
  batch norm. A local batch that is not a multiple of it is an error.

  Evaluation (use_running_average=True) normalises with the running statistics.
  Statistics and the normalisation are computed in float32 (at least); the result
  has `dtype`, or (dtype=None, as in flax) the promotion of the input and parameter
  dtypes. The running statistics are float32 and scale/bias `param_dtype` whatever
  `dtype` is, so dtype=bfloat16 is mixed precision.
  """
  ghost_batch_size: int
  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    if not isinstance(self.ghost_batch_size, int) or self.ghost_batch_size <= 0:
      raise ValueError(f"GhostBatchNorm: ghost_batch_size={self.ghost_batch_size!r} must be a "
                       "positive integer")
    feature_axes = _feature_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
    scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias else None)
    out_dtype = self.dtype or jnp.result_type(x, *(p for p in (scale, bias) if p is not None))
    stats_dtype = jnp.promote_types(out_dtype, jnp.float32)

    if use_running_average:
      y = self._normalize(x.astype(stats_dtype), ra_mean.value, ra_var.value, scale, bias,
                          feature_axes)
      return y.astype(out_dtype)

    n = x.shape[0]
    size = min(self.ghost_batch_size, n)
    if n % size:
      raise ValueError(f"GhostBatchNorm: the local batch of {n} examples is not a multiple of "
                       f"ghost_batch_size={self.ghost_batch_size}; use a batch of k x "
                       f"{self.ghost_batch_size} examples per device, or a ghost_batch_size "
                       f"that divides {n}")
    k = n // size
    # (n, ...) -> (k, g, ...): axis 0 counts ghost batches, the rest is one ghost batch.
    xg = x.reshape(k, size, *x.shape[1:]).astype(stats_dtype)
    ghost_features = tuple(a + 1 for a in feature_axes)
    reduce = tuple(a for a in range(1, xg.ndim) if a not in ghost_features)
    mean = xg.mean(axis=reduce, keepdims=True)
    var = jnp.square(xg - mean).mean(axis=reduce, keepdims=True)  # biased, two-pass
    y = self._normalize(xg, mean, var, scale, bias, ghost_features, keep_dims=True)

    if not self.is_initializing():
      # k sequential updates in closed form: after them, the old value has weight
      # momentum^k and ghost batch i has weight (1 - momentum) * momentum^(k-1-i).
      means = mean.reshape(k, *feature_shape)
      variances = var.reshape(k, *feature_shape)
      weights = (1 - self.momentum) * self.momentum ** jnp.arange(k - 1, -1, -1,
                                                                  dtype=jnp.float32)
      decay = self.momentum ** k
      new_mean = decay * ra_mean.value + jnp.tensordot(weights, means, axes=1)
      new_var = decay * ra_var.value + jnp.tensordot(weights, variances, axes=1)
      if self.axis_name is not None:
        new_mean, new_var = jax.lax.pmean(jnp.stack([new_mean, new_var]), self.axis_name)
      ra_mean.value, ra_var.value = new_mean, new_var
    return y.reshape(x.shape).astype(out_dtype)

  def _normalize(self, x, mean, var, scale, bias, feature_axes, keep_dims=False):
    """(x - mean) / sqrt(var + epsilon) * scale + bias, broadcasting the feature-shaped
    scale and bias (and, unless keep_dims, mean and var) over the other axes."""
    shape = [1] * x.ndim
    for a in feature_axes:
      shape[a] = x.shape[a]
    if not keep_dims:
      mean, var = mean.reshape(shape), var.reshape(shape)
    mul = jax.lax.rsqrt(var + self.epsilon)
    if scale is not None:
      mul = mul * scale.reshape(shape)
    y = (x - mean) * mul
    if bias is not None:
      y = y + bias.reshape(shape)
    return y
