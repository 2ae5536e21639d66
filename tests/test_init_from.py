"""config.init_from: a new run starts from another run's params, batch statistics and masks.

One finished dense run (batch norm, 10 steps) is the source. Each test builds a run
the way train_and_evaluate does (train.setup, then checkpoint.InitSource) and checks
what it starts from against the source's checkpoint; one runs end to end.
"""

import contextlib
import io
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import make_tiny_config
from jaxddp import checkpoint, data, train
from jaxddp import config as config_lib
from jaxddp.config import ConfigError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(workdir, items of its last checkpoint) of a finished 10-step dense run."""
  workdir = str(tmp_path_factory.mktemp("source"))
  with contextlib.redirect_stdout(io.StringIO()):
    train.train_and_evaluate(make_tiny_config(), workdir)
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    items = jax.device_get(manager.restore(manager.latest_step()))
  assert int(items["step"]) == 10
  return workdir, items


def _start(config, dataset=None):
  """(fresh state, the state the run starts from), both on the host."""
  run = train.setup(config, dataset=dataset)
  fresh = run.backend.global_state(run.state)
  loaded = checkpoint.InitSource(config.init_from, fresh).load(fresh)
  loaded = run.sparsity.initialize(loaded)
  return jax.device_get(fresh), jax.device_get(loaded)


def _config(source_workdir, **init_from):
  config = make_tiny_config()
  config.init_from.workdir = source_workdir
  config.init_from.update(init_from)
  return config


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_starts_with_the_source_runs_parameters(source):
  workdir, items = source
  fresh, loaded = _start(_config(workdir))
  _assert_trees_equal(loaded.params, items["params"])
  _assert_trees_equal(loaded.batch_stats, items["batch_stats"])
  assert int(loaded.step) == 0  # a new run: step 0, fresh optimizer state
  _assert_trees_equal(loaded.opt_state, fresh.opt_state)
  assert not np.array_equal(loaded.params["head"]["kernel"], fresh.params["head"]["kernel"])


def test_skip_keeps_a_new_head_for_another_number_of_classes(source):
  workdir, items = source
  mnist1d = data.embedded.mnist1d()
  five_classes = data.ArrayDataset(mnist1d.train_x, mnist1d.train_y % 5, mnist1d.test_x,
                                   mnist1d.test_y % 5)
  with pytest.raises(ConfigError) as info:
    _start(_config(workdir), dataset=five_classes)
  assert str(info.value) == (
      f"config.init_from: params/head/bias has shape (10,) in the checkpoint of {workdir} but "
      "(5,) here (to keep its initial value instead: config.init_from.skip='head')")

  fresh, loaded = _start(_config(workdir, skip="^head/"), dataset=five_classes)
  _assert_trees_equal(loaded.params["head"], fresh.params["head"])
  body = lambda params: {k: v for k, v in params.items() if k != "head"}
  _assert_trees_equal(body(loaded.params), body(items["params"]))
  _assert_trees_equal(loaded.batch_stats, items["batch_stats"])


def test_batch_norm_checkpoint_starts_a_ghost_batch_norm_run(source):
  workdir, items = source
  config = _config(workdir)
  config.model.norm = "ghost_batch_norm"
  config.model.ghost_batch_size = 4
  _, loaded = _start(config)
  _assert_trees_equal(loaded.params, items["params"])
  _assert_trees_equal(loaded.batch_stats, items["batch_stats"])


def test_dense_checkpoint_starts_a_magnitude_pruning_run(source, tmp_path):
  workdir, items = source
  config = _config(workdir)
  config.sparsity.method = "magnitude"
  config.sparsity.weight_sparsity = 0.9
  _, loaded = _start(config)
  _assert_trees_equal(loaded.params, items["params"])
  masks = jax.tree.leaves(loaded.masks)
  assert masks and all(np.all(m == 1) for m in masks)  # pruned at step 0, by the first update

  # End to end: the first step prunes the loaded weights to 90%.
  config.train.num_steps = 2
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = train.train_and_evaluate(config, str(tmp_path / "pruned"))
  assert f"initialised from {workdir} at step 10" in out.getvalue()
  kept = [float(np.mean(m)) for m in jax.tree.leaves(jax.device_get(result.state.masks))]
  np.testing.assert_allclose(kept, 0.1, atol=0.01)
  # Rerun: the run resumes from its own checkpoint, not from the source again.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(config, str(tmp_path / "pruned"))
  assert "resuming from the checkpoint at step 2" in out.getvalue()
  assert "initialised from" not in out.getvalue()


def test_another_model_is_one_line_naming_the_first_differing_path(source):
  workdir, _ = source
  config = _config(workdir)
  config.model.width = 16
  with pytest.raises(ConfigError) as info:
    _start(config)
  assert str(info.value).startswith(
      "config.init_from: params/head/kernel has shape (32, 10) in the checkpoint of "
      f"{workdir} but (64, 10) here")

  # These fail before the shapes are compared: no state needed.
  with pytest.raises(ConfigError, match=r"config.init_from.step=7 is not a checkpoint of .*; it "
                                        r"has steps 5, 10"):
    checkpoint.InitSource(_config(workdir, step=7).init_from, None)
  with pytest.raises(ConfigError, match="has no checkpoint"):
    checkpoint.InitSource(_config(os.path.dirname(workdir)).init_from, None)
  with pytest.raises(ConfigError, match="is not a directory"):
    checkpoint.InitSource(_config(workdir + "_missing").init_from, None)


@pytest.mark.parametrize("field, value", [("step", 5), ("skip", "head")])
def test_init_from_options_without_a_source_are_errors(field, value):
  config = make_tiny_config()
  config.init_from[field] = value
  with pytest.raises(ConfigError, match=f"config.init_from.{field}={value!r} has no effect "
                                        "without config.init_from.workdir"):
    config_lib.validate(config)
