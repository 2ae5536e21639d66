"""Models by name: config.model.name -> a Flax module called as model(x, train=...).

The MODELS registry holds a factory `(config, num_classes) -> nn.Module` per name.
This index imports the built-in models (cnn, resnet, vit) and registers their factories
the way a user registers a model; they never import it:

    import jaxddp

    @jaxddp.models.register("mlp")
    def mlp(config, num_classes):
      return MLP(num_classes=num_classes)

config.model.name may also be an import path `package.module:attribute`: a Flax module
class (built with num_classes=) or a factory as above.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxddp.errors import ConfigError
from jaxddp.models import cnn, resnet, vit
from jaxddp.models.layers import (BN_VARIANCES, NORMS, Layers, compute_dtype,  # noqa: F401
                                  layers, norm_layer)
from jaxddp.registry import (Registry, check_signature, first_line, is_import_path,
                             resolve_import_path)

ModelFactory = Callable[[ml_collections.ConfigDict, int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
  """Registers a factory `(config, num_classes) -> nn.Module` as config.model.name=`name`."""
  return MODELS.register(name)


MODELS.register("cnn")(cnn.cnn)
for _name in resnet.VARIANTS:
  MODELS.register(_name)(resnet.factory(_name))
for _name in vit.VARIANTS:
  MODELS.register(_name)(vit.factory(_name))


def _from_import_path(path: str) -> ModelFactory:
  """A factory from `package.module:attribute` (a module class or a factory)."""
  target = resolve_import_path("model.name", path)
  if isinstance(target, type) and issubclass(target, nn.Module):
    fields = {f.name for f in dataclasses.fields(target)}
    if "num_classes" not in fields:
      raise ConfigError(f"config.model.name={path!r}: the module {target.__name__} has no field "
                        "num_classes; add `num_classes: int`, or name a factory "
                        "(config, num_classes) -> nn.Module instead")
    return lambda config, num_classes: target(num_classes=num_classes)
  if not callable(target):
    raise ConfigError(f"config.model.name={path!r} names an object of type "
                      f"{type(target).__name__}, not a Flax module class or a factory "
                      "(config, num_classes) -> nn.Module")
  check_signature("model.name", path, target, ("config", "num_classes"))
  return target


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model config.model.name names (a registered name or an import path)."""
  name = config.model.name
  if is_import_path(name):
    factory = _from_import_path(name)
  elif name in MODELS:
    factory = MODELS[name]
  else:
    raise MODELS.unknown(name, ", or an import path package.module:attribute")
  try:
    model = factory(config, num_classes)
  except ConfigError:
    raise
  except Exception as error:  # the user's factory (or class) failed: say where, in one line
    if not is_import_path(name):
      raise
    raise ConfigError(f"config.model.name={name!r}: building the model raised "
                      f"{type(error).__name__}: {first_line(error)}") from None
  if not isinstance(model, nn.Module):
    raise ConfigError(f"config.model.name={name!r} gave a {type(model).__name__}, not a Flax "
                      "module (nn.Module)")
  return model


def check_model(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
  """One-line errors for a model that breaks the contract (README, "Your own model and
  data"): called as model(x, train=bool), it returns logits (batch, num_classes).
  From shapes alone (jax.eval_shape): nothing is computed or compiled."""
  what = type(model).__name__
  x = jnp.zeros((2, *input_shape), jnp.float32)
  try:
    logits, _ = jax.eval_shape(lambda: model.init_with_output(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False))
  except ConfigError:
    raise
  except Exception as error:
    raise ConfigError(f"the model {what} fails on inputs of shape (batch, "
                      f"{', '.join(map(str, input_shape))}) called as model(x, train=...): "
                      f"{type(error).__name__}: {first_line(error)}") from None
  if not hasattr(logits, "shape") or tuple(logits.shape) != (2, num_classes):
    shape = getattr(logits, "shape", type(logits).__name__)
    raise ConfigError(f"the model {what} returns {shape} for a batch of 2 examples; it must "
                      f"return logits of shape (batch, num_classes) = (2, {num_classes})")
