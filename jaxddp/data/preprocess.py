"""Per-example image preprocessing in TensorFlow, for the tfds pipeline.

Every random choice is stateless, from a per-example seed that the pipeline
derives from (config seed, epoch, position in the epoch): the same example at the
same point of training is always augmented the same way, whatever the number of
threads, and a resumed run repeats it exactly.

* inception (ImageNet, image folders): training takes a random crop of 8% to 100%
  of the area with aspect ratio 3/4 to 4/3 (Szegedy et al. 2015), resizes it to
  image_size and flips it half the time; evaluation resizes the short side to
  image_size / 0.875 (256 for 224) and takes the central image_size square.
* cifar: training pads 4 pixels of zeros on each side, takes a random crop of the
  original size and flips it half the time; evaluation leaves the image as it is.
* none: the image as it is (it must already have a fixed size).

Then pixels are scaled to [0, 1] and normalised per channel: (x - mean) / std.
"""

from __future__ import annotations

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875  # central 224 of 256

# Per-channel mean and standard deviation of the training images, on [0, 1].
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATION = {
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def normalization(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """A dataset's own statistics if known, else ImageNet's for colour images (natural
  photographs, as in image folders) and 0.5 / 0.5 otherwise."""
  if name in NORMALIZATION:
    return NORMALIZATION[name]
  if channels == 3:
    return IMAGENET_MEAN, IMAGENET_STD
  return (0.5,) * channels, (0.5,) * channels


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """JPEG, PNG, BMP or GIF bytes -> uint8 (height, width, channels)."""
  return tf.io.decode_image(encoded, channels=channels, expand_animations=False)


def _crop_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """A random Inception-style crop of an image of `shape`: (y, x, height, width)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def inception_train(encoded: tf.Tensor, seed: tf.Tensor, image_size: int,
                    channels: int) -> tf.Tensor:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def from_jpeg():  # decodes only the crop
    window = _crop_window(tf.image.extract_jpeg_shape(encoded), crop_seed)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)

  def from_other():
    image = decode(encoded, channels)
    y, x, h, w = tf.unstack(_crop_window(tf.shape(image), crop_seed))
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(encoded), from_jpeg, from_other)
  image = tf.image.resize(image, (image_size, image_size), method="bilinear")
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def inception_eval(encoded: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
  image = decode(encoded, channels)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = image_size / EVAL_CROP_FRACTION / tf.reduce_min(shape)
  resized = tf.cast(tf.math.ceil(shape * scale), tf.int32)  # short side: 256 for 224
  image = tf.image.resize(image, resized, method="bilinear")
  top = (resized[0] - image_size) // 2
  left = (resized[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def cifar_train(encoded: tf.Tensor, seed: tf.Tensor, channels: int) -> tf.Tensor:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = decode(encoded, channels)
  padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def normalize(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
  """uint8 or [0, 255] float pixels -> float32, per-channel standardised."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
