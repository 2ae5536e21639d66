"""The search space of a study: config.tune.space's distributions, checked against the
config, and each trial's config built from them.

    config.tune.space = ml_collections.ConfigDict({"optimizer": {
        "learning_rate": "log_uniform(1e-3, 1.0)", "name": "choice(momentum, adamw)"}})

A distribution is written as a string (so that the command line can change it): one of
uniform(low, high), log_uniform(low, high), int_uniform(low, high),
int_log_uniform(low, high), choice(a, b, ...), with values of the field's type. A
define-by-run `space(trial, config)` (jaxddp.tune's API) adds dimensions in Python.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from typing import Any, Callable

import ml_collections

from jaxddp import config as config_lib
from jaxddp.errors import ConfigError

# A define-by-run space: (optuna.Trial, the trial's config) -> None, or a new config.
SpaceFunction = Callable[[Any, ml_collections.ConfigDict], Any]

KINDS = ("uniform", "log_uniform", "int_uniform", "int_log_uniform", "choice")
_SYNTAX = ("uniform(low, high), log_uniform(low, high), int_uniform(low, high), "
           "int_log_uniform(low, high) or choice(a, b, ...)")


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched config field: its path ("optimizer.learning_rate"), the distribution as
  written, and its Optuna distribution."""
  field: str
  text: str
  distribution: Any  # optuna.distributions.BaseDistribution

  def suggest(self, trial) -> Any:
    """The trial's value for this field (sampled, or the one a resumed trial was given)."""
    import optuna
    d = self.distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
      return trial.suggest_categorical(self.field, d.choices)
    if isinstance(d, optuna.distributions.IntDistribution):
      return trial.suggest_int(self.field, d.low, d.high, log=d.log)
    return trial.suggest_float(self.field, d.low, d.high, log=d.log)

  def corners(self) -> list[Any]:
    """The values whose configs are checked before the study starts: every choice, or
    both ends of a range."""
    d = self.distribution
    return list(d.choices) if hasattr(d, "choices") else [d.low, d.high]


def _field_value(config: ml_collections.ConfigDict, field: str) -> Any:
  """The config's value at `field`, or a ConfigError naming the nearest field."""
  node: Any = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f'; did you mean "{".".join(parts[:depth] + close)}"?' if close else ""
      raise ConfigError(f"config.tune.space.{field}: the config has no field {field!r}{hint}")
    node = node[part]
  return node


def _number(field: str, text: str, token: str) -> float | int:
  try:
    value = float(token)
  except ValueError:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {token.strip()!r} is not a "
                      "number") from None
  if not math.isfinite(value):
    raise ConfigError(f"config.tune.space.{field}={text!r}: the bounds must be finite")
  return int(value) if value.is_integer() and "." not in token and "e" not in token.lower() \
      else value


def _choice_value(field: str, text: str, token: str, current: Any) -> Any:
  """A choice written in the space, as a value of the field's type."""
  token = token.strip()
  if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
    token = token[1:-1]
  kind = type(current).__name__
  try:
    if isinstance(current, bool):
      if token.lower() not in ("true", "false"):
        raise ValueError
      return token.lower() == "true"
    if isinstance(current, int):
      return int(token)
    if isinstance(current, float):
      return float(token)
  except ValueError:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {token!r} is not a {kind}, the "
                      f"type of config.{field} (now {current!r})") from None
  return token


def parse_dimension(field: str, text: str, current: Any) -> Dimension:
  """The distribution `text` for config.`field` (whose value is now `current`), checked
  against the field's type; a one-line ConfigError if it is malformed."""
  import optuna
  match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", text, re.S)
  if not match or match.group(1) not in KINDS:
    raise ConfigError(f"config.tune.space.{field}={text!r} is not a distribution; write "
                      f"{_SYNTAX}")
  kind, body = match.group(1), match.group(2)
  tokens = [t for t in (part.strip() for part in body.split(",")) if t] if body.strip() else []
  if isinstance(current, (ml_collections.ConfigDict, tuple, list)) or current is None:
    raise ConfigError(f"config.tune.space.{field}: config.{field} is a "
                      f"{type(current).__name__}; only numbers, strings and booleans are "
                      "searched")
  if kind == "choice":
    if not tokens:
      raise ConfigError(f"config.tune.space.{field}={text!r} is an empty choice; give at "
                        "least one value")
    values = [_choice_value(field, text, token, current) for token in tokens]
    if len(set(values)) != len(values):
      raise ConfigError(f"config.tune.space.{field}={text!r} repeats a value")
    return Dimension(field, text, optuna.distributions.CategoricalDistribution(values))
  if len(tokens) != 2:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {kind} takes two bounds, "
                      f"{kind}(low, high)")
  low, high = (_number(field, text, token) for token in tokens)
  if isinstance(current, bool) or isinstance(current, str):
    raise ConfigError(f"config.tune.space.{field}={text!r}: config.{field} is a "
                      f"{type(current).__name__} ({current!r}); search it with choice(...)")
  integer = kind.startswith("int_")
  if integer and not isinstance(current, int):
    raise ConfigError(f"config.tune.space.{field}={text!r}: config.{field} is a float; use "
                      f"{kind.removeprefix('int_')}(...)")
  if not integer and isinstance(current, int):
    raise ConfigError(f"config.tune.space.{field}={text!r}: config.{field} is an integer; use "
                      f"int_{kind}(...)")
  if integer and not (isinstance(low, int) and isinstance(high, int)):
    raise ConfigError(f"config.tune.space.{field}={text!r}: {kind} takes integer bounds")
  if not low < high:
    raise ConfigError(f"config.tune.space.{field}={text!r}: low ({low}) must be below high "
                      f"({high})")
  log = "log_" in kind
  if log and low <= 0:
    raise ConfigError(f"config.tune.space.{field}={text!r}: {kind} needs bounds > 0 (got "
                      f"low={low})")
  if integer:
    return Dimension(field, text, optuna.distributions.IntDistribution(low, high, log=log))
  return Dimension(field, text, optuna.distributions.FloatDistribution(float(low), float(high),
                                                                       log=log))


def parse_space(config: ml_collections.ConfigDict,
                given: tuple[str, ...] = ()) -> list[Dimension]:
  """config.tune.space as Dimensions (fields left "" are not searched), each checked against
  the config: the field exists and is not part of the study's own settings, its
  distribution is well formed, and every choice (or both ends of a range) gives a config
  that validates."""
  dimensions = []
  for field, text in config_lib.flatten(config.tune.space.to_dict()).items():
    if text == "":
      continue
    if not isinstance(text, str):
      raise ConfigError(f"config.tune.space.{field}={text!r} is not a distribution; write it "
                        f"as a string: {_SYNTAX}")
    if field.split(".")[0] == "tune":
      raise ConfigError(f"config.tune.space.{field}: the study's own settings (config.tune) "
                        "cannot be searched")
    dimensions.append(parse_dimension(field, text, _field_value(config, field)))
  for dimension in dimensions:
    for value in dimension.corners():
      try:
        validate(with_values(config, {dimension.field: value}), given)
      except ConfigError as error:
        raise ConfigError(f"config.tune.space.{dimension.field}={dimension.text!r}: the value "
                          f"{value!r} is not valid: {error}") from None
  return dimensions


def validate(config: ml_collections.ConfigDict, given) -> None:
  """config_lib.validate, but names whose objects were passed (`given`: "model",
  "dataset", "loss_fn") are not checked."""
  config_lib.validate(config, model_given="model" in given, dataset_given="dataset" in given,
                      loss_given="loss_fn" in given)


def with_values(config: ml_collections.ConfigDict,
                values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each field path set to its value (ints stay ints)."""
  config = copy.deepcopy(config)
  for field, value in values.items():
    *parents, last = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  return config


def trial_config(config: ml_collections.ConfigDict, dimensions: list[Dimension], trial,
                 space: SpaceFunction | None) -> ml_collections.ConfigDict:
  """The config of one trial: config.tune.space's values, then the define-by-run
  `space(trial, config)`, which may change the config in place or return a new one."""
  trial_cfg = with_values(config, {d.field: d.suggest(trial) for d in dimensions})
  if space is not None:
    returned = space(trial, trial_cfg)
    if returned is not None:
      if not isinstance(returned, ml_collections.ConfigDict):
        raise ConfigError(f"tune(space=...) returned a {type(returned).__name__}; it must "
                          "change the config it is given, or return an ml_collections."
                          "ConfigDict")
      trial_cfg = returned
  return trial_cfg
