"""Test accuracy against the global batch size, for each large-batch recipe.

    python -m experiments.batch_size_sweep --config=configs/mnist1d.py --out=runs/batch_sweep

Trains the config at every batch size of --batch_sizes for every recipe, at the
config's number of epochs (train-longer recipes multiply it by batch / reference):

    none          the config's learning rate at every batch, no warmup
    linear        peak LR = lr x batch / reference, gradual warmup (Goyal et al. 2017)
    sqrt          peak LR = lr x sqrt(batch / reference), same warmup (Hoffer et al. 2017)
    linear+longer linear, and epochs x batch / reference (Hoffer's regime adaptation)
    sqrt+longer   sqrt, and epochs x batch / reference

and any of these with ghost batch normalization (Hoffer et al. 2017) appended,
e.g. linear+ghost32 or linear+longer+ghost128: every norm layer normalises ghost
batches of that many examples (config.model.norm = ghost_batch_norm).

The reference batch is the config's own train.batch_size: its recipe is the one
known to work. Writes OUT/results.csv (one row per run, appended as runs finish,
so an interrupted sweep continues where it stopped) and OUT/accuracy_vs_batch.png.
--quick runs two small batch sizes for two epochs, warmup 0.1 epochs (for tests).
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/mnist1d.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder for results.csv, the figure and the runs.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "64", "128", "256", "512", "1024", "2048"],
                                 "Global batch sizes to train at.")
_RECIPES = flags.DEFINE_list("recipes", ["none", "linear", "sqrt", "linear+longer", "sqrt+longer"],
                             "Recipes to compare (see the module docstring), e.g. "
                             "linear+longer+ghost32.")
_WARMUP_EPOCHS = flags.DEFINE_float("warmup_epochs", 2.0, "Warmup of the scaled recipes.")
_QUICK = flags.DEFINE_bool("quick", False, "Two batch sizes, two epochs: a smoke test.")

FIELDS = ["recipe", "batch_size", "peak_learning_rate", "epochs", "steps", "test_accuracy",
          "test_loss", "diverged", "seconds"]


def recipe_config(base, recipe: str, batch_size: int, reference: int, warmup_epochs: float):
  """The base config with one recipe applied at one global batch size."""
  scaling, longer, ghost = parse_recipe(recipe)
  ghost_norm = {"model.norm": "ghost_batch_norm", "model.ghost_batch_size": ghost}
  return common.quiet(base, **{
      "train.batch_size": batch_size,
      "train.eval_batch_size": min(1000, max(batch_size, 100)),
      "optimizer.scaling": scaling, "optimizer.reference_batch_size": reference,
      "optimizer.warmup_epochs": warmup_epochs if scaling != "none" else 0.0,
      "train.epochs_scaling": "linear" if longer else "none", **(ghost_norm if ghost else {})})


def parse_recipe(recipe: str) -> tuple[str, bool, int]:
  """"linear+longer+ghost32" -> ("linear", True, 32); raises ValueError if malformed."""
  scaling, *options = recipe.split("+")
  longer = "longer" in options
  ghosts = [o for o in options if o.startswith("ghost")]
  unknown = [o for o in options if o != "longer" and o not in ghosts]
  if (scaling not in ("none", "linear", "sqrt") or unknown or len(ghosts) > 1
      or options.count("longer") > 1 or any(not g[5:].isdigit() or int(g[5:]) == 0
                                            for g in ghosts)):
    raise ValueError(f"unknown recipe {recipe!r}")
  return scaling, longer, int(ghosts[0][5:]) if ghosts else 0


def run_sweep(base, out: str, batch_sizes: list[int], recipes: list[str],
              warmup_epochs: float) -> common.Results:
  from jaxddp import train

  reference = base.train.batch_size
  results = common.Results(os.path.join(out, "results.csv"), FIELDS,
                           lambda row: (row["recipe"], int(row["batch_size"])))
  todo = [(r, b) for r in recipes for b in batch_sizes if not results.done((r, b))]
  print(f"batch-size sweep: {len(todo)} runs to go ({len(results)} already in "
        f"{results.path}); reference batch {reference}", flush=True)
  for index, (recipe, batch_size) in enumerate(todo, 1):
    config = recipe_config(base, recipe, batch_size, reference, warmup_epochs)
    workdir = os.path.join(out, "runs", f"{recipe.replace('+', '_')}_b{batch_size}")
    start = time.time()
    row = {"recipe": recipe, "batch_size": batch_size}
    try:
      result = train.train_and_evaluate(config, workdir)
      resolved = result.recipe
      row.update(test_accuracy=result.eval_metrics["accuracy"],
                 test_loss=result.eval_metrics["loss"], diverged=0)
    except train.NonFiniteLossError as error:  # a row too: where the recipe breaks down
      resolved = error.recipe
      row.update(test_accuracy=float("nan"), test_loss=float("nan"), diverged=1)
    row.update(peak_learning_rate=resolved.peak_learning_rate, epochs=resolved.epochs,
               steps=resolved.total_steps, seconds=round(time.time() - start, 1))
    results.add(row)
    print(f"[{index}/{len(todo)}] {recipe:>22}  batch {batch_size:>5}  peak LR "
          f"{row['peak_learning_rate']:.3g}  {row['epochs']:.3g} epochs  test accuracy "
          f"{row['test_accuracy']:.4f}{'  (diverged)' if row['diverged'] else ''}  "
          f"{row['seconds']}s", flush=True)
  return results


def plot(results: common.Results, path: str, title: str) -> None:
  """Accuracy vs batch: all of it on the left, the top 10 points magnified on the right.

  A recipe and its +longer variant share a colour (dashed: longer); the marker
  tells the ghost batch size (a circle: ordinary batch norm).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results.rows()
  recipes = list(dict.fromkeys(r["recipe"] for r in rows))
  families = list(dict.fromkeys(r.replace("+longer", "") for r in recipes))
  ghosts = sorted({parse_recipe(r)[2] for r in recipes} - {0})
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for recipe in recipes:
    points = sorted((int(r["batch_size"]), float(r["test_accuracy"]))
                    for r in rows if r["recipe"] == recipe)
    _, longer, ghost = parse_recipe(recipe)
    style = dict(color=f"C{families.index(recipe.replace('+longer', '')) % 10}",
                 linestyle="--" if longer else "-",
                 marker="o" if not ghost else "s^Dvp"[ghosts.index(ghost) % 5], label=recipe)
    for ax in axes:
      ax.plot([b for b, _ in points], [a * 100 for _, a in points], **style)
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].set_title(title, fontsize="medium")
  top = max((float(r["test_accuracy"]) * 100 for r in rows if r["diverged"] == "0"), default=100)
  axes[1].set_ylim(top - 10, top + 0.5)
  axes[1].set_title("the top 10 points, magnified", fontsize="medium")
  axes[1].legend(fontsize="small", loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  if _CONFIG.value is None or not _OUT.value:
    raise common.Error("--config and --out are required")
  from jaxddp import config as config_lib
  base = _CONFIG.value
  batch_sizes = common.numbers("batch_sizes", _BATCH_SIZES.value, int, 1)
  warmup_epochs = _WARMUP_EPOCHS.value
  if _QUICK.value:
    base.train.num_epochs = 2
    warmup_epochs = 0.1
    batch_sizes = [b for b in batch_sizes if b <= 64][:2] or batch_sizes[:2]
  for recipe in _RECIPES.value:
    try:
      parse_recipe(recipe)
    except ValueError as error:
      raise common.Error(f"{error}; see the recipes in --helpfull") from None
  config_lib.validate(base)
  common.validate_runs(recipe_config(base, recipe, batch_size, base.train.batch_size,
                                     warmup_epochs)
                       for recipe in _RECIPES.value for batch_size in batch_sizes)
  common.check_out(_OUT.value)  # the first run creates it
  results = run_sweep(base, _OUT.value, batch_sizes, _RECIPES.value, warmup_epochs)
  figure = os.path.join(_OUT.value, "accuracy_vs_batch.png")
  plot(results, figure, f"{base.dataset.name}, {base.model.name}: test accuracy vs batch size "
                        f"({base.train.num_epochs} epochs)")
  print(f"wrote {results.path} and {figure}")


if __name__ == "__main__":
  common.run("batch_size_sweep.py", main)
