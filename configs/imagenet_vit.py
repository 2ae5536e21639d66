"""ViT-S/16 on ImageNet in 90 epochs (Beyer, Zhai and Kolesnikov 2022, "Better plain ViT
baselines for ImageNet-1k"), without their RandAugment and Mixup.

Batch 1024, AdamW (b1 0.9, b2 0.999) at LR 1e-3 per 1024 examples scaled linearly with
the batch, 10,000 warmup steps at batch 1024 (8 epochs), cosine decay to 0; decoupled
weight decay 1e-4 (their convention, not multiplied by the LR; optax's adamw multiplies
by the LR, hence 0.1 here); global-norm clipping at 1; mean pooling of the patch
tokens (no class token); no dropout. Inception crops and flips of 224x224 as in
configs/imagenet.py. Learned position embeddings (theirs are fixed 2-D sin-cos).

To try the recipe without ImageNet, on random images:
    python -m jaxddp.main --config=configs/imagenet_vit.py --workdir=runs/vit_s_synthetic \
        --config.dataset.name=synthetic --config.train.num_steps=3
(random 32x32 images by default here, 2x2 = 4 patches, to be quick on a CPU; set
--config.dataset.synthetic_shape="(224,224,3)" for the real size).
"""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.model.name = "vit_s"
  config.model.patch_size = 16
  config.model.pooling = "mean"
  config.model.dropout = 0.0

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.scaling = "linear"
  config.optimizer.reference_batch_size = 1024
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.1
  config.optimizer.warmup_epochs = 8
  config.optimizer.schedule = "cosine"
  config.optimizer.decay_epochs = ()
  config.optimizer.grad_clip_norm = 1.0

  config.train.batch_size = 1024
  config.train.num_epochs = 90
  return config
