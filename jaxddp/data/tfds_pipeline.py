"""tfds datasets and image folders through tf.data (the only module that imports TensorFlow).

TensorFlow is kept off the GPUs (they belong to JAX) and never downloads: a
dataset that is not prepared under config.dataset.data_dir is a ConfigError that
says where tfds looked and what to do.

Training: each process reads its own shard of the split (tfds.split_for_jax_process;
the remainder is dropped so that every process has as many examples). Its
examples flow as one endless stream of epochs; epoch e is the shard in an order
shuffled by (seed, e) through a buffer of config.dataset.shuffle_buffer examples,
and each example is augmented with a seed of (seed, e, its position in the epoch).
Batches take consecutive examples of the stream, so the batch of step s is a
function of (seed, s): a resumed run skips the s x batch examples before it
(reading, not decoding them) and goes on exactly as an uninterrupted run. The
order does depend on the number of processes, which shard the data differently.

Evaluation: every example of the split exactly once, in order, over all processes;
each pads its shard with masked zero examples to the same number of batches.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import ml_collections
import numpy as np

from jaxddp.errors import ConfigError

# TensorFlow's start-up messages. TF 2.21 logs "oneDNN custom operations are on" (and
# absl's "All log messages before absl::InitializeLog()") whatever the log level,
# unless oneDNN is off; it only changes TensorFlow's own CPU kernels (JAX is apart).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf  # noqa: E402

try:
  tf.config.set_visible_devices([], "GPU")  # TensorFlow never takes GPU memory
except RuntimeError:  # TensorFlow was already used in this process; it keeps its devices
  pass
import tensorflow_datasets as tfds  # noqa: E402

from jaxddp.data import preprocess  # noqa: E402
from jaxddp.data.batches import Batch  # noqa: E402

_SKIP_DECODING = tfds.decode.SkipDecoding()
_MAX_EPOCHS = 2**40
_EPOCH_BITS = 20  # the shuffle seed of an epoch is seed * 2**20 + epoch


def load(config: ml_collections.ConfigDict, unknown: ConfigError) -> TfdsDataset:
  """The dataset config.dataset names: image_folder or a tfds name; errors are ConfigErrors
  (`unknown` for a name tfds does not know either)."""
  c = config.dataset
  builder = _builder(c.name, c.data_dir, unknown)
  splits = tuple(builder.info.splits.keys())
  eval_split = c.eval_split or _default_eval_split(c.name, splits)
  for split in (c.train_split, eval_split):
    _check_prepared(builder, c.name, split, splits)
  return TfdsDataset(builder, c.name, train_split=c.train_split, eval_split=eval_split,
                     preprocessing=c.preprocess, image_size=c.image_size,
                     shuffle_buffer=c.shuffle_buffer, cache=c.cache)


def _default_eval_split(name: str, splits: tuple[str, ...]) -> str:
  """validation for ImageNet (its test split has no labels), else test if there is one."""
  if name == "imagenet2012" or ("test" not in splits and "validation" in splits):
    return "validation"
  return "test"


def _builder(name: str, data_dir: str, unknown: ConfigError):
  if name == "image_folder":
    if not data_dir:
      raise ConfigError("config.dataset.name='image_folder' needs --config.dataset.data_dir=DIR: "
                        "a folder with one sub-folder per split (train/, test/), each with one "
                        "sub-folder of images per class")
    if not os.path.isdir(data_dir):
      raise ConfigError(f"config.dataset.data_dir={data_dir!r} is not a directory")
    return tfds.ImageFolder(data_dir)
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise unknown from None


def _check_prepared(builder, name: str, split: str, splits: tuple[str, ...]) -> None:
  """A one-line ConfigError unless `split` can be read (tfds never downloads here)."""
  if name == "image_folder":
    if split not in splits:
      raise ConfigError(
          f"config.dataset.data_dir={builder.data_dir!r} has no {split}/ folder of class "
          f"folders (found: {', '.join(splits) or 'none'}); see config.dataset.train_split "
          "and eval_split")
    return
  try:
    builder.as_dataset(split=split, decoders=_decoders(builder))
  except AssertionError:  # tfds: "could not find data in <data_dir>"
    raise ConfigError(_missing_message(builder, name)) from None
  except ValueError as e:  # an unknown split
    raise ConfigError(f"config.dataset: {name!r} has no split {split!r} ({e}); available: "
                      f"{', '.join(splits)}") from None


def _missing_message(builder, name: str) -> str:
  looked = builder.data_dir
  if name == "imagenet2012":
    fetch = ("it needs a manual download: put ILSVRC2012_img_train.tar and "
             "ILSVRC2012_img_val.tar (from https://image-net.org) in DIR/downloads/manual and "
             "run `tfds build imagenet2012 --data_dir=DIR`")
  elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    fetch = (f"it needs a manual download (see `tfds build {name}`'s instructions) and "
             f"`tfds build {name} --manual_dir=... --data_dir=DIR`")
  else:
    fetch = (f"prepare it with `tfds build {name} --data_dir=DIR` on a machine with internet "
             "and copy DIR here")
  return (f"config.dataset.name={name!r}: no prepared data in {looked}; {fetch}, then set "
          "--config.dataset.data_dir=DIR (jaxddp never downloads)")


def _decoders(builder) -> dict:
  image_key, _ = _keys(builder)
  return {image_key: _SKIP_DECODING}


def _keys(builder) -> tuple[str, str]:
  """The (image, label) feature names."""
  keys = builder.info.supervised_keys
  return tuple(keys) if keys and len(keys) == 2 else ("image", "label")


def _cardinality(ds: tf.data.Dataset) -> int:
  n = int(ds.cardinality())
  if n < 0:  # unknown: count
    n = int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
  return n


class TfdsDataset:
  """A tfds dataset or image folder, preprocessed for training and evaluation."""

  def __init__(self, builder, name: str, *, train_split: str, eval_split: str,
               preprocessing: str, image_size: int, shuffle_buffer: int, cache: bool):
    self.builder, self.name = builder, name
    self.train_split, self.eval_split = train_split, eval_split
    self.shuffle_buffer, self.cache = shuffle_buffer, cache
    self.is_folder = isinstance(builder, tfds.ImageFolder)
    self.image_key, self.label_key = _keys(builder)
    image = builder.info.features[self.image_key]
    self.num_classes = builder.info.features[self.label_key].num_classes
    self.channels = image.shape[-1] or 3
    native = tuple(image.shape[:2])
    if preprocessing == "auto":
      preprocessing = ("cifar" if name in ("cifar10", "cifar100") else
                       "none" if None not in native and not self.is_folder else "inception")
    self.preprocessing = preprocessing
    if preprocessing == "inception":
      self.image_size = image_size or 224
    else:
      if None in native:
        raise ConfigError(f"config.dataset.preprocess={preprocessing!r} needs images of one "
                          f"size, but {name!r} has images of shape {image.shape}; use "
                          "preprocess=inception and config.dataset.image_size")
      if image_size and (image_size, image_size) != native:
        raise ConfigError(f"config.dataset.image_size={image_size} is not valid for "
                          f"preprocess={preprocessing!r}: {name!r} images are {native[0]}x"
                          f"{native[1]} (only preprocess=inception resizes); use 0")
      self.image_size = native[0]
    self.input_shape = (self.image_size, self.image_size, self.channels)
    self.mean, self.std = preprocess.normalization(name, self.channels)
    self.num_train_examples = _cardinality(self._records(train_split, 0, 1))
    self.num_test_examples = _cardinality(self._records(eval_split, 0, 1))

  def fingerprint(self) -> str:
    """What identifies these examples (jaxddp.data.fingerprint): the tfds name, version,
    splits and sizes, or the image folder's path and sizes."""
    source = (f"image folder {os.path.abspath(self.builder.data_dir)}" if self.is_folder
              else f"tfds {self.name} {self.builder.info.version}")
    return (f"{source}, {self.train_split} ({self.num_train_examples}) and "
            f"{self.eval_split} ({self.num_test_examples})")

  # --- Reading: this process's encoded examples, (image bytes, label, index). ---
  #
  # The index of an example is its position in the split read in order: for an image
  # folder, in tfds.ImageFolder's listing; for a tfds dataset, in its files' order
  # (read back from each example's tfds_id: file name and record number), whatever
  # order the files are shuffled into and however the split is sharded.

  def _records(self, split: str, process_index: int, process_count: int,
               drop_remainder: bool = False, shuffle_files: bool = False) -> tf.data.Dataset:
    if self.is_folder:  # ImageFolder has no sub-splits: every process lists, then shards
      ds = self.builder.as_dataset(split=split, decoders=_decoders(self.builder))
      total = _cardinality(ds)
      ds = ds.enumerate().map(lambda i, ex: {**ex, "index": tf.cast(i, tf.int32)})
      ds = ds.shard(process_count, process_index)
      if drop_remainder:
        ds = ds.take(total // process_count)
    else:
      shard = tfds.split_for_jax_process(split, process_index=process_index,
                                         process_count=process_count,
                                         drop_remainder=drop_remainder)
      # Files in a fixed pseudo-random order (tfds writes examples shuffled already);
      # each epoch is shuffled again through the buffer.
      read_config = tfds.ReadConfig(shuffle_seed=0, shuffle_reshuffle_each_iteration=False,
                                    try_autocache=False, add_tfds_id=True)
      ds = self.builder.as_dataset(split=shard, decoders=_decoders(self.builder),
                                   shuffle_files=shuffle_files, read_config=read_config)
      index_of = self._index_of(split)
      if index_of is None:  # tfds.testing.mock_data: no files; the order read is the index
        ds = ds.enumerate().map(lambda i, ex: {**ex, "index": tf.cast(i, tf.int32)})
      else:
        ds = ds.map(lambda ex: {**ex, "index": index_of(ex["tfds_id"])})
    ds = ds.map(lambda ex: (ex[self.image_key], tf.cast(ex[self.label_key], tf.int32),
                            ex["index"]))
    return ds.cache() if self.cache else ds  # encoded examples, in memory after one pass

  def _index_of(self, split: str):
    """tfds_id ("<file>__<record>") -> the example's position in `split` read in order."""
    files, starts = [], []
    position = 0
    try:
      instructions = self.builder.info.splits[split].file_instructions
    except KeyError:  # no split information: mock data (tfds.testing.mock_data)
      return None
    for instruction in instructions:
      files.append(os.path.basename(instruction.filename))
      starts.append(position - instruction.skip)  # + record number = position in the split
      position += instruction.take
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(files, tf.constant(starts, tf.int64)), -1)

    def index_of(tfds_id):
      parts = tf.strings.split(tfds_id, "__")
      record = tf.strings.to_number(parts[-1], tf.int64)
      return tf.cast(table.lookup(parts[0]) + record, tf.int32)
    return index_of

  # --- Preprocessing. ---

  def _train_example(self, encoded, label, index, seed):
    if self.preprocessing == "inception":
      image = preprocess.inception_train(encoded, seed, self.image_size, self.channels)
    elif self.preprocessing == "cifar":
      image = preprocess.cifar_train(encoded, seed, self.channels)
    else:
      image = preprocess.decode(encoded, self.channels)
    return self._output(image, label, index)

  def _eval_example(self, encoded, label, index):
    if self.preprocessing == "inception":
      image = preprocess.inception_eval(encoded, self.image_size, self.channels)
    else:
      image = preprocess.decode(encoded, self.channels)
    return {**self._output(image, label, index), "mask": tf.constant(1.0)}

  def _output(self, image, label, index):
    x = preprocess.normalize(image, self.mean, self.std)
    return {"x": tf.ensure_shape(x, self.input_shape), "y": label, "index": index}

  # --- The Dataset interface (jaxddp.data.Dataset). ---

  def train_batches(self, *, global_batch_size: int, seed: int, start_step: int,
                    process_index: int = 0, process_count: int = 1,
                    examples: np.ndarray | None = None) -> Iterator[Batch]:
    """`examples` (indices; None = all): train on those alone (data pruning). Each
    process then keeps the kept examples of its own shard."""
    per_process = global_batch_size // process_count
    records = self._records(self.train_split, process_index, process_count,
                            drop_remainder=True, shuffle_files=True)
    if examples is not None:
      kept = np.zeros(self.num_train_examples, bool)
      kept[np.asarray(examples)] = True
      kept = tf.constant(kept)
      records = records.filter(lambda encoded, label, index: tf.gather(kept, index))
    per_epoch = _cardinality(records)
    if per_epoch == 0:
      raise ConfigError(f"config.dataset: process {process_index}'s shard of "
                        f"{self.name}:{self.train_split} is empty")
    buffer = min(self.shuffle_buffer, per_epoch)

    def epoch(e):
      key = tf.constant(seed, tf.int64) * 2**_EPOCH_BITS + e
      shuffled = records.shuffle(buffer, seed=key, reshuffle_each_iteration=False)
      return shuffled.enumerate().map(
          lambda i, example: (*example, tf.stack([key, i])))

    first_epoch, skip = divmod(start_step * per_process, per_epoch)
    ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch).skip(skip)
    ds = ds.map(self._train_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()

  def eval_batches(self, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, split: str = "test") -> Iterator[Batch]:
    """Every example of the evaluation split (split="train": of the training split,
    with the evaluation preprocessing) exactly once, with "mask" and "index"."""
    per_process = global_batch_size // process_count
    name, size = ((self.train_split, self.num_train_examples) if split == "train" else
                  (self.eval_split, self.num_test_examples))
    records = self._records(name, process_index, process_count)
    num_batches = math.ceil(size / global_batch_size)
    padding = num_batches * per_process - _cardinality(records)
    ds = records.map(self._eval_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    blank = {"x": tf.zeros(self.input_shape, tf.float32), "y": tf.constant(0, tf.int32),
             "index": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    return ds.batch(per_process).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  def train_labels(self) -> np.ndarray:
    """The label of every training example, in index order (read, not decoded)."""
    labels = np.zeros(self.num_train_examples, np.int32)
    for _, label, index in self._records(self.train_split, 0, 1).as_numpy_iterator():
      labels[index] = label
    return labels
