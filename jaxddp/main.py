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
import sys
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags

from jaxddp.command_line import fail as _fail
from jaxddp.command_line import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


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
  parse_flags(argv)
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/mnist1d", 2)

  # Imported after flag parsing so that --help and flag errors stay fast.
  from jaxddp import config as config_lib
  from jaxddp import distributed, parallel, train

  config = _CONFIG.value
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
