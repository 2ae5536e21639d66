"""Test set-up: 8 emulated CPU devices, set before JAX starts its backends, and a disk
cache of compiled programs."""

import os
import sys
import tempfile

import jax
import pytest

NUM_DEVICES = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
jax.config.update("jax_platforms", "cpu")
# Most of the suite's time is compilation, and many tests (and the processes they
# start, which inherit these variables) compile the same small programs: JAX's
# persistent cache compiles each once. Its key holds the program, devices, options
# and JAX's version, so a hit is the same executable.
_CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(),
                                                    "jaxddp-tests-jax-cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
for _name, _value in _CACHE.items():
  os.environ.setdefault(_name, _value)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # so `configs` imports as a package, as from the command line


def make_tiny_config():
  """A fast config: small CNN on MNIST-1D, few steps, frequent logs."""
  from configs import mnist1d
  config = mnist1d.get_config()
  config.model.width = 8
  config.train.batch_size = 64
  config.train.num_steps = 10
  config.train.log_every = 5
  config.train.checkpoint_every = 5
  config.optimizer.learning_rate = 0.01
  return config


@pytest.fixture
def tiny_config():
  return make_tiny_config()


def run_main(args, env=None, timeout=300, cwd=REPO):
  """Runs `python -m jaxddp.main ARGS` in a subprocess; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "jaxddp.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout, env=full_env)
