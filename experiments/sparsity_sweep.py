"""Test accuracy and training FLOPs against weight sparsity, for each sparse method.

    python -m experiments.sparsity_sweep --config=configs/mnist1d.py --out=runs/sparsity_sweep

Trains the config densely once (the reference), then each method of --methods at
each weight sparsity of --sparsities (SWAT with activation sparsity equal to the
weight sparsity), with the schedule below, counted in steps of the run:

    magnitude          one shot at 1/4 of the run, then training goes on
    gradual_magnitude  from 1/10 to 3/4 of the run, every --update_every steps
                       (the cubic schedule of Zhu & Gupta 2017)
    random             a random mask from the start
    swat               top-K weights recomputed every --update_every steps from the
                       start; sparse layer inputs for the kernel gradients

Every other setting is the config's (uniform distribution, layerwise, first layer
dense). Training FLOPs are jaxddp's analytical count over the whole run (see
docs/sparsity.md). Writes OUT/results.csv (one row per run, appended as runs
finish, so an interrupted sweep continues where it stopped) and
OUT/accuracy_vs_sparsity.png. --quick: two epochs, sparsity 0.8 only (for tests).
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/mnist1d.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder for results.csv, the figure and the runs.")
_METHODS = flags.DEFINE_list("methods", ["magnitude", "gradual_magnitude", "random", "swat"],
                             "Sparse methods to compare.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0", "0.5", "0.8", "0.9"],
                                "Weight sparsities to train at.")
_UPDATE_EVERY = flags.DEFINE_integer("update_every", 10, "Steps between mask updates "
                                     "(gradual_magnitude, swat).")
_QUICK = flags.DEFINE_bool("quick", False, "Two epochs, sparsity 0.8 only: a smoke test.")

FIELDS = ["method", "weight_sparsity", "activation_sparsity", "test_accuracy", "test_loss",
          "final_weight_sparsity", "forward_flops", "train_flops", "train_flops_dense",
          "flops_ratio", "steps", "seconds"]
METHODS = ("magnitude", "gradual_magnitude", "random", "swat")


def method_config(base, method: str, weight_sparsity: float, total_steps: int,
                  update_every: int):
  """The base config with one sparse method at one weight sparsity ("none": dense)."""
  start, end = {"magnitude": (total_steps // 4, 0),
                "gradual_magnitude": (total_steps // 10, total_steps * 3 // 4),
                }.get(method, (0, 0))
  return common.quiet(base, **{
      "sparsity.method": method, "sparsity.weight_sparsity": weight_sparsity,
      "sparsity.activation_sparsity": weight_sparsity if method == "swat" else 0.0,
      "sparsity.update_every": update_every, "sparsity.start_step": start,
      "sparsity.end_step": end})


def _total_steps(base) -> int:
  from jaxddp import config as config_lib
  from jaxddp import data
  dataset = data.load_dataset(base)  # any Dataset: in memory, tfds, an import path
  recipe = config_lib.resolve(base, num_train_examples=dataset.num_train_examples,
                              num_test_examples=dataset.num_test_examples, num_devices=1)
  return recipe.total_steps


def run_sweep(base, out: str, methods: list[str], sparsities: list[float],
              update_every: int) -> common.Results:
  from jaxddp import train

  results = common.Results(os.path.join(out, "results.csv"), FIELDS,
                           lambda row: (row["method"], float(row["weight_sparsity"])))
  runs = [("none", 0.0)] + [(m, s) for m in methods for s in sparsities]
  todo = [run for run in runs if not results.done(run)]
  total_steps = _total_steps(base)
  print(f"sparsity sweep: {len(todo)} runs to go ({len(runs) - len(todo)} already in "
        f"{results.path}); {total_steps} steps each", flush=True)
  for index, (method, weight_sparsity) in enumerate(todo, 1):
    config = method_config(base, method, weight_sparsity, total_steps, update_every)
    workdir = os.path.join(out, "runs", f"{method}_s{weight_sparsity:g}")
    start = time.time()
    result = train.train_and_evaluate(config, workdir)
    final = result.report
    row = {"method": method, "weight_sparsity": weight_sparsity,
           "activation_sparsity": config.sparsity.activation_sparsity,
           "test_accuracy": result.eval_metrics["accuracy"],
           "test_loss": result.eval_metrics["loss"],
           "final_weight_sparsity": final["sparsity/total"],
           "forward_flops": final["flops/forward_sparse"],
           "train_flops": final["flops/train_total"],
           "train_flops_dense": final["flops/train_total_dense"],
           "flops_ratio": final["flops/train_total"] / final["flops/train_total_dense"],
           "steps": total_steps, "seconds": round(time.time() - start, 1)}
    results.add(row)
    print(f"[{index}/{len(todo)}] {method:>17}  sparsity {weight_sparsity:<4g}  test accuracy "
          f"{row['test_accuracy']:.4f}  training FLOPs {row['flops_ratio']:.2f}x dense  "
          f"{row['seconds']}s", flush=True)
  return results


def plot(results: common.Results, path: str, title: str) -> None:
  """Accuracy against weight sparsity (left) and against training FLOPs (right)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results.rows()
  dense = [float(r["test_accuracy"]) * 100 for r in rows if r["method"] == "none"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for i, method in enumerate(m for m in METHODS if any(r["method"] == m for r in rows)):
    points = sorted((float(r["weight_sparsity"]), float(r["flops_ratio"]),
                     float(r["test_accuracy"]) * 100) for r in rows if r["method"] == method)
    style = dict(color=f"C{i}", marker="os^D"[i], label=method)
    axes[0].plot([s for s, _, _ in points], [a for _, _, a in points], **style)
    axes[1].plot([f for _, f, _ in points], [a for _, _, a in points], **style)
  for ax in axes:
    if dense:
      ax.axhline(dense[0], color="black", linestyle=":", label="dense")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
  axes[0].set_xlabel("weight sparsity")
  axes[0].set_title(title, fontsize="medium")
  axes[1].set_xlabel("training FLOPs, fraction of dense (analytical)")
  axes[1].set_title("accuracy against the training FLOPs", fontsize="medium")
  axes[1].legend(fontsize="small", loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  if _CONFIG.value is None or not _OUT.value:
    raise common.Error("--config and --out are required")
  from jaxddp import config as config_lib
  base = _CONFIG.value
  unknown = [m for m in _METHODS.value if m not in METHODS]
  if unknown:
    raise common.Error(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(METHODS)}")
  sparsities = common.numbers("sparsities", _SPARSITIES.value, float, 0, 1, high_open=True)
  if _QUICK.value:
    base.train.num_epochs = 2
    sparsities = [0.8]
  config_lib.validate(base)
  total_steps = _total_steps(base)
  common.validate_runs(method_config(base, method, sparsity, total_steps, _UPDATE_EVERY.value)
                       for method in _METHODS.value for sparsity in sparsities)
  common.check_out(_OUT.value)  # the first run creates it
  results = run_sweep(base, _OUT.value, _METHODS.value, sparsities, _UPDATE_EVERY.value)
  figure = os.path.join(_OUT.value, "accuracy_vs_sparsity.png")
  plot(results, figure, f"{base.dataset.name}, {base.model.name}: test accuracy vs weight "
                        f"sparsity ({base.train.num_epochs} epochs)")
  print(f"wrote {results.path} and {figure}")


if __name__ == "__main__":
  common.run("sparsity_sweep.py", main)
