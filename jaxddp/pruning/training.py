"""What a training run needs from data pruning: the static subset, the per-example tables
in the state, and InfoBatch's epochs.

* Static (config.data_pruning.scores): the kept examples are chosen once, before
  anything compiles (`kept_examples`); the dataset then draws every batch from them,
  so the order stays a function of (seed, step) and the recipe counts epochs of them.
* Dynamic (config.data_pruning.dynamic=infobatch): `InfoBatchEpochs` plans each
  epoch when it starts, from the per-example loss table the training step keeps in
  state.examples (the same on every device and process): which examples it skips
  and how much the others weigh (jaxddp.pruning.select.infobatch_weights), written
  into the state with the epoch's first step and length. A checkpoint therefore
  holds the epoch being run and the table, and a resumed run goes on exactly.

Under InfoBatch the epochs get shorter, but the learning-rate schedule is still laid
out over the run's epochs as if every epoch were whole: step i of an epoch e of n
steps is at position (e + i / n) x (steps of a full epoch) of the schedule. Warmup
therefore lasts warmup_epochs epochs (or warmup_steps full-epoch steps) and the decay
reaches its end when the last epoch does, however many steps the epochs had.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import itertools
import math
import os
from typing import Callable, Iterator

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxddp.config import ConfigError, Recipe
from jaxddp.pruning import select


def kept_examples(config: ml_collections.ConfigDict, dataset) -> np.ndarray | None:
  """The sorted indices of the training examples a static subset keeps (None: all)."""
  dp = config.data_pruning
  if not dp.scores and dp.keep_fraction == 1:
    return None
  if dp.scores:
    scores = load_scores(dp.scores, dataset.num_train_examples)
  else:  # policy random needs no scores
    scores = np.zeros(dataset.num_train_examples)
  labels = None
  if dp.class_balance:
    if not hasattr(dataset, "train_labels"):
      raise ConfigError(f"config.data_pruning.class_balance needs the labels of the training "
                        f"set, which a {type(dataset).__name__} does not give (train_labels())")
    labels = np.asarray(dataset.train_labels())
  try:
    kept = select.subset(scores, dp.keep_fraction, dp.policy, seed=config.seed, labels=labels,
                         ccs_drop_fraction=dp.ccs_drop_fraction)
  except ValueError as error:
    raise ConfigError(f"config.data_pruning: {error} (lower keep_fraction or "
                      "ccs_drop_fraction)") from None
  batch = config.train.batch_size * config.train.accumulation_steps
  if len(kept) < batch:
    raise ConfigError(f"config.data_pruning.keep_fraction={dp.keep_fraction} keeps {len(kept)} "
                      f"of the {len(scores)} training examples, fewer than one batch of {batch}")
  return kept


def load_scores(path: str, num_examples: int) -> np.ndarray:
  """One finite float per training example from an .npy file, or a one-line ConfigError."""
  field = f"config.data_pruning.scores={path!r}"
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "**", "*.npy"), recursive=True))[:3]
    raise ConfigError(f"{field} is a directory; give the scores file itself"
                      + (f", e.g. {found[0]}" if found else " (WORKDIR/scores/<score>.npy)"))
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no such file (write one with `python -m jaxddp.score`)")
  try:
    scores = np.load(path, allow_pickle=False)
  except Exception:  # not an .npy file: a .json, text, a pickle
    raise ConfigError(f"{field} is not an .npy file of numbers; scores are the "
                      "WORKDIR/scores/<score>.npy that `python -m jaxddp.score` writes") from None
  if not isinstance(scores, np.ndarray) or scores.ndim != 1 or len(scores) != num_examples:
    raise ConfigError(f"{field} has shape {scores.shape}, but the dataset has {num_examples} "
                      f"training examples: it needs one score each ({num_examples},)")
  if scores.dtype.kind not in "biuf" or not np.isfinite(scores).all():
    raise ConfigError(f"{field} holds non-finite or non-numeric scores")
  return scores.astype(np.float64)


def check_dataset(config: ml_collections.ConfigDict, dataset) -> None:
  """A one-line error if the config's data pruning needs what `dataset` lacks: train_batches
  with an `examples` argument (subsets, InfoBatch) and batches with "index"."""
  dp = config.data_pruning
  if not (dp.scores or dp.keep_fraction < 1 or is_dynamic(config) or dp.track_forgetting):
    return
  if "examples" not in inspect.signature(dataset.train_batches).parameters:
    raise ConfigError(f"config.data_pruning needs a dataset that trains on chosen examples and "
                      f"gives their indices, which a {type(dataset).__name__} does not: its "
                      "train_batches has no `examples` argument (see jaxddp.data.Dataset)")


def is_dynamic(config: ml_collections.ConfigDict) -> bool:
  return config.data_pruning.dynamic != "none"


def initial_tables(config: ml_collections.ConfigDict, num_examples: int, num_classes: int,
                   recipe: Recipe) -> dict[str, jnp.ndarray]:
  """state.examples at the start of a run: {} unless the run tracks per-example values.

  InfoBatch: every example's loss starts at ln(classes), a uniform guess's, so none
  is below the mean and the first epoch sees all of them. Forgetting: nothing
  correct yet, nothing forgotten or learned.
  """
  tables = {}
  if is_dynamic(config):
    tables.update(loss=jnp.full((num_examples,), math.log(max(num_classes, 2)), jnp.float32),
                  weight=jnp.ones((num_examples,), jnp.float32),
                  epoch=jnp.zeros((), jnp.int32), epoch_start=jnp.zeros((), jnp.int32),
                  epoch_steps=jnp.asarray(recipe.steps_per_epoch, jnp.int32))
  if config.data_pruning.track_forgetting:
    tables.update({name: jnp.zeros((num_examples,), jnp.float32)
                   for name in ("correct", "forgotten", "learned")})
  return tables


def schedule_step(recipe: Recipe) -> Callable:
  """state -> the position in the learning-rate schedule, in full-epoch steps (InfoBatch)."""
  def position(state):
    e = state.examples
    progress = e["epoch"] + (state.step - e["epoch_start"]) / e["epoch_steps"]
    return progress.astype(jnp.float32) * recipe.steps_per_epoch
  return position


def check_recipe(config: ml_collections.ConfigDict, recipe: Recipe) -> None:
  if is_dynamic(config):
    if config.train.num_steps:
      raise ConfigError("config.data_pruning.dynamic sets the run's length in epochs (they get "
                        "shorter); use config.train.num_epochs, not train.num_steps")
    if recipe.total_steps % recipe.steps_per_epoch:
      raise ConfigError(f"config.data_pruning.dynamic needs a whole number of epochs; the run "
                        f"has {recipe.epochs:g}")


def describe(config: ml_collections.ConfigDict, dataset_size: int, kept: np.ndarray | None,
             recipe: Recipe) -> str:
  dp = config.data_pruning
  if kept is not None:
    scores = f", scores {dp.scores}" if dp.scores else ""
    balanced = ", class-balanced" if dp.class_balance else ""
    return (f"static subset: {len(kept)} of {dataset_size} examples kept ({dp.policy}"
            f"{balanced}, keep_fraction {dp.keep_fraction}{scores})")
  if is_dynamic(config):
    epochs = recipe.total_steps // recipe.steps_per_epoch
    pruned = min(anneal_epoch(config, epochs), epochs)
    return (f"infobatch: prune_ratio {dp.prune_ratio}, prunes in the first {pruned} of {epochs} "
            f"epochs (the first sees everything), all the data in the last {epochs - pruned}; "
            f"at most {recipe.total_steps} steps")
  return "none"


def anneal_epoch(config: ml_collections.ConfigDict, num_epochs: int) -> int:
  """The first epoch (from 0) that trains on all the data again."""
  return math.ceil(config.data_pruning.anneal_fraction * num_epochs)


@dataclasses.dataclass
class InfoBatchEpochs:
  """The steps of an InfoBatch run, epoch by epoch (see the module's docstring).

  `steps` yields (step, batch on the devices). At the start of each epoch it calls
  read_tables() (which must first wait for every step dispatched: the table is the
  one after the previous epoch) and write_tables(new entries); `last_step` is set as
  soon as the last epoch is planned.
  """
  config: ml_collections.ConfigDict
  dataset: object
  recipe: Recipe
  process_index: int
  process_count: int
  last_step: int | None = None
  _current: dict | None = None  # the tables of the epoch being run

  @property
  def num_epochs(self) -> int:
    return self.recipe.total_steps // self.recipe.steps_per_epoch

  def plan(self, epoch: int, start: int, losses: np.ndarray) -> dict[str, np.ndarray]:
    """The state.examples entries of an epoch starting at step `start`."""
    dp = self.config.data_pruning
    weights = select.infobatch_weights(
        losses, dp.prune_ratio, seed=self.config.seed, epoch=epoch,
        anneal=epoch >= anneal_epoch(self.config, self.num_epochs))
    steps = int(np.count_nonzero(weights)) // self.recipe.effective_batch_size
    if steps == 0:
      raise ConfigError(f"InfoBatch kept {np.count_nonzero(weights)} examples in epoch {epoch}, "
                        "fewer than one batch; lower config.data_pruning.prune_ratio")
    return {"weight": weights, "epoch": np.int32(epoch), "epoch_start": np.int32(start),
            "epoch_steps": np.int32(steps)}

  def steps(self, start_step: int, read_tables: Callable[[], dict],
            write_tables: Callable[[dict], None],
            put_batches: Callable) -> Iterator[tuple[int, dict]]:
    from jaxddp import data  # data imports config, as this module does; no cycle at import
    tables = self._current = read_tables()
    epoch, step = int(tables["epoch"]), start_step
    if step == int(tables["epoch_start"]) + int(tables["epoch_steps"]):  # saved at its end
      epoch, tables = self._next_epoch(epoch, step, read_tables, write_tables)
    while epoch < self.num_epochs:
      self._current = tables
      start, length = int(tables["epoch_start"]), int(tables["epoch_steps"])
      if epoch == self.num_epochs - 1:
        self.last_step = start + length
      host = self.dataset.train_batches(
          global_batch_size=self.recipe.effective_batch_size,
          seed=select.epoch_seed(self.config.seed, epoch), start_step=step - start,
          process_index=self.process_index, process_count=self.process_count,
          examples=np.flatnonzero(tables["weight"]))
      for batch in data.prefetch_to_device(itertools.islice(host, start + length - step),
                                           put_batches):
        yield step, batch
        step += 1
      epoch, tables = self._next_epoch(epoch, step, read_tables, write_tables)
    self.last_step = step

  def progress(self, done: int) -> dict[str, float]:
    """What the log reports after `done` steps: examples seen, epochs (fractional) and the
    fraction of a full-data run's examples skipped so far."""
    tables = self._current
    epochs = int(tables["epoch"]) + (done - int(tables["epoch_start"])) / int(
        tables["epoch_steps"])
    full = epochs * self.recipe.steps_per_epoch
    return {"data/examples_seen": float(done * self.recipe.effective_batch_size),
            "data/epochs": epochs, "data/fraction_skipped": 1 - done / full if full else 0.0}

  def _next_epoch(self, epoch: int, step: int, read_tables, write_tables) -> tuple[int, dict]:
    """Plans epoch + 1 (if the run has one) from the tables after `step` steps."""
    epoch += 1
    tables = read_tables()
    if epoch < self.num_epochs:
      tables = {**tables, **self.plan(epoch, step, tables["loss"])}
      write_tables(tables)
    return epoch, tables
