"""Command-line entry point.

    python -m jaxddp.main --config=configs/mnist1d.py --workdir=runs/mnist1d \
        [--config.train.batch_size=512 ...]

User errors (bad config values, unknown keys, unusable workdir) print one line
and exit with status 2, before anything compiles. A run stopped by SIGTERM or
Ctrl-C saves a checkpoint and exits with 128 + the signal number; running the
same command again resumes it.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


def _fail(message: str, status: int) -> None:
  print(f"jaxddp: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  try:
    flags.FLAGS(argv)
  except flags.Error as error:
    _fail(str(error).splitlines()[0], 2)
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/mnist1d.py", 2)
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=runs/mnist1d", 2)

  # Imported after flag parsing so that --help and flag errors stay fast.
  from jaxddp import config as config_lib
  from jaxddp import parallel, train

  config = _CONFIG.value
  try:
    config_lib.validate(config)
    parallel.set_cpu_device_count(config.parallel.cpu_devices)  # before JAX starts
    train.train_and_evaluate(config, _WORKDIR.value)
  except config_lib.ConfigError as error:
    _fail(str(error), 2)
  except train.NonFiniteLossError as error:
    _fail(str(error), 1)
  except train.TrainingInterrupted as error:
    print(f"jaxddp: {error}", file=sys.stderr, flush=True)
    sys.exit(128 + error.signum)


if __name__ == "__main__":
  main()
