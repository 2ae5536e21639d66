"""Difficulty scores of training examples (higher = harder), by name: the SCORES registry.

Each score is a function (scoring) -> (scores, details) of a `Scoring` (jaxddp.score),
which trains and loads runs and computes per-example outputs over the training split
(jaxddp.evaluate). The formulas themselves are plain NumPy functions here, which
the tests check against their own references.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from jaxddp.errors import ConfigError
from jaxddp.registry import Registry


class Scoring(Protocol):
  config: Any
  num_train_examples: int

  def trained_state(self, name: str, seed: int, epochs: float, **overrides) -> Any:
    """The state of a run of the config with this seed, trained for `epochs` (0: just
    initialised), in its own workdir under the scores' workdir (resumed if there)."""

  def init_from_state(self) -> Any:
    """The state of config.init_from's run."""

  def outputs(self, state: Any, what: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-example outputs over the training split, in index order, with "label"."""


ScoreFn = Callable[[Scoring], tuple[np.ndarray, dict]]
SCORES: Registry[ScoreFn] = Registry("score", "data_pruning.score")


def el2n(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """||softmax(logits) - onehot(label)||_2 of every example (Paul et al. 2021)."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(labels)), labels] -= 1
  return np.sqrt(np.sum(p * p, axis=1))


def forgetting(forgotten: np.ndarray, learned: np.ndarray) -> np.ndarray:
  """Forgetting events per example; an example never learned ranks above every learned one
  (Toneva et al. 2019 count it as forgotten infinitely often): the largest count + 1."""
  forgotten = np.asarray(forgotten, np.float64)
  never = np.asarray(learned) == 0
  return np.where(never, (forgotten[~never].max() if (~never).any() else 0) + 1, forgotten)


def prototype(embeddings: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
  """Sorscher et al.'s self-supervised prototype metric: k-means on the L2-normalised
  embeddings; the score is the cosine distance to the nearest centroid."""
  from sklearn.cluster import KMeans
  x = np.asarray(embeddings, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  centroids = KMeans(num_clusters, n_init=3, random_state=seed).fit(x).cluster_centers_
  centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
  return 1 - (x @ centroids.T).max(axis=1)


def _averaged_over_runs(scoring: Scoring, output: str, formula) -> tuple[np.ndarray, dict]:
  dp = scoring.config.data_pruning
  total, seeds = None, []
  for run in range(dp.num_runs):
    seed = scoring.config.seed + run
    state = scoring.trained_state("run", seed, dp.score_epochs)
    out = scoring.outputs(state, (output,))
    values = formula(out)
    total = values if total is None else total + values
    seeds.append(seed)
  return total / dp.num_runs, {"num_runs": dp.num_runs, "seeds": seeds,
                               "score_epochs": dp.score_epochs}


@SCORES.register("el2n")
def _el2n(scoring: Scoring) -> tuple[np.ndarray, dict]:
  return _averaged_over_runs(scoring, "logits", lambda out: el2n(out["logits"], out["label"]))


@SCORES.register("grand")
def _grand(scoring: Scoring) -> tuple[np.ndarray, dict]:
  return _averaged_over_runs(scoring, "grad_norm",
                             lambda out: out["grad_norm"].astype(np.float64))


@SCORES.register("forgetting")
def _forgetting(scoring: Scoring) -> tuple[np.ndarray, dict]:
  config = scoring.config
  state = scoring.trained_state("forgetting", config.seed, config.train.num_epochs,
                                track_forgetting=True)
  tables = state.examples
  scores = forgetting(tables["forgotten"], tables["learned"])
  return scores, {"epochs": config.train.num_epochs, "seeds": [config.seed],
                  "never_learned": int((np.asarray(tables["learned"]) == 0).sum())}


@SCORES.register("prototype")
def _prototype(scoring: Scoring) -> tuple[np.ndarray, dict]:
  config = scoring.config
  if config.data_pruning.num_clusters > scoring.num_train_examples:
    raise ConfigError(f"config.data_pruning.num_clusters={config.data_pruning.num_clusters} is "
                      f"more than the {scoring.num_train_examples} training examples")
  out = scoring.outputs(scoring.init_from_state(), ("embedding",))
  scores = prototype(out["embedding"], config.data_pruning.num_clusters, config.seed)
  return scores, {"init_from": config.init_from.workdir,
                  "num_clusters": config.data_pruning.num_clusters,
                  "embedding_size": int(out["embedding"].shape[1])}


@SCORES.register("random")
def _random(scoring: Scoring) -> tuple[np.ndarray, dict]:
  n = scoring.num_train_examples
  return np.random.default_rng([scoring.config.seed, 5]).random(n), {"seeds": [
      scoring.config.seed]}
