"""The tf.data input pipeline (jaxddp/data/tfds_pipeline.py and preprocess.py).

Mock tfds data (tfds.testing.mock_data) covers ImageNet's and CIFAR-10's
preprocessing and shapes, but it ignores sub-splits, so per-process shards, resume
and seeds are checked on data that is really on disk: a folder of PNGs
(image_folder) and a tiny tfds dataset prepared in a temporary directory
(JaxddpTestShapes below, read through tfds.split_for_jax_process and TFRecords).

Their images carry their id: channel 0 is flat, id * 3, and crops, resizes and
flips of a flat channel stay flat, so un-normalising it gives the id back after any
preprocessing. Channels 1 and 2 vary over the image, so augmentation is visible.
"""

import json
import math
import os
from unittest import mock

import numpy as np
import pytest

import tensorflow as tf  # installed with the test extra: never skipped
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import test_utils as tfds_test_utils

from conftest import make_tiny_config
from jaxddp import train
from jaxddp.config import ConfigError
from jaxddp.data import load_dataset, preprocess

# Per-channel statistics of pixels on [0, 1] (written out, not read from the code).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# The image folder: 25 train / 11 test PNGs of several sizes, 3 classes whose sorted
# order is not their creation order.
FOLDER_CLASSES = ("zebra", "apple", "mango")  # label = index in sorted(FOLDER_CLASSES)
FOLDER_SIZES = ((20, 30), (30, 20), (24, 24), (17, 23))
FOLDER_TRAIN, FOLDER_TEST = 25, 11  # ids 0..24 and 25..35

# The tfds dataset: 8x8 images, 27 train / 13 test.
SHAPES_TRAIN, SHAPES_TEST = 27, 13  # ids 0..26 and 27..39


def _image(i, height, width):
  """uint8 (height, width, 3): channel 0 flat i * 3, channels 1 and 2 patterns."""
  assert i * 3 < 256
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([np.full((height, width), 3 * i), (rows * 11 + i) % 256,
                   (cols * 7 + 5 * i) % 256], axis=-1).astype(np.uint8)


def _folder_class(i):
  return FOLDER_CLASSES[i % 3]


def _folder_label(i):
  return sorted(FOLDER_CLASSES).index(_folder_class(i))


class JaxddpTestShapes(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset prepared locally, without download: image i has label i % 3."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(range(SHAPES_TRAIN)),
            "test": self._generate_examples(range(SHAPES_TRAIN, SHAPES_TRAIN + SHAPES_TEST))}

  def _generate_examples(self, ids):
    for i in ids:
      yield i, {"image": _image(i, 8, 8), "label": i % 3}


# --- Helpers. ---

def _config(**dataset):
  config = make_tiny_config()
  config.dataset.update(**dataset)
  return config


def _ids(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """The ids that channel 0 of preprocessed images encodes; checks it is still flat."""
  value = (x[..., 0] * std[0] + mean[0]) * 255  # (batch, H, W)
  ids = np.rint(value.mean(axis=(1, 2)) / 3).astype(int)
  error = np.abs(value - 3 * ids[:, None, None]).max(initial=0)
  assert error < 0.2, f"channel 0 is not a flat multiple of 3 (off by {error})"
  return ids


def _assert_normalised_range(x, mean, std):
  """Pixels in [0, 1] normalised per channel: each channel within its bounds, not flat."""
  for c in range(3):
    low, high = (0 - mean[c]) / std[c], (1 - mean[c]) / std[c]
    assert low - 1e-5 <= x[..., c].min() and x[..., c].max() <= high + 1e-5, c
  assert x.std() > 0.05


def _train_steps(dataset, steps, *, batch, seed=0, start_step=0, process_index=0,
                 process_count=1):
  it = dataset.train_batches(global_batch_size=batch, seed=seed, start_step=start_step,
                             process_index=process_index, process_count=process_count)
  return [next(it) for _ in range(steps)]


def _check_train_shards(dataset, num_examples, process_count, batch, label_of):
  """Over one epoch each process sees distinct examples, the processes disjoint ones,
  together process_count * (num_examples // process_count); the next epoch is the
  same examples again (the remainder is dropped); labels match the ids."""
  per_process, per_step = num_examples // process_count, batch // process_count
  assert per_process % per_step == 0, "pick sizes where one epoch is whole batches"
  steps = per_process // per_step
  shards = []
  for p in range(process_count):
    batches = _train_steps(dataset, 2 * steps, batch=batch, process_index=p,
                           process_count=process_count)
    for b in batches:
      assert b["x"].shape == (per_step, *dataset.input_shape) and b["x"].dtype == np.float32
      assert b["y"].shape == (per_step,) and b["y"].dtype == np.int32
      np.testing.assert_array_equal(b["y"], [label_of(i) for i in _ids(b["x"])])
    ids = np.concatenate([_ids(b["x"]) for b in batches[:steps]])
    assert len(set(ids)) == len(ids) == per_process, f"process {p} repeats examples"
    next_epoch = np.concatenate([_ids(b["x"]) for b in batches[steps:]])
    assert set(next_epoch) == set(ids), f"process {p}'s epochs hold different examples"
    shards.append(set(ids))
  union = set().union(*shards)
  assert len(union) == process_count * per_process, "processes share examples"
  assert union <= set(range(num_examples))


def _check_eval(dataset, first_id, num_examples, process_count, batch, label_of):
  """Every test example exactly once (mask 1) over the processes, padding masked and
  zero, the same number of batches on every process."""
  ids, lengths = [], []
  for p in range(process_count):
    batches = list(dataset.eval_batches(global_batch_size=batch, process_index=p,
                                        process_count=process_count))
    lengths.append(len(batches))
    for b in batches:
      assert b["x"].shape == (batch // process_count, *dataset.input_shape)
      assert b["mask"].dtype == np.float32 and b["y"].dtype == np.int32
      real = b["mask"] == 1
      assert np.all(real | (b["mask"] == 0))
      assert not np.any(b["x"][~real]) and not np.any(b["y"][~real])
      real_ids = _ids(b["x"][real])
      np.testing.assert_array_equal(b["y"][real], [label_of(i) for i in real_ids])
      ids.extend(real_ids)
  assert len(set(lengths)) == 1, f"batches per process: {lengths}"
  assert lengths[0] == math.ceil(num_examples / batch)
  assert sorted(ids) == list(range(first_id, first_id + num_examples))


# --- Data on disk, prepared once per module. ---

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("image_folder")
  for split, ids in (("train", range(FOLDER_TRAIN)),
                     ("test", range(FOLDER_TRAIN, FOLDER_TRAIN + FOLDER_TEST))):
    for name in FOLDER_CLASSES:
      (root / split / name).mkdir(parents=True)
    for i in ids:
      Image.fromarray(_image(i, *FOLDER_SIZES[i % 4])).save(
          root / split / _folder_class(i) / f"{i:03d}.png")
  return root


@pytest.fixture(scope="module")
def folder_dataset(folder):
  return load_dataset(_config(name="image_folder", data_dir=str(folder), image_size=16))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  JaxddpTestShapes(data_dir=str(data_dir)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


@pytest.fixture(scope="module")
def shapes(shapes_dir):
  """The tfds dataset with Inception preprocessing at its own size: augmented."""
  return load_dataset(_config(name="jaxddp_test_shapes", data_dir=str(shapes_dir),
                              preprocess="inception", image_size=8))


# --- 1 and 2. ImageNet and CIFAR-10 (mock data). ---

def test_imagenet_batches(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    dataset = load_dataset(_config(name="imagenet2012", data_dir=str(tmp_path),
                                   eval_split="validation"))
    train_batch = _train_steps(dataset, 1, batch=4)[0]
    eval_batches = list(dataset.eval_batches(global_batch_size=8))
  assert dataset.input_shape == (224, 224, 3) and dataset.num_classes == 1000
  x, y = train_batch["x"], train_batch["y"]
  assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32
  assert y.shape == (4,) and y.dtype == np.int32 and np.all((0 <= y) & (y < 1000))
  _assert_normalised_range(x, IMAGENET_MEAN, IMAGENET_STD)

  assert dataset.num_test_examples == 20 and len(eval_batches) == 3  # 8 + 8 + 4 and 4 padding
  masks = np.concatenate([b["mask"] for b in eval_batches])
  assert masks.dtype == np.float32 and masks.sum() == 20 and set(masks) == {0.0, 1.0}
  for b in eval_batches:
    assert b["x"].shape == (8, 224, 224, 3) and b["x"].dtype == np.float32
    assert b["y"].dtype == np.int32
    real = b["mask"] == 1
    assert not np.any(b["x"][~real]) and not np.any(b["y"][~real])
    _assert_normalised_range(b["x"][real], IMAGENET_MEAN, IMAGENET_STD)


def test_cifar10_batches(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    dataset = load_dataset(_config(name="cifar10", data_dir=str(tmp_path)))
    train_batch = _train_steps(dataset, 1, batch=8)[0]
    eval_batch = next(dataset.eval_batches(global_batch_size=32))
  assert dataset.input_shape == (32, 32, 3) and dataset.preprocessing == "cifar"
  assert train_batch["x"].shape == (8, 32, 32, 3) and train_batch["x"].dtype == np.float32
  assert train_batch["y"].dtype == np.int32 and np.all((0 <= train_batch["y"]) &
                                                       (train_batch["y"] < 10))
  _assert_normalised_range(train_batch["x"], CIFAR_MEAN, CIFAR_STD)
  # No resizing: un-normalised, the pixels are whole grey levels again, and random mock
  # pixels (and the zero padding) reach both ends of 0..255 in every channel.
  pixels = (train_batch["x"] * CIFAR_STD + CIFAR_MEAN).reshape(-1, 3) * 255
  np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-3)
  np.testing.assert_allclose(pixels.min(0), 0, atol=1e-3)
  assert np.all((pixels.max(0) > 250) & (pixels.max(0) < 255 + 1e-3)), pixels.max(0)
  assert eval_batch["x"].shape == (32, 32, 32, 3) and eval_batch["mask"].sum() == 20
  _assert_normalised_range(eval_batch["x"][:20], CIFAR_MEAN, CIFAR_STD)


def _png(image):
  return tf.io.encode_png(tf.constant(image))


def test_cifar_train_is_a_shifted_and_maybe_flipped_image():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zeros
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  candidates = {(dy, dx, flip): padded[4 + dy:36 + dy, 4 + dx:36 + dx][:, ::-1 if flip else 1]
                for dy in range(-4, 5) for dx in range(-4, 5) for flip in (False, True)}
  seen = set()
  for seed in range(12):
    out = preprocess.cifar_train(_png(image), tf.constant([seed, 7], tf.int64), 3).numpy()
    assert out.shape == (32, 32, 3)
    matches = [k for k, candidate in candidates.items() if np.array_equal(out, candidate)]
    assert len(matches) == 1, f"seed {seed}: not a shifted (and flipped) copy of the image"
    seen.add(matches[0])
  assert len({(dy, dx) for dy, dx, _ in seen}) > 1, "every seed gave the same offset"
  assert {flip for _, _, flip in seen} == {False, True}


def test_inception_eval_resizes_the_short_side_and_crops_the_centre():
  image = _image(40, 300, 400)
  out = preprocess.inception_eval(_png(image), 224, 3).numpy()
  assert out.shape == (224, 224, 3)
  # Short side 300 -> 256, long side 400 -> ceil(400 * 256 / 300) = 342; central 224.
  resized = tf.image.resize(image, (256, 342), method="bilinear").numpy()
  np.testing.assert_allclose(out, resized[16:240, 59:283], atol=1e-3)
  np.testing.assert_allclose(out[..., 0], 120.0, atol=1e-3)  # the flat channel stays flat


@pytest.mark.parametrize("encode", [tf.io.encode_jpeg, tf.io.encode_png], ids=["jpeg", "png"])
def test_inception_train_shape(encode):
  encoded = encode(tf.constant(_image(10, 40, 60)))
  assert bool(tf.io.is_jpeg(encoded)) == (encode is tf.io.encode_jpeg)
  outputs = [preprocess.inception_train(encoded, tf.constant([s, 0], tf.int64), 24, 3).numpy()
             for s in range(3)]
  for out in outputs:
    assert out.shape == (24, 24, 3)
    assert 0 <= out.min() and out.max() <= 255
  assert not np.array_equal(outputs[0], outputs[1]) or not np.array_equal(outputs[1], outputs[2])


# --- 3. Image folder. ---

def test_image_folder_batches(folder_dataset):
  dataset = folder_dataset
  assert dataset.input_shape == (16, 16, 3) and dataset.num_classes == 3
  assert (dataset.num_train_examples, dataset.num_test_examples) == (FOLDER_TRAIN, FOLDER_TEST)
  (batch,) = _train_steps(dataset, 1, batch=8)
  assert batch["x"].shape == (8, 16, 16, 3) and batch["x"].dtype == np.float32
  assert batch["y"].dtype == np.int32
  _assert_normalised_range(batch["x"], IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_array_equal(batch["y"], [_folder_label(i) for i in _ids(batch["x"])])


@pytest.mark.parametrize("process_count", [2, 3])
def test_image_folder_shards(folder_dataset, process_count):
  batch = 2 * process_count  # one epoch: 6 steps of 2 per process (P=2), 4 (P=3)
  _check_train_shards(folder_dataset, FOLDER_TRAIN, process_count, batch, _folder_label)
  _check_eval(folder_dataset, FOLDER_TRAIN, FOLDER_TEST, process_count, 2 * process_count,
              _folder_label)


# --- 4. A tfds dataset prepared on disk: shards, resume, seeds, cache. ---

@pytest.mark.parametrize("process_count", [2, 3])
def test_tfds_shards(shapes, process_count):
  assert (shapes.num_train_examples, shapes.num_test_examples) == (SHAPES_TRAIN, SHAPES_TEST)
  batch = {2: 2, 3: 9}[process_count]  # one epoch: 13 steps of 1 (P=2), 3 steps of 3 (P=3)
  _check_train_shards(shapes, SHAPES_TRAIN, process_count, batch, lambda i: i % 3)
  _check_eval(shapes, SHAPES_TRAIN, SHAPES_TEST, process_count, 2 * process_count,
              lambda i: i % 3)


def test_tfds_resume_is_exact(shapes):
  """Batches of 4 of 27 examples: step 6 spans epochs 0 and 1, step 8 is in epoch 1."""
  for process_index, process_count in ((0, 1), (1, 2)):
    reference = _train_steps(shapes, 11, batch=4 * process_count, process_index=process_index,
                             process_count=process_count)
    for k in (1, 6, 8):
      resumed = _train_steps(shapes, 3, batch=4 * process_count, start_step=k,
                             process_index=process_index, process_count=process_count)
      for offset, b in enumerate(resumed):
        np.testing.assert_array_equal(b["x"], reference[k + offset]["x"], err_msg=f"step {k}")
        np.testing.assert_array_equal(b["y"], reference[k + offset]["y"])


def test_tfds_order_depends_on_seed_and_epoch(shapes):
  a = _train_steps(shapes, 6, batch=9, seed=0)  # two epochs of 3 steps
  b = _train_steps(shapes, 6, batch=9, seed=0)
  c = _train_steps(shapes, 6, batch=9, seed=1)
  for one, two in zip(a, b):
    np.testing.assert_array_equal(one["x"], two["x"])
  order = lambda batches: np.concatenate([_ids(x["x"]) for x in batches])
  epoch0, epoch1 = order(a[:3]), order(a[3:])
  assert sorted(epoch0) == sorted(epoch1) == list(range(SHAPES_TRAIN))
  assert not np.array_equal(epoch0, epoch1), "epoch 1 repeats epoch 0's order"
  assert not np.array_equal(order(c), order(a)), "seed 1 gave seed 0's order"
  # The augmentation differs from epoch to epoch for the same example.
  x0 = np.concatenate([x["x"] for x in a[:3]])[np.argsort(epoch0)]
  x1 = np.concatenate([x["x"] for x in a[3:]])[np.argsort(epoch1)]
  assert not np.array_equal(x0, x1)


def test_tfds_cache_gives_the_same_batches(shapes_dir):
  """preprocess=auto: fixed-size images stay as they are; cache=True changes nothing."""
  plain, cached = (load_dataset(_config(name="jaxddp_test_shapes", data_dir=str(shapes_dir),
                                        cache=cache)) for cache in (False, True))
  assert plain.preprocessing == "none" and plain.input_shape == (8, 8, 3)
  for one, two in zip(_train_steps(plain, 8, batch=4), _train_steps(cached, 8, batch=4)):
    np.testing.assert_array_equal(one["x"], two["x"])
    np.testing.assert_array_equal(one["y"], two["y"])
  (batch,) = _train_steps(cached, 1, batch=4)
  x = np.stack([_image(i, 8, 8) for i in _ids(batch["x"])]) / 255.0
  np.testing.assert_allclose(batch["x"], (x - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)
  for one, two in zip(plain.eval_batches(global_batch_size=8),
                      cached.eval_batches(global_batch_size=8)):
    np.testing.assert_array_equal(one["x"], two["x"])


# --- 5. One training step on each pipeline. ---

def _train_one_step(workdir, **dataset):
  config = make_tiny_config()
  config.dataset.update(**dataset)
  config.model.update(name="cnn", width=4)
  config.train.update(batch_size=16, num_steps=1)
  result = train.train_and_evaluate(config, str(workdir))
  assert math.isfinite(result.eval_metrics["loss"])
  assert 0 <= result.eval_metrics["accuracy"] <= 1
  with open(workdir / "metrics.jsonl") as f:
    waits = [r["train/data_wait_fraction"] for r in map(json.loads, f)
             if "train/data_wait_fraction" in r]
  assert waits and all(0 <= w <= 1 for w in waits), waits


class _RealFs:
  """Stands in for tfds's MockFs inside mock_data. MockFs redirects the file system of
  every thread into a temporary directory while builder.as_dataset runs, only so that
  the builder's data_dir seems to exist; when evaluation starts the pipeline while
  orbax still writes the last checkpoint in the background, the checkpoint lands
  there and fails. This creates the directory for real instead."""

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    return False

  def add_file(self, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_training_step_on_mock_data(tmp_path, name):
  extra = {"eval_split": "validation", "image_size": 32} if name == "imagenet2012" else {}
  with mock.patch.object(tfds_test_utils, "MockFs", _RealFs), \
      tfds.testing.mock_data(num_examples=16):  # one step per epoch, one eval batch
    _train_one_step(tmp_path / "run", name=name, data_dir=str(tmp_path / "tfds"), **extra)


def test_training_step_on_image_folder(tmp_path, folder):
  _train_one_step(tmp_path / "run", name="image_folder", data_dir=str(folder), image_size=16)


# --- 6. Errors: one-line ConfigErrors. ---

def _load_error(config):
  with pytest.raises(ConfigError) as error:
    load_dataset(config)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_tfds_data_says_where_and_how(tmp_path):
  message = _load_error(_config(name="cifar10", data_dir=str(tmp_path)))
  assert str(tmp_path) in message
  assert "tfds build cifar10" in message and "--config.dataset.data_dir" in message


def test_image_folder_errors(tmp_path):
  from PIL import Image
  assert "--config.dataset.data_dir" in _load_error(_config(name="image_folder"))
  (tmp_path / "train" / "cat").mkdir(parents=True)
  Image.fromarray(_image(1, 8, 8)).save(tmp_path / "train" / "cat" / "1.png")
  message = _load_error(_config(name="image_folder", data_dir=str(tmp_path)))
  assert "no test/ folder" in message and "found: train" in message


def test_unknown_dataset_name():
  message = _load_error(_config(name="no_such_dataset_jaxddp"))
  assert "'no_such_dataset_jaxddp' is not valid" in message and "image_folder" in message


def test_preprocess_none_refuses_variable_size_images(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    message = _load_error(_config(name="imagenet2012", data_dir=str(tmp_path), preprocess="none"))
  assert "preprocess='none' needs images of one size" in message
  assert "preprocess=inception" in message


# --- Example indices (data pruning keys its scores and tables by them). ---

def _index_to_id(dataset, num_examples, batch, process_count=1):
  """{index: image id} from dataset.eval_batches(split="train"), which must give every
  index in [0, num_examples) exactly once over the processes."""
  mapping = {}
  for p in range(process_count):
    for b in dataset.eval_batches(global_batch_size=batch, process_index=p,
                                  process_count=process_count, split="train"):
      real = b["mask"] == 1
      assert b["index"].dtype == np.int32 and not np.any(b["index"][~real])
      for index, image_id in zip(b["index"][real], _ids(b["x"][real])):
        assert index not in mapping
        mapping[int(index)] = int(image_id)
  assert sorted(mapping) == list(range(num_examples))
  assert sorted(mapping.values()) == list(range(num_examples))  # ids 0..N-1 are the train set
  return mapping


@pytest.mark.parametrize("which", ["folder", "tfds"])
def test_every_training_example_has_a_stable_index(which, folder_dataset, shapes):
  dataset, n, label_of = ((folder_dataset, FOLDER_TRAIN, _folder_label) if which == "folder"
                          else (shapes, SHAPES_TRAIN, lambda i: i % 3))
  mapping = _index_to_id(dataset, n, batch=4)
  assert _index_to_id(dataset, n, batch=6, process_count=2) == mapping  # any sharding
  np.testing.assert_array_equal(dataset.train_labels(),
                                [label_of(mapping[i]) for i in range(n)])
  # Training batches carry the same index for the same image, on every process.
  for p in range(2):
    for b in _train_steps(dataset, 4, batch=6, process_index=p, process_count=2):
      np.testing.assert_array_equal([mapping[int(i)] for i in b["index"]], _ids(b["x"]))
  # Trained on a subset, each process draws from the kept examples of its shard only.
  kept = np.array([1, 2, 3, 5, 8, 13, 21])
  seen = set()
  for p in range(2):
    it = dataset.train_batches(global_batch_size=4, seed=0, start_step=0, process_index=p,
                               process_count=2, examples=kept)
    for b in (next(it) for _ in range(6)):  # several passes over the shard's kept examples
      np.testing.assert_array_equal([mapping[int(i)] for i in b["index"]], _ids(b["x"]))
      seen.update(int(i) for i in b["index"])
  assert seen == set(kept)
