"""MNIST-1D at a large batch (2048 of the 4000 examples per update) with a scaled recipe.

The small recipe behind experiments/batch_size_sweep.py: configs/mnist1d.py's
learning rate is taken as the rate at batch 128 and scaled linearly to the batch,
with a warmup of 2 epochs.
"""

from configs import mnist1d


def get_config():
  config = mnist1d.get_config()
  config.train.batch_size = 2048
  config.optimizer.scaling = "linear"
  config.optimizer.reference_batch_size = 128
  config.optimizer.warmup_epochs = 2
  config.train.log_every = 5
  return config
