"""The examples a user copies run as they are."""

import re
import subprocess
import sys

from conftest import REPO


def test_custom_model_example(tmp_path):
  """examples/custom_model.py: the user's CNN with dropout and ghost batch norm on
  scikit-learn's digits as plain arrays, 8 emulated devices."""
  completed = subprocess.run([sys.executable, "examples/custom_model.py", str(tmp_path / "run")],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "jaxddp: shard_map on 8 cpu device(s)" in completed.stdout
  accuracy = float(re.search(r"^test accuracy (\d+\.\d+)%$", completed.stdout, re.M)[1])
  assert accuracy > 95.0, completed.stdout[-2000:]
