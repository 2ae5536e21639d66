r"""Hyperparameter search: a study of many jaxddp runs, on Optuna.

    python -m jaxddp.tune --config=configs/tune_mnist1d.py --workdir=runs/tune \
        [--workers=auto] [--config.tune.num_trials=40 ...]

config.tune says what to search (config.tune.space, a distribution per config field),
how (sampler, pruner, metric, direction) and where the study lives (storage: an SQLite
file workdir/study.db by default, a PostgreSQL or MySQL URL, or a journal file). Every
trial is an ordinary jaxddp run in workdir/trials/NNNN: its recipe, metrics, log and
checkpoints are there.

Workers: `--workers=auto` splits this host's devices into groups of
config.tune.devices_per_trial and starts one worker per group; each takes the study's
trials one at a time until all num_trials have ended. Workers on other hosts (a SLURM
array, scripts/slurm/tune.sbatch) share the study through its storage.

A worker that dies (SIGKILL, a lost node) stops its trial's heartbeat; after
config.tune.stale_after_seconds any worker takes the trial up again, from the trial's
last checkpoint. SIGTERM or Ctrl-C saves a checkpoint, hands the trial back, and exits
with 128 + the signal number; run the same command again to go on.

When the study has ended: workdir/trials.csv, workdir/best_config.py (the best trial's
whole config: `python -m jaxddp.main --config=workdir/best_config.py` reruns it),
workdir/summary.json and plots (workdir/plots/*.png). Trials share compiled programs
through JAX's persistent cache in workdir/compile_cache (share_compiled_programs).

Bad input (a field the config does not have, a malformed distribution, an unknown
sampler or pruner, an unreachable storage, a study made with another space) prints one
line and exits with status 2, before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import types
import warnings
from typing import Any

import ml_collections

from jaxddp import checkpoint, parallel
from jaxddp.errors import ConfigError
from jaxddp.search_space import Dimension, SpaceFunction, parse_space, trial_config, validate
from jaxddp.study import (CONTINUES, METRICS, POLL_SECONDS, PREVIOUS, PRUNERS, SAMPLERS,
                          Heartbeat, TuneResult, direction, format_result, one_worker_at_a_time,
                          open_storage, open_study, redacted, storage_url, superseded,
                          take_stale_trials, take_waiting_trial, trials_in, write_results)
from jaxddp.workdir import checked as checked_workdir


# --- A worker -----------------------------------------------------------------------------

@dataclasses.dataclass
class Worker:
  """One process that runs the study's trials one after another on its devices."""
  config: ml_collections.ConfigDict
  workdir: str
  dimensions: list[Dimension]
  label: str  # "worker 1 (cpu 2,3 of 0-7)"
  space: SpaceFunction | None = None
  objects: dict[str, Any] = dataclasses.field(default_factory=dict)  # model, dataset, loss_fn

  def run(self) -> None:
    """Takes trials until none is queued or running anywhere."""
    from optuna.trial import TrialState
    config = self.config
    share_compiled_programs(self.workdir)
    study = open_study(config, open_storage(config, self.workdir), self.dimensions, self.space)
    study.pruner = PRUNERS[config.tune.pruner]()
    with checkpoint.StopSignal() as stop:
      while stop.received is None:
        with one_worker_at_a_time(storage_url(config, self.workdir)):
          take_stale_trials(study, config.tune.stale_after_seconds)
          trial_id = take_waiting_trial(study)
        if trial_id is None:
          if not trials_in(study, TrialState.RUNNING):
            return
          time.sleep(POLL_SECONDS)  # others still run: one may die and need taking up
          continue
        self._run_trial(study, trial_id)
    raise StudyInterrupted(stop.received)

  def _run_trial(self, study, trial_id: int) -> None:
    import optuna
    from optuna.trial import TrialState
    from jaxddp import train
    config = self.config
    storage = study._storage
    number = storage.get_trial_number_from_id(trial_id)
    # Each trial's own sampler seed: the study's proposals do not depend on which worker
    # takes which trial (the grid sampler shares one order, so it keeps one seed).
    seed = config.tune.seed if config.tune.sampler == "grid" else \
        (config.tune.seed * 1_000_003 + number) % 2**32
    study.sampler = SAMPLERS[config.tune.sampler](self.dimensions, seed)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. the grid's "re-evaluating" on a continuation
      trial = optuna.Trial(study, trial_id)
    first = trial.user_attrs.get(CONTINUES, number)
    workdir = os.path.join(self.workdir, "trials", f"{first:04d}")
    start_step = checkpoint.latest_step(workdir)
    with Heartbeat(storage, trial_id, config.tune.heartbeat_seconds):
      try:
        cfg = trial_config(config, self.dimensions, trial, self.space)
        validate(cfg, tuple(self.objects))
      except ConfigError as error:
        self._end(study, trial, TrialState.FAIL, f"invalid config: {error}")
        return
      for key, value in (("workdir", os.path.relpath(workdir, self.workdir)),
                         ("worker", f"{self.label} pid {os.getpid()} on {socket.gethostname()}")):
        trial.set_user_attr(key, value)
      previous = trial.user_attrs.get(PREVIOUS)
      if previous is not None:  # a killed trial's evaluations count toward pruning this one
        for step, value in sorted(study.trials[previous].intermediate_values.items()):
          if step <= start_step:  # later ones are run again
            trial.report(value, step)
      what = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
      resumed = f", resuming at step {start_step}" if start_step else ""
      print(f"jaxddp.tune: [{self.label}] trial {number} started: {what}{resumed}", flush=True)
      evaluations: list[int] = []

      def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        evaluations.append(step)
        trial.report(metrics[config.tune.metric], step)
        if trial.should_prune():
          raise optuna.TrialPruned()

      started = time.time()
      _log_attempt(workdir, number, self.label, start_step, "started")
      try:
        with _output_to(os.path.join(workdir, "log.txt")):
          result = train.train_and_evaluate(cfg, workdir, on_evaluate=on_evaluate,
                                            **self.objects)
      except optuna.TrialPruned:
        step = evaluations[-1]
        self._record(trial, workdir, step, time.time() - started)
        _log_attempt(workdir, number, self.label, step, "pruned")
        self._end(study, trial, TrialState.PRUNED, f"pruned at step {step}")
        return
      except train.TrainingInterrupted:
        # Saved; the trial goes back to the queue, to be resumed from that checkpoint.
        _log_attempt(workdir, number, self.label, checkpoint.latest_step(workdir), "stopped")
        storage.set_trial_state_values(trial_id, state=TrialState.WAITING)
        raise
      except train.NonFiniteLossError as error:
        # A result, not a fault: told as pruned (at its last evaluation's value, if any),
        # so that the sampler learns to avoid the region; Optuna's samplers skip failed
        # trials and would propose it again.
        self._record(trial, workdir, error.step, time.time() - started)
        _log_attempt(workdir, number, self.label, error.step, "diverged")
        self._end(study, trial, TrialState.PRUNED, f"diverged at step {error.step}")
        return
      except Exception as error:  # noqa: BLE001 - the trial fails, the study goes on
        # A config the trial's devices do not accept (a ConfigError), or a fault of this
        # trial (out of memory, a bug in a user's model): recorded with its reason, its
        # traceback in the trial's log.txt. Left running, it would be taken up again and
        # fail again, on every worker in turn.
        with open(os.path.join(workdir, "log.txt"), "a") as log:
          traceback.print_exc(file=log)
        _log_attempt(workdir, number, self.label, checkpoint.latest_step(workdir), "failed")
        why = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if not isinstance(error, ConfigError):
          why = f"{type(error).__name__}: {why} (traceback in {workdir}/log.txt)"
        self._end(study, trial, TrialState.FAIL, why)
        return
      self._record(trial, workdir, result.last_step, time.time() - started)
      _log_attempt(workdir, number, self.label, result.last_step, "complete")
      self._end(study, trial, TrialState.COMPLETE, "", result.eval_metrics[config.tune.metric])

  def _record(self, trial, workdir: str, steps: int, seconds: float) -> None:
    """The trial's steps, planned steps, wall time and devices, as user attributes."""
    recipe = _saved_recipe(workdir)
    trial.set_user_attr("steps", steps)
    trial.set_user_attr("total_steps", recipe.get("total_steps"))
    trial.set_user_attr("devices", recipe.get("devices"))
    trial.set_user_attr("seconds", trial.user_attrs.get("seconds", 0.0) + seconds)

  def _end(self, study, trial, state, why: str, value: float | None = None) -> None:
    from optuna.trial import TrialState
    if why:
      trial.set_user_attr("why", why)
    value = study.tell(trial, value, state=state).value  # a pruned trial's: its last report
    ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                     TrialState.FAIL))
    ended = [t for t in ended if not superseded(t)]
    best = ""
    try:
      best = f"; best {study.best_value:.4g} (trial {study.best_trial.number})"
    except ValueError:  # no trial complete yet
      pass
    shown = f" {self.config.tune.metric} {value:.4g}" if value is not None else ""
    print(f"jaxddp.tune: [{self.label}] trial {trial.number} {state.name.lower()}{shown}"
          f"{' (' + why + ')' if why else ''}; {len(ended)}/{self.config.tune.num_trials} "
          f"trials ended{best}", flush=True)


class StudyInterrupted(Exception):
  """SIGTERM or Ctrl-C stopped the study's workers; their trials saved checkpoints and went
  back to the study, and the same command goes on."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def share_compiled_programs(workdir: str) -> None:
  """Turns on JAX's persistent compilation cache in workdir/compile_cache, unless one is
  set already (JAX_COMPILATION_CACHE_DIR or jax.config). Programs that do not change from
  trial to trial then compile once for the study, not once per trial: the model's
  initialisation and the evaluation step (for the CNN of configs/tune_mnist1d.py, about
  half of a trial's compile time on our CPU). The training step has the trial's learning
  rate and other settings as constants, so it is shared only by trials whose settings and
  shapes are equal. The cache's key is the whole program, its devices, options and JAX's
  version, so a hit is the same executable: no trial's numbers change. JAX reads the
  setting at its first compile: this takes effect in a process that has compiled nothing
  yet (every worker process; `jaxddp.tune` in a program that compiled before it keeps
  that program's setting)."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))


def _short(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _saved_recipe(workdir: str) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)["recipe"]
  except (OSError, ValueError, KeyError):
    return {}


def _log_attempt(workdir: str, number: int, worker: str, step: int, event: str) -> None:
  """One line per start and end of a trial's run in workdir/attempts.jsonl: which trial,
  worker and step, so that a trial's history over killed workers can be read."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "attempts.jsonl"), "a") as f:
    f.write(json.dumps({"trial": number, "event": event, "step": step, "worker": worker,
                        "pid": os.getpid(), "host": socket.gethostname(),
                        "time": time.time()}) + "\n")


@contextlib.contextmanager
def _output_to(path: str):
  """The trial's own lines (recipe, progress, summary) go to its log.txt."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a", buffering=1) as log, contextlib.redirect_stdout(log), \
      contextlib.redirect_stderr(log):
    yield


# --- Devices and workers ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceGroups:
  """This host's devices split into groups of devices_per_trial, one per worker."""
  platform: str
  count: int  # the host's devices
  groups: tuple[tuple[int, ...], ...]

  def describe(self, group: tuple[int, ...]) -> str:
    return f"{','.join(map(str, group))} of 0-{self.count - 1}"


def _host_devices(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """This host's accelerator platform and device count, asked of JAX in a child process
  (so that this one does not take every GPU's memory). On CPU: config.parallel.cpu_devices
  if set (the emulated devices to split), else what JAX sees."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.local_devices(); "
                          "print(d[0].platform, len(d))"], capture_output=True, text=True,
                         env=env, timeout=600)
  if probe.returncode != 0:
    raise ConfigError("could not list this host's devices: " +
                      (probe.stderr.strip().splitlines() or ["?"])[-1])
  platform, count = probe.stdout.split()[-2:]
  if platform == "cpu" and config.parallel.cpu_devices > 0:
    return platform, config.parallel.cpu_devices
  return platform, int(count)


def device_groups(config: ml_collections.ConfigDict, workers: str | int) -> DeviceGroups:
  """The device groups of this host's workers (`workers`: "auto", one per group, or a
  number no larger than the groups); a ConfigError if devices_per_trial does not divide the
  devices."""
  per_trial = config.tune.devices_per_trial
  if per_trial == 0 and workers in ("auto", 1, "1"):
    return DeviceGroups("", 0, ((),))  # one worker, every device: nothing to split
  platform, count = _host_devices(config)
  per_trial = per_trial or count
  if count % per_trial:
    raise ConfigError(f"config.tune.devices_per_trial={per_trial} does not divide this host's "
                      f"{count} {platform} devices; use a divisor of {count}")
  groups = tuple(tuple(range(start, start + per_trial)) for start in range(0, count, per_trial))
  if workers != "auto":
    if int(workers) > len(groups):
      raise ConfigError(f"--workers={workers}, but this host's {count} {platform} devices make "
                        f"only {len(groups)} group(s) of {per_trial} "
                        "(config.tune.devices_per_trial)")
    groups = groups[:int(workers)]
  return DeviceGroups(platform, count, groups)


def _use_group(config: ml_collections.ConfigDict, devices: DeviceGroups,
               group: tuple[int, ...]) -> ml_collections.ConfigDict:
  """Makes this process (before JAX starts) see only `group`; returns the config its trials
  use. On GPU through the visible devices, on CPU through the emulated device count."""
  if not group:
    return config
  config = copy.deepcopy(config)
  os.environ[parallel.DEVICE_GROUP_VARIABLE] = devices.describe(group)
  if devices.platform == "cpu":
    config.parallel.cpu_devices = len(group)
    parallel.set_cpu_device_count(len(group))
  else:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(devices.count)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in group)
  return config


def _worker_process(config, workdir, dimensions, label, devices, group, space, objects):
  """A worker started by `tune` in its own process (multiprocessing's spawn)."""
  from jaxddp.train import TrainingInterrupted
  config = _use_group(config, devices, group)
  try:
    Worker(config, workdir, dimensions, label, space, objects).run()
  except (StudyInterrupted, TrainingInterrupted) as stopped:
    sys.exit(128 + stopped.signum)
  except ConfigError as error:
    print(f"jaxddp.tune: error: [{label}] {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _run_workers(config, workdir, dimensions, devices, space, objects) -> None:
  """Runs one worker per device group: here if there is one, else each in a process of
  its own; waits for all (SIGTERM and Ctrl-C are passed on to them)."""
  labels = [f"worker {k}" + (f" ({devices.platform} {devices.describe(g)})" if g else "")
            for k, g in enumerate(devices.groups)]
  if len(devices.groups) == 1:
    config = _use_group(config, devices, devices.groups[0])
    Worker(config, workdir, dimensions, labels[0], space, objects).run()
    return
  context = multiprocessing.get_context("spawn")
  processes = [context.Process(target=_worker_process, name=label, args=(
      config, workdir, dimensions, label, devices, group, space, objects))
      for label, group in zip(labels, devices.groups)]
  received: list[int] = []

  def pass_on(signum, frame):
    # As SIGTERM: after a Ctrl-C, which reaches the workers too, a second SIGINT would
    # stop them at once, without saving.
    received.append(signum)
    for process in processes:
      if process.pid is not None and process.is_alive():
        os.kill(process.pid, signal.SIGTERM)

  previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    for process in processes:
      process.start()
    for process in processes:
      process.join()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if received:
    raise StudyInterrupted(received[0])
  failed = [f"{p.name} exited with status {p.exitcode}" for p in processes if p.exitcode]
  if failed:
    raise RuntimeError("; ".join(failed) + " (see its lines above)")


# --- The entry points ---------------------------------------------------------------------

def check(config: ml_collections.ConfigDict, *, space: SpaceFunction | None = None,
          objects: dict[str, Any] | None = None) -> list[Dimension]:
  """Every check that needs no storage and no devices: the config, config.tune, the
  space. A one-line ConfigError on the first problem."""
  given = tuple(objects or ())
  validate(config, given)
  tune = config.tune
  for field in ("num_trials", "heartbeat_seconds", "stale_after_seconds"):
    value = tune[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or \
        (field == "num_trials" and not isinstance(value, int)):
      raise ConfigError(f"config.tune.{field}={value!r} is not valid; it must be a "
                        f"{'an integer' if field == 'num_trials' else 'number'} > 0")
  if tune.stale_after_seconds <= 2 * tune.heartbeat_seconds:
    raise ConfigError(f"config.tune.stale_after_seconds={tune.stale_after_seconds} must be "
                      f"more than twice config.tune.heartbeat_seconds="
                      f"{tune.heartbeat_seconds}, or live trials would be taken as dead")
  if isinstance(tune.devices_per_trial, bool) or not isinstance(tune.devices_per_trial, int) \
      or tune.devices_per_trial < 0:
    raise ConfigError(f"config.tune.devices_per_trial={tune.devices_per_trial!r} is not valid; "
                      "it must be an integer >= 0 (0: all of this host's devices)")
  if isinstance(tune.seed, bool) or not isinstance(tune.seed, int) or not 0 <= tune.seed < 2**32:
    raise ConfigError(f"config.tune.seed={tune.seed!r} is not valid; it must be an integer in "
                      "[0, 2**32)")
  if tune.metric not in METRICS:
    raise ConfigError(f"config.tune.metric={tune.metric!r} is not valid; choose one of: "
                      f"{', '.join(METRICS)} (of the final evaluation on the test split)")
  if tune.direction not in ("auto", "maximize", "minimize"):
    raise ConfigError(f"config.tune.direction={tune.direction!r} is not valid; choose one of: "
                      "auto, maximize, minimize")
  if not isinstance(tune.study_name, str):
    raise ConfigError(f"config.tune.study_name={tune.study_name!r} must be a string")
  if tune.pruner not in PRUNERS:
    raise PRUNERS.unknown(tune.pruner)
  if tune.pruner != "none" and config.train.eval_every == 0:
    raise ConfigError(f"config.tune.pruner={tune.pruner!r} prunes on the evaluations every "
                      "config.train.eval_every steps, which is 0; set it, e.g. "
                      "--config.train.eval_every=50, or --config.tune.pruner=none")
  dimensions = parse_space(config, given)
  if not dimensions and space is None:
    raise ConfigError("config.tune.space is empty: nothing to search; e.g. "
                      "config.tune.space.optimizer.learning_rate = 'log_uniform(1e-3, 1.0)'")
  if space is not None and not callable(space):
    raise ConfigError(f"tune(space=...) got a {type(space).__name__}; pass a function "
                      "space(trial, config)")
  SAMPLERS[tune.sampler](dimensions, tune.seed)  # an unknown name, or a grid over a range
  if tune.sampler == "grid":
    points = math.prod(len(d.distribution.choices) for d in dimensions)
    if tune.num_trials > points and space is None:
      raise ConfigError(f"config.tune.num_trials={tune.num_trials} but the grid has {points} "
                        f"points; set num_trials to {points} (more would repeat points)")
  return dimensions


def tune(config: ml_collections.ConfigDict, workdir: str, *, space: SpaceFunction | None = None,
         workers: str | int = 1, model=None, dataset=None, loss_fn=None) -> TuneResult:
  """Runs (or joins, or finishes) the study config.tune describes; see this module's
  docstring. `space(trial, config)` adds define-by-run dimensions (trial.suggest_*) to
  config.tune.space's; `workers` is "auto" (one per device group of
  config.tune.devices_per_trial) or a number; `model`, `dataset`, `loss_fn` are passed to
  every trial's train_and_evaluate (with several workers they must pickle)."""
  started = time.time()
  objects = {k: v for k, v in (("model", model), ("dataset", dataset), ("loss_fn", loss_fn))
             if v is not None}
  if not (workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool)
                                and workers >= 1) or (isinstance(workers, str)
                                                      and workers.isdigit() and int(workers))):
    raise ConfigError(f"--workers={workers!r} is not valid; use auto (one per device group) "
                      "or a number >= 1")
  workdir = checked_workdir(workdir)
  dimensions = check(config, space=space, objects=objects)
  devices = device_groups(config, workers)
  if len(devices.groups) > 1 and (objects or space):
    _check_pickles(space, objects)
  if not config.tune.storage:
    os.makedirs(workdir, exist_ok=True)
  study = open_study(config, open_storage(config, workdir), dimensions, space)
  print(f"jaxddp.tune: study {study.study_name!r} in "
        f"{redacted(storage_url(config, workdir))}: {config.tune.num_trials} trials, sampler "
        f"{config.tune.sampler}, pruner {config.tune.pruner}, {direction(config)} "
        f"{config.tune.metric}; {len(devices.groups)} worker(s) here", flush=True)
  os.makedirs(workdir, exist_ok=True)
  _run_workers(config, workdir, dimensions, devices, space, objects)
  result = write_results(study, workdir, time.time() - started)
  print(format_result(result, config.tune.metric), flush=True)
  return result


def _check_pickles(space, objects: dict[str, Any]) -> None:
  import pickle
  for name, value in (("space", space), *objects.items()):
    if value is None:
      continue
    try:
      pickle.dumps(value)
    except Exception as error:
      raise ConfigError(f"tune({name}=...) cannot be sent to the worker processes "
                        f"({type(error).__name__}: {str(error)[:120]}); define it at a "
                        "module's top level, or use workers=1") from None


def main(argv: list[str] | None = None) -> None:
  """`python -m jaxddp.tune`: flags, one-line errors, exit status."""
  from absl import flags
  from ml_collections import config_flags

  from jaxddp.command_line import fail, parse_flags
  config_flag = config_flags.DEFINE_config_file("config", None, "A config file with a tune "
                                                "section, e.g. configs/tune_mnist1d.py.")
  workdir_flag = flags.DEFINE_string("workdir", None, "The study's directory: trials, "
                                     "results, and (by default) the SQLite storage.")
  workers_flag = flags.DEFINE_string("workers", "1", "Workers on this host: a number, or auto "
                                     "(one per group of config.tune.devices_per_trial devices).")
  argv = list(sys.argv if argv is None else argv)
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
    print(__doc__.strip() + "\n\nFlags: --config, --workdir, --workers. Every config field: "
          "jaxddp/default_config.py (config.tune: the study).")
    sys.exit(0)
  parse_flags(argv, program="jaxddp.tune", required=("config", "workdir"))
  from jaxddp import train
  try:
    tune(config_flag.value, workdir_flag.value, workers=workers_flag.value)
  except ConfigError as error:
    fail(str(error), 2, program="jaxddp.tune")
  except (StudyInterrupted, train.TrainingInterrupted) as stopped:
    print(f"jaxddp.tune: stopped by {signal.Signals(stopped.signum).name}; the running trials "
          "saved checkpoints and went back to the study: run the same command again to go on",
          file=sys.stderr, flush=True)
    sys.exit(128 + stopped.signum)
  except RuntimeError as error:
    fail(str(error), 1, program="jaxddp.tune")


class _CallableModule(types.ModuleType):
  """`jaxddp.tune` names this module (python -m jaxddp.tune) and, called, the function
  `tune` above: importing the submodule makes it the package's attribute `tune`, so the
  module itself must be what `jaxddp.tune(config, workdir)` calls."""

  def __call__(self, *args, **kwargs) -> TuneResult:
    return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  main()
