"""Every config field of jaxddp with its default: jaxddp/default_config.py, which lists and
explains each one. Dataset and recipe configs here start from it and override fields;
in Python, `jaxddp.get_config()` returns the same."""

from jaxddp.default_config import get_config  # noqa: F401
