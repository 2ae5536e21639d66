"""A study in its storage: samplers and pruners by name, the storage (SQLite, PostgreSQL,
MySQL, a journal file), the queue of trials and how a worker takes one, heartbeats and
the taking up of trials whose worker died, and the results written when it ends.

The protocol between workers is the storage's alone, so that workers in other processes
and on other hosts share a study:

* the worker that creates a study queues its num_trials trials (WAITING); a worker takes
  one by WAITING -> RUNNING, which succeeds for one worker only (a row lock on
  PostgreSQL and MySQL, a lock file beside an SQLite database, the log's order in a
  journal file), so the study never runs more than num_trials;
* a running trial's worker records a heartbeat (a system attribute) every
  tune.heartbeat_seconds; a trial without one for tune.stale_after_seconds is failed
  (atomic: once) and a continuation with the same parameters is queued, which trains in
  the killed trial's workdir and so resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import re
import threading
import time
import warnings
from typing import Any, Callable

import ml_collections

from jaxddp.errors import ConfigError
from jaxddp.registry import Registry
from jaxddp.search_space import Dimension, SpaceFunction

# Trial attributes and study attributes that jaxddp keeps in the storage.
HEARTBEAT = "jaxddp:heartbeat"  # a trial's system attribute: time.time() of its last beat
CONTINUES = "jaxddp:continues"  # user attribute of a trial that resumes a killed one: the
PREVIOUS = "jaxddp:previous"    # first trial's number (its workdir), and the killed one's
_STUDY_SETTINGS = "jaxddp:settings"  # what the study was made with (space, metric, trials)
_STUDY_READY = "jaxddp:ready"  # set once the study's num_trials trials are queued
POLL_SECONDS = 1.0  # how often an idle worker looks for a trial to take up


# --- Samplers and pruners ---------------------------------------------------------------

SAMPLERS: Registry[Callable] = Registry("sampler", "tune.sampler")
PRUNERS: Registry[Callable] = Registry("pruner", "tune.pruner")


@SAMPLERS.register("tpe")
def _tpe(dimensions: list[Dimension], seed: int):
  import optuna
  # The constant liar keeps parallel workers from proposing the same point.
  return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


@SAMPLERS.register("random")
def _random(dimensions: list[Dimension], seed: int):
  import optuna
  return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("grid")
def _grid(dimensions: list[Dimension], seed: int):
  import optuna
  grid = {}
  for d in dimensions:
    if not hasattr(d.distribution, "choices"):
      raise ConfigError(f"config.tune.sampler='grid' needs every dimension to be a choice; "
                        f"config.tune.space.{d.field}={d.text!r} is a range")
    grid[d.field] = list(d.distribution.choices)

  class Grid(optuna.samplers.GridSampler):
    """Optuna's grid sampler, except that it never calls study.stop() once the grid is used
    up (which raises outside study.optimize); the study stops at num_trials."""

    def after_trial(self, study, trial, state, values) -> None:
      pass

  return Grid(grid, seed=seed)


@SAMPLERS.register("cmaes")
def _cmaes(dimensions: list[Dimension], seed: int):
  import optuna
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # experimental-feature warnings
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


@PRUNERS.register("asha")
def _asha():
  import optuna
  return optuna.pruners.SuccessiveHalvingPruner()


@PRUNERS.register("hyperband")
def _hyperband():
  import optuna
  return optuna.pruners.HyperbandPruner()


@PRUNERS.register("median")
def _median():
  import optuna
  return optuna.pruners.MedianPruner(n_startup_trials=3)


@PRUNERS.register("none")
def _no_pruning():
  import optuna
  return optuna.pruners.NopPruner()


METRICS = ("accuracy", "loss")


def direction(config: ml_collections.ConfigDict) -> str:
  """maximize or minimize: config.tune.direction, or (auto) what suits the metric."""
  if config.tune.direction == "auto":
    return "maximize" if config.tune.metric == "accuracy" else "minimize"
  return config.tune.direction


def redacted(url: str) -> str:
  return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def storage_url(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The study's storage as written: config.tune.storage, or the workdir's SQLite file."""
  return config.tune.storage or f"sqlite:///{os.path.abspath(workdir)}/study.db"


def open_storage(config: ml_collections.ConfigDict, workdir: str):
  """The study's Optuna storage, opened (a server is reached, tables made); a one-line
  ConfigError if it cannot be."""
  import optuna
  url = storage_url(config, workdir)
  shown = f"config.tune.storage={redacted(url)!r}"
  if url.startswith("journal:"):
    path = url.removeprefix("journal:")
    folder = os.path.dirname(os.path.abspath(path))
    if not path or not os.path.isdir(folder):
      raise ConfigError(f"{shown}: the journal file's directory {folder} does not exist")
    try:
      return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    except OSError as error:
      raise ConfigError(f"{shown}: cannot open the journal file: {error.strerror}") from None
  if not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", url):
    raise ConfigError(f"{shown} is not a storage; use '' (workdir/study.db), sqlite:///PATH, "
                      "postgresql://USER:PASSWORD@HOST/DATABASE, mysql://... or journal:PATH")
  engine = {"pool_pre_ping": True}
  if url.startswith("sqlite"):
    engine["connect_args"] = {"timeout": 60}  # several workers write to one file
  else:
    engine["connect_args"] = {"connect_timeout": 10}
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return optuna.storages.RDBStorage(url, engine_kwargs=engine)
  except ImportError as error:  # Optuna's, for a missing driver: SQLAlchemy's is the cause
    missing = getattr(error.__cause__, "name", None) or "?"
    raise ConfigError(f"{shown}: its database driver ({missing}) is not installed; for "
                      "postgresql:// pip install 'psycopg[binary]', for mysql:// pip install "
                      "mysqlclient (or write mysql+pymysql:// and pip install pymysql)") from None
  except Exception as error:  # sqlalchemy's OperationalError, ArgumentError, ...
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    why = next((line for line in lines if not line.startswith("(Background")), "")
    raise ConfigError(f"{shown}: cannot open it: {redacted(why)[:300]}") from None


# --- The study ----------------------------------------------------------------------------

def _settings(config: ml_collections.ConfigDict, dimensions: list[Dimension],
              space: SpaceFunction | None) -> dict[str, Any]:
  """What a study is made with; a worker whose config differs is refused."""
  described = None if space is None else \
      f"{getattr(space, '__module__', '?')}:{getattr(space, '__qualname__', repr(space))}"
  return {"space": {d.field: d.text for d in dimensions}, "space_function": described,
          "metric": config.tune.metric, "num_trials": config.tune.num_trials}


def open_study(config: ml_collections.ConfigDict, storage, dimensions: list[Dimension],
               space: SpaceFunction | None):
  """Creates the study, queueing its num_trials trials, or joins it after checking that
  it was made with the same space, metric, direction and number of trials."""
  import optuna
  name = config.tune.study_name or "jaxddp"
  settings = _settings(config, dimensions, space)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  try:
    study = optuna.create_study(storage=storage, study_name=name,
                                direction=direction(config), load_if_exists=False)
  except optuna.exceptions.DuplicatedStudyError:
    study = optuna.load_study(study_name=name, storage=storage)
    _check_same_study(config, study, settings)
    return study
  study.set_user_attr(_STUDY_SETTINGS, settings)
  # Every trial the study will run is queued now, so that workers anywhere take them
  # without ever making one too many. Their parameters are sampled when one is taken.
  for _ in range(config.tune.num_trials):
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING))
  study.set_user_attr(_STUDY_READY, True)
  return study


def _check_same_study(config: ml_collections.ConfigDict, study, settings: dict) -> None:
  name = study.study_name
  if study.direction.name.lower() != direction(config):
    raise ConfigError(f"study {name!r} in this storage {study.direction.name.lower()}s; this "
                      f"config would {direction(config)}: use another config.tune.study_name")
  deadline = time.time() + 60
  while _STUDY_READY not in study.user_attrs:  # its first worker is queueing its trials
    if time.time() > deadline:
      raise ConfigError(f"study {name!r} was created but its trials were never queued (the "
                        "worker that created it stopped); delete it (optuna delete-study "
                        f"--study-name {name} --storage URL) or use another study_name")
    time.sleep(POLL_SECONDS)
  saved = study.user_attrs.get(_STUDY_SETTINGS)
  if saved is None:
    raise ConfigError(f"study {name!r} was not made by jaxddp.tune; use another "
                      "config.tune.study_name")
  for key in ("space", "space_function", "metric", "num_trials"):
    if saved.get(key) != settings[key]:
      raise ConfigError(f"study {name!r} was made with {key} {json.dumps(saved.get(key))}, "
                        f"not {json.dumps(settings[key])}; use another config.tune.study_name "
                        "(or the study's own settings)")


def _study_id(study) -> int:
  return study._storage.get_study_id_from_name(study.study_name)


def trials_in(study, *states) -> list:
  """The study's trials in these states (optuna.trial.TrialState), read now."""
  return study.get_trials(deepcopy=False, states=states)


def take_stale_trials(study, stale_after: float) -> None:
  """Fails every running trial whose heartbeat stopped more than `stale_after` seconds ago
  and queues its continuation (same parameters, same workdir). Failing is atomic in the
  storage, so one worker alone queues each continuation."""
  import optuna
  from optuna.trial import TrialState
  storage, now = study._storage, time.time()
  for trial in trials_in(study, TrialState.RUNNING):
    beat = trial.system_attrs.get(HEARTBEAT) or trial.datetime_start.timestamp()
    if now - beat <= stale_after:
      continue
    trial_id = storage.get_trial_id_from_study_id_trial_number(_study_id(study), trial.number)
    try:
      if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
        continue
    except optuna.exceptions.UpdateFinishedTrialError:
      continue  # another worker took it
    study.enqueue_trial(trial.params, user_attrs={
        CONTINUES: trial.user_attrs.get(CONTINUES, trial.number), PREVIOUS: trial.number})
    print(f"jaxddp.tune: trial {trial.number} had no heartbeat for {now - beat:.0f} s (its "
          "worker died?); it will go on from its last checkpoint", flush=True)


def take_waiting_trial(study) -> int | None:
  """A queued trial's id, now running and ours, or None; continuations of killed trials
  first. Taking is atomic in the storage (WAITING -> RUNNING succeeds once)."""
  import optuna
  from optuna.trial import TrialState
  storage = study._storage
  waiting = sorted(trials_in(study, TrialState.WAITING),
                   key=lambda t: (CONTINUES not in t.user_attrs, t.number))
  for trial in waiting:
    trial_id = storage.get_trial_id_from_study_id_trial_number(_study_id(study), trial.number)
    try:
      if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
        return trial_id
    except optuna.exceptions.UpdateFinishedTrialError:
      continue
  return None


@contextlib.contextmanager
def one_worker_at_a_time(url: str):
  """Around taking trials on SQLite, a lock file beside the database: SQLite cannot lock
  one row, so two workers could both see a trial WAITING and both take it (measured: four
  workers on one file). PostgreSQL and MySQL lock the row (SELECT ... FOR UPDATE); a
  journal file decides by the order of its log."""
  path = url.split(":///", 1)[1] if url.startswith("sqlite") and ":///" in url else ""
  if not path:
    yield
    return
  with open(f"{path}.take.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


class Heartbeat:
  """Records the trial's heartbeat in the storage every `seconds` while it runs."""

  def __init__(self, storage, trial_id: int, seconds: float):
    self.storage, self.trial_id, self.seconds = storage, trial_id, seconds
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self) -> None:
    while True:
      try:
        self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
      except Exception:  # the trial ended meanwhile, or the storage blinked: try again
        pass
      if self._stop.wait(self.seconds):
        return

  def __enter__(self) -> "Heartbeat":
    self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()



def superseded(trial) -> bool:
  """Whether `trial` is a killed trial that another one continued."""
  from optuna.trial import TrialState
  return trial.state == TrialState.FAIL and "why" not in trial.user_attrs

# --- Results ------------------------------------------------------------------------------

@dataclasses.dataclass
class TuneResult:
  """A study's outcome: its trials, the best one, and what pruning saved."""
  study: Any  # optuna.Study
  best_value: float | None
  best_trial: int | None
  best_config: ml_collections.ConfigDict | None
  complete: int
  pruned: int  # by the pruner, or because the run diverged (NaN or Inf loss)
  diverged: int
  failed: int  # the trial's config was invalid (e.g. its batch does not divide its devices)
  steps_run: int  # over every ended trial
  steps_planned: int  # had every trial run out
  seconds: float  # this call's wall time

  @property
  def compute_saved(self) -> float:
    return 1 - self.steps_run / self.steps_planned if self.steps_planned else 0.0


def _ended(study) -> list:
  return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and
          not superseded(t)]


def write_results(study, workdir: str, seconds: float) -> TuneResult:
  """trials.csv, best_config.py, summary.json and plots/ in the workdir; the result."""
  from optuna.trial import TrialState
  trials = study.get_trials(deepcopy=False)
  ended = _ended(study)
  complete = [t for t in ended if t.state == TrialState.COMPLETE]
  by_state = {s: sum(t.state == s for t in ended) for s in
              (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
  steps_run = sum(t.user_attrs.get("steps") or 0 for t in ended)
  steps_planned = sum(t.user_attrs.get("total_steps") or 0 for t in ended)
  _write_csv(trials, study, os.path.join(workdir, "trials.csv"))
  best = study.best_trial if complete else None
  best_config = None
  if best is not None:
    best_config = _write_best_config(workdir, best, study)
  diverged = sum(str(t.user_attrs.get("why", "")).startswith("diverged") for t in ended)
  result = TuneResult(study, best.value if best else None, best.number if best else None,
                      best_config, by_state[TrialState.COMPLETE], by_state[TrialState.PRUNED],
                      diverged, by_state[TrialState.FAIL], steps_run, steps_planned, seconds)
  summary = {k: v for k, v in dataclasses.asdict(result).items()
             if k not in ("study", "best_config")}
  summary.update(study=study.study_name, direction=study.direction.name.lower(),
                 compute_saved=result.compute_saved)
  _atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2) + "\n")
  _plot(study, os.path.join(workdir, "plots"))
  return result


def _atomic_write(path: str, text: str) -> None:
  with open(f"{path}.{os.getpid()}.tmp", "w") as f:
    f.write(text)
  os.replace(f"{path}.{os.getpid()}.tmp", path)


def _write_csv(trials, study, path: str) -> None:
  params = sorted({name for t in trials for name in t.params})
  columns = ["number", "state", "value", *params, "steps", "total_steps", "seconds",
             "devices", "workdir", "continues", "why"]
  rows = []
  for t in trials:
    state = t.state.name.lower()
    if superseded(t):
      state = "killed"
    rows.append({"number": t.number, "state": state, "value": t.value, **t.params,
                 "steps": t.user_attrs.get("steps"),
                 "total_steps": t.user_attrs.get("total_steps"),
                 "seconds": t.user_attrs.get("seconds"), "devices": t.user_attrs.get("devices"),
                 "workdir": t.user_attrs.get("workdir"), "continues": t.user_attrs.get(PREVIOUS),
                 "why": t.user_attrs.get("why")})
  out = io.StringIO()
  writer = csv.DictWriter(out, columns)
  writer.writeheader()
  writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
  _atomic_write(path, out.getvalue())


def _write_best_config(workdir: str, best, study) -> ml_collections.ConfigDict | None:
  """workdir/best_config.py: the best trial's whole config (from its config.json), which
  `python -m jaxddp.main --config=` runs as it is."""
  try:
    with open(os.path.join(workdir, best.user_attrs["workdir"], "config.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError, KeyError):
    return None
  given = saved.get("given") or {}
  note = ("# Trained with objects passed to jaxddp.tune, which this file cannot hold: "
          f"{given}\n" if given else "")
  text = (f'"""The best trial of study {study.study_name!r}: trial {best.number}, '
          f'{study.user_attrs[_STUDY_SETTINGS]["metric"]} {best.value!r}.\n\n'
          f"Written by jaxddp.tune. Rerun it with\n    python -m jaxddp.main "
          f"--config={os.path.join(workdir, 'best_config.py')} --workdir=runs/best\n\n"
          f"Searched: {json.dumps(best.params)}\n\"\"\"\n{note}\n"
          "import ml_collections\n\n\ndef get_config():\n"
          f"  return ml_collections.ConfigDict({saved['config']!r})\n")
  _atomic_write(os.path.join(workdir, "best_config.py"), text)
  return ml_collections.ConfigDict(saved["config"])


def _plot(study, folder: str) -> None:
  """Optuna's matplotlib plots of the study, one PNG each; one it cannot draw (e.g.
  importances before two trials complete, intermediate values of a study that never
  evaluated before its end) is left out."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import optuna.visualization.matplotlib as plots
  os.makedirs(folder, exist_ok=True)
  evaluated = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
  for name, draw in (("history", plots.plot_optimization_history),
                     ("intermediate_values", plots.plot_intermediate_values),
                     ("param_importances", plots.plot_param_importances),
                     ("parallel_coordinate", plots.plot_parallel_coordinate)):
    if name == "intermediate_values" and not evaluated:
      continue
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = draw(study)
      figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
      figure.set_size_inches(8, 5)
      figure.tight_layout()
      figure.savefig(os.path.join(folder, f"{name}.png"), dpi=100)
      plt.close(figure)
    except Exception:  # too few trials for this plot
      plt.close("all")


def format_result(result: TuneResult, metric: str) -> str:
  best = (f"best {metric} {result.best_value:.4g} (trial {result.best_trial})"
          if result.best_trial is not None else "no trial completed")
  return (f"jaxddp.tune: study {result.study.study_name!r}: {best}; "
          f"{result.complete} complete, {result.pruned} pruned ({result.diverged} of them "
          f"diverged), {result.failed} failed; "
          f"{result.steps_run} of {result.steps_planned} steps run "
          f"({result.compute_saved:.0%} saved by pruning); {result.seconds:.0f} s")


