"""What the experiment scripts share: how they run (one-line errors, a clean exit when
interrupted), the config of one run of a sweep, and the record of the runs finished.

A sweep is many short runs of which only the final figures matter, and an interrupted
sweep must continue where it stopped: each finished run is one row of a CSV file,
written as it finishes, and the same command skips the runs already there.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Callable, Hashable

# A period no run reaches: the action happens once, after the last step.
NEVER = 10**9


class Error(Exception):
  """A mistake in the flags or files: printed as one line, exit status 2."""


def run(script: str, body: Callable[[], None], required: tuple[str, ...] = ()) -> None:
  """Runs body() as the script's main, after the flags are parsed.

  A bad flag (a value of the wrong type, an unknown --config.x field, a config file that
  does not load, a missing `required` flag), an Error or a ConfigError becomes
  `SCRIPT: error: ...` (exit 2), a run that diverged (NaN or Inf) the same line with
  exit 1, an interrupt (Ctrl-C, or a signal that stopped a run after its checkpoint) a
  line saying so (exit 130): a user needs the one line, not a traceback. Libraries'
  INFO lines are not shown.
  """
  from absl import app, logging

  from jaxddp.command_line import parse_flags
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in sys.argv[1:]):
    app.run(lambda argv: None)  # absl prints the flags' help and exits
  parse_flags(sys.argv, script, required)
  logging.set_verbosity(logging.WARNING)  # else every library's INFO lines show
  guarded(script, body)


def guarded(script: str, body: Callable[[], None]) -> None:
  """body() with run's handling of errors and interrupts (without absl: for tests)."""
  from jaxddp.config import ConfigError
  from jaxddp.train import NonFiniteLossError, TrainingInterrupted
  from jaxddp.tune import StudyInterrupted
  try:
    body()
  except (Error, ConfigError) as error:
    print(f"{script}: error: {error}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as error:  # a run of the sweep diverged: as jaxddp.main says it
    print(f"{script}: error: {error}", file=sys.stderr)
    sys.exit(1)
  except (KeyboardInterrupt, TrainingInterrupted, StudyInterrupted):
    print(f"{script}: interrupted; the finished runs are kept, and the same command "
          "continues", file=sys.stderr)
    sys.exit(130)


def numbers(flag: str, values: list[str], kind=float, low: float | None = None,
            high: float | None = None, high_open: bool = False) -> list:
  """A list flag's values as numbers of `kind`, each finite and within [low, high] (or
  [low, high) with high_open), or an Error naming the flag."""
  import math
  shown = f"--{flag}={','.join(values)}"
  try:
    parsed = [kind(value) for value in values]
  except ValueError:
    raise Error(f"{shown}: not a list of {kind.__name__}s") from None
  if not parsed:
    raise Error(f"{shown}: give one or more numbers")
  for value in parsed:
    bad = (not math.isfinite(value) or (low is not None and value < low) or
           (high is not None and (value >= high if high_open else value > high)))
    if bad:
      span = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high is not None else \
          f"at least {low:g}"
      raise Error(f"{shown}: {value:g} is out of range; each must be {span}")
  return parsed


def validate_runs(configs) -> None:
  """Checks the config of every run of a sweep before the first one trains (a bad value
  found after hours of runs would waste them): a ConfigError names the field."""
  from jaxddp import config as config_lib
  for config in configs:
    config_lib.validate(config)


def check_out(path: str, flag: str = "--out") -> str:
  """The output directory, checked but not created (a name, not a file): a sweep's first
  run creates it, so a run refused while it is set up leaves nothing behind."""
  from jaxddp.workdir import checked
  return checked(path, flag)


def out_dir(path: str, flag: str = "--out") -> str:
  """Creates the output directory, or a one-line error (a file there, no permission).
  Call it once every flag and run config is checked, so a refused command writes nothing."""
  from jaxddp.workdir import writable
  return writable(path, flag)


def quiet(config, **changes):
  """A copy of config for one run of a sweep, with `changes` ("section.field": value,
  e.g. **{"model.width": 8}) applied.

  Quiet: no logging window, evaluation or checkpoint before the last step. The sweep
  takes the final figures from the TrainResult, and hundreds of runs would otherwise
  fill the terminal and the disk. A value may have another type than the field's
  default (a float where the default is an int): the changes are the script's own.
  """
  config = config.copy_and_resolve_references()
  config.train.log_every = NEVER
  config.train.eval_every = 0
  config.train.checkpoint_every = NEVER
  with config.ignore_type():
    for path, value in changes.items():
      *sections, name = path.split(".")
      section = config
      for part in sections:
        section = section[part]
      section[name] = value
  return config


class Results:
  """A sweep's results.csv: one row per finished run, appended as each run finishes.

  `key(row)` names a run from its row, whether the row is as given to `add` or as read
  back from the file (every value a string): e.g. lambda r: (r["method"],
  float(r["sparsity"])).
  """

  def __init__(self, path: str, fields: list[str], key: Callable[[dict], Hashable]):
    self.path, self.fields, self.key = path, fields, key
    self._done = {key(row): row for row in self.rows()}

  def rows(self) -> list[dict[str, str]]:
    """Every row in the file, in the order the runs finished."""
    if not os.path.exists(self.path):
      return []
    with open(self.path, newline="") as f:
      return list(csv.DictReader(f))

  def done(self, key: Hashable) -> bool:
    return key in self._done

  def row(self, key: Hashable) -> dict[str, str]:
    """The row of a finished run, as read back from the file."""
    return self._done[key]

  def __len__(self) -> int:
    return len(self._done)

  def add(self, row: dict) -> dict[str, str]:
    """Appends a finished run's row (and the header, to a new file); returns it as
    `row` will read it back."""
    new_file = not os.path.exists(self.path)
    with open(self.path, "a", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=self.fields)
      if new_file:
        writer.writeheader()
      writer.writerow(row)
    written = {field: str(row.get(field, "")) for field in self.fields}
    self._done[self.key(row)] = written
    return written
