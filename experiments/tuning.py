"""What hyperparameter search finds on MNIST-1D, with jaxddp.tune.

    python -m experiments.tuning --config=configs/tune_mnist1d.py --out=runs/tuning

Three parts (--parts), each a set of studies in OUT/<part>/<study> (an interrupted
experiment continues where it stopped: a finished study is read back, an unfinished
one goes on):

    lr_vs_batch  the learning rate tuned alone (the grid sampler over --lr_grid, powers
                 of 2 from 2^-9 to 2^3: the tuned rate is known within a factor of 2,
                 and each batch size gets the whole accuracy-against-rate curve) at
                 every batch size of --batch_sizes, for the same number of epochs of
                 --lr_examples training examples; against what the linear and the
                 square-root scaling rules predict from the tuned rate at the config's
                 own batch size.
    samplers     the config's whole space (learning rate, weight decay, batch size,
                 label smoothing), --search_trials trials, TPE against random search,
                 no pruning, one study per seed of --seeds: trials until the running
                 best is within --within points of the best any study found.
    pruning      the same TPE studies with ASHA on an evaluation every --eval_every
                 steps: training steps until the running best is within --within
                 points of the same seed's unpruned study's best, and in all.

Then the best config any search found is trained again with training seeds 1 and 2
(OUT/noise/): the spread says how much of a difference between trials is noise.

Every study runs --workers workers of one emulated CPU device each. Writes
OUT/results.csv (one row per study), OUT/summary.json and OUT/tuning.png. --quick: two
batch sizes, two trials, one seed, one worker (a smoke test).
"""

from __future__ import annotations

import json
import math
import os

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tune_mnist1d.py",
                                          "Base config with a tune section.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the studies, results and figure.")
_PARTS = flags.DEFINE_list("parts", ["lr_vs_batch", "samplers", "pruning"], "Parts to run.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64", "128", "256", "512",
                                                 "1024", "2048", "4096"],
                                 "lr_vs_batch: global batch sizes.")
_LR_GRID = flags.DEFINE_list("lr_grid", [repr(2.0**k) for k in range(-9, 4)],
                             "lr_vs_batch: the learning rates tried at every batch size.")
_LR_EXAMPLES = flags.DEFINE_integer("lr_examples", 8192, "lr_vs_batch: training examples "
                                    "(MNIST-1D generates more than its standard 4000).")
_LR_EPOCHS = flags.DEFINE_float("lr_epochs", 8, "lr_vs_batch: epochs at every batch size.")
_SEARCH_TRIALS = flags.DEFINE_integer("search_trials", 20, "samplers, pruning: trials per study.")
_SEARCH_EPOCHS = flags.DEFINE_float("search_epochs", 5, "samplers, pruning: epochs per trial.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "samplers, pruning: the searches' seeds.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 20, "pruning: steps between evaluations.")
_WITHIN = flags.DEFINE_float("within", 0.2, "Points of accuracy that count as reaching a best.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Workers per study (one CPU device each).")
_QUICK = flags.DEFINE_bool("quick", False, "Two batch sizes, two trials, one seed, one worker.")

PARTS = ("lr_vs_batch", "samplers", "pruning")
FIELDS = ["part", "study", "batch_size", "sampler", "pruner", "seed", "trials", "best_accuracy",
          "best_learning_rate", "trials_to_best", "steps_to_best", "steps_run", "steps_planned",
          "pruned", "diverged", "seconds"]


def lr_config(base, batch_size: int, grid: list[float], workers: int, examples: int,
              epochs: float):
  """The learning rate alone, over a grid at one batch size: no scaling rule, no warmup."""
  config = common.quiet(base, **{
      "dataset.num_train_examples": examples, "train.batch_size": batch_size,
      "train.eval_batch_size": 1000, "train.num_epochs": epochs, "optimizer.scaling": "none",
      "optimizer.warmup_epochs": 0.0, "tune.num_trials": len(grid), "tune.sampler": "grid",
      "tune.pruner": "none", "tune.devices_per_trial": 1, "parallel.cpu_devices": workers})
  config.tune.space = type(config.tune.space)(
      {"optimizer": {"learning_rate": f"choice({', '.join(map(repr, grid))})"}})
  return config


def search_config(base, sampler: str, pruner: str, seed: int, trials: int, workers: int,
                  epochs: float, eval_every: int):
  """The config's whole space, one sampler and pruner, one seed of the search."""
  return common.quiet(base, **{
      "train.num_epochs": epochs, "train.eval_batch_size": 1000,
      "train.eval_every": eval_every if pruner != "none" else 0, "tune.num_trials": trials,
      "tune.sampler": sampler, "tune.pruner": pruner, "tune.seed": seed,
      "tune.devices_per_trial": 1, "parallel.cpu_devices": workers})


def trials_in_order(study):
  """The study's ended trials by number: (accuracy or None, steps run, params)."""
  from optuna.trial import TrialState
  out = []
  for t in sorted(study.trials, key=lambda t: t.number):
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
      value = t.value if t.state == TrialState.COMPLETE else None
      out.append((value, t.user_attrs.get("steps") or 0, t.params))
  return out


def to_reach(trials, target: float):
  """(trials, steps) run until the running best reaches `target`; (None, None) if never."""
  steps = 0
  for count, (value, steps_run, _) in enumerate(trials, start=1):
    steps += steps_run
    if value is not None and value >= target - 1e-12:
      return count, steps
  return None, None


def main():
  from jaxddp import tune as tune_lib
  quick = _QUICK.value
  out = common.check_out(_OUT.value)
  parts = _PARTS.value
  for part in parts:
    if part not in PARTS:
      raise common.Error(f"--parts: {part!r} is not one of {', '.join(PARTS)}")
  if "pruning" in parts and "samplers" not in parts:
    raise common.Error("--parts=pruning compares with the samplers part's TPE studies: "
                       "add samplers")
  batch_sizes = [int(b) for b in common.numbers("batch_sizes", _BATCH_SIZES.value, int, 1)]
  seeds = [int(s) for s in common.numbers("seeds", _SEEDS.value, int, 0)]
  grid = common.numbers("lr_grid", _LR_GRID.value, float, 0)
  if min(grid) <= 0:
    raise common.Error("--lr_grid: learning rates must be > 0")
  workers, search_trials = _WORKERS.value, _SEARCH_TRIALS.value
  lr_epochs, search_epochs, examples = _LR_EPOCHS.value, _SEARCH_EPOCHS.value, _LR_EXAMPLES.value
  if quick:
    batch_sizes, seeds, workers, grid, search_trials = [64, 128], [0], 1, [0.01, 0.1], 2
    lr_epochs, search_epochs, examples = 1, 1, 4000
  base = _CONFIG.value
  reference = base.train.batch_size

  studies = []  # (part, name, config, row fields)
  if "lr_vs_batch" in parts:
    for b in batch_sizes:
      studies.append(("lr_vs_batch", f"b{b}", lr_config(base, b, grid, workers, examples,
                                                        lr_epochs),
                      {"batch_size": b, "sampler": "tpe", "pruner": "none"}))
  for sampler, pruner, part in (("tpe", "none", "samplers"), ("random", "none", "samplers"),
                                ("tpe", "asha", "pruning")):
    if part in parts:
      for seed in seeds:
        studies.append((part, f"{sampler}_{pruner}_s{seed}", search_config(
            base, sampler, pruner, seed, search_trials, workers, search_epochs,
            _EVAL_EVERY.value), {"sampler": sampler, "pruner": pruner, "seed": seed}))
  for _, _, config, _ in studies:  # every study's config and space, before any trains
    tune_lib.check(config)
  out = common.out_dir(out)

  results = common.Results(os.path.join(out, "results.csv"), FIELDS,
                           key=lambda r: (r["part"], r["study"]))
  finished = {}
  for part, name, config, fields in studies:
    workdir = os.path.join(out, part, name)
    result = tune_lib.tune(config, workdir, workers=workers)
    finished[(part, name)] = (result, fields)
    if not results.done((part, name)):
      best = result.study.best_trial if result.best_trial is not None else None
      results.add({"part": part, "study": name, **fields, "trials": len(result.study.trials),
                   "best_accuracy": result.best_value,
                   "best_learning_rate": best.params.get("optimizer.learning_rate") if best
                   else None, "steps_run": result.steps_run,
                   "steps_planned": result.steps_planned, "pruned": result.pruned,
                   "diverged": result.diverged, "seconds": round(result.seconds, 1)})
  summary = summarise(finished, reference, _WITHIN.value)
  if "search" in summary:
    summary["noise"] = seed_noise(finished, summary, out, seeds=(1, 2) if not quick else (1,))
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plot(finished, summary, reference, os.path.join(out, "tuning.png"))
  print(json.dumps(summary, indent=2))


def summarise(finished, reference: int, within: float) -> dict:
  """The figures docs/tuning.md reports, from the finished studies."""
  summary: dict = {}
  lr = {fields["batch_size"]: result for (part, _), (result, fields) in finished.items()
        if part == "lr_vs_batch"}
  if lr:
    tuned = {b: r.study.best_params["optimizer.learning_rate"] for b, r in lr.items()
             if r.best_trial is not None}
    base_lr = tuned.get(reference)
    rows = []
    for b in sorted(lr):
      r = lr[b]
      # Near the optimum the curve is flat within the noise: the band of rates within
      # --within points of the best says more than the single best one.
      curve = [(t.params["optimizer.learning_rate"], t.value) for t in r.study.trials
               if t.value is not None and t.state.name == "COMPLETE"]
      good = [lr for lr, value in curve if r.best_value is not None and
              value >= r.best_value - within / 100]
      row = {"batch_size": b, "best_accuracy": r.best_value, "tuned_lr": tuned.get(b),
             "good_lr_low": min(good, default=None), "good_lr_high": max(good, default=None),
             "diverged": r.diverged,
             "curve": sorted(curve)}
      if base_lr and b in tuned:
        row["linear_rule_lr"] = base_lr * b / reference
        row["sqrt_rule_lr"] = base_lr * math.sqrt(b / reference)
        row["tuned_over_linear"] = tuned[b] / row["linear_rule_lr"]
        row["tuned_over_sqrt"] = tuned[b] / row["sqrt_rule_lr"]
      rows.append(row)
    summary["lr_vs_batch"] = {"reference_batch_size": reference, "within_points": within,
                              "rows": rows}
  searches = {name: (result, fields) for (part, name), (result, fields) in finished.items()
              if part in ("samplers", "pruning")}
  if searches:
    best = max(r.best_value for r, _ in searches.values() if r.best_value is not None)
    target = best - within / 100
    rows = []
    for name, (r, fields) in sorted(searches.items()):
      trials = trials_in_order(r.study)
      count, steps = to_reach(trials, target)
      unpruned = searches.get(f"tpe_none_s{fields['seed']}")
      same_best = {}
      if fields["pruner"] != "none" and unpruned and unpruned[0].best_value is not None:
        own = unpruned[0].best_value - within / 100
        same_best = dict(zip(("trials_to_unpruned_best", "steps_to_unpruned_best"),
                             to_reach(trials, own)))
        unpruned_trials = trials_in_order(unpruned[0].study)
        same_best["unpruned_steps_to_its_best"] = to_reach(unpruned_trials, own)[1]
      rows.append({"study": name, **fields, "best_accuracy": r.best_value,
                   "trials_to_global_best": count, "steps_to_global_best": steps,
                   "steps_run": r.steps_run, "steps_planned": r.steps_planned,
                   "pruned": r.pruned, "diverged": r.diverged, **same_best})
    summary["search"] = {"best_found": best, "within_points": within, "rows": rows}
  return summary


def seed_noise(finished, summary, out: str, seeds) -> dict:
  """The best config any search found, trained again with other training seeds
  (config.seed): how much of a difference between trials is the seed's."""
  import jaxddp
  name = max((row for row in summary["search"]["rows"] if row["best_accuracy"] is not None),
             key=lambda row: row["best_accuracy"])["study"]
  result = next(r for (part, study), (r, _) in finished.items() if study == name)
  accuracies = [result.best_value]
  for seed in seeds:
    config = result.best_config.copy_and_resolve_references()
    config.seed = seed
    run = jaxddp.train_and_evaluate(config, os.path.join(out, "noise", f"seed{seed}"))
    accuracies.append(run.eval_metrics["accuracy"])
  mean = sum(accuracies) / len(accuracies)
  spread = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / max(1, len(accuracies) - 1))
  return {"study": name, "trial": result.best_trial, "seeds": [0, *seeds],
          "accuracies": accuracies, "mean": mean, "std": spread,
          "range": max(accuracies) - min(accuracies)}


def plot(finished, summary, reference: int, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # Two panels for each part: the learning rates and accuracy against the batch size; the
  # searches' running best against trials (samplers) and against steps (pruning).
  panels = [p for p in ("lr_vs_batch", "search") if p in summary]
  if not panels:
    return
  figure, axes = plt.subplots(1, 2 * len(panels), figsize=(6 * 2 * len(panels), 4.5))
  axes = list(axes)
  if "lr_vs_batch" in summary:
    rows = [r for r in summary["lr_vs_batch"]["rows"] if r["tuned_lr"]]
    sizes = [r["batch_size"] for r in rows]
    ax = axes.pop(0)
    ax.loglog(sizes, [r["tuned_lr"] for r in rows], "o-", label="tuned (best on the grid)")
    ax.fill_between(sizes, [r["good_lr_low"] for r in rows], [r["good_lr_high"] for r in rows],
                    alpha=0.2, label=f"within {summary['lr_vs_batch']['within_points']} "
                    "points of the best")
    if rows and "linear_rule_lr" in rows[0]:
      ax.loglog(sizes, [r["linear_rule_lr"] for r in rows], "--", label="linear rule")
      ax.loglog(sizes, [r["sqrt_rule_lr"] for r in rows], ":", label="square-root rule")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("learning rate")
    ax.set_title(f"tuned learning rate (rules anchored at batch {reference})")
    ax.legend()
    ax = axes.pop(0)
    ax.semilogx(sizes, [100 * r["best_accuracy"] for r in rows], "o-")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title("best accuracy at equal epochs")
  if "search" in summary:
    by_trials, by_steps = axes.pop(0), axes.pop(0)
    colours = {"tpe_none": "C0", "random_none": "C1", "tpe_asha": "C2"}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({f["seed"] for (part, _), (_, f) in finished.items() if part != "lr_vs_batch"})
    best_found = 100 * summary["search"]["best_found"]
    for (part, name), (result, fields) in sorted(finished.items()):
      if part == "lr_vs_batch":
        continue
      kind = f"{fields['sampler']}_{fields['pruner']}"
      steps, best, counts, step_counts, ys = 0, -1.0, [], [], []
      for count, (value, steps_run, _) in enumerate(trials_in_order(result.study), start=1):
        steps += steps_run
        if value is not None:
          best = max(best, value)
        if best >= 0:
          counts.append(count)
          step_counts.append(steps)
          ys.append(100 * best)
      style = dict(where="post", color=colours.get(kind, "k"),
                   linestyle=styles[seeds.index(fields["seed"]) % len(styles)],
                   label=f"{kind.replace('_', ' + ')}, seed {fields['seed']}",
                   # pruned searches are short: drawn over the others
                   linewidth=2.5 if fields["pruner"] != "none" else 1.5,
                   zorder=3 if fields["pruner"] != "none" else 2)
      if fields["pruner"] == "none":
        by_trials.step(counts, ys, **style)
      if fields["sampler"] == "tpe":
        by_steps.step(step_counts, ys, **style)
    within = summary["search"]["within_points"]  # points
    by_steps.set_xscale("log")  # pruned searches end 4 to 7 times sooner
    for ax, xlabel, title in ((by_trials, "trials run", "TPE against random search"),
                              (by_steps, "training steps run (log)", "TPE: ASHA against none")):
      ax.axhline(best_found - within, color="grey", linewidth=0.8,
                 label=f"{within:g} points below the best found")
      ax.set_ylim(best_found - 3, best_found + 0.5)  # the last 3 points, where they differ
      ax.set_xlabel(xlabel)
      ax.set_ylabel("best test accuracy so far (%)")
      ax.set_title(title)
      ax.legend(fontsize=8, loc="lower right")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


if __name__ == "__main__":
  common.run("experiments.tuning", main, required=("out",))
