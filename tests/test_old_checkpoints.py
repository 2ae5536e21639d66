"""Checkpoints written before issue 21's restructuring still restore, and continue as before.

The train loop, data pruning, learning rate and steps were rewritten after commit 9ba7f6c,
and batch norm moved to a two-pass variance; the checkpoint format was meant to stay.
tests/data/old_checkpoints/ holds two runs that commit wrote (see its README.txt): a
plain one stopped at step 5 of 10, and an InfoBatch one stopped inside a pruned epoch,
with the state each old run ended with. Today's code must restore every array of those
checkpoints bit for bit (a restore that dropped or reordered anything shows here), and,
resumed with bn_variance=one_pass (the old formula), end where the old run ended.

That end is compared to within the rounding of another CPU, not bit for bit: XLA's CPU
code depends on the machine's vector instructions, and the old code itself, run again on
another machine of this project (AMD EPYC with AVX-512), ends 1.8e-7 (absolute) from the
recorded arrays (README.txt). A wrong restore moves them by far more (the optimizer state
restarted at the resume: up to 2e-2). The tolerance cannot tell the two batch-norm formulas
apart (two_pass ends 1.2e-7 from the old run here); that one_pass computes what the old
code did was checked bit for bit on one machine when the fixtures were written. A checkpoint that does not fit the model is refused in one line.
"""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import mnist1d
from jaxddp import checkpoint, train
from jaxddp.errors import ConfigError
from jaxddp.state import checkpoint_items

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


def _saved_arrays(directory):
  """Every array of an orbax checkpoint item, read without a model: {"params/...": array}."""
  reader = ocp.StandardCheckpointer()
  tree = reader.metadata(directory)
  tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  saved = reader.restore(directory, jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one), tree))
  return _by_path(saved)


def _by_path(tree):
  """{"params/head/kernel": array, "opt_state/0/trace/...": array, ...}."""
  name = lambda key: str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
  return {"/".join(name(key) for key in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_old_checkpoint_restores_every_array_bit_for_bit(kind, tmp_path):
  workdir = _workdir(kind, tmp_path)
  run = train.setup(_config(kind, **{"model.bn_variance": "one_pass"}))
  restored = checkpoint.Checkpointer(workdir, keep=4).restore_latest(
      run.backend.global_state(run.state))
  got = _by_path(checkpoint_items(restored))
  want = _saved_arrays(os.path.join(workdir, "checkpoints", str(RESUMED_AT[kind]), "default"))
  assert sorted(got) == sorted(want)
  assert int(want["step"]) == RESUMED_AT[kind]
  differ = [path for path in want if got[path].dtype != want[path].dtype or
            not np.array_equal(got[path], want[path])]
  assert not differ, f"restored differently from the checkpoint: {differ}"


# Today's code, resumed on this machine, against the old run recorded on another: the
# old code itself, run again here, ends at most 1.8e-7 from final.npz (README.txt).
CROSS_MACHINE_ATOL = 1e-6


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_old_checkpoint_resumes_to_the_old_runs_end(kind, tmp_path, capsys):
  got = _resume(kind, tmp_path, capsys, "one_pass")
  with np.load(os.path.join(FIXTURES, kind, "final.npz")) as recorded:
    want = dict(recorded)
  assert sorted(got) == sorted(want)
  assert all(got[name].dtype == want[name].dtype for name in want)
  differ = {name: float(np.max(np.abs(got[name].astype(np.float64) - want[name])))
            for name in want}
  assert max(differ.values()) <= CROSS_MACHINE_ATOL, differ
  for name in ("epoch", "epoch_start", "epoch_steps", "weight"):  # InfoBatch's plan: exact
    if f"examples/{name}" in want:
      assert np.array_equal(got[f"examples/{name}"], want[f"examples/{name}"]), name


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
