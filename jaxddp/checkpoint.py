"""Checkpoints in workdir/checkpoints (orbax), automatic resume, and stop-on-signal.

A checkpoint holds the whole TrainState (step, params, batch_stats, masks, opt_state).
The data order is a pure function of (seed, step), so restoring the state is
all it takes to continue exactly where a run stopped.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxddp.config import ConfigError
from jaxddp.state import TrainState, checkpoint_items, with_checkpoint_items


def _shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """{"Conv_0/kernel": shape, ...} for a nested dict of arrays or array metadata."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_shapes(value, f"{prefix}{key}/"))
    return out
  return {prefix.rstrip("/"): tuple(tree.shape)}


def _first_difference(saved: dict, wanted: dict) -> str | None:
  for name in sorted(set(saved) | set(wanted)):
    if name not in saved:
      return f"{name} is missing from the checkpoint"
    if name not in wanted:
      return f"the checkpoint has {name}, which this model does not"
    if saved[name] != wanted[name]:
      return f"{name} has shape {saved[name]} in the checkpoint but {wanted[name]} here"
  return None


class Checkpointer:
  """Saves every `checkpoint_every` steps and at the end; restores the latest."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, state: TrainState) -> TrainState:
    """Returns `state` with the latest checkpoint's arrays, or `state` if there is none.

    `state` gives the structure, shapes and shardings to restore into. A checkpoint
    written by a different model or optimizer is an error, never ignored.
    """
    step = self.latest_step()
    if step is None:
      return state
    saved = self.manager.item_metadata(step).tree
    for part in ("params", "batch_stats", "masks"):
      problem = _first_difference(_shapes(saved.get(part, {})), _shapes(getattr(state, part)))
      if problem:
        raise ConfigError(f"the checkpoint in {self.directory} was written by a different model "
                          f"({part}: {problem}); use a new --workdir or delete that one")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        checkpoint_items(state))
    try:
      items = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as error:
      raise ConfigError(f"the checkpoint in {self.directory} does not match this config's "
                        f"optimizer state (was config.optimizer changed?): "
                        f"{str(error).splitlines()[0]}") from None
    return with_checkpoint_items(state, items)

  def save(self, step: int, state: TrainState) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(checkpoint_items(state)))

  def close(self) -> None:
    """Waits for the background writes to finish."""
    self.manager.wait_until_finished()
    self.manager.close()


class StopSignal:
  """Turns SIGTERM (and SIGINT) into a flag the training loop polls between steps.

  The loop then saves a checkpoint and exits cleanly instead of dying mid-write,
  so a preempted job resumes by running the same command again.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopSignal":
    try:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # not the main thread: signals cannot be caught here
      self._previous.clear()
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else ""
