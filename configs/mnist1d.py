"""MNIST-1D (4000 train / 1000 test, 40-sample signals) with a small 1-D CNN."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "mnist1d"
  config.dataset.max_shift = 0
  config.model.name = "cnn"
  config.train.batch_size = 128
  config.train.num_epochs = 20
  config.train.eval_every = 0
  return config
