"""Measures how fast jaxddp trains a config, against a bare jax.jit step of the same model.

    python scripts/benchmark.py --config.train.batch_size=32 --image_size=64   # ResNet-50
    python scripts/benchmark.py --config=configs/cifar10.py --config.train.batch_size=64
    python scripts/benchmark.py --config=configs/mnist1d.py \
        --compare=model.norm=batch_norm,ghost_batch_norm

Without --config it is ResNet-50 (configs/imagenet.py) on random images. With
--data=auto (the default) a config whose dataset must be read from disk (tfds, image
folders) gets random images of --image_size (default: config.dataset.image_size, else
224) instead; datasets held in memory (MNIST-1D, digits, npz, your own) are used as
they are.

For each variant (each value of --compare, or the config alone) it reports:

* step time: the median of --steps timed training steps, after --warmup untimed ones
  (compilation), each run to completion (block_until_ready) on one batch already on
  the devices: the same step, model, optimizer, backend and batch as `jaxddp.main`;
  training images/s = global batch / step time;
* the bare step: a hand-written jax.jit training step (forward, backward, optimizer
  update; nothing else) of the same model, optimizer and batch, the batch split over
  the same devices by jax.jit itself; jaxddp's images/s relative to it. For a sparse
  variant the bare step is the dense model (the baseline its cost is measured against);
* FLOPs per step from XLA's cost analysis of the compiled step, the achieved FLOP/s,
  and the fraction of the device's peak (for the GPUs in PEAK_FLOPS);
* peak device memory: the allocator's peak after the variant's warm-up (GPUs), and
  XLA's estimate of the step's peak (every platform);
* the input pipeline alone: this process's training batches per second, no training;
* the real training loop: `jaxddp.train.train_and_evaluate` for --loop_steps steps in a
  temporary workdir; its images/s and the fraction of its time spent waiting for the
  next batch (train/data_wait_fraction), both from its last logging window (the first
  one also pays for compilation). It runs after the timed rounds, not between them:
  on a machine whose speed drifts, its ratio to the bare step is the less exact one.

The timed steps of all variants and bare steps alternate in --rounds rounds, so that a
machine that speeds up or slows down during the run affects them alike. --json=PATH
writes the same figures as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxddp.errors import ConfigError  # noqa: E402  (after the repository is on sys.path)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "imagenet.py"),
    "Config to measure (default: configs/imagenet.py, ResNet-50).")
_DATA = flags.DEFINE_enum(
    "data", "auto", ["auto", "synthetic", "config"],
    "synthetic: random images of --image_size; config: the config's own dataset; auto: "
    "synthetic for datasets read from disk (tfds, image folders), else the config's.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Side of the synthetic images (0: config.dataset.image_size, else 224).")
_COMPARE = flags.DEFINE_string(
    "compare", None, "FIELD=VALUE1,VALUE2,...: measure the config with each value of one config "
    "field, e.g. model.norm=batch_norm,ghost_batch_norm. Values are parsed as the config's type.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per variant (split into --rounds).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Alternating rounds the timed steps are split into.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps per variant first (compiles).")
_PIPELINE_BATCHES = flags.DEFINE_integer(
    "pipeline_batches", 20, "Batches the input pipeline produces on its own, timed.")
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", 40, "Steps of the real training loop (two logging windows); 0 skips it.")
_BARE = flags.DEFINE_bool("bare", True, "Also time the bare jax.jit step.")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")

# Peak dense FLOP/s per device by compute dtype (float32 matmuls and convolutions run
# as TF32 on these GPUs, JAX's default precision). Matched against device_kind.
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAK_FLOPS.items():  # the most specific names come first
    if name in device_kind:
      return peaks.get(dtype)
  return None


def parse_compare(config, spec: str) -> tuple[str, list]:
  """"model.norm=a,b" -> ("model.norm", ["a", "b"]), values converted to the field's type."""
  field, sep, values = spec.partition("=")
  if not sep or not values:
    raise ConfigError(f"--compare={spec!r}: use FIELD=VALUE1,VALUE2, e.g. "
                         "model.norm=batch_norm,ghost_batch_norm")
  section = config
  *parents, leaf = field.split(".")
  try:
    for part in parents:
      section = section[part]
    current = section[leaf]
  except (KeyError, AttributeError):
    raise ConfigError(f"--compare: config has no field {field!r}") from None
  kind = type(current)
  convert = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
  try:
    return field, [convert(v) for v in values.split(",")]
  except ValueError:
    raise ConfigError(f"--compare: {values!r} are not all of type {kind.__name__}") from None


def _with_field(config, field: str, value):
  config = config.copy_and_resolve_references()
  section = config
  *parents, leaf = field.split(".")
  for part in parents:
    section = section[part]
  section[leaf] = value
  return config


def with_data(config, data: str, image_size: int):
  """The config with synthetic images in place of its dataset, if --data asks for it."""
  from jaxddp.data import DATASETS
  from jaxddp.registry import is_import_path
  name = config.dataset.name
  in_memory = (name in DATASETS and name != "image_folder") or is_import_path(name)
  if data == "config" or (data == "auto" and in_memory):
    return config
  config = config.copy_and_resolve_references()
  size = image_size or config.dataset.image_size or 224
  batch = config.train.batch_size * config.train.accumulation_steps
  config.dataset.name = "synthetic"
  config.dataset.synthetic_shape = (size, size, 3)
  config.dataset.synthetic_train_size = 2 * batch
  config.dataset.synthetic_test_size = batch
  return config


class StepTimer:
  """jaxddp's compiled training step, state and batch, ready to be timed."""

  def __init__(self, run):
    import jax
    self.run = run
    self.state = run.state
    self.batch = run.backend.put_batch(next(run.train_batches(0)))
    self._jax = jax

  def step(self) -> None:
    self.state, metrics = self.run.backend.train_step(self.state, self.batch)
    self._jax.block_until_ready((self.state, metrics))

  def timed(self, steps: int) -> list[float]:
    """Runs `steps` steps; the seconds each took."""
    seconds = []
    for _ in range(steps):
      start = time.perf_counter()
      self.step()
      seconds.append(time.perf_counter() - start)
    return seconds


class BareStep(StepTimer):
  """A hand-written jax.jit training step of the same model, optimizer and batch.

  Plain jax.jit over the global batch, split over the same devices: jit partitions
  it itself, and batch norm's statistics are those of the whole batch, as jaxddp's
  synchronised batch norm computes them.
  """

  def __init__(self, config, run):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    from jaxddp import models, optim
    config = config.copy_and_resolve_references()
    config.model.sync_batch_stats = False  # no named axis under plain jit
    config.sparsity.method = "none"
    model = models.create_model(config, run.dataset.num_classes)
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, run.recipe))
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(config.seed), jnp.zeros((1, *run.dataset.input_shape)), train=False)
    mesh = Mesh(np.asarray(run.devices), ("data",), axis_types=(AxisType.Auto,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = variables["params"]
    self.state = jax.device_put((params, variables.get("batch_stats", {}), tx.init(params)),
                                replicated)
    batch = next(run.train_batches(0))
    self.batch = jax.device_put((batch["x"], batch["y"]), split)

    # Dropout, if the model has any: one fixed key (the timing does not depend on it).
    rngs = {"dropout": jax.random.key(1), "params": jax.random.key(2)}

    def train_step(state, batch):
      params, batch_stats, opt_state = state
      x, y = batch

      def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"], rngs=rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    self._train_step = jax.jit(train_step, donate_argnums=0)
    self._jax = jax

  def step(self) -> None:
    self.state, loss = self._train_step(self.state, self.batch)
    self._jax.block_until_ready((self.state, loss))


def pipeline_images_per_second(run, batches: int) -> float:
  """This process's training batches, produced alone (no training), per second."""
  iterator = run.train_batches(0)
  for _ in range(3):  # start-up (tf.data fills its buffers)
    batch = next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  return batches * len(batch["y"]) / (time.perf_counter() - start)


def real_loop(config, steps: int) -> dict:
  """Runs jaxddp's training loop for `steps` steps; its last logging window's figures.

  Two windows: the first, ceil(steps / 2) steps, pays for compilation; the last is the
  other floor(steps / 2). (A period of steps // 2 would leave an odd count a last window
  of one step, timed alone.)"""
  from jaxddp import train
  config = config.copy_and_resolve_references()
  config.train.num_steps = steps
  config.train.log_every = (steps + 1) // 2
  config.train.eval_every = 0
  config.train.checkpoint_every = steps
  config.train.keep_checkpoints = 1
  with tempfile.TemporaryDirectory() as workdir:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
      last = train.train_and_evaluate(config, workdir).train_metrics
  return {"loop_images_per_second": last["train/examples_per_second"],
          "loop_data_wait_fraction": last["train/data_wait_fraction"]}


def memory_in_use_peak(devices) -> int | None:
  stats = [d.memory_stats() for d in devices if d.process_index == devices[0].process_index]
  if not stats or any(s is None or "peak_bytes_in_use" not in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats)


def benchmark(config, field: str | None, values: list, *, steps: int, rounds: int, warmup: int,
              bare: bool, pipeline_batches: int, loop_steps: int) -> list[dict]:
  from jaxddp import train
  variants = [(value, _with_field(config, field, value)) for value in values] if field else \
      [(None, config)]
  results, timers = [], []
  for value, variant in variants:
    start = time.perf_counter()
    run = train.setup(variant)  # exactly what jaxddp.main trains with
    timer = StepTimer(run)
    timer.timed(warmup)
    result = {"variant": value, "model": variant.model.name, "dtype": variant.model.dtype,
              "batch_size": run.recipe.effective_batch_size,
              "per_device_batch_size": run.recipe.per_device_batch_size,
              "devices": run.recipe.num_devices, "backend": run.backend.name,
              "device_kind": run.devices[0].device_kind,
              "input_shape": list(run.dataset.input_shape), "dataset": run.dataset.name,
              "peak_memory_bytes": memory_in_use_peak(run.devices)}
    compiled = run.backend.compiled_train_step(timer.state, timer.batch)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX: one dict per program
    result["flops_per_step_per_device"] = float(cost.get("flops", 0.0)) or None
    result["xla_peak_memory_bytes"] = getattr(compiled.memory_analysis(),
                                              "peak_memory_in_bytes", None)
    pair = [timer]
    if bare:
      bare_timer = BareStep(variant, run)
      bare_timer.timed(warmup)
      pair.append(bare_timer)
    print(f"{field or 'config'}={value}: compiled and warmed up in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    results.append(result)
    timers.append(pair)
  per_round = max(1, steps // rounds)
  seconds = [[[] for _ in pair] for pair in timers]
  for _ in range(rounds):
    for pair, times in zip(timers, seconds):
      for timer, timer_times in zip(pair, times):
        timer_times.extend(timer.timed(per_round))

  for (value, variant), result, pair, times in zip(variants, results, timers, seconds):
    median = statistics.median(times[0])
    result.update(median_step_seconds=median, timed_steps=len(times[0]),
                  examples_per_second=result["batch_size"] / median)
    if bare:
      bare_median = statistics.median(times[1])
      result.update(bare_median_step_seconds=bare_median,
                    bare_examples_per_second=result["batch_size"] / bare_median,
                    throughput_vs_bare=bare_median / median)
    flops = result["flops_per_step_per_device"]
    if flops:
      result["achieved_flops_per_second"] = flops * result["devices"] / median
      peak = peak_flops(result["device_kind"], result["dtype"])
      result["fraction_of_peak"] = flops / median / peak if peak else None
    run = pair[0].run
    if pipeline_batches:
      result["pipeline_images_per_second"] = pipeline_images_per_second(run, pipeline_batches)
    if loop_steps:
      result.update(real_loop(variant, loop_steps))
      if bare:
        result["loop_vs_bare"] = result["loop_images_per_second"] / \
            result["bare_examples_per_second"]
  for result in results:
    result["ratio_to_first"] = result["median_step_seconds"] / results[0]["median_step_seconds"]
  return results


def _si(value: float | None, unit: str) -> str:
  if value is None:
    return "n/a"
  for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= factor:
      return f"{value / factor:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


ROWS = [  # (label, key, format)
    ("training images/s", "examples_per_second", lambda v: f"{v:.1f}"),
    ("median step time", "median_step_seconds", lambda v: f"{v * 1e3:.2f} ms"),
    ("bare jax.jit step", "bare_median_step_seconds", lambda v: f"{v * 1e3:.2f} ms"),
    ("bare step images/s", "bare_examples_per_second", lambda v: f"{v:.1f}"),
    ("throughput vs bare step", "throughput_vs_bare", lambda v: f"{v:.3f}x"),
    ("real loop images/s", "loop_images_per_second", lambda v: f"{v:.1f}"),
    ("real loop vs bare step", "loop_vs_bare", lambda v: f"{v:.3f}x"),
    ("data-wait fraction (real loop)", "loop_data_wait_fraction", lambda v: f"{v:.2%}"),
    ("input pipeline images/s", "pipeline_images_per_second", lambda v: f"{v:.0f}"),
    ("XLA FLOPs per step, per device", "flops_per_step_per_device", lambda v: _si(v, "FLOP")),
    ("achieved FLOP/s, all devices", "achieved_flops_per_second", lambda v: _si(v, "FLOP/s")),
    ("fraction of device peak", "fraction_of_peak", lambda v: f"{v:.1%}"),
    ("peak device memory (allocator)", "peak_memory_bytes", lambda v: _si(v, "B")),
    ("peak memory (XLA estimate)", "xla_peak_memory_bytes", lambda v: _si(v, "B")),
]


def format_table(field: str | None, results: list[dict]) -> str:
  rows = list(ROWS)
  if field:
    rows.append(("step time vs first", "ratio_to_first", lambda v: f"{v:.3f}x"))
  header = [field or ""] + [str(r["variant"]) if field else "" for r in results]
  cells = [[label] + [fmt(r[key]) if r.get(key) is not None else "n/a" for r in results]
           for label, key, fmt in rows]
  widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
  lines = []
  for row in ([header] if field else []) + cells:
    lines.append("  ".join([row[0].ljust(widths[0])] +
                           [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]))
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  for flag in (_STEPS, _ROUNDS, _WARMUP):
    if flag.value < 1:
      raise ConfigError(f"--{flag.name} must be at least 1")
  if _LOOP_STEPS.value == 1:
    raise ConfigError("--loop_steps must be 0 (skip) or at least 2 (two logging windows)")
  if _JSON.value and not os.path.isdir(os.path.dirname(os.path.abspath(_JSON.value))):
    raise ConfigError(f"--json={_JSON.value}: its directory does not exist")
  from jaxddp import config as config_lib
  from jaxddp import parallel
  config = with_data(_CONFIG.value, _DATA.value, _IMAGE_SIZE.value)
  config_lib.validate(config)
  parallel.set_cpu_device_count(config.parallel.cpu_devices)  # before JAX starts
  field, values = parse_compare(config, _COMPARE.value) if _COMPARE.value else (None, [None])
  results = benchmark(config, field, values, steps=_STEPS.value, rounds=_ROUNDS.value,
                      warmup=_WARMUP.value, bare=_BARE.value,
                      pipeline_batches=_PIPELINE_BATCHES.value, loop_steps=_LOOP_STEPS.value)
  first = results[0]
  print(f"\n{first['model']} ({first['dtype']}) on {first['dataset']} "
        f"{'x'.join(map(str, first['input_shape']))}, global batch {first['batch_size']} "
        f"({first['per_device_batch_size']} per device on {first['devices']} "
        f"{first['device_kind']} device(s), {first['backend']}), median of "
        f"{first['timed_steps']} steps:")
  print(format_table(field, results))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"config": config.to_dict(), "field": field, "results": results}, f, indent=2,
                default=str)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  # One line and exit status 2 for a bad flag or config, as every jaxddp command line.
  from jaxddp.command_line import fail, parse_flags
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in sys.argv[1:]):
    app.run(main)  # absl prints the flags' help and exits
  parse_flags(sys.argv, "benchmark.py", required=())
  try:
    main([])
  except ConfigError as error:
    fail(str(error), 2, program="benchmark.py")
