"""Which dense and convolution layer classes a built-in model is made of."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

ModuleDef = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Layers:
  """Constructors the built-in models call, taking flax.linen.Conv / Dense's arguments.

  The first layer (its input is the data) and the last (the classifier) have
  their own entries, so that sparse training can keep them dense.
  jaxddp.models.layers(config) binds the computation dtype (config.model.dtype)
  into each; the defaults here compute in the promoted input/parameter dtype.
  """
  first: ModuleDef = nn.Conv  # the model's first convolution
  conv: ModuleDef = nn.Conv  # every other convolution
  last: ModuleDef = nn.Dense  # the classifier
