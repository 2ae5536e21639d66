"""Checkpoints written before issue 21's restructuring still restore, and continue exactly.

The train loop, data pruning, learning rate and steps were rewritten after commit 9ba7f6c,
and batch norm moved to a two-pass variance; the checkpoint format was meant to stay.
tests/data/old_checkpoints/ holds two runs that commit wrote (see its README.txt): a
plain one stopped at step 5 of 10, and an InfoBatch one stopped inside a pruned epoch,
with the state each old run ended with. Resumed by today's code with
bn_variance=one_pass (the old formula), each must end with the same bits: a restore that
dropped or reordered anything, or a step that computes anything differently, shows here.
A checkpoint that does not fit the model is refused in one line.

Both runs are deterministic, so a run that ignored the checkpoint and started again would
end with the same numbers: every test also checks that it resumed. The fixtures train on
4 examples per device, small enough that XLA's CPU thread count (the suite's 8 devices
here, 2 when they were written) does not change a single bit (README.txt says why).
"""

import os
import shutil

import numpy as np
import pytest
from flax import traverse_util

from configs import mnist1d
from jaxddp import train
from jaxddp.errors import ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "old_checkpoints")

# The old runs' configs (README.txt), as overrides of configs/mnist1d.py.
SHARED = {"model.width": 4, "parallel.cpu_devices": 2, "optimizer.learning_rate": 0.01,
          "train.batch_size": 8, "train.eval_batch_size": 500, "train.log_every": 5}
RUNS = {
    "plain": {"train.num_steps": 10, "train.checkpoint_every": 5, "train.keep_checkpoints": 2},
    "infobatch": {"dataset.num_train_examples": 128, "data_pruning.dynamic": "infobatch",
                  "data_pruning.anneal_fraction": 0.75, "train.num_epochs": 4,
                  "train.num_steps": 0, "train.checkpoint_every": 16,
                  "train.keep_checkpoints": 4},
}
RESUMED_AT = {"plain": 5, "infobatch": 32}
LAST_STEP = {"plain": 10, "infobatch": 56}  # InfoBatch's pruned epochs are shorter
PARTS = {"plain": ("params", "batch_stats"), "infobatch": ("params", "batch_stats", "examples")}


def _config(kind, **changes):
  config = mnist1d.get_config()
  for name, value in {**SHARED, **RUNS[kind], **changes}.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def _workdir(kind, tmp_path):
  """A copy of the fixture: a resumed run writes into its workdir."""
  workdir = str(tmp_path / kind)
  shutil.copytree(os.path.join(FIXTURES, kind), workdir,
                  ignore=shutil.ignore_patterns("final.npz"))
  return workdir


def _arrays(state, parts):
  """{"params/head/kernel": array, ...}: final.npz's names."""
  return {f"{part}/{path}": np.asarray(leaf) for part in parts
          for path, leaf in traverse_util.flatten_dict(getattr(state, part), sep="/").items()}


def _resume(kind, tmp_path, capsys, bn_variance):
  """Continues the old run to its end; its final arrays under final.npz's names."""
  workdir = _workdir(kind, tmp_path)
  config = _config(kind, **{"model.bn_variance": bn_variance})
  # The test runs the old run's config: only the field the old code lacked is new.
  assert train.config_changes(workdir, config, {}) == [
      f"config.model.bn_variance changed since this workdir's config.json: (absent) -> "
      f'"{bn_variance}"']
  result = train.train_and_evaluate(config, workdir)
  assert f"resuming from the checkpoint at step {RESUMED_AT[kind]}" in capsys.readouterr().out
  assert result.last_step == LAST_STEP[kind]
  return _arrays(result.state, PARTS[kind])


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_old_checkpoint_resumes_bit_for_bit(kind, tmp_path, capsys):
  got = _resume(kind, tmp_path, capsys, "one_pass")
  with np.load(os.path.join(FIXTURES, kind, "final.npz")) as recorded:
    want = dict(recorded)
  assert sorted(got) == sorted(want)
  differ = {name: float(np.max(np.abs(got[name].astype(np.float64) - want[name])))
            for name in want
            if got[name].dtype != want[name].dtype or not np.array_equal(got[name], want[name])}
  assert not differ, f"not bit for bit (largest absolute difference per array): {differ}"


def test_old_checkpoint_resumes_with_two_pass_variance(tmp_path, capsys):
  """Today's default formula continues an old run too; its numbers differ in the last
  digits, so only that it finishes with finite values is checked."""
  got = _resume("plain", tmp_path, capsys, "two_pass")
  assert all(np.all(np.isfinite(value)) for value in got.values())


REFUSED = {
    "model.width": (8, "was written by a different model (params: head/kernel has shape (16, 10) "
                       "in the checkpoint but (32, 10) here); use a new --workdir or delete "
                       "that one"),
    "optimizer.name": ("adamw", "does not match this config's optimizer state (was "
                                "config.optimizer changed?): "),
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_old_checkpoint_that_does_not_fit_is_refused_in_one_line(field, tmp_path):
  """Another model, or another optimizer (whose state has another structure)."""
  value, why = REFUSED[field]
  workdir = _workdir("plain", tmp_path)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(_config("plain", **{field: value}), workdir)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"the checkpoint in {os.path.join(workdir, 'checkpoints')} {why}")
  assert message.endswith("use a new --workdir or delete that one" if field == "model.width"
                          else "use a new --workdir or the config it was written with"), message
