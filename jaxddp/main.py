r"""Command-line entry point.

    python -m jaxddp.main --config=configs/mnist1d.py --workdir=runs/mnist1d \
        [--config.train.batch_size=512 ...]

User errors (bad config values, unknown keys, unusable workdir) print one line
and exit with status 2, before anything compiles. A run stopped by SIGTERM or
Ctrl-C saves a checkpoint and exits with 128 + the signal number; running the
same command again resumes it.

Started as one of several processes (scripts/launch_local.py, srun, mpirun, or
JAX_COORDINATOR_ADDRESS set), it first joins JAX's distributed runtime
(jaxddp/distributed.py); its error lines then name the process.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


def _fail(message: str, status: int, process: str = "") -> None:
  """Prints one error line (naming the process in a multi-process run) and exits."""
  prefix = f"[{process}] " if process else ""
  print(f"jaxddp: error: {prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _unknown_key_message(error: str, argv: list[str]) -> str:
  key = re.search(r"'\\?'?(\w+)", error)
  suggestion = re.search(r'Did you mean "(\w+)"', error)
  key = key.group(1) if key else "?"
  flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
               re.search(rf"\b{re.escape(key)}\b", a.split("=")[0])), "--config")
  hint = f'; did you mean "{suggestion.group(1)}"?' if suggestion else ""
  return f"{flag}: config has no field {key!r}{hint}"


def _make_config_package_importable(argv: list[str]) -> None:
  """Lets `from configs import default` work in a config file, from any directory.

  Config files live in a package directory (configs/); its parent goes on sys.path.
  """
  for arg in argv:
    if arg.startswith("--config=") and os.path.isfile(arg.split("=", 1)[1]):
      config_dir = os.path.dirname(os.path.abspath(arg.split("=", 1)[1]))
      if os.path.isfile(os.path.join(config_dir, "__init__.py")):
        sys.path.insert(0, os.path.dirname(config_dir))


def main(argv: list[str] | None = None, command: Callable[[Any, str], Any] | None = None,
         usage: str | None = None) -> None:
  """Parses the flags, joins a multi-process run, then runs `command(config, workdir)`
  (default: train.train_and_evaluate; jaxddp.score passes its own) with one-line errors.
  --help prints `usage` (default: this module's docstring)."""
  argv = list(sys.argv if argv is None else argv)
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
    print((usage or __doc__).strip() + "\n\nEvery config field, with its default and meaning: "
          "jaxddp/default_config.py (override any with --config.SECTION.FIELD=VALUE).")
    sys.exit(0)
  _make_config_package_importable(argv)
  try:
    flags.FLAGS(argv)
  except flags.Error as error:
    _fail(str(error).splitlines()[0], 2)
  except (KeyError, AttributeError) as error:
    # ml_collections reports an unknown --config.x key as KeyError/AttributeError whose
    # message is the missing key and a suggestion ("Did you mean ...").
    _fail(_unknown_key_message(str(error), argv), 2)
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/mnist1d.py", 2)
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/mnist1d", 2)

  # Imported after flag parsing so that --help and flag errors stay fast.
  from jaxddp import config as config_lib
  from jaxddp import distributed, parallel, train

  try:
    config = _CONFIG.value
    config.to_dict()  # config_flags defers load errors to the first access
  except Exception as error:  # a missing file, or an exception inside the config file
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    _fail(f"could not load --config: {type(error).__name__}: {lines[-1] if lines else ''}", 2)
  launch = None  # where this process sits in a multi-process run, once known
  label = lambda: launch.label() if launch else ""
  try:
    config_lib.validate(config)
    parallel.set_cpu_device_count(config.parallel.cpu_devices)  # before JAX starts
    launch = distributed.launch_settings(config)
    distributed.initialize(launch, config)
    (command or train.train_and_evaluate)(config, _WORKDIR.value)
  except config_lib.ConfigError as error:
    _fail(str(error), 2, label())
  except (distributed.DistributedError, train.NonFiniteLossError) as error:
    _fail(str(error), 1, label())
  except train.TrainingInterrupted as error:
    import jax
    if jax.process_index() == 0:  # every process stopped after the same step; one says so
      print(f"jaxddp: {error}", file=sys.stderr, flush=True)
    sys.exit(128 + error.signum)
  except Exception as error:
    if not (launch and launch.multi_process):
      raise
    # Most often a collective that failed because another process died. Exit at once:
    # a normal exit would wait at JAX's shutdown barrier for the dead process.
    import traceback
    traceback.print_exc()
    first_line = (str(error).splitlines() or [""])[0]
    print(f"jaxddp: error: [{label()}] {type(error).__name__}: {first_line} (in a "
          "multi-process run this usually means another process died; see its output)",
          file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
  main()
