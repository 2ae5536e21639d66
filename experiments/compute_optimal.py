r"""Compute-optimal model size against data on MNIST-1D: IsoFLOP profiles (Hoffmann et al.
2022, approaches 2 and 3) and a planner from the fit.

    python -m experiments.compute_optimal --config=configs/mnist1d.py --out=runs/isoflop
    python -m experiments.compute_optimal --fit=runs/isoflop/fit.json --predict=3e13
    python -m experiments.compute_optimal --config=configs/mnist1d.py --out=runs/isoflop \
        --check --check_seeds=0,1,2,3,4,5

For each budget C of --budgets (training FLOPs), each width of --widths and each seed
of --seeds, the config's model at that width trains for one pass over D fresh
examples: the whole batches C buys at the model's training FLOPs per example
(jaxddp.scaling.model_cost, jaxddp's own FLOPs count). A (budget, width) whose D is
fewer than --min_steps batches or more than --max_examples is left out (the plan
printed first says which).
MNIST-1D generates the examples (the standard 4000, then fresh ones); every run reads
a prefix of the same pool, once, and is evaluated on the standard 1000 test examples.

The recipe is the config's at every size: momentum SGD, peak LR 0.1, a cosine decay
to 0 that ends with the pass, batch 128, weight decay 5e-4; batch norm after every
convolution keeps the step size of the weights largely independent of the width.

Then jaxddp.scaling fits the final test losses, averaged over the seeds: a parabola in
log N per budget (the widths within --window decades of the lowest) and power laws
through the minima (approach 2), and L(N, D) = E + A/N^alpha + B/D^beta (approach 3,
Huber loss), both with bootstrap intervals that resample each point's seeds (none
with one seed). Writes OUT/results.csv (one row per run, appended as runs finish: an
interrupted experiment continues), OUT/fit.json (a jaxddp.scaling.Fit) and OUT/isoflop.png.

--check trains, at --check_factor x the largest budget, the width the fit predicts and
one on each side (x/1.5, x1.5), with each of --check_seeds, and writes OUT/check.json.
--fit=FIT --predict=C prints the plan for budget C (jaxddp.scaling.Fit.load(FIT).plan(C))
and refuses one more than 100x outside the fitted budgets.
--quick: tiny budgets and widths, for tests.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import common
from experiments.common import Error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/mnist1d.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder for results.csv, fit.json, isoflop.png.")
_BUDGETS = flags.DEFINE_list("budgets", ["1e10", "2e10", "3e10", "6e10", "1e11", "2e11",
                                         "3e11"], "Training budgets in FLOPs.")
_WIDTHS = flags.DEFINE_list("widths", ["2", "3", "4", "6", "8", "12", "16", "24", "32", "48",
                                       "64"], "Widths of the model family (config.model.width).")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 16, "Fewest steps a run may have.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 2_500_000, "Most examples a run may read.")
_WINDOW = flags.DEFINE_float("window", 0.75, "Each parabola fits the sizes within this many "
                             "decades of N of the lowest loss at its budget.")
_POOL = flags.DEFINE_integer("pool_examples", 3_500_000,
                             "MNIST-1D examples generated (once, then cached) for runs to read "
                             "prefixes of; more if a run needs more.")
_BOOTSTRAPS = flags.DEFINE_integer("bootstraps", 1000, "Bootstrap resamples of approach 2.")
_SURFACE_BOOTSTRAPS = flags.DEFINE_integer("surface_bootstraps", 200,
                                           "Bootstrap resamples of approach 3.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each (budget, width): the fits "
                           "use the mean test loss over them.")
_CHECK = flags.DEFINE_bool("check", False, "Train the predicted width and its neighbours at "
                           "--check_factor x the largest budget.")
_CHECK_SEEDS = flags.DEFINE_list("check_seeds", None, "Seeds of each --check width (default: "
                                 "--seeds).")
_CHECK_FACTOR = flags.DEFINE_float("check_factor", 4.0, "Budget of --check, over the largest.")
_FIT = flags.DEFINE_string("fit", None, "A fit.json to plan from (with --predict).")
_PREDICT = flags.DEFINE_float("predict", None, "Budget in FLOPs to plan for (with --fit).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny budgets and widths: a smoke test.")

FIELDS = ["part", "budget", "width", "seed", "params", "train_flops_per_example", "examples",
          "steps", "reported_train_flops", "test_loss", "test_accuracy", "seconds"]


def _run_config(base, width: int, seed: int = 0):
  """One pass over the run's examples (its dataset holds exactly those)."""
  return common.quiet(base, **{"model.width": width, "seed": seed, "train.num_epochs": 1,
                               "train.num_steps": 0})


def _key(row) -> tuple:
  return row["part"], float(row["budget"]), int(row["width"]), int(row["seed"])


class Experiment:
  """Runs (budget, width) pairs, each one pass over a prefix of one pool of examples."""

  def __init__(self, base, out: str, pool_examples: int):
    from jaxddp import data
    self.base, self.out, self.pool_examples = base, out, pool_examples
    self.results = common.Results(os.path.join(out, "results.csv"), FIELDS, _key)
    self.batch_size = base.train.batch_size
    self.shape = data.load_dataset(base)  # input shape and classes (the standard split)
    self._pool = None
    self._costs: dict[int, object] = {}

  def cost(self, width: int):
    from jaxddp import scaling
    if width not in self._costs:
      self._costs[width] = scaling.model_cost(_run_config(self.base, width),
                                              self.shape.input_shape, self.shape.num_classes)
    return self._costs[width]

  def examples(self, budget: float, width: int) -> int:
    from jaxddp import scaling
    return scaling.examples_for_budget(budget, self.cost(width).train_flops, self.batch_size)

  def pool(self, needed: int):
    """The examples runs read prefixes of: MNIST-1D generated up to pool_examples (or
    `needed`, if more). Its cache is by size, so one size serves every run."""
    from jaxddp import data
    if self._pool is None or self._pool.num_train_examples < needed:
      config = self.base.copy_and_resolve_references()
      if config.dataset.name == "mnist1d":
        config.dataset.num_train_examples = max(needed, self.pool_examples, 4000)
      pool = data.load_dataset(config)
      if not isinstance(pool, data.ArrayDataset):
        raise Error("compute_optimal.py reads prefixes of an in-memory dataset "
                             f"(ArrayDataset); {config.dataset.name!r} is not one")
      if pool.num_train_examples < needed:
        raise Error(f"a run needs {needed} fresh examples but {config.dataset.name!r} "
                             f"has {pool.num_train_examples}; lower the budgets or "
                             "--max_examples")
      self._pool = pool
    return self._pool

  def train(self, part: str, budget: float, width: int, seed: int, progress: str = "") -> dict:
    from jaxddp import data, train
    key = (part, float(budget), width, seed)
    if self.results.done(key):
      return self.results.row(key)
    cost, examples = self.cost(width), self.examples(budget, width)
    pool = self.pool(examples)
    subset = data.ArrayDataset(pool.train_x[:examples], pool.train_y[:examples], pool.test_x,
                               pool.test_y, pool.num_classes, name=f"{pool.name}[:{examples}]")
    workdir = os.path.join(self.out, "runs", f"{part}_C{budget:g}_w{width}_s{seed}")
    start = time.time()
    result = train.train_and_evaluate(_run_config(self.base, width, seed), workdir,
                                      dataset=subset)
    row = {"part": part, "budget": budget, "width": width, "seed": seed, "params": cost.params,
           "train_flops_per_example": cost.train_flops, "examples": examples,
           "steps": examples // self.batch_size,
           "reported_train_flops": result.report["flops/train_total"],
           "test_loss": result.eval_metrics["loss"],
           "test_accuracy": result.eval_metrics["accuracy"],
           "seconds": round(time.time() - start, 1)}
    written = self.results.add(row)
    print(f"{progress}{part} C={budget:.3g} width {width:<4} seed {seed} N={cost.params:<8} "
          f"D={examples:<8} test loss {row['test_loss']:.4f} accuracy {row['test_accuracy']:.4f} "
          f"{row['seconds']}s", flush=True)
    return written


def sweep_plan(exp: Experiment, budgets: list[float], widths: list[int], min_steps: int,
               max_examples: int) -> list[tuple[float, int]]:
  """The (budget, width) pairs to train, printed with the ones left out."""
  pairs = []
  for budget in budgets:
    kept, left = [], []
    for width in widths:
      examples = exp.examples(budget, width)
      fits = min_steps * exp.batch_size <= examples <= max_examples
      (kept if fits else left).append(f"{width} ({examples} ex)")
      if fits:
        pairs.append((budget, width))
    print(f"budget {budget:.3g}: widths {', '.join(kept) or 'none'}"
          + (f"; left out {', '.join(left)}" if left else ""), flush=True)
    if len(kept) < 3:
      print(f"  warning: {len(kept)} widths at {budget:.3g}: a parabola needs 3", flush=True)
  return pairs


def mean_runs(rows: list[dict], part: str, seeds: list[int], pairs=None):
  """(one scaling.Run per (budget, width) with the mean test loss over `seeds`, the
  relative standard deviations of the loss across seeds). pairs: the (budget, width)
  to take (None: all in rows)."""
  from jaxddp import scaling
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    pair = (float(r["budget"]), int(r["width"]))
    if r["part"] == part and int(r["seed"]) in seeds and (pairs is None or pair in pairs):
      groups.setdefault(pair, []).append(r)
  runs, spreads = [], []
  for (budget, _), group in sorted(groups.items()):
    losses = [float(r["test_loss"]) for r in group]
    r = group[0]
    runs.append(scaling.Run(budget, float(r["params"]), float(r["examples"]),
                            float(np.mean(losses)), float(r["train_flops_per_example"]),
                            tuple(losses)))
    if len(losses) > 1:
      spreads.append(float(np.std(losses, ddof=1) / np.mean(losses)))
  return runs, spreads


def fit(exp: Experiment, pairs: list[tuple[float, int]], seeds: list[int], window: float,
        bootstraps: int, surface_bootstraps: int):
  """Fits the sweep's (budget, width) pairs (results.csv may hold others, from other
  settings: they are left out) and saves the fit (a scaling.Fit) as OUT/fit.json, with
  what the experiment records about it."""
  from jaxddp import scaling
  runs, spreads = mean_runs(exp.results.rows(), "sweep", seeds, set(pairs))
  widths = sorted({w for _, w in pairs})
  family = scaling.Family(widths=widths, params=[exp.cost(w).params for w in widths],
                          train_flops=[exp.cost(w).train_flops for w in widths])
  gamma, _ = scaling.power_law(family.params, family.train_flops)
  about = {"config": exp.base.to_dict(), "points": len(runs), "seeds": seeds,
           "runs": len(runs) * len(seeds), "window": window,
           "seed_spread": {"median": float(np.median(spreads)) if spreads else None,
                           "max": max(spreads) if spreads else None},
           "family_fit_error": family.max_relative_error(), "gamma": gamma,
           "chinchilla": {"a": 0.49, "b": 0.51, "approach_3": {"a": 0.46, "b": 0.54}}}
  result = scaling.Fit(
      budgets=sorted({r.budget for r in runs}), batch_size=exp.batch_size, family=family,
      isoflop=scaling.isoflop_fit(runs, window=window, bootstraps=bootstraps),
      surface=scaling.loss_surface_fit(runs, gamma=gamma, bootstraps=surface_bootstraps),
      about=about)
  result.save(os.path.join(exp.out, "fit.json"))
  return result


def describe_fit(result) -> str:
  """What a fit (a scaling.Fit made by fit() above) found, in a few lines."""
  iso, surface, about = result.isoflop, result.surface, result.about
  interval = lambda v: f"[{v[0]:.3f}, {v[1]:.3f}]"
  seeds = len(about["seeds"])
  lines = [f"{about['points']} (budget, width) points, each the mean test loss of "
           f"{seeds} seed{'s' if seeds > 1 else ''} ({about['runs']} runs), over "
           f"{len(result.budgets)} budgets; training FLOPs per example ~ "
           f"N^{surface['gamma']:.3f} across the family"]
  if about["seed_spread"]["median"] is not None:
    lines.append(f"seed noise: the test loss's standard deviation across seeds is "
                 f"{about['seed_spread']['median']:.1%} of it (median over points; at most "
                 f"{about['seed_spread']['max']:.1%})")
  for m in iso["minima"]:
    if math.isnan(m["log10_params"]):
      lines.append(f"  C={m['budget']:.3g}: no minimum (too few sizes or the parabola curves "
                   "down)")
    else:
      lines.append(f"  C={m['budget']:.3g}: N_opt={10 ** m['log10_params']:.4g} "
                   f"D_opt={m['examples']:.4g} loss {m['loss']:.4f} over {m['runs']} sizes"
                   + ("" if m["interior"] else "  (at the edge of the sizes: extrapolated)"))
  lines += [
      f"approach 2: N_opt ~ C^{iso['a']:.3f} {interval(iso['a_interval'])}, D_opt ~ "
      f"C^{iso['b']:.3f} {interval(iso['b_interval'])} (95% bootstrap, "
      f"{iso['bootstraps'] - iso['bootstraps_dropped']} of {iso['bootstraps']} resamples)",
      f"approach 3: L = {surface['E']:.4f} + {surface['A']:.4g}/N^{surface['alpha']:.3f} + "
      f"{surface['B']:.4g}/D^{surface['beta']:.3f}; alpha {interval(surface['alpha_interval'])}"
      f", beta {interval(surface['beta_interval'])}",
      f"            N_opt ~ C^{surface['a']:.3f} {interval(surface['a_interval'])}, D_opt ~ "
      f"C^{surface['b']:.3f} {interval(surface['b_interval'])}",
      "Chinchilla: a = 0.49, b = 0.51 (approach 2); 0.46, 0.54 (approach 3)"]
  return "\n".join(lines)


def describe_plan(p: dict) -> str:
  if math.isnan(p["params_interval"][0]):  # fitted from one seed: no bootstrap
    n_interval = loss_interval = "no interval: the fit had one seed per point"
  else:
    n_interval = (f"95% interval {p['params_interval'][0]:.4g} to "
                  f"{p['params_interval'][1]:.4g}, widths {p['width_interval'][0]} to "
                  f"{p['width_interval'][1]}")
    loss_interval = (f"95% interval {p['loss_interval'][0]:.4f} to "
                     f"{p['loss_interval'][1]:.4f}")
  return (f"budget {p['budget']:.3g} FLOPs: width {p['width']} (N={p['params']:.0f}; N_opt "
          f"{p['params_optimal']:.4g}, {n_interval}), {p['examples']} examples, "
          f"{p['steps']} steps of {p['batch_size']}; expected test loss {p['loss']:.4f} "
          f"({loss_interval})")


def check(exp: Experiment, result, factor: float, seeds: list[int]) -> dict:
  """Trains the width a fit (a scaling.Fit) plans and one on each side at factor x the
  largest budget, with each seed; compares their mean test losses."""
  from jaxddp import scaling
  budget = factor * max(result.budgets)
  try:
    p = result.plan(budget)
  except scaling.BudgetOutOfRange as error:  # known only once the sweep is fitted
    raise Error(f"--check: {error} (the sweep's runs and fit.json are kept in "
                f"{exp.out}; plan another budget with --fit and --predict)") from None
  print("check: " + describe_plan(p), flush=True)
  widths = sorted({max(1, round(p["width"] / 1.5)), p["width"], round(p["width"] * 1.5)})
  pool = max(exp.examples(budget, w) for w in widths)
  if pool > exp.pool_examples:
    print(f"check: the widths need {pool} examples, more than --pool_examples="
          f"{exp.pool_examples}: generating them (a new sample of the same generator)",
          flush=True)
  runs = [(w, seed) for w in widths for seed in seeds]
  seed_losses = {w: [] for w in widths}
  for i, (w, seed) in enumerate(runs, 1):
    row = exp.train("check", budget, w, seed, f"[{i}/{len(runs)}] ")
    seed_losses[w].append(float(row["test_loss"]))
  losses = {w: float(np.mean(v)) for w, v in seed_losses.items()}
  best = min(losses, key=losses.get)
  report = {"plan": p, "seeds": seeds, "losses": losses, "seed_losses": seed_losses,
            "best_width": best,
            "predicted_is_best": best == p["width"],
            "loss_error": losses[p["width"]] - p["loss"],
            "within_interval": p["loss_interval"][0] <= losses[p["width"]]
            <= p["loss_interval"][1]}
  with open(os.path.join(exp.out, "check.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"check at {budget:.3g}: mean test loss over {len(seeds)} seeds " + ", ".join(
      f"width {w} {losses[w]:.4f}" for w in widths) +
      f"; the predicted width {p['width']} is {'' if report['predicted_is_best'] else 'not '}"
      f"the best; its loss is {report['loss_error']:+.4f} from the predicted {p['loss']:.4f}",
      flush=True)
  return report


def plot(exp: Experiment, result, pairs: list[tuple[float, int]], report: dict | None,
         path: str) -> None:
  """The IsoFLOP curves and their minima (left), N_opt and D_opt against C (right), from
  the runs and their fit (a scaling.Fit)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxddp import scaling

  rows = exp.results.rows()
  iso, surface, seeds = result.isoflop, result.surface, result.about["seeds"]
  pairs = set(pairs)
  means, _ = mean_runs(rows, "sweep", seeds, pairs)
  seed_points = [r for r in rows if r["part"] == "sweep" and int(r["seed"]) in seeds
                 and (float(r["budget"]), int(r["width"])) in pairs]
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  for i, minimum in enumerate(iso["minima"]):
    here = [r for r in means if r.budget == minimum["budget"]]
    seeds_here = [r for r in seed_points if float(r["budget"]) == minimum["budget"]]
    left.scatter([float(r["params"]) for r in seeds_here],
                 [float(r["test_loss"]) for r in seeds_here], color=f"C{i}", s=6, alpha=0.4)
    left.scatter([r.params for r in here], [r.loss for r in here], color=f"C{i}", s=22,
                 label=f"C = {minimum['budget']:.0e}")
    fitted = scaling.near_minimum(here, iso["window"])  # the runs its parabola went through
    log_n = np.log10([r.params for r in fitted])
    if len(set(log_n)) >= 3:
      x = np.linspace(log_n.min(), log_n.max(), 100)
      left.plot(10 ** x, np.polyval(np.polyfit(log_n, [r.loss for r in fitted], 2), x),
                color=f"C{i}", lw=1)
    if not math.isnan(minimum["log10_params"]):
      left.scatter([10 ** minimum["log10_params"]], [minimum["loss"]], marker="*", s=160,
                   color=f"C{i}", edgecolor="black", zorder=3)
  checks = []
  if report is not None:  # the check's widths at its budget, the mean of its seeds
    checks, _ = mean_runs(rows, "check", report["seeds"],
                          {(report["plan"]["budget"], int(w)) for w in report["losses"]})
  if checks:
    left.scatter([r.params for r in checks], [r.loss for r in checks], marker="D",
                 color="black", label=f"check, C = {checks[0].budget:.1e}")
  left.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="final test loss",
           title=f"IsoFLOP curves (mean of {len(seeds)} seed(s); small dots: each)")
  left.legend(fontsize="small", ncol=2, loc="upper right")
  good = [m for m in iso["minima"] if not math.isnan(m["log10_params"])]
  budgets = np.array([m["budget"] for m in good])
  span = np.geomspace(min(result.budgets) / 2, max(result.budgets) * 8, 50)
  right.scatter(budgets, [10 ** m["log10_params"] for m in good], color="C0", label="N_opt")
  right.scatter(budgets, [m["examples"] for m in good], color="C1", label="D_opt")
  right.plot(span, 10 ** (iso["a"] * np.log10(span) + iso["log10_k_params"]), color="C0",
             label=f"N_opt ~ C^{iso['a']:.2f} (approach 2)")
  right.plot(span, 10 ** (iso["b"] * np.log10(span) + iso["log10_k_examples"]), color="C1",
             label=f"D_opt ~ C^{iso['b']:.2f} (approach 2)")
  # Approach 3's optimum at each budget, with the family's FLOPs per example ~ N^gamma.
  family = result.family
  slope, intercept = np.polyfit(np.log10(family.params), np.log10(family.train_flops), 1)
  flops = lambda n: 10 ** (slope * np.log10(n) + intercept)
  grid = np.geomspace(min(family.params) / 10, max(family.params) * 10, 400)
  best = np.array([grid[np.argmin(scaling.surface_loss(surface, grid, c / flops(grid)))]
                   for c in span])
  right.plot(span, best, color="C0", ls="--", label=f"N_opt, approach 3 (C^{surface['a']:.2f})")
  right.plot(span, span / flops(best), color="C1", ls="--",
             label=f"D_opt, approach 3 (C^{surface['b']:.2f})")
  right.set(xscale="log", yscale="log", xlabel="training FLOPs C",
            ylabel="parameters / examples", title="compute-optimal N and D")
  right.grid(True, alpha=0.3)
  right.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def predict(fit_path: str, budget: float) -> None:
  from jaxddp import scaling
  try:
    plan = scaling.Fit.load(fit_path).plan(budget)
  except scaling.BudgetOutOfRange as error:
    raise Error(str(error)) from None
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise Error(f"--fit={fit_path} is not a fit.json of compute_optimal.py "
                f"({type(error).__name__}: {error})") from None
  print(describe_plan(plan))


def _check_settings(out: str, settings: dict) -> None:
  """Refuses an --out whose runs were made with another config or pool: their rows
  would otherwise be taken for this one's. Writes nothing (see _save_settings)."""
  path = os.path.join(out, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    now = json.loads(json.dumps(settings))
    flat = lambda d, prefix="": {k2: v2 for k, v in d.items() for k2, v2 in (
        flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}
    old, new = flat(before), flat(now)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      shown = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed[:3])
      raise Error(f"{out} holds runs made with other settings ({shown}); use another --out")


def _save_settings(out: str, settings: dict) -> None:
  """Records what the runs in --out are made with, once every check has passed (a
  refused command leaves nothing that would refuse the next)."""
  common.out_dir(out)
  path = os.path.join(out, "settings.json")
  with open(path + ".tmp", "w") as f:
    json.dump(settings, f, indent=1)
  os.replace(path + ".tmp", path)


def run(budgets: list[float], widths: list[int], seeds: list[int], check_seeds: list[int],
        min_steps: int, max_examples: int, pool_examples: int, window: float,
        bootstraps: int, surface_bootstraps: int) -> None:
  from jaxddp import config as config_lib
  from jaxddp.workdir import checked
  base = _CONFIG.value
  config_lib.validate(base)
  recorded = {"config": base.to_dict(), "pool_examples": pool_examples}
  checked(_OUT.value, "--out")
  _check_settings(_OUT.value, recorded)
  exp = Experiment(base, _OUT.value, pool_examples)
  pairs = sweep_plan(exp, budgets, widths, min_steps, max_examples)
  if not pairs:
    raise Error("no (budget, width) fits --min_steps and --max_examples: see the plan above")
  fittable = [b for b in budgets if sum(1 for budget, _ in pairs if budget == b) >= 3]
  if len(fittable) < 2:
    raise Error(f"{len(fittable)} budget(s) of the plan above have the 3 widths a parabola "
                "needs, and the fit needs two: add --widths or --budgets (or widen "
                "--min_steps / --max_examples)")
  _save_settings(_OUT.value, recorded)
  # A whole sweep per seed: an interrupted experiment has whole seeds.
  todo = [(b, w, seed) for seed in seeds for b, w in pairs
          if not exp.results.done(("sweep", b, w, seed))]
  print(f"{len(todo)} runs to go ({len(pairs) * len(seeds) - len(todo)} already in "
        f"{exp.results.path})", flush=True)
  if todo:
    exp.pool(max(exp.examples(b, w) for b, w, _ in todo))
  for i, (budget, width, seed) in enumerate(todo, 1):
    exp.train("sweep", budget, width, seed, f"[{i}/{len(todo)}] ")
  try:
    result = fit(exp, pairs, seeds, window, bootstraps, surface_bootstraps)
  except ValueError as error:  # too few sizes or budgets
    raise Error(f"cannot fit: {error} (the runs are in {exp.results.path})") from None
  print(describe_fit(result), flush=True)
  report = check(exp, result, _CHECK_FACTOR.value, check_seeds) if _CHECK.value else None
  plot(exp, result, pairs, report, os.path.join(_OUT.value, "isoflop.png"))
  print(f"wrote {exp.results.path}, {os.path.join(_OUT.value, 'fit.json')} and "
        f"{os.path.join(_OUT.value, 'isoflop.png')}")


def _check_flags(settings: dict) -> None:
  """Every flag of a sweep, before the first run trains: a bad one found after the sweep
  would waste it."""
  from jaxddp import scaling
  if not settings["window"] > 0:
    raise Error(f"--window={settings['window']}: must be above 0 (decades of N)")
  for name in ("min_steps", "max_examples", "pool_examples", "bootstraps",
               "surface_bootstraps"):
    if settings[name] < 1:
      raise Error(f"--{name}={settings[name]}: must be at least 1")
  factor = _CHECK_FACTOR.value
  if _CHECK.value and not (math.isfinite(factor) and
                           1 / scaling.MAX_EXTRAPOLATION <= factor <= scaling.MAX_EXTRAPOLATION):
    raise Error(f"--check_factor={factor:g}: the check's budget must be within "
                f"{scaling.MAX_EXTRAPOLATION:g}x of the largest fitted budget, so between "
                f"{1 / scaling.MAX_EXTRAPOLATION:g} and {scaling.MAX_EXTRAPOLATION:g}")


def main() -> None:
  if _FIT.value or _PREDICT.value is not None:
    if not (_FIT.value and _PREDICT.value is not None):
      raise Error("--fit and --predict go together")
    return predict(_FIT.value, _PREDICT.value)
  if _CONFIG.value is None or not _OUT.value:
    raise Error("--config and --out are required (or --fit and --predict)")
  settings = dict(
      budgets=common.numbers("budgets", _BUDGETS.value, float, 1.0),
      widths=common.numbers("widths", _WIDTHS.value, int, 1),
      seeds=common.numbers("seeds", _SEEDS.value, int, 0), min_steps=_MIN_STEPS.value,
      max_examples=_MAX_EXAMPLES.value, pool_examples=_POOL.value, window=_WINDOW.value,
      bootstraps=_BOOTSTRAPS.value, surface_bootstraps=_SURFACE_BOOTSTRAPS.value)
  _check_flags(settings)
  if len(set(settings["seeds"])) < len(settings["seeds"]):
    raise Error(f"--seeds={','.join(_SEEDS.value)}: a seed given twice would count one run "
                "twice")
  if _QUICK.value:  # these replace the flags of the same names
    _CONFIG.value.train.batch_size = 32
    settings.update(budgets=[1e8, 2e8], widths=[2, 4, 8], min_steps=4, max_examples=8000,
                    pool_examples=8000, bootstraps=50, surface_bootstraps=10, window=2.0,
                    seeds=[0])
  check_seeds = (common.numbers("check_seeds", _CHECK_SEEDS.value, int, 0)
                 if _CHECK_SEEDS.value else settings["seeds"])
  run(check_seeds=check_seeds, **settings)


if __name__ == "__main__":
  common.run("compute_optimal.py", main)
