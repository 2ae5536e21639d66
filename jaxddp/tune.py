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
workdir/summary.json and plots (workdir/plots/*.png).

Bad input (a field the config does not have, a malformed distribution, an unknown
sampler or pruner, an unreachable storage, a study made with another space) prints one
line and exits with status 2, before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import difflib
import fcntl
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from typing import Any, Callable

import ml_collections

from jaxddp import checkpoint, parallel
from jaxddp import config as config_lib
from jaxddp.errors import ConfigError
from jaxddp.registry import Registry
from jaxddp.workdir import checked as checked_workdir

# Trial attributes and study attributes that jaxddp keeps in the storage.
_HEARTBEAT = "jaxddp:heartbeat"  # a trial's system attribute: time.time() of its last beat
_CONTINUES = "jaxddp:continues"  # user attribute of a trial that resumes a killed one: the
_PREVIOUS = "jaxddp:previous"    # first trial's number (its workdir), and the killed one's
_STUDY_SETTINGS = "jaxddp:settings"  # what the study was made with (space, metric, trials)
_STUDY_READY = "jaxddp:ready"  # set once the study's num_trials trials are queued
POLL_SECONDS = 1.0  # how often an idle worker looks for a trial to take up

SpaceFunction = Callable[[Any, ml_collections.ConfigDict], Any]


# --- The search space -------------------------------------------------------------------

KINDS = ("uniform", "log_uniform", "int_uniform", "int_log_uniform", "choice")
_SYNTAX = ("uniform(low, high), log_uniform(low, high), int_uniform(low, high), "
           "int_log_uniform(low, high) or choice(a, b, ...)")


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched config field: its path ("optimizer.learning_rate"), the distribution as
  written, and its Optuna distribution."""
  field: str
  text: str
  distribution: Any  # optuna.distributions.BaseDistribution

  def suggest(self, trial) -> Any:
    """The trial's value for this field (sampled, or the one a resumed trial was given)."""
    import optuna
    d = self.distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
      return trial.suggest_categorical(self.field, d.choices)
    if isinstance(d, optuna.distributions.IntDistribution):
      return trial.suggest_int(self.field, d.low, d.high, log=d.log)
    return trial.suggest_float(self.field, d.low, d.high, log=d.log)

  def corners(self) -> list[Any]:
    """The values whose configs are checked before the study starts: every choice, or
    both ends of a range."""
    d = self.distribution
    return list(d.choices) if hasattr(d, "choices") else [d.low, d.high]


def _field_value(config: ml_collections.ConfigDict, field: str) -> Any:
  """The config's value at `field`, or a ConfigError naming the nearest field."""
  node: Any = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f'; did you mean "{".".join(parts[:depth] + close)}"?' if close else ""
      raise ConfigError(f"config.tune.space.{field}: the config has no field {field!r}{hint}")
    node = node[part]
  return node


def _number(field: str, text: str, token: str) -> float | int:
  try:
    value = float(token)
  except ValueError:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {token.strip()!r} is not a "
                      "number") from None
  if not math.isfinite(value):
    raise ConfigError(f"config.tune.space.{field}={text!r}: the bounds must be finite")
  return int(value) if value.is_integer() and "." not in token and "e" not in token.lower() \
      else value


def _choice_value(field: str, text: str, token: str, current: Any) -> Any:
  """A choice written in the space, as a value of the field's type."""
  token = token.strip()
  if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
    token = token[1:-1]
  kind = type(current).__name__
  try:
    if isinstance(current, bool):
      if token.lower() not in ("true", "false"):
        raise ValueError
      return token.lower() == "true"
    if isinstance(current, int):
      return int(token)
    if isinstance(current, float):
      return float(token)
  except ValueError:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {token!r} is not a {kind}, the "
                      f"type of config.{field} (now {current!r})") from None
  return token


def parse_dimension(field: str, text: str, current: Any) -> Dimension:
  """The distribution `text` for config.`field` (whose value is now `current`), checked
  against the field's type; a one-line ConfigError if it is malformed."""
  import optuna
  match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", text, re.S)
  if not match or match.group(1) not in KINDS:
    raise ConfigError(f"config.tune.space.{field}={text!r} is not a distribution; write "
                      f"{_SYNTAX}")
  kind, body = match.group(1), match.group(2)
  tokens = [t for t in (part.strip() for part in body.split(",")) if t] if body.strip() else []
  if isinstance(current, (ml_collections.ConfigDict, tuple, list)) or current is None:
    raise ConfigError(f"config.tune.space.{field}: config.{field} is a "
                      f"{type(current).__name__}; only numbers, strings and booleans are "
                      "searched")
  if kind == "choice":
    if not tokens:
      raise ConfigError(f"config.tune.space.{field}={text!r} is an empty choice; give at "
                        "least one value")
    values = [_choice_value(field, text, token, current) for token in tokens]
    if len(set(values)) != len(values):
      raise ConfigError(f"config.tune.space.{field}={text!r} repeats a value")
    return Dimension(field, text, optuna.distributions.CategoricalDistribution(values))
  if len(tokens) != 2:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {kind} takes two bounds, "
                      f"{kind}(low, high)")
  low, high = (_number(field, text, token) for token in tokens)
  if isinstance(current, bool) or isinstance(current, str):
    raise ConfigError(f"config.tune.space.{field}={text!r}: config.{field} is a "
                      f"{type(current).__name__} ({current!r}); search it with choice(...)")
  integer = kind.startswith("int_")
  if integer and not isinstance(current, int):
    raise ConfigError(f"config.tune.space.{field}={text!r}: config.{field} is a float; use "
                      f"{kind.removeprefix('int_')}(...)")
  if not integer and isinstance(current, int):
    raise ConfigError(f"config.tune.space.{field}={text!r}: config.{field} is an integer; use "
                      f"int_{kind}(...)")
  if integer and not (isinstance(low, int) and isinstance(high, int)):
    raise ConfigError(f"config.tune.space.{field}={text!r}: {kind} takes integer bounds")
  if not low < high:
    raise ConfigError(f"config.tune.space.{field}={text!r}: low ({low}) must be below high "
                      f"({high})")
  log = "log_" in kind
  if log and low <= 0:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {kind} needs bounds > 0 (got "
                      f"low={low})")
  if integer:
    return Dimension(field, text, optuna.distributions.IntDistribution(low, high, log=log))
  return Dimension(field, text, optuna.distributions.FloatDistribution(float(low), float(high),
                                                                       log=log))


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def parse_space(config: ml_collections.ConfigDict,
                given: tuple[str, ...] = ()) -> list[Dimension]:
  """config.tune.space as Dimensions (fields left "" are not searched), each checked against
  the config: the field exists and is not part of the study's own settings, its
  distribution is well formed, and every choice (or both ends of a range) gives a config
  that validates."""
  dimensions = []
  for field, text in _leaves(config.tune.space.to_dict()).items():
    if text == "":
      continue
    if not isinstance(text, str):
      raise ConfigError(f"config.tune.space.{field}={text!r} is not a distribution; write it "
                        f"as a string: {_SYNTAX}")
    if field.split(".")[0] == "tune":
      raise ConfigError(f"config.tune.space.{field}: the study's own settings (config.tune) "
                        "cannot be searched")
    dimensions.append(parse_dimension(field, text, _field_value(config, field)))
  for dimension in dimensions:
    for value in dimension.corners():
      try:
        _validate(with_values(config, {dimension.field: value}), given)
      except ConfigError as error:
        raise ConfigError(f"config.tune.space.{dimension.field}={dimension.text!r}: the value "
                          f"{value!r} is not valid: {error}") from None
  return dimensions


def _validate(config: ml_collections.ConfigDict, given) -> None:
  """config_lib.validate, but names whose objects were passed (`given`: "model",
  "dataset", "loss_fn") are not checked."""
  config_lib.validate(config, model_given="model" in given, dataset_given="dataset" in given,
                      loss_given="loss_fn" in given)


def with_values(config: ml_collections.ConfigDict,
                values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each field path set to its value (ints stay ints)."""
  config = copy.deepcopy(config)
  for field, value in values.items():
    *parents, last = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  return config


def trial_config(config: ml_collections.ConfigDict, dimensions: list[Dimension], trial,
                 space: SpaceFunction | None) -> ml_collections.ConfigDict:
  """The config of one trial: config.tune.space's values, then the define-by-run
  `space(trial, config)`, which may change the config in place or return a new one."""
  trial_cfg = with_values(config, {d.field: d.suggest(trial) for d in dimensions})
  if space is not None:
    returned = space(trial, trial_cfg)
    if returned is not None:
      if not isinstance(returned, ml_collections.ConfigDict):
        raise ConfigError(f"tune(space=...) returned a {type(returned).__name__}; it must "
                          "change the config it is given, or return an ml_collections."
                          "ConfigDict")
      trial_cfg = returned
  return trial_cfg


# --- Samplers, pruners, storage -----------------------------------------------------------

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


def _redacted(url: str) -> str:
  return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def storage_url(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The study's storage as written: config.tune.storage, or the workdir's SQLite file."""
  return config.tune.storage or f"sqlite:///{os.path.abspath(workdir)}/study.db"


def open_storage(config: ml_collections.ConfigDict, workdir: str):
  """The study's Optuna storage, opened (a server is reached, tables made); a one-line
  ConfigError if it cannot be."""
  import optuna
  url = storage_url(config, workdir)
  shown = f"config.tune.storage={_redacted(url)!r}"
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
    raise ConfigError(f"{shown}: cannot open it: {_redacted(why)[:300]}") from None


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


def _trials(study, *states):
  return study.get_trials(deepcopy=False, states=states)


def _take_stale_trials(study, stale_after: float) -> None:
  """Fails every running trial whose heartbeat stopped more than `stale_after` seconds ago
  and queues its continuation (same parameters, same workdir). Failing is atomic in the
  storage, so one worker alone queues each continuation."""
  import optuna
  from optuna.trial import TrialState
  storage, now = study._storage, time.time()
  for trial in _trials(study, TrialState.RUNNING):
    beat = trial.system_attrs.get(_HEARTBEAT) or trial.datetime_start.timestamp()
    if now - beat <= stale_after:
      continue
    trial_id = storage.get_trial_id_from_study_id_trial_number(_study_id(study), trial.number)
    try:
      if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
        continue
    except optuna.exceptions.UpdateFinishedTrialError:
      continue  # another worker took it
    study.enqueue_trial(trial.params, user_attrs={
        _CONTINUES: trial.user_attrs.get(_CONTINUES, trial.number), _PREVIOUS: trial.number})
    print(f"jaxddp.tune: trial {trial.number} had no heartbeat for {now - beat:.0f} s (its "
          "worker died?); it will go on from its last checkpoint", flush=True)


def _take_waiting_trial(study) -> int | None:
  """A queued trial's id, now running and ours, or None; continuations of killed trials
  first. Taking is atomic in the storage (WAITING -> RUNNING succeeds once)."""
  import optuna
  from optuna.trial import TrialState
  storage = study._storage
  waiting = sorted(_trials(study, TrialState.WAITING),
                   key=lambda t: (_CONTINUES not in t.user_attrs, t.number))
  for trial in waiting:
    trial_id = storage.get_trial_id_from_study_id_trial_number(_study_id(study), trial.number)
    try:
      if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
        return trial_id
    except optuna.exceptions.UpdateFinishedTrialError:
      continue
  return None


@contextlib.contextmanager
def _one_worker_at_a_time(url: str):
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
        self.storage.set_trial_system_attr(self.trial_id, _HEARTBEAT, time.time())
      except Exception:  # the trial ended meanwhile, or the storage blinked: try again
        pass
      if self._stop.wait(self.seconds):
        return

  def __enter__(self) -> "Heartbeat":
    self.storage.set_trial_system_attr(self.trial_id, _HEARTBEAT, time.time())
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


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
    import optuna
    from optuna.trial import TrialState
    config = self.config
    study = open_study(config, open_storage(config, self.workdir), self.dimensions, self.space)
    study.pruner = PRUNERS[config.tune.pruner]()
    with checkpoint.StopSignal() as stop:
      while stop.received is None:
        with _one_worker_at_a_time(storage_url(config, self.workdir)):
          _take_stale_trials(study, config.tune.stale_after_seconds)
          trial_id = _take_waiting_trial(study)
        if trial_id is None:
          if not _trials(study, TrialState.RUNNING):
            return
          time.sleep(POLL_SECONDS)  # others still run: one may die and need taking up
          continue
        self._run_trial(study, trial_id)
    raise _Stopped(stop.received)

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
    first = trial.user_attrs.get(_CONTINUES, number)
    workdir = os.path.join(self.workdir, "trials", f"{first:04d}")
    start_step = checkpoint.latest_step(workdir)
    with Heartbeat(storage, trial_id, config.tune.heartbeat_seconds):
      try:
        cfg = trial_config(config, self.dimensions, trial, self.space)
        _validate(cfg, tuple(self.objects))
      except ConfigError as error:
        self._end(study, trial, TrialState.FAIL, f"invalid config: {error}")
        return
      for key, value in (("workdir", os.path.relpath(workdir, self.workdir)),
                         ("worker", f"{self.label} pid {os.getpid()} on {socket.gethostname()}")):
        trial.set_user_attr(key, value)
      previous = trial.user_attrs.get(_PREVIOUS)
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
      except ConfigError as error:  # e.g. a batch size the trial's devices do not divide
        _log_attempt(workdir, number, self.label, start_step, "failed")
        self._end(study, trial, TrialState.FAIL, str(error).splitlines()[0])
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
    ended = [t for t in ended if not _superseded(t, study)]
    best = ""
    try:
      best = f"; best {study.best_value:.4g} (trial {study.best_trial.number})"
    except ValueError:  # no trial complete yet
      pass
    shown = f" {self.config.tune.metric} {value:.4g}" if value is not None else ""
    print(f"jaxddp.tune: [{self.label}] trial {trial.number} {state.name.lower()}{shown}"
          f"{' (' + why + ')' if why else ''}; {len(ended)}/{self.config.tune.num_trials} "
          f"trials ended{best}", flush=True)


class _Stopped(Exception):
  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _short(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _superseded(trial, study) -> bool:
  """Whether `trial` is a killed trial that another one continued."""
  from optuna.trial import TrialState
  return trial.state == TrialState.FAIL and "why" not in trial.user_attrs


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
  except (_Stopped, TrainingInterrupted) as stopped:
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
    raise _Stopped(received[0])
  failed = [f"{p.name} exited with status {p.exitcode}" for p in processes if p.exitcode]
  if failed:
    raise RuntimeError("; ".join(failed) + " (see its lines above)")


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
  from optuna.trial import TrialState
  return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and
          not _superseded(t, study)]


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
    if _superseded(t, study):
      state = "killed"
    rows.append({"number": t.number, "state": state, "value": t.value, **t.params,
                 "steps": t.user_attrs.get("steps"),
                 "total_steps": t.user_attrs.get("total_steps"),
                 "seconds": t.user_attrs.get("seconds"), "devices": t.user_attrs.get("devices"),
                 "workdir": t.user_attrs.get("workdir"), "continues": t.user_attrs.get(_PREVIOUS),
                 "why": t.user_attrs.get("why")})
  import io
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
  """Optuna's matplotlib plots of the study, one PNG each; one it cannot draw yet (e.g.
  importances before two trials complete) is left out."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import optuna.visualization.matplotlib as plots
  os.makedirs(folder, exist_ok=True)
  for name, draw in (("history", plots.plot_optimization_history),
                     ("intermediate_values", plots.plot_intermediate_values),
                     ("param_importances", plots.plot_param_importances),
                     ("parallel_coordinate", plots.plot_parallel_coordinate)):
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


# --- The entry points ---------------------------------------------------------------------

def check(config: ml_collections.ConfigDict, *, space: SpaceFunction | None = None,
          objects: dict[str, Any] | None = None) -> list[Dimension]:
  """Every check that needs no storage and no devices: the config, config.tune, the
  space. A one-line ConfigError on the first problem."""
  given = tuple(objects or ())
  _validate(config, given)
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
        f"{_redacted(storage_url(config, workdir))}: {config.tune.num_trials} trials, sampler "
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
  except (_Stopped, train.TrainingInterrupted) as stopped:
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
