"""Evaluation over a whole split, data-parallel: totals, and outputs per example.

* `evaluate`: loss and accuracy over every test example exactly once (what a run logs
  as eval/loss and eval/accuracy).
* `per_example_outputs`: the primitive that data-pruning scores and the cascade build
  on. It runs the model (in evaluation mode: running batch-norm
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
* `split_outputs`: the same for given weights (a trained run's, an initialisation's),
  evaluated with a run's fresh setup, on its training or test split.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxddp import data, losses, parallel
from jaxddp.metrics import SumCounter
from jaxddp.recipe import Recipe
from jaxddp.state import TrainState, local_value
from jaxddp.steps import gather_batch, per_device

OUTPUTS = ("logits", "loss", "correct", "embedding", "grad_norm")


def evaluate(backend: parallel.Backend, state: TrainState, dataset: data.Dataset,
             recipe: Recipe) -> dict[str, float]:
  """Loss and accuracy over every test example exactly once (padded, masked batches)."""
  batches = dataset.eval_batches(global_batch_size=recipe.eval_global_batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  counter = SumCounter()
  for batch in batches:  # one batch at a time: unbounded dispatch can deadlock CPU collectives
    counter.add(parallel.metrics_to_host([backend.eval_step(state, backend.put_batch(batch))])[0])
  return counter.averages()


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


def split_outputs(run: Any, weights: TrainState, split: str,
                  what: Iterable[str] = ("logits",), **options: Any) -> dict[str, np.ndarray]:
  """per_example_outputs of `weights` (a host TrainState: its params, batch statistics
  and masks are used) over every example of run.dataset's `split` ("train" or "test").

  `run` is a fresh jaxddp.train.Setup: its backend, initial state (for everything but
  the weights), dataset and recipe. `options` go to per_example_outputs (loss_fn=,
  chunk_size=, on_batch=).
  """
  base = jax.tree.map(local_value, run.backend.global_state(run.state))
  state = base.replace(params=weights.params, batch_stats=weights.batch_stats,
                       masks=weights.masks)
  dataset = run.dataset
  count = dataset.num_train_examples if split == "train" else dataset.num_test_examples
  batches = dataset.eval_batches(global_batch_size=run.recipe.eval_global_batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count(), split=split)
  return per_example_outputs(run.backend, run.backend.put_state(state), batches, count, what,
                             **options)
