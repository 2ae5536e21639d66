"""A hyperparameter study on MNIST-1D: learning rate, batch size, weight decay and label
smoothing of the small 1-D CNN, 20 trials of 10 epochs, pruned by ASHA on an evaluation
every 50 steps.

    python -m jaxddp.tune --config=configs/tune_mnist1d.py --workdir=runs/tune \
        --config.parallel.cpu_devices=8 --config.tune.devices_per_trial=2 --workers=auto
"""

import ml_collections

from configs import mnist1d


def get_config():
  config = mnist1d.get_config()
  config.model.width = 32
  config.train.num_epochs = 10
  config.train.eval_every = 50
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  # Each searched field, at its place in the config; a command line can change one:
  # --config.tune.space.optimizer.learning_rate="log_uniform(0.01, 1.0)", or leave it
  # out of the search: --config.tune.space.train.label_smoothing="".
  config.tune.space = ml_collections.ConfigDict({
      "optimizer": {"learning_rate": "log_uniform(0.003, 1.0)",
                    "weight_decay": "uniform(0, 0.001)"},
      "train": {"batch_size": "choice(32, 64, 128, 256)",
                "label_smoothing": "uniform(0, 0.2)"},
  })
  config.tune.num_trials = 20
  return config
