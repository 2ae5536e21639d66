"""scripts/benchmark.py runs, compares variants of a config, and writes what it prints."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def _benchmark(args, tmp_path):
  out = tmp_path / "bench.json"
  command = [sys.executable, "scripts/benchmark.py", "--steps=4", "--rounds=2", "--warmup=1",
             "--pipeline_batches=3", "--loop_steps=4", f"--json={out}", *args]  # args win
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return completed.stdout, json.loads(out.read_text())


def test_benchmark_compares_norms(tmp_path):
  stdout, report = _benchmark(
      ["--config=configs/mnist1d.py", "--compare=model.norm=batch_norm,ghost_batch_norm",
       "--config.model.width=8", "--config.train.batch_size=64",
       "--config.model.ghost_batch_size=16"], tmp_path)
  assert report["field"] == "model.norm"
  results = report["results"]
  assert [r["variant"] for r in results] == ["batch_norm", "ghost_batch_norm"]
  for r in results:
    assert r["dataset"] == "mnist1d" and r["input_shape"] == [40, 1]  # embedded: kept
    assert r["timed_steps"] == 4 and r["batch_size"] == 64
    assert r["examples_per_second"] == 64 / r["median_step_seconds"] > 0
    assert r["bare_examples_per_second"] == 64 / r["bare_median_step_seconds"] > 0
    assert r["throughput_vs_bare"] == r["bare_median_step_seconds"] / r["median_step_seconds"]
    assert r["loop_vs_bare"] == r["loop_images_per_second"] / r["bare_examples_per_second"]
    assert 0 <= r["loop_data_wait_fraction"] < 1
    assert r["pipeline_images_per_second"] > 0
    # Hand count: the width-8 CNN does 78,080 multiply-adds per example forward
    # (convolutions 960 + 7680 + 7680 + 15360 + 15360 + 30720, classifier 320); a training
    # step is about 3 passes of 2 FLOPs each, on 64 examples on one device: 30.0 MFLOP.
    # XLA also counts normalisation, activations and the update (it said 31.7M).
    hand_count = 3 * 2 * 78080 * 64
    assert 0.95 * hand_count < r["flops_per_step_per_device"] < 1.5 * hand_count
    assert r["achieved_flops_per_second"] == pytest.approx(
        r["flops_per_step_per_device"] / r["median_step_seconds"])
    assert r["fraction_of_peak"] is None and r["device_kind"] == "cpu"  # no known peak
    assert r["xla_peak_memory_bytes"] > 0
  assert results[0]["ratio_to_first"] == 1.0
  assert results[1]["ratio_to_first"] == (results[1]["median_step_seconds"]
                                          / results[0]["median_step_seconds"])
  # The printed table carries the same figures.
  assert f"{results[1]['ratio_to_first']:.3f}x" in stdout
  assert f"{results[0]['throughput_vs_bare']:.3f}x" in stdout
  assert f"{results[0]['loop_data_wait_fraction']:.2%}" in stdout


def test_benchmark_replaces_file_datasets_with_synthetic_images(tmp_path):
  """--data=auto: CIFAR-10 (read from disk) becomes random images of its size."""
  _, report = _benchmark(
      ["--config=configs/cifar10.py", "--config.model.name=cnn", "--config.model.width=4",
       "--config.train.batch_size=16", "--loop_steps=0"], tmp_path)
  (result,) = report["results"]
  assert result["dataset"] == "synthetic" and result["input_shape"] == [32, 32, 3]
  assert "loop_images_per_second" not in result  # --loop_steps=0 skips the loop


def test_benchmark_rejects_an_unknown_field():
  completed = subprocess.run(
      [sys.executable, "scripts/benchmark.py", "--config=configs/mnist1d.py",
       "--compare=model.nrom=batch_norm"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert completed.returncode != 0
  assert "config has no field 'model.nrom'" in completed.stderr
