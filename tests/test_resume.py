"""A run stopped mid-way and started again with the same command ends exactly where
an uninterrupted run ends: same parameters, same final metrics.

These run `python -m jaxddp.main` as real processes and stop them with real
signals: SIGTERM (the run saves a checkpoint and exits 143) and SIGKILL (the run
dies; the next one resumes from the last periodic checkpoint). The built-in CNN has
no randomness in its step; a user's model with dropout (tests/user_models.py) draws
new dropout masks at every step, from keys that the resumed run must repeat exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, run_main

TOTAL_STEPS = 400
MODELS = {"cnn": [], "dropout": ["--config.model.name=user_models:DropoutCNN"],
          # InfoBatch: 8 epochs of varying length (about 370 steps), planned from the loss
          # table in the checkpoint; the kill lands inside an epoch.
          "infobatch": ["--config.data_pruning.dynamic=infobatch", "--config.train.num_steps=0",
                        "--config.train.num_epochs=8"]}
ENV = {"PYTHONPATH": os.path.join(REPO, "tests")}  # tests/user_models.py


def _args(workdir, model):
  return ["--config=configs/mnist1d.py", f"--workdir={workdir}",
          f"--config.train.num_steps={TOTAL_STEPS}", "--config.train.checkpoint_every=100",
          "--config.train.log_every=100", "--config.model.width=8",
          "--config.train.batch_size=64", "--config.parallel.cpu_devices=2", *MODELS[model]]


def _final(workdir):
  """The final eval metrics and the arrays of the last checkpoint (params, and InfoBatch's
  per-example tables)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/loss" in r]
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    last = manager.latest_step()
    items = manager.restore(last)
  assert last == evals[-1]["step"]
  return evals[-1], jax.device_get({k: items[k] for k in ("params", "examples") if k in items})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """model -> the final metrics and parameters of an uninterrupted run (run once each)."""
  finals = {}

  def get(model):
    if model not in finals:
      workdir = tmp_path_factory.mktemp(f"uninterrupted_{model}")
      completed = run_main(_args(workdir, model), env=ENV)
      assert completed.returncode == 0, completed.stderr
      finals[model] = _final(workdir)
    return finals[model]
  return get


def _start_and_stop(workdir, sig, model):
  """Starts a run, waits for its first checkpoint, then sends `sig`."""
  process = subprocess.Popen([sys.executable, "-m", "jaxddp.main", *_args(workdir, model)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **ENV})
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while not (os.path.isdir(checkpoints) and
             any(name.isdigit() for name in os.listdir(checkpoints))):
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=120)
  return process.returncode, stdout, stderr


# SIGKILL with the dropout model covers the CNN's case too (no randomness is the simpler
# one); each case costs two runs of 400 steps.
@pytest.mark.parametrize("sig, model", [(signal.SIGTERM, "cnn"), (signal.SIGKILL, "dropout"),
                                        (signal.SIGKILL, "infobatch")],
                         ids=["sigterm", "sigkill-dropout", "sigkill-infobatch"])
def test_resume_matches_uninterrupted(tmp_path, uninterrupted, sig, model):
  returncode, _, stderr = _start_and_stop(tmp_path, sig, model)
  if sig == signal.SIGTERM:
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
  else:
    assert returncode == -signal.SIGKILL
  with ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    stopped_at = manager.latest_step()
  expected_eval, expected_arrays = uninterrupted(model)
  assert 0 < stopped_at < expected_eval["step"], "the run should have stopped mid-way"

  resumed = run_main(_args(tmp_path, model), env=ENV)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming from the checkpoint at step {stopped_at}" in resumed.stdout

  got_eval, got_arrays = _final(tmp_path)
  assert got_eval == expected_eval  # exact: same program, same inputs, same order
  assert got_arrays.keys() == expected_arrays.keys()
  jax.tree.map(np.testing.assert_array_equal, got_arrays, expected_arrays)
  if model == "infobatch":  # it did prune: fewer steps than 8 full epochs of 62
    assert got_eval["step"] < 8 * 62 and got_eval["data/fraction_skipped"] > 0.1
