"""Metric reduction and writers: metrics.jsonl, TensorBoard, and console progress.

Steps return (sum, count) pairs already summed over devices; the host adds them
over a logging window and divides once, so averages are exact whatever the
number of devices or the size of the last eval batch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO


class SumCounter:
  """Adds per-step sums (loss_sum, correct_sum, count) and reports averages."""

  def __init__(self):
    self.sums: dict[str, float] = {}

  def add(self, sums: dict[str, float]) -> None:
    for key in ("loss_sum", "correct_sum", "count"):
      self.sums[key] = self.sums.get(key, 0.0) + sums[key]

  @property
  def count(self) -> float:
    return self.sums.get("count", 0.0)

  def averages(self) -> dict[str, float]:
    count = self.count
    return {"loss": self.sums["loss_sum"] / count, "accuracy": self.sums["correct_sum"] / count}


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl and TensorBoard; silent off process 0.

  A run resumed at `start_step` redoes the steps after its checkpoint, which a killed run
  may have logged already: those lines are dropped from metrics.jsonl first, and
  TensorBoard is told to drop their events (purge_step), so every step has one value.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self._jsonl: TextIO | None = None
    self._tensorboard = None
    if enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      if start_step and os.path.exists(path):
        _keep_up_to(path, start_step)
      self._jsonl = open(path, "a")
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _keep_up_to(path: str, step: int) -> None:
  """Rewrites a metrics.jsonl (atomically) with only its lines of steps <= `step` (and
  without a line cut short by a kill)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


class Progress:
  """A progress bar on a terminal, plain periodic lines otherwise (logs, CI, pipes)."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True,
               stream: TextIO | None = None):
    self.enabled = enabled
    self.stream = stream if stream is not None else sys.stdout  # read now: it may be redirected
    self.total_steps = total_steps
    self.start_step = start_step
    self._last_step, self._last_time = start_step, time.time()
    self._bar = None
    if enabled and self.stream.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream,
                       dynamic_ncols=True)

  def update(self, step: int, scalars: dict[str, float]) -> None:
    """Called at each logging step with the window's metrics; `step` is steps done."""
    if not self.enabled:
      return
    shown = {"loss": scalars["train/loss"], "acc": scalars["train/accuracy"],
             "ex/s": scalars["train/examples_per_second"]}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
      return
    # ETA from the latest window's rate: the first window also paid for compilation.
    now = time.time()
    steps_done = step - self._last_step
    eta = (now - self._last_time) / steps_done * (self.total_steps - step) if steps_done \
        else float("nan")
    self._last_step, self._last_time = step, now
    self.print(f"step {step}/{self.total_steps}  loss {shown['loss']:.4f}  "
               f"accuracy {shown['acc']:.4f}  {shown['ex/s']:.0f} examples/s  "
               f"ETA {_duration(eta)}")

  def print(self, line: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_recipe(recipe: dict[str, Any]) -> str:
  width = max(len(k) for k in recipe)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in recipe.items())
