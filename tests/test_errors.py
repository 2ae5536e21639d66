"""User errors on the command line: one line on stderr, exit status 2, nothing written.

Each case runs `python -m jaxddp.main` in a subprocess (a few seconds each, most of
it importing JAX), so the cases are kept to the ones that exercise distinct paths:
the device-count check in recipe.resolve, the name checks and range checks in
config.validate, unknown config keys (absl / ml_collections flag parsing), and the
workdir checks.
"""

import os
import re

import pytest

from conftest import REPO, run_main

CONFIG = "--config=configs/mnist1d.py"

# Lines that JAX or absl may print on their own (platform warnings, absl log lines
# such as "W0101 12:00:00.000 ..."); anything else besides our one line is a failure.
_NOISE = re.compile(r"^(WARNING[: ]|[WI]\d{4} \d\d:\d\d:\d\d)")


def _assert_one_line_error(result, *expected):
  """Exit 2, no traceback, exactly one `jaxddp: error:` line that contains `expected`."""
  stderr = result.stderr
  last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
  if "Traceback" in stderr:
    pytest.fail(f"exit status {result.returncode} with a traceback on stderr ending in: {last}",
                pytrace=False)
  assert result.returncode == 2, f"exit status {result.returncode}, stderr:\n{stderr}"
  lines = [line for line in stderr.splitlines() if line.strip()]
  ours = [line for line in lines if line.startswith("jaxddp:")]
  others = [line for line in lines if not line.startswith("jaxddp:")]
  unexplained = [line for line in others if not _NOISE.match(line)]
  assert not unexplained, f"unexpected stderr lines besides the error:\n{stderr}"
  assert len(ours) == 1, f"want exactly one jaxddp line on stderr, got:\n{stderr}"
  (line,) = ours
  assert line.startswith("jaxddp: error: "), line
  for text in expected:
    assert text in line, f"{text!r} not in {line!r}"
  assert result.stdout.strip() == "", f"nothing should reach stdout, got:\n{result.stdout}"
  return line


def _run_bad(tmp_path, *overrides):
  """Runs with a workdir that does not exist yet; asserts it still does not afterwards."""
  workdir = tmp_path / "run"
  assert not workdir.exists()
  result = run_main([CONFIG, f"--workdir={workdir}", *overrides])
  assert not workdir.exists(), f"{workdir} was created by a run that failed:\n{result.stderr}"
  return result


def test_batch_not_divisible_by_devices(tmp_path):
  result = _run_bad(tmp_path, "--config.parallel.cpu_devices=8",
                    "--config.train.batch_size=100")
  line = _assert_one_line_error(result, "config.train.batch_size=100", "8 devices")
  assert "multiple of 8" in line


def test_ghost_batch_size_not_dividing_the_per_device_batch(tmp_path):
  result = _run_bad(tmp_path, "--config.parallel.cpu_devices=2",
                    "--config.model.norm=ghost_batch_norm", "--config.model.ghost_batch_size=48")
  _assert_one_line_error(result, "config.model.ghost_batch_size=48",
                         "per-device batch of 64 examples", "e.g. 32")


@pytest.mark.parametrize("field, valid", [
    ("dataset.name", ["mnist1d", "digits", "synthetic"]),
    ("model.name", ["cnn", "resnet18", "resnet50", "resnet152"]),
    ("optimizer.name", ["sgd", "momentum", "nesterov", "adamw"]),
    ("parallel.backend", ["shard_map", "pmap"]),
    ("distributed.cluster", ["auto", "none", "slurm", "ompi", "k8s"]),
])
def test_unknown_name(tmp_path, field, valid):
  result = _run_bad(tmp_path, f"--config.{field}=nope")
  _assert_one_line_error(result, f"config.{field}", "'nope'", *valid)


@pytest.mark.parametrize("overrides, expected", [
    (["--config.train.batch_size=0"], ["config.train.batch_size=0", "> 0"]),
    (["--config.train.batch_size=-8"], ["config.train.batch_size=-8", "> 0"]),
    (["--config.train.num_steps=-1"], ["config.train.num_steps=-1", ">= 0"]),
    (["--config.train.log_every=0"], ["config.train.log_every=0", "> 0"]),
    (["--config.train.checkpoint_every=0"], ["config.train.checkpoint_every=0", "> 0"]),
    (["--config.optimizer.learning_rate=0"], ["config.optimizer.learning_rate=0", "> 0"]),
    (["--config.train.num_epochs=0", "--config.train.num_steps=0"],
     ["config.train.num_epochs=0", "config.train.num_steps=0", "> 0"]),
    (["--config.distributed.heartbeat_timeout=0"],
     ["config.distributed.heartbeat_timeout=0", "> 0"]),
], ids=["batch_size=0", "batch_size=-8", "num_steps=-1", "log_every=0", "checkpoint_every=0",
        "learning_rate=0", "num_epochs=num_steps=0", "heartbeat_timeout=0"])
def test_non_positive(tmp_path, overrides, expected):
  result = _run_bad(tmp_path, *overrides)
  _assert_one_line_error(result, *expected)


@pytest.mark.parametrize("override, key", [
    ("--config.train.bach_size=64", "bach_size"),    # misspelt field
    ("--config.trian.batch_size=64", "trian"),       # misspelt section
])
def test_unknown_config_key(tmp_path, override, key):
  result = _run_bad(tmp_path, override)
  _assert_one_line_error(result, key)


def test_workdir_is_a_file(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("precious\n")
  result = run_main([CONFIG, f"--workdir={path}"])
  _assert_one_line_error(result, f"--workdir={path}", "is a file", "directory")
  assert path.is_file()
  assert path.read_text() == "precious\n"
  assert sorted(os.listdir(tmp_path)) == ["not_a_dir"]


def test_missing_workdir():
  before = sorted(os.listdir(REPO))
  result = run_main([CONFIG])
  _assert_one_line_error(result, "--workdir", "required")
  assert sorted(os.listdir(REPO)) == before


def test_missing_config_file(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(["--config=configs/no_such_config.py", f"--workdir={workdir}"])
  _assert_one_line_error(result, "could not load --config", "no_such_config.py")
  assert not workdir.exists()


def test_config_file_found_from_another_directory(tmp_path):
  """`from configs import default` inside a config works whatever the working directory."""
  workdir = tmp_path / "run"
  result = run_main([f"--config={os.path.join(REPO, 'configs', 'mnist1d.py')}",
                     f"--workdir={workdir}", "--config.train.batch_size=100",
                     "--config.parallel.cpu_devices=8"], cwd=tmp_path)
  # It got as far as the device check: the config itself loaded.
  _assert_one_line_error(result, "config.train.batch_size=100")


def test_sparsity_schedule_checked_against_the_run(tmp_path):
  """config.sparsity is checked against the run's length before anything compiles."""
  result = _run_bad(tmp_path, "--config.sparsity.method=gradual_magnitude",
                    "--config.sparsity.start_step=500", "--config.sparsity.end_step=400")
  _assert_one_line_error(result, "config.sparsity.end_step=400 must be after "
                                 "config.sparsity.start_step=500")


# --- Defects found by trying bad input as a new user would (issue 14). ---


@pytest.mark.parametrize("overrides, expected", [
    (["--config.seed=-5"], ["config.seed=-5 is not valid", "integer in [0, 2**32)"]),
    (["--config.optimizer.learning_rate=inf"],
     ["config.optimizer.learning_rate=inf is not valid", "finite number > 0"]),
    (["--config.optimizer.learning_rate=nan"],
     ["config.optimizer.learning_rate=nan is not valid", "finite number > 0"]),
    (["--config.distributed.num_processes=2"],
     ["config.distributed.num_processes=2 but no coordinator is given",
      "config.distributed.coordinator_address=HOST:PORT", "scripts/launch_local.py"]),
], ids=["seed=-5", "learning_rate=inf", "learning_rate=nan", "num_processes=2"])
def test_bad_values_new_users_tried(tmp_path, overrides, expected):
  result = _run_bad(tmp_path, *overrides)
  _assert_one_line_error(result, *expected)


USER_MODELS = {"PYTHONPATH": os.path.join(REPO, "tests")}  # tests/user_models.py


@pytest.mark.parametrize("field, value, expected", [
    ("model.name", "no_such_module:MLP", "config.model.name='no_such_module:MLP': no module "
                                         "named 'no_such_module'"),
    ("model.name", "user_models:Missing", "config.model.name='user_models:Missing': module "
                                          "user_models has no attribute 'Missing'"),
    ("model.name", "user_models:bad_factory", "bad_factory cannot be called as (config, "
                                              "num_classes)"),
    ("model.name", "user_models:NoClasses", "the module NoClasses has no field num_classes"),
    ("dataset.name", "user_models:mlp_factory", "mlp_factory cannot be called as (config)"),
    ("train.loss", "user_models:nope", "module user_models has no attribute 'nope'"),
    ("model.name", "user_models:raising_model_factory",
     "config.model.name='user_models:raising_model_factory': building the model raised "
     "RuntimeError: boom in the model factory"),
    ("dataset.name", "user_models:raising_dataset_factory",
     "config.dataset.name='user_models:raising_dataset_factory': the factory raised "
     "RuntimeError: boom in the dataset factory"),
], ids=["missing module", "missing attribute", "model factory signature", "no num_classes",
        "dataset factory signature", "missing loss", "model factory raises",
        "dataset factory raises"])
def test_bad_import_paths(tmp_path, field, value, expected):
  workdir = tmp_path / "run"
  result = run_main([CONFIG, f"--workdir={workdir}", f"--config.{field}={value}"],
                    env=USER_MODELS)
  _assert_one_line_error(result, expected)
  assert not workdir.exists()
