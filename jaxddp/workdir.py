"""A run's directory: named, writable, and held by one run at a time.

Two runs writing one workdir would interleave their checkpoints and metrics (orbax fails
deep inside with a traceback, or worse, one run silently resumes the other's state). So
a run holds `workdir/lock` for its whole life with an OS lock (flock): the kernel drops
it when the process ends, however it ends (SIGKILL included), so a killed run never
leaves its workdir stuck. The file holds the holder's pid and host, for the one line a
second run gets. In a multi-process run, process 0 holds the lock and every process
learns whether it got it, so that all stop together.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from typing import Any

from jaxddp.errors import ConfigError

LOCK_FILE = "lock"


def checked(workdir: Any, flag: str = "--workdir") -> str:
  """The workdir as a string, or a one-line ConfigError for an empty or missing name, or
  a path that is a file. `flag` names it in the error (a script's --cheap_workdir)."""
  if workdir is None or (isinstance(workdir, (str, os.PathLike)) and not os.fspath(workdir)):
    raise ConfigError(f"{flag} is empty; give a directory for checkpoints, metrics and logs, "
                      "e.g. runs/mnist1d")
  if not isinstance(workdir, (str, os.PathLike)):
    raise ConfigError(f"{flag}={workdir!r} is a {type(workdir).__name__}; give a directory "
                      "path (a string)")
  workdir = os.fspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"{flag}={workdir} is a file; give a directory")
  return workdir


def writable(workdir: str, flag: str = "--workdir") -> str:
  """Creates the directory and writes (then removes) a file in it, or a one-line
  ConfigError (a file there, no permission); returns it."""
  workdir = checked(workdir, flag)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    why = error.strerror or type(error).__name__
    raise ConfigError(f"{flag}={workdir} cannot be written ({why}); give a directory this "
                      "user can write") from None
  return workdir


class Lock:
  """Held while a run uses its workdir: `with workdir.Lock(path): ...`.

  Raises a one-line ConfigError if the workdir cannot be written, or if another live
  process holds it (naming that process). `is_leader`: whether this process takes the
  lock (process 0); `agree(ok)`: a function that returns the holder's answer on every
  process (a broadcast in a multi-process run; the identity otherwise).
  """

  def __init__(self, workdir: str, *, flag: str = "--workdir", is_leader: bool = True,
               agree=lambda holder: holder):
    self.workdir, self.flag, self.is_leader, self.agree = workdir, flag, is_leader, agree
    self._file = None

  def __enter__(self) -> "Lock":
    holder = ""  # empty: this run holds the lock
    if self.is_leader:
      writable(self.workdir, self.flag)
      holder = self._acquire()
    holder = self.agree(holder)
    if holder:
      self.release()
      raise ConfigError(f"{self.flag}={self.workdir} is in use by another run ({holder}); wait "
                        "for it to end, or use another --workdir")
    return self

  def _acquire(self) -> str:
    """Takes the lock and writes this process into the file; or returns who holds it."""
    path = os.path.join(self.workdir, LOCK_FILE)
    file = open(path, "a+")
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno not in (errno.EAGAIN, errno.EACCES):
        file.close()
        raise
      file.seek(0)
      holder = file.read().strip() or "a process that has not written its pid yet"
      file.close()
      return holder
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    self._file = file
    return ""

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __exit__(self, *exc_info) -> None:
    self.release()
