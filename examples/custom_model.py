"""Your own Flax model on your own NumPy arrays, trained data-parallel by jaxddp.

    python examples/custom_model.py [WORKDIR]

scikit-learn's digits as plain arrays, a small CNN with jaxddp's ghost batch norm and
dropout, 8 emulated CPU devices (on a GPU machine: every GPU). Rerunning with the same
WORKDIR resumes from its last checkpoint.
"""

import sys

import flax.linen as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxddp
from jaxddp.nn import GhostBatchNorm


class SmallCNN(nn.Module):
  """Called as model(x, train=bool); returns logits. Dropout draws from "dropout"."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (32, 64):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = GhostBatchNorm(ghost_batch_size=8, momentum=0.9)(x, use_running_average=not train)
      x = nn.relu(x)
    x = x.mean(axis=(1, 2))  # global average pooling
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def main(workdir: str) -> None:
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).reshape(-1, 8, 8, 1)  # (N, height, width, channels)
  train_x, test_x, train_y, test_y = train_test_split(
      images, labels, test_size=0.2, random_state=0, stratify=labels)
  dataset = jaxddp.data.ArrayDataset(train_x, train_y, test_x, test_y)

  config = jaxddp.get_config()
  config.parallel.cpu_devices = 8  # on a CPU: emulate 8 devices (ignored on GPUs)
  config.train.batch_size = 128  # global: 16 examples per device, 2 ghost batches each
  config.train.num_epochs = 30
  config.train.log_every = 50
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_epochs = 2

  result = jaxddp.train_and_evaluate(config, workdir, model=SmallCNN(num_classes=10),
                                     dataset=dataset)
  print(f"test accuracy {result.eval_metrics['accuracy']:.2%}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/custom_model")
