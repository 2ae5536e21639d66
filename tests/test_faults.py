"""Bad inputs and faults that once gave silent wrong results, lost work or tracebacks
(issue 22): each is the exact scenario a trial found, and each now gives one line, exit
status 2 on a command line, and leaves every file as it was.

Items 1-3 (other data, other scores, two runs on one workdir) check too that the earlier
run and its files are untouched. Items 6, 9-12 of the scripts (planner, cascade,
compute_optimal) run as subprocesses that stop before anything trains.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, make_tiny_config, run_main
from jaxddp import data, score, train, workdir
from jaxddp.errors import ConfigError


def _snapshot(directory):
  """{relative path: (size, mtime_ns, bytes digest)} of every file under `directory`."""
  import hashlib
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def _one_line(error: BaseException) -> str:
  message = str(error)
  assert "\n" not in message, message
  return message


def _assert_one_error_line(completed, program, status, *expected):
  """The process printed exactly one `PROGRAM: error:` line on stderr (and no
  traceback) and exited with `status`."""
  stderr = completed.stderr
  assert "Traceback" not in stderr, stderr
  assert completed.returncode == status, f"exit {completed.returncode}:\n{stderr}"
  errors = [line for line in stderr.splitlines() if line.startswith(f"{program}: error:")]
  assert len(errors) == 1, stderr
  for text in expected:
    assert text in errors[0], (text, errors[0])
  return errors[0]


def _script(args, timeout=180, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, **kwargs)


# --- 1 and 2: a run, or scores, made on other data ------------------------------------


def _arrays(labels_seed=None, n_train=256, n_test=128):
  """A small ArrayDataset; labels_seed shuffles the training labels (other data, same x)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n_train + n_test, 40, 1)).astype(np.float32)
  y = rng.integers(0, 10, n_train + n_test)
  train_y = y[:n_train].copy()
  if labels_seed is not None:
    np.random.default_rng(labels_seed).shuffle(train_y)
  return data.ArrayDataset(x[:n_train], train_y, x[n_train:], y[n_train:], num_classes=10)


def _scoring_config():
  config = make_tiny_config()
  config.data_pruning.score = "el2n"
  config.data_pruning.num_runs = 1
  config.data_pruning.score_epochs = 1  # 4 steps of 64
  return config


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  """Scores of _arrays() in a workdir: (workdir, a copy of the scores and their .json
  that no test rewrites, their values)."""
  workdir = str(tmp_path_factory.mktemp("scored"))
  values = score.score(_scoring_config(), workdir, dataset=_arrays())
  copy = str(tmp_path_factory.mktemp("scores_of_arrays"))
  for name in ("el2n.npy", "el2n.json"):
    shutil.copy(os.path.join(workdir, "scores", name), copy)
  return workdir, os.path.join(copy, "el2n.npy"), values


def test_scoring_other_data_never_resumes_the_run_of_the_first(scored, tmp_path, capsys):
  workdir, _, values_a = scored
  runs = os.path.join(workdir, "score_runs")
  (run_a,) = os.listdir(runs)
  before = _snapshot(os.path.join(runs, run_a))
  capsys.readouterr()
  other = _arrays(labels_seed=1)
  values_b = score.score(_scoring_config(), workdir, dataset=other)
  out = capsys.readouterr().out
  assert "resuming" not in out, out
  assert len(os.listdir(runs)) == 2  # a run of its own
  assert _snapshot(os.path.join(runs, run_a)) == before  # the first run untouched
  fresh = score.score(_scoring_config(), str(tmp_path), dataset=other)
  np.testing.assert_array_equal(values_b, fresh)  # what a fresh scoring gives
  assert not np.array_equal(values_a, values_b)


def test_a_run_is_never_resumed_on_other_data(tmp_path):
  config = make_tiny_config()
  train.train_and_evaluate(config, str(tmp_path), dataset=_arrays())
  before = _snapshot(tmp_path)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path), dataset=_arrays(labels_seed=1))
  assert _one_line(error.value).startswith(f"--workdir={tmp_path} holds a run on other data")
  assert _snapshot(tmp_path) == before


def test_scores_of_other_data_are_refused(scored, tmp_path):
  """The scores' .json records the data they were computed on; other data of the same
  size (here: the same inputs, other labels) does not get them."""
  _, scores_path, _ = scored
  config = make_tiny_config()
  config.data_pruning.scores, config.data_pruning.keep_fraction = scores_path, 0.5
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(workdir), dataset=_arrays(labels_seed=1))
  message = _one_line(error.value)
  assert message.startswith(f"config.data_pruning.scores={scores_path!r} was computed on "
                            "other data ("), message
  assert not workdir.exists()


def test_a_scores_file_changed_before_a_resume_is_refused(scored, tmp_path):
  _, scores_path, values = scored
  scores = str(tmp_path / "scores.npy")
  np.save(scores, values)
  config = make_tiny_config()
  config.data_pruning.scores, config.data_pruning.keep_fraction = scores, 0.5
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir), dataset=_arrays())
  before = _snapshot(workdir)
  np.save(scores, values[::-1].copy())  # another subset, at the same path
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(workdir), dataset=_arrays())
  assert _one_line(error.value).startswith(
      f"config.data_pruning.scores={scores!r} changed since this workdir's run started")
  assert _snapshot(workdir) == before


# --- 3: two runs on one workdir ----------------------------------------------------------


def test_two_runs_on_one_workdir_one_trains_the_other_gets_one_line(tmp_path):
  args = ["--config=configs/mnist1d.py", f"--workdir={tmp_path}", "--config.model.width=8",
          "--config.train.batch_size=64", "--config.train.num_steps=150",
          "--config.train.log_every=10", "--config.train.checkpoint_every=50",
          "--config.parallel.cpu_devices=2"]
  processes = [subprocess.Popen([sys.executable, "-m", "jaxddp.main", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
  results = [(p, *p.communicate(timeout=300)) for p in processes]
  statuses = sorted(p.returncode for p, _, _ in results)
  assert statuses == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in results]
  (winner, _, _), = [r for r in results if r[0].returncode == 0]
  (loser, _, loser_err), = [r for r in results if r[0].returncode == 2]
  line = _assert_one_error_line(subprocess.CompletedProcess([], 2, "", loser_err), "jaxddp", 2,
                                f"--workdir={tmp_path} is in use by another run "
                                f"(pid {winner.pid} on ")
  assert line.endswith("wait for it to end, or use another --workdir"), line
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
  assert steps == list(range(10, 151, 10))  # the winner's run, whole, once


def test_a_killed_holder_does_not_leave_its_workdir_locked(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from jaxddp.workdir import Lock\n"
       f"with Lock({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(600)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError) as error:
      with workdir.Lock(str(tmp_path)):
        pass
    assert f"(pid {holder.pid} on " in _one_line(error.value)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir.Lock(str(tmp_path)):  # the kernel released it with the process
    pass


# --- 4, 5, 13, 15: the library API --------------------------------------------------------


@pytest.mark.parametrize("label", [2**32 + 3, 2**31 + 3, 10**8])
def test_labels_out_of_range_are_refused_before_any_cast(label):
  y = np.arange(20, dtype=np.int64) % 10
  y[7] = label
  x = np.zeros((20, 8, 1), np.float32)
  with pytest.raises(ConfigError) as error:
    data.ArrayDataset(x, y, x, y % 10)
  assert _one_line(error.value) == (f"ArrayDataset: train_y holds the label {label} (example "
                                    f"7); labels are class indices, at most {2**24}")


@pytest.mark.parametrize("given", ["", None])
def test_an_empty_workdir_is_refused_and_nothing_is_written(given, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for function in (train.train_and_evaluate, score.score):
    with pytest.raises(ConfigError) as error:
      function(make_tiny_config(), given)
    assert _one_line(error.value).startswith("--workdir is empty; give a directory")
  assert os.listdir(tmp_path) == []


def test_infobatch_with_the_whole_dataset_as_a_batch_is_refused_before_training(tmp_path):
  config = make_tiny_config()
  config.dataset.num_train_examples = 256
  config.train.batch_size = 256
  config.train.num_steps, config.train.num_epochs = 0, 4
  config.data_pruning.dynamic = "infobatch"
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert _one_line(error.value) == (
      "config.data_pruning.prune_ratio=0.5 can leave a pruned epoch 128 of the 256 training "
      "examples, fewer than one batch of 256; lower prune_ratio or the batch size")
  assert not (tmp_path / "run").exists()


def test_an_npz_path_that_is_a_directory_says_so(tmp_path):
  completed = run_main(["--config=configs/mnist1d.py", f"--workdir={tmp_path / 'run'}",
                        "--config.dataset.name=npz", f"--config.dataset.path={tmp_path}"])
  _assert_one_error_line(completed, "jaxddp", 2,
                         f"config.dataset.path={str(tmp_path)!r} is a directory; give the .npz "
                         "file itself")
  assert not (tmp_path / "run").exists()


# --- 8: a workdir that cannot be written ---------------------------------------------------


# Runs ARGV as a process that obeys file permissions even as root: it drops
# CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set (prctl PR_CAPBSET_DROP;
# harmless for another user), then execs, which leaves root without them, as any user is.
_AS_ANY_USER = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):
  libc.prctl(24, capability, 0, 0, 0)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("command", ["jaxddp.main", "jaxddp.score"])
@pytest.mark.parametrize("kind", ["new", "existing"])
def test_a_read_only_workdir_is_one_line(command, kind, tmp_path):
  parent = tmp_path / "read_only"
  parent.mkdir()
  target = parent / "run"
  if kind == "existing":
    target.mkdir()
    target.chmod(0o555)
  parent.chmod(0o555)
  try:
    completed = _script(["-c", _AS_ANY_USER, "-m", command, "--config=configs/mnist1d.py",
                         f"--workdir={target}", "--config.model.width=8",
                         "--config.train.num_steps=5"])
  finally:
    parent.chmod(0o755)
    if kind == "existing":
      target.chmod(0o755)
  _assert_one_error_line(completed, "jaxddp", 2,
                         f"--workdir={target} cannot be written (Permission denied)")
  assert os.listdir(parent) == (["run"] if kind == "existing" else [])
  if kind == "existing":
    assert os.listdir(target) == []


# --- 14: a NaN before any checkpoint -------------------------------------------------------


def test_a_nan_before_the_first_checkpoint_does_not_claim_one(tmp_path):
  config = make_tiny_config()  # the first checkpoint at step 5
  config.optimizer.learning_rate = 1e30  # diverges at once
  config.optimizer.warmup_epochs = 0.0
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = _one_line(error.value)
  step = int(re.search(r" at step (\d+); stopping \(no checkpoint was written before it; ",
                       message)[1])
  assert step < config.train.checkpoint_every, message
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


# --- 17: one metrics line per step after kill -9 and resume --------------------------------


def test_a_resumed_run_keeps_one_metrics_line_per_step(tmp_path):
  """Killed after it logged steps past its last checkpoint, the run redoes those steps:
  metrics.jsonl keeps one line for each (a reader would otherwise see two values)."""
  args = ["--config=configs/mnist1d.py", f"--workdir={tmp_path}", "--config.model.width=8",
          "--config.train.batch_size=64", "--config.train.num_steps=600",
          "--config.train.log_every=10", "--config.train.checkpoint_every=100",
          "--config.parallel.cpu_devices=2"]
  process = subprocess.Popen([sys.executable, "-m", "jaxddp.main", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics, checkpoints = tmp_path / "metrics.jsonl", tmp_path / "checkpoints"

  def logged_past_checkpoint():
    if not (metrics.exists() and checkpoints.exists()):
      return False
    saved = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
              if line.endswith("}")]
    return saved and logged and max(logged) >= max(saved) + 20

  deadline = time.time() + 240
  while not logged_past_checkpoint():
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  resumed = run_main(args)
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming from the checkpoint at step" in resumed.stdout
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(10, 601, 10))
  assert [r["step"] for r in records if "eval/loss" in r] == [600]


# --- 6, 7, 9-12, 16, 18: the scripts ---------------------------------------------------------


def test_the_cascade_refuses_a_cheap_model_larger_than_the_large_one(tmp_path):
  out = tmp_path / "out"
  completed = _script(["-m", "experiments.cascade", "--config=configs/mnist1d.py",
                       f"--out={out}", "--validation_examples=500", "--cheap_width=16",
                       "--large_width=4"])
  line = _assert_one_error_line(completed, "cascade.py", 2, "--cheap_width=16 costs ")
  assert re.search(r"not less than --large_width=4 \([0-9.]+\): the cheap model must be the "
                   r"smaller one$", line), line
  assert not out.exists()


def test_the_cascade_refuses_one_workdir_for_both_models(tmp_path):
  out, shared = tmp_path / "out", tmp_path / "both"
  completed = _script(["-m", "experiments.cascade", "--config=configs/mnist1d.py",
                       f"--out={out}", "--validation_examples=500", f"--cheap_workdir={shared}",
                       f"--large_workdir={shared}"])
  _assert_one_error_line(completed, "cascade.py", 2,
                         f"--cheap_workdir and --large_workdir are both {shared}")
  assert not out.exists() and not shared.exists()


def test_the_cascade_names_the_flag_of_a_workdir_that_is_a_file(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  completed = _script(["-m", "experiments.cascade", "--config=configs/mnist1d.py",
                       f"--out={tmp_path / 'out'}", "--validation_examples=500",
                       f"--cheap_workdir={a_file}"])
  _assert_one_error_line(completed, "cascade.py", 2,
                         f"--cheap_workdir={a_file} is a file; give a directory")


@pytest.mark.parametrize("script", ["cascade", "compute_optimal"])
def test_a_bad_config_field_in_a_script_is_one_line(script, tmp_path):
  completed = _script(["-m", f"experiments.{script}", "--config=configs/mnist1d.py",
                       f"--out={tmp_path / 'out'}", "--config.train.bach_size=3"])
  _assert_one_error_line(completed, f"{script}.py", 2,
                         "--config.train.bach_size: config has no field 'bach_size'; did you "
                         'mean "batch_size"?')
  assert not (tmp_path / "out").exists()


def test_compute_optimal_checks_check_factor_before_the_first_run(tmp_path):
  completed = _script(["-m", "experiments.compute_optimal", "--config=configs/mnist1d.py",
                       f"--out={tmp_path / 'out'}", "--quick", "--check", "--check_factor=0"])
  _assert_one_error_line(completed, "compute_optimal.py", 2, "--check_factor=0: ")
  assert not (tmp_path / "out").exists()


def test_a_refused_compute_optimal_run_leaves_nothing_that_refuses_the_next(tmp_path):
  out = tmp_path / "out"
  refused = _script(["-m", "experiments.compute_optimal", "--config=configs/mnist1d.py",
                     f"--out={out}", "--budgets=1e8", "--widths=2", "--min_steps=100000000"])
  _assert_one_error_line(refused, "compute_optimal.py", 2,
                         "no (budget, width) fits --min_steps and --max_examples")
  assert not (out / "settings.json").exists()
  # Another config into the same --out is not taken for a clash with the refused one.
  again = _script(["-m", "experiments.compute_optimal", "--config=configs/mnist1d.py",
                   f"--out={out}", "--budgets=1e8", "--widths=2", "--min_steps=100000000",
                   "--config.train.batch_size=16"])
  line = _assert_one_error_line(again, "compute_optimal.py", 2)
  assert "holds runs made with other settings" not in line, line


def test_a_budget_that_is_not_a_number_is_one_line():
  completed = _script(["-m", "experiments.compute_optimal", "--fit=fit.json", "--predict=abc"])
  _assert_one_error_line(completed, "compute_optimal.py", 2, "--predict=abc")


def test_score_help_says_what_holds_across_device_counts():
  completed = _script(["-m", "jaxddp.score", "--help"], timeout=60)
  assert completed.returncode == 0
  text = " ".join(completed.stdout.split())
  assert "The same command on 1 device, 8 devices or several processes gives the same " \
         "scores" not in text
  assert "bit-identical, a difference of 0.0" in text
  assert "1 vs 2 devices: scores (in [0, 1.41], mean 0.057) differ by up to 0.19 (median " \
         "0.001), rank correlation 0.993, and 70 of the 2000 examples kept at keep_fraction " \
         "0.5 differ" in text


# --- Found by the fresh-clone trial of this issue (one line each, nothing written) --------

_BAD_CONFIGS = {
    "missing": (None, ": OSError: [Errno 2] No such file or directory"),
    "a directory": ("", ": OSError: [Errno 21] Is a directory"),
    "bad syntax": ("def get_config(:\n", "SyntaxError: invalid syntax"),
    "raises": ("def get_config():\n  raise RuntimeError('boom')\n", "RuntimeError: boom"),
    "returns None": ("def get_config():\n  pass\n", "get_config() returned None"),
}


@pytest.mark.parametrize("kind", sorted(_BAD_CONFIGS))
def test_a_config_file_that_does_not_load_is_one_line(kind, tmp_path):
  text, expected = _BAD_CONFIGS[kind]
  path = tmp_path / "bad.py"
  if kind == "a directory":
    path = tmp_path
  elif text is not None:
    path.write_text(text)
  for overrides in ([], ["--config.model.width=4"]):  # config_flags applies them on load
    completed = run_main([f"--config={path}", f"--workdir={tmp_path / 'run'}", *overrides])
    line = _assert_one_error_line(completed, "jaxddp", 2, expected)
    assert line.startswith(f"jaxddp: error: could not load --config={path}: " if kind !=
                           "returns None" else f"jaxddp: error: --config={path}: "), line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what", ["missing", "a directory"])
def test_a_scores_path_that_is_not_a_file_is_one_line(what, tmp_path):
  scores = tmp_path / "none.npy" if what == "missing" else tmp_path
  completed = run_main(["--config=configs/mnist1d.py", f"--workdir={tmp_path / 'run'}",
                        f"--config.data_pruning.scores={scores}",
                        "--config.data_pruning.keep_fraction=0.5"])
  _assert_one_error_line(completed, "jaxddp", 2, f"config.data_pruning.scores='{scores}'")
  assert not (tmp_path / "run").exists()


def test_a_checkpoint_cut_short_is_one_line_that_says_what_to_delete(tmp_path):
  args = ["--config=configs/mnist1d.py", f"--workdir={tmp_path}", "--config.model.width=4",
          "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
          "--config.parallel.cpu_devices=2"]
  assert run_main(args).returncode == 0
  step = tmp_path / "checkpoints" / "4"
  for item in step.iterdir():  # a kill or a full disk in the middle of writing it
    shutil.rmtree(item) if item.is_dir() else item.unlink()
  completed = run_main(args)
  _assert_one_error_line(completed, "jaxddp", 2, "the checkpoint at step 4 in ",
                         "cannot be read (", f"delete {step} to resume from an earlier")


def test_a_prototype_score_without_its_run_writes_nothing(tmp_path):
  completed = _script(["-m", "jaxddp.score", "--config=configs/mnist1d.py",
                       f"--workdir={tmp_path / 'scores'}", "--config.data_pruning.score=prototype"])
  _assert_one_error_line(completed, "jaxddp", 2, "set --config.init_from.workdir")
  assert not (tmp_path / "scores").exists()


@pytest.mark.parametrize("config, expected", [
    (None, "the config is a NoneType, not an ml_collections.ConfigDict"),
    ({"train": {"batch_size": 3}}, "the config is a dict, not an ml_collections.ConfigDict"),
    ("typo", 'config.train.bach_size is not a field of jaxddp\'s config; did you mean '
             '"batch_size"?'),
], ids=["None", "dict", "typo"])
def test_the_api_refuses_what_is_not_a_config(config, expected, tmp_path):
  if config == "typo":  # Python adds the field; nothing would read it
    config = make_tiny_config()
    config.train.bach_size = 3
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert _one_line(error.value).startswith(expected)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, flags, expected", [
    ("data_pruning", ["--fractions=abc"], "--fractions=abc: not a list of floats"),
    ("data_pruning", ["--fractions=1.5"], "--fractions=1.5: 1.5 is out of range"),
    ("data_pruning", ["--parts=bogus"], "--parts=bogus: choose static, dynamic or both"),
    ("data_pruning", ["--other_fraction=-1"], "config.data_pruning.keep_fraction=-1"),
    ("sparsity_sweep", ["--sparsities=abc"], "--sparsities=abc: not a list of floats"),
    ("sparsity_sweep", ["--update_every=0"], "config.sparsity.update_every=0"),
    ("batch_size_sweep", ["--batch_sizes=abc"], "--batch_sizes=abc: not a list of ints"),
    ("batch_size_sweep", ["--batch_sizes=0"], "--batch_sizes=0: 0 is out of range"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_sweep_checks_every_flag_and_run_before_it_writes(script, flags, expected, tmp_path):
  out = tmp_path / "out"
  completed = _script(["-m", f"experiments.{script}", "--config=configs/mnist1d.py",
                       f"--out={out}", *flags])
  _assert_one_error_line(completed, f"{script}.py", 2, expected)
  assert not out.exists()


@pytest.mark.parametrize("script", ["device_drift", "compute_optimal"])
def test_an_out_that_is_a_file_is_one_line(script, tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  config = [] if script == "device_drift" else ["--config=configs/mnist1d.py", "--quick"]
  completed = _script(["-m", f"experiments.{script}", *config, f"--out={a_file}"])
  _assert_one_error_line(completed, f"{script}.py", 2, f"--out={a_file} is a file")


@pytest.mark.parametrize("flags, expected", [
    (["--steps=0"], "--steps must be at least 1"),
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["stray"], "unexpected argument 'stray'"),
    (["--json=/nonexistent/x.json"], "--json=/nonexistent/x.json: its directory does not exist"),
])
def test_benchmark_flags_are_one_line(flags, expected):
  completed = _script(["scripts/benchmark.py", "--config=configs/mnist1d.py", *flags])
  _assert_one_error_line(completed, "benchmark.py", 2, expected)


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_resume_without_a_readable_config_json_is_refused(damage, tmp_path):
  """The record of the data a run trained on is its config.json: without it, a resume on
  other data could not be told from one on the same (the trial resumed MNIST-1D's run on
  4500 examples this way)."""
  args = ["--config=configs/mnist1d.py", f"--workdir={tmp_path}", "--config.model.width=4",
          "--config.train.num_steps=2", "--config.parallel.cpu_devices=2"]
  assert run_main(args).returncode == 0
  config_json = tmp_path / "config.json"
  if damage == "deleted":
    config_json.unlink()
  else:
    config_json.write_text("{corrupt")
  before = _snapshot(tmp_path)
  completed = run_main(args + ["--config.dataset.num_train_examples=4500"])
  _assert_one_error_line(completed, "jaxddp", 2,
                         f"--workdir={tmp_path} has checkpoints but its config.json cannot be "
                         "read (", "restore it, or use a new --workdir")
  assert _snapshot(tmp_path) == before


def test_unreadable_data_files_say_so(tmp_path):
  """An .npz dataset or a scores file this user cannot read: "Permission denied", not
  "not an .npz file" or a traceback."""
  npz, scores = tmp_path / "data.npz", tmp_path / "scores.npy"
  np.savez(npz, x_train=np.zeros((8, 4, 1)), y_train=np.zeros(8), x_test=np.zeros((8, 4, 1)),
           y_test=np.zeros(8))
  np.save(scores, np.zeros(4000))
  npz.chmod(0), scores.chmod(0)
  for field, path in (("dataset.path", npz), ("data_pruning.scores", scores)):
    extra = (["--config.dataset.name=npz"] if field == "dataset.path" else
             ["--config.data_pruning.keep_fraction=0.5"])
    completed = _script(["-c", _AS_ANY_USER, "-m", "jaxddp.main", "--config=configs/mnist1d.py",
                         f"--workdir={tmp_path / 'run'}", f"--config.{field}={path}", *extra])
    _assert_one_error_line(completed, "jaxddp", 2,
                           f"config.{field}='{path}' cannot be read (Permission denied)")
  assert not (tmp_path / "run").exists()


def test_a_config_file_without_get_config_says_so(tmp_path):
  path = tmp_path / "no_function.py"
  path.write_text("x = 1\n")
  completed = run_main([f"--config={path}", f"--workdir={tmp_path / 'run'}",
                        "--config.model.width=4"])
  _assert_one_error_line(completed, "jaxddp", 2,
                         f"could not load --config={path}: it has no get_config() function")


def test_a_momentum_of_one_or_more_is_refused(tmp_path):
  completed = run_main(["--config=configs/mnist1d.py", f"--workdir={tmp_path / 'run'}",
                        "--config.optimizer.momentum=1.5"])
  _assert_one_error_line(completed, "jaxddp", 2, "config.optimizer.momentum=1.5 is not valid; "
                                                 "it must be a fraction in [0, 1)")
  assert not (tmp_path / "run").exists()


def test_compute_optimal_refuses_a_seed_given_twice(tmp_path):
  completed = _script(["-m", "experiments.compute_optimal", "--config=configs/mnist1d.py",
                       f"--out={tmp_path / 'out'}", "--seeds=0,0"])
  _assert_one_error_line(completed, "compute_optimal.py", 2, "--seeds=0,0: a seed given twice")
  assert not (tmp_path / "out").exists()


def test_a_dataset_without_classes_is_blamed_not_the_model(tmp_path):
  class NoClasses:
    name, num_classes, input_shape = "none", 0, (8, 8, 1)
    num_train_examples, num_test_examples = 64, 32

    def train_batches(self, **kwargs):
      raise AssertionError("never read")

    eval_batches = train_batches

  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(make_tiny_config(), str(tmp_path / "run"), dataset=NoClasses())
  assert _one_line(error.value) == ("train_and_evaluate(dataset=...) gave a NoClasses whose "
                                    "num_classes is 0; it must be an integer >= 1")
  assert not (tmp_path / "run").exists()


def test_device_drift_refuses_a_cache_dir_that_is_a_file(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  completed = _script(["-m", "experiments.device_drift", f"--out={tmp_path / 'out'}",
                       f"--cache_dir={a_file}", "--steps=1", "--seeds=0",
                       "--variants=batch_norm"])
  _assert_one_error_line(completed, "device_drift.py", 2, f"--cache_dir={a_file} is a file")
  assert not (tmp_path / "out").exists()
