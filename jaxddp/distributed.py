"""Process bootstrap on JAX's distributed runtime, and what keeps a multi-process run honest.

A run is one process (the default) or many, each with its own local devices. Where
a process sits is read, in this order, from

1. the config: config.distributed.coordinator_address / num_processes / process_id;
2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
   (what scripts/launch_local.py and the Kubernetes example set);
3. the cluster: SLURM (srun) or Open MPI (mpirun), detected by JAX itself from
   their environment variables; Kubernetes only when config.distributed.cluster="k8s".

Failures never leave a process waiting forever: the coordinator must be reachable
within config.distributed.initialization_timeout, a process that dies is noticed by
JAX's heartbeats (config.distributed.heartbeat_timeout) and stops the others, and a
Watchdog stops a run in which no step finishes for config.distributed.hang_timeout.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Mapping

import jax
import ml_collections
import numpy as np

from jaxddp.errors import ConfigError


class DistributedError(Exception):
  """The distributed runtime could not start (an unreachable coordinator, a missing peer)."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """Where this process sits, before JAX has started."""
  cluster: str  # "none" (one process), "explicit", "slurm", "ompi" or "k8s"
  coordinator_address: str | None = None
  num_processes: int | None = None  # None: the cluster tells JAX
  process_id: int | None = None
  local_device_ids: list[int] | None = None  # None: JAX's default, []: every local device

  @property
  def multi_process(self) -> bool:
    return self.cluster != "none"

  def label(self) -> str:
    """How errors name this process, e.g. "process 1/2"; empty for a single process."""
    if not self.multi_process:
      return ""
    if jax.distributed.is_initialized():
      return process_label()
    return f"process {self.process_id if self.process_id is not None else '?'}"


def process_label() -> str:
  """"process i/n" in a multi-process run (after initialize), else ""."""
  return f"process {jax.process_index()}/{jax.process_count()}" if jax.process_count() > 1 else ""


def _from_env(environ: Mapping[str, str], name: str, field: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} (the environment's value of config.distributed.{field}) "
                      "is not an integer") from None


def _local_device_ids(value: str) -> list[int] | None:
  value = value.strip()
  if not value:
    return None
  if value == "all":
    return []  # jax.distributed.initialize then restricts nothing
  try:
    return [int(part) for part in value.split(",")]
  except ValueError:
    raise ConfigError(f"config.distributed.local_device_ids={value!r} is not valid; use '' (JAX's "
                      "default), 'all', or device numbers such as '0,1,2,3'") from None


def _slurm_tasks(environ: Mapping[str, str]) -> int:
  required = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
  return int(environ["SLURM_NTASKS"]) if all(k in environ for k in required) else 0


def _ompi_ranks(environ: Mapping[str, str]) -> int:
  present = "OMPI_MCA_orte_hnp_uri" in environ and "OMPI_COMM_WORLD_SIZE" in environ
  return int(environ["OMPI_COMM_WORLD_SIZE"]) if present else 0


def launch_settings(config: ml_collections.ConfigDict,
                    environ: Mapping[str, str] = os.environ) -> Launch:
  """Decides, from the config and the environment alone, how this process joins a run."""
  settings = config.distributed
  cluster = settings.cluster
  device_ids = _local_device_ids(settings.local_device_ids)
  if cluster == "none":
    return Launch("none")

  address = settings.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = settings.num_processes or _from_env(environ, "JAX_NUM_PROCESSES", "num_processes")
  process_id = settings.process_id if settings.process_id >= 0 else _from_env(
      environ, "JAX_PROCESS_ID", "process_id")
  if cluster == "auto" and address:
    if num_processes is None or process_id is None:
      missing = "num_processes" if num_processes is None else "process_id"
      raise ConfigError(
          f"a coordinator is given ({address}) but not config.distributed.{missing} (or "
          f"JAX_{missing.upper()}); an explicit launch needs all three")
    if ":" not in address:
      raise ConfigError(f"config.distributed.coordinator_address={address!r} needs a port, "
                        "e.g. 10.0.0.1:1234")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"config.distributed.process_id={process_id} is not in "
                        f"[0, {num_processes}) (num_processes={num_processes})")
    if num_processes == 1:
      return Launch("none")
    return Launch("explicit", address, num_processes, process_id, device_ids)

  if cluster == "auto":
    if _slurm_tasks(environ) > 1:
      cluster = "slurm"
    elif _ompi_ranks(environ) > 1:
      cluster = "ompi"
    elif num_processes is not None and num_processes > 1:
      field = ("config.distributed.num_processes" if settings.num_processes else
               "JAX_NUM_PROCESSES")
      raise ConfigError(
          f"{field}={num_processes} but no coordinator is given, so "
          "this process would train alone; set config.distributed.coordinator_address=HOST:PORT "
          "and process_id (or JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID), or start the "
          "processes with scripts/launch_local.py, srun or mpirun")
    else:
      return Launch("none")
  if cluster == "slurm" and not _slurm_tasks(environ):
    raise ConfigError("config.distributed.cluster='slurm' but this process was not started by "
                      "srun (SLURM_STEP_NODELIST, SLURM_PROCID, ... are not set)")
  if cluster == "ompi" and not _ompi_ranks(environ):
    raise ConfigError("config.distributed.cluster='ompi' but this process was not started by "
                      "Open MPI's mpirun (OMPI_MCA_orte_hnp_uri is not set)")
  if cluster == "k8s":
    if "KUBERNETES_SERVICE_HOST" not in environ:
      raise ConfigError("config.distributed.cluster='k8s' but this is not a Kubernetes pod "
                        "(KUBERNETES_SERVICE_HOST is not set)")
    try:
      import kubernetes  # noqa: F401  (JAX's detection reads the pod and job through it)
    except ImportError:
      raise ConfigError("config.distributed.cluster='k8s' needs the kubernetes package: "
                        "pip install 'jax[k8s]'; or set JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES and JAX_PROCESS_ID in the pod spec") from None
  process_id = None
  if cluster == "slurm":
    process_id = int(environ["SLURM_PROCID"])
  elif cluster == "ompi":
    process_id = int(environ["OMPI_COMM_WORLD_RANK"])
  return Launch(cluster, address or None, None, process_id, device_ids)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once the coordinator accepts TCP connections; raises after `timeout` s."""
  host, port = address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.time() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=5):
        return
    except socket.gaierror as error:
      raise DistributedError(f"cannot resolve the coordinator host {host!r} ({error})") from None
    except OSError:
      if time.time() > deadline:
        raise DistributedError(
            f"could not reach the coordinator at {address} within {timeout:.0f} s "
            "(config.distributed.initialization_timeout): is process 0 running, and is "
            "that address and port reachable from this host?") from None
      time.sleep(0.25)


def initialize(launch: Launch, config: ml_collections.ConfigDict) -> None:
  """Joins the distributed runtime when this is a multi-process launch; else does nothing.

  Must run before anything starts JAX's backends (jax.devices(), any computation).
  """
  if not launch.multi_process:
    return
  timeout = config.distributed.initialization_timeout
  if launch.coordinator_address and launch.process_id not in (None, 0):
    _wait_for_coordinator(launch.coordinator_address, timeout)
  # JAX aborts the process (no Python exception) if not every process joins in time;
  # a watchdog that fires first says what is missing.
  expected = f"{launch.num_processes} processes" if launch.num_processes else "every process"
  message = (f"not all {expected} joined the distributed runtime within {timeout} s "
             "(config.distributed.initialization_timeout); check that every process was "
             "started with the same coordinator address and process count")
  with Watchdog(timeout, message, launch.label()):
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        num_processes=launch.num_processes,
        process_id=launch.process_id,
        local_device_ids=launch.local_device_ids,
        cluster_detection_method=launch.cluster if launch.cluster in ("slurm", "ompi") else None,
        initialization_timeout=timeout + 30,
        heartbeat_timeout_seconds=config.distributed.heartbeat_timeout)


def agree_any(flag: bool) -> bool:
  """True on every process if `flag` is True on any of them (a collective: call it everywhere)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def leader_text(text: str, size: int = 512) -> str:
  """Process 0's `text` (up to `size` UTF-8 bytes) on every process (a collective)."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  encoded = np.zeros(size, np.uint8)
  raw = text.encode()[:size]
  encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
  return bytes(shared.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")


class Watchdog:
  """Ends the process with a message if `pet()` is not called for `timeout` seconds.

  A process blocked in a collective whose peer hung cannot raise an exception: the
  watchdog thread prints the reason and exits the whole process instead.
  """

  def __init__(self, timeout: float, message: str, label: str = ""):
    self.timeout = timeout
    self.message = message
    self.label = label
    self._petted = threading.Event()
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="jaxddp-watchdog")

  def __enter__(self) -> "Watchdog":
    if self.timeout > 0:
      self._thread.start()
    return self

  def pet(self) -> None:
    self._petted.set()

  def _watch(self) -> None:
    while not self._done.is_set():
      if not self._petted.wait(self.timeout):
        if self._done.is_set():
          return
        prefix = f"[{self.label}] " if self.label else ""
        print(f"jaxddp: error: {prefix}{self.message}", file=sys.stderr, flush=True)
        os._exit(1)
      self._petted.clear()

  def __exit__(self, *exc) -> None:
    self._done.set()
    self._petted.set()
    if self._thread.is_alive():
      self._thread.join()
