"""jaxddp: data-parallel training of vision models in JAX/Flax.

    import jaxddp

    config = jaxddp.get_config()  # every field, with its default (jaxddp/default_config.py)
    data = jaxddp.data.ArrayDataset(train_x, train_y, test_x, test_y)
    result = jaxddp.train_and_evaluate(config, "runs/mine", model=MyModel(num_classes=10),
                                       dataset=data)

    scores = jaxddp.score_examples(config, "runs/scores")  # data pruning: one per example
    study = jaxddp.tune(config, "runs/tune")  # a hyperparameter search (config.tune)
    cost = jaxddp.scaling.model_cost(config, (40, 1), 10)  # N and FLOPs per example

`jaxddp.models.register` and `jaxddp.data.register` add a model or dataset by name;
`jaxddp.nn` holds layers for any Flax model (GhostBatchNorm, MaskedDense, MaskedConv).
`jaxddp.scaling` fits IsoFLOP profiles and plans a budget; `jaxddp.cascade` routes
examples between a cheap and a large model.
The modules load on first use, so `python -m jaxddp.main --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["cascade", "data", "get_config", "models", "nn", "pruning", "scaling",
           "score_examples", "train_and_evaluate", "tune"]

_SUBMODULES = ("cascade", "checkpoint", "config", "data", "distributed", "errors", "evaluate",
               "flops", "losses", "metrics", "models", "nn", "optim", "parallel", "pruning",
               "recipe", "registry", "scaling", "score", "sparsity", "state", "steps", "train",
               "search_space", "study", "tune")


def get_config():
  """The default config (jaxddp/default_config.py): an ml_collections.ConfigDict."""
  from jaxddp.default_config import get_config as default
  return default()


def train_and_evaluate(config, workdir: str, *, model=None, dataset=None, loss_fn=None):
  """Trains data-parallel on every selected device, then evaluates on the test split
  (see jaxddp.train.train_and_evaluate)."""
  from jaxddp import train
  return train.train_and_evaluate(config, workdir, model=model, dataset=dataset, loss_fn=loss_fn)


def score_examples(config, workdir: str, *, model=None, dataset=None, loss_fn=None):
  """config.data_pruning.score of every training example (higher = harder), also written
  to workdir/scores/<score>.npy (see jaxddp.score.score)."""
  from jaxddp import score
  given = {k: v for k, v in (("model", model), ("dataset", dataset), ("loss_fn", loss_fn))
           if v is not None}
  return score.score(config, workdir, **given)


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxddp.{name}")
  raise AttributeError(f"module 'jaxddp' has no attribute {name!r}")
