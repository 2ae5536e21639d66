"""Which training examples to train on: static subsets from scores, and InfoBatch's epochs.

Pure NumPy functions of their arguments (and a seed): the same on every process,
and the same again when a run resumes.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("hard", "easy", "random", "ccs")
CCS_STRATA = 50


def subset(scores: np.ndarray, keep_fraction: float, policy: str, *, seed: int,
           labels: np.ndarray | None = None, ccs_drop_fraction: float = 0.1) -> np.ndarray:
  """The sorted indices of the examples kept: round(keep_fraction x N) of them, or of each
  class when `labels` are given (class balancing).

  hard keeps the highest scores, easy the lowest (ties broken by index), random a
  uniform sample; ccs is Zheng et al.'s coverage-centric selection (see `ccs`).
  """
  scores = np.asarray(scores, np.float64)
  if labels is None:
    groups = [np.arange(len(scores))]
  else:
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  rng = np.random.default_rng([seed, 2])
  kept = []
  for members in groups:
    budget = int(round(keep_fraction * len(members)))
    group_scores = scores[members]
    if policy == "hard":
      chosen = np.argsort(-group_scores, kind="stable")[:budget]
    elif policy == "easy":
      chosen = np.argsort(group_scores, kind="stable")[:budget]
    elif policy == "random":
      chosen = rng.choice(len(members), budget, replace=False)
    elif policy == "ccs":
      chosen = ccs(group_scores, budget, ccs_drop_fraction, rng)
    else:
      raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
    kept.append(members[chosen])
  return np.sort(np.concatenate(kept)).astype(np.int64)


def ccs(scores: np.ndarray, budget: int, drop_fraction: float, rng: np.random.Generator,
        num_strata: int = CCS_STRATA) -> np.ndarray:
  """Coverage-centric coreset selection (Zheng et al. 2023), as positions in `scores`.

  Drop the hardest floor(drop_fraction x N) examples; split the score range of the
  rest into num_strata strata of equal width; then, visiting the strata from the
  fewest examples to the most, take from each a uniform sample of
  min(its size, floor(remaining budget / strata left)) examples.
  """
  order = np.argsort(-scores, kind="stable")
  remaining = np.sort(order[int(drop_fraction * len(scores)):])
  if budget > len(remaining):
    raise ValueError(f"a budget of {budget} examples is more than the {len(remaining)} left "
                     f"after dropping the hardest {drop_fraction:.0%}")
  values = scores[remaining]
  low, high = values.min(), values.max()
  edges = np.linspace(low, high, num_strata + 1)
  stratum = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, num_strata - 1)
  strata = [remaining[stratum == s] for s in range(num_strata)]
  strata = sorted((members for members in strata if len(members)), key=len)
  chosen = []
  for left, members in zip(range(len(strata), 0, -1), strata):
    take = min(len(members), budget // left)
    chosen.append(rng.choice(members, take, replace=False))
    budget -= take
  return np.concatenate(chosen)


def infobatch_weights(losses: np.ndarray, prune_ratio: float, *, seed: int, epoch: int,
                      anneal: bool) -> np.ndarray:
  """InfoBatch's loss weight of every example for one epoch (Qin et al. 2024); 0 = skipped.

  Of the examples whose last loss is below the mean loss, a uniformly random
  N_low - floor((1 - prune_ratio) x N_low) are skipped and the others weigh
  1 / (1 - prune_ratio); the rest weigh 1. In the annealing epochs every example
  weighs 1. The draw is a function of (seed, epoch) and the losses alone.
  """
  weights = np.ones(len(losses), np.float32)
  if anneal or prune_ratio == 0:
    return weights
  losses = np.asarray(losses, np.float64)
  low = np.flatnonzero(losses < losses.mean())
  keep = int((1 - prune_ratio) * len(low))
  rng = np.random.default_rng([seed, epoch, 3])
  skipped = rng.choice(low, len(low) - keep, replace=False)
  weights[low] = np.float32(1 / (1 - prune_ratio))
  weights[skipped] = 0
  return weights


def epoch_seed(seed: int, epoch: int) -> int:
  """The seed of one dynamic epoch's order (uint32, from (seed, epoch))."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
