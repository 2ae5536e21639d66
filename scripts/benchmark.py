"""Times jaxddp's training step, and compares variants of one config.

    python scripts/benchmark.py --config=configs/mnist1d.py \
        --compare=model.norm=batch_norm,ghost_batch_norm --config.train.batch_size=512

For each value of the --compare field, the config's training step (the same
model, optimizer, backend and batch size that `jaxddp.main` would use, compiled
the same way) runs on one fixed batch already on the devices. After warm-up
steps (compilation included) the variants are timed in alternating rounds, so
that a machine that slows down or speeds up during the run affects them alike;
each step is timed to completion (block_until_ready), and the table reports the
median step time, examples per second and the ratio to the first variant. With
--json=PATH the same figures are written as JSON. Without --compare the config
is timed alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config to time, e.g. configs/mnist1d.py.")
_COMPARE = flags.DEFINE_string(
    "compare", None, "FIELD=VALUE1,VALUE2,...: time the config with each value of one config "
    "field, e.g. model.norm=batch_norm,ghost_batch_norm. Values are parsed as the config's type.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per variant (split into --rounds).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Alternating rounds the timed steps are split into.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps per variant first (compiles).")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")


def parse_compare(config, spec: str) -> tuple[str, list]:
  """"model.norm=a,b" -> ("model.norm", ["a", "b"]), values converted to the field's type."""
  field, sep, values = spec.partition("=")
  if not sep or not values:
    raise app.UsageError(f"--compare={spec!r}: use FIELD=VALUE1,VALUE2, e.g. "
                         "model.norm=batch_norm,ghost_batch_norm")
  section = config
  *parents, leaf = field.split(".")
  try:
    for part in parents:
      section = section[part]
    current = section[leaf]
  except (KeyError, AttributeError):
    raise app.UsageError(f"--compare: config has no field {field!r}") from None
  kind = type(current)
  convert = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
  try:
    return field, [convert(v) for v in values.split(",")]
  except ValueError:
    raise app.UsageError(f"--compare: {values!r} are not all of type {kind.__name__}") from None


def _with_field(config, field: str, value):
  config = config.copy_and_resolve_references()
  section = config
  *parents, leaf = field.split(".")
  for part in parents:
    section = section[part]
  section[leaf] = value
  return config


class StepTimer:
  """One config's compiled training step, state and batch, ready to be timed."""

  def __init__(self, config):
    from jaxddp import train
    run = train.setup(config)  # exactly what jaxddp.main trains with
    self.recipe, self.backend, self.state = run.recipe, run.backend, run.state
    self.batch = self.backend.put_batch(run.train_batches(0))
    self.seconds: list[float] = []

  def run(self, steps: int, record: bool) -> None:
    import jax
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.backend.train_step(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      if record:
        self.seconds.append(time.perf_counter() - start)


def benchmark(config, field: str | None, values: list, steps: int, rounds: int,
              warmup: int) -> list[dict]:
  variants = [(value, _with_field(config, field, value)) for value in values] if field else \
      [(None, config)]
  timers = []
  for value, variant in variants:
    start = time.perf_counter()
    timer = StepTimer(variant)
    timer.run(warmup, record=False)
    print(f"{field or 'config'}={value}: compiled and warmed up in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    timers.append(timer)
  per_round = max(1, steps // rounds)
  for _ in range(rounds):
    for timer in timers:
      timer.run(per_round, record=True)
  results = []
  for (value, _), timer in zip(variants, timers):
    median = statistics.median(timer.seconds)
    results.append({
        "variant": value, "median_step_seconds": median,
        "examples_per_second": timer.recipe.effective_batch_size / median,
        "timed_steps": len(timer.seconds), "batch_size": timer.recipe.effective_batch_size,
        "per_device_batch_size": timer.recipe.per_device_batch_size,
        "devices": timer.recipe.num_devices, "backend": timer.backend.name})
  for result in results:
    result["ratio_to_first"] = result["median_step_seconds"] / results[0]["median_step_seconds"]
  return results


def format_table(field: str | None, results: list[dict]) -> str:
  name = field or "config"
  width = max(len(name), *(len(str(r["variant"])) for r in results))
  lines = [f"{name:<{width}}  {'median step':>12}  {'examples/s':>10}  {'vs first':>8}"]
  for r in results:
    lines.append(f"{str(r['variant']):<{width}}  {r['median_step_seconds'] * 1e3:>9.2f} ms  "
                 f"{r['examples_per_second']:>10.0f}  {r['ratio_to_first']:>7.3f}x")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mnist1d.py")
  if _STEPS.value < 1 or _ROUNDS.value < 1 or _WARMUP.value < 1:
    raise app.UsageError("--steps, --rounds and --warmup must be at least 1")
  from jaxddp import parallel
  config = _CONFIG.value
  parallel.set_cpu_device_count(config.parallel.cpu_devices)  # before JAX starts
  field, values = parse_compare(config, _COMPARE.value) if _COMPARE.value else (None, [None])
  results = benchmark(config, field, values, _STEPS.value, _ROUNDS.value, _WARMUP.value)
  import jax
  first = results[0]
  print(f"\n{config.model.name} on {config.dataset.name}, global batch {first['batch_size']} "
        f"({first['per_device_batch_size']} per device on {first['devices']} "
        f"{jax.devices()[0].platform} device(s), {first['backend']}), median of "
        f"{first['timed_steps']} steps per variant:")
  print(format_table(field, results))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"config": config.to_dict(), "field": field, "results": results}, f, indent=2,
                default=str)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
