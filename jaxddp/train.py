"""train_and_evaluate: the whole training run, top to bottom.

1. Set up (`setup`, which scripts/benchmark.py shares): check the config, find the
   devices, load the data, resolve the recipe, build the model, loss, sparsity
   schedule, optimizer, backend and state. Every user error surfaces here, before
   anything compiles or is written.
2. Start: resume from the workdir's latest checkpoint; or, in a new workdir, start
   from another run's weights (config.init_from) or from the initialisation.
3. Train: dispatch the steps (a bounded number in flight), and on schedule log,
   evaluate (with the sparsity and FLOPs report) and checkpoint; stop cleanly on
   SIGTERM, loudly on a non-finite loss.
4. Evaluate on the whole test split and report (a sparse run prints a table).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxddp import checkpoint, data, distributed, losses, models, optim, parallel, sparsity
from jaxddp import pruning
from jaxddp import config as config_lib
from jaxddp.checkpoint import Checkpointer, StopSignal
from jaxddp.metrics import MetricWriter, Progress, SumCounter, format_recipe
from jaxddp.state import TrainState, create_train_state, total_flops


class TrainingInterrupted(Exception):
  """A signal stopped the run after it saved a checkpoint; rerun to resume."""

  def __init__(self, signal_name: str, signum: int, step: int):
    super().__init__(f"stopped by {signal_name} after step {step}; a checkpoint was saved, "
                     "run the same command again to resume")
    self.signum = signum


class NonFiniteLossError(Exception):
  """The training loss became NaN or Inf; the last good checkpoint is kept.

  `recipe` is the run's resolved recipe (set on the way out of train_and_evaluate).
  """
  recipe: "config_lib.Recipe | None" = None


@dataclasses.dataclass
class TrainResult:
  """What a finished run returns: everything its last line of metrics.jsonl and its
  config.json hold, so that a caller never re-reads the files of the run it just ran."""
  state: TrainState  # global view: arrays replicated on every device, whatever the backend
  eval_metrics: dict[str, float]  # {"loss": ..., "accuracy": ...} on the whole test split
  train_metrics: dict[str, float]  # the last logging window: {"train/loss": ..., ...}
  report: dict[str, float]  # the final report: FLOPs, sparsity, data pruning ("flops/...")
  recipe: config_lib.Recipe  # the resolved recipe, as saved in config.json
  last_step: int  # steps trained (InfoBatch: fewer than recipe.total_steps)
  seconds: float  # wall-clock time of the training loop and final evaluation


@dataclasses.dataclass
class Setup:
  """What a run trains with, built from the config (and any objects given) alone."""
  config: ml_collections.ConfigDict
  devices: list[jax.Device]
  dataset: data.Dataset
  recipe: config_lib.Recipe
  model: nn.Module
  backend: parallel.Backend
  sparsity: sparsity.Sparsity  # masks' schedule (method none: dense) and the FLOPs count
  state: TrainState  # freshly initialised, placed on the devices
  given: dict[str, str]  # what was passed as an object instead of named in the config
  kept: np.ndarray | None = None  # a static subset's examples (data pruning); None: all
  infobatch: pruning.InfoBatchEpochs | None = None  # dynamic data pruning's epochs

  def train_batches(self, start_step: int):
    """This process's part of the training batch of each step from start_step on."""
    kwargs = {} if self.kept is None else {"examples": self.kept}
    return self.dataset.train_batches(
        global_batch_size=self.recipe.effective_batch_size, seed=self.config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), **kwargs)

  def training_steps(self, start_step: int, read_tables: Callable[[], dict],
                     write_tables: Callable[[dict], None]) -> "Steps":
    """(step, batch on the devices) for every step from start_step to the end. InfoBatch
    plans each epoch as it starts, from the per-example tables read_tables returns (after
    every step dispatched has finished), and hands its plan to write_tables."""
    if self.infobatch is not None:
      infobatch = self.infobatch
      return Steps(infobatch.steps(start_step, read_tables, write_tables,
                                   self.backend.put_batches), lambda: infobatch.last_step)
    batches = data.prefetch_to_device(self.train_batches(start_step), self.backend.put_batches)
    return Steps(zip(range(start_step, self.recipe.total_steps), batches),
                 lambda: self.recipe.total_steps)


@dataclasses.dataclass
class Steps:
  """A run's (step, batch) pairs, and its last step, once known (InfoBatch knows it when
  its last epoch starts)."""
  pairs: Iterator[tuple[int, Any]]
  _last_step: Callable[[], int | None]

  def __iter__(self):
    return iter(self.pairs)

  @property
  def last_step(self) -> int | None:
    return self._last_step()


def setup(config: ml_collections.ConfigDict, *, model: nn.Module | None = None,
          dataset: data.Dataset | None = None,
          loss_fn: losses.LossFn | None = None) -> Setup:
  """Step 1 of a run, up to its first step (scripts/benchmark.py times from here).

  `model`, `dataset` and `loss_fn`, if given, replace what config.model.name,
  config.dataset.name and config.train.loss would name.
  """
  given = {name: describe(value) for name, value in
           (("model", model), ("dataset", dataset), ("loss_fn", loss_fn)) if value is not None}
  config_lib.validate(config, model_given=model is not None, dataset_given=dataset is not None,
                      loss_given=loss_fn is not None)
  parallel.set_cpu_device_count(config.parallel.cpu_devices)  # if JAX has not started yet
  devices = parallel.select_devices(config.parallel.cpu_devices)
  if dataset is None:
    dataset = data.load_dataset(config)
  else:
    data.check_dataset(dataset, "train_and_evaluate(dataset=...)")
  pruning.check_dataset(config, dataset)
  kept = pruning.kept_examples(config, dataset)  # a static subset (data pruning) or None
  recipe = config_lib.resolve(config, num_train_examples=dataset.num_train_examples if kept is
                              None else len(kept), num_test_examples=dataset.num_test_examples,
                              num_devices=len(devices), num_processes=jax.process_count())
  pruning.check_recipe(config, recipe)
  recipe = dataclasses.replace(recipe, data_pruning=pruning.describe(
      config, dataset.num_train_examples, kept, recipe))
  if model is None:
    model = models.create_model(config, dataset.num_classes)
  elif isinstance(model, type) and issubclass(model, nn.Module):
    raise config_lib.ConfigError(f"train_and_evaluate(model=...) got the class {model.__name__}; "
                                 f"pass an instance, e.g. model={model.__name__}(num_classes="
                                 f"{dataset.num_classes})")
  elif not isinstance(model, nn.Module):
    raise config_lib.ConfigError(f"train_and_evaluate(model=...) got an object of type "
                                 f"{type(model).__name__}, not a Flax module (nn.Module)")
  models.check_model(model, dataset.input_shape, dataset.num_classes)
  train_loss, eval_loss = losses.get(config, loss_fn)
  losses.check(eval_loss, dataset.num_classes)
  sparse = sparsity.create(config, recipe, model, dataset.input_shape)
  schedule = optim.learning_rate_schedule(config, recipe)
  dynamic = pruning.is_dynamic(config)
  # Dynamic pruning's epochs vary in length: the step sets the learning rate from the
  # run's progress in epochs (pruning.schedule_step), injected into the optimizer.
  tx = optim.create_optimizer(config, schedule, injected=dynamic)
  backend = parallel.create_backend(config, devices, schedule, sparse, train_loss, eval_loss,
                                    schedule_step=pruning.schedule_step(recipe) if dynamic
                                    else None)
  state = sparse.initialize(create_train_state(model, tx, dataset.input_shape, config.seed))
  state = state.replace(examples=pruning.initial_tables(
      config, dataset.num_train_examples, dataset.num_classes, recipe))
  infobatch = pruning.InfoBatchEpochs(config, dataset, recipe, jax.process_index(),
                                      jax.process_count()) if dynamic else None
  return Setup(config, devices, dataset, recipe, model, backend, sparse,
               backend.put_state(state), given, kept, infobatch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None, dataset: data.Dataset | None = None,
                       loss_fn: losses.LossFn | None = None) -> TrainResult:
  """Trains data-parallel on every selected device, then evaluates on the test split.

  `model` (a Flax module called as model(x, train=bool) that returns logits),
  `dataset` (a jaxddp.data.Dataset, e.g. jaxddp.data.ArrayDataset) and `loss_fn`
  (logits, labels -> per-example losses) replace what the config names; see README,
  "Your own model and data".
  """
  # --- 1. Set up: every user error surfaces here, before anything compiles or is written.
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file; give a directory")
  run = setup(config, model=model, dataset=dataset, loss_fn=loss_fn)
  recipe, backend, state = run.recipe, run.backend, run.state
  resuming = checkpoint.has_checkpoint(workdir)
  source = None
  if config.init_from.workdir and not resuming:
    source = checkpoint.InitSource(config.init_from, backend.global_state(state))

  # --- 2. Start: resume, or start from another run's weights, or from the initialisation.
  is_main_process = jax.process_index() == 0
  checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)  # creates the workdir
  if resuming:
    state = backend.put_state(checkpointer.restore_latest(backend.global_state(state)))
  elif source:
    # The sparsity method then applies to the loaded weights (random masks prune them).
    state = backend.put_state(run.sparsity.initialize(source.load(backend.global_state(state))))
  start_step = int(parallel.local_value(backend.global_state(state).step))
  progress = Progress(recipe.total_steps, start_step, enabled=is_main_process)
  if is_main_process:
    changes = config_changes(workdir, config, run.given)
    _save_config(workdir, config, recipe, run.given)
    progress.print(f"jaxddp: {backend.name} on {recipe.num_devices} {run.devices[0].platform} "
                   f"device(s), {recipe.num_processes} process(es)\nresolved recipe:\n"
                   f"{format_recipe(recipe.to_dict())}")
    for line in changes:
      progress.print(line)
    if start_step:
      progress.print(f"resuming from the checkpoint at step {start_step}")
    elif source:
      progress.print(f"initialised from {source.describe()}")
  writer = MetricWriter(workdir, enabled=is_main_process)

  # --- 3. Train. ---
  window = LogWindow()
  watchdog = distributed.Watchdog(
      config.distributed.hang_timeout,
      f"no step, evaluation or checkpoint finished for {config.distributed.hang_timeout} s "
      "(config.distributed.hang_timeout): another process may have died or hung",
      distributed.process_label())
  in_flight = StepsInFlight(config.parallel.max_steps_in_flight, window.add, watchdog.pet,
                            checkpointer.directory)
  log_due = Every(config.train.log_every)
  eval_due = Every(config.train.eval_every, at_end=False)  # the end: step 4
  checkpoint_due = Every(config.train.checkpoint_every)

  def save_checkpoint(done: int) -> None:
    in_flight.drain()  # a checkpoint holds only steps already checked
    checkpointer.save(done, backend.global_state(state))
    watchdog.pet()

  def read_tables() -> dict:  # data pruning's per-example tables, once every step finished
    in_flight.drain()
    return jax.tree.map(parallel.local_value, backend.global_state(state).examples)

  def write_tables(tables: dict) -> None:
    nonlocal state
    state = state.replace(examples=backend.put_state(tables))

  steps = run.training_steps(start_step, read_tables, write_tables)
  train_metrics: dict[str, float] = {}
  try:
    with StopSignal() as stop, watchdog:
      for step, batch in window.timed(steps):
        state, metrics = backend.train_step(state, batch)
        in_flight.add(step, metrics)
        done = step + 1  # steps completed once this one finishes
        last = done == steps.last_step

        if log_due(done, last):
          in_flight.drain()
          scalars = window.flush()
          if run.infobatch:
            scalars.update(run.infobatch.progress(done))
          writer.write(done, scalars)
          progress.update(done, scalars)
          train_metrics = scalars
        if eval_due(done, last):
          scalars = evaluate(backend, state, run.dataset, recipe)
          writer.write(done, {**{f"eval/{k}": v for k, v in scalars.items()},
                              **sparsity_report(run.sparsity, backend, state, done)})
          watchdog.pet()
        if checkpoint_due(done, last):
          save_checkpoint(done)
        if _stop_requested(stop, done, config.train.log_every):
          save_checkpoint(done)
          raise TrainingInterrupted(stop.name or "a signal to another process",
                                    stop.received or signal.SIGTERM, done)
      in_flight.drain()
      last_step = steps.last_step

      # --- 4. Final evaluation on every test example. ---
      final = evaluate(backend, state, run.dataset, recipe)
    report = sparsity_report(run.sparsity, backend, state, last_step)
    if run.infobatch:
      report.update(run.infobatch.progress(last_step))
      report["flops/saved_fraction"] = 1 - report["flops/train_total"] / (
          recipe.total_steps * report["flops/train_step_dense"])
    writer.write(last_step, {**{f"eval/{k}": v for k, v in final.items()}, **report})
  except NonFiniteLossError as error:
    error.recipe = recipe
    raise
  finally:
    progress.close()
    writer.close()
    checkpointer.close()
  run_time = time.time() - window.started
  if run.sparsity.spec.masked:
    progress.print(run.sparsity.format_table(report, report["flops/train_total"],
                                             report["flops/train_total_dense"]))
  if run.infobatch:
    progress.print(f"infobatch: {report['data/examples_seen']:.0f} examples seen in "
                   f"{last_step} steps, {report['data/fraction_skipped']:.1%} of a full-data "
                   f"run's skipped ({recipe.total_steps} steps); training FLOPs saved "
                   f"{report['flops/saved_fraction']:.1%}")
  progress.print(f"final test accuracy {final['accuracy']:.2%} (loss {final['loss']:.4f}) "
                 f"after {last_step} steps, {run_time:.1f}s of training")
  return TrainResult(state=backend.global_state(state), eval_metrics=final,
                     train_metrics=train_metrics, report=report, recipe=recipe,
                     last_step=last_step, seconds=run_time)


@dataclasses.dataclass(frozen=True)
class Every:
  """Whether an action is due after `done` steps: every `period` steps (0: never); after
  the run's last step, if and only if `at_end`."""
  period: int
  at_end: bool = True

  def __call__(self, done: int, last: bool) -> bool:
    if last:
      return self.at_end
    return bool(self.period) and done % self.period == 0


class StepsInFlight:
  """The steps dispatched to the devices whose metrics the host has not read yet.

  `add` keeps at most `limit` steps running (unbounded dispatch can deadlock CPU
  collectives), waiting without any transfer to the host. `drain` waits for all of
  them, reads their metrics in one transfer, checks each step for a non-finite loss
  or parameters, and hands the metrics to `on_checked` in order.
  """

  def __init__(self, limit: int, on_checked: Callable[[dict[str, float]], None],
               on_finished: Callable[[], None], checkpoint_directory: str):
    self.limit = limit
    self.on_checked = on_checked
    self.on_finished = on_finished  # a step finished on the devices (the watchdog's pet)
    self.checkpoint_directory = checkpoint_directory
    self._running: collections.deque = collections.deque()  # (step, metrics) dispatched
    self._finished: list = []  # finished on the devices, metrics not yet read

  def add(self, step: int, metrics: dict) -> None:
    self._running.append((step, metrics))
    while len(self._running) >= self.limit:
      self._wait_for_oldest()

  def _wait_for_oldest(self) -> None:
    self._finished.append(self._running.popleft())
    jax.block_until_ready(self._finished[-1][1])
    self.on_finished()

  def drain(self) -> None:
    while self._running:
      self._wait_for_oldest()
    finished, self._finished = self._finished, []
    for (step, _), metrics in zip(finished, parallel.metrics_to_host([m for _, m in finished])):
      if not math.isfinite(metrics["loss_sum"]) or metrics["params_finite"] != 1.0:
        what = (f"the training loss is {metrics['loss_sum'] / metrics['count']}"
                if not math.isfinite(metrics["loss_sum"]) else "the parameters became NaN or Inf")
        raise NonFiniteLossError(
            f"{what} at step {step + 1}; stopping (the last good checkpoint in "
            f"{self.checkpoint_directory} is kept; try a lower config.optimizer.learning_rate)")
      self.on_checked(metrics)


class LogWindow:
  """What one logging window adds up: loss and accuracy sums, the time spent waiting for
  batches, and the latest learning rate and training-FLOPs total."""

  def __init__(self):
    self.started = time.time()
    self._reset()

  def _reset(self) -> None:
    self.sums = SumCounter()
    self.start = time.time()
    self.data_wait = 0.0  # seconds
    self.scalars: dict[str, float] = {}

  def timed(self, items) -> Iterator:
    """The items of `items` (steps and their batches); the time spent waiting for each
    counts as data wait."""
    items = iter(items)
    while True:
      wait_start = time.perf_counter()
      try:
        item = next(items)
      except StopIteration:
        return
      self.data_wait += time.perf_counter() - wait_start
      yield item

  def add(self, metrics: dict[str, float]) -> None:
    self.sums.add(metrics)
    self.scalars["train/learning_rate"] = metrics["learning_rate"]
    if "train_flops_high" in metrics:
      self.scalars["flops/train_total"] = metrics["train_flops_high"] + metrics["train_flops_low"]

  def flush(self) -> dict[str, float]:
    """The window's scalars; the next window starts now."""
    seconds = time.time() - self.start
    scalars = {f"train/{k}": v for k, v in self.sums.averages().items()}
    scalars.update(self.scalars)
    scalars["train/examples_per_second"] = self.sums.count / seconds
    scalars["train/data_wait_fraction"] = self.data_wait / seconds
    self._reset()
    return scalars


def evaluate(backend: parallel.Backend, state: TrainState, dataset: data.Dataset,
             recipe: config_lib.Recipe) -> dict[str, float]:
  """Loss and accuracy over every test example exactly once (padded, masked batches)."""
  batches = dataset.eval_batches(global_batch_size=recipe.eval_global_batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  counter = SumCounter()
  for batch in batches:  # one batch at a time: unbounded dispatch can deadlock CPU collectives
    counter.add(parallel.metrics_to_host([backend.eval_step(state, backend.put_batch(batch))])[0])
  return counter.averages()


def sparsity_report(sparse: sparsity.Sparsity, backend: parallel.Backend, state: TrainState,
                    step: int) -> dict[str, float]:
  """Weight sparsity per layer and in total, and FLOPs (per example, per step, in total)."""
  state = backend.global_state(state)
  masks = jax.tree.map(parallel.local_value, state.masks)
  scalars = sparse.report(masks)
  scalars["flops/train_total"] = total_flops(parallel.local_value(state.train_flops))
  scalars["flops/train_total_dense"] = step * scalars["flops/train_step_dense"]
  return scalars


def _stop_requested(stop: StopSignal, done: int, log_every: int) -> bool:
  """Whether to stop after step `done`. Every process must stop after the same step, so
  in a multi-process run they agree (a small collective) at each logging step."""
  if jax.process_count() == 1:
    return stop.received is not None
  return done % log_every == 0 and distributed.agree_any(stop.received is not None)


def describe(value: Any) -> str:
  """How config.json names an object passed to train_and_evaluate: its class's (or, for a
  function, its own) module:qualified name."""
  named = value if callable(value) and not isinstance(value, nn.Module) else type(value)
  return f"{getattr(named, '__module__', '?')}:{getattr(named, '__qualname__', repr(named))}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _fields(config: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
  """{"config.train.num_steps": 20, ..., "given model": "my_models:MLP"}, as JSON values."""
  fields = _flatten(json.loads(json.dumps(config, default=str)), "config.")
  fields.update({f"given {name}": value for name, value in given.items()})
  return fields


def config_changes(workdir: str, config: ml_collections.ConfigDict,
                   given: dict[str, str]) -> list[str]:
  """One line per field that differs from the workdir's config.json, written by an
  earlier run in this workdir (none if there is none)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    before = _fields(saved["config"], saved.get("given", {}))
  except (FileNotFoundError, json.JSONDecodeError, KeyError):
    return []
  now = _fields(config.to_dict(), given)
  show = lambda fields, name: json.dumps(fields[name]) if name in fields else "(absent)"
  return [f"{name} changed since this workdir's config.json: {show(before, name)} -> "
          f"{show(now, name)}" for name in sorted(set(before) | set(now))
          if name not in before or name not in now or before[name] != now[name]]


def _save_config(workdir: str, config: ml_collections.ConfigDict, recipe: config_lib.Recipe,
                 given: dict[str, str]) -> None:
  """Writes workdir/config.json atomically: the config, what was passed to
  train_and_evaluate as objects instead of named in it, and the resolved recipe."""
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"config": config.to_dict(), "given": given, "recipe": recipe.to_dict()}, f,
              indent=2, default=str)
  os.replace(path + ".tmp", path)
