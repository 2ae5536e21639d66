"""How far 1 vs 8 devices, and pmap vs shard_map, drift apart in float32 training.

    python -m experiments.device_drift --out=runs/device_drift
    python -m experiments.device_drift --out=runs/device_drift --seeds=0-4 --variants=batch_norm

The setting of docs/numerics.md: MNIST-1D, the default CNN (configs/mnist1d.py), batch
128, optimizer.learning_rate=0.01, no warmup, 10 steps (--steps). For each variant and
seed it trains three times, through jaxddp.train.train_and_evaluate with log_every=1:

    1 device   shard_map    (the reference of "1v8")
    8 devices  shard_map    (the reference of "pmap_vs_shard_map")
    8 devices  pmap

and records the largest relative difference of the train loss over the steps (each
run's TrainResult.train_history, logged every step):
max_t |loss_8(t) - loss_1(t)| / |loss_1(t)| (1v8), and the same between pmap and
shard_map on 8 devices (pmap_vs_shard_map). Variants:

    batch_norm           synced batch norm, two-pass variance (the default)
    batch_norm_one_pass  synced batch norm, one-pass variance E[x^2] - E[x]^2 (before
                         December 2026)
    ghost_batch_norm     ghost batches of 16 examples (one per device on 8 devices)

Writes OUT/results.csv (one row per variant and seed, appended as each finishes: an
interrupted run continues where it stopped) and OUT/drift.md (a Markdown table, seeds
as rows, with the max and median of each column). The process emulates 8 CPU devices;
the 1-device runs train on the first of them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import flags

from experiments import common

_OUT = flags.DEFINE_string("out", None, "Output folder for results.csv and drift.md.")
_SEEDS = flags.DEFINE_string("seeds", "0-9", "Seeds: a range 0-9, a list 0,3,5, or both.")
_VARIANTS = flags.DEFINE_list("variants", ["batch_norm", "batch_norm_one_pass",
                                           "ghost_batch_norm"], "Variants to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Training steps of each run.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                os.path.join(tempfile.gettempdir(), "jaxddp-drift-jax-cache")),
    "JAX's persistent compilation cache (every seed runs the same programs); '' disables it.")

NUM_DEVICES = 8
VARIANTS = {
    "batch_norm": {"model.norm": "batch_norm", "model.bn_variance": "two_pass"},
    "batch_norm_one_pass": {"model.norm": "batch_norm", "model.bn_variance": "one_pass"},
    "ghost_batch_norm": {"model.norm": "ghost_batch_norm", "model.ghost_batch_size": 16},
}
COLUMNS = ("1v8", "pmap_vs_shard_map")
FIELDS = ["variant", "seed", *COLUMNS, "steps", "seconds"]


def parse_seeds(text: str) -> list[int]:
  """'0-9', '0,3,5' or '0-2,7' as a list of seeds."""
  seeds = []
  try:
    for part in filter(None, (p.strip() for p in text.split(","))):
      first, _, last = part.partition("-")
      first, last = int(first), int(last or first)
      if last < first:
        raise ValueError
      seeds.extend(range(first, last + 1))
  except ValueError:
    raise common.Error(f"--seeds={text}: give a range 0-9 (first <= last) or a list "
                       "0,3,5") from None
  if not seeds or min(seeds) < 0:
    raise common.Error(f"--seeds={text}: give seeds >= 0")
  return list(dict.fromkeys(seeds))


def run_config(variant: str, seed: int, steps: int, devices: int, backend: str):
  """The config of one run: the fixed setting, one variant, seed, device count, backend."""
  from configs import mnist1d
  return common.quiet(mnist1d.get_config(), **{
      **VARIANTS[variant], "seed": seed, "train.batch_size": 128, "train.num_steps": steps,
      "train.log_every": 1, "optimizer.learning_rate": 0.01, "optimizer.warmup_epochs": 0.0,
      "optimizer.warmup_steps": 0, "model.sync_batch_stats": True,
      "parallel.cpu_devices": devices, "parallel.backend": backend})


def train_losses(config) -> list[float]:
  """The train loss of every step of one run (in a temporary workdir)."""
  from jaxddp import train
  with tempfile.TemporaryDirectory(prefix="device_drift_") as workdir:
    result = train.train_and_evaluate(config, workdir)
  losses = [window["train/loss"] for window in result.train_history]
  if len(losses) != config.train.num_steps:
    raise RuntimeError(f"expected {config.train.num_steps} train losses, got {len(losses)}")
  return losses


def max_relative_difference(losses: list[float], reference: list[float]) -> float:
  return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def setup_jax(cache_dir: str) -> None:
  """8 emulated CPU devices (before JAX starts; a larger count set before is kept) and
  the persistent compilation cache."""
  import jax
  from jaxddp import parallel
  parallel.set_cpu_device_count(NUM_DEVICES)
  if cache_dir:
    from jaxddp.workdir import checked
    checked(cache_dir, "--cache_dir")  # a file there: one line, not a warning per program
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def measure(out: str, seeds: list[int], variants: list[str], steps: int) -> common.Results:
  """Runs every (variant, seed) not yet in OUT/results.csv; writes OUT/drift.md."""
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise common.Error(f"unknown variant(s) {', '.join(unknown)}; choose from "
                       f"{', '.join(VARIANTS)}")
  common.out_dir(out)
  results = common.Results(os.path.join(out, "results.csv"), FIELDS,
                           lambda row: (row["variant"], int(row["seed"])))
  todo = [(v, s) for v in variants for s in seeds if not results.done((v, s))]
  print(f"device drift: {len(todo)} (variant, seed) pairs to go, 3 runs of {steps} steps "
        f"each", flush=True)
  for index, (variant, seed) in enumerate(todo, 1):
    start = time.time()
    one, shard_map, pmap = (train_losses(run_config(variant, seed, steps, devices, backend))
                            for devices, backend in ((1, "shard_map"),
                                                     (NUM_DEVICES, "shard_map"),
                                                     (NUM_DEVICES, "pmap")))
    row = results.add({"variant": variant, "seed": seed,
                       "1v8": f"{max_relative_difference(shard_map, one):.3g}",
                       "pmap_vs_shard_map": f"{max_relative_difference(pmap, shard_map):.3g}",
                       "steps": steps, "seconds": round(time.time() - start, 1)})
    print(f"[{index}/{len(todo)}] {variant:>19} seed {seed}  1v8 {row['1v8']:>9}  pmap vs "
          f"shard_map {row['pmap_vs_shard_map']:>9}  {row['seconds']}s", flush=True)
  write_table(results, os.path.join(out, "drift.md"))
  return results


def _format(value: float) -> str:
  return "0" if value == 0 else f"{value:.1e}"


def write_table(results: common.Results, path: str) -> None:
  """drift.md: seeds as rows, a column per variant and comparison, then max and median."""
  rows = results.rows()
  variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
  columns = [(v, c) for v in variants for c in COLUMNS]
  values = {(r["variant"], int(r["seed"]), c): float(r[c]) for r in rows for c in COLUMNS}
  seeds = sorted({int(r["seed"]) for r in rows})
  steps = sorted({r["steps"] for r in rows})
  lines = [
      f"Largest relative train-loss difference over {'/'.join(steps)} steps (MNIST-1D, "
      "default CNN, batch 128, learning rate 0.01, no warmup; `python -m "
      "experiments.device_drift`). 1v8: 1 vs 8 devices (shard_map); pmap vs shard_map: "
      "8 devices each.", "",
      "| seed | " + " | ".join(f"{v} {c.replace('_', ' ')}" for v, c in columns) + " |",
      "|---:|" + "---:|" * len(columns)]
  for seed in seeds:
    lines.append(f"| {seed} | " + " | ".join(
        _format(values[(v, seed, c)]) if (v, seed, c) in values else "" for v, c in columns)
        + " |")
  for name, reduce in (("max", max), ("median", statistics.median)):
    cells = []
    for v, c in columns:
      column = [values[(v, s, c)] for s in seeds if (v, s, c) in values]
      cells.append(_format(reduce(column)) if column else "")
    lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main() -> None:
  if not _OUT.value:
    raise common.Error("--out is required")
  if _STEPS.value < 1:
    raise common.Error(f"--steps={_STEPS.value} must be at least 1")
  seeds = parse_seeds(_SEEDS.value)
  setup_jax(_CACHE_DIR.value)
  measure(_OUT.value, seeds, _VARIANTS.value, _STEPS.value)
  print(f"wrote {os.path.join(_OUT.value, 'results.csv')} and "
        f"{os.path.join(_OUT.value, 'drift.md')}")


if __name__ == "__main__":
  common.run("device_drift.py", main)
