"""Models, datasets and losses "of a user's own", importable by path in tests
(tests/ is on sys.path): e.g. --config.model.name=user_models:MLP."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import jaxddp


class MLP(nn.Module):
  """No dropout, no batch statistics: its numbers do not depend on the device count."""
  num_classes: int
  hidden: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(len(x), -1)))
    return nn.Dense(self.num_classes)(x)


class DropoutMLP(nn.Module):
  num_classes: int
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(32)(x.reshape(len(x), -1)))
    x = nn.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class NoClasses(nn.Module):
  """Lacks the num_classes field a module named by import path needs."""
  features: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.features)(x.reshape(len(x), -1))


def mlp_factory(config, num_classes):
  return MLP(num_classes=num_classes, hidden=config.model.width)


def bad_factory(config):  # a model factory must take (config, num_classes)
  return MLP(num_classes=10)


def raising_model_factory(config, num_classes):
  raise RuntimeError("boom in the model factory")


def raising_dataset_factory(config):
  raise RuntimeError("boom in the dataset factory")


def small_arrays(config):
  """A dataset factory: 100 training and 37 test examples of 3 classes."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((137, 6, 1)).astype(np.float32)
  y = (x[:, 0, 0] > 0).astype(np.int32) + (x[:, 1, 0] > 0)
  return jaxddp.data.ArrayDataset(x[:100], y[:100], x[100:], y[100:])


def squared_error(logits, labels):
  """A loss of one's own: squared error against one-hot labels, per example."""
  return jnp.sum((logits - jax_one_hot(labels, logits.shape[-1])) ** 2, axis=-1)


def jax_one_hot(labels, num_classes):
  return (labels[:, None] == jnp.arange(num_classes)[None, :]).astype(jnp.float32)


class DropoutCNN(nn.Module):
  """Convolutions with dropout between them: random in every training step."""
  num_classes: int
  rate: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (8, 16, 32):
      x = nn.relu(nn.Conv(features, (3,))(x))
      x = nn.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x.mean(axis=1))


class InterfaceOnly:
  """A Dataset with the interface and nothing else (no arrays to peek at), as tfds's."""

  def __init__(self, config):
    arrays = small_arrays(config)
    self.name, self.num_classes, self.input_shape = "interface_only", 3, arrays.input_shape
    self.num_train_examples, self.num_test_examples = 100, 37
    self.train_batches, self.eval_batches = arrays.train_batches, arrays.eval_batches
