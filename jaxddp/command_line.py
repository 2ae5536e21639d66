"""What every command line of jaxddp shares (jaxddp.main, jaxddp.score, the experiment
scripts): flags parsed with one-line errors, exit status 2, never a traceback."""

from __future__ import annotations

import os
import re
import sys

from absl import flags, logging


def fail(message: str, status: int, process: str = "", program: str = "jaxddp") -> None:
  """Prints one error line (naming the process in a multi-process run) and exits."""
  prefix = f"[{process}] " if process else ""
  print(f"{program}: error: {prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _unknown_key_message(error: str, argv: list[str]) -> str:
  key = re.search(r"'\\?'?(\w+)", error)
  suggestion = re.search(r'Did you mean "(\w+)"', error)
  key = key.group(1) if key else "?"
  flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
               re.search(rf"\b{re.escape(key)}\b", a.split("=")[0])), "--config")
  hint = f'; did you mean "{suggestion.group(1)}"?' if suggestion else ""
  return f"{flag}: config has no field {key!r}{hint}"


def _make_config_package_importable(argv: list[str]) -> None:
  """Lets `from configs import default` work in a config file, from any directory.

  Config files live in a package directory (configs/); its parent goes on sys.path.
  """
  for arg in argv:
    if arg.startswith("--config=") and os.path.isfile(arg.split("=", 1)[1]):
      config_dir = os.path.dirname(os.path.abspath(arg.split("=", 1)[1]))
      if os.path.isfile(os.path.join(config_dir, "__init__.py")):
        sys.path.insert(0, os.path.dirname(config_dir))


def parse_flags(argv: list[str], program: str = "jaxddp",
                required: tuple[str, ...] = ("config",)) -> None:
  """Parses the command line into absl's flags, or prints one line `PROGRAM: error: ...`
  and exits with status 2: a bad flag value, an unknown --config.x key, a missing
  required flag, or a config file that does not load. Every config flag is loaded here,
  so that a broken config file is not found later, in the middle of a run."""
  _make_config_package_importable(argv)
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # config_flags warns on stderr: we say it in one line
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Error whilst parsing config file" in str(error):  # the config file's own error
      fail(f"could not load {_config_arg(argv)}: {lines[-1]}", 2, program=program)
    fail(lines[0] if lines else type(error).__name__, 2, program=program)
  except (KeyError, AttributeError) as error:
    if "get_config" in str(error):  # a config file without one
      fail(f"could not load {_config_arg(argv)}: it has no get_config() function", 2,
           program=program)
    if "NoneType" in str(error):  # an override applied to what get_config() returned
      fail(f"{_config_arg(argv)}: get_config() returned None; it must return an "
           "ml_collections.ConfigDict", 2, program=program)
    # ml_collections reports an unknown --config.x key as KeyError/AttributeError whose
    # message is the missing key and a suggestion ("Did you mean ...").
    fail(_unknown_key_message(str(error), argv), 2, program=program)
  except Exception as error:  # the config file raised, or does not parse; a flag file
    lines = [line.strip().removeprefix(_EARLIER_FAILURE)
             for line in str(error).splitlines() if line.strip()]
    fail(f"could not load {_config_arg(argv)}: {type(error).__name__}: "
         f"{lines[-1] if lines else ''}", 2, program=program)
  finally:
    logging.set_verbosity(previous)
  if len(rest) > 1:  # rest[0] is the program
    fail(f"unexpected argument {rest[1]!r}: every setting is a flag, --name=value", 2,
         program=program)
  given = sorted({arg[2:].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")})
  for name in required:
    if name not in given or flags.FLAGS[name].value == "":
      example = ", e.g. --config=configs/mnist1d.py" if name == "config" else ""
      fail(f"--{name} is required{example}", 2, program=program)
  for name in (name for name in given if name in flags.FLAGS):
    flag = flags.FLAGS[name]
    if type(flag).__name__ != "_ConfigFlag":  # a config file (not one of its fields)
      continue
    try:  # config_flags loads a config file at the first access to its value
      if flag.value is None:
        fail(f"{_config_arg(argv, name)}: get_config() returned None; it must return an "
             "ml_collections.ConfigDict", 2, program=program)
      flag.value.to_dict()
    except Exception as error:  # a missing file, or an exception inside the config file
      lines = [line.strip().removeprefix(_EARLIER_FAILURE)
               for line in str(error).splitlines() if line.strip()]
      fail(f"could not load {_config_arg(argv, name)}: {type(error).__name__}: "
           f"{lines[-1] if lines else ''}", 2, program=program)


# How config_flags words a file it could not load, before saying why.
_EARLIER_FAILURE = "Configuration is not available because of an earlier failure to load: "


def _config_arg(argv: list[str], name: str = "config") -> str:
  """The --NAME=FILE argument of a config file flag, for an error line."""
  return next((arg for arg in argv[1:] if arg.startswith(f"--{name}=")), f"--{name}")
