"""Goyal et al. (2017), "Accurate, Large Minibatch SGD": ResNet-50 on ImageNet in 90 epochs.

LR 0.1 per 256 examples scaled linearly with the global batch (0.4 at the default
1024), 5 epochs of gradual warmup, divided by 10 at epochs 30, 60 and 80; momentum
0.9, weight decay 1e-4 on weights only, zero-initialised last BN of each block.

Reads ImageNet (tfds imagenet2012, which needs a manual download; see README,
"Real data") from --config.dataset.data_dir: random-resized crops and flips of
224x224 for training, the central 224 of images resized to 256 for evaluation on
the validation split. To try the recipe without it:
    python -m jaxddp.main --config=configs/imagenet.py --workdir=runs/rn50_synthetic \
        --config.dataset.name=synthetic --config.train.num_steps=3
(random 32x32 images by default here, to be quick on a CPU; set
--config.dataset.synthetic_shape="(224,224,3)" for the real size).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "imagenet2012"
  config.dataset.eval_split = "validation"  # the test split has no labels
  config.dataset.preprocess = "inception"
  config.dataset.image_size = 224
  config.dataset.synthetic_shape = (32, 32, 3)
  config.dataset.synthetic_num_classes = 1000
  config.dataset.synthetic_train_size = 4096
  config.dataset.synthetic_test_size = 1024

  config.model.name = "resnet50"
  config.model.stem = "imagenet"
  config.model.zero_init_residual = True

  config.optimizer.name = "momentum"
  config.optimizer.learning_rate = 0.1
  config.optimizer.scaling = "linear"
  config.optimizer.reference_batch_size = 256
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_epochs = 5
  config.optimizer.schedule = "step"
  config.optimizer.decay_epochs = (30, 60, 80)
  config.optimizer.decay_factor = 0.1

  config.train.batch_size = 1024
  config.train.num_epochs = 90
  config.train.log_every = 100
  config.train.checkpoint_every = 5000
  return config
