"""Checkpoints in workdir/checkpoints (orbax), automatic resume, initialisation from
another run, and stop-on-signal.

A checkpoint holds the whole TrainState (step, params, batch_stats, masks, opt_state,
rng, train_flops). The data order is a pure function of (seed, step), so restoring
the state is all it takes to continue exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import traverse_util
from orbax.checkpoint._src.metadata import array_metadata_store as _array_metadata_store  # pinned

from jaxddp.errors import ConfigError
from jaxddp.state import TrainState, checkpoint_items, with_checkpoint_items


def _leaves(tree: Any) -> dict[str, Any]:
  """{"stage1_conv1/kernel": leaf, ...} for a nested dict of arrays or array metadata."""
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {path: tuple(leaf.shape) for path, leaf in _leaves(tree).items()}


def _open(directory: str) -> ocp.CheckpointManager:
  """A manager of an existing checkpoint directory (reopened: it needs the item handler)."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers=ocp.StandardCheckpointHandler())


@contextlib.contextmanager
def _quiet_absl():
  """absl's log below ERROR silenced for the duration."""
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


# Replicated arrays are written from one copy. Orbax's default on CPU ("replica parallel")
# has each of the devices write a slice of every replicated array, which takes a jitted
# slice per leaf and device: with 8 emulated CPU devices that was most of a small run's
# checkpoint time (1.6 s of a 7 s run). Orbax already writes so on GPU; the files read
# back the same either way.
with _quiet_absl():  # orbax warns that it overrides the default handler
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=False,
          array_metadata_store=_array_metadata_store.Store()),  # as orbax's default handler
      override=True)


def has_checkpoint(workdir: str) -> bool:
  """Whether workdir/checkpoints holds a finished checkpoint (checked without writing)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def latest_step(workdir: str) -> int:
  """The step of workdir's latest finished checkpoint, 0 if it has none: where a run in
  that workdir starts (checked without writing)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return 0
  return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=0)


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
    with _quiet_absl():  # it reads every step's metadata; a broken one is said by restore
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
    try:
      with _quiet_absl():  # orbax logs a warning for a broken step; the error says it
        saved = self.manager.item_metadata(step).tree
    except Exception as error:  # orbax's errors for a step directory emptied or cut short
      detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
      raise ConfigError(f"the checkpoint at step {step} in {self.directory} cannot be read "
                        f"({type(error).__name__}: {detail}); delete "
                        f"{os.path.join(self.directory, str(step))} to resume from an earlier "
                        "checkpoint, or use a new --workdir") from None
    if "rng" not in saved:
      raise ConfigError(f"the checkpoint in {self.directory} was written by an older jaxddp (it "
                        "has no rng or train_flops); use a new --workdir")
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
      detail = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(": ")
      raise ConfigError(f"the checkpoint in {self.directory} does not match this config's "
                        f"optimizer state (was config.optimizer changed?): {detail}; use a "
                        "new --workdir or the config it was written with") from None
    return with_checkpoint_items(state, items)

  def save(self, step: int, state: TrainState) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(checkpoint_items(state)))

  def close(self) -> None:
    """Waits for the background writes to finish."""
    self.manager.wait_until_finished()
    self.manager.close()


class InitSource:
  """Another run's checkpoint to start a new run from (config.init_from): its params,
  batch statistics and masks; the optimizer state, step and rng stay the new run's.

  Layers are matched by path. Paths matching config.init_from.skip keep their initial
  values. Every other parameter and batch statistic must be in the checkpoint with the
  same shape, and the checkpoint may hold none this model lacks: the first path that
  differs is a one-line ConfigError, found from metadata before anything is read or
  written. Masks are taken where both sides have them, so a dense checkpoint starts
  a masked run (its masks start as ones) and a masked one a dense run.
  """

  PARTS = ("params", "batch_stats", "masks")

  def __init__(self, options: ml_collections.ConfigDict, state: TrainState):
    self.workdir = options.workdir
    self.skip = re.compile(options.skip) if options.skip else None
    field = f"config.init_from.workdir={options.workdir!r}"
    if not os.path.isdir(options.workdir):
      raise ConfigError(f"{field} is not a directory (the --workdir of the run to start from)")
    if not has_checkpoint(options.workdir):
      raise ConfigError(f"{field} has no checkpoint (no finished checkpoint in "
                        f"{os.path.join(options.workdir, 'checkpoints')})")
    self.manager = _open(os.path.abspath(os.path.join(options.workdir, "checkpoints")))
    try:
      steps = sorted(self.manager.all_steps())
      self.step = options.step or steps[-1]
      if self.step not in steps:
        raise ConfigError(f"config.init_from.step={options.step} is not a checkpoint of "
                          f"{options.workdir}; it has steps {', '.join(map(str, steps))}")
      self.metadata = self.manager.item_metadata(self.step).tree
      for part in self.PARTS:
        problem = self._first_difference(part, getattr(state, part))
        if problem:
          raise ConfigError(f"config.init_from: {problem}")
    except ConfigError:
      self.manager.close()
      raise

  def describe(self) -> str:
    return f"{self.workdir} at step {self.step}"

  def _skipped(self, path: str) -> bool:
    return bool(self.skip and self.skip.search(path))

  def _first_difference(self, part: str, wanted: Any) -> str | None:
    saved = {p: s for p, s in _shapes(self.metadata.get(part, {})).items() if not self._skipped(p)}
    wanted = {p: s for p, s in _shapes(wanted).items() if not self._skipped(p)}
    for path in sorted(set(saved) | set(wanted)):
      if part == "masks":
        if path in saved and path in wanted and saved[path] != wanted[path]:
          return (f"masks/{path} has shape {saved[path]} in the checkpoint of {self.workdir} "
                  f"but {wanted[path]} here")
      elif path not in saved:
        return (f"{part}/{path} is not in the checkpoint of {self.workdir} (a different model?"
                " to keep its initial value, match it with config.init_from.skip)")
      elif path not in wanted:
        return (f"the checkpoint of {self.workdir} has {part}/{path}, which this model does not "
                "(a different model? to ignore it, match it with config.init_from.skip)")
      elif saved[path] != wanted[path]:
        return (f"{part}/{path} has shape {saved[path]} in the checkpoint of {self.workdir} but "
                f"{wanted[path]} here (to keep its initial value instead: "
                f"config.init_from.skip={path.rsplit('/', 1)[0]!r})")
    return None

  def load(self, state: TrainState) -> TrainState:
    """`state` (global view) with the checkpoint's params, batch statistics and masks."""
    sharding = jax.tree.leaves(state.params)[0].sharding  # replicated on every device
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          self.metadata)
    items = self.manager.restore(self.step, args=ocp.args.StandardRestore(target))
    self.manager.close()

    def merged(part: str) -> Any:
      loaded = _leaves(items.get(part, {}))
      fresh = _leaves(getattr(state, part))
      kept = {path: loaded[path] if path in loaded and not self._skipped(path) else value
              for path, value in fresh.items()}
      return traverse_util.unflatten_dict(kept, sep="/") if kept else {}

    return state.replace(**{part: merged(part) for part in self.PARTS})


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
