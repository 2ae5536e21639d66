"""Batches of an in-memory dataset: a pure function of (seed, step) and of the process.

The global batch of a step is chosen first (so every process count sees the same
global batch), then split into one contiguous, disjoint slice per process.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The shuffled order of the training examples in one epoch."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def shift_signals(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Circularly shifts each example along its first spatial axis by up to max_shift."""
  shifts = rng.integers(-max_shift, max_shift + 1, size=len(x))
  positions = (np.arange(x.shape[1])[None, :] - shifts[:, None]) % x.shape[1]
  return np.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


class TrainBatches:
  """The training batch of any step, for one process; no state, so resume is exact.

  `examples` (sorted indices; None = all) restricts training to those examples
  (data pruning): an epoch is then a shuffle of them alone. Each batch carries the
  examples' indices ("index") in the whole training set.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, *, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, max_shift: int = 0,
               examples: np.ndarray | None = None):
    self.x, self.y = x, y
    self.examples = None if examples is None else np.asarray(examples, np.int64)
    self.num_examples = len(x) if examples is None else len(self.examples)
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.steps_per_epoch = self.num_examples // global_batch_size  # the remainder is dropped
    self.per_process = global_batch_size // process_count
    self.process_slice = slice(process_index * self.per_process,
                               (process_index + 1) * self.per_process)
    self.max_shift = max_shift
    self._order_cache: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._order_cache is None or self._order_cache[0] != epoch:
      order = epoch_order(self.seed, epoch, self.num_examples)
      self._order_cache = (epoch, order if self.examples is None else self.examples[order])
    return self._order_cache[1]

  def global_indices(self, step: int) -> np.ndarray:
    """Indices of the examples in the whole (all-process) batch of a step."""
    epoch, index = divmod(step, self.steps_per_epoch)
    start = index * self.global_batch_size
    return self._order(epoch)[start:start + self.global_batch_size]

  def __call__(self, step: int) -> Batch:
    indices = self.global_indices(step)
    x, y = self.x[indices], self.y[indices]
    if self.max_shift:
      # Augmented on the global batch, so the result does not depend on the process count.
      x = shift_signals(x, self.max_shift, np.random.default_rng([self.seed, step, 1]))
    return {"x": x[self.process_slice], "y": y[self.process_slice],
            "index": indices[self.process_slice].astype(np.int32)}


def eval_batches(x: np.ndarray, y: np.ndarray, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Every example exactly once, in index order; the last batch is zero-padded with mask 0.

  Every process yields the same number of batches, so no process waits forever
  on a collective that another never reaches.
  """
  per_process = global_batch_size // process_count
  num_batches = -(-len(x) // global_batch_size)
  for b in range(num_batches):
    start = b * global_batch_size + process_index * per_process
    indices = np.arange(start, start + per_process)
    mask = indices < len(x)
    indices = np.where(mask, indices, 0)
    yield {"x": np.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x[indices], 0).astype(x.dtype),
           "y": np.where(mask, y[indices], 0).astype(y.dtype),
           "mask": mask.astype(np.float32), "index": indices.astype(np.int32)}
