"""Compute-optimal sizing: what a model costs, IsoFLOP fits, and a planner from them.

For a training budget C (FLOPs), Hoffmann et al. (2022, "Chinchilla") choose the model
size N and the number of training examples D together. Each training run here makes
one pass over D fresh examples, so C = D * f(N), where f is the model's training FLOPs
per example, counted as jaxddp's FLOPs report counts them (jaxddp.sparsity: 2PW for
the forward pass of each dense or convolution layer with P output positions and W
weights, twice that for the backward pass), not 6N.

* `model_cost(config, input_shape, num_classes)`: N (all parameters, batch-norm scales
  included), and the forward and training FLOPs per example.
* `isoflop_fit(runs)` (Chinchilla's approach 2): at each budget a parabola in log10 N
  through the final test losses; its minimum is N_opt(C), and D_opt(C) = C / f(N_opt).
  Power laws N_opt = k_N C^a and D_opt = k_D C^b through the minima, with bootstrap
  intervals (each point's seeds resampled).
* `loss_surface_fit(runs)` (approach 3): L(N, D) = E + A / N^alpha + B / D^beta fitted
  to every run with a Huber loss on log L, by L-BFGS-B from a grid of starting points.
  With f(N) ~ N^gamma it predicts N_opt ~ C^(beta / (alpha + gamma beta)) and
  D_opt ~ C^(alpha / (alpha + gamma beta)); gamma = 1 gives Chinchilla's a and b.
* `Fit`: both fits of one model family with its widths and batch size, in its own JSON
  form (fit.json); `Fit.plan(budget)`: the width, examples, steps and expected test loss
  for a budget.

numpy does the parabolas (linear least squares), scipy the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxddp import flops, models

# How far outside the fitted budgets the planner extrapolates: a factor of 100.
MAX_EXTRAPOLATION = 100.0


@dataclasses.dataclass(frozen=True)
class ModelCost:
  params: int  # N: every parameter (kernels, biases, normalisation scales and offsets)
  forward_flops: float  # per example, dense and convolution layers (jaxddp.flops)
  train_flops: float  # per example: forward + backward = 3 x forward


def model_cost(config: ml_collections.ConfigDict, input_shape: tuple[int, ...],
               num_classes: int) -> ModelCost:
  """The size and per-example FLOPs of config's model (config.model), from shapes alone
  (nothing is compiled or run). input_shape is one example's (no batch axis), e.g.
  (40, 1) for MNIST-1D. Training FLOPs are 3 x forward: the backward pass computes the
  input and the kernel gradients, 2PW each."""
  model = models.create_model(config, num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)),
                                                train=False))
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
  # The same count as a training run's FLOPs report (flops/forward_dense).
  forward = flops.dense_forward(flops.find_layers(model, input_shape))
  return ModelCost(params=int(params), forward_flops=forward, train_flops=3 * forward)


def examples_for_budget(budget: float, train_flops: float, batch_size: int) -> int:
  """D: the whole batches of examples a budget buys, one pass at train_flops each."""
  return int(budget // (train_flops * batch_size)) * batch_size


# --- Approach 2: IsoFLOP parabolas and power laws through their minima. ---

@dataclasses.dataclass(frozen=True)
class Run:
  """One (budget, size) point: `loss` is the mean of `seed_losses`, the final test loss
  of each seed, which the bootstraps resample."""
  budget: float
  params: float  # N
  examples: float  # D
  loss: float  # final test loss, the mean over seeds
  train_flops: float  # per example
  seed_losses: tuple[float, ...] = ()


def resample_seeds(runs: Sequence[Run], rng: np.random.Generator) -> list[Run]:
  """The runs with each loss replaced by the mean of its seeds drawn with replacement:
  one bootstrap draw of the seed noise, the design (budgets and sizes) kept."""
  return [dataclasses.replace(r, loss=float(np.mean(rng.choice(r.seed_losses,
                                                                len(r.seed_losses)))))
          for r in runs]


def _bootstraps(runs: Sequence[Run], requested: int) -> int:
  """How many bootstrap draws make sense: none unless every point has 2+ seeds."""
  return requested if all(len(r.seed_losses) >= 2 for r in runs) else 0


def parabola_minimum(log_n: Sequence[float], loss: Sequence[float]) -> tuple[float, float, float]:
  """(log N at the minimum, the loss there, the curvature) of the least-squares parabola
  loss = c2 x^2 + c1 x + c0 in x = log10 N. The curvature c2 <= 0 means no minimum: the
  first two are then nan."""
  c2, c1, c0 = np.polyfit(np.asarray(log_n, float), np.asarray(loss, float), 2)
  if c2 <= 0:
    return math.nan, math.nan, float(c2)
  x = -c1 / (2 * c2)
  return float(x), float(c0 - c1 * c1 / (4 * c2)), float(c2)


def power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
  """(exponent, log10 coefficient) of y = k x^e, by least squares in log-log."""
  import warnings

  from scipy import stats
  with warnings.catch_warnings():  # two points (a bootstrap draw) fit exactly: no warning
    warnings.simplefilter("ignore")
    fit = stats.linregress(np.log10(x), np.log10(y))
  return float(fit.slope), float(fit.intercept)


def _flops_at(runs: Sequence[Run], log_n: float) -> float:
  """Training FLOPs per example at log10 N, interpolated (log-log) between the family's
  sizes and extended with the end segments' slopes."""
  sizes = sorted({(math.log10(r.params), math.log10(r.train_flops)) for r in runs})
  x, y = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
  if len(x) == 1:
    return float(10 ** (y[0] + log_n - x[0]))
  i = int(np.clip(np.searchsorted(x, log_n) - 1, 0, len(x) - 2))
  slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
  return float(10 ** (y[i] + slope * (log_n - x[i])))


def near_minimum(runs: Sequence[Run], window: float | None) -> list[Run]:
  """The runs within `window` decades of N of the lowest loss (None: all). An IsoFLOP
  curve is far from a parabola away from its minimum (the loss of a large model on
  few examples climbs steeply), so the parabola is fitted where it holds."""
  if window is None:
    return list(runs)
  best = math.log10(min(runs, key=lambda r: r.loss).params)
  return [r for r in runs if abs(math.log10(r.params) - best) <= window + 1e-9]


def _minima(by_budget: dict[float, list[Run]], family: Sequence[Run]) -> list[dict]:
  minima = []
  for budget, runs in sorted(by_budget.items()):
    log_n = [math.log10(r.params) for r in runs]
    if len(set(log_n)) < 3:
      minima.append({"budget": budget, "log10_params": math.nan, "runs": len(runs)})
      continue
    x, loss, curvature = parabola_minimum(log_n, [r.loss for r in runs])
    minima.append({"budget": budget, "log10_params": x, "loss": loss, "curvature": curvature,
                   "examples": budget / _flops_at(family, x) if not math.isnan(x) else math.nan,
                   "interior": bool(min(log_n) < x < max(log_n)) if not math.isnan(x) else False,
                   "runs": len(runs), "log10_params_fitted": [min(log_n), max(log_n)]})
  return minima


def _laws(minima: list[dict]) -> dict[str, float] | None:
  good = [m for m in minima if not math.isnan(m["log10_params"])]
  if len(good) < 2:
    return None
  budgets = [m["budget"] for m in good]
  a, log_k_n = power_law(budgets, [10 ** m["log10_params"] for m in good])
  b, log_k_d = power_law(budgets, [m["examples"] for m in good])
  return {"a": a, "log10_k_params": log_k_n, "b": b, "log10_k_examples": log_k_d}


def isoflop_fit(runs: Iterable[Run], window: float | None = None, bootstraps: int = 1000,
                seed: int = 0) -> dict:
  """Approach 2: the parabola minimum at each budget (through the runs `near_minimum`)
  and the power laws through them, with 95% bootstrap intervals: each draw resamples
  every point's seeds (`resample_seeds`; none without 2+ seeds per point) and fits
  again, windows included. A draw whose parabolas leave fewer than two budgets with a
  minimum is dropped (their number is reported)."""
  runs = list(runs)

  def fit(runs: list[Run]) -> tuple[list[dict], dict | None]:
    by_budget: dict[float, list[Run]] = {}
    for r in runs:
      by_budget.setdefault(r.budget, []).append(r)
    minima = _minima({budget: near_minimum(group, window)
                      for budget, group in by_budget.items()}, runs)
    return minima, _laws(minima)

  minima, laws = fit(runs)
  if laws is None:
    raise ValueError("fewer than two budgets have an IsoFLOP minimum (each needs three sizes "
                     "and a parabola that curves up): add sizes or budgets")
  rng = np.random.default_rng(seed)
  bootstraps = _bootstraps(runs, bootstraps)
  samples = [sample for sample in (fit(resample_seeds(runs, rng))[1] for _ in range(bootstraps))
             if sample is not None]
  return {"minima": minima, **laws, "window": window, "bootstrap": samples,
          "bootstraps": bootstraps,
          "bootstraps_dropped": bootstraps - len(samples),
          **{f"{name}_interval": interval([s[name] for s in samples]) for name in ("a", "b")}}


def interval(values: Sequence[float], level: float = 0.95) -> list[float]:
  """The central `level` percentile interval of bootstrap values."""
  if not len(values):
    return [math.nan, math.nan]
  tail = (1 - level) / 2 * 100
  return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


# --- Approach 3: L(N, D) = E + A / N^alpha + B / D^beta. ---


def _surface_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
                       log_loss: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
  """Hoffmann et al.'s objective: the Huber loss of log L's residuals, and its gradient.

  Divided by delta: the same minimum, with gradients of order 1 (with delta = 1e-3 they
  would be far below L-BFGS-B's tolerances, and it would stop where it started)."""
  from scipy import special
  log_a, log_b, log_e, alpha, beta = theta
  terms = np.stack([log_a - alpha * log_n, log_b - beta * log_d, np.full_like(log_n, log_e)])
  predicted = special.logsumexp(terms, axis=0)
  residual = predicted - log_loss
  weights = np.exp(terms - predicted)  # d predicted / d each term
  slope = np.clip(residual, -delta, delta) / delta  # d huber / d residual, over delta
  gradient = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]),
                       np.sum(slope * weights[2]), -np.sum(slope * weights[0] * log_n),
                       -np.sum(slope * weights[1] * log_d)])
  return float(np.sum(special.huber(delta, residual)) / delta), gradient


def _fit_surface(log_n, log_d, log_loss, starts: Iterable[Sequence[float]],
                 delta: float) -> np.ndarray:
  from scipy import optimize
  best = None
  for start in starts:
    result = optimize.minimize(_surface_objective, np.asarray(start, float),
                               args=(log_n, log_d, log_loss, delta), method="L-BFGS-B",
                               jac=True)
    if best is None or result.fun < best.fun:
      best = result
  return best.x


def _surface_starts() -> Iterable[tuple[float, ...]]:
  """Starting points for (log A, log B, log E, alpha, beta), natural logs: a grid as
  Hoffmann et al. use, coarser."""
  return itertools.product((0.0, 5.0, 10.0), (0.0, 5.0, 10.0), (-4.0, -1.0),
                           (0.25, 0.75), (0.25, 0.75))


def loss_surface_fit(runs: Iterable[Run], gamma: float, bootstraps: int = 200,
                     delta: float = 1e-3, seed: int = 0) -> dict:
  """Approach 3 on every run, with a 95% bootstrap interval (each draw resamples every
  point's seeds, as isoflop_fit's, and starts from the full fit). gamma: the exponent
  of the family's FLOPs per example against N (f ~ N^gamma), which sets a and b."""
  runs = list(runs)
  log_n = np.log([r.params for r in runs])
  log_d = np.log([r.examples for r in runs])
  theta = _fit_surface(log_n, log_d, np.log([r.loss for r in runs]), _surface_starts(), delta)
  rng = np.random.default_rng(seed)
  samples = [_fit_surface(log_n, log_d, np.log([r.loss for r in resample_seeds(runs, rng)]),
                          [theta], delta) for _ in range(_bootstraps(runs, bootstraps))]
  fit = _surface_dict(theta, gamma)
  fit["bootstrap"] = [_surface_dict(s, gamma) for s in samples]
  for name in ("alpha", "beta", "a", "b", "E"):
    fit[f"{name}_interval"] = interval([s[name] for s in fit["bootstrap"]])
  fit["gamma"] = gamma
  return fit


def _surface_dict(theta: Sequence[float], gamma: float) -> dict[str, float]:
  log_a, log_b, log_e, alpha, beta = (float(v) for v in theta)
  denominator = alpha + gamma * beta
  return {"E": math.exp(log_e), "A": math.exp(log_a), "B": math.exp(log_b), "alpha": alpha,
          "beta": beta, "a": beta / denominator, "b": alpha / denominator}


def surface_loss(fit: dict, params, examples):
  """Approach 3's L(N, D) (arrays broadcast); a term too small for a float is 0."""
  with np.errstate(over="ignore", under="ignore"):
    return fit["E"] + fit["A"] * np.power(np.asarray(params, float), -fit["alpha"]) \
        + fit["B"] * np.power(np.asarray(examples, float), -fit["beta"])


# --- The planner. ---

@dataclasses.dataclass(frozen=True)
class Family:
  """The widths trained, with each one's N and training FLOPs per example; quadratic
  in the width for the CNN and ResNets (every kernel is width x width x constant)."""
  widths: list[int]
  params: list[int]
  train_flops: list[float]

  def _poly(self, values) -> np.ndarray:
    return np.polyfit(self.widths, values, min(2, len(self.widths) - 1))

  def cost(self, width: int) -> tuple[float, float]:
    """(N, training FLOPs per example) at a width, from the quadratics."""
    return (float(np.polyval(self._poly(self.params), width)),
            float(np.polyval(self._poly(self.train_flops), width)))

  def width_for(self, params: float) -> int:
    """The integer width whose N is nearest (in log) to `params`."""
    poly = self._poly(self.params)
    roots = np.roots(poly - np.array([0] * (len(poly) - 1) + [params]))
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    if not real:
      return 1
    x = max(real)
    candidates = {max(1, math.floor(x)), max(1, math.ceil(x))}
    return min(candidates, key=lambda w: abs(math.log(self.cost(w)[0] / params)))

  def max_relative_error(self) -> float:
    """How well the quadratics reproduce the widths trained (0 for the CNN)."""
    errors = [abs(self.cost(w)[0] / n - 1) for w, n in zip(self.widths, self.params)]
    errors += [abs(self.cost(w)[1] / f - 1) for w, f in zip(self.widths, self.train_flops)]
    return max(errors)


class BudgetOutOfRange(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Fit:
  """Both fits of one model family, trained at `budgets` with one batch size: what the
  planner needs, with a JSON form of its own (fit.json).

  The JSON form is a dict of the fields below, and `about` merged in at its top level:
  whatever the maker of the fit records with it (experiments/compute_optimal.py: the
  config, seeds, run counts, seed noise). The planner never reads `about`.
  """
  budgets: list[float]  # the planner refuses budgets more than 100x outside them
  batch_size: int  # of every run: D is whole batches
  family: Family  # the widths trained, with their N and training FLOPs per example
  isoflop: dict[str, Any]  # isoflop_fit's result (approach 2): N_opt and its interval
  surface: dict[str, Any]  # loss_surface_fit's result (approach 3): the expected loss
  about: dict[str, Any] = dataclasses.field(default_factory=dict)

  # What plan() reads of each fit: checked on loading, so that a file that is not a fit
  # fails there and says what it lacks.
  _NEEDS = {"isoflop": ("a", "log10_k_params", "bootstrap"),
            "surface": ("E", "A", "B", "alpha", "beta", "bootstrap")}

  def to_dict(self) -> dict[str, Any]:
    return {**self.about, "budgets": list(self.budgets), "batch_size": self.batch_size,
            "family": dataclasses.asdict(self.family), "isoflop": self.isoflop,
            "surface": self.surface}

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "Fit":
    """The fit of to_dict's output (or of a fit.json written before Fit existed: the
    same form). Raises ValueError if `fields` lacks something the planner reads."""
    names = ("budgets", "batch_size", "family", "isoflop", "surface")
    missing = [name for name in names if name not in fields]
    missing += [f"{part}.{name}" for part, needs in cls._NEEDS.items() if part in fields
                for name in needs if name not in fields[part]]
    if missing:
      raise ValueError(f"not a compute-optimal fit: no {', '.join(missing)}")
    fit = cls(budgets=[float(b) for b in fields["budgets"]],
              batch_size=int(fields["batch_size"]), family=Family(**fields["family"]),
              isoflop=fields["isoflop"], surface=fields["surface"],
              about={k: v for k, v in fields.items() if k not in names})
    problem = fit._impossible()
    if problem:
      raise ValueError(f"not a usable compute-optimal fit: {problem}")
    return fit

  def _impossible(self) -> str:
    """What makes the fit's numbers impossible ("" if nothing): no positive budgets, a
    batch below 1, a surface whose E, A or B is negative or exponents not positive."""
    finite = lambda *values: all(isinstance(v, (int, float)) and math.isfinite(v)
                                 for v in values)
    if not self.budgets or not all(finite(b) and b > 0 for b in self.budgets):
      return f"budgets {self.budgets} must be positive numbers of FLOPs"
    if self.batch_size < 1:
      return f"batch_size {self.batch_size} must be at least 1"
    s, iso = self.surface, self.isoflop
    if not finite(s["E"], s["A"], s["B"], s["alpha"], s["beta"]):
      return "the loss surface has a non-finite parameter"
    if min(s["E"], s["A"], s["B"]) < 0 or min(s["alpha"], s["beta"]) <= 0:
      return (f"the loss surface E={s['E']:.4g}, A={s['A']:.4g}, B={s['B']:.4g}, "
              f"alpha={s['alpha']:.4g}, beta={s['beta']:.4g} must have E, A, B >= 0 and "
              "alpha, beta > 0")
    if not finite(iso["a"], iso["log10_k_params"]):
      return "the IsoFLOP power law has a non-finite parameter"
    return ""

  def save(self, path: str) -> None:
    """Writes the JSON form to `path` atomically: a reader sees the old fit or the new."""
    with open(path + ".tmp", "w") as f:
      json.dump(self.to_dict(), f, indent=1)
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, path: str) -> "Fit":
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def plan(self, budget: float) -> dict:
    """The width, examples, steps and expected test loss for `budget`: N_opt from
    approach 2's power law, its 95% interval from the bootstrap; the loss from approach
    3 at the planned N and D. Raises BudgetOutOfRange for a budget the fit cannot
    speak for."""
    low, high = min(self.budgets), max(self.budgets)
    if not (math.isfinite(budget) and budget > 0):
      raise BudgetOutOfRange(f"a budget must be a positive number of FLOPs, not {budget}")
    if not low / MAX_EXTRAPOLATION <= budget <= high * MAX_EXTRAPOLATION:
      raise BudgetOutOfRange(
          f"a budget of {budget:.3g} FLOPs is more than {MAX_EXTRAPOLATION:g}x outside the "
          f"fitted budgets ({low:.3g} to {high:.3g}); the fit cannot say")
    iso, surface, family = self.isoflop, self.surface, self.family
    log_c = math.log10(budget)
    optimum = 10 ** (iso["a"] * log_c + iso["log10_k_params"])
    draws = [10 ** (s["a"] * log_c + s["log10_k_params"]) for s in iso["bootstrap"]]
    width = family.width_for(optimum)
    params, train_flops = family.cost(width)
    params = round(params)  # a count: the quadratic is exact for the built-in models
    examples = examples_for_budget(budget, train_flops, self.batch_size)
    cannot = (f"for a budget of {budget:.3g} FLOPs the fit plans width {width} (N={params}), "
              f"which leaves {examples} examples ({examples // self.batch_size} steps of "
              f"{self.batch_size})")
    if examples < self.batch_size:
      raise BudgetOutOfRange(f"{cannot}; the fit cannot plan this budget")
    loss = float(surface_loss(surface, params, examples))
    if not math.isfinite(loss):
      raise BudgetOutOfRange(f"{cannot} and an expected loss of {loss}; the fit cannot plan "
                             "this budget")
    losses = [surface_loss(s, params, examples) for s in surface["bootstrap"]]
    return {"budget": budget, "params_optimal": optimum, "params_interval": interval(draws),
            "width": width, "width_interval": [family.width_for(n) if math.isfinite(n)
                                               else None for n in interval(draws)],
            "params": params, "train_flops_per_example": train_flops, "examples": examples,
            "steps": examples // self.batch_size, "batch_size": self.batch_size,
            "loss": loss, "loss_interval": interval(losses)}
