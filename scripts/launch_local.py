#!/usr/bin/env python3
"""Runs N real processes of one command on this machine, as one multi-process JAX job.

    python scripts/launch_local.py -n 2 -- python -m jaxddp.main \\
        --config=configs/mnist1d.py --workdir=runs/two_processes --config.parallel.cpu_devices=2

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port),
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which jaxddp.main reads to join JAX's
distributed runtime; on CPU they talk over gloo. Every output line is prefixed
with its rank ("[1] ...").

If a process fails, the launcher names its rank, stops the others (SIGTERM, then
SIGKILL after --grace seconds) and exits with a non-zero status. SIGINT and
SIGTERM sent to the launcher are passed on to every process, so a training run
saves its checkpoint and stops cleanly. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TextIO

_print_lock = threading.Lock()


def _say(message: str) -> None:
  with _print_lock:
    print(f"launch_local: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _die_with_parent() -> None:
  """In the child (Linux): receive SIGKILL if the launcher dies, so nothing is left running."""
  os.setsid()  # its own process group: a Ctrl-C reaches it only through the launcher
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def _pump(stream: TextIO, out: TextIO, rank: int) -> None:
  """Copies the lines of one process's stdout or stderr, each prefixed with its rank."""
  for line in iter(stream.readline, ""):
    with _print_lock:
      out.write(f"[{rank}] {line}")
      out.flush()
  stream.close()


def _status(returncode: int) -> str:
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with status {returncode}"


def launch(num_processes: int, command: list[str], port: int, grace: float) -> int:
  """Starts the processes, waits for them all, and returns the launcher's exit status."""
  address = f"127.0.0.1:{port}"
  _say(f"starting {num_processes} processes, coordinator {address}")
  processes, pumps = [], []
  for rank in range(num_processes):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address,
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(rank),
               PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, bufsize=1, preexec_fn=_die_with_parent)
    processes.append(process)
    for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
      pump = threading.Thread(target=_pump, args=(stream, out, rank), daemon=True)
      pump.start()
      pumps.append(pump)

  _say("pids: " + ", ".join(f"rank {r} = {p.pid}" for r, p in enumerate(processes)))

  requested: list[int] = []  # signals the launcher received and passed on

  def forward(signum, frame) -> None:
    del frame
    requested.append(signum)
    sig = signum if len(requested) == 1 else signal.SIGKILL  # a second one: stop at once
    for process in processes:
      if process.poll() is None:
        process.send_signal(sig)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)

  failed_rank = None
  while None in [p.poll() for p in processes]:  # a list: poll every process, every time
    failed = _failed_ranks(processes)
    if failed and failed_rank is None and not requested:
      failed_rank = failed[0]
      _say(f"rank {failed_rank} {_status(processes[failed_rank].returncode)}; "
           "stopping the other ranks")
      _stop(processes, grace)
    time.sleep(0.1)
  for pump in pumps:
    pump.join(timeout=5)

  codes = [p.returncode for p in processes]
  if all(code == 0 for code in codes):
    return 0
  if failed_rank is None:
    failed_rank = _failed_ranks(processes)[0]
    if not requested:
      _say(f"rank {failed_rank} {_status(codes[failed_rank])}")
  code = codes[failed_rank]
  return code if code > 0 else 128 + (-code)


def _failed_ranks(processes: list[subprocess.Popen]) -> list[int]:
  """Ranks that ended with an error, the ones killed by a signal first.

  When one rank is killed, the others often fail a collective and exit with an
  error within the same tenth of a second; the killed rank is the cause to report.
  """
  failed = [r for r, p in enumerate(processes) if p.returncode not in (None, 0)]
  return sorted(failed, key=lambda r: (processes[r].returncode > 0, r))


def _stop(processes: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM to the processes still running, SIGKILL to those left after `grace` seconds."""
  running = [p for p in processes if p.poll() is None]
  for process in running:
    process.terminate()
  deadline = time.time() + grace
  while time.time() < deadline and any(p.poll() is None for p in running):
    time.sleep(0.1)
  for process in running:
    if process.poll() is None:
      process.kill()
      process.wait()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description="Run N processes of a command as one multi-process JAX job on this machine.",
      usage="%(prog)s -n N [--port PORT] [--grace SECONDS] -- COMMAND [ARGS...]")
  parser.add_argument("-n", "--num-processes", type=int, required=True,
                      help="number of processes to start")
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--grace", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping the others")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  if args.num_processes < 1:
    parser.error(f"-n must be at least 1, not {args.num_processes}")
  return launch(args.num_processes, command, args.port or free_port(), args.grace)


if __name__ == "__main__":
  sys.exit(main())
