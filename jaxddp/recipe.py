"""The resolved recipe: every number a run uses, derived from the config, data and devices.

`resolve` turns config.train/optimizer plus the dataset's size and the device count into
batch splits, step counts and the learning rate's anchors; everything that trains, logs
or plans reads those numbers from the `Recipe`, never from the config again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from jaxddp.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The numbers a run actually uses, derived from the config, data and devices.

  A step is one optimizer update. With gradient accumulation it sees
  accumulation_steps micro-batches of batch_size examples (one at a time per
  device), so the effective batch is their product; epochs, steps, learning-rate
  scaling and schedules all count in effective batches.
  """
  num_processes: int
  num_devices: int
  batch_size: int  # global examples per forward pass (config.train.batch_size)
  per_process_batch_size: int
  per_device_batch_size: int  # examples per device per forward pass: what memory holds
  accumulation_steps: int
  effective_batch_size: int  # examples per optimizer update
  eval_global_batch_size: int
  num_train_examples: int
  num_test_examples: int
  steps_per_epoch: int
  epochs_scale: float  # train longer: epochs and decay points are multiplied by this
  total_steps: int
  epochs: float
  warmup_steps: int
  base_learning_rate: float  # config.optimizer.learning_rate, at reference_batch_size
  scaling: str
  peak_learning_rate: float
  schedule: str
  decay_steps: tuple[int, ...]  # step schedule: updates after which the LR is multiplied
  eval_steps: int
  data_pruning: str = "none"  # what data pruning does (DataPruning.description)
  devices: str = ""  # which devices: parallel.describe_devices (a tune worker's host group)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _divisible(field: str, value: int, num_devices: int, num_processes: int) -> None:
  if value % num_devices:
    raise ConfigError(
        f"config.{field}={value} is not divisible by the {num_devices} devices; use a "
        f"multiple of {num_devices} (e.g. {max(1, round(value / num_devices)) * num_devices})")
  if value % num_processes:
    raise ConfigError(f"config.{field}={value} is not divisible by the {num_processes} processes")


def _check_ghost_batch_size(ghost: int, batch: int, num_devices: int, accumulation: int) -> None:
  """Ghost batches split each device's batch of one forward pass (one micro-batch)."""
  per_device = batch // num_devices
  if ghost < per_device and per_device % ghost:
    divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
    nearest = min(divisors, key=lambda d: (abs(d - ghost), d))
    micro = f", one of {accumulation} accumulated micro-batches" if accumulation > 1 else ""
    raise ConfigError(
        f"config.model.ghost_batch_size={ghost} does not divide the per-device batch of "
        f"{per_device} examples (config.train.batch_size={batch} over {num_devices} "
        f"device{'s' if num_devices > 1 else ''}{micro}); use a divisor of {per_device}, "
        f"e.g. {nearest}")


def resolve(config: ml_collections.ConfigDict, *, num_train_examples: int, num_test_examples: int,
            num_devices: int, num_processes: int = 1) -> Recipe:
  """Derives batch splits, step counts, the peak learning rate and the schedule's anchors."""
  batch = config.train.batch_size
  _divisible("train.batch_size", batch, num_devices, num_processes)
  eval_batch = config.train.eval_batch_size or batch
  _divisible("train.eval_batch_size", eval_batch, num_devices, num_processes)
  accumulation = config.train.accumulation_steps
  effective = batch * accumulation
  if config.model.norm == "ghost_batch_norm":
    _check_ghost_batch_size(config.model.ghost_batch_size, batch, num_devices, accumulation)
  steps_per_epoch = num_train_examples // effective
  if steps_per_epoch == 0:
    what = (f"config.train.batch_size={batch}" if accumulation == 1 else
            f"the effective batch {effective} (batch_size {batch} x accumulation_steps "
            f"{accumulation})")
    raise ConfigError(f"{what} is larger than the {num_train_examples} training examples; "
                      "use a smaller batch")

  ratio = effective / config.optimizer.reference_batch_size
  epochs_scale = ratio if config.train.epochs_scaling == "linear" else 1.0
  if config.train.num_steps > 0:
    total_steps = int(config.train.num_steps)
  else:
    total_steps = max(1, math.ceil(config.train.num_epochs * epochs_scale * steps_per_epoch))
  if config.optimizer.warmup_steps > 0:
    warmup_steps, warmup_field = config.optimizer.warmup_steps, "warmup_steps"
  else:
    warmup_steps = round(config.optimizer.warmup_epochs * steps_per_epoch)
    warmup_field = "warmup_epochs"
  # A run whose length is given in steps may stop inside the warmup (a smoke test
  # of a long recipe); one whose epochs end before the warmup does is a mistake.
  if warmup_steps >= total_steps and warmup_steps > 0 and config.train.num_steps == 0:
    raise ConfigError(f"config.optimizer.{warmup_field}={config.optimizer[warmup_field]} gives "
                      f"{warmup_steps} warmup steps, not fewer than the {total_steps} total steps")
  decay_steps = ()
  if config.optimizer.schedule == "step":
    decay_steps = tuple(round(e * epochs_scale * steps_per_epoch)
                        for e in config.optimizer.decay_epochs)
  factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.optimizer.scaling]
  return Recipe(
      num_processes=num_processes,
      num_devices=num_devices,
      batch_size=batch,
      per_process_batch_size=batch // num_processes,
      per_device_batch_size=batch // num_devices,
      accumulation_steps=accumulation,
      effective_batch_size=effective,
      eval_global_batch_size=eval_batch,
      num_train_examples=num_train_examples,
      num_test_examples=num_test_examples,
      steps_per_epoch=steps_per_epoch,
      epochs_scale=epochs_scale,
      total_steps=total_steps,
      epochs=total_steps / steps_per_epoch,
      warmup_steps=warmup_steps,
      base_learning_rate=float(config.optimizer.learning_rate),
      scaling=config.optimizer.scaling,
      peak_learning_rate=float(config.optimizer.learning_rate) * factor,
      schedule=config.optimizer.schedule,
      decay_steps=decay_steps,
      eval_steps=math.ceil(num_test_examples / eval_batch),
  )
