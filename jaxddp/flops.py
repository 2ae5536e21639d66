"""FLOPs of a model's dense and convolution layers, counted from shapes alone.

`find_layers` lists the layers a model runs (flax's Dense and Conv, and jaxddp's masked
ones), with their kernel shapes and output positions, by tracing its initialisation
(jax.eval_shape: nothing is computed). `per_example` counts one example's forward and
backward FLOPs, dense and sparse; sparse training (jaxddp.sparsity) reports them with
its masks, and compute-optimal sizing (jaxddp.scaling) uses the dense count. The
formulas are in docs/sparsity.md. Other layers (normalisation, activations, attention's
softmax and products) are not counted: for the built-in models they are a small part.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxddp.nn import MaskedConv, MaskedDense

LAYER_TYPES = (nn.Dense, nn.Conv, MaskedDense, MaskedConv)


@dataclasses.dataclass(frozen=True)
class Layer:
  """A dense or convolution layer of the model, for masks and FLOPs."""
  name: str  # module path, e.g. "BasicBlock_0/MaskedConv_1"
  kernel_shape: tuple[int, ...]
  positions: int  # output positions per example: 1 for a dense layer on vectors
  masked: bool  # a MaskedDense/MaskedConv (False: kept dense, e.g. skip_first_layer)
  activation_sparsity: float  # SWAT's, in the backward pass; 0 without SWAT

  @property
  def size(self) -> int:
    return math.prod(self.kernel_shape)


def find_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
  """The model's dense and convolution layers in the order they run, from shapes alone."""
  found = {}  # path -> the module's activation_sparsity, in the order the layers run

  def is_layer(module: nn.Module, method: str) -> bool:
    hit = method == "__call__" and isinstance(module, LAYER_TYPES)
    if hit:
      found.setdefault(module.scope.path, getattr(module, "activation_sparsity", 0.0))
    return hit

  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False,
                         capture_intermediates=is_layer))
  outputs = traverse_util.flatten_dict(variables["intermediates"])
  kernels = traverse_util.flatten_dict(variables["params"])
  masks = traverse_util.flatten_dict(variables.get("masks", {}))
  return [Layer(name="/".join(path), kernel_shape=tuple(kernels[(*path, "kernel")].shape),
                positions=math.prod(outputs[(*path, "__call__")][0].shape[1:-1]),
                masked=(*path, "kernel") in masks, activation_sparsity=activation_sparsity)
          for path, activation_sparsity in found.items()]


def per_example(layers: list[Layer] | tuple[Layer, ...], nonzeros: dict[str, Any],
                sparse_backward: bool = False) -> dict[str, Any]:
  """Forward and backward FLOPs of one example, dense and sparse (docs/sparsity.md).

  With P output positions, W kernel entries and n of them non-zero (`nonzeros` by
  layer name; traced arrays work too): forward 2PW dense, 2Pn sparse; backward 4PW
  dense (input and kernel gradients), sparse 2Pn for the input gradient plus, for the
  kernel gradient, 2Pn under pruning (only kept weights need one), 2PW(1 - a) with
  `sparse_backward` (SWAT: a dense gradient from an input with a fraction a zeroed),
  2PW for an unmasked layer.
  """
  totals = dict.fromkeys(("forward_dense", "forward_sparse", "backward_dense",
                          "backward_sparse"), 0.0)
  for layer in layers:
    p, w, n = layer.positions, layer.size, nonzeros[layer.name]
    if not layer.masked:
      kernel_grad = 2 * p * w
    elif sparse_backward:
      kernel_grad = 2 * p * w * (1.0 - layer.activation_sparsity)
    else:
      kernel_grad = 2 * p * n
    totals["forward_dense"] += 2 * p * w
    totals["forward_sparse"] += 2 * p * n
    totals["backward_dense"] += 4 * p * w
    totals["backward_sparse"] += 2 * p * n + kernel_grad
  return totals


def dense_forward(layers: list[Layer] | tuple[Layer, ...]) -> float:
  """Forward FLOPs of one example with every weight: the sum of 2PW."""
  return float(sum(2 * layer.positions * layer.size for layer in layers))
