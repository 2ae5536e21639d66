"""The experiment scripts run end to end in their --quick modes and write what they promise."""

import csv
import json
import subprocess
import sys

from conftest import REPO


def test_batch_size_sweep_quick(tmp_path):
  command = [sys.executable, "-m", "experiments.batch_size_sweep",
             "--config=configs/mnist1d.py", f"--out={tmp_path}", "--quick",
             "--recipes=none,linear+longer+ghost16", "--config.model.width=8"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["recipe"], int(r["batch_size"])) for r in rows] == [
      ("none", 32), ("none", 64), ("linear+longer+ghost16", 32), ("linear+longer+ghost16", 64)]
  for row in rows:
    assert 0.2 < float(row["test_accuracy"]) <= 1.0, row  # above chance (0.1) after 2 epochs
  # linear+longer relative to the reference batch 128: LR and epochs x batch / 128.
  longer = {int(r["batch_size"]): r for r in rows if r["recipe"] == "linear+longer+ghost16"}
  assert float(longer[64]["peak_learning_rate"]) == 0.1 * 64 / 128
  assert float(longer[64]["epochs"]) == 2 * 64 / 128
  # ...and ghost batch norm with ghost batches of 16, only in that recipe.
  def model_config(run):
    with open(tmp_path / "runs" / run / "config.json") as f:
      return json.load(f)["config"]["model"]
  assert model_config("linear_longer_ghost16_b64")["norm"] == "ghost_batch_norm"
  assert model_config("linear_longer_ghost16_b64")["ghost_batch_size"] == 16
  assert model_config("none_b64")["norm"] == "batch_norm"
  with open(tmp_path / "accuracy_vs_batch.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # Run again: every run is already in results.csv, nothing is trained twice.
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 runs to go (4 already in" in again.stdout


def test_sparsity_sweep_quick(tmp_path):
  command = [sys.executable, "-m", "experiments.sparsity_sweep",
             "--config=configs/mnist1d.py", f"--out={tmp_path}", "--quick",
             "--methods=gradual_magnitude,swat", "--config.model.width=8"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(tmp_path / "results.csv") as f:
    rows = {row["method"]: row for row in csv.DictReader(f)}
  assert sorted(rows) == ["gradual_magnitude", "none", "swat"]
  for row in rows.values():
    assert 0.2 < float(row["test_accuracy"]) <= 1.0, row  # above chance (0.1) after 2 epochs
  assert float(rows["none"]["flops_ratio"]) == 1.0
  assert float(rows["none"]["final_weight_sparsity"]) == 0.0
  # SWAT at 0.8 from the first step: 0.8 of the masked weights are 0 throughout (the
  # first layer stays dense), and activation sparsity 0.8 as well.
  assert float(rows["swat"]["activation_sparsity"]) == 0.8
  assert 0.79 < float(rows["swat"]["final_weight_sparsity"]) < 0.8
  assert 0.15 < float(rows["swat"]["flops_ratio"]) < 0.25
  # Gradual pruning reaches 0.8 at 3/4 of the run and was denser before: more FLOPs.
  assert 0.79 < float(rows["gradual_magnitude"]["final_weight_sparsity"]) < 0.8
  assert float(rows["swat"]["flops_ratio"]) < float(rows["gradual_magnitude"]["flops_ratio"]) < 1
  with open(tmp_path / "accuracy_vs_sparsity.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_experiments_read_datasets_through_the_interface_only():
  """A dataset with nothing but the Dataset interface (as a tfds one) sizes the sweep."""
  from conftest import make_tiny_config
  from experiments import sparsity_sweep
  config = make_tiny_config()
  config.dataset.name = "user_models:InterfaceOnly"
  config.train.batch_size = 10
  config.train.num_steps = 0
  config.train.num_epochs = 3
  assert sparsity_sweep._total_steps(config) == 30  # 100 examples, 10 per step, 3 epochs


def test_data_pruning_quick(tmp_path):
  command = [sys.executable, "-m", "experiments.data_pruning",
             "--config=configs/mnist1d.py", f"--out={tmp_path}", "--quick", "--regimes=1000",
             "--config.model.width=8"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  runs = {(r["part"], r["score"], r["policy"]): r for r in rows}
  assert set(runs) == {("static", "none", "all"), ("static", "el2n", "hard"),
                       ("static", "el2n", "ccs"), ("static", "forgetting", "hard"),
                       ("static", "prototype", "hard"), ("dynamic", "none", "all"),
                       ("dynamic", "infobatch", "infobatch"), ("dynamic", "none", "random")}
  for (part, score, policy), row in runs.items():
    if part == "static":  # the same number of updates, half the examples when pruned
      assert int(row["steps"]) == 12
      assert int(row["examples_kept"]) == (1000 if score == "none" else 500)
    if score in ("el2n", "forgetting", "prototype"):
      assert float(row["score_seconds"]) > 0  # the scores' cost is part of the table
  infobatch = runs[("dynamic", "infobatch", "infobatch")]
  full = runs[("dynamic", "none", "all")]
  assert int(infobatch["steps"]) < int(full["steps"])  # epochs got shorter
  # A random subset of the same cost: InfoBatch's fraction of the examples, the same epochs
  # (each epoch rounds its steps down: within one step per epoch, 3 epochs here).
  random = runs[("dynamic", "none", "random")]
  assert abs(int(random["steps"]) - int(infobatch["steps"])) <= 3
  for name in ("static.png", "dynamic.png"):
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for score in ("el2n", "forgetting", "prototype"):
    assert (tmp_path / "scores_1000" / "scores" / f"{score}.json").exists()


def test_tuning_quick(tmp_path):
  """Every part of experiments/tuning.py on two trials per study: one row per study, the
  rules' predictions from the tuned rate at the reference batch, and the figure."""
  command = [sys.executable, "-m", "experiments.tuning", f"--out={tmp_path}", "--quick",
             "--config.model.width=8"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["part"], r["study"]) for r in rows] == [
      ("lr_vs_batch", "b64"), ("lr_vs_batch", "b128"), ("samplers", "tpe_none_s0"),
      ("samplers", "random_none_s0"), ("pruning", "tpe_asha_s0")]
  summary = json.loads((tmp_path / "summary.json").read_text())
  lr = {r["batch_size"]: r for r in summary["lr_vs_batch"]["rows"]}
  assert lr[64]["linear_rule_lr"] == lr[128]["tuned_lr"] * 64 / 128  # anchored at batch 128
  assert summary["search"]["best_found"] == max(float(r["best_accuracy"]) for r in rows[2:])
  assert summary["noise"]["seeds"] == [0, 1] and len(summary["noise"]["accuracies"]) == 2
  with open(tmp_path / "tuning.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
