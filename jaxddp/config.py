"""Config validation: a whole config checked against every registry and range.

A bad config fails here, before anything is compiled or written, with one line
that names the field, the value and what would be valid. This module sits above the
registries it checks names against (models, data, optim, losses, parallel, sparsity,
pruning); they raise ConfigError from jaxddp.errors, below them all. ConfigError,
Recipe and resolve are re-exported here for the callers that know them by this name.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

import ml_collections

from jaxddp import data, losses, models, optim, parallel, pruning, sparsity
from jaxddp.errors import ConfigError
from jaxddp.pruning import scores, select
from jaxddp.recipe import Recipe, resolve  # noqa: F401  (re-exported)
from jaxddp.registry import is_import_path

# Choices that are not registries (models, datasets, norms, optimizers, schedules,
# losses and sparsity methods are: see validate).
PREPROCESSINGS = ("auto", "inception", "cifar", "none")
STEMS = ("auto", "imagenet", "small")
DTYPES = ("float32", "bfloat16")  # model.dtype; float16 would need loss scaling
SCALINGS = ("none", "linear", "sqrt")
EPOCHS_SCALINGS = ("none", "linear")
CLUSTERS = ("auto", "none", "slurm", "ompi", "k8s")
SPARSITY_DISTRIBUTIONS = ("uniform", "erk")
SPARSITY_SCOPES = ("layerwise", "global")
# Numeric fields that must be integers (the range checks name them so).
INTEGER_FIELDS = ("train.accumulation_steps", "optimizer.reference_batch_size",
                  "optimizer.warmup_steps", "model.ghost_batch_size", "dataset.image_size",
                  "dataset.shuffle_buffer", "model.patch_size", "model.depth", "init_from.step",
                  "dataset.num_train_examples")


def _choice(config: ml_collections.ConfigDict, field: str, valid) -> None:
  value = _get(config, field)
  if value not in valid:
    raise ConfigError(f"config.{field}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _registered(config: ml_collections.ConfigDict, field: str, registry,
                import_paths: bool = False) -> None:
  """The name is in `registry` (or, where allowed, has the form package.module:attribute,
  which is imported later, once the devices are set: the module may use JAX)."""
  value = _get(config, field)
  if import_paths and is_import_path(value):
    return
  if not isinstance(value, str) or value not in registry:
    raise registry.unknown(value, ", or an import path package.module:attribute"
                           if import_paths else "")


def _positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
      value) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    noun = "an integer" if field in INTEGER_FIELDS else "a finite number"
    raise ConfigError(f"config.{field}={value!r} is not valid; it must be {noun} "
                      f"{'>=' if allow_zero else '>'} 0")


def _fraction(config: ml_collections.ConfigDict, field: str) -> None:
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
    raise ConfigError(f"config.{field}={value!r} is not valid; it must be a fraction in [0, 1)")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """A nested dict as {"prefix" + "section.field": value}, leaves only."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# Sections whose fields are the user's: their own (extra), or a search space that mirrors
# the config (tune.space, checked by jaxddp.tune against the config's fields).
FREE_FORM = ("extra", "tune.space")


def _check_no_unknown_fields(config: ml_collections.ConfigDict) -> None:
  """A field the defaults do not have is a typo nothing would read (config.train.bach_size
  = 3 in Python adds a field; the command line refuses it): one line, with the nearest name."""
  from jaxddp.default_config import get_config as defaults

  def walk(given: dict, known: dict, path: str) -> None:
    for key, value in given.items():
      if key not in known:
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise ConfigError(f"config.{path}{key} is not a field of jaxddp's config{hint} (every "
                          "field is in jaxddp/default_config.py; your own go in config.extra)")
      if isinstance(value, dict) and isinstance(known[key], dict) and \
          f"{path}{key}" not in FREE_FORM:
        walk(value, known[key], f"{path}{key}.")

  walk(config.to_dict(), defaults().to_dict(), "")


def validate(config: ml_collections.ConfigDict, *, model_given: bool = False,
             dataset_given: bool = False, loss_given: bool = False) -> None:
  """Checks names and ranges that need no knowledge of devices or data.

  The names of a model, dataset or loss passed to train_and_evaluate as objects
  (`*_given`) are not checked: the objects are used instead.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config is a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from jaxddp.get_config() or a "
                      "configs/ file's get_config()")
  _check_no_unknown_fields(config)
  seed = config.seed
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise ConfigError(f"config.seed={seed!r} is not valid; it must be an integer in "
                      "[0, 2**32)")
  name = config.dataset.name
  if not dataset_given and (not isinstance(name, str) or not name):
    raise data.DATASETS.unknown(name, ", a tfds dataset name, or an import path "
                                "package.module:factory")
  if not model_given:
    _registered(config, "model.name", models.MODELS, import_paths=True)
  if not loss_given:
    _registered(config, "train.loss", losses.LOSSES, import_paths=True)
  _registered(config, "model.norm", models.NORMS)
  _registered(config, "optimizer.name", optim.OPTIMIZERS)
  _registered(config, "optimizer.schedule", optim.SCHEDULES)
  _registered(config, "sparsity.method", sparsity.METHODS)
  _choice(config, "dataset.preprocess", PREPROCESSINGS)
  _choice(config, "model.stem", STEMS)
  _choice(config, "model.bn_variance", models.BN_VARIANCES)
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "optimizer.scaling", SCALINGS)
  _choice(config, "train.epochs_scaling", EPOCHS_SCALINGS)
  _choice(config, "parallel.backend", parallel.BACKENDS)
  _choice(config, "distributed.cluster", CLUSTERS)
  _fraction(config, "model.dropout")
  _fraction(config, "optimizer.momentum")  # a momentum of 1 or more never forgets: diverges
  _fraction(config, "model.bn_momentum")
  for field in ("train.batch_size", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "model.width", "optimizer.learning_rate",
                "parallel.max_steps_in_flight", "distributed.initialization_timeout",
                "distributed.heartbeat_timeout", "optimizer.reference_batch_size",
                "optimizer.decay_factor", "optimizer.polynomial_power",
                "optimizer.trust_coefficient", "train.accumulation_steps",
                "model.ghost_batch_size", "dataset.shuffle_buffer", "model.patch_size"):
    _positive(config, field)
  for field in ("train.num_epochs", "train.num_steps", "train.eval_every",
                "train.eval_batch_size", "optimizer.weight_decay", "optimizer.warmup_epochs",
                "parallel.cpu_devices", "dataset.max_shift", "dataset.image_size",
                "distributed.num_processes", "distributed.hang_timeout", "optimizer.warmup_steps", "optimizer.grad_clip_norm",
                "train.label_smoothing", "model.depth", "init_from.step",
                "dataset.num_train_examples"):
    _positive(config, field, allow_zero=True)
  for field in INTEGER_FIELDS:
    if not isinstance(_get(config, field), int):
      raise ConfigError(f"config.{field}={_get(config, field)!r} is not valid; it must be an "
                        "integer")
  if not config.train.label_smoothing < 1:
    raise ConfigError(f"config.train.label_smoothing={config.train.label_smoothing!r} is not "
                      "valid; it must be in [0, 1)")
  decay_epochs = tuple(config.optimizer.decay_epochs)
  if any(not isinstance(e, (int, float)) or e <= 0 for e in decay_epochs) or \
      list(decay_epochs) != sorted(set(decay_epochs)):
    raise ConfigError(f"config.optimizer.decay_epochs={decay_epochs!r} is not valid; it must be "
                      "increasing positive epochs, e.g. (30, 60, 80)")
  if config.optimizer.schedule == "step" and not decay_epochs:
    raise ConfigError("config.optimizer.schedule='step' needs config.optimizer.decay_epochs, "
                      "e.g. (30, 60, 80)")
  if config.train.num_steps == 0 and config.train.num_epochs == 0:
    raise ConfigError("config.train.num_epochs=0 and config.train.num_steps=0: "
                      "set one of them to a number > 0")
  if config.dataset.name == "synthetic":
    shape = tuple(config.dataset.synthetic_shape)
    if len(shape) not in (2, 3) or any(not isinstance(d, int) or d <= 0 for d in shape):
      raise ConfigError(f"config.dataset.synthetic_shape={shape!r} is not valid; it must be "
                        "(length, channels) or (height, width, channels) of positive ints")
    for field in ("dataset.synthetic_num_classes", "dataset.synthetic_train_size",
                  "dataset.synthetic_test_size"):
      _positive(config, field)
  init_from = config.init_from
  if not isinstance(init_from.workdir, str):
    raise ConfigError(f"config.init_from.workdir={init_from.workdir!r} is not valid; it "
                      "must be the --workdir of another run, or '' (start from scratch)")
  for field in ("step", "skip"):
    if init_from[field] and not init_from.workdir:
      raise ConfigError(f"config.init_from.{field}={init_from[field]!r} has no effect without "
                        "config.init_from.workdir (the run to start from)")
  try:
    re.compile(config.init_from.skip)
  except (re.error, TypeError) as error:
    raise ConfigError(f"config.init_from.skip={config.init_from.skip!r} is not a regular "
                      f"expression: {error}") from None
  _validate_sparsity(config)
  _validate_data_pruning(config)


def _validate_data_pruning(config: ml_collections.ConfigDict) -> None:
  dp = config.data_pruning
  _registered(config, "data_pruning.score", scores.SCORES)
  _choice(config, "data_pruning.policy", select.POLICIES)
  if dp.dynamic != "none" and (not isinstance(dp.dynamic, str) or dp.dynamic not in
                               pruning.DYNAMIC):
    raise pruning.DYNAMIC.unknown(dp.dynamic, ", or none")
  for field in ("num_runs", "num_clusters", "chunk_size"):
    value = dp[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.data_pruning.{field}={value!r} is not valid; it must be an "
                        "integer >= 1")
  _positive(config, "data_pruning.score_epochs", allow_zero=True)
  for field in ("ccs_drop_fraction", "prune_ratio"):
    _fraction(config, f"data_pruning.{field}")
  keep = dp.keep_fraction
  if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
    raise ConfigError(f"config.data_pruning.keep_fraction={keep!r} is not valid; it must be a "
                      "fraction in (0, 1]")
  anneal = dp.anneal_fraction
  if isinstance(anneal, bool) or not isinstance(anneal, (int, float)) or not 0 <= anneal <= 1:
    raise ConfigError(f"config.data_pruning.anneal_fraction={anneal!r} is not valid; it must "
                      "be a fraction in [0, 1]")
  if not isinstance(dp.scores, str):
    raise ConfigError(f"config.data_pruning.scores={dp.scores!r} is not valid; it must be the "
                      "path of a scores .npy file (written by `python -m jaxddp.score`) or ''")
  if (dp.scores or keep < 1) and dp.dynamic != "none":
    raise ConfigError("config.data_pruning: a static subset (scores, keep_fraction) and dynamic "
                      "pruning cannot be combined; use one of them")
  if keep < 1 and not dp.scores and dp.policy != "random":
    raise ConfigError(f"config.data_pruning.keep_fraction={keep} needs the scores to choose "
                      "by: --config.data_pruning.scores=W/scores/<score>.npy (python -m "
                      "jaxddp.score writes them), or policy=random")
  if dp.scores and keep == 1:
    raise ConfigError("config.data_pruning.scores is set but keep_fraction=1 keeps every "
                      "example; set --config.data_pruning.keep_fraction below 1")
  if dp.policy == "ccs" and keep > 1 - dp.ccs_drop_fraction:
    raise ConfigError(f"config.data_pruning.keep_fraction={keep} is more than what ccs keeps "
                      f"after dropping the hardest ccs_drop_fraction={dp.ccs_drop_fraction}; "
                      f"use keep_fraction <= {1 - dp.ccs_drop_fraction:g}")
  if config.dataset.num_train_examples and config.dataset.name != "mnist1d":
    raise ConfigError(f"config.dataset.num_train_examples={config.dataset.num_train_examples} "
                      "is only for dataset.name=mnist1d (it generates any number)")


def _validate_sparsity(config: ml_collections.ConfigDict) -> None:
  sp = config.sparsity
  _choice(config, "sparsity.distribution", SPARSITY_DISTRIBUTIONS)
  _choice(config, "sparsity.scope", SPARSITY_SCOPES)
  for field in ("weight_sparsity", "activation_sparsity"):
    _fraction(config, f"sparsity.{field}")
  for field, minimum in (("start_step", 0), ("end_step", 0), ("update_every", 1)):
    value = sp[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"config.sparsity.{field}={value!r} is not valid; it must be an "
                        f"integer >= {minimum}")
  if sp.scope == "global" and sp.distribution == "erk":
    raise ConfigError("config.sparsity.distribution='erk' sets each layer's sparsity, which "
                      "config.sparsity.scope='global' leaves to one magnitude threshold; use "
                      "scope=layerwise with erk, or distribution=uniform with global")
