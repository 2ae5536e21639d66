"""Datasets held as NumPy arrays: the user's own (ArrayDataset, an .npz file) and the
embedded ones, which are ArrayDatasets too.

Every ArrayDataset has the embedded datasets' guarantees (jaxddp.data.batches): the
training order is a pure function of (seed, step), each process reads a disjoint
slice of every global batch, and evaluation visits every test example exactly once.
Bad arrays fail when the dataset is built, with one line (a ConfigError).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from typing import Iterator

import numpy as np

from jaxddp.data.batches import Batch, TrainBatches, eval_batches
from jaxddp.errors import ConfigError
from jaxddp.registry import first_line

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _inputs(what: str, x) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype.kind not in "biuf":
    raise ConfigError(f"{what} has dtype {x.dtype}; inputs must be numbers")
  if x.ndim < 2 or len(x) == 0:
    raise ConfigError(f"{what} has shape {x.shape}; it must be (examples, ...) with at least one "
                      "example, e.g. (N, H, W, C) images or (N, L, C) signals, channels last")
  x = x.astype(np.float32)
  bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if bad.any():
    raise ConfigError(f"{what} has NaN or infinite values in {int(bad.sum())} examples (the "
                      f"first is example {int(np.argmax(bad))})")
  return x


def _labels(what: str, y, num_examples: int, x_what: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or len(y) != num_examples:
    raise ConfigError(f"{what} has shape {y.shape}; it must hold one label per example of "
                      f"{x_what}: shape ({num_examples},)")
  if y.dtype.kind == "f":
    fractional = ~np.isfinite(y) | (y != np.round(y))
    if fractional.any():
      raise ConfigError(f"{what} holds {float(y[np.argmax(fractional)])!r} (example "
                        f"{int(np.argmax(fractional))}); labels must be integer class indices")
  elif y.dtype.kind not in "iu":
    raise ConfigError(f"{what} has dtype {y.dtype}; labels must be integer class indices")
  if (y < 0).any():
    raise ConfigError(f"{what} holds the label {int(y.min())} (example {int(np.argmin(y))}); "
                      "labels must be in [0, num_classes)")
  if len(y) and y.max() > _LARGEST_LABEL:  # checked before the cast to int32, which wraps
    raise ConfigError(f"{what} holds the label {int(y.max())} (example {int(np.argmax(y))}); "
                      f"labels are class indices, at most {_LARGEST_LABEL}")
  return y.astype(np.int32)


# 16.8 million classes, the largest integer float32 holds exactly (labels may come as
# floats). A larger label is a corrupted one, not a class: int32 would wrap it, and a
# head and one-hot targets that wide would not fit a device (1e8 classes: 51 GB of
# targets for a batch of 128).
_LARGEST_LABEL = 2**24


def checked_arrays(train_x, train_y, test_x, test_y, num_classes=None, *,
                   names: tuple[str, ...] = ("train_x", "train_y", "test_x", "test_y"),
                   prefix: str = "ArrayDataset: ") -> tuple:
  """(train_x, train_y, test_x, test_y, num_classes) as float32, int32, float32, int32, int,
  or a one-line ConfigError (`prefix` + the array's name in `names` + what is wrong)."""
  x_train, y_train, x_test, y_test = (prefix + name for name in names)
  train_x, test_x = _inputs(x_train, train_x), _inputs(x_test, test_x)
  if train_x.shape[1:] != test_x.shape[1:]:
    raise ConfigError(f"{x_train} has examples of shape {train_x.shape[1:]} but {names[2]} of "
                      f"shape {test_x.shape[1:]}; they must be the same")
  train_y = _labels(y_train, train_y, len(train_x), names[0])
  test_y = _labels(y_test, test_y, len(test_x), names[2])
  largest = int(max(train_y.max(), test_y.max()))
  if num_classes is None:
    num_classes = largest + 1
  elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or \
      num_classes < 1:
    raise ConfigError(f"{prefix}num_classes={num_classes!r} is not valid; it must be an integer "
                      ">= 1 (or None: the largest label + 1)")
  elif largest >= num_classes:
    where = y_train if train_y.max() == largest else y_test
    raise ConfigError(f"{where} holds the label {largest} but num_classes={num_classes}; labels "
                      f"must be in [0, {num_classes})")
  return train_x, train_y, test_x, test_y, int(num_classes)


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """Train and test splits as arrays: inputs (N, ...) channels last, labels (N,) integers.

      jaxddp.data.ArrayDataset(train_x, train_y, test_x, test_y, num_classes=None)

  Inputs become float32 and labels int32. num_classes=None: the largest label + 1.
  Shapes, dtypes, label ranges and NaNs are checked here, with one-line ConfigErrors.
  The global batch of a step is drawn first, then split over processes, so the
  numbers do not depend on the process count (jaxddp.data.batches).
  """
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int | None = None
  name: str = "arrays"
  max_shift: int = 0  # training augmentation of 1-D signals (config.dataset.max_shift)
  _fingerprint: str = dataclasses.field(default="", init=False, repr=False, compare=False)

  def __post_init__(self):
    checked = checked_arrays(self.train_x, self.train_y, self.test_x, self.test_y,
                             self.num_classes)
    for field, value in zip(("train_x", "train_y", "test_x", "test_y", "num_classes"), checked):
      object.__setattr__(self, field, value)

  def fingerprint(self) -> str:
    """A digest of the four arrays (as checked: float32 inputs, int32 labels) and
    num_classes: equal exactly when the examples are (jaxddp.data.fingerprint)."""
    if not self._fingerprint:
      digest = hashlib.sha1(str(self.num_classes).encode())
      for array in (self.train_x, self.train_y, self.test_x, self.test_y):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
      object.__setattr__(self, "_fingerprint",
                         f"arrays of {self.num_train_examples} training and "
                         f"{self.num_test_examples} test examples, sha1 "
                         f"{digest.hexdigest()[:16]}")
    return self._fingerprint

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[1:])

  @property
  def num_train_examples(self) -> int:
    return len(self.train_x)

  @property
  def num_test_examples(self) -> int:
    return len(self.test_x)

  def train_batches(self, *, global_batch_size: int, seed: int, start_step: int,
                    process_index: int = 0, process_count: int = 1,
                    examples: np.ndarray | None = None) -> Iterator[Batch]:
    batches = TrainBatches(self.train_x, self.train_y, global_batch_size=global_batch_size,
                           seed=seed, process_index=process_index, process_count=process_count,
                           max_shift=self.max_shift, examples=examples)
    step = start_step
    while True:
      yield batches(step)
      step += 1

  def eval_batches(self, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, split: str = "test") -> Iterator[Batch]:
    x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
    return eval_batches(x, y, global_batch_size=global_batch_size,
                        process_index=process_index, process_count=process_count)

  def train_labels(self) -> np.ndarray:
    """The label of every training example, in index order."""
    return self.train_y


def load_npz(path: str) -> ArrayDataset:
  """An ArrayDataset from an .npz file holding x_train, y_train, x_test and y_test."""
  field = f"config.dataset.path={path!r}"
  if not path:
    raise ConfigError("config.dataset.name='npz' needs --config.dataset.path=FILE.npz, a file "
                      f"with the arrays {', '.join(NPZ_KEYS)} (numpy.savez)")
  if os.path.isdir(path):
    raise ConfigError(f"{field} is a directory; give the .npz file itself")
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no such file")
  try:
    open(path, "rb").close()
  except OSError as error:
    raise ConfigError(f"{field} cannot be read ({error.strerror})") from None
  if not zipfile.is_zipfile(path):
    raise ConfigError(f"{field} is not an .npz file (not a zip archive); write one with "
                      f"numpy.savez(path, {'=..., '.join(NPZ_KEYS)}=...)")
  try:
    with np.load(path, allow_pickle=False) as arrays:
      missing = [key for key in NPZ_KEYS if key not in arrays.files]
      if missing:
        raise ConfigError(f"{field} has no array {missing[0]!r} (it has: "
                          f"{', '.join(arrays.files) or 'none'}); an npz dataset holds "
                          f"{', '.join(NPZ_KEYS)}")
      x_train, y_train, x_test, y_test = (arrays[key] for key in NPZ_KEYS)
  except ConfigError:
    raise
  except Exception as error:  # not a zip file, a pickled array, ...
    raise ConfigError(f"{field} could not be read as an .npz file: {type(error).__name__}: "
                      f"{first_line(error)}") from None
  checked = checked_arrays(x_train, y_train, x_test, y_test, names=NPZ_KEYS, prefix=f"{field}: ")
  return ArrayDataset(*checked, name="npz")
