"""Registries: the one list of names for each choice a config makes by name.

Each kind (models, datasets, norms, optimizers, schedules, losses, sparsity methods)
has one `Registry`, filled by its own module with the `register` decorator:

    @models.register("cnn")
    def cnn(config, num_classes): ...

Config validation and error messages read the registry's keys, so a new entry is
valid everywhere at once and an unknown name is always an error. Models and datasets
may also be named by an import path, `package.module:attribute` (resolve_import_path).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Generic, Iterator, TypeVar

from jaxddp.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
  """Names -> entries of one kind, for the config field `field` (e.g. "model.name")."""

  def __init__(self, kind: str, field: str):
    self.kind = kind
    self.field = field
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """A decorator that files its argument under `name`; a name is registered once."""
    if not isinstance(name, str) or not name or ":" in name:
      raise ValueError(f"a {self.kind} name must be a non-empty string without ':', got {name!r}")

    def add(entry: T) -> T:
      if name in self._entries and self._entries[name] is not entry:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = entry
      return entry
    return add

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def unknown(self, value: Any, extra: str = "") -> ConfigError:
    """The error for a name that is not registered: it lists every registered name."""
    return ConfigError(f"config.{self.field}={value!r} is not valid; choose one of: "
                       f"{', '.join(self._entries)}{extra}")

  def __getitem__(self, name: str) -> T:
    if name not in self._entries:
      raise self.unknown(name)
    return self._entries[name]


def first_line(error: BaseException) -> str:
  """An exception's message cut to its first line (for one-line errors)."""
  return (str(error).strip().splitlines() or [""])[0]


def check_signature(field: str, path: str, function: Callable, arguments: tuple[str, ...]) -> None:
  """A one-line ConfigError unless `function` (named by config.`field`=`path`) can be called
  with exactly `arguments`; a function without an inspectable signature passes."""
  try:
    inspect.signature(function).bind(*arguments)
  except TypeError:
    wanted = ", ".join(arguments)
    raise ConfigError(f"config.{field}={path!r}: {getattr(function, '__name__', path)} cannot be "
                      f"called as ({wanted}); a factory takes exactly ({wanted})") from None
  except ValueError:  # no signature (a builtin): the call decides
    pass


def is_import_path(name: object) -> bool:
  return isinstance(name, str) and ":" in name


def resolve_import_path(field: str, path: str) -> Any:
  """The attribute `path` ("package.module:attribute") names; a one-line ConfigError if the
  module cannot be imported or lacks the attribute. The working directory is importable,
  as it is for `python -m`."""
  module_name, _, attribute = path.partition(":")
  if not module_name or not attribute:
    raise ConfigError(f"config.{field}={path!r} is not a valid import path; write "
                      "package.module:attribute, e.g. my_models:MLP")
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.append(os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name and module_name.startswith(error.name):
      raise ConfigError(f"config.{field}={path!r}: no module named {error.name!r} (is it in the "
                        "working directory or installed?)") from None
    raise ConfigError(f"config.{field}={path!r}: importing {module_name} failed: "
                      f"{type(error).__name__}: {error}") from None
  except Exception as error:  # the user's module raised while importing
    message = (str(error).strip().splitlines() or [""])[-1]
    raise ConfigError(f"config.{field}={path!r}: importing {module_name} failed: "
                      f"{type(error).__name__}: {message}") from None
  value: Any = module
  for part in attribute.split("."):
    if not hasattr(value, part):
      raise ConfigError(f"config.{field}={path!r}: module {module_name} has no attribute "
                        f"{attribute!r}")
    value = getattr(value, part)
  return value
