"""Per-example outputs over a whole split, data-parallel: the primitive scores build on.

`per_example_outputs` runs the model (in evaluation mode: running batch-norm
statistics, no dropout) over every example of a split exactly once, on every device
of every process, in padded and masked batches as evaluation does, and returns on
every process one value per example in the dataset's index order:

* "label" (N,) always; "logits" (N, classes), "loss" (N,) (the run's loss function),
  "correct" (N,) 0/1;
* "embedding" (N, features): the penultimate embedding, i.e. the input of the last
  layer. It is the input of the last call of a module named "head" (every built-in
  model names its classifier so), else of the last nn.Dense the model calls;
* "grad_norm" (N,): the L2 norm over all parameters of the gradient of the example's
  own loss (per-example gradients by vmap, chunk_size examples at a time on each
  device, so memory stays bounded).

Each step gathers the global batch's outputs with their indices onto every device
(jaxddp.steps.gather_batch), so every process ends with the whole table.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxddp import losses, parallel
from jaxddp.state import TrainState
from jaxddp.steps import gather_batch, per_device

OUTPUTS = ("logits", "loss", "correct", "embedding", "grad_norm")


def apply_with_embedding(state: TrainState, x: jnp.ndarray, params=None):
  """(logits, embedding): the model in evaluation mode, and the input of its last layer."""
  seen: dict[str, Any] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and (module.name == "head" or (
        isinstance(module, nn.Dense) and "head" not in seen)):
      seen["head" if module.name == "head" else "dense"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    logits = state.apply_fn(state.variables(params), x, train=False)
  embedding = seen.get("head", seen.get("dense"))
  if embedding is None:
    raise ValueError("the model calls no module named 'head' and no nn.Dense: no penultimate "
                     "embedding to take")
  return logits, embedding.reshape(len(x), -1).astype(jnp.float32)


def _grad_norms(state: TrainState, x: jnp.ndarray, y: jnp.ndarray, loss_fn, chunk_size: int):
  """The L2 norm of each example's loss gradient over all parameters.

  The parameters are first marked per-device: under shard_map the gradient with
  respect to a replicated value would come back summed over the devices (see
  jaxddp.steps).
  """
  params = per_device(state.params)

  def norm(example):
    xi, yi = example
    def loss(params):
      logits = state.apply_fn(state.variables(params), xi[None], train=False)
      return loss_fn(logits, yi[None])[0]
    grads = jax.grad(loss)(params)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree.leaves(grads)))
  return jax.lax.map(norm, (x, y), batch_size=min(chunk_size, len(x)))


def _outputs_step(state: TrainState, batch: dict, *, loss_fn, what: tuple[str, ...],
                  chunk_size: int) -> dict:
  """Per device: this slice's outputs, gathered into the global batch's on every device."""
  x, y = batch["x"], batch["y"]
  out = {}
  if set(what) - {"grad_norm"}:
    if "embedding" in what:
      logits, out["embedding"] = apply_with_embedding(state, x)
    else:
      logits = state.apply_fn(state.variables(), x, train=False)
    out["logits"] = logits.astype(jnp.float32)
    out["loss"] = loss_fn(logits, y).astype(jnp.float32)
    out["correct"] = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
  if "grad_norm" in what:
    out["grad_norm"] = _grad_norms(state, x, y, loss_fn, chunk_size)
  out = {k: v for k, v in out.items() if k in what}
  out["label"], out["index"], out["mask"] = y, batch["index"], batch["mask"]
  return jax.tree.map(gather_batch, out)


def per_example_outputs(backend: parallel.Backend, state: TrainState, batches: Iterable[dict],
                        num_examples: int, what: Iterable[str] = ("logits", "loss", "correct"),
                        *, loss_fn: Callable = losses.cross_entropy, chunk_size: int = 32,
                        on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
  """{output: array with one row per example, in index order} over `batches` (this
  process's part of padded, masked batches with "index", e.g.
  dataset.eval_batches(..., split="train")), which must hold each of the
  `num_examples` examples exactly once (checked: a ValueError otherwise).

  `state` is the backend's device view (backend.put_state). on_batch(examples done so
  far) is called after each batch (progress).
  """
  what = tuple(what)
  unknown = set(what) - set(OUTPUTS)
  if unknown:
    raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
  step = backend.map_replicated(functools.partial(_outputs_step, loss_fn=loss_fn, what=what,
                                                  chunk_size=chunk_size))
  result: dict[str, np.ndarray] = {}
  seen = np.zeros(num_examples, np.int64)
  for batch in batches:  # one at a time: unbounded dispatch can deadlock CPU collectives
    out = step(state, backend.put_batch(batch))
    real = out.pop("mask") > 0
    index = out.pop("index")[real].astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= num_examples):
      raise ValueError(f"a batch holds the example index {int(index.max())}, outside "
                       f"[0, {num_examples})")
    np.add.at(seen, index, 1)
    for name, values in out.items():
      if name not in result:
        result[name] = np.zeros((num_examples, *values.shape[1:]), values.dtype)
      result[name][index] = values[real]
    if on_batch is not None:
      on_batch(int(seen.sum()))
  if not (seen == 1).all():
    missing, repeated = int((seen == 0).sum()), int((seen > 1).sum())
    raise ValueError(f"the batches must hold each of the {num_examples} examples exactly once: "
                     f"{missing} never appeared, {repeated} appeared more than once")
  return result
