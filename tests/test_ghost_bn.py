"""jaxddp.nn.GhostBatchNorm against a NumPy reference, flax's BatchNorm, and 8 devices.

The reference below is written from the definition: split the batch into
consecutive ghost batches, normalise each with its own mean and biased variance,
update the running statistics once per ghost batch in order. Its backward pass is
the textbook batch-norm gradient, applied per ghost batch. All in float64; the
layer runs in float32, hence tolerances of about 1e-5 relative.
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxddp import config as config_lib
from jaxddp import steps, train
from jaxddp.optim import LearningRate
from jaxddp.nn import GhostBatchNorm
from jaxddp.state import TrainState

EPS = 1e-5
MOMENTUM = 0.9


def _ghost_batches(n, ghost):
  size = min(ghost, n)
  return [slice(i, i + size) for i in range(0, n, size)]


def reference_forward(x, ghost, scale, bias, feature_axis=-1):
  """Output, and each ghost batch's (mean, biased variance), in order."""
  axes = tuple(a for a in range(x.ndim) if a != feature_axis % x.ndim)
  shape = [1] * x.ndim
  shape[feature_axis] = x.shape[feature_axis]
  y, stats = np.empty_like(x), []
  for part in _ghost_batches(len(x), ghost):
    xi = x[part]
    mean, var = xi.mean(axis=axes), xi.var(axis=axes)
    y[part] = ((xi - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
               * scale.reshape(shape) + bias.reshape(shape))
    stats.append((mean, var))
  return y, stats


def reference_backward(x, dy, ghost, scale, feature_axis=-1):
  """Gradients of sum(y * dy) with respect to x, scale and bias."""
  axes = tuple(a for a in range(x.ndim) if a != feature_axis % x.ndim)
  shape = [1] * x.ndim
  shape[feature_axis] = x.shape[feature_axis]
  dx, dscale, dbias = np.empty_like(x), 0.0, 0.0
  for part in _ghost_batches(len(x), ghost):
    xi, gi = x[part], dy[part]
    mean = xi.mean(axis=axes, keepdims=True)
    inv_std = 1 / np.sqrt(xi.var(axis=axes, keepdims=True) + EPS)
    xhat = (xi - mean) * inv_std
    g = gi * scale.reshape(shape)
    dx[part] = inv_std * (g - g.mean(axis=axes, keepdims=True)
                          - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    dscale = dscale + (gi * xhat).sum(axis=axes)
    dbias = dbias + gi.sum(axis=axes)
  return dx, dscale, dbias


def reference_running(mean, var, stats, momentum=MOMENTUM):
  for batch_mean, batch_var in stats:
    mean = momentum * mean + (1 - momentum) * batch_mean
    var = momentum * var + (1 - momentum) * batch_var
  return mean, var


def _inputs(shape, feature_axis=-1, seed=0):
  """Inputs with a per-feature offset and spread, and non-trivial variables."""
  rng = np.random.default_rng(seed)
  features = shape[feature_axis]
  bshape = [1] * len(shape)
  bshape[feature_axis] = features
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, features).reshape(bshape) \
      + rng.normal(size=features).reshape(bshape) * 2
  variables = {
      "params": {"scale": rng.uniform(0.5, 1.5, features), "bias": rng.normal(size=features)},
      "batch_stats": {"mean": rng.normal(size=features), "var": rng.uniform(0.5, 2, features)},
  }
  return x, variables


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


CASES = [  # (input shape, ghost_batch_size, feature axis)
    ((16, 5), 4, -1),          # 2-D, 4 ghost batches
    ((12, 6), 3, -1),          # 2-D, 4 ghost batches of 3
    ((10, 7), 32, -1),         # ghost >= batch: one ghost batch
    ((12, 9, 4), 6, -1),       # 1-D signals (N, L, C), as the built-in CNN sees them
    ((24, 4, 4, 3), 8, -1),    # 4-D images (N, H, W, C)
    ((8, 3, 5, 2), 2, -1),     # 4-D, ghost batches of 2
    ((12, 3, 5), 4, 1),        # channels-first: features on axis 1
]


@pytest.mark.parametrize("shape, ghost, axis", CASES,
                         ids=[f"{'x'.join(map(str, s))}-g{g}-axis{a}" for s, g, a in CASES])
def test_matches_numpy_reference(shape, ghost, axis):
  x, variables = _inputs(shape, axis)
  layer = GhostBatchNorm(ghost_batch_size=ghost, momentum=MOMENTUM, epsilon=EPS, axis=axis)
  dy = np.random.default_rng(1).normal(size=shape)

  def loss(params, x):
    y, updates = layer.apply({"params": params, "batch_stats": _f32(variables["batch_stats"])},
                             x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y * dy), (y, updates["batch_stats"])

  (_, (y, stats)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      _f32(variables["params"]), jnp.asarray(x, jnp.float32))
  p = variables["params"]
  want_y, ghost_stats = reference_forward(x, ghost, p["scale"], p["bias"], axis)
  want_dx, want_dscale, want_dbias = reference_backward(x, dy, ghost, p["scale"], axis)
  want_mean, want_var = reference_running(variables["batch_stats"]["mean"],
                                          variables["batch_stats"]["var"], ghost_stats)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], want_var, rtol=1e-5, atol=1e-6)
  # Gradients sum over up to 400 entries of size ~1: compare against their scale.
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4 * np.abs(want_dx).max())
  np.testing.assert_allclose(dparams["scale"], want_dscale, rtol=1e-4,
                             atol=1e-4 * np.abs(want_dscale).max())
  np.testing.assert_allclose(dparams["bias"], want_dbias, rtol=1e-4,
                             atol=1e-4 * np.abs(want_dbias).max())

  # Evaluation normalises with the running statistics and changes nothing.
  running = {"mean": want_mean, "var": want_var}
  y_eval, updates = layer.apply({"params": _f32(p), "batch_stats": _f32(running)},
                                jnp.asarray(x, jnp.float32), use_running_average=True,
                                mutable=["batch_stats"])
  shape_f = [1] * x.ndim
  shape_f[axis] = x.shape[axis]
  want_eval = ((x - want_mean.reshape(shape_f)) / np.sqrt(want_var.reshape(shape_f) + EPS)
               * p["scale"].reshape(shape_f) + p["bias"].reshape(shape_f))
  np.testing.assert_allclose(y_eval, want_eval, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-6)


@pytest.mark.parametrize("shape, ghost", [((16, 6), 16), ((16, 6), 64), ((8, 5, 5, 4), 8)])
def test_one_ghost_batch_equals_flax_batch_norm(shape, ghost):
  x = jnp.asarray(_inputs(shape)[0], jnp.float32)
  ghost_bn = GhostBatchNorm(ghost_batch_size=ghost, momentum=MOMENTUM, epsilon=EPS)
  flax_bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
  init = lambda m: m.init(jax.random.key(0), x, use_running_average=False)
  variables = init(ghost_bn)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, init(flax_bn)), \
      "the variables must match flax's BatchNorm, so checkpoints are interchangeable"
  variables = {"params": {"scale": variables["params"]["scale"] * 1.5,
                          "bias": variables["params"]["bias"] + 0.3},
               "batch_stats": variables["batch_stats"]}
  for use_running_average in (False, True):
    outputs = [m.apply(variables, x, use_running_average=use_running_average,
                       mutable=["batch_stats"]) for m in (ghost_bn, flax_bn)]
    (y, stats), (y_flax, stats_flax) = outputs
    # flax computes the variance as E[x^2] - E[x]^2, the layer as E[(x - mean)^2].
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats, stats_flax)
    variables = {"params": variables["params"], "batch_stats": stats["batch_stats"]}


def test_running_statistics_are_averaged_over_eight_devices():
  """With axis_name, every replica ends with the mean of the per-device sequential updates."""
  devices = jax.devices()
  assert len(devices) == 8
  per_device, ghost, features = 12, 4, 3
  rng = np.random.default_rng(0)
  # Each device sees data of its own offset and spread, so the per-device updates differ.
  x = (rng.normal(size=(8, per_device, 5, features)) * rng.uniform(0.5, 3, (8, 1, 1, 1))
       + rng.normal(size=(8, 1, 1, features)))
  _, variables = _inputs((per_device, 5, features))
  layer = GhostBatchNorm(ghost_batch_size=ghost, momentum=MOMENTUM, epsilon=EPS, axis_name="data")

  @functools.partial(jax.pmap, axis_name="data", in_axes=(None, 0))
  def step(variables, x):
    return layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

  y, updates = step(_f32(variables), jnp.asarray(x, jnp.float32))
  stats = jax.device_get(updates["batch_stats"])
  for name in ("mean", "var"):
    for d in range(1, 8):
      np.testing.assert_array_equal(stats[name][d], stats[name][0])
  per_device_updates = [
      reference_running(variables["batch_stats"]["mean"], variables["batch_stats"]["var"],
                        reference_forward(x[d], ghost, *variables["params"].values())[1])
      for d in range(8)]
  want_mean = np.mean([mean for mean, _ in per_device_updates], axis=0)
  want_var = np.mean([var for _, var in per_device_updates], axis=0)
  np.testing.assert_allclose(stats["mean"][0], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"][0], want_var, rtol=1e-5, atol=1e-6)
  # ...while each device normalised with its own ghost batches only.
  p = variables["params"]
  for d in (0, 7):
    np.testing.assert_allclose(y[d], reference_forward(x[d], ghost, p["scale"], p["bias"])[0],
                               rtol=1e-5, atol=1e-5)


def test_accumulation_updates_running_statistics_micro_batch_by_micro_batch():
  """train_step with 2 micro-batches per device: 2 x 4 ghost batches, in order, then averaged."""
  devices = jax.devices()[:2]
  per_device, accumulation, ghost, features = 32, 2, 4, 3

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = GhostBatchNorm(ghost_batch_size=ghost, momentum=MOMENTUM, epsilon=EPS)(
          x, use_running_average=not train)
      return nn.Dense(2)(x.reshape(len(x), -1))

  model = Model()
  x, _ = _inputs((2 * per_device, 5, features))
  x = x.astype(np.float32)
  y = np.arange(len(x)) % 2
  variables = model.init(jax.random.key(0), x[:1], train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            batch_stats=variables["batch_stats"], tx=optax.sgd(0.1),
                            rng=jax.random.key_data(jax.random.key(0)))
  step = jax.pmap(functools.partial(steps.train_step, learning_rate=LearningRate(lambda s: 0.1),
                                    accumulation_steps=accumulation),
                  axis_name=steps.AXIS, devices=devices)
  replicate = lambda t: jax.tree.map(lambda a: np.stack([a] * len(devices)), t)
  batch = {"x": x.reshape(2, per_device, 5, features), "y": y.reshape(2, per_device)}
  new_state, _ = step(replicate(state), batch)

  start = jax.device_get(variables["batch_stats"]["GhostBatchNorm_0"])  # flax's own name
  ones = np.ones(features)
  per_device_updates = []
  for d in range(2):
    # The device's 32 examples are 2 micro-batches of 16, each 4 ghost batches of 4:
    # in order, that is 8 consecutive ghost batches of the device's slice.
    ghost_stats = reference_forward(batch["x"][d].astype(np.float64), ghost, ones, 0 * ones)[1]
    assert len(ghost_stats) == 8
    per_device_updates.append(reference_running(start["mean"], start["var"], ghost_stats))
  got = jax.device_get(new_state.batch_stats["GhostBatchNorm_0"])
  np.testing.assert_allclose(got["mean"][0], np.mean([m for m, _ in per_device_updates], 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["var"][0], np.mean([v for _, v in per_device_updates], 0),
                             rtol=1e-5, atol=1e-6)


def test_batch_not_a_multiple_of_the_ghost_size_is_an_error():
  layer = GhostBatchNorm(ghost_batch_size=4)
  x = jnp.ones((10, 3))
  variables = layer.init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(ValueError) as error:
    layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert str(error.value) == (
      "GhostBatchNorm: the local batch of 10 examples is not a multiple of ghost_batch_size=4; "
      "use a batch of k x 4 examples per device, or a ghost_batch_size that divides 10")


@pytest.mark.parametrize("batch, devices, accumulation, ghost, message", [
    (96, 2, 1, 32, None),  # 48 per device: not a multiple of 32
    (96, 8, 1, 12, "ok"),  # 12 per device: one ghost batch
    (128, 8, 1, 64, "ok"),  # 16 per device, ghost larger: per-device batch norm
    (64, 2, 4, 12, None),  # 32 per device per micro-batch
])
def test_config_checks_ghost_size_against_the_per_device_batch(batch, devices, accumulation,
                                                               ghost, message):
  from configs import mnist1d
  config = mnist1d.get_config()
  config.model.norm = "ghost_batch_norm"
  config.model.ghost_batch_size = ghost
  config.train.batch_size = batch
  config.train.accumulation_steps = accumulation
  resolve = lambda: config_lib.resolve(config, num_train_examples=4000, num_test_examples=1000,
                                       num_devices=devices)
  if message == "ok":
    resolve()
    return
  with pytest.raises(config_lib.ConfigError) as error:
    resolve()
  per_device = batch // devices
  expected = (f"config.model.ghost_batch_size={ghost} does not divide the per-device batch of "
              f"{per_device} examples (config.train.batch_size={batch} over {devices} devices")
  assert str(error.value).startswith(expected), str(error.value)
  if accumulation > 1:
    assert f"one of {accumulation} accumulated micro-batches" in str(error.value)
  suggestion = int(str(error.value).rsplit("e.g. ", 1)[1])
  assert per_device % suggestion == 0


def _train_losses(config, workdir, devices):
  config.parallel.cpu_devices = devices
  config.train.log_every = 1
  result = train.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  return np.array(losses), result


def test_ghost_batches_normalise_like_per_device_batch_norm_on_more_devices(tiny_config,
                                                                            tmp_path):
  """Through the real training loop: ghost batches of 8 on 2 devices (32 examples each)
  group the examples exactly as per-device batch norm on 8 devices does, so the
  training losses match step by step. One ghost batch per device is per-device BN,
  running statistics included."""
  tiny_config.model.norm = "ghost_batch_norm"
  tiny_config.model.ghost_batch_size = 8
  ghost, _ = _train_losses(tiny_config.copy_and_resolve_references(), tmp_path / "ghost", 2)
  per_device = tiny_config.copy_and_resolve_references()
  per_device.model.norm, per_device.model.sync_batch_stats = "batch_norm", False
  local, local_result = _train_losses(per_device, tmp_path / "local", 8)
  # The groups are right if the first steps agree to the last bits: grouping the examples
  # wrongly changes the loss at step 1 by more than 1e-2. Later steps drift as any two
  # device counts do: 2 and 8 devices sum the gradients in another order, and those
  # last-bit differences (1e-7 at step 3 here) grow where a max-pool or ReLU input is
  # near a tie. Measured with the two-pass batch norm: 1.6e-5 at step 7, 2.8e-5 at step 9
  # (with flax's one-pass formula this seed happened to stay at 1.1e-7); hence 1e-6 for
  # the first three steps and 1e-4, the bound of the equivalence tests, for all ten.
  np.testing.assert_allclose(ghost[:3], local[:3], rtol=1e-6)
  np.testing.assert_allclose(ghost, local, rtol=1e-4)

  one_ghost, one_ghost_result = _train_losses(tiny_config.copy_and_resolve_references(),
                                              tmp_path / "one_ghost", 8)
  # GhostBatchNorm and flax's BatchNorm compute the variance by different formulas. Their
  # rounding differences (under 1e-6 at step 1) grow where a channel's variance over 8
  # examples is small: from the initialisation of the explicitly named layers they reached
  # 2.7e-5 in the loss by step 7, and by step 10 3.3e-5 in a running mean (values up to
  # 0.5) and 1.3e-4 (relative) in a running variance. Hence 1e-4 for the losses (the bound
  # of the equivalence tests) and 1e-3 for the statistics after 10 steps, and 1e-6 at
  # step 1; grouping the examples wrongly changes the loss at step 1 by more than 1e-2.
  np.testing.assert_allclose(one_ghost, local, rtol=1e-4)
  assert np.abs(one_ghost[0] - local[0]) / local[0] < 1e-6
  # The norm layers have the same names (stage1_norm1, ...) whichever class they are.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               jax.device_get(one_ghost_result.state.batch_stats),
               jax.device_get(local_result.state.batch_stats))
  assert one_ghost_result.eval_metrics["loss"] == pytest.approx(
      local_result.eval_metrics["loss"], rel=1e-5)
