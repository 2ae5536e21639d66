"""The two data-parallel backends behind one small interface.

Both map the per-device steps of jaxddp.steps over the devices on the axis
"data" and give the same numbers:

* ShardMapBackend: jax.jit(jax.shard_map(step)) over a 1-D mesh; the state is
  one replicated global array per leaf, the batch a global array split over
  "data" (assembled from each process's slice).
* PmapBackend: jax.pmap(step); the state carries a leading axis of one copy per
  local device, the batch a leading axis of one slice per local device.

A backend converts between the global view (a TrainState of arrays replicated
on every training device of every process: what checkpoints hold) and its device
view: put_state / global_state, put_batch / put_batches (from this process's slice
of the batch), and runs train_step / eval_step on the device view.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxddp import losses, steps
from jaxddp.errors import ConfigError
from jaxddp.losses import LossFn
from jaxddp.optim import LearningRate, as_learning_rate
from jaxddp.pruning.tables import ExampleTables
from jaxddp.sparsity import Sparsity
from jaxddp.state import TrainState, local_value


def _user_cpu_device_count() -> int:
  """The CPU device count set before jaxddp was asked: jax_num_cpu_devices, or else
  XLA_FLAGS' --xla_force_host_platform_device_count (0: neither is set)."""
  flags = re.findall(r"--xla_force_host_platform_device_count=(\d+)",
                     os.environ.get("XLA_FLAGS", ""))
  return max(jax.config.jax_num_cpu_devices, int(flags[-1]) if flags else 0, 0)


def set_cpu_device_count(count: int) -> None:
  """Emulates at least `count` CPU devices; effective only before JAX initialises its
  backends. It never lowers a count set before, by an earlier run in this process or by
  the user (jax_num_cpu_devices, or XLA_FLAGS=--xla_force_host_platform_device_count,
  which jax_num_cpu_devices would override): select_devices takes the first `count`.
  Once JAX has started it does nothing: select_devices then says whether there are
  enough."""
  if count > _user_cpu_device_count():
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started its backends already
      pass


def _replicate(x, sharding: NamedSharding) -> jax.Array:
  """`x` (the same value on every process) as one array replicated over `sharding`."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  value = local_value(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def select_devices(cpu_devices: int) -> list[jax.Device]:
  """The devices to train on: all of them, or the first `cpu_devices` CPU devices."""
  devices = jax.devices()
  if cpu_devices <= 0 or devices[0].platform != "cpu":
    return devices
  if jax.process_count() > 1:
    return devices  # every process contributes its own emulated devices
  if cpu_devices > len(devices):
    raise ConfigError(
        f"config.parallel.cpu_devices={cpu_devices} but JAX was started with {len(devices)} "
        "CPU devices; set it before JAX starts (from the command line)")
  return devices[:cpu_devices]


# Set by jaxddp.tune in each worker process: which of the host's devices the process was
# given (e.g. "2,3 of 0-7"), since a process sees its own group numbered from 0.
DEVICE_GROUP_VARIABLE = "JAXDDP_DEVICE_GROUP"


def describe_devices(devices: list[jax.Device]) -> str:
  """The devices a run trains on, for its recipe: "cpu 0,1", and, in a jaxddp.tune worker,
  which of the host's devices they are."""
  ids = ",".join(str(device.id) for device in devices)
  described = f"{devices[0].platform} {ids}" if devices else ""
  group = os.environ.get(DEVICE_GROUP_VARIABLE)
  return f"{described} (host devices {group})" if group else described


class _Backend:
  """What both backends share: they differ only in how the state and batches are laid
  out on the devices (put_state, global_state, put_batches) and in how the steps are
  mapped (self._train_step, self._eval_step, built by each constructor)."""
  name: str
  num_devices: int
  _train_step: Callable
  _eval_step: Callable

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return self.put_batches([batch])[0]

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    return self._train_step(state, batch)

  def compiled_train_step(self, state: TrainState, batch: dict) -> jax.stages.Compiled:
    """The per-device program train_step runs (for XLA's cost and memory analyses)."""
    return self._train_step.lower(state, batch).compile()

  def eval_step(self, state: TrainState, batch: dict) -> dict:
    return self._eval_step(state, batch)

  def map_replicated(self, step: Callable) -> Callable:
    """A per-device `step(state, batch)` whose outputs are the same on every device (a
    psum's, say), mapped like eval_step; the mapped function returns this process's
    copy of the outputs as NumPy arrays."""
    mapped = self._map(step)
    return lambda state, batch: jax.tree.map(self._host_copy, mapped(state, batch))


class ShardMapBackend(_Backend):
  name = "shard_map"

  def __init__(self, devices: list[jax.Device], train_step: Callable, eval_step: Callable):
    self.mesh = Mesh(np.asarray(devices), (steps.AXIS,), axis_types=(AxisType.Auto,))
    self.num_devices = len(devices)
    self._replicated = NamedSharding(self.mesh, P())
    self._split = NamedSharding(self.mesh, P(steps.AXIS))
    data = P(steps.AXIS)
    self._train_step = jax.jit(
        jax.shard_map(train_step, mesh=self.mesh, in_specs=(P(), data), out_specs=(P(), P())),
        donate_argnums=0)
    self._eval_step = jax.jit(
        jax.shard_map(eval_step, mesh=self.mesh, in_specs=(P(), data), out_specs=P()))

  def _map(self, step: Callable) -> Callable:
    return jax.jit(jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(steps.AXIS)),
                                 out_specs=P()))

  @staticmethod
  def _host_copy(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))

  def put_state(self, state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: _replicate(x, self._replicated), state)

  def global_state(self, state: TrainState) -> TrainState:
    return state

  def put_batches(self, batches: list[dict[str, np.ndarray]]) -> list[dict[str, jax.Array]]:
    if jax.process_count() == 1:  # one transfer for all of them
      return jax.device_put(batches, self._split)
    return [{k: jax.make_array_from_process_local_data(self._split, v) for k, v in b.items()}
            for b in batches]


class PmapBackend(_Backend):
  name = "pmap"

  def __init__(self, devices: list[jax.Device], train_step: Callable, eval_step: Callable):
    # pmap runs over every device of every process (its collectives span them all);
    # each process feeds its own devices, along the leading axis of its arrays.
    self.devices = devices
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
    self.num_devices = len(devices)
    local_mesh = Mesh(np.asarray(self.local_devices), (steps.AXIS,), axis_types=(AxisType.Auto,))
    self._split = NamedSharding(local_mesh, P(steps.AXIS))
    global_mesh = Mesh(np.asarray(devices), (steps.AXIS,), axis_types=(AxisType.Auto,))
    self._replicated = NamedSharding(global_mesh, P())
    self._train_step = jax.pmap(train_step, axis_name=steps.AXIS, devices=devices,
                                donate_argnums=0)
    self._eval_step = jax.pmap(eval_step, axis_name=steps.AXIS, devices=devices)

  def _map(self, step: Callable) -> Callable:
    return jax.pmap(step, axis_name=steps.AXIS, devices=self.devices)

  @staticmethod
  def _host_copy(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_shards[0].data)[0]  # (1, ...): device 0's copy

  def put_state(self, state: TrainState) -> TrainState:
    n = len(self.local_devices)
    copies = lambda x: np.broadcast_to(local_value(x)[None], (n, *np.shape(x)))
    return jax.device_put(jax.tree.map(copies, state), self._split)

  def global_state(self, state: TrainState) -> TrainState:
    """One replicated global array per leaf, built from the per-device copies in place."""
    def replicated(x: jax.Array) -> jax.Array:
      copies = [shard.data[0] for shard in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], self._replicated, copies)
    return jax.tree.map(replicated, state)

  def put_batches(self, batches: list[dict[str, np.ndarray]]) -> list[dict[str, jax.Array]]:
    n = len(self.local_devices)
    per_device = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.device_put([{k: per_device(v) for k, v in b.items()} for b in batches],
                          self._split)


Backend = ShardMapBackend | PmapBackend


def metrics_to_host(metrics: list[dict]) -> list[dict[str, float]]:
  """Per-step metrics (equal on every device) as floats, fetched in one transfer."""
  local_copies = jax.tree.map(lambda x: x.addressable_data(0), metrics)
  return [{k: float(np.ravel(v)[0]) for k, v in step.items()}
          for step in jax.device_get(local_copies)]


BACKENDS = {"shard_map": ShardMapBackend, "pmap": PmapBackend}


def create_backend(config: ml_collections.ConfigDict, devices: list[jax.Device],
                   learning_rate: LearningRate | optax.Schedule,
                   sparsity: Sparsity | None = None, train_loss: LossFn = losses.cross_entropy,
                   eval_loss: LossFn = losses.cross_entropy,
                   tables: ExampleTables = ExampleTables()) -> Backend:
  """config.parallel.backend's backend, running jaxddp.steps with the run's learning rate
  (a LearningRate, or a schedule of the update count), sparsity, losses (train_loss is
  minimised, eval_loss reported) and per-example tables (data pruning)."""
  train_step = functools.partial(steps.train_step, learning_rate=as_learning_rate(learning_rate),
                                 train_loss=train_loss, eval_loss=eval_loss,
                                 accumulation_steps=config.train.accumulation_steps,
                                 sparsity=sparsity, tables=tables)
  eval_step = functools.partial(steps.eval_step, loss_fn=eval_loss)
  return BACKENDS[config.parallel.backend](devices, train_step, eval_step)
