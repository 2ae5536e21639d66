"""scripts/benchmark.py runs, compares variants of a config, and writes what it prints."""

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_compares_norms(tmp_path):
  out = tmp_path / "bench.json"
  command = [sys.executable, "scripts/benchmark.py", "--config=configs/mnist1d.py",
             "--compare=model.norm=batch_norm,ghost_batch_norm", "--config.model.width=8",
             "--config.train.batch_size=64", "--config.model.ghost_batch_size=16",
             "--steps=4", "--rounds=2", "--warmup=1", f"--json={out}"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["field"] == "model.norm"
  results = report["results"]
  assert [r["variant"] for r in results] == ["batch_norm", "ghost_batch_norm"]
  for r in results:
    assert r["timed_steps"] == 4 and r["batch_size"] == 64
    assert r["examples_per_second"] == 64 / r["median_step_seconds"] > 0
  assert results[0]["ratio_to_first"] == 1.0
  assert results[1]["ratio_to_first"] == (results[1]["median_step_seconds"]
                                          / results[0]["median_step_seconds"])
  # The printed table carries the same figures.
  assert f"{results[1]['ratio_to_first']:.3f}x" in completed.stdout


def test_benchmark_rejects_an_unknown_field():
  completed = subprocess.run(
      [sys.executable, "scripts/benchmark.py", "--config=configs/mnist1d.py",
       "--compare=model.nrom=batch_norm"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert completed.returncode != 0
  assert "config has no field 'model.nrom'" in completed.stderr
