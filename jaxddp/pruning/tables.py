"""The per-example tables a run keeps in state.examples: the one place their keys live.

Each table holds one value per training example, in the dataset's index order, the
same on every device and process, and is saved with every checkpoint:

* losses (InfoBatch): "loss", each example's latest training loss; "weight", the
  factor its loss gets in this epoch (0: skipped); and the epoch being run: "epoch",
  "epoch_start" (its first step) and "epoch_steps" (its length).
* forgetting (config.data_pruning.track_forgetting): "correct", the latest
  correctness (0/1); "forgotten", the number of forgetting events (correct at one
  presentation, wrong at the next; Toneva et al. 2019); "learned", whether ever correct.

The training step reads the weights and updates the tables (`weights`, `update`);
InfoBatch reads the losses and writes each epoch's plan (`Epoch`, `losses`, `with_epoch`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

_FORGETTING = ("correct", "forgotten", "learned")


@dataclasses.dataclass(frozen=True)
class Epoch:
  """The epoch a dynamic-pruning run is in: its number (from 0), first step and length."""
  index: int
  start: int
  steps: int

  @property
  def end(self) -> int:
    return self.start + self.steps


@dataclasses.dataclass(frozen=True)
class ExampleTables:
  """Which tables a run keeps (none by default: state.examples is then {})."""
  losses: bool = False
  forgetting: bool = False

  def initial(self, num_examples: int, num_classes: int,
              steps_per_epoch: int) -> dict[str, jnp.ndarray]:
    """The tables at the start of a run.

    Every example's loss starts at ln(classes), a uniform guess's, so none is below the
    mean and InfoBatch's first epoch sees all of them; every weight is 1, and epoch 0
    is a whole one. Forgetting: nothing correct yet, nothing forgotten or learned.
    """
    tables = {}
    if self.losses:
      tables.update(loss=jnp.full((num_examples,), math.log(max(num_classes, 2)), jnp.float32),
                    weight=jnp.ones((num_examples,), jnp.float32),
                    epoch=jnp.zeros((), jnp.int32), epoch_start=jnp.zeros((), jnp.int32),
                    epoch_steps=jnp.asarray(steps_per_epoch, jnp.int32))
    if self.forgetting:
      tables.update({name: jnp.zeros((num_examples,), jnp.float32) for name in _FORGETTING})
    return tables

  def weights(self, examples: dict, index: jnp.ndarray) -> jnp.ndarray | None:
    """The loss weights of the examples `index` (None: every example weighs 1)."""
    return examples["weight"][index] if self.losses else None

  def update(self, examples: dict, index: jnp.ndarray, loss: jnp.ndarray,
             correct: jnp.ndarray) -> dict:
    """The tables after a step that saw the (global) examples `index` with these training
    losses and correctness (0/1)."""
    examples = dict(examples)
    if self.losses:
      examples["loss"] = examples["loss"].at[index].set(loss)
    if self.forgetting:
      before = examples["correct"][index]
      examples["forgotten"] = examples["forgotten"].at[index].add(before * (1 - correct))
      examples["learned"] = examples["learned"].at[index].max(correct)
      examples["correct"] = examples["correct"].at[index].set(correct)
    return examples

  # --- InfoBatch's epochs (losses only). On the host the tables are NumPy arrays; in the
  # step (progress) they are traced.

  @staticmethod
  def epoch(examples: dict) -> Epoch:
    return Epoch(int(examples["epoch"]), int(examples["epoch_start"]),
                 int(examples["epoch_steps"]))

  @staticmethod
  def losses_of(examples: dict) -> np.ndarray:
    return np.asarray(examples["loss"])

  @staticmethod
  def kept(examples: dict) -> np.ndarray:
    """The indices of the examples the current epoch trains on (weight > 0)."""
    return np.flatnonzero(examples["weight"])

  @staticmethod
  def with_epoch(examples: dict, epoch: Epoch, weights: np.ndarray) -> dict:
    """The tables with a new epoch planned: its weights and bookkeeping."""
    return {**examples, "weight": weights, "epoch": np.int32(epoch.index),
            "epoch_start": np.int32(epoch.start), "epoch_steps": np.int32(epoch.steps)}

  @staticmethod
  def progress(examples: dict, step) -> jnp.ndarray:
    """Epochs done after `step` steps, fractional (traced or not): the epoch's number plus
    the fraction of its steps taken."""
    return examples["epoch"] + (step - examples["epoch_start"]) / examples["epoch_steps"]
