"""jaxddp as a library: registries, import paths, the Python API, a user's loss, the
random streams of the step and the FLOPs total it keeps.

Most checks need no compilation (validation, shapes from jax.eval_shape); the runs
use a small MLP, which compiles in a second.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxddp
from conftest import REPO, make_tiny_config
from jaxddp import config as config_lib
from jaxddp import data, losses, models, optim, sparsity, train
from jaxddp.config import ConfigError
from jaxddp.registry import Registry
from jaxddp.state import TrainState, step_rngs, total_flops
from user_models import MLP, small_arrays, squared_error


def _quiet(function, *args, **kwargs):
  with contextlib.redirect_stdout(io.StringIO()):
    return function(*args, **kwargs)


# --- Registries are the one list of names. ---


@pytest.mark.parametrize("field, registry", [
    ("model.name", models.MODELS), ("model.norm", models.NORMS),
    ("optimizer.name", optim.OPTIMIZERS), ("optimizer.schedule", optim.SCHEDULES),
    ("train.loss", losses.LOSSES), ("sparsity.method", sparsity.METHODS),
    ("dataset.name", data.DATASETS)])
def test_unknown_names_are_errors_that_list_the_registry(field, registry):
  config = make_tiny_config()
  section, name = field.split(".")
  config[section][name] = "" if field == "dataset.name" else "nope"
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  assert message.startswith(f"config.{field}=")
  listed = message.split("choose one of: ")[1]
  assert all(name in listed for name in registry), (message, registry.names())


def test_built_in_names():
  assert models.MODELS.names() == ["cnn", "resnet18", "resnet34", "resnet50", "resnet101",
                                   "resnet152", "vit_ti", "vit_s", "vit_b"]
  assert set(data.DATASETS) == {"mnist1d", "digits", "synthetic", "npz", "image_folder"}
  assert set(optim.OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adamw", "lars", "lamb"}
  assert set(sparsity.METHODS) == {"none", "magnitude", "gradual_magnitude", "random", "swat"}


def test_a_registry_refuses_a_second_entry_and_odd_names():
  registry = Registry("thing", "thing.name")
  registry.register("a")(1)
  with pytest.raises(ValueError, match="already registered"):
    registry.register("a")(2)
  with pytest.raises(ValueError, match="without ':'"):
    registry.register("pkg:a")
  with pytest.raises(ConfigError, match=r"config.thing.name='b' is not valid; choose one of: a"):
    registry["b"]


def test_a_registered_model_and_optimizer_train_by_name(tmp_path):
  """One decorated function each, and the config names them: nothing else to edit."""
  used = []

  @jaxddp.models.register("test_mlp")
  def test_mlp(config, num_classes):
    return MLP(num_classes=num_classes, hidden=config.model.width)

  @optim.OPTIMIZERS.register("test_sgd")
  def test_sgd(opt, schedule, decayed):
    used.append(opt.learning_rate)
    return optax.sgd(schedule)

  config = make_tiny_config()
  config.model.name = "test_mlp"
  config.optimizer.name = "test_sgd"
  config.train.num_steps = 2
  result = _quiet(train.train_and_evaluate, config, str(tmp_path))
  assert used == [config.optimizer.learning_rate]
  assert result.state.params["Dense_0"]["kernel"].shape == (40, 8)  # hidden = model.width


# --- Import paths, the Python API and a user's loss. ---


def test_model_dataset_and_loss_by_import_path(tmp_path):
  """All three named by import path; the reported loss is the user's, per example, exactly
  averaged over a test set that is not a multiple of the batch."""
  config = make_tiny_config()
  config.model.name = "user_models:mlp_factory"
  config.dataset.name = "user_models:small_arrays"
  config.train.loss = "user_models:squared_error"
  config.train.batch_size = 16
  config.train.num_steps = 3
  result = _quiet(train.train_and_evaluate, config, str(tmp_path))
  arrays = small_arrays(config)
  logits = MLP(num_classes=3, hidden=8).apply({"params": jax.device_get(result.state.params)},
                                              arrays.test_x, train=False)
  expected = np.mean(np.asarray(squared_error(logits, arrays.test_y)))
  assert len(arrays.test_x) % 16 != 0
  assert result.eval_metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
  accuracy = np.mean(np.argmax(np.asarray(logits), -1) == arrays.test_y)
  assert result.eval_metrics["accuracy"] == pytest.approx(accuracy)


def test_python_api_with_objects(tmp_path):
  config = jaxddp.get_config()
  config.train.batch_size = 16
  config.train.num_steps = 3
  dataset = small_arrays(config)
  result = _quiet(jaxddp.train_and_evaluate, config, str(tmp_path), model=MLP(num_classes=3),
                  dataset=dataset, loss_fn=squared_error)
  assert 0 <= result.eval_metrics["accuracy"] <= 1
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["given"] == {"model": "user_models:MLP",
                            "dataset": "jaxddp.data.arrays:ArrayDataset",
                            "loss_fn": "user_models:squared_error"}
  assert saved["config"]["model"]["name"] == "cnn"  # not used: the object was


def test_python_api_objects_of_the_wrong_kind(tmp_path):
  config = make_tiny_config()
  with pytest.raises(ConfigError, match=r"train_and_evaluate\(model=\.\.\.\) got the class MLP; "
                                        r"pass an instance, e.g. model=MLP\(num_classes=10\)"):
    train.setup(config, model=MLP)
  with pytest.raises(ConfigError, match=r"train_and_evaluate\(loss_fn='cross_entropy'\) takes a "
                                        r"function .*; a loss's name goes in config.train.loss"):
    losses.get(config, "cross_entropy")


@pytest.mark.parametrize("loss_fn, expected", [
    (lambda logits, labels: jnp.mean(logits), r"returns \(\) for 3 examples; it must return "
                                              r"one loss per example, shape \(3,\)"),
    (lambda logits: logits, r"the loss <lambda>\(logits, labels\) fails on logits of shape "
                            r"\(3, 10\)"),
])
def test_a_loss_that_breaks_the_contract(loss_fn, expected):
  with pytest.raises(ConfigError, match=expected):
    losses.check(loss_fn, 10)


def test_label_smoothing_needs_the_built_in_cross_entropy():
  config = make_tiny_config()
  config.train.label_smoothing = 0.1
  with pytest.raises(ConfigError, match="smooths the built-in cross_entropy loss only"):
    losses.get(config, squared_error)


class WrongOutput(nn.Module):
  num_classes: int

  def __call__(self, x, train: bool):
    return x.reshape(len(x), -1)[:, :7]


class RaisesOnCall(nn.Module):
  num_classes: int

  def __call__(self, x, train: bool):
    raise ValueError("broken on purpose")


def test_a_model_that_breaks_the_contract():
  with pytest.raises(ConfigError, match=r"the model WrongOutput returns \(2, 7\) for a batch "
                                        r"of 2 examples; it must return logits of shape "
                                        r"\(batch, num_classes\) = \(2, 10\)"):
    models.check_model(WrongOutput(num_classes=10), (40, 1), 10)
  with pytest.raises(ConfigError, match=r"the model RaisesOnCall fails on inputs of shape "
                                        r"\(batch, 40, 1\) called as model\(x, train=\.\.\.\): "
                                        r"ValueError: broken on purpose"):
    models.check_model(RaisesOnCall(num_classes=10), (40, 1), 10)


# --- The step's random streams and the FLOPs total. ---


def test_step_rngs_differ_by_step_device_and_micro_batch_and_repeat_exactly():
  rng = jax.random.key_data(jax.random.key(0))
  bits = lambda *args: tuple(np.asarray(jax.random.key_data(k)).tobytes()
                             for k in step_rngs(rng, *args).values())
  keys = {args: bits(*args) for args in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
  assert len({k for pair in keys.values() for k in pair}) == 8  # all distinct
  assert bits(1, 0, 0) == keys[(1, 0, 0)]  # a function of its arguments only


def test_flops_total_keeps_its_precision_over_a_long_run():
  """10^5 steps of ~3.3e9 FLOPs: the float32 pair stays within 1e-9 of the float64 sum; a
  plain float32 sum would be off by more than 1e-5 (checked too, so the test can fail)."""
  steps = 100_000
  per_step = 3.3e9 + np.arange(steps) % 7 * 1.1e3  # varies, as with changing masks

  @jax.jit
  def run(per_step):
    state = TrainState.create(apply_fn=None, params={}, tx=optax.sgd(0.1), batch_stats={},
                              train_flops=jnp.zeros(2, jnp.float32))
    plain = jnp.zeros((), jnp.float32)
    def body(i, carry):
      state, plain = carry
      return state.add_flops(per_step[i]), plain + per_step[i]
    state, plain = jax.lax.fori_loop(0, steps, body, (state, plain))
    return state.train_flops, plain

  pair, plain = run(jnp.asarray(per_step, jnp.float32))
  exact = float(np.sum(np.asarray(per_step, np.float32).astype(np.float64)))
  assert abs(total_flops(pair) - exact) / exact < 1e-9
  assert abs(float(plain) - exact) / exact > 1e-5


def test_dropout_draws_new_masks_each_step_and_the_same_for_the_same_step():
  """The same state and batch: the same step number gives the same loss, another step
  number another one (dropout is on, and keyed by the step)."""
  config = make_tiny_config()
  config.model.name = "user_models:DropoutMLP"
  config.parallel.cpu_devices = 2
  run = _quiet(train.setup, config)
  batch = run.backend.put_batch(next(run.train_batches(0)))
  host = jax.device_get(run.backend.global_state(run.state))

  def loss_at(step):
    state = run.backend.put_state(host.replace(step=np.int32(step)))
    _, metrics = run.backend.train_step(state, batch)
    return float(jax.device_get(metrics["loss_sum"]).ravel()[0])

  assert loss_at(3) == loss_at(3)
  assert loss_at(3) != loss_at(4)


_XLA_FLAGS_RUNS = """
import jaxddp
from configs import mnist1d
for devices in (1, 4):
  config = mnist1d.get_config()  # not conftest's: it sets jax_num_cpu_devices itself
  config.parallel.cpu_devices, config.model.width = devices, 4
  config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 2, 2, 2
  config.train.batch_size = 32
  result = jaxddp.train_and_evaluate(config, WORKDIR + f"/run{devices}")
  print("trained on", result.recipe.num_devices, "devices")
"""


def test_a_device_count_set_through_xla_flags_is_never_lowered(tmp_path):
  """A process started with XLA_FLAGS=--xla_force_host_platform_device_count=4 trains
  with cpu_devices=1 and then with 4: the first run must not set jax_num_cpu_devices=1,
  which would win over the flag (the second then failed: "JAX was started with 1 CPU
  devices")."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": REPO}
  env.pop("JAX_NUM_CPU_DEVICES", None)
  script = _XLA_FLAGS_RUNS.replace("WORKDIR", repr(str(tmp_path)))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.count("trained on") == 2, result.stdout[-2000:]
  assert "trained on 1 devices" in result.stdout and "trained on 4 devices" in result.stdout
