"""Data pruning on MNIST-1D: static scores and policies in a scarce and an abundant regime,
and InfoBatch's dynamic pruning.

    python -m experiments.data_pruning --config=configs/mnist1d.py --out=runs/data_pruning

Static part, in each regime of --regimes (training-set sizes; MNIST-1D generates
any number, the test set is always the standard 1000):

1. Scores with `jaxddp.score`: EL2N (--el2n_runs runs of --score_epochs epochs),
   forgetting (one run as long as the reference), and prototype (k-means on the
   embeddings of the reference run). Their cost in seconds is recorded.
2. The reference: all the data for the regime's number of updates (--steps, one
   per regime; default 620, the config's 20 epochs of the 4000, and 940, 3 epochs
   of the 40,000).
3. For each fraction of --fractions and each policy of --policies (hard, easy,
   random, ccs) an EL2N subset, and forgetting and prototype subsets (hard and
   easy) at --other_fraction. Every static run makes as many updates as the
   reference (train.num_steps), as CCS's comparisons do: the subsets differ in
   which examples they hold, not in the compute they get.

Dynamic part (the first regime, the config's epochs): all the data, then InfoBatch
at each ratio of --prune_ratios, then for each a random static subset of the same
cost (keep_fraction = the fraction of examples InfoBatch saw, the same epochs).

Writes OUT/results.csv (one row per run, appended as runs finish: an interrupted
experiment continues where it stopped), OUT/static.png and OUT/dynamic.png. One seed
per point. --quick: tiny sizes for tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/mnist1d.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder for results.csv, figures and runs.")
_REGIMES = flags.DEFINE_list("regimes", ["4000", "40000"], "Training-set sizes (MNIST-1D).")
_STEPS = flags.DEFINE_list("steps", ["620", "940"], "Updates of every static run, per regime.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.7", "0.5", "0.3", "0.1"],
                               "Fractions of the training set kept (EL2N).")
_POLICIES = flags.DEFINE_list("policies", ["hard", "easy", "random", "ccs"], "Static policies.")
_OTHER_FRACTION = flags.DEFINE_float("other_fraction", 0.5,
                                     "Fraction kept for the forgetting and prototype subsets.")
_EL2N_RUNS = flags.DEFINE_integer("el2n_runs", 4, "Runs EL2N averages over.")
_SCORE_EPOCHS = flags.DEFINE_float("score_epochs", 2.0, "Epochs of each EL2N run.")
_PRUNE_RATIOS = flags.DEFINE_list("prune_ratios", ["0.3", "0.5", "0.7"], "InfoBatch ratios.")
_PARTS = flags.DEFINE_list("parts", ["static", "dynamic"], "What to run.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test.")

FIELDS = ["part", "regime", "score", "policy", "keep_fraction", "prune_ratio", "examples_kept",
          "steps", "examples_seen", "test_accuracy", "test_loss", "seconds", "score_seconds"]


def _config(base, regime: int, **changes):
  return common.quiet(base, **{"dataset.num_train_examples": regime}, **changes)


def _key(row) -> tuple:
  return (row["part"], int(row["regime"]), row["score"], row["policy"],
          round(float(row["keep_fraction"]), 6), round(float(row["prune_ratio"]), 6))


@dataclasses.dataclass
class Settings:
  fractions: list[float]
  policies: list[str]
  other_fraction: float
  other_policies: list[str]
  el2n_runs: int
  score_epochs: float
  prune_ratios: list[float]


class Experiment:
  def __init__(self, base, out: str, settings: Settings):
    self.base, self.out, self.settings = base, out, settings
    self.results = common.Results(os.path.join(out, "results.csv"), FIELDS, _key)

  def score(self, regime: int, name: str, **changes) -> tuple[str, float]:
    """(path of the scores, seconds they took), computed once per regime. Their .json
    is read even when they were just computed: it is the record of scores an earlier
    invocation computed, and jaxddp.score.score returns the values alone."""
    from jaxddp import score
    workdir = os.path.join(self.out, f"scores_{regime}")
    path = os.path.join(workdir, "scores", f"{name}.npy")
    if not os.path.exists(path):
      config = _config(self.base, regime, **{"data_pruning.score": name}, **changes)
      score.score(config, workdir)
    with open(path[:-4] + ".json") as f:
      return path, json.load(f)["seconds"]

  def run_dir(self, part: str, regime: int, score: str, policy: str, keep: float,
              prune_ratio: float = 0.0) -> str:
    return os.path.join(self.out, "runs",
                        f"{part}_{regime}_{score}_{policy}_k{keep:g}_r{prune_ratio:g}")

  def train(self, part: str, regime: int, score: str, policy: str, keep: float,
            prune_ratio: float = 0.0, score_seconds: float = 0.0, **changes) -> dict:
    from jaxddp import train
    row = {"part": part, "regime": regime, "score": score, "policy": policy,
           "keep_fraction": keep, "prune_ratio": prune_ratio}
    if self.results.done(_key(row)):
      return self.results.row(_key(row))
    workdir = self.run_dir(part, regime, score, policy, keep, prune_ratio)
    config = _config(self.base, regime, **changes)
    start = time.time()
    result = train.train_and_evaluate(config, workdir)
    steps = result.last_step  # InfoBatch: fewer than the recipe's total_steps
    row.update(examples_kept=result.recipe.num_train_examples, steps=steps,
               examples_seen=steps * result.recipe.effective_batch_size,
               test_accuracy=result.eval_metrics["accuracy"],
               test_loss=result.eval_metrics["loss"], seconds=round(time.time() - start, 1),
               score_seconds=score_seconds)
    written = self.results.add(row)
    print(f"{part:>7} n={regime:<6} {score:>10} {policy:>6} keep {keep:<5g} ratio "
          f"{prune_ratio:<4g} steps {steps:<5} test accuracy {row['test_accuracy']:.4f}  "
          f"{row['seconds']}s", flush=True)
    return written


def run_static(exp: Experiment, regime: int, steps: int) -> None:
  fixed = {"train.num_steps": steps}
  exp.train("static", regime, "none", "all", 1.0, **fixed)  # the reference
  el2n, el2n_seconds = exp.score(regime, "el2n", **{
      "data_pruning.num_runs": exp.settings.el2n_runs,
      "data_pruning.score_epochs": exp.settings.score_epochs})
  reference = exp.run_dir("static", regime, "none", "all", 1.0)
  steps_per_epoch = regime // exp.base.train.batch_size
  forgetting, forgetting_seconds = exp.score(
      regime, "forgetting", **{"train.num_epochs": max(1, round(steps / steps_per_epoch))})
  prototype, prototype_seconds = exp.score(regime, "prototype",
                                           **{"init_from.workdir": reference})
  for keep in exp.settings.fractions:
    for policy in exp.settings.policies:
      if policy == "ccs" and keep > 1 - exp.base.data_pruning.ccs_drop_fraction:
        continue
      exp.train("static", regime, "el2n", policy, keep, score_seconds=el2n_seconds, **fixed, **{
          "data_pruning.scores": el2n, "data_pruning.keep_fraction": keep,
          "data_pruning.policy": policy})
  keep = exp.settings.other_fraction
  for name, path, seconds in (("forgetting", forgetting, forgetting_seconds),
                              ("prototype", prototype, prototype_seconds)):
    for policy in exp.settings.other_policies:
      exp.train("static", regime, name, policy, keep, score_seconds=seconds, **fixed, **{
          "data_pruning.scores": path, "data_pruning.keep_fraction": keep,
          "data_pruning.policy": policy})


def run_dynamic(exp: Experiment, regime: int) -> None:
  exp.train("dynamic", regime, "none", "all", 1.0)
  for ratio in exp.settings.prune_ratios:
    row = exp.train("dynamic", regime, "infobatch", "infobatch", 1.0, prune_ratio=ratio, **{
        "data_pruning.dynamic": "infobatch", "data_pruning.prune_ratio": ratio})
    seen = float(row["steps"]) / (regime // exp.base.train.batch_size * exp.base.train.num_epochs)
    exp.train("dynamic", regime, "none", "random", round(seen, 4), prune_ratio=ratio, **{
        "data_pruning.keep_fraction": round(seen, 4), "data_pruning.policy": "random"})


def plot(results: common.Results, out: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results.rows()
  written = []
  static = [r for r in rows if r["part"] == "static"]
  regimes = sorted({int(r["regime"]) for r in static})
  if regimes:
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
      here = [r for r in static if int(r["regime"]) == regime]
      full = [float(r["test_accuracy"]) * 100 for r in here if r["score"] == "none"]
      for i, policy in enumerate(p for p in ("hard", "easy", "random", "ccs")
                                 if any(r["policy"] == p and r["score"] == "el2n" for r in here)):
        points = sorted((float(r["keep_fraction"]), float(r["test_accuracy"]) * 100)
                        for r in here if r["score"] == "el2n" and r["policy"] == policy)
        points += [(1.0, full[0])] if full else []
        points.sort()
        ax.plot(*zip(*points), marker="os^D"[i], color=f"C{i}", label=f"EL2N {policy}")
      for j, (score, policy) in enumerate(((s, p) for s in ("forgetting", "prototype")
                                           for p in ("hard", "easy"))):
        points = [(float(r["keep_fraction"]), float(r["test_accuracy"]) * 100) for r in here
                  if r["score"] == score and r["policy"] == policy]
        if points:
          ax.scatter(*zip(*points), marker="xP*v"[j], s=70, color=f"C{4 + j}",
                     label=f"{score} {policy}", zorder=3)
      if full:
        ax.axhline(full[0], color="black", linestyle=":", label="all data")
      ax.set_xlabel("fraction of the training set kept")
      ax.set_ylabel("test accuracy (%)")
      ax.set_title(f"{regime} training examples, same number of updates", fontsize="medium")
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    path = os.path.join(out, "static.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  dynamic = [r for r in rows if r["part"] == "dynamic"]
  if dynamic:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for label, match, style in (
        ("all data", lambda r: r["policy"] == "all", dict(color="black", marker="s")),
        ("InfoBatch", lambda r: r["score"] == "infobatch", dict(color="C0", marker="o")),
        ("random static subset, same cost", lambda r: r["policy"] == "random",
         dict(color="C1", marker="^"))):
      points = sorted((float(r["examples_seen"]), float(r["seconds"]),
                       float(r["test_accuracy"]) * 100) for r in dynamic if match(r))
      if points:
        axes[0].plot([p[0] for p in points], [p[2] for p in points], label=label, **style)
        axes[1].plot([p[1] for p in points], [p[2] for p in points], label=label, **style)
    axes[0].set_xlabel("examples seen in training")
    axes[1].set_xlabel("wall time of the run (s, this CPU)")
    for ax in axes:
      ax.set_ylabel("test accuracy (%)")
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize="small", loc="lower right")
    axes[0].set_title("InfoBatch at prune ratios " + ", ".join(sorted(
        {r["prune_ratio"] for r in dynamic if r["score"] == "infobatch"})), fontsize="medium")
    fig.tight_layout()
    path = os.path.join(out, "dynamic.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def _planned_configs(base, regimes: list[int], steps: list[int], settings: Settings):
  """The config of every run and scoring the flags ask for, with their values (the scores
  files do not exist yet: a placeholder name stands in), to check before any trains."""
  for regime, count in zip(regimes, steps):
    fixed = {"train.num_steps": count}
    yield _config(base, regime, **fixed)
    yield _config(base, regime, **{"data_pruning.score": "el2n",
                                   "data_pruning.num_runs": settings.el2n_runs,
                                   "data_pruning.score_epochs": settings.score_epochs})
    for keep, policy in [(k, p) for k in settings.fractions for p in settings.policies] + [
        (settings.other_fraction, p) for p in settings.other_policies]:
      yield _config(base, regime, **fixed, **{"data_pruning.scores": "scores.npy",
                                              "data_pruning.keep_fraction": keep,
                                              "data_pruning.policy": policy})
    for ratio in settings.prune_ratios:
      yield _config(base, regime, **{"data_pruning.dynamic": "infobatch",
                                     "data_pruning.prune_ratio": ratio})


def main() -> None:
  if _CONFIG.value is None or not _OUT.value:
    raise common.Error("--config and --out are required")
  from jaxddp import config as config_lib
  base = _CONFIG.value
  regimes = common.numbers("regimes", _REGIMES.value, int, 1)
  steps = common.numbers("steps", _STEPS.value, int, 1)
  settings = Settings(common.numbers("fractions", _FRACTIONS.value, float, 0, 1),
                      _POLICIES.value, _OTHER_FRACTION.value, ["hard", "easy"],
                      _EL2N_RUNS.value, _SCORE_EPOCHS.value,
                      common.numbers("prune_ratios", _PRUNE_RATIOS.value, float, 0, 1,
                                     high_open=True))
  unknown = sorted(set(_PARTS.value) - {"static", "dynamic"})
  if unknown or not _PARTS.value:
    raise common.Error(f"--parts={','.join(_PARTS.value)}: choose static, dynamic or both")
  if _QUICK.value:
    regimes, steps = regimes[:1], [12]
    base.train.num_epochs = 3
    settings = Settings([0.5], ["hard", "ccs"], 0.5, ["hard"], 1, 1.0, [0.5])
  if len(steps) != len(regimes):
    raise common.Error(f"--steps needs one number per regime ({len(regimes)})")
  config_lib.validate(base)
  common.validate_runs(_planned_configs(base, regimes, steps, settings))
  common.check_out(_OUT.value)  # the first run creates it
  exp = Experiment(base, _OUT.value, settings)
  if "static" in _PARTS.value:
    for regime, count in zip(regimes, steps):
      run_static(exp, regime, count)
  if "dynamic" in _PARTS.value:
    run_dynamic(exp, regimes[0])
  figures = plot(exp.results, _OUT.value)
  print(f"wrote {exp.results.path} and {', '.join(figures)}")


if __name__ == "__main__":
  common.run("data_pruning.py", main)
