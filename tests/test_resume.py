"""A run stopped mid-way and started again with the same command ends exactly where
an uninterrupted run ends: same parameters, same final metrics.

These run `python -m jaxddp.main` as real processes and stop them with real
signals: SIGTERM (the run saves a checkpoint and exits 143) and SIGKILL (the run
dies; the next one resumes from the last periodic checkpoint).
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

TOTAL_STEPS = 1200


def _args(workdir):
  return ["--config=configs/mnist1d.py", f"--workdir={workdir}",
          f"--config.train.num_steps={TOTAL_STEPS}", "--config.train.checkpoint_every=100",
          "--config.train.log_every=100", "--config.model.width=8",
          "--config.train.batch_size=64", "--config.parallel.cpu_devices=2"]


def _final(workdir):
  """The final eval metrics and the parameters of the last checkpoint."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/loss" in r]
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    assert manager.latest_step() == TOTAL_STEPS
    items = manager.restore(TOTAL_STEPS)
  return evals[-1], jax.device_get(items["params"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  completed = run_main(_args(workdir))
  assert completed.returncode == 0, completed.stderr
  return _final(workdir)


def _start_and_stop(workdir, sig):
  """Starts a run, waits for its first checkpoint, then sends `sig`."""
  process = subprocess.Popen([sys.executable, "-m", "jaxddp.main", *_args(workdir)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_resume_matches_uninterrupted(tmp_path, uninterrupted, sig):
  returncode, _, stderr = _start_and_stop(tmp_path, sig)
  if sig == signal.SIGTERM:
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
  else:
    assert returncode == -signal.SIGKILL
  with ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    stopped_at = manager.latest_step()
  assert 0 < stopped_at < TOTAL_STEPS, "the run should have stopped mid-way"

  resumed = run_main(_args(tmp_path))
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming from the checkpoint at step {stopped_at}" in resumed.stdout

  expected_eval, expected_params = uninterrupted
  got_eval, got_params = _final(tmp_path)
  assert got_eval == expected_eval  # exact: same program, same inputs, same order
  jax.tree.map(np.testing.assert_array_equal, got_params, expected_params)
