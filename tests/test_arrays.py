"""Your own arrays: jaxddp.data.ArrayDataset and dataset.name=npz check what they are given.

Each bad input is one ConfigError line that names the array and what is wrong; from
the command line (npz) it is one `jaxddp: error:` line with exit status 2 and nothing
written. Evaluation of these datasets against NumPy is in test_data.py.
"""

import re

import numpy as np
import pytest

from conftest import run_main
from jaxddp.config import ConfigError
from jaxddp.data import ArrayDataset

rng = np.random.default_rng(0)
X = rng.standard_normal((20, 5, 1)).astype(np.float32)
Y = np.arange(20) % 4


def _error(*args, **kwargs) -> str:
  with pytest.raises(ConfigError) as info:
    ArrayDataset(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_valid_arrays_are_converted():
  dataset = ArrayDataset(X.astype(np.float64), Y.astype(np.int64), X[:7], Y[:7].astype(float))
  assert dataset.train_x.dtype == np.float32 and dataset.test_y.dtype == np.int32
  assert dataset.num_classes == 4 and dataset.input_shape == (5, 1)
  assert (dataset.num_train_examples, dataset.num_test_examples) == (20, 7)
  assert ArrayDataset(X, Y, X, Y, num_classes=10).num_classes == 10


@pytest.mark.parametrize("arrays, kwargs, expected", [
    ((X[:, 0, 0], Y, X, Y), {}, r"train_x has shape \(20,\); it must be \(examples, \.\.\.\)"),
    ((X[:0], Y[:0], X, Y), {}, r"train_x has shape \(0, 5, 1\)"),
    ((X, Y, X[:, :4], Y), {}, r"train_x has examples of shape \(5, 1\) but test_x of shape "
                              r"\(4, 1\)"),
    ((X, Y[:19], X, Y), {}, r"train_y has shape \(19,\); it must hold one label per example of "
                            r"train_x: shape \(20,\)"),
    ((X, Y[:, None], X, Y), {}, r"train_y has shape \(20, 1\)"),
    ((X, Y + 0.5, X, Y), {}, r"train_y holds 0\.5 \(example 0\); labels must be integer class"),
    ((X, Y.astype(str), X, Y), {}, r"train_y has dtype <U21; labels must be integer"),
    ((X, Y, X, Y - 1), {}, r"test_y holds the label -1 \(example 0\)"),
    ((X, Y, X, Y), {"num_classes": 3}, r"train_y holds the label 3 but num_classes=3; labels "
                                       r"must be in \[0, 3\)"),
    ((X, Y, X, Y), {"num_classes": 0}, r"num_classes=0 is not valid"),
    ((np.where(np.arange(20)[:, None, None] == 7, np.nan, X), Y, X, Y), {},
     r"train_x has NaN or infinite values in 1 examples \(the first is example 7\)"),
    ((X, Y, np.full_like(X, np.inf), Y), {}, r"test_x has NaN or infinite values in 20"),
    ((X.astype(object), Y, X, Y), {}, r"train_x has dtype object; inputs must be numbers"),
], ids=["1-d inputs", "no examples", "test shape", "label count", "2-d labels", "fractional",
        "string labels", "negative", "label >= num_classes", "num_classes 0", "nan", "inf",
        "object inputs"])
def test_bad_arrays_are_one_line_errors(arrays, kwargs, expected):
  message = _error(*arrays, **kwargs)
  assert message.startswith("ArrayDataset: ")
  assert re.search(expected, message), message


def test_bad_npz_from_the_command_line(tmp_path):
  """The npz loader names the file and its keys; exit 2, nothing written."""
  path = tmp_path / "data.npz"
  np.savez(path, x_train=X, y_train=Y, x_test=X, y_test=Y + 0.5)
  workdir = tmp_path / "run"
  result = run_main(["--config=configs/mnist1d.py", f"--workdir={workdir}",
                     "--config.dataset.name=npz", f"--config.dataset.path={path}"])
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("jaxddp:")]
  assert errors == [f"jaxddp: error: config.dataset.path={str(path)!r}: y_test holds 0.5 "
                    "(example 0); labels must be integer class indices"], result.stderr
  assert "Traceback" not in result.stderr and not workdir.exists()


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ({"x_train": X, "y_train": Y, "x_test": X}, "has no array 'y_test' (it has: x_train, "
                                                "y_train, x_test); an npz dataset holds x_train,"),
    ("not an npz file", "is not an .npz file (not a zip archive); write one with numpy.savez"),
], ids=["missing file", "missing key", "not npz"])
def test_npz_file_errors(tmp_path, content, expected):
  from jaxddp.data.arrays import load_npz
  path = tmp_path / "data.npz"
  if isinstance(content, dict):
    np.savez(path, **content)
  elif content is not None:
    path.write_text(content)
  with pytest.raises(ConfigError) as info:
    load_npz(str(path))
  assert expected in str(info.value) and str(info.value).startswith(
      f"config.dataset.path={str(path)!r}")


def test_npz_needs_a_path():
  from jaxddp.data.arrays import load_npz
  with pytest.raises(ConfigError, match="needs --config.dataset.path=FILE.npz"):
    load_npz("")
