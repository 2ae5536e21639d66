"""What the experiment scripts share on the command line: one-line errors, and a clean
exit when interrupted (their finished runs are kept, and the same command continues)."""

from __future__ import annotations

import sys
from typing import Callable


class Error(Exception):
  """A mistake in the flags or files: printed as one line, exit status 2."""


def guarded(script: str, body: Callable[[], None]) -> None:
  """Runs body(); an Error or ConfigError becomes `SCRIPT: error: ...` (exit 2), an
  interrupt (Ctrl-C, or a signal that stopped a run after its checkpoint) a line saying
  so (exit 130)."""
  from jaxddp.config import ConfigError
  from jaxddp.train import TrainingInterrupted
  try:
    body()
  except (Error, ConfigError) as error:
    print(f"{script}: error: {error}", file=sys.stderr)
    sys.exit(2)
  except (KeyboardInterrupt, TrainingInterrupted):
    print(f"{script}: interrupted; the finished runs are kept, and the same command "
          "continues", file=sys.stderr)
    sys.exit(130)
