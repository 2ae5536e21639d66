"""Weight masks, pruning schedules, and the sparsity and FLOPs reports.

The built-in models use jaxddp.nn.MaskedDense / MaskedConv when
config.sparsity.method != "none" (a model of your own uses them where it likes);
each holds a mask in the collection "masks" (state.masks here). This module decides
those masks. Each method is one entry of the METHODS registry, a `Method` that says
when its masks change and what a change does:

* magnitude: at start_step, keep the largest-magnitude weights (one shot).
* gradual_magnitude: the same every update_every steps from start_step to
  end_step, the target rising as s_t = s (1 - (1 - (t - start) / (end - start))^3)
  (Zhu & Gupta 2017).
* random: a random mask drawn once, at initialisation (static).
* swat: the top-K magnitude mask, recomputed every update_every steps from
  start_step; the layers also sparsify their input in the backward pass (SWAT,
  Raihan & Aamodt 2020; see jaxddp/nn/masked.py).

Pruning methods (the first three) zero the pruned weights and their optimizer
state when a mask changes; from then on the gradient of a pruned weight is 0
(the forward pass uses kernel * mask, so the chain rule multiplies by the mask),
so is its update, and the weight stays exactly 0. Under swat the kernel gradient
is dense and every weight is updated, so a dropped weight can come back.

The target sparsity is spread over the masked layers by `distribution` (uniform:
each layer gets it; erk: Erdos-Renyi-Kernel, Evci et al. 2020), or, with scope
"global", by one magnitude threshold over all of them. Masks are computed inside
the training step from the replicated weights, so they are identical on every
device, and they are part of the checkpoint.

FLOPs are counted by jaxddp.flops (the formulas are in docs/sparsity.md); this module
gives it the masks' non-zeros.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from jaxddp import flops
from jaxddp.errors import ConfigError
from jaxddp.flops import Layer, find_layers  # noqa: F401  (the layers masks are made for)
from jaxddp.nn.masked import kth_largest
from jaxddp.recipe import Recipe
from jaxddp.registry import Registry
from jaxddp.state import TrainState

@dataclasses.dataclass(frozen=True)
class Method:
  """What a sparsity method (config.sparsity.method) does; Sparsity and the models read it.

  updates: when the masks are recomputed from the weights' magnitudes: "never",
  "once" (at start_step), "gradual" (every update_every steps from start_step to
  end_step, on Zhu & Gupta's cubic schedule) or "periodic" (every update_every
  steps from start_step on).
  """
  masked: bool = True  # the built-in models use MaskedDense / MaskedConv
  initial: str = "ones"  # the masks at initialisation: "ones", or "random" (drawn once)
  updates: str = "never"
  prunes: bool = True  # a new mask zeroes the pruned weights and their optimizer state
  sparse_backward: bool = False  # SWAT: the kernel gradient from a sparsified layer input


METHODS: Registry[Method] = Registry("sparsity method", "sparsity.method")
METHODS.register("none")(Method(masked=False))
METHODS.register("magnitude")(Method(updates="once"))
METHODS.register("gradual_magnitude")(Method(updates="gradual"))
METHODS.register("random")(Method(initial="random"))
METHODS.register("swat")(Method(updates="periodic", prunes=False, sparse_backward=True))


def erk_densities(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
  """Erdos-Renyi-Kernel (Evci et al. 2020): density of a layer proportional to
  sum(shape) / prod(shape), scaled so that the total density is 1 - sparsity;
  a layer that would exceed density 1 is kept dense and the rest rescaled."""
  sizes = {name: math.prod(shape) for name, shape in shapes.items()}
  raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
  dense: set[str] = set()
  while True:
    budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[n] for n in dense)
    scale = budget / sum(raw[n] * sizes[n] for n in shapes if n not in dense)
    too_dense = {n for n in shapes if n not in dense and scale * raw[n] > 1.0}
    if not too_dense:
      return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
    dense |= too_dense


@dataclasses.dataclass(frozen=True)
class Sparsity:
  """config.sparsity, resolved against the model and the run's length."""
  method: str
  weight_sparsity: float
  distribution: str
  scope: str
  start_step: int
  end_step: int
  update_every: int
  layers: tuple[Layer, ...]
  effective_batch_size: int
  seed: int

  # --- the schedule ---

  @property
  def spec(self) -> Method:
    return METHODS[self.method]

  @property
  def masked_layers(self) -> tuple[Layer, ...]:
    return tuple(layer for layer in self.layers if layer.masked)

  def target(self, step: int) -> float:
    """The weight sparsity the masks have after the update at `step` (if any)."""
    if not self.spec.masked or step < self.start_step:
      return 0.0
    if self.spec.updates == "gradual":
      progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
      return self.weight_sparsity * (1.0 - (1.0 - progress) ** 3)
    return self.weight_sparsity

  def update_steps(self) -> list[int]:
    """Steps at whose start "once" and "gradual" methods recompute the masks (periodic
    updates are tested for in `update`)."""
    if self.spec.updates == "once":
      return [self.start_step]
    if self.spec.updates == "gradual":
      steps = list(range(self.start_step, self.end_step, self.update_every))
      return steps + [self.end_step]
    return []

  def keep_counts(self, sparsity: float) -> dict[str, int] | int:
    """Weights each masked layer keeps at `sparsity` (one count for global scope)."""
    shapes = {layer.name: layer.kernel_shape for layer in self.masked_layers}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    if self.scope == "global":
      return int(round((1.0 - sparsity) * sum(sizes.values())))
    if self.distribution == "erk" and sparsity > 0:
      densities = erk_densities(shapes, sparsity)
    else:
      densities = {name: 1.0 - sparsity for name in shapes}
    return {name: min(sizes[name], int(round(densities[name] * sizes[name])))
            for name in shapes}

  # --- masks ---

  def initialize(self, state: TrainState) -> TrainState:
    """Masks at initialisation: random ones for `random`, all ones otherwise."""
    if self.spec.initial != "random" or not self.masked_layers:
      return state
    kernels = _kernels(state.params, self.masked_layers)
    keys = jax.random.split(jax.random.key(self.seed + 1), len(kernels))
    scores = {name: jax.random.uniform(key, kernel.shape)
              for key, (name, kernel) in zip(keys, kernels.items())}
    masks = self._top_masks(scores, self._counts_table([self.weight_sparsity])[0])
    return self._prune(state, masks)

  def update(self, state: TrainState) -> TrainState:
    """Recomputes the masks if this step (state.step) is an update step. Traced."""
    if self.spec.updates == "never" or not self.masked_layers:
      return state
    step = state.step
    if self.spec.updates == "periodic":
      is_update = (step >= self.start_step) & ((step - self.start_step) % self.update_every == 0)
      counts = self._counts_table([self.weight_sparsity])[0]
    else:
      steps = jnp.asarray(self.update_steps())
      is_update = jnp.any(steps == step)
      table = self._counts_table([self.target(t) for t in self.update_steps()])
      counts = table[jnp.argmax(steps == step)]
    return jax.lax.cond(is_update, lambda s: self._recompute(s, counts), lambda s: s, state)

  def _counts_table(self, targets: list[float]) -> jnp.ndarray:
    """Keep counts for each target: one row per target, one column per masked layer
    (a single column for global scope)."""
    rows = []
    for target in targets:
      counts = self.keep_counts(target)
      rows.append([counts] if isinstance(counts, int) else
                  [counts[layer.name] for layer in self.masked_layers])
    return jnp.asarray(rows, jnp.int32)

  def _recompute(self, state: TrainState, counts: jnp.ndarray) -> TrainState:
    kernels = _kernels(state.params, self.masked_layers)
    masks = self._top_masks({n: jnp.abs(k) for n, k in kernels.items()}, counts)
    if not self.spec.prunes:
      return state.replace(masks=_unflatten(masks, state.masks))
    return self._prune(state, masks)

  def _top_masks(self, scores: dict[str, jnp.ndarray], counts) -> dict[str, jnp.ndarray]:
    """Ones where a score is among the largest `counts`: per layer (counts[i] for the
    i-th masked layer), or over all layers together for global scope (counts[0])."""
    if self.scope == "global":
      threshold = kth_largest(jnp.concatenate([s.ravel() for s in scores.values()]), counts[0])
      return {n: (s >= threshold).astype(jnp.float32) for n, s in scores.items()}
    return {n: (s >= kth_largest(s, counts[i])).astype(jnp.float32)
            for i, (n, s) in enumerate(scores.items())}

  def _prune(self, state: TrainState, masks: dict[str, jnp.ndarray]) -> TrainState:
    """New masks; pruned weights and their optimizer state (momenta, moments) set to 0."""
    full = _masks_like_params(state.params, masks)
    params = jax.tree.map(jnp.multiply, state.params, full)
    opt_state = optax.tree_utils.tree_map_params(
        state.tx, lambda value, mask: value * mask, state.opt_state, full,
        transform_non_params=lambda value: value)
    return state.replace(params=params, opt_state=opt_state,
                         masks=_unflatten(masks, state.masks))

  # --- reports ---

  def nonzeros(self, masks) -> dict[str, Any]:
    """Weights each layer computes with: the mask's ones, or every weight if unmasked.

    Works on device arrays (inside a step) and on host arrays (reports)."""
    flat = traverse_util.flatten_dict(masks, sep="/") if masks else {}
    xp = jnp if any(isinstance(m, jax.Array) for m in flat.values()) else np
    return {layer.name: xp.sum(flat[layer.name + "/kernel"]) if layer.masked else layer.size
            for layer in self.layers}

  def flops_per_example(self, nonzeros: dict[str, Any]) -> dict[str, Any]:
    """Forward and backward FLOPs of one example, dense and sparse (jaxddp.flops)."""
    return flops.per_example(self.layers, nonzeros, self.spec.sparse_backward)

  def train_step_flops(self, masks) -> jnp.ndarray:
    """Sparse FLOPs of one optimizer step (forward + backward, effective batch). Traced."""
    counts = self.flops_per_example(self.nonzeros(masks))
    return (counts["forward_sparse"] + counts["backward_sparse"]) * self.effective_batch_size

  def report(self, masks) -> dict[str, float]:
    """Per-layer and total weight sparsity and the FLOPs, as metrics (host side)."""
    masks = jax.tree.map(np.asarray, masks)
    nonzeros = {name: float(n) for name, n in self.nonzeros(masks).items()}
    scalars = {f"sparsity/{layer.name}": 1.0 - nonzeros[layer.name] / layer.size
               for layer in self.layers}
    total = sum(layer.size for layer in self.layers)
    scalars["sparsity/total"] = 1.0 - sum(nonzeros.values()) / total if total else 0.0
    counts = self.flops_per_example(nonzeros)
    scalars.update({f"flops/{k}": float(v) for k, v in counts.items()})
    per_step = lambda kind: (counts[f"forward_{kind}"] + counts[f"backward_{kind}"]) \
        * self.effective_batch_size
    scalars["flops/train_step_dense"] = per_step("dense")
    scalars["flops/train_step_sparse"] = per_step("sparse")
    return scalars

  def format_table(self, scalars: dict[str, float], train_total: float,
                   train_total_dense: float) -> str:
    """The end-of-run table: each layer, then the totals."""
    rows = [("layer", "kernel", "weights", "sparsity", "act. sp.", "fwd MFLOP/ex")]
    for layer in self.layers:
      sparsity = scalars[f"sparsity/{layer.name}"]
      nonzero = layer.size * (1.0 - sparsity)
      rows.append((layer.name, "x".join(map(str, layer.kernel_shape)), str(layer.size),
                   f"{sparsity:.1%}", f"{layer.activation_sparsity:.0%}" if
                   layer.masked and self.spec.sparse_backward else "-",
                   f"{2 * layer.positions * nonzero / 1e6:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    ratio = lambda kind: scalars[f"flops/{kind}_sparse"] / scalars[f"flops/{kind}_dense"]
    lines += [
        f"weight sparsity (all layers above): {scalars['sparsity/total']:.1%}",
        f"FLOPs per example   forward  {scalars['flops/forward_dense'] / 1e6:.3f}M dense, "
        f"{scalars['flops/forward_sparse'] / 1e6:.3f}M sparse ({ratio('forward'):.2f}x)",
        f"                    backward {scalars['flops/backward_dense'] / 1e6:.3f}M dense, "
        f"{scalars['flops/backward_sparse'] / 1e6:.3f}M sparse ({ratio('backward'):.2f}x)",
        f"training FLOPs      {train_total_dense:.4g} dense, {train_total:.4g} sparse "
        f"({train_total / train_total_dense if train_total_dense else 1:.2f}x)"]
    return "\n".join(lines)


def _masks_like_params(params, masks: dict[str, jnp.ndarray]):
  """A tree shaped like params: each masked kernel's mask, a scalar 1 elsewhere."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict(
      {path: masks.get(path.removesuffix("/kernel"), jnp.ones((), value.dtype))
       if path.endswith("/kernel") else jnp.ones((), value.dtype)
       for path, value in flat.items()}, sep="/")


def _kernels(params, layers) -> dict[str, jnp.ndarray]:
  flat = traverse_util.flatten_dict(params, sep="/")
  return {layer.name: flat[layer.name + "/kernel"] for layer in layers}


def _unflatten(masks: dict[str, jnp.ndarray], like) -> Any:
  """{"Conv_0": mask} -> the masks collection's nested form, in `like`'s dtypes."""
  dtypes = traverse_util.flatten_dict(like, sep="/")
  return traverse_util.unflatten_dict(
      {f"{name}/kernel": mask.astype(dtypes[f"{name}/kernel"].dtype)
       for name, mask in masks.items()}, sep="/")


def create(config: ml_collections.ConfigDict, recipe: Recipe, model: nn.Module,
           input_shape: tuple[int, ...]) -> Sparsity:
  """The run's Sparsity: config.sparsity checked against the run's length and the model.

  The masked layers are the model's jaxddp.nn.MaskedDense / MaskedConv: the built-in
  models' layers under a masked method, or whichever a model of your own uses."""
  sp = config.sparsity
  method = METHODS[sp.method]
  total = recipe.total_steps
  end_step = sp.end_step or (total * 3) // 4
  if method.updates != "never" and sp.start_step >= total:
    raise ConfigError(f"config.sparsity.start_step={sp.start_step} is not before the end of "
                      f"training ({total} steps); nothing would be pruned")
  if method.updates == "gradual" and end_step <= sp.start_step:
    what = (f"config.sparsity.end_step={sp.end_step}" if sp.end_step else
            f"config.sparsity.end_step=0 (3/4 of the {total} steps: {end_step})")
    raise ConfigError(f"{what} must be after config.sparsity.start_step={sp.start_step}")
  layers = tuple(find_layers(model, input_shape))
  if method.masked and not any(layer.masked for layer in layers):
    raise ConfigError(f"config.sparsity.method={sp.method!r} but the model has no masked layer "
                      "to sparsify (a built-in model has none when skip_first_layer and "
                      "skip_last_layer exclude all; a model of your own needs "
                      "jaxddp.nn.MaskedDense / MaskedConv layers)")
  return Sparsity(method=sp.method, weight_sparsity=float(sp.weight_sparsity),
                  distribution=sp.distribution, scope=sp.scope, start_step=sp.start_step,
                  end_step=end_step, update_every=sp.update_every, layers=layers,
                  effective_batch_size=recipe.effective_batch_size, seed=config.seed)

