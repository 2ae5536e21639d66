"""train_and_evaluate: the whole training run, top to bottom.

1. Set up (`setup`, which scripts/benchmark.py shares): check the config, find the
   devices, load the data, resolve the recipe, build the model, loss, sparsity
   schedule, data pruning, learning rate, optimizer, backend and state. Every user
   error surfaces here, before anything compiles or is written.
2. Start: resume from the workdir's latest checkpoint; or, in a new workdir, start
   from another run's weights (config.init_from) or from the initialisation.
3. Train (`TrainingLoop`): part by part as data pruning plans them (one part without
   it, one per epoch under InfoBatch), dispatch the steps (a bounded number in
   flight), and after each step run the periodic actions: log, evaluate (with the
   sparsity and FLOPs report), checkpoint; stop cleanly on SIGTERM, loudly on a
   non-finite loss.
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

from jaxddp import checkpoint, data, distributed, losses, models, optim, parallel, pruning
from jaxddp import sparsity
from jaxddp import config as config_lib
from jaxddp.checkpoint import Checkpointer, StopSignal
from jaxddp.errors import ConfigError
from jaxddp.evaluate import evaluate
from jaxddp.metrics import MetricWriter, Progress, SumCounter, format_recipe
from jaxddp.recipe import Recipe, resolve
from jaxddp.state import TrainState, create_train_state, local_value, total_flops
from jaxddp.workdir import Lock as WorkdirLock
from jaxddp.workdir import checked as checked_workdir


# Called with (steps done, the evaluation's metrics) after each periodic evaluation.
OnEvaluate = Callable[[int, dict[str, float]], None]


class TrainingInterrupted(Exception):
  """A signal stopped the run after it saved a checkpoint; rerun to resume."""

  def __init__(self, signal_name: str, signum: int, step: int):
    super().__init__(f"stopped by {signal_name} after step {step}; a checkpoint was saved, "
                     "run the same command again to resume")
    self.signum = signum


class NonFiniteLossError(Exception):
  """The training loss became NaN or Inf; the last good checkpoint, if any, is kept.

  `recipe` is the run's resolved recipe (set on the way out of train_and_evaluate);
  `step` the step whose loss or parameters were not finite.
  """
  recipe: Recipe | None = None
  step: int = 0


@dataclasses.dataclass
class TrainResult:
  """What a finished run returns: everything its last line of metrics.jsonl and its
  config.json hold, so that a caller never re-reads the files of the run it just ran."""
  state: TrainState  # global view: arrays replicated on every device, whatever the backend
  eval_metrics: dict[str, float]  # {"loss": ..., "accuracy": ...} on the whole test split
  train_metrics: dict[str, float]  # the last logging window: {"train/loss": ..., ...}
  # Every logging window of this call, in order, each with its "step" (a resumed run's
  # start after the resume; metrics.jsonl holds the whole run's).
  train_history: list[dict[str, float]]
  report: dict[str, float]  # the final report: FLOPs, sparsity, data pruning ("flops/...")
  recipe: Recipe  # the resolved recipe, as saved in config.json
  last_step: int  # steps trained (InfoBatch: fewer than recipe.total_steps)
  seconds: float  # wall-clock time of the training loop and final evaluation


@dataclasses.dataclass
class Setup:
  """What a run trains with, built from the config (and any objects given) alone."""
  config: ml_collections.ConfigDict
  devices: list[jax.Device]
  dataset: data.Dataset
  recipe: Recipe
  model: nn.Module
  backend: parallel.Backend
  sparsity: sparsity.Sparsity  # masks' schedule (method none: dense) and the FLOPs count
  data_pruning: pruning.DataPruning  # none, a static subset, or InfoBatch's epochs
  state: TrainState  # freshly initialised, placed on the devices
  given: dict[str, str]  # what was passed as an object instead of named in the config
  # What the run trains on, kept in config.json and checked on resume: the dataset's
  # fingerprint (jaxddp.data.fingerprint) and, for a static subset, the scores file's digest.
  data_identity: dict[str, str]

  def train_batches(self, start_step: int) -> Iterator[dict]:
    """This process's part of the training batch of each step from start_step on (of
    the kept examples, for a static subset)."""
    return self.data_pruning.train_batches(start_step)


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
  data_identity = {"dataset": data.fingerprint(dataset)}
  # A static subset (data pruning) or None.
  kept = pruning.kept_examples(config, dataset, data_identity["dataset"])
  if config.data_pruning.scores:  # read, and found good, above
    data_identity["scores"] = pruning.scores_digest(config.data_pruning.scores)
  recipe = resolve(config, num_train_examples=dataset.num_train_examples if kept is None else
                   len(kept), num_test_examples=dataset.num_test_examples,
                   num_devices=len(devices), num_processes=jax.process_count())
  data_pruning = pruning.create(config, dataset, recipe, kept)
  recipe = dataclasses.replace(recipe, data_pruning=data_pruning.description,
                               devices=parallel.describe_devices(devices))
  model = _model(config, model, dataset)
  train_loss, eval_loss = losses.get(config, loss_fn)
  losses.check(eval_loss, dataset.num_classes)
  sparse = sparsity.create(config, recipe, model, dataset.input_shape)
  learning_rate = optim.LearningRate(optim.learning_rate_schedule(config, recipe),
                                     data_pruning.schedule_position)
  tx = optim.create_optimizer(config, learning_rate)
  backend = parallel.create_backend(config, devices, learning_rate, sparse, train_loss, eval_loss,
                                    data_pruning.tables)
  state = sparse.initialize(create_train_state(model, tx, dataset.input_shape, config.seed))
  state = state.replace(examples=data_pruning.initial_tables())
  return Setup(config, devices, dataset, recipe, model, backend, sparse, data_pruning,
               backend.put_state(state), given, data_identity)


def _model(config: ml_collections.ConfigDict, model: nn.Module | None,
           dataset: data.Dataset) -> nn.Module:
  """The model config.model.name names, or the one given, checked against the data."""
  if model is None:
    model = models.create_model(config, dataset.num_classes)
  elif isinstance(model, type) and issubclass(model, nn.Module):
    raise ConfigError(f"train_and_evaluate(model=...) got the class {model.__name__}; pass an "
                      f"instance, e.g. model={model.__name__}(num_classes={dataset.num_classes})")
  elif not isinstance(model, nn.Module):
    raise ConfigError(f"train_and_evaluate(model=...) got an object of type "
                      f"{type(model).__name__}, not a Flax module (nn.Module)")
  models.check_model(model, dataset.input_shape, dataset.num_classes)
  return model


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None, dataset: data.Dataset | None = None,
                       loss_fn: losses.LossFn | None = None,
                       on_evaluate: OnEvaluate | None = None) -> TrainResult:
  """Trains data-parallel on every selected device, then evaluates on the test split.

  `model` (a Flax module called as model(x, train=bool) that returns logits),
  `dataset` (a jaxddp.data.Dataset, e.g. jaxddp.data.ArrayDataset) and `loss_fn`
  (logits, labels -> per-example losses) replace what the config names; see README,
  "Your own model and data". `on_evaluate(step, {"loss": ..., "accuracy": ...})` is
  called after each evaluation every config.train.eval_every steps; an exception it
  raises stops the run there (jaxddp.tune prunes trials so).
  """
  # --- 1. Set up: every user error surfaces here, before anything compiles or is written.
  workdir = checked_workdir(workdir)
  run = setup(config, model=model, dataset=dataset, loss_fn=loss_fn)
  backend, state = run.backend, run.state

  # --- 2. Start: resume, or start from another run's weights, or from the initialisation.
  # A run to resume is read before the workdir is held: one on other data, or a checkpoint
  # of another model or optimizer, is refused with nothing in the workdir written.
  resuming = checkpoint.has_checkpoint(workdir)
  checkpointer, source = None, None
  if resuming:
    # Process 0 wrote config.json and reads it; every process stops on its answer.
    problem = _other_data(workdir, run) if jax.process_index() == 0 else ""
    problem = distributed.leader_text(problem, size=4096)
    if problem:
      raise ConfigError(problem)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)  # it exists
    try:
      state = backend.put_state(checkpointer.restore_latest(backend.global_state(state)))
    except BaseException:
      checkpointer.close()
      raise
  elif config.init_from.workdir:
    source = checkpoint.InitSource(config.init_from, backend.global_state(state))
  # From here on the workdir is held, by one run at a time.
  with WorkdirLock(workdir, is_leader=jax.process_index() == 0, agree=distributed.leader_text):
    if checkpointer is None:
      checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)  # creates the workdir
    if source:
      # The sparsity method then applies to the loaded weights (random masks prune them).
      state = backend.put_state(
          run.sparsity.initialize(source.load(backend.global_state(state))))
    start_step = int(local_value(backend.global_state(state).step))
    progress = Progress(run.recipe.total_steps, start_step, enabled=jax.process_index() == 0)
    if jax.process_index() == 0:
      _announce(run, workdir, progress, start_step, source)

    # --- 3. Train, and 4. evaluate on every test example.
    loop = TrainingLoop(run, state, checkpointer, progress,
                        MetricWriter(workdir, enabled=jax.process_index() == 0,
                                     start_step=start_step), on_evaluate)
    try:
      return loop.train(start_step)
    except NonFiniteLossError as error:
      error.recipe = run.recipe
      raise


def _other_data(workdir: str, run: Setup) -> str:
  """Why the workdir's run must not be resumed on this run's data ("" if it may): its
  config.json records another dataset fingerprint or another scores file ("data"), or
  cannot be read, so the data cannot be checked."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as error:
    # Every run writes config.json before its first checkpoint: without it, what the
    # checkpoints were trained on cannot be checked.
    why = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return (f"--workdir={workdir} has checkpoints but its config.json cannot be read "
            f"({why}), so the data they were trained on cannot be checked; restore it, or "
            "use a new --workdir")
  before = saved.get("data")
  if not isinstance(before, dict):
    return ""  # written by a jaxddp that did not record its data: nothing to compare
  now = run.data_identity
  if before.get("dataset", now["dataset"]) != now["dataset"]:
    return (f"--workdir={workdir} holds a run on other data ({before['dataset']}); this "
            f"run's data is {now['dataset']}; use a new --workdir")
  if before.get("scores", now.get("scores")) != now.get("scores"):
    return (f"config.data_pruning.scores={run.config.data_pruning.scores!r} changed since "
            f"this workdir's run started ({before['scores']} -> {now.get('scores')}), which "
            "would change its subset mid-run; restore that file or use a new --workdir")
  return ""


def _announce(run: Setup, workdir: str, progress: Progress, start_step: int,
              source: checkpoint.InitSource | None) -> None:
  """Saves config.json and prints the recipe, what changed since the workdir's last run,
  and where training starts from."""
  changes = config_changes(workdir, run.config, run.given)
  _save_config(workdir, run)
  progress.print(f"jaxddp: {run.backend.name} on {run.recipe.num_devices} "
                 f"{run.devices[0].platform} device(s), {run.recipe.num_processes} "
                 f"process(es)\nresolved recipe:\n{format_recipe(run.recipe.to_dict())}")
  for line in changes:
    progress.print(line)
  if start_step:
    progress.print(f"resuming from the checkpoint at step {start_step}")
  elif source:
    progress.print(f"initialised from {source.describe()}")


@dataclasses.dataclass(frozen=True)
class Periodic:
  """An action due after every `period` steps (0: never) and, if `at_end`, after the
  run's last step (clu's periodic actions are the model)."""
  period: int
  action: Callable[[int], None]
  at_end: bool = True

  def due(self, done: int, last: bool) -> bool:
    if last:
      return self.at_end
    return bool(self.period) and done % self.period == 0


class TrainingLoop:
  """Step 3 and 4 of a run: the steps, part by part, with the periodic actions after each
  (log, evaluate, checkpoint); then the final evaluation and report.

  It owns the training state from the start step to the result: every action reads
  self.state, and only the steps and data pruning's plans replace it.
  """

  def __init__(self, run: Setup, state: TrainState, checkpointer: Checkpointer,
               progress: Progress, writer: MetricWriter, on_evaluate: OnEvaluate | None = None):
    self.run, self.state, self.checkpointer = run, state, checkpointer
    self.progress, self.writer = progress, writer
    self.on_evaluate = on_evaluate
    config = run.config
    self.window = LogWindow()
    self.watchdog = distributed.Watchdog(
        config.distributed.hang_timeout,
        f"no step, evaluation or checkpoint finished for {config.distributed.hang_timeout} s "
        "(config.distributed.hang_timeout): another process may have died or hung",
        distributed.process_label())
    self.in_flight = StepsInFlight(config.parallel.max_steps_in_flight, self.window.add,
                                   self.watchdog.pet, checkpointer.directory)
    self.actions = (Periodic(config.train.log_every, self.log),
                    Periodic(config.train.eval_every, self.evaluate, at_end=False),  # step 4
                    Periodic(config.train.checkpoint_every, self.checkpoint))
    self.train_metrics: dict[str, float] = {}  # the latest logging window's
    self.train_history: list[dict[str, float]] = []  # every logging window's, with "step"

  def train(self, start_step: int) -> TrainResult:
    run, step = self.run, start_step
    try:
      with StopSignal() as stop, self.watchdog:
        while True:
          self.in_flight.drain()  # data pruning plans from the finished steps' tables
          self.state, part = run.data_pruning.plan(self.state, step, run.backend)
          if part is None:
            break
          step = self._run_part(part, stop)
        eval_metrics = evaluate(run.backend, self.state, run.dataset, run.recipe)
      report = self._report(step)
      self.writer.write(step, {**{f"eval/{k}": v for k, v in eval_metrics.items()}, **report})
    finally:
      self.progress.close()
      self.writer.close()
      self.checkpointer.close()
    seconds = time.time() - self.window.started
    self._summarise(step, report, eval_metrics, seconds)
    return TrainResult(state=run.backend.global_state(self.state), eval_metrics=eval_metrics,
                       train_metrics=self.train_metrics, train_history=self.train_history,
                       report=report, recipe=run.recipe,
                       last_step=step, seconds=seconds)

  def _run_part(self, part: pruning.Part, stop: StopSignal) -> int:
    """Trains the steps of `part`; returns the steps done after it."""
    batches = data.prefetch_to_device(part.batches, self.run.backend.put_batches)
    done = part.start
    for step, batch in self.window.timed(zip(range(part.start, part.end), batches)):
      self.state, metrics = self.run.backend.train_step(self.state, batch)
      self.in_flight.add(step, metrics)
      done = step + 1
      last = part.last and done == part.end
      for action in self.actions:
        if action.due(done, last):
          action.action(done)
      if _stop_requested(stop, done, self.run.config.train.log_every):
        self.checkpoint(done)
        raise TrainingInterrupted(stop.name or "a signal to another process",
                                  stop.received or signal.SIGTERM, done)
    return done

  def log(self, done: int) -> None:
    self.in_flight.drain()
    scalars = {**self.window.flush(), **self.run.data_pruning.progress(done)}
    self.writer.write(done, scalars)
    self.progress.update(done, scalars)
    self.train_metrics = scalars
    self.train_history.append({"step": done, **scalars})

  def evaluate(self, done: int) -> None:
    run = self.run
    scalars = evaluate(run.backend, self.state, run.dataset, run.recipe)
    self.writer.write(done, {**{f"eval/{k}": v for k, v in scalars.items()},
                             **sparsity_report(run.sparsity, run.backend, self.state, done)})
    self.watchdog.pet()
    if self.on_evaluate is not None:
      self.on_evaluate(done, scalars)

  def checkpoint(self, done: int) -> None:
    self.in_flight.drain()  # a checkpoint holds only steps already checked
    self.checkpointer.save(done, self.run.backend.global_state(self.state))
    self.watchdog.pet()

  def _report(self, last_step: int) -> dict[str, float]:
    """The final report: sparsity and FLOPs, and data pruning's entries."""
    report = sparsity_report(self.run.sparsity, self.run.backend, self.state, last_step)
    report.update(self.run.data_pruning.report(last_step, report))
    return report

  def _summarise(self, last_step: int, report: dict[str, float], final: dict[str, float],
                 seconds: float) -> None:
    run = self.run
    if run.sparsity.spec.masked:
      self.progress.print(run.sparsity.format_table(report, report["flops/train_total"],
                                                    report["flops/train_total_dense"]))
    line = run.data_pruning.summary(last_step, report)
    if line:
      self.progress.print(line)
    self.progress.print(f"final test accuracy {final['accuracy']:.2%} (loss "
                        f"{final['loss']:.4f}) after {last_step} steps, {seconds:.1f}s of "
                        "training")


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
                if not math.isfinite(metrics["loss_sum"]) else
                "the parameters or batch-norm statistics became NaN or Inf")
        kept = (f"the last good checkpoint in {self.checkpoint_directory} is kept"
                if checkpoint.has_checkpoint(os.path.dirname(self.checkpoint_directory)) else
                "no checkpoint was written before it")
        error = NonFiniteLossError(f"{what} at step {step + 1}; stopping ({kept}; try a "
                                   "lower config.optimizer.learning_rate)")
        error.step = step + 1
        raise error
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


def sparsity_report(sparse: sparsity.Sparsity, backend: parallel.Backend, state: TrainState,
                    step: int) -> dict[str, float]:
  """Weight sparsity per layer and in total, and FLOPs (per example, per step, in total)."""
  state = backend.global_state(state)
  masks = jax.tree.map(local_value, state.masks)
  scalars = sparse.report(masks)
  scalars["flops/train_total"] = total_flops(local_value(state.train_flops))
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


def _fields(config: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
  """{"config.train.num_steps": 20, ..., "given model": "my_models:MLP"}, as JSON values."""
  fields = config_lib.flatten(json.loads(json.dumps(config, default=str)), "config.")
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
  # config.tune is a study's settings (jaxddp.tune), which no run reads.
  return [f"{name} changed since this workdir's config.json: {show(before, name)} -> "
          f"{show(now, name)}" for name in sorted(set(before) | set(now))
          if not name.startswith("config.tune.") and
          (name not in before or name not in now or before[name] != now[name])]


def _save_config(workdir: str, run: Setup) -> None:
  """Writes workdir/config.json atomically: the config, what was passed to
  train_and_evaluate as objects instead of named in it, the data it trains on (checked
  on resume) and the resolved recipe."""
  config, recipe = run.config, run.recipe
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"config": config.to_dict(), "given": run.given, "data": run.data_identity,
               "recipe": recipe.to_dict()}, f, indent=2, default=str)
  os.replace(path + ".tmp", path)
