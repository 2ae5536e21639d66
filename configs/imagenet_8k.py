"""Goyal et al.'s ResNet-50 recipe at their largest batch: 8192 (LR 3.2 after 5 warmup epochs).

The same recipe as configs/imagenet.py; only the global batch changes, and the
linear scaling rule turns it into the peak learning rate 0.1 x 8192 / 256 = 3.2.
On fewer devices than 8192 examples fit on, add --config.train.accumulation_steps.
"""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.train.batch_size = 8192
  return config
