"""scikit-learn's 8x8 digits (1437 train / 360 test) with a small 2-D CNN."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "digits"
  config.model.name = "cnn"
  config.model.width = 32
  config.train.batch_size = 64
  config.train.num_epochs = 40
  return config
