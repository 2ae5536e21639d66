"""Input pipelines. `load_dataset` maps config.dataset.name to a dataset."""

from __future__ import annotations

import ml_collections

from jaxddp.config import ConfigError
from jaxddp.data import embedded
from jaxddp.data.batches import TrainBatches, eval_batches
from jaxddp.data.embedded import InMemoryDataset

__all__ = ["InMemoryDataset", "TrainBatches", "eval_batches", "load_dataset"]


def load_dataset(config: ml_collections.ConfigDict) -> InMemoryDataset:
  name = config.dataset.name
  if name == "mnist1d":
    return embedded.mnist1d()
  if name == "digits":
    return embedded.digits()
  if name == "synthetic":
    return embedded.synthetic(tuple(config.dataset.synthetic_shape),
                              config.dataset.synthetic_num_classes,
                              config.dataset.synthetic_train_size,
                              config.dataset.synthetic_test_size, seed=config.seed)
  if name == "imagenet2012":
    raise ConfigError(
        "config.dataset.name='imagenet2012' needs the tfds input pipeline, which jaxddp does "
        "not have yet; try the recipe on random images with --config.dataset.name=synthetic")
  raise ValueError(f"unknown dataset {name!r}")  # config.validate catches this first
