"""Cascades: a cheap model answers the inputs it is sure of, a large model the rest.

For a threshold t, the cheap model's answer stands where its top softmax probability
is at least t; every other input is deferred to the large model. The cheap model runs
on every input, the large one only on the deferred, so a cascade's inference FLOPs per
example are f_cheap + (fraction deferred) x f_large. t = 0 defers nothing (the cheap
model alone); any t > 1 defers everything (the large model, plus the cheap one's cost).

The per-example logits come from jaxddp.evaluate.per_example_outputs, so every
example is evaluated exactly once, data-parallel (experiments/cascade.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def confidence(logits: np.ndarray) -> np.ndarray:
  """The top softmax probability of each row of logits, in float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return 1.0 / np.exp(shifted).sum(axis=-1)  # exp(max - max) / sum = 1 / sum


def route(cheap_logits: np.ndarray, large_logits: np.ndarray,
          threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """(predicted class, deferred) per example: the cheap model's class where its
  confidence is at least `threshold`, else the large model's."""
  deferred = confidence(cheap_logits) < threshold
  predictions = np.where(deferred, np.argmax(large_logits, axis=-1),
                         np.argmax(cheap_logits, axis=-1))
  return predictions, deferred


@dataclasses.dataclass(frozen=True)
class Point:
  threshold: float
  accuracy: float
  deferred: float  # fraction of the examples the large model answers
  flops: float  # inference FLOPs per example


def sweep(cheap_logits: np.ndarray, large_logits: np.ndarray, labels: np.ndarray,
          thresholds: Sequence[float], cheap_flops: float, large_flops: float) -> list[Point]:
  """Accuracy, fraction deferred and inference FLOPs per example at each threshold."""
  points = []
  for t in thresholds:
    predictions, deferred = route(cheap_logits, large_logits, t)
    points.append(Point(float(t), float(np.mean(predictions == labels)),
                        float(np.mean(deferred)), cheap_flops + float(np.mean(deferred))
                        * large_flops))
  return points


def cheapest_within(points: Sequence[Point], target: float, tolerance: float) -> Point | None:
  """The point with the fewest FLOPs whose accuracy is at least target - tolerance
  (None if there is none)."""
  good = [p for p in points if p.accuracy >= target - tolerance]
  return min(good, key=lambda p: (p.flops, p.threshold)) if good else None
