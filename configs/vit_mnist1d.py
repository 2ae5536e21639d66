"""A small Vision Transformer (vit_ti, patches of 4 samples) on MNIST-1D's 40-sample signals.

The recipe of configs/vit_digits.py (AdamW, warmup, cosine, dropout 0.1, mean pooling)
on configs/mnist1d.py's data and length. Compare with configs/mnist1d.py (the CNN).
"""

from configs import mnist1d, vit_digits


def get_config():
  config = vit_digits.get_config()
  data = mnist1d.get_config()
  config.dataset = data.dataset
  config.train.batch_size = data.train.batch_size
  config.train.num_epochs = data.train.num_epochs
  config.model.patch_size = 4
  return config
