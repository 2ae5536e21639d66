"""Batches (order, per-process shards, eval padding) and exact evaluation, in-process."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxddp import config as config_lib
from jaxddp import data, models, optim, parallel, train
from jaxddp.data import ArrayDataset, TrainBatches, eval_batches
from jaxddp.data.batches import epoch_order
from jaxddp.state import create_train_state

N = 100          # examples; 100 // 16 = 6 steps per epoch, 4 examples dropped per epoch
BATCH = 16


def _toy(n=N, length=5):
  """x[i] holds i + position / 10 (so shifts are visible), y[i] = i (the example's id)."""
  x = (np.arange(n)[:, None] + np.arange(length)[None, :] / 10).astype(np.float32)[..., None]
  return x, np.arange(n, dtype=np.int32)


# --- TrainBatches: a pure function of (seed, step). ---

@pytest.mark.parametrize("max_shift", [0, 2])
def test_train_batches_pure_function_of_seed_and_step(max_shift):
  x, y = _toy()
  a = TrainBatches(x, y, global_batch_size=BATCH, seed=3, max_shift=max_shift)
  b = TrainBatches(x, y, global_batch_size=BATCH, seed=3, max_shift=max_shift)
  steps = [0, 5, 6, 13, 1, 6, 0, 40]  # out of order, across epochs, repeated
  for step in steps:
    batch_a, batch_b = a(step), b(step)
    np.testing.assert_array_equal(batch_a["x"], batch_b["x"])
    np.testing.assert_array_equal(batch_a["y"], batch_b["y"])
    assert batch_a["x"].shape == (BATCH, 5, 1) and batch_a["y"].shape == (BATCH,)
  # A fresh instance asked for one step only agrees with the one that walked around.
  for step in steps:
    fresh = TrainBatches(x, y, global_batch_size=BATCH, seed=3, max_shift=max_shift)(step)
    np.testing.assert_array_equal(fresh["x"], a(step)["x"])
    np.testing.assert_array_equal(fresh["y"], a(step)["y"])
  if max_shift:
    # The augmentation really shifts something (else this parametrisation tests nothing).
    unshifted = x[a(0)["y"]]
    assert not np.array_equal(a(0)["x"], unshifted)
    np.testing.assert_array_equal(np.sort(a(0)["x"], axis=1), np.sort(unshifted, axis=1))


def test_train_batches_differ_between_seeds():
  x, y = _toy()
  a = TrainBatches(x, y, global_batch_size=BATCH, seed=0)
  b = TrainBatches(x, y, global_batch_size=BATCH, seed=1)
  assert not np.array_equal(a(0)["y"], b(0)["y"])
  assert not np.array_equal(np.concatenate([a(s)["y"] for s in range(6)]),
                            np.concatenate([b(s)["y"] for s in range(6)]))


def test_train_batches_epochs():
  x, y = _toy()
  batches = TrainBatches(x, y, global_batch_size=BATCH, seed=7)
  spe = batches.steps_per_epoch
  assert spe == N // BATCH == 6
  epochs = []
  for epoch in range(3):
    ids = np.concatenate([batches(epoch * spe + s)["y"] for s in range(spe)])
    assert len(ids) == spe * BATCH
    assert len(np.unique(ids)) == len(ids), f"epoch {epoch} repeats an example"
    # The epoch is the first spe * BATCH positions of its shuffled order.
    np.testing.assert_array_equal(ids, epoch_order(7, epoch, N)[:spe * BATCH])
    np.testing.assert_array_equal(x[ids], np.concatenate(
        [batches(epoch * spe + s)["x"] for s in range(spe)]))
    epochs.append(ids)
  for s in range(spe):  # every step of a new epoch draws a new batch
    assert not np.array_equal(batches(s)["y"], batches(s + spe)["y"])
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


# --- Per-process shards. ---

@pytest.mark.parametrize("max_shift", [0, 2])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_train_batches_process_shards(process_count, max_shift):
  x, y = _toy()
  whole = TrainBatches(x, y, global_batch_size=BATCH, seed=5, max_shift=max_shift)
  shards = [TrainBatches(x, y, global_batch_size=BATCH, seed=5, process_index=p,
                         process_count=process_count, max_shift=max_shift)
            for p in range(process_count)]
  for step in [0, 3, 6, 17]:
    parts = [shard(step) for shard in shards]
    for part in parts:
      assert part["y"].shape == (BATCH // process_count,)
    ids = [set(part["y"].tolist()) for part in parts]
    for i in range(process_count):
      for j in range(i + 1, process_count):
        assert not ids[i] & ids[j], f"processes {i} and {j} share examples at step {step}"
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), whole(step)["y"])
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), whole(step)["x"])


def _all_eval_batches(x, y, global_batch_size, process_count):
  return [list(eval_batches(x, y, global_batch_size=global_batch_size, process_index=p,
                            process_count=process_count))
          for p in range(process_count)]


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_process_shards(process_count):
  x, y = _toy(n=37)
  (whole,) = _all_eval_batches(x, y, BATCH, 1)
  per_process = _all_eval_batches(x, y, BATCH, process_count)
  assert len(whole) == 3  # ceil(37 / 16)
  assert all(len(batches) == len(whole) for batches in per_process)
  for b, global_batch in enumerate(whole):
    parts = [batches[b] for batches in per_process]
    for key in ("x", "y", "mask"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key])
    real = [set(p["y"][p["mask"] == 1].tolist()) for p in parts]
    for i in range(process_count):
      for j in range(i + 1, process_count):
        assert not real[i] & real[j]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_every_example_once_with_padding(process_count):
  x, y = _toy(n=37)
  y = y + 1  # ids 1..37, so a padded row (y = 0) cannot pass for an example
  per_process = _all_eval_batches(x, y, BATCH, process_count)
  assert {len(batches) for batches in per_process} == {3}
  seen, padded = [], 0
  for batches in per_process:
    for batch in batches:
      assert batch["x"].shape == (BATCH // process_count, 5, 1)
      assert batch["x"].dtype == x.dtype and batch["y"].dtype == y.dtype
      assert batch["mask"].dtype == np.float32
      assert set(np.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
      real = batch["mask"] == 1
      seen.extend(batch["y"][real].tolist())
      np.testing.assert_array_equal(batch["x"][real], x[batch["y"][real] - 1])
      padded += int((~real).sum())
      assert np.all(batch["x"][~real] == 0) and np.all(batch["y"][~real] == 0)
  assert sorted(seen) == list(range(1, 38)), "every example exactly once with mask 1"
  assert padded == 3 * BATCH - 37


# --- Evaluation: exact per-example averages whatever the padding. ---

NUM_EVAL = 1000 - 3     # not a multiple of the eval batch
EVAL_BATCH = 64


@pytest.fixture(scope="module")
def mnist1d():
  return data.embedded.mnist1d()


@pytest.fixture(scope="module")
def eval_setup(mnist1d):
  """Config, a non-trivial host state and the reference metrics, shared by both backends."""
  from configs import mnist1d as mnist1d_config
  config = mnist1d_config.get_config()
  config.model.width = 8
  config.train.batch_size = 64
  config.train.eval_batch_size = EVAL_BATCH
  config.train.num_steps = 10
  config_lib.validate(config)
  test_x, test_y = mnist1d.test_x[:NUM_EVAL], mnist1d.test_y[:NUM_EVAL]
  recipe = config_lib.resolve(config, num_train_examples=len(mnist1d.train_x),
                              num_test_examples=NUM_EVAL, num_devices=8)
  assert recipe.eval_global_batch_size == EVAL_BATCH and NUM_EVAL % EVAL_BATCH
  model = models.create_model(config, mnist1d.num_classes)
  schedule = optim.learning_rate_schedule(config, recipe)
  tx = optim.create_optimizer(config, schedule)
  state = create_train_state(model, tx, mnist1d.input_shape, config.seed)
  # Move away from the initialisation (running mean 0, variance 1) so that the
  # batch-norm statistics matter and the predictions vary between examples.
  # (NumPy noise: jax.random would compile once per leaf shape, ~8 s.)
  rng = np.random.default_rng(1)
  noisy = lambda p: np.asarray(p) + 0.5 * rng.standard_normal(np.shape(p)).astype(np.float32)
  stats = jax.tree.map(lambda s: np.abs(noisy(s)), state.batch_stats)
  state = state.replace(params=jax.tree.map(noisy, state.params), batch_stats=stats)

  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          jnp.asarray(test_x), train=False)
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  losses = -log_probs[np.arange(NUM_EVAL), test_y]
  correct = logits.argmax(-1) == test_y
  assert losses.std() > 0.1 and 0 < correct.mean() < 1, "a degenerate model tests nothing"
  reference = {"loss": losses.mean(), "accuracy": correct.mean()}
  return config, recipe, schedule, state, test_x, test_y, reference


@pytest.mark.parametrize("backend_name", ["shard_map", "pmap"])
def test_eval_metrics_are_exact_per_example_averages(eval_setup, backend_name):
  config, recipe, schedule, host_state, test_x, test_y, reference = eval_setup
  config = config.copy_and_resolve_references()
  config.parallel.backend = backend_name
  devices = jax.devices()[:8]
  assert len(devices) == 8
  backend = parallel.create_backend(config, devices, schedule)
  assert backend.name == backend_name
  state = backend.put_state(host_state)

  dataset = ArrayDataset(test_x, test_y, test_x, test_y, num_classes=10, name="eval")
  averages = train.evaluate(backend, state, dataset, recipe)

  assert averages["loss"] == pytest.approx(reference["loss"], rel=1e-5)
  assert averages["accuracy"] == pytest.approx(reference["accuracy"], rel=1e-5)
  # Had the padded rows counted, the loss would be off by far more than the tolerance.
  assert NUM_EVAL % recipe.eval_global_batch_size != 0


# --- Copies to the devices: in order, several small batches per transfer. ---

def test_prefetch_to_device_keeps_order_and_groups_small_batches():
  batches = [{"x": np.full((4, 2), i, np.float32), "y": np.full((4,), i, np.int32)}
             for i in range(20)]  # 48 bytes each
  transfers = []

  def put_many(chunk):
    transfers.append([int(b["y"][0]) for b in chunk])
    return [{k: v + 100 for k, v in b.items()} for b in chunk]

  out = list(data.prefetch_to_device(iter(batches), put_many, max_batches=8))
  assert [int(b["y"][0]) for b in out] == [i + 100 for i in range(20)]
  assert transfers == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]

  transfers.clear()  # a byte budget of two batches: two per transfer
  out = list(data.prefetch_to_device(iter(batches), put_many, max_batches=8, max_bytes=96))
  assert transfers == [[i, i + 1] for i in range(0, 20, 2)]
  np.testing.assert_array_equal(np.stack([b["x"] for b in out]),
                                np.stack([b["x"] + 100 for b in batches]))


def test_prefetch_to_device_reads_only_what_it_yields_and_a_chunk_ahead():
  """An endless stream: taking 3 batches reads at most one transfer's worth."""
  read = []

  def endless():
    i = 0
    while True:
      read.append(i)
      yield {"y": np.array([i])}
      i += 1

  stream = data.prefetch_to_device(endless(), lambda chunk: chunk, max_batches=4)
  assert [int(next(stream)["y"][0]) for _ in range(3)] == [0, 1, 2]
  assert read == [0, 1, 2, 3]


def test_npz_evaluation_is_exact_per_example_averages(eval_setup, tmp_path):
  """The same test set written to an .npz file (dataset.name=npz) evaluates the same."""
  config, recipe, schedule, host_state, test_x, test_y, reference = eval_setup
  path = tmp_path / "data.npz"
  np.savez(path, x_train=test_x, y_train=test_y, x_test=test_x, y_test=test_y.astype(np.int64))
  config = config.copy_and_resolve_references()
  config.dataset.name = "npz"
  config.dataset.path = str(path)
  dataset = data.load_dataset(config)
  assert dataset.num_test_examples == NUM_EVAL and dataset.test_y.dtype == np.int32
  backend = parallel.create_backend(config, jax.devices()[:8], schedule)
  averages = train.evaluate(backend, backend.put_state(host_state), dataset, recipe)
  assert averages["loss"] == pytest.approx(reference["loss"], rel=1e-5)
  assert averages["accuracy"] == pytest.approx(reference["accuracy"], rel=1e-5)
