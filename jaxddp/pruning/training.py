"""Data pruning as a training run sees it: one object made from the config (`create`).

The training loop asks a `DataPruning` for the next part of the run (`plan`: its
steps and batches), for what to log (`progress`) and report, and never asks which
kind it is:

* None (the default): one part, every example.
* Static (config.data_pruning.scores / keep_fraction): the kept examples are chosen
  once, before anything compiles (`kept_examples`); the dataset then draws every batch
  from them, so the order stays a function of (seed, step) and the recipe counts epochs
  of them. Still one part.
* Dynamic (config.data_pruning.dynamic, a DYNAMIC registry; InfoBatch): one part per
  epoch, planned when it starts from the per-example loss table the training step
  keeps in state.examples (the same on every device and process): which examples it
  skips and how much the others weigh (jaxddp.pruning.select.infobatch_weights),
  written into the state with the epoch's first step and length
  (jaxddp.pruning.tables). A checkpoint therefore holds the epoch being run and the
  table, and a resumed run goes on exactly.

Under InfoBatch the epochs get shorter, but the learning-rate schedule is still laid
out over the run's epochs as if every epoch were whole: step i of an epoch e of n
steps is at position (e + i / n) x (steps of a full epoch) of the schedule. Warmup
therefore lasts warmup_epochs epochs (or warmup_steps full-epoch steps) and the decay
reaches its end when the last epoch does, however many steps the epochs had.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import inspect
import itertools
import json
import math
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxddp.errors import ConfigError
from jaxddp.pruning import select
from jaxddp.pruning.tables import Epoch, ExampleTables
from jaxddp.recipe import Recipe
from jaxddp.registry import Registry
from jaxddp.state import TrainState, local_value


def kept_examples(config: ml_collections.ConfigDict, dataset,
                  fingerprint: str = "") -> np.ndarray | None:
  """The sorted indices of the training examples a static subset keeps (None: all).
  `fingerprint`: the dataset's (jaxddp.data.fingerprint), checked against the scores'."""
  dp = config.data_pruning
  if not dp.scores and dp.keep_fraction == 1:
    return None
  if dp.scores:
    scores = load_scores(dp.scores, dataset.num_train_examples, fingerprint)
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


def load_scores(path: str, num_examples: int, fingerprint: str = "") -> np.ndarray:
  """One finite float per training example from an .npy file, or a one-line ConfigError.

  `fingerprint`: the run's dataset's (jaxddp.data.fingerprint). The .json that
  `python -m jaxddp.score` writes beside the scores records the fingerprint of the data
  they were computed on; scores of other data are refused even when their number fits.
  """
  field = f"config.data_pruning.scores={path!r}"
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "**", "*.npy"), recursive=True))[:3]
    raise ConfigError(f"{field} is a directory; give the scores file itself"
                      + (f", e.g. {found[0]}" if found else " (WORKDIR/scores/<score>.npy)"))
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no such file (write one with `python -m jaxddp.score`)")
  try:
    scores = np.load(path, allow_pickle=False)
  except OSError as error:
    if error.strerror:  # the file cannot be read at all (permission, I/O)
      raise ConfigError(f"{field} cannot be read ({error.strerror})") from None
    raise ConfigError(f"{field} is not an .npy file of numbers; scores are the "
                      "WORKDIR/scores/<score>.npy that `python -m jaxddp.score` writes") from None
  except Exception:  # not an .npy file: a .json, text, a pickle
    raise ConfigError(f"{field} is not an .npy file of numbers; scores are the "
                      "WORKDIR/scores/<score>.npy that `python -m jaxddp.score` writes") from None
  if not isinstance(scores, np.ndarray) or scores.ndim != 1 or len(scores) != num_examples:
    raise ConfigError(f"{field} has shape {scores.shape}, but the dataset has {num_examples} "
                      f"training examples: it needs one score each ({num_examples},)")
  if scores.dtype.kind not in "biuf" or not np.isfinite(scores).all():
    raise ConfigError(f"{field} holds non-finite or non-numeric scores")
  made_on = _scored_data(os.path.splitext(path)[0] + ".json")
  if fingerprint and made_on and made_on != fingerprint:
    raise ConfigError(f"{field} was computed on other data ({made_on}) than this run trains on "
                      f"({fingerprint}); score this dataset with `python -m jaxddp.score`")
  return scores.astype(np.float64)


def _scored_data(info_path: str) -> str:
  """The data fingerprint in a scores .json ("" if the file or the field is absent)."""
  try:
    with open(info_path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return ""
  return str(info.get("data", "")) if isinstance(info, dict) else ""


def scores_digest(path: str) -> str:
  """A digest of a scores file's bytes: a run keeps it, and refuses a changed file on resume
  (its subset would change under it)."""
  with open(path, "rb") as f:
    return "sha1 " + hashlib.sha1(f.read()).hexdigest()[:16]


def check_dataset(config: ml_collections.ConfigDict, dataset) -> None:
  """A one-line error if the config's data pruning needs what `dataset` lacks: train_batches
  with an `examples` argument (subsets, InfoBatch) and batches with "index"."""
  dp = config.data_pruning
  if not (dp.scores or dp.keep_fraction < 1 or dp.dynamic != "none" or dp.track_forgetting):
    return
  if "examples" not in inspect.signature(dataset.train_batches).parameters:
    raise ConfigError(f"config.data_pruning needs a dataset that trains on chosen examples and "
                      f"gives their indices, which a {type(dataset).__name__} does not: its "
                      "train_batches has no `examples` argument (see jaxddp.data.Dataset)")


def anneal_epoch(anneal_fraction: float, num_epochs: int) -> int:
  """The first epoch (from 0) that trains on all the data again: ceil(fraction x epochs),
  rounded first so that 0.55 x 100 = 55.00000000000001 anneals from epoch 55, not 56."""
  return math.ceil(round(anneal_fraction * num_epochs, 9))


@dataclasses.dataclass
class Part:
  """A stretch of the run with one plan: steps [start, end) and this process's part of
  their batches (on the host); `last`: the run ends with it."""
  start: int
  end: int
  last: bool
  batches: Iterator[dict]


class DataPruning:
  """No data pruning, or a static subset: the run is one part over the kept examples.

  Subclasses (the DYNAMIC registry) plan the run in parts from the state's tables.
  """
  tables: ExampleTables  # the per-example tables the step keeps in state.examples
  schedule_position: Callable[[TrainState], jnp.ndarray] | None = None  # see optim

  def __init__(self, config: ml_collections.ConfigDict, dataset, recipe: Recipe,
               kept: np.ndarray | None):
    self.config, self.dataset, self.recipe, self.kept = config, dataset, recipe, kept
    self.tables = ExampleTables(forgetting=bool(config.data_pruning.track_forgetting))

  @property
  def description(self) -> str:
    """What it does, for the recipe."""
    if self.kept is None:
      return "none"
    dp = self.config.data_pruning
    scores = f", scores {dp.scores}" if dp.scores else ""
    balanced = ", class-balanced" if dp.class_balance else ""
    return (f"static subset: {len(self.kept)} of {self.dataset.num_train_examples} examples "
            f"kept ({dp.policy}{balanced}, keep_fraction {dp.keep_fraction}{scores})")

  def initial_tables(self) -> dict[str, jnp.ndarray]:
    return self.tables.initial(self.dataset.num_train_examples, self.dataset.num_classes,
                               self.recipe.steps_per_epoch)

  def train_batches(self, start_step: int, *, seed: int | None = None,
                    examples: np.ndarray | None = None) -> Iterator[dict]:
    """This process's part of the training batch of each step from start_step on."""
    examples = self.kept if examples is None else examples
    return self.dataset.train_batches(
        global_batch_size=self.recipe.effective_batch_size,
        seed=self.config.seed if seed is None else seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        **({} if examples is None else {"examples": examples}))

  def plan(self, state: TrainState, step: int, backend) -> tuple[TrainState, Part | None]:
    """(state, the part of the run from `step` on), or (state, None) when the run is
    over. Called with every dispatched step finished. The state may come back with new
    tables (a new epoch's plan)."""
    total = self.recipe.total_steps
    if step >= total:
      return state, None
    return state, Part(step, total, True, self.train_batches(step))

  def progress(self, done: int) -> dict[str, float]:
    """What the log adds after `done` steps (e.g. "data/examples_seen")."""
    return {}

  def report(self, last_step: int, report: dict[str, float]) -> dict[str, float]:
    """The final report's data-pruning entries, from the rest of it (FLOPs)."""
    return {}

  def summary(self, last_step: int, report: dict[str, float]) -> str | None:
    """A line for the end of the run, or None."""
    return None


DYNAMIC: Registry[type[DataPruning]] = Registry("dynamic data pruning",
                                                "data_pruning.dynamic")


@DYNAMIC.register("infobatch")
class InfoBatch(DataPruning):
  """InfoBatch (Qin et al. 2024): each epoch skips a random prune_ratio of the examples
  whose latest loss is below the mean, and scales the loss of the other low-loss ones
  by 1 / (1 - prune_ratio); from anneal_fraction of the epochs on, every example.

  Under InfoBatch the epochs get shorter, but the learning-rate schedule is still laid
  out over the run's epochs as if every epoch were whole: step i of an epoch e of n
  steps is at position (e + i / n) x (steps of a full epoch) of the schedule
  (`schedule_position`). Warmup therefore lasts warmup_epochs epochs (or warmup_steps
  full-epoch steps) and the decay reaches its end when the last epoch does, however
  many steps the epochs had.
  """

  def __init__(self, config: ml_collections.ConfigDict, dataset, recipe: Recipe,
               kept: np.ndarray | None):
    super().__init__(config, dataset, recipe, kept)
    if config.train.num_steps:
      raise ConfigError("config.data_pruning.dynamic sets the run's length in epochs (they get "
                        "shorter); use config.train.num_epochs, not train.num_steps")
    if recipe.total_steps % recipe.steps_per_epoch:
      raise ConfigError(f"config.data_pruning.dynamic needs a whole number of epochs; the run "
                        f"has {recipe.epochs:g}")
    self.tables = dataclasses.replace(self.tables, losses=True)
    self.num_epochs = recipe.total_steps // recipe.steps_per_epoch
    self.anneal_epoch = anneal_epoch(config.data_pruning.anneal_fraction, self.num_epochs)
    self._check_pruned_epochs_have_a_batch()

  def _check_pruned_epochs_have_a_batch(self) -> None:
    """Refuses, before anything trains, a run whose pruned epochs could keep fewer examples
    than one batch: at worst every example but one is below the mean loss, and a pruned
    epoch keeps 1 + floor((1 - prune_ratio) x (N - 1)) (select.infobatch_weights)."""
    ratio = self.config.data_pruning.prune_ratio
    if ratio == 0 or min(self.anneal_epoch, self.num_epochs) <= 1:
      return  # no pruned epoch (the first always sees everything)
    n = self.dataset.num_train_examples if self.kept is None else len(self.kept)
    fewest = 1 + int((1 - ratio) * (n - 1))
    batch = self.recipe.effective_batch_size
    if fewest < batch:
      raise ConfigError(f"config.data_pruning.prune_ratio={ratio} can leave a pruned epoch "
                        f"{fewest} of the {n} training examples, fewer than one batch of "
                        f"{batch}; lower prune_ratio or the batch size")
    self._epoch: Epoch | None = None  # the epoch being run

  @property
  def description(self) -> str:
    pruned = min(self.anneal_epoch, self.num_epochs)
    return (f"infobatch: prune_ratio {self.config.data_pruning.prune_ratio}, prunes in the "
            f"first {pruned} of {self.num_epochs} epochs (the first sees everything), all the "
            f"data in the last {self.num_epochs - pruned}; at most {self.recipe.total_steps} "
            "steps")

  def schedule_position(self, state: TrainState) -> jnp.ndarray:
    """The position of `state`'s next step in the learning-rate schedule, in full-epoch
    steps."""
    epochs = self.tables.progress(state.examples, state.step)
    return epochs.astype(jnp.float32) * self.recipe.steps_per_epoch

  def weights(self, epoch: int, losses: np.ndarray) -> np.ndarray:
    """Each example's loss weight in `epoch` (0: skipped) from the latest losses."""
    dp = self.config.data_pruning
    return select.infobatch_weights(losses, dp.prune_ratio, seed=self.config.seed, epoch=epoch,
                                    anneal=epoch >= self.anneal_epoch)

  def plan(self, state: TrainState, step: int, backend) -> tuple[TrainState, Part | None]:
    examples = jax.tree.map(local_value, backend.global_state(state).examples)
    epoch = self._epoch = self.tables.epoch(examples)
    if step == epoch.end:  # the epoch is over (or was saved at its end): plan the next
      if epoch.index + 1 >= self.num_epochs:
        return state, None
      weights = self.weights(epoch.index + 1, self.tables.losses_of(examples))
      steps = int(np.count_nonzero(weights)) // self.recipe.effective_batch_size
      if steps == 0:
        raise ConfigError(f"InfoBatch kept {np.count_nonzero(weights)} examples in epoch "
                          f"{epoch.index + 1}, fewer than one batch; lower "
                          "config.data_pruning.prune_ratio")
      epoch = Epoch(epoch.index + 1, step, steps)
      examples = self.tables.with_epoch(examples, epoch, weights)
      state = state.replace(examples=backend.put_state(examples))
    self._epoch = epoch
    batches = self.train_batches(step - epoch.start, seed=select.epoch_seed(self.config.seed,
                                                                            epoch.index),
                                 examples=self.tables.kept(examples))
    return state, Part(step, epoch.end, epoch.index == self.num_epochs - 1,
                       itertools.islice(batches, epoch.end - step))

  def progress(self, done: int) -> dict[str, float]:
    """Examples seen, epochs (fractional) and the fraction of a full-data run's examples
    skipped after `done` steps."""
    epoch = self._epoch
    epochs = epoch.index + (done - epoch.start) / epoch.steps
    full = epochs * self.recipe.steps_per_epoch
    return {"data/examples_seen": float(done * self.recipe.effective_batch_size),
            "data/epochs": epochs, "data/fraction_skipped": 1 - done / full if full else 0.0}

  def report(self, last_step: int, report: dict[str, float]) -> dict[str, float]:
    saved = 1 - report["flops/train_total"] / (self.recipe.total_steps
                                               * report["flops/train_step_dense"])
    return {**self.progress(last_step), "flops/saved_fraction": saved}

  def summary(self, last_step: int, report: dict[str, float]) -> str:
    return (f"infobatch: {report['data/examples_seen']:.0f} examples seen in {last_step} "
            f"steps, {report['data/fraction_skipped']:.1%} of a full-data run's skipped "
            f"({self.recipe.total_steps} steps); training FLOPs saved "
            f"{report['flops/saved_fraction']:.1%}")


def create(config: ml_collections.ConfigDict, dataset, recipe: Recipe,
           kept: np.ndarray | None) -> DataPruning:
  """The run's data pruning: config.data_pruning.dynamic's (DYNAMIC), or none / a static
  subset (`kept`, from kept_examples)."""
  dynamic = config.data_pruning.dynamic
  return DataPruning(config, dataset, recipe, kept) if dynamic == "none" else DYNAMIC[dynamic](
      config, dataset, recipe, kept)
