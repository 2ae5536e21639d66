"""The error every layer raises for a user's mistake; it sits below them all."""

from __future__ import annotations


class ConfigError(ValueError):
  """A user error in the config or the command line; reported as one line."""
