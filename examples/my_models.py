"""A model, a dataset and a loss of your own, named on the command line by import path:

    python -m jaxddp.main --config=configs/digits.py --workdir=runs/mlp \
        --config.model.name=examples.my_models:MLP
    python -m jaxddp.main --config=configs/digits.py --workdir=runs/mlp_digits \
        --config.model.name=examples.my_models:MLP \
        --config.dataset.name=examples.my_models:digits_arrays \
        --config.train.loss=examples.my_models:squared_error
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from sklearn.datasets import load_digits

import jaxddp


class MLP(nn.Module):
  """Built as MLP(num_classes=N): a Flax module class named by its import path."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(256)(x.reshape(len(x), -1))
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes)(x)


def digits_arrays(config):
  """A dataset factory (config) -> Dataset: scikit-learn's digits, first 1400 to train."""
  x, y = load_digits(return_X_y=True)
  x = x.reshape(-1, 8, 8, 1) / 16.0
  return jaxddp.data.ArrayDataset(x[:1400], y[:1400], x[1400:], y[1400:])


def squared_error(logits, labels):
  """A loss (logits, labels) -> one loss per example: the Brier score of the softmax."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  return jnp.sum((jax.nn.softmax(logits) - targets) ** 2, axis=-1)
