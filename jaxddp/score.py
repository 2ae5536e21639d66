r"""Scores every training example, data-parallel: `python -m jaxddp.score`.

    python -m jaxddp.score --config=configs/mnist1d.py --workdir=runs/mnist1d_scores \
        --config.data_pruning.score=el2n [--config.data_pruning.num_runs=4 ...]

writes workdir/scores/<score>.npy (float32, one score per training example in the
dataset's index order, higher = harder) and workdir/scores/<score>.json (how they
were made: the score, runs, seeds, epochs, time). The runs a score trains (el2n and
grand: num_runs seeds for score_epochs epochs; forgetting: one whole run) live in
workdir/score_runs/ (named by seed, epochs and a digest of their config: el2n and
grand share theirs, a changed config trains new ones), so a killed scoring job
resumes them. Train on a subset with
--config.data_pruning.scores=workdir/scores/<score>.npy.

Across device counts: scoring a fixed model gives the same scores on 1 device, 8 devices
or several processes (no training, score_epochs=0: bit-identical, a difference of 0.0).
Scores of trained runs (el2n, grand after training, forgetting) inherit training's float32
drift between device counts, which grows over the epochs. With the default config (4 runs
of 2 epochs), 1 vs 2 devices: scores (in [0, 1.41], mean 0.057) differ by up to 0.19
(median 0.001), rank correlation 0.993, and 70 of the 2000 examples kept at
keep_fraction 0.5 differ (measured on a 2-core CPU; a trial on another machine saw a
single score move by 39%, rank correlation 0.9987, 23 of 2000 kept differ). The ranking
is stable; single scores are not. To compare scorings exactly, use one device count and
one backend, or one scores file (docs/numerics.md, "EL2N scores across device counts").
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxddp import checkpoint, distributed, evaluate, losses, train
from jaxddp.default_config import get_config
from jaxddp.errors import ConfigError
from jaxddp.pruning.scores import SCORES
from jaxddp.state import local_value
from jaxddp.workdir import Lock as WorkdirLock
from jaxddp.workdir import checked as checked_workdir


class Scoring:
  """What a score needs (jaxddp.pruning.scores.Scoring): runs trained or loaded, and
  per-example outputs over the training split."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, **given: Any):
    self.config, self.workdir, self.given = config, workdir, given
    self.run = train.setup(config, **given)
    self.num_train_examples = self.run.dataset.num_train_examples
    if "split" not in inspect.signature(self.run.dataset.eval_batches).parameters:
      raise ConfigError(f"jaxddp.score reads every training example once through "
                        f"eval_batches(..., split='train'), which a "
                        f"{type(self.run.dataset).__name__} does not take (see "
                        "jaxddp.data.Dataset)")
    self.runs: dict[str, dict] = {}
    self._lock = WorkdirLock(workdir, is_leader=jax.process_index() == 0,
                             agree=distributed.leader_text)
    self._held = False

  def hold_workdir(self) -> None:
    """Holds the workdir (one scoring at a time) from its first write on: a score that
    refuses its inputs before then leaves nothing behind. Every process calls it."""
    if not self._held:
      self._lock.__enter__()
      self._held = True

  def release_workdir(self) -> None:
    if self._held:
      self._lock.release()
      self._held = False

  def _run_config(self, seed: int, epochs: float, **overrides) -> ml_collections.ConfigDict:
    config = copy.deepcopy(self.config)
    config.seed = seed
    if epochs:  # 0: the initialisation, never trained
      with config.ignore_type():  # score_epochs may be fractional, num_epochs an int
        config.train.num_epochs = int(epochs) if float(epochs).is_integer() else float(epochs)
      config.train.num_steps = 0
    config.init_from.workdir, config.init_from.step, config.init_from.skip = "", 0, ""
    defaults = get_config().data_pruning
    for field in _SCORING_ONLY:  # they do not change the run: el2n and grand share it
      config.data_pruning[field] = defaults[field]
    for field, value in overrides.items():
      config.data_pruning[field] = value
    return config

  def trained_state(self, name: str, seed: int, epochs: float, **overrides):
    config = self._run_config(seed, epochs, **overrides)
    label = f"{name}_seed{seed}"
    if epochs == 0:  # the initialisation of this seed
      self._say(f"initialising {label}")
      state = train.setup(config, **self.given).state
      self.runs[label] = {"seed": seed, "epochs": 0}
      return jax.tree.map(local_value, self.run.backend.global_state(state))
    # Named by everything that makes the run (a digest of its config, of the objects
    # given and of the data's fingerprint), so a changed config or other data never
    # resumes an old run.
    workdir = os.path.join(self.workdir, "score_runs", f"{label}_epochs{epochs:g}_"
                           f"{_digest(config, self.given, self.run.data_identity)}")
    self.hold_workdir()
    self._say(f"training {label} for {epochs:g} epochs in {workdir}")
    result = train.train_and_evaluate(config, workdir, **self.given)
    self.runs[label] = {"seed": seed, "epochs": epochs, "workdir": workdir,
                        "test_accuracy": result.eval_metrics["accuracy"]}
    return jax.tree.map(local_value, result.state)

  @staticmethod
  def _say(line: str) -> None:
    if jax.process_index() == 0:
      print(f"jaxddp.score: {line}", flush=True)

  def init_from_state(self):
    if not self.config.init_from.workdir:
      raise ConfigError("config.data_pruning.score='prototype' embeds the training set with a "
                        "trained run: set --config.init_from.workdir=<its --workdir>")
    backend = self.run.backend
    source = checkpoint.InitSource(self.config.init_from, backend.global_state(self.run.state))
    self.runs["init_from"] = {"workdir": source.workdir, "step": source.step}
    return jax.tree.map(local_value, source.load(backend.global_state(self.run.state)))

  def outputs(self, state, what: tuple[str, ...]) -> dict[str, np.ndarray]:
    return evaluate.split_outputs(
        self.run, state, "train", what, loss_fn=_eval_loss(self.config),
        chunk_size=self.config.data_pruning.chunk_size, on_batch=_Progress(
            f"{', '.join(what)} of {self.num_train_examples} examples", self.num_train_examples))


class _Progress:
  """Prints (on process 0) how far a pass over the training split is, every 10%."""

  def __init__(self, what: str, total: int):
    self.what, self.total, self.shown, self.start = what, total, 0, time.time()

  def __call__(self, done: int) -> None:
    tenths = done * 10 // self.total
    if tenths > self.shown and jax.process_index() == 0:
      self.shown = tenths
      print(f"jaxddp.score: {self.what}: {done}/{self.total} in "
            f"{time.time() - self.start:.1f}s", flush=True)


# data_pruning fields that only say how scores are made, not how a run trains.
_SCORING_ONLY = ("score", "num_runs", "score_epochs", "num_clusters", "chunk_size")


def _digest(config: ml_collections.ConfigDict, given: dict[str, Any],
            data_identity: dict[str, str]) -> str:
  described = {name: train.describe(value) for name, value in given.items()}
  text = json.dumps([config.to_dict(), described, data_identity], sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def _eval_loss(config: ml_collections.ConfigDict):
  return losses.get(config, None)[1]  # (train loss, eval loss): the reported one


def score(config: ml_collections.ConfigDict, workdir: str, **given: Any) -> np.ndarray:
  """Computes config.data_pruning.score for every training example and writes it to
  workdir/scores/<score>.npy and .json; returns the scores. `given`: model=, dataset=,
  loss_fn= as for jaxddp.train_and_evaluate."""
  workdir = checked_workdir(workdir)
  started = time.time()
  scoring = Scoring(config, workdir, **given)  # checks the config
  name = config.data_pruning.score
  try:
    values, details = SCORES[name](scoring)
    values = np.asarray(values, np.float32)
    seconds = time.time() - started
    info = {"score": name, "higher_is": "harder", "num_examples": int(len(values)),
            "dataset": config.dataset.name, "data": scoring.run.data_identity["dataset"],
            "model": config.model.name, **details,
            "runs": scoring.runs, "seconds": round(seconds, 2),
            "devices": len(scoring.run.devices), "processes": jax.process_count()}
    scoring.hold_workdir()
    if jax.process_index() == 0:
      directory = os.path.join(workdir, "scores")
      os.makedirs(directory, exist_ok=True)
      path = os.path.join(directory, f"{name}.npy")
      np.save(path + ".tmp.npy", values)
      os.replace(path + ".tmp.npy", path)
      info_path = os.path.join(directory, f"{name}.json")
      with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, indent=2, default=str)
      os.replace(info_path + ".tmp", info_path)
      print(f"jaxddp.score: {name} of {len(values)} examples in {seconds:.1f}s -> {path} "
            f"(mean {values.mean():.4g}, min {values.min():.4g}, max {values.max():.4g})",
            flush=True)
  finally:
    scoring.release_workdir()
  return values


def main(argv: list[str] | None = None) -> None:
  from jaxddp import main as entry
  entry.main(argv, command=score, usage=__doc__)


if __name__ == "__main__":
  main(sys.argv)
