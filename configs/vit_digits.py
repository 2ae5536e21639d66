"""A small Vision Transformer (vit_ti, 2x2 patches) on scikit-learn's 8x8 digits.

AdamW with decoupled weight decay, 5 warmup epochs, then cosine decay to 0; mean
pooling of the 16 patch tokens, dropout 0.1. Compare with configs/digits.py (the CNN).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = "digits"
  config.model.name = "vit_ti"
  config.model.patch_size = 2
  config.model.pooling = "mean"
  config.model.dropout = 0.1
  config.model.depth = 4
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_epochs = 5
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip_norm = 1.0
  config.train.batch_size = 64
  config.train.num_epochs = 40
  return config
