"""train_and_evaluate: the whole training run, top to bottom.

1. Check the config, find the devices, load the data, resolve the recipe:
   every user error surfaces here, before anything compiles or is written.
2. Build the model, its sparsity schedule, optimizer and state (1 and 2 are
   `setup`, which scripts/benchmark.py shares); resume from the latest checkpoint.
3. Train: dispatch steps with a bounded number in flight, log, evaluate (with
   the weight sparsity and FLOPs report), checkpoint, stop cleanly on SIGTERM,
   stop loudly on a non-finite loss.
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

import jax
import ml_collections

from jaxddp import config as config_lib
from jaxddp import data, distributed, models, optim, parallel, sparsity
from jaxddp.checkpoint import Checkpointer, StopSignal
from jaxddp.metrics import MetricWriter, Progress, SumCounter, format_recipe, read_scalar
from jaxddp.state import TrainState, create_train_state


class TrainingInterrupted(Exception):
  """A signal stopped the run after it saved a checkpoint; rerun to resume."""

  def __init__(self, signal_name: str, signum: int, step: int):
    super().__init__(f"stopped by {signal_name} after step {step}; a checkpoint was saved, "
                     "run the same command again to resume")
    self.signum = signum


class NonFiniteLossError(Exception):
  """The training loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState  # global view: arrays replicated on every device, whatever the backend
  eval_metrics: dict[str, float]  # {"loss": ..., "accuracy": ...} on the whole test split


@dataclasses.dataclass
class Setup:
  """What a run trains with, built from the config alone (no workdir)."""
  config: ml_collections.ConfigDict
  devices: list[jax.Device]
  dataset: data.Dataset
  recipe: config_lib.Recipe
  backend: parallel.Backend
  sparsity: sparsity.Sparsity  # masks' schedule (method none: dense) and the FLOPs count
  state: TrainState  # freshly initialised, placed on the devices

  def train_batches(self, start_step: int):
    """This process's part of the training batch of each step from start_step on."""
    return self.dataset.train_batches(
        global_batch_size=self.recipe.effective_batch_size, seed=self.config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Steps 1 and 2 of a run, up to its first step (scripts/benchmark.py times from here).

  Checks the config, finds the devices, loads the data and resolves the recipe (every
  user error surfaces here, before anything compiles), then builds the model,
  optimizer, backend and initial state.
  """
  config_lib.validate(config)
  devices = parallel.select_devices(config.parallel.cpu_devices)
  dataset = data.load_dataset(config)
  recipe = config_lib.resolve(config, num_train_examples=dataset.num_train_examples,
                              num_test_examples=dataset.num_test_examples, num_devices=len(devices),
                              num_processes=jax.process_count())
  model = models.create_model(config, dataset.num_classes)
  sparse = sparsity.create(config, recipe, model, dataset.input_shape)
  schedule = optim.learning_rate_schedule(config, recipe)
  tx = optim.create_optimizer(config, schedule)
  backend = parallel.create_backend(config, devices, schedule, sparse)
  state = sparse.initialize(create_train_state(model, tx, dataset.input_shape, config.seed))
  state = backend.put_state(state)
  return Setup(config, devices, dataset, recipe, backend, sparse, state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains data-parallel on every selected device, then evaluates on the test split."""
  # --- 1 and 2. Config, devices, data, recipe (fail before compiling or writing); model,
  # optimizer, state, and the latest checkpoint if there is one. ---
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file; give a directory")
  run = setup(config)
  devices, dataset, recipe, backend, state, sparse = (run.devices, run.dataset, run.recipe,
                                                      run.backend, run.state, run.sparsity)
  is_main_process = jax.process_index() == 0
  checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
  state = backend.put_state(checkpointer.restore_latest(backend.global_state(state)))
  start_step = int(parallel.local_value(backend.global_state(state).step))

  progress = Progress(recipe.total_steps, start_step, enabled=is_main_process)
  if is_main_process:
    _save_config(workdir, config, recipe)
    progress.print(f"jaxddp: {backend.name} on {recipe.num_devices} {devices[0].platform} "
                   f"device(s), {recipe.num_processes} process(es)\nresolved recipe:\n"
                   f"{format_recipe(recipe.to_dict())}")
    if start_step:
      progress.print(f"resuming from the checkpoint at step {start_step}")
  writer = MetricWriter(workdir, enabled=is_main_process)
  # Training FLOPs so far (analytical, sparse; see jaxddp.sparsity), summed per step.
  train_flops = read_scalar(workdir, "flops/train_total", start_step) or 0.0

  # --- 3. Train. ---
  # The time the loop waits for the next batch (on the devices) is logged as
  # train/data_wait_fraction.
  batches = data.prefetch_to_device(run.train_batches(start_step), backend.put_batches)
  window = SumCounter()
  window_start = time.time()
  data_wait = 0.0  # seconds in this logging window
  learning_rate = 0.0
  in_flight: collections.deque = collections.deque()  # dispatched, maybe still running
  finished: list = []  # done on the device, metrics not yet read by the host

  def wait_for_oldest_step() -> None:
    finished.append(in_flight.popleft())
    jax.block_until_ready(finished[-1][1])
    watchdog.pet()

  def check_steps() -> None:
    """Waits for every step in flight, reads their metrics in one transfer, checks them."""
    nonlocal learning_rate, train_flops
    while in_flight:
      wait_for_oldest_step()
    for (step, _), metrics in zip(finished, parallel.metrics_to_host([m for _, m in finished])):
      if not math.isfinite(metrics["loss_sum"]) or metrics["params_finite"] != 1.0:
        what = (f"the training loss is {metrics['loss_sum'] / metrics['count']}"
                if not math.isfinite(metrics["loss_sum"]) else "the parameters became NaN or Inf")
        raise NonFiniteLossError(
            f"{what} at step {step + 1}; stopping (the last good checkpoint in "
            f"{checkpointer.directory} is kept; try a lower config.optimizer.learning_rate)")
      window.add(metrics)
      learning_rate = metrics["learning_rate"]
      train_flops += metrics["flops"]
    finished.clear()

  def save_checkpoint(done: int) -> None:
    check_steps()
    checkpointer.save(done, backend.global_state(state))
    writer.write(done, {"flops/train_total": train_flops})  # where a resumed run's total starts
    watchdog.pet()

  run_start = time.time()
  hang = (f"no step, evaluation or checkpoint finished for {config.distributed.hang_timeout} s "
          "(config.distributed.hang_timeout): another process may have died or hung")
  watchdog = distributed.Watchdog(config.distributed.hang_timeout, hang,
                                  distributed.process_label())
  try:
    with StopSignal() as stop, watchdog:
      for step in range(start_step, recipe.total_steps):
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - wait_start
        state, metrics = backend.train_step(state, batch)
        in_flight.append((step, metrics))
        while len(in_flight) >= config.parallel.max_steps_in_flight:
          wait_for_oldest_step()  # bounds the work in flight; no transfer to the host
        done = step + 1  # steps completed once this one finishes

        if done % config.train.log_every == 0 or done == recipe.total_steps:
          check_steps()
          seconds = time.time() - window_start
          scalars = {f"train/{k}": v for k, v in window.averages().items()}
          scalars["train/learning_rate"] = learning_rate
          scalars["train/examples_per_second"] = window.count / seconds
          scalars["train/data_wait_fraction"] = data_wait / seconds
          scalars["flops/train_total"] = train_flops
          writer.write(done, scalars)
          progress.update(done, scalars)
          window, window_start, data_wait = SumCounter(), time.time(), 0.0
        if config.train.eval_every and done % config.train.eval_every == 0 \
            and done < recipe.total_steps:
          metrics = evaluate(backend, state, dataset, recipe)
          writer.write(done, {**{f"eval/{k}": v for k, v in metrics.items()},
                              **sparsity_report(sparse, backend, state, done, train_flops)})
          watchdog.pet()
        if done % config.train.checkpoint_every == 0 or done == recipe.total_steps:
          save_checkpoint(done)
        if _stop_requested(stop, done, config.train.log_every):
          save_checkpoint(done)
          raise TrainingInterrupted(stop.name or "a signal to another process",
                                    stop.received or signal.SIGTERM, done)
      check_steps()

      # --- 4. Final evaluation on every test example. ---
      final = evaluate(backend, state, dataset, recipe)
    report = sparsity_report(sparse, backend, state, recipe.total_steps, train_flops)
    writer.write(recipe.total_steps, {**{f"eval/{k}": v for k, v in final.items()}, **report})
  finally:
    progress.close()
    writer.close()
    checkpointer.close()
  if sparse.method != "none":
    progress.print(sparse.format_table(report, train_flops, report["flops/train_total_dense"]))
  progress.print(f"final test accuracy {final['accuracy']:.2%} (loss {final['loss']:.4f}) after "
                 f"{recipe.total_steps} steps, {time.time() - run_start:.1f}s of training")
  return TrainResult(backend.global_state(state), final)


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
                    step: int, train_flops: float) -> dict[str, float]:
  """Weight sparsity per layer and in total, and FLOPs (per example, per step, in total)."""
  masks = jax.tree.map(parallel.local_value, backend.global_state(state).masks)
  scalars = sparse.report(masks)
  scalars["flops/train_total"] = train_flops
  scalars["flops/train_total_dense"] = step * scalars["flops/train_step_dense"]
  return scalars


def _stop_requested(stop: StopSignal, done: int, log_every: int) -> bool:
  """Whether to stop after step `done`. Every process must stop after the same step, so
  in a multi-process run they agree (a small collective) at each logging step."""
  if jax.process_count() == 1:
    return stop.received is not None
  return done % log_every == 0 and distributed.agree_any(stop.received is not None)


def _save_config(workdir: str, config: ml_collections.ConfigDict, recipe: config_lib.Recipe):
  """Writes workdir/config.json (config and resolved recipe) atomically."""
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"config": config.to_dict(), "recipe": recipe.to_dict()}, f, indent=2, default=str)
  os.replace(path + ".tmp", path)
