"""Input pipelines: `load_dataset` maps config.dataset.name to a Dataset.

Two kinds, one interface (`Dataset`):

* arrays.ArrayDataset: NumPy arrays in memory: your own (`ArrayDataset(train_x,
  train_y, test_x, test_y)`, or dataset.name=npz with dataset.path), MNIST-1D,
  scikit-learn's digits and synthetic data; no download and no TensorFlow.
* tfds_pipeline.TfdsDataset: any tfds dataset (CIFAR-10, ImageNet, ...) read from
  config.dataset.data_dir, or a folder of images (name image_folder), through
  tf.data. Only this one imports TensorFlow.

config.dataset.name is a name in the DATASETS registry (a factory `(config) ->
Dataset` per name; `register` adds yours), an import path `package.module:factory`,
or else the name of a tfds dataset.

A dataset yields this process's part of each global batch, as NumPy arrays:
{"x": float32 (batch, *input_shape), "y": int32 (batch,), "index": int32 (batch,)}
for training, plus "mask" (1 for a real example, 0 for padding) for evaluation.
"index" is the example's stable position in its split (the dataset's index order),
which data pruning (jaxddp.pruning) keys its scores and tables by.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Protocol

import ml_collections
import numpy as np

from jaxddp.data import embedded
from jaxddp.data.arrays import ArrayDataset, load_npz
from jaxddp.data.batches import Batch, TrainBatches, eval_batches
from jaxddp.errors import ConfigError
from jaxddp.registry import (Registry, check_signature, first_line, is_import_path,
                             resolve_import_path)

__all__ = ["ArrayDataset", "Batch", "DATASETS", "Dataset", "TrainBatches", "eval_batches",
           "fingerprint", "load_dataset", "prefetch_to_device", "register"]


class Dataset(Protocol):
  name: str
  num_classes: int
  input_shape: tuple[int, ...]  # one example, channels last
  num_train_examples: int  # the whole split, over all processes
  num_test_examples: int

  def train_batches(self, *, global_batch_size: int, seed: int, start_step: int,
                    process_index: int, process_count: int,
                    examples: np.ndarray | None = None) -> Iterator[Batch]:
    """This process's part of the training batch of every step from start_step on.

    The batches are a function of (seed, step) only: a run resumed at start_step
    sees exactly the batches an uninterrupted run would have. `examples` (sorted
    indices, None = all) restricts them to those training examples (data pruning).
    """

  def eval_batches(self, *, global_batch_size: int, process_index: int,
                   process_count: int, split: str = "test") -> Iterator[Batch]:
    """Every example of the test split (or, with split="train", of the training split,
    unaugmented) exactly once over all processes, with "mask" and "index"; every
    process yields the same number of batches (the last ones padded with mask 0)."""

  def train_labels(self) -> np.ndarray:
    """The label of every training example, in index order (for class balancing)."""


DatasetFactory = Callable[[ml_collections.ConfigDict], Dataset]
DATASETS: Registry[DatasetFactory] = Registry("dataset", "dataset.name")
_OTHER_NAMES = ", a tfds dataset name, or an import path package.module:factory"


def register(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
  """Registers a factory `(config) -> Dataset` as config.dataset.name=`name`."""
  return DATASETS.register(name)


@register("mnist1d")
def _mnist1d(config: ml_collections.ConfigDict) -> ArrayDataset:
  return embedded.mnist1d(config.dataset.num_train_examples)


@register("digits")
def _digits(config: ml_collections.ConfigDict) -> ArrayDataset:
  return embedded.digits()


@register("synthetic")
def _synthetic(config: ml_collections.ConfigDict) -> ArrayDataset:
  c = config.dataset
  return embedded.synthetic(tuple(c.synthetic_shape), c.synthetic_num_classes,
                            c.synthetic_train_size, c.synthetic_test_size, seed=config.seed)


@register("npz")
def _npz(config: ml_collections.ConfigDict) -> ArrayDataset:
  return load_npz(config.dataset.path)


@register("image_folder")
def _image_folder(config: ml_collections.ConfigDict) -> Dataset:
  return _tfds(config)


def _tfds(config: ml_collections.ConfigDict) -> Dataset:
  """A tfds dataset or an image folder, through TensorFlow (imported only now)."""
  try:
    from jaxddp.data import tfds_pipeline
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    raise ConfigError(f"config.dataset.name={config.dataset.name!r} is read by tfds through "
                      "TensorFlow, which is not installed: pip install -e '.[tfds]'") from None
  return tfds_pipeline.load(config, DATASETS.unknown(config.dataset.name, _OTHER_NAMES))


_REQUIRED = ("num_classes", "input_shape", "num_train_examples", "num_test_examples",
             "train_batches", "eval_batches")


def _from_import_path(path: str) -> DatasetFactory:
  factory = resolve_import_path("dataset.name", path)
  if not callable(factory):
    raise ConfigError(f"config.dataset.name={path!r} names an object of type "
                      f"{type(factory).__name__}, not a factory (config) -> Dataset")
  check_signature("dataset.name", path, factory, ("config",))
  return factory


def check_dataset(dataset: object, what: str) -> None:
  """A one-line error unless `dataset` has what the Dataset interface needs."""
  missing = [name for name in _REQUIRED if not hasattr(dataset, name)]
  if missing:
    raise ConfigError(f"{what} gave a {type(dataset).__name__}, which is not a Dataset: it has "
                      f"no {', '.join(missing)} (see jaxddp.data.Dataset, or wrap arrays in "
                      "jaxddp.data.ArrayDataset)")
  for name in ("num_classes", "num_train_examples", "num_test_examples"):
    value = getattr(dataset, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ConfigError(f"{what} gave a {type(dataset).__name__} whose {name} is {value!r}; it "
                        "must be an integer >= 1")


def fingerprint(dataset: Dataset) -> str:
  """What identifies a dataset's examples, so that a run, or scores, made on other data are
  never taken for this one's: its `fingerprint()` if it has one (ArrayDataset: a digest
  of the arrays; tfds: the name, version, splits and sizes), else its class and sizes."""
  own = getattr(dataset, "fingerprint", None)
  if callable(own):
    return str(own())
  kind = type(dataset)
  return (f"{kind.__module__}:{kind.__qualname__} with {dataset.num_train_examples} training "
          f"and {dataset.num_test_examples} test examples")


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset config.dataset.name names: registered, an import path, or a tfds name."""
  name = config.dataset.name
  if is_import_path(name):
    factory = _from_import_path(name)
    try:
      dataset = factory(config)
    except ConfigError:
      raise
    except Exception as error:  # the user's factory failed: say where, in one line
      raise ConfigError(f"config.dataset.name={name!r}: the factory raised "
                        f"{type(error).__name__}: {first_line(error)}") from None
    check_dataset(dataset, f"config.dataset.name={name!r}")
    return dataset
  if name not in DATASETS:
    return _tfds(config)
  dataset = DATASETS[name](config)
  if isinstance(dataset, ArrayDataset) and config.dataset.max_shift:
    dataset = dataclasses.replace(dataset, max_shift=config.dataset.max_shift)
  return dataset


def prefetch_to_device(batches: Iterator[Batch], put_many: Callable[[list[Batch]], list],
                       max_batches: int = 8, max_bytes: int = 8 << 20) -> Iterator:
  """Yields each batch placed on the devices by put_many, in order.

  Consecutive batches are copied together, up to max_batches or max_bytes at a time:
  on a CPU, each transfer made while a step runs cost the host about 0.6 ms,
  whatever its size (2% of a 30 ms MNIST-1D step; 0.1 ms per batch when copied
  8 at a time). Large batches go one at a time, so that reading a chunk never
  keeps the host from dispatching steps for long.
  """
  batches = iter(batches)
  while True:
    chunk, size = [], 0
    for batch in batches:
      chunk.append(batch)
      size += sum(v.nbytes for v in batch.values())
      if len(chunk) == max_batches or size >= max_bytes:
        break
    if not chunk:
      return
    yield from put_many(chunk)
