"""Compute-optimal sizing (jaxddp.scaling) and cascades (jaxddp.cascade) against known answers,
and both experiments end to end in their --quick modes."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from jaxddp import cascade, scaling

# Hoffmann et al.'s fitted constants, as a known truth to draw runs from.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_TRUE, B_TRUE = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)  # 0.452, 0.548 (FLOPs = 6ND)


def chinchilla_runs(noise: float, seed: int = 1, seeds: int = 3) -> list[scaling.Run]:
  """9 sizes (1.6 decades around the true optimum) at each of 7 budgets; each size's
  loss from `seeds` seeds, each the true loss times exp(noise x a standard normal)."""
  rng = np.random.default_rng(seed)
  scale = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))  # N_opt = scale (C/6)^a
  runs = []
  for budget in (1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21):
    for offset in np.linspace(-0.8, 0.8, 9):
      n = scale * (budget / 6) ** A_TRUE * 10 ** offset
      d = budget / (6 * n)
      losses = (E + A / n ** ALPHA + B / d ** BETA) * np.exp(rng.normal(0, noise, seeds))
      runs.append(scaling.Run(budget, n, d, float(losses.mean()), 6 * n, tuple(losses)))
  return runs


def test_approach_2_and_3_recover_the_exponents_of_a_known_loss_surface():
  """63 points of 3 seeds, each seed's loss off by 0.5% (a standard deviation): approach
  2's parabolas recover a and b within 0.02 (they are biased by the IsoFLOP curve's
  asymmetry: 0.454 for 0.452 without noise), approach 3 recovers alpha and beta within
  0.02 and a, b within 0.01; the bootstrap intervals (seeds resampled) hold the truth."""
  runs = chinchilla_runs(noise=0.005)
  iso = scaling.isoflop_fit(runs, bootstraps=200)
  assert abs(iso["a"] - A_TRUE) < 0.02 and abs(iso["b"] - B_TRUE) < 0.02, (iso["a"], iso["b"])
  assert iso["a"] + iso["b"] == pytest.approx(1.0)  # D = C / 6N
  assert iso["a_interval"][0] < A_TRUE < iso["a_interval"][1], iso["a_interval"]
  assert all(m["interior"] for m in iso["minima"])
  surface = scaling.loss_surface_fit(runs, gamma=1.0, bootstraps=30)
  assert abs(surface["alpha"] - ALPHA) < 0.02 and abs(surface["beta"] - BETA) < 0.02, surface
  assert abs(surface["a"] - A_TRUE) < 0.01 and abs(surface["b"] - B_TRUE) < 0.01
  assert surface["E"] == pytest.approx(E, rel=0.02)
  assert surface["alpha_interval"][0] < ALPHA < surface["alpha_interval"][1]
  # Without noise both are tighter still.
  exact = scaling.isoflop_fit(chinchilla_runs(noise=0.0), bootstraps=0)
  assert abs(exact["a"] - A_TRUE) < 0.005


def test_parabola_minimum_of_a_known_isoflop_curve():
  x = np.linspace(3.0, 6.0, 7)
  assert scaling.parabola_minimum(x, 0.2 * (x - 4.3) ** 2 + 0.05) == pytest.approx(
      (4.3, 0.05, 0.2))
  x_min, loss, curvature = scaling.parabola_minimum(x, -(x - 4.3) ** 2)  # no minimum
  assert math.isnan(x_min) and math.isnan(loss) and curvature < 0
  # The parabola goes through the sizes within `window` decades of the lowest loss.
  runs = [scaling.Run(1e9, 10.0 ** v, 1.0, (v - 4.3) ** 2, 1.0) for v in x]  # x: 3, 3.5, ...
  near = [math.log10(r.params) for r in scaling.near_minimum(runs, 0.75)]
  assert near == pytest.approx([4.0, 4.5, 5.0])  # the lowest loss is at 4.5
  assert scaling.near_minimum(runs, None) == runs


def test_planner_follows_the_fitted_law_and_refuses_far_budgets():
  family = scaling.Family(widths=[4, 8, 16], params=[100 + 50 * 4 ** 2, 100 + 50 * 8 ** 2,
                                                     100 + 50 * 16 ** 2],
                          train_flops=[600.0 * (100 + 50 * w ** 2) for w in (4, 8, 16)])
  assert family.max_relative_error() < 1e-9
  assert family.width_for(100 + 50 * 11 ** 2) == 11
  law = {"a": 0.5, "log10_k_params": -2.0}
  surface = {"E": 0.01, "A": 1.0, "B": 1.0, "alpha": 0.5, "beta": 0.5}
  fit = scaling.Fit(budgets=[1e10, 1e12], batch_size=32, family=family,
                    isoflop={**law, "bootstrap": [law] * 3},
                    surface={**surface, "bootstrap": [surface]})
  plan = fit.plan(4e12)
  assert plan["params_optimal"] == pytest.approx(10 ** -2.0 * 4e12 ** 0.5)  # 20,000
  assert plan["width"] == 20 and plan["params"] == pytest.approx(100 + 50 * 400)
  assert plan["examples"] % 32 == 0 and plan["examples"] == plan["steps"] * 32
  assert plan["examples"] * plan["train_flops_per_example"] <= 4e12
  assert (plan["examples"] + 32) * plan["train_flops_per_example"] > 4e12
  assert plan["loss"] == pytest.approx(scaling.surface_loss(surface, plan["params"],
                                                            plan["examples"]))
  fit.plan(1e12 * 100)  # the edge of the range is allowed
  for budget in (1e12 * 101, 1e10 / 101):
    with pytest.raises(scaling.BudgetOutOfRange, match="more than 100x outside"):
      fit.plan(budget)
  for budget in (0.0, -5.0, math.nan):
    with pytest.raises(scaling.BudgetOutOfRange, match="a positive number of FLOPs"):
      fit.plan(budget)


def test_fit_keeps_its_json_form_and_reads_the_files_written_before_it(tmp_path):
  """docs/compute_optimal_fit.json (written before scaling.Fit existed) loads and plans
  what the README prints; saved again, it has the same keys and plans the same."""
  fit = scaling.Fit.load(os.path.join(REPO, "docs", "compute_optimal_fit.json"))
  plan = fit.plan(1.2e12)
  assert (plan["width"], plan["examples"], plan["steps"]) == (14, 842240, 6580)
  assert fit.about["seeds"] == [0, 1, 2]  # what the experiment recorded, kept as it was
  fit.save(str(tmp_path / "fit.json"))
  with open(os.path.join(REPO, "docs", "compute_optimal_fit.json")) as f, \
      open(tmp_path / "fit.json") as g:
    assert json.load(f).keys() == json.load(g).keys()
  assert not (tmp_path / "fit.json.tmp").exists()
  assert scaling.Fit.load(str(tmp_path / "fit.json")).plan(1.2e12) == plan
  with pytest.raises(ValueError, match="no surface, isoflop.log10_k_params"):
    scaling.Fit.from_dict({"budgets": [1e8], "batch_size": 32, "family": {},
                           "isoflop": {"a": 0.5, "bootstrap": []}})


def test_cascade_at_the_extreme_thresholds_is_each_model_exactly():
  rng = np.random.default_rng(0)
  cheap = rng.normal(size=(500, 10)).astype(np.float32) * 3
  cheap[:50] = 0.0  # ties: the lowest class, whichever model answers
  cheap[50:100, 3] = 1e4  # a top probability of exactly 1.0 in float32 and float64
  large = rng.normal(size=(500, 10)).astype(np.float32)
  predictions, deferred = cascade.route(cheap, large, 0.0)
  np.testing.assert_array_equal(predictions, np.argmax(cheap, axis=-1))
  assert not deferred.any()
  for t in (1.0 + 1e-9, 1.01, 2.0):
    predictions, deferred = cascade.route(cheap, large, t)
    np.testing.assert_array_equal(predictions, np.argmax(large, axis=-1))
    assert deferred.all()
  # At t = 1 the cheap model keeps exactly the answers it is certain of ("at least t").
  _, deferred = cascade.route(cheap, large, 1.0)
  assert not deferred[50:100].any() and deferred[:50].all()
  # In between, exactly the examples below the threshold go to the large model.
  predictions, deferred = cascade.route(cheap, large, 0.7)
  probabilities = np.exp(cheap - cheap.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  np.testing.assert_array_equal(deferred, probabilities.max(-1) < 0.7)
  labels = rng.integers(0, 10, 500)
  points = cascade.sweep(cheap, large, labels, [0.0, 0.7, 1.01], cheap_flops=1.0,
                         large_flops=10.0)
  assert [p.deferred for p in points] == [0.0, float(deferred.mean()), 1.0]
  assert [p.flops for p in points] == [1.0, 1.0 + 10.0 * float(deferred.mean()), 11.0]
  assert cascade.cheapest_within(points, points[-1].accuracy, 1.0) == points[0]


def _run(args, timeout=600):
  completed = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                             timeout=timeout)
  return completed


def test_compute_optimal_quick_uses_the_flops_the_runs_report(tmp_path):
  """--quick end to end; every run's D times the FLOPs per example it was sized with is
  the training FLOPs the run itself counted; the planner plans and refuses."""
  completed = _run(["-m", "experiments.compute_optimal", "--config=configs/mnist1d.py",
                    f"--out={tmp_path}", "--quick"])
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6  # 2 budgets x 3 widths
  for row in rows:
    examples, per_example = int(row["examples"]), float(row["train_flops_per_example"])
    assert examples == int(row["steps"]) * 32
    assert examples * per_example <= float(row["budget"])
    assert float(row["reported_train_flops"]) == pytest.approx(examples * per_example, rel=1e-6)
  with open(tmp_path / "fit.json") as f:
    fit = json.load(f)
  assert fit["runs"] == 6 and fit["budgets"] == [1e8, 2e8]
  with open(tmp_path / "isoflop.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The planner is checked on the quick sweep's family of widths (what its runs measured)
  # with a power law and a loss surface set here: six runs of a few steps give fits too
  # noisy to plan from (one CI run fitted alpha=-3.8, which Fit.load rightly refuses).
  # N_opt is the second width's N at 8e8 FLOPs and grows as C^10, so 1e10 plans a width
  # far too large for a single step.
  family = scaling.Family(**fit["family"])
  power = {"a": 10.0, "log10_k_params": math.log10(family.params[1]) - 10 * math.log10(8e8)}
  surface = {"E": 1.0, "A": 100.0, "B": 100.0, "alpha": 0.3, "beta": 0.3}
  fit = dict(fit, isoflop=dict(power, bootstrap=[power]),
             surface=dict(surface, bootstrap=[surface]))
  (tmp_path / "fit.json").write_text(json.dumps(fit))
  planned = _run(["-m", "experiments.compute_optimal", f"--fit={tmp_path}/fit.json",
                  "--predict=8e8"], timeout=120)
  assert planned.returncode == 0, planned.stderr[-3000:]
  assert planned.stdout.startswith(f"budget 8e+08 FLOPs: width {family.widths[1]} "), \
      planned.stdout
  refused = _run(["-m", "experiments.compute_optimal", f"--fit={tmp_path}/fit.json",
                  "--predict=3e10"], timeout=120)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines() == [
      "compute_optimal.py: error: a budget of 3e+10 FLOPs is more than 100x outside the fitted "
      "budgets (1e+08 to 2e+08); the fit cannot say"]
  # Within 100x, but the planned width leaves no step to train (issue 22: it printed
  # "0 examples, 0 steps; expected test loss inf" with exit 0).
  degenerate = _run(["-m", "experiments.compute_optimal", f"--fit={tmp_path}/fit.json",
                     "--predict=1e10"], timeout=120)
  assert degenerate.returncode == 2, degenerate.stderr
  (line,) = degenerate.stderr.strip().splitlines()
  assert line.startswith("compute_optimal.py: error: for a budget of 1e+10 FLOPs the fit plans "
                         "width "), line
  assert line.endswith(" the fit cannot plan this budget"), line
  # A fit whose numbers are impossible is refused when it is read.
  for part, field, value, why in (("", "batch_size", 0, "batch_size 0 must be at least 1"),
                                  ("surface", "E", -1.0, "must have E, A, B >= 0")):
    broken = dict(fit, **({part: dict(fit[part], **{field: value})} if part else
                          {field: value}))
    path = tmp_path / f"broken_{field}.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=re.escape(why)):
      scaling.Fit.load(str(path))


def test_cascade_quick_routes_every_test_example_to_one_model(tmp_path):
  completed = _run(["-m", "experiments.cascade", "--config=configs/mnist1d.py",
                    f"--out={tmp_path}", "--quick"])
  assert completed.returncode == 0, completed.stderr[-3000:]
  outputs = np.load(tmp_path / "test_outputs.npz")
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  np.testing.assert_array_equal(outputs["labels"], outputs["large_labels"])
  assert len(outputs["labels"]) == summary["test_examples"] == 1000
  # The per-example logits give the accuracy each training run reported on the test set.
  for name in ("cheap", "large"):
    accuracy = np.mean(np.argmax(outputs[f"{name}_logits"], -1) == outputs["labels"])
    assert accuracy == pytest.approx(summary[name]["run_test_accuracy"], abs=1e-6)
  with open(tmp_path / "cascade.csv") as f:
    rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
  first, last = rows[0], rows[-1]
  assert float(first["threshold"]) == 0.0 and float(last["threshold"]) > 1.0
  assert float(first["accuracy"]) == summary["cheap"]["test_accuracy"]
  assert float(last["accuracy"]) == summary["large"]["test_accuracy"]
  assert float(first["flops"]) == summary["cheap"]["flops"]
  assert float(last["flops"]) == summary["cheap"]["flops"] + summary["large"]["flops"]
  chosen = summary["chosen"]  # a threshold, or None: no cascade saves FLOPs (the quick one)
  assert chosen["threshold"] is None or 0.0 <= chosen["threshold"] <= 1.01
  if chosen["threshold"] is None:
    assert chosen["test_flops"] == summary["large"]["flops"]
    assert chosen["test_accuracy"] == summary["large"]["test_accuracy"]
