"""jaxddp.tune: studies of jaxddp runs on Optuna, on a real SQLite file and a real
PostgreSQL server (pgserver), with real worker processes."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO, make_tiny_config
from jaxddp import checkpoint, search_space, study as study_lib
from jaxddp import tune as tune_lib
from jaxddp.errors import ConfigError


def study_config(**tune_fields):
  """A tiny study: the CNN of width 8 on MNIST-1D, 10 steps per trial, an evaluation
  every 5, searching the learning rate and weight decay (one batch size: one compile)."""
  config = make_tiny_config()
  config.train.eval_every = 5
  config.tune.space = ml_collections.ConfigDict({
      "optimizer": {"learning_rate": "log_uniform(0.001, 0.3)",
                    "weight_decay": "uniform(0, 0.001)"}})
  config.tune.num_trials = 8
  config.tune.sampler = "random"
  for field, value in tune_fields.items():
    config.tune[field] = value
  return config


def overrides(config):
  """The command-line flags that turn configs/mnist1d.py into `config`."""
  flat = {
      "model.width": config.model.width, "train.batch_size": config.train.batch_size,
      "train.num_steps": config.train.num_steps, "train.log_every": config.train.log_every,
      "train.checkpoint_every": config.train.checkpoint_every,
      "train.eval_every": config.train.eval_every,
      "optimizer.learning_rate": config.optimizer.learning_rate,
      "parallel.cpu_devices": config.parallel.cpu_devices,
      **{f"tune.{k}": v for k, v in config.tune.items() if k != "space"}}
  flags = [f"--config.{k}={v}" for k, v in flat.items()]
  return flags


# The space of study_config(), for the command line: configs/tune_mnist1d.py's space with
# the batch size and label smoothing left out.
SPACE_FLAGS = ["--config.tune.space.optimizer.learning_rate=log_uniform(0.001, 0.3)",
               "--config.tune.space.optimizer.weight_decay=uniform(0, 0.001)",
               "--config.tune.space.train.batch_size=", "--config.tune.space.train.label_smoothing="]


def run_tune(workdir, config, *flags, wait=True, timeout=600):
  """`python -m jaxddp.tune` on configs/tune_mnist1d.py made into `config`."""
  command = [sys.executable, "-m", "jaxddp.tune", "--config=configs/tune_mnist1d.py",
             f"--workdir={workdir}", *overrides(config), *SPACE_FLAGS, *flags]
  if not wait:
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def load(workdir, storage=""):
  return optuna.load_study(study_name="jaxddp",
                           storage=storage or f"sqlite:///{workdir}/study.db")


def final_accuracy(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return [line["eval/accuracy"] for line in lines if "eval/accuracy" in line][-1]


# --- The space and the bad inputs (no training) ---------------------------------------------

def test_distributions_take_the_type_of_their_field():
  parse = search_space.parse_dimension
  assert parse("train.batch_size", "choice(32, 64)", 128).distribution.choices == (32, 64)
  assert parse("optimizer.learning_rate", "choice(0.1, 1)", 0.1).distribution.choices == (0.1,
                                                                                         1.0)
  assert parse("optimizer.name", "choice(sgd, 'adamw')", "momentum").distribution.choices == (
      "sgd", "adamw")
  assert parse("model.sync_batch_stats", "choice(true, False)", True).distribution.choices == (
      True, False)
  lr = parse("optimizer.learning_rate", "log_uniform(1e-3, 1.0)", 0.1).distribution
  assert (lr.low, lr.high, lr.log) == (1e-3, 1.0, True)
  width = parse("model.width", "int_log_uniform(8, 64)", 64).distribution
  assert isinstance(width, optuna.distributions.IntDistribution) and width.log
  config = search_space.with_values(make_tiny_config(), {"train.batch_size": 32,
                                                     "optimizer.name": "adamw"})
  assert (config.train.batch_size, config.optimizer.name) == (32, "adamw")


def bad(config_change, expected, tmp_path, **kwargs):
  config = study_config()
  config_change(config)
  workdir = tmp_path / "study"
  with pytest.raises(ConfigError) as error:
    tune_lib.tune(config, str(workdir), **kwargs)
  message = str(error.value)
  assert expected in message, message
  assert "\n" not in message
  assert not workdir.exists(), "a refused study wrote its workdir"
  return message


def set_space(field_text):
  field, text = field_text

  def change(config):
    *parents, last = field.split(".")
    node = config.tune.space
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[last] = text
  return change


@pytest.mark.parametrize("field_text, expected", [
    (("optimizer.learnin_rate", "uniform(0, 1)"), 'did you mean "optimizer.learning_rate"'),
    (("optimizer.learning_rate", "log_uniform(0.1 1.0)"), "takes two bounds"),
    (("optimizer.learning_rate", "uniformly(0, 1)"), "is not a distribution"),
    (("optimizer.learning_rate", "log_uniform(0, 1.0)"), "needs bounds > 0"),
    (("optimizer.learning_rate", "uniform(1, 0.5)"), "must be below high"),
    (("train.batch_size", "choice()"), "empty choice"),
    (("train.batch_size", "choice(32, big)"), "'big' is not a int"),
    (("train.batch_size", "uniform(32, 64)"), "is an integer; use int_uniform"),
    (("optimizer.learning_rate", "int_uniform(1, 3)"), "is a float; use uniform"),
    (("optimizer.name", "choice(sgd, adamm)"), "'adamm' is not valid"),
    (("optimizer.name", "uniform(0, 1)"), "search it with choice"),
    (("tune.num_trials", "choice(1, 2)"), "cannot be searched"),
])
def test_a_bad_space_is_one_line_and_writes_nothing(field_text, expected, tmp_path):
  bad(set_space(field_text), expected, tmp_path)


@pytest.mark.parametrize("field, value, expected", [
    ("sampler", "tpee", "config.tune.sampler='tpee' is not valid; choose one of: tpe, random"),
    ("pruner", "asha2", "config.tune.pruner='asha2' is not valid; choose one of: asha"),
    ("metric", "top5", "config.tune.metric='top5' is not valid"),
    ("num_trials", 0, "config.tune.num_trials=0 is not valid"),
    ("storage", "postgresql://nobody:secret@127.0.0.1:1/none", "cannot open it"),
    ("storage", "redis://localhost", "is not a storage"),
    ("storage", "journal:/no/such/dir/journal.log", "does not exist"),
])
def test_bad_study_settings_are_one_line_and_write_nothing(field, value, expected, tmp_path):
  message = bad(lambda config: config.tune.update({field: value}), expected, tmp_path)
  assert "secret" not in message  # a password in a URL is never shown


def test_a_grid_needs_choices(tmp_path):
  bad(lambda config: config.tune.update({"sampler": "grid"}), "needs every dimension to be a "
      "choice", tmp_path)


def test_devices_per_trial_must_divide_the_devices(tmp_path):
  def change(config):
    config.parallel.cpu_devices = 8
    config.tune.devices_per_trial = 3
  bad(change, "devices_per_trial=3 does not divide this host's 8 cpu devices", tmp_path,
      workers="auto")


def test_a_study_made_with_another_space_or_direction_is_refused(tmp_path):
  workdir = tmp_path / "study"
  config = study_config()
  workdir.mkdir()
  storage = study_lib.open_storage(config, str(workdir))
  dimensions = search_space.parse_space(config)
  study_lib.open_study(config, storage, dimensions, None)
  assert len(load(workdir).trials) == 8  # queued, all waiting
  before = os.path.getmtime(workdir / "study.db")
  other = study_config()
  other.tune.space.optimizer.learning_rate = "log_uniform(0.01, 0.3)"
  with pytest.raises(ConfigError, match="was made with space"):
    tune_lib.tune(other, str(workdir))
  other = study_config(metric="loss")
  with pytest.raises(ConfigError, match="maximizes; this config would minimize"):
    tune_lib.tune(other, str(workdir))
  other = study_config(num_trials=9)
  with pytest.raises(ConfigError, match="num_trials"):
    tune_lib.tune(other, str(workdir))
  assert os.path.getmtime(workdir / "study.db") == before
  assert sorted(os.listdir(workdir)) == ["study.db"]


def test_the_command_line_says_one_line_and_exits_2(tmp_path):
  done = run_tune(tmp_path / "study", study_config(), "--config.tune.space.optimizer."
                  "learning_rate=log_uniform(-1, 1)", timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip() == ("jaxddp.tune: error: config.tune.space.optimizer.learning_rate="
                                 "'log_uniform(-1, 1)': log_uniform needs bounds > 0 (got low=-1)")
  assert not (tmp_path / "study").exists()


def test_trials_share_compiled_programs_through_a_cache_in_the_workdir(tmp_path):
  """Without a cache set, a worker turns one on in its workdir and what it compiles is
  written there; a cache the user set is left alone (this test process has one)."""
  import jax
  before = jax.config.jax_compilation_cache_dir
  tune_lib.share_compiled_programs(str(tmp_path / "ignored"))
  assert jax.config.jax_compilation_cache_dir == before and before
  program = ("import sys, jax, jax.numpy as jnp\n"
             "from jaxddp import tune\n"
             "tune.share_compiled_programs(sys.argv[1])\n"
             "jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(3)).compile()\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  subprocess.run([sys.executable, "-c", program, str(tmp_path)], cwd=REPO, env=env, check=True,
                 timeout=120)
  assert len(os.listdir(tmp_path / "compile_cache")) >= 1


# --- Studies ---------------------------------------------------------------------------------

def ended(study):
  return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def attempts(workdir):
  with open(workdir / "trials" / "0000" / "attempts.jsonl") as f:
    return [json.loads(line) for line in f]


def wait_for_checkpoint(trial_dir, after, process, timeout=240):
  """The step of the trial's first checkpoint after step `after`, once it is written."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.stdout.read()
    step = checkpoint.latest_step(str(trial_dir))
    if step > after:
      return step
    time.sleep(0.1)
  raise AssertionError("no checkpoint")


def test_a_stopped_or_killed_worker_resumes_its_trial_from_its_checkpoint(tmp_path):
  """Trial 0 is stopped by SIGTERM, then its worker is SIGKILLed, then a new worker ends
  it: its parameters are those of the same trial never interrupted, and every step up to
  each checkpoint ran once."""
  config = study_config(num_trials=2, pruner="none", heartbeat_seconds=0.5,
                        stale_after_seconds=3)
  config.train.num_steps = 60
  config.train.checkpoint_every = 10
  config.train.log_every = 5
  config.parallel.cpu_devices = 1
  workdir = tmp_path / "study"
  trial_dir = workdir / "trials" / "0000"

  worker = run_tune(workdir, config, wait=False)
  first = wait_for_checkpoint(trial_dir, 0, worker)
  worker.send_signal(signal.SIGTERM)
  output = worker.communicate(timeout=120)[0]
  assert worker.returncode == 128 + signal.SIGTERM, output
  assert "stopped by SIGTERM" in output
  stopped_at = checkpoint.latest_step(str(trial_dir))
  study = load(workdir)
  assert study.trials[0].state == TrialState.WAITING  # handed back, with its parameters
  params = study.trials[0].params

  worker = run_tune(workdir, config, wait=False)
  killed_after = wait_for_checkpoint(trial_dir, stopped_at, worker)
  worker.kill()
  worker.communicate(timeout=60)
  killed_at = checkpoint.latest_step(str(trial_dir))
  assert stopped_at >= first and killed_at >= killed_after > stopped_at

  done = run_tune(workdir, config)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "trial 0 had no heartbeat" in done.stdout
  study = load(workdir)
  trials = ended(study)
  assert len(trials) == 2, [(t.number, t.state) for t in study.trials]
  killed = [t for t in study.trials if t.state == TrialState.FAIL]
  assert [t.number for t in killed] == [0] and len(study.trials) == 3
  continued = [t for t in trials if t.user_attrs.get("jaxddp:previous") == 0]
  assert len(continued) == 1 and continued[0].params == params
  assert continued[0].user_attrs["workdir"] == "trials/0000"

  # Each run started at the last checkpoint of the one before: no step up to a
  # checkpoint ran twice.
  starts = [(a["step"], a["pid"]) for a in attempts(workdir) if a["event"] == "started"]
  assert [step for step, _ in starts] == [0, stopped_at, killed_at]
  assert len({pid for _, pid in starts}) == 3
  assert [a["event"] for a in attempts(workdir)][-1] == "complete"

  # The same trial, never interrupted, in a study of its own (trial 0 of the same sampler
  # and seed has the same parameters).
  reference = tmp_path / "reference"
  config.tune.num_trials = 1
  done = run_tune(reference, config)
  assert done.returncode == 0, done.stdout + done.stderr
  assert load(reference).trials[0].params == params
  resumed = _params(trial_dir)
  uninterrupted = _params(reference / "trials" / "0000")
  assert resumed.keys() == uninterrupted.keys()
  for name in resumed:
    np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


def _params(trial_dir):
  """The parameters in the trial's last checkpoint, as {path: array}, read without a model."""
  import orbax.checkpoint as ocp
  import jax
  step = checkpoint.latest_step(str(trial_dir))
  tree = ocp.StandardCheckpointer().restore(os.path.join(trial_dir, "checkpoints", str(step),
                                                         "default"))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree["params"])}


def test_the_api_takes_a_define_by_run_space_and_a_dataset(tmp_path):
  """jaxddp.tune in this process: a conditional space (the momentum only for momentum
  SGD) on a dataset passed as an object, in a journal file."""
  import jaxddp
  from jaxddp import data
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 40, 1)).astype(np.float32)
  y = (x[:, :20, 0].sum(1) > 0).astype(np.int32)
  dataset = data.ArrayDataset(x[:192], y[:192], x[192:], y[192:])
  journal = tmp_path / "journal.log"  # the storage for file systems that hosts share
  config = study_config(num_trials=3, pruner="median", storage=f"journal:{journal}")
  config.parallel.cpu_devices = 1
  config.tune.space = ml_collections.ConfigDict({"optimizer": {"name": "choice(momentum, adamw)"}})

  result = jaxddp.tune(config, str(tmp_path / "study"), space=conditional_space, dataset=dataset)
  study = optuna.load_study(study_name="jaxddp", storage=optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(journal))))
  assert result.complete + result.pruned == 3 == len(study.trials)
  for trial in study.trials:
    assert ("optimizer.momentum" in trial.params) == (trial.params["optimizer.name"] ==
                                                      "momentum")
    saved = json.loads((tmp_path / "study" / trial.user_attrs["workdir"] /
                        "config.json").read_text())
    assert saved["config"]["optimizer"]["learning_rate"] == trial.params["lr"]
    assert saved["given"]["dataset"].endswith(":ArrayDataset")
  assert "Trained with objects passed to jaxddp.tune" in (
      tmp_path / "study" / "best_config.py").read_text()


def conditional_space(trial, config):
  config.optimizer.learning_rate = trial.suggest_float("lr", 1e-3, 0.3, log=True)
  if config.optimizer.name == "momentum":
    config.optimizer.momentum = trial.suggest_float("optimizer.momentum", 0.5, 0.95)


def test_a_diverged_trial_is_pruned_and_a_failed_one_failed_and_the_study_goes_on(tmp_path):
  """A learning rate that makes the loss NaN: the trial ends pruned ("diverged"), so that
  the sampler learns from it. A batch larger than the training set: the trial fails with
  the config's reason. The study ends with all its trials."""
  config = study_config(num_trials=4, pruner="none", sampler="grid")
  config.parallel.cpu_devices = 1
  config.tune.space = ml_collections.ConfigDict(
      {"optimizer": {"learning_rate": "choice(0.01, 1e12)"},
       "train": {"batch_size": "choice(64, 8192)"}})
  result = tune_lib.tune(config, str(tmp_path / "study"))
  study = load(tmp_path / "study")
  trials = {(t.params["optimizer.learning_rate"], t.params["train.batch_size"]): t
            for t in study.trials}
  assert trials[0.01, 64].state == TrialState.COMPLETE
  assert trials[1e12, 64].state == TrialState.PRUNED
  assert trials[1e12, 64].user_attrs["why"].startswith("diverged at step ")
  for lr in (0.01, 1e12):
    assert trials[lr, 8192].state == TrialState.FAIL
    assert "larger than the 4000 training examples" in trials[lr, 8192].user_attrs["why"]
  assert (result.complete, result.pruned, result.diverged, result.failed) == (1, 1, 1, 2)


def test_a_grid_larger_study_than_its_points_is_refused(tmp_path):
  def change(config):
    config.tune.sampler = "grid"
    config.tune.space = ml_collections.ConfigDict(
        {"optimizer": {"learning_rate": "choice(0.01, 0.1)"}})
  bad(change, "num_trials=8 but the grid has 2 points", tmp_path)
