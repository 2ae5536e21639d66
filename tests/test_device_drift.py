"""experiments/device_drift.py end to end: one seed, one variant, 2 steps.

In a subprocess, as run from the command line: the script emulates its own 8 devices, and
its absl flags (--out, ...) would clash with other experiment scripts imported by the suite.
"""

import csv
import os
import subprocess
import sys

from conftest import REPO


def test_device_drift_writes_the_table_and_resumes(tmp_path):
  out = tmp_path / "drift"
  command = [sys.executable, "-m", "experiments.device_drift", f"--out={out}", "--seeds=0",
             "--variants=batch_norm", "--steps=2"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(out / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["variant"], r["seed"], r["steps"]) for r in rows] == [("batch_norm", "0", "2")]
  # Two steps from the same initialisation: the device counts and backends agree to rounding.
  assert 0 <= float(rows[0]["1v8"]) < 1e-4 and 0 <= float(rows[0]["pmap_vs_shard_map"]) < 1e-4
  table = (out / "drift.md").read_text()
  assert "| 0 |" in table and "| **max** |" in table and "| **median** |" in table

  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 (variant, seed) pairs to go" in again.stdout
  with open(out / "results.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == 1


def test_device_drift_refuses_an_unknown_variant(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.device_drift", f"--out={tmp_path}",
       "--variants=layer_norm"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert completed.returncode == 2
  assert "unknown variant(s) layer_norm" in completed.stderr
  assert not os.path.exists(tmp_path / "results.csv")
