"""CIFAR-10 with ResNet-18 (the 3x3-stem CIFAR variant): 200 epochs of SGD, cosine.

Batch 128, LR 0.1 with momentum 0.9, weight decay 5e-4 on weights only, cosine
decay to 0; training images get a 4-pixel padded random crop and a flip.

Needs CIFAR-10 prepared for tfds (jaxddp never downloads), e.g. on a machine with
internet: `tfds build cifar10 --data_dir=DIR`, then
    python -m jaxddp.main --config=configs/cifar10.py --workdir=runs/cifar10 \
        --config.dataset.data_dir=DIR
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "cifar10"
  config.dataset.preprocess = "cifar"
  config.dataset.image_size = 32  # as stored: preprocess=cifar does not resize
  config.dataset.eval_split = "test"
  config.dataset.cache = True  # 50,000 PNGs of about 2.5 KB: 130 MB in memory

  config.model.name = "resnet18"
  config.model.stem = "small"

  config.optimizer.name = "momentum"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "cosine"

  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.train.eval_every = 3900  # about every 10 epochs
  config.train.log_every = 100
  config.train.checkpoint_every = 3900
  return config
