"""Masked layers, SWAT, pruning schedules and the FLOPs report, against references
written here in NumPy (and by hand)."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.ad_checkpoint import print_saved_residuals

from jaxddp import config as config_lib
from jaxddp import models, sparsity, train
from jaxddp.nn import MaskedConv, MaskedDense
from jaxddp.nn.masked import keep_largest, kth_largest

RNG = np.random.default_rng(0)


def _random_mask(shape, keep=0.5):
  return (RNG.random(shape) < keep).astype(np.float32)


def _numpy_top(x, sparsity_):
  """x with all but its round((1 - s) * size) largest-magnitude entries zeroed."""
  keep = round((1 - sparsity_) * x.size)
  flat = x.ravel().copy()
  flat[np.argsort(-np.abs(flat), kind="stable")[keep:]] = 0
  return flat.reshape(x.shape)


# --- NumPy convolution: forward, kernel gradient, input gradient ---

def _same_padding(size, kernel, stride, dilation):
  out = -(-size // stride)
  total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
  return (total // 2, total - total // 2)


def _windows(x_padded, kernel_shape, strides, dilation):
  """For each kernel offset: the strided slice of the padded input it multiplies."""
  d = len(kernel_shape)
  out = [(x_padded.shape[1 + i] - (kernel_shape[i] - 1) * dilation[i] - 1) // strides[i] + 1
         for i in range(d)]
  for offset in np.ndindex(*kernel_shape):
    index = tuple(slice(offset[i] * dilation[i],
                        offset[i] * dilation[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                  for i in range(d))
    yield offset, (slice(None), *index)


def _conv_reference(x, w, strides, pads, dilation):
  xp = np.pad(x, [(0, 0), *pads, (0, 0)])
  return sum(np.einsum("n...c,co->n...o", xp[index], w[offset])
             for offset, index in _windows(xp, w.shape[:-2], strides, dilation))


def _conv_kernel_grad(x, g, kernel_shape, strides, pads, dilation):
  xp = np.pad(x, [(0, 0), *pads, (0, 0)])
  grad = np.zeros(kernel_shape)
  for offset, index in _windows(xp, kernel_shape[:-2], strides, dilation):
    grad[offset] = xp[index].reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
  return grad


def _conv_input_grad(x_shape, g, w, strides, pads, dilation):
  padded = np.zeros([x_shape[0], *(s + lo + hi for s, (lo, hi) in zip(x_shape[1:-1], pads)),
                     x_shape[-1]])
  for offset, index in _windows(padded, w.shape[:-2], strides, dilation):
    padded[index] += np.einsum("n...o,co->n...c", g, w[offset])
  crop = tuple(slice(lo, lo + s) for s, (lo, _) in zip(x_shape[1:-1], pads))
  return padded[(slice(None), *crop)]


CONVS = [  # (input shape, kernel size, strides, padding, dilation)
    ((3, 11, 4), (3,), 1, "SAME", 1),
    ((2, 12, 3), (4,), 2, "VALID", 1),
    ((2, 9, 8, 3), (3, 3), 2, "SAME", 1),
    ((2, 7, 7, 2), (3, 2), 1, "VALID", 2),
]


def _pads(padding, shape, kernel, strides, dilation):
  if padding == "VALID":
    return [(0, 0)] * len(kernel)
  return [_same_padding(s, k, strides, dilation) for s, k in zip(shape[1:-1], kernel)]


def _layer_and_variables(layer, x):
  variables = layer.init(jax.random.key(1), x)
  masks = jax.tree.map(lambda m: jnp.asarray(_random_mask(m.shape)), variables["masks"])
  return {"params": variables["params"], "masks": masks}


def test_masked_dense_numpy_reference_and_flax_parameters():
  x = RNG.normal(size=(6, 7)).astype(np.float32)
  layer = MaskedDense(5)
  variables = _layer_and_variables(layer, x)
  kernel, bias = (np.asarray(variables["params"][k]) for k in ("kernel", "bias"))
  mask = np.asarray(variables["masks"]["kernel"])
  np.testing.assert_allclose(layer.apply(variables, x), x @ (kernel * mask) + bias, rtol=1e-5,
                             atol=1e-6)
  # The same parameters as flax's Dense (names, shapes, initial values from the same key).
  flax_params = nn.Dense(5).init(jax.random.key(1), x)["params"]
  jax.tree.map(np.testing.assert_array_equal, variables["params"], flax_params)
  assert variables["masks"]["kernel"].shape == kernel.shape


@pytest.mark.parametrize("shape,kernel_size,strides,padding,dilation", CONVS)
def test_masked_conv_numpy_reference(shape, kernel_size, strides, padding, dilation):
  x = RNG.normal(size=shape).astype(np.float32)
  layer = MaskedConv(6, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation)
  variables = _layer_and_variables(layer, x)
  kernel, bias = (np.asarray(variables["params"][k]) for k in ("kernel", "bias"))
  mask = np.asarray(variables["masks"]["kernel"])
  d = len(kernel_size)
  pads = _pads(padding, shape, kernel_size, strides, dilation)
  expected = _conv_reference(x, kernel * mask, (strides,) * d, pads, (dilation,) * d) + bias
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  flax_layer = nn.Conv(6, kernel_size, strides=strides, padding=padding,
                       kernel_dilation=dilation)
  flax_params = flax_layer.init(jax.random.key(1), x)["params"]
  jax.tree.map(np.testing.assert_array_equal, variables["params"], flax_params)
  # With every mask entry 1 it is flax's Conv.
  ones = {"params": flax_params, "masks": {"kernel": jnp.ones(kernel.shape)}}
  np.testing.assert_allclose(layer.apply(ones, x), flax_layer.apply({"params": flax_params}, x),
                             rtol=1e-5, atol=1e-5)


def _swat_gradients(layer, variables, x, g):
  """Forward output, kernel gradient and input gradient for cotangent g."""
  def f(params, x):
    return layer.apply({"params": params, "masks": variables["masks"]}, x)
  y, vjp = jax.vjp(f, variables["params"], x)
  grad_params, grad_x = vjp(jnp.asarray(g))
  return np.asarray(y), np.asarray(grad_params["kernel"]), np.asarray(grad_x)


@pytest.mark.parametrize("activation_sparsity", [0.5, 0.8])
def test_swat_dense_numpy_reference(activation_sparsity):
  x = RNG.normal(size=(8, 12)).astype(np.float32)
  plain = MaskedDense(5)
  variables = _layer_and_variables(plain, x)
  kernel = np.asarray(variables["params"]["kernel"])
  mask = np.asarray(variables["masks"]["kernel"])
  g = RNG.normal(size=(8, 5)).astype(np.float32)
  y, grad_kernel, grad_x = _swat_gradients(
      MaskedDense(5, activation_sparsity=activation_sparsity), variables, x, g)
  np.testing.assert_allclose(y, plain.apply(variables, x), rtol=1e-6, atol=1e-6)
  sparse_x = _numpy_top(x, activation_sparsity)
  assert np.count_nonzero(sparse_x) == round((1 - activation_sparsity) * x.size)
  np.testing.assert_allclose(grad_kernel, sparse_x.T @ g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, g @ (kernel * mask).T, rtol=1e-5, atol=1e-5)
  # The gradient is dense: masked kernel entries get one too (autodiff through
  # kernel * mask would give them 0).
  assert np.any(grad_kernel[mask == 0] != 0)


@pytest.mark.parametrize("shape,kernel_size,strides,padding,dilation", CONVS)
def test_swat_conv_numpy_reference(shape, kernel_size, strides, padding, dilation):
  s = 0.7
  x = RNG.normal(size=shape).astype(np.float32)
  options = dict(strides=strides, padding=padding, kernel_dilation=dilation, use_bias=False)
  plain = MaskedConv(4, kernel_size, **options)
  variables = _layer_and_variables(plain, x)
  kernel = np.asarray(variables["params"]["kernel"])
  mask = np.asarray(variables["masks"]["kernel"])
  out_shape = plain.apply(variables, x).shape
  g = RNG.normal(size=out_shape).astype(np.float32)
  y, grad_kernel, grad_x = _swat_gradients(MaskedConv(4, kernel_size, activation_sparsity=s,
                                                      **options), variables, x, g)
  d = len(kernel_size)
  pads = _pads(padding, shape, kernel_size, strides, dilation)
  np.testing.assert_allclose(y, plain.apply(variables, x), rtol=1e-6, atol=1e-6)
  expected_kernel = _conv_kernel_grad(_numpy_top(x, s), g, kernel.shape, (strides,) * d, pads,
                                      (dilation,) * d)
  np.testing.assert_allclose(grad_kernel, expected_kernel, rtol=1e-4, atol=1e-4)
  expected_x = _conv_input_grad(x.shape, g, kernel * mask, (strides,) * d, pads, (dilation,) * d)
  np.testing.assert_allclose(grad_x, expected_x, rtol=1e-4, atol=1e-4)


def test_swat_saves_only_the_sparsified_input(capsys):
  x = jnp.asarray(RNG.normal(size=(4, 9, 3)), jnp.float32)
  for s, saved_from in ((0.0, "argument"), (0.8, "keep_largest")):
    layer = MaskedConv(4, (3,), activation_sparsity=s)
    variables = _layer_and_variables(layer, x)
    print_saved_residuals(lambda p, x: layer.apply({"params": p, "masks": variables["masks"]},
                                                   x).sum(), variables["params"], x)
    lines = [line for line in capsys.readouterr().out.splitlines() if "[4,9,3]" in line]
    # One copy of the input is kept: the dense argument without SWAT, the sparse one with it.
    assert len(lines) == 1 and saved_from in lines[0], lines


def test_kth_largest_and_keep_largest():
  values = np.abs(RNG.normal(size=1000)).astype(np.float32)
  values[:300] = 0.0  # ties at zero, as after a ReLU
  ordered = np.sort(values)[::-1]
  for k in (1, 7, 500, 700, 701, 1000):
    assert float(kth_largest(jnp.asarray(values), k)) == ordered[k - 1]
  x = RNG.normal(size=(10, 20)).astype(np.float32)
  for s in (0.0, 0.25, 0.9, 0.999):
    np.testing.assert_array_equal(keep_largest(jnp.asarray(x), s), _numpy_top(x, s))


# --- distributions and scopes ---

def test_erk_densities_hand_computed():
  shapes = {"conv": (3, 3, 16, 32), "dense": (32, 10)}
  # raw = sum(shape) / prod(shape): conv 54/4608, dense 42/320. At sparsity 0.9 the
  # budget is 0.1 * 4928 = 492.8 weights = eps * (54 + 42), eps = 5.1333.
  densities = sparsity.erk_densities(shapes, 0.9)
  assert densities["conv"] == pytest.approx(5.13333 * 54 / 4608, rel=1e-5)
  assert densities["dense"] == pytest.approx(5.13333 * 42 / 320, rel=1e-5)
  # At 0.5 the dense layer would need density 3.37: it is kept dense, and the conv
  # layer takes the rest of the budget, (2464 - 320) / 4608.
  densities = sparsity.erk_densities(shapes, 0.5)
  assert densities["dense"] == 1.0
  assert densities["conv"] == pytest.approx((2464 - 320) / 4608, rel=1e-6)


def _sparsity_for(layers, **fields):
  options = dict(method="magnitude", weight_sparsity=0.75, distribution="uniform",
                 scope="layerwise", start_step=0, end_step=0, update_every=1,
                 layers=tuple(layers), effective_batch_size=1, seed=0)
  options.update(fields)
  return sparsity.Sparsity(**options)


def test_global_scope_keeps_the_largest_over_all_layers():
  layers = [sparsity.Layer("a", (20, 10), 1, True, 0.0), sparsity.Layer("b", (50, 2), 1, True, 0.0)]
  sparse = _sparsity_for(layers, scope="global")
  scores = {"a": np.abs(RNG.normal(size=(20, 10))) * 2, "b": np.abs(RNG.normal(size=(50, 2)))}
  counts = sparse._counts_table([0.75])[0]
  masks = sparse._top_masks({k: jnp.asarray(v, jnp.float32) for k, v in scores.items()}, counts)
  everything = np.concatenate([scores["a"].ravel(), scores["b"].ravel()])
  threshold = np.sort(everything)[::-1][round(0.25 * 300) - 1]
  for name in scores:
    np.testing.assert_array_equal(masks[name], scores[name] >= threshold)
  assert sum(int(np.sum(m)) for m in masks.values()) == 75
  assert np.sum(masks["a"]) > np.sum(masks["b"])  # layer a's weights are larger
  layerwise = _sparsity_for(layers, distribution="uniform").keep_counts(0.75)
  assert layerwise == {"a": 50, "b": 25}


# --- FLOPs report: a hand count ---

def test_flops_report_equals_a_hand_count(tiny_config):
  # The CNN at width 2 on MNIST-1D (length 40, 1 channel). Kernel entries W and
  # output positions P of each layer; forward FLOPs 2PW:
  #   stage1_conv1 (kept dense)   3x1x2  =   6  P 40   480
  #   stage1_conv2                3x2x2  =  12  P 40   960
  #   stage2_conv1 (after a pool) 3x2x4  =  24  P 20   960
  #   stage2_conv2                3x4x4  =  48  P 20  1920
  #   stage3_conv1 (after a pool) 3x4x8  =  96  P 10  1920
  #   stage3_conv2                3x8x8  = 192  P 10  3840
  #   head                        8x10   =  80  P  1   160     total 10240
  config = tiny_config
  config.model.width = 2
  config.sparsity.method = "swat"
  config.sparsity.activation_sparsity = 0.5
  recipe = config_lib.resolve(config, num_train_examples=4000, num_test_examples=1000,
                              num_devices=1)
  model = models.create_model(config, 10)
  sparse = sparsity.create(config, recipe, model, (40, 1))
  assert [(layer.name, layer.size, layer.positions, layer.masked) for layer in sparse.layers] == [
      ("stage1_conv1", 6, 40, False), ("stage1_conv2", 12, 40, True),
      ("stage2_conv1", 24, 20, True), ("stage2_conv2", 48, 20, True),
      ("stage3_conv1", 96, 10, True), ("stage3_conv2", 192, 10, True), ("head", 80, 1, True)]

  # Masks keeping the first quarter of each masked kernel.
  masks = {}
  for layer in sparse.masked_layers:
    flat = np.zeros(layer.size, np.float32)
    flat[:layer.size // 4] = 1
    masks[f"{layer.name}/kernel"] = flat.reshape(layer.kernel_shape)
  masks = traverse_util.unflatten_dict(masks, sep="/")
  report = sparse.report(masks)
  # Sparse forward: 480 + (10240 - 480) / 4 = 2920. Backward dense: 2 x 10240.
  # SWAT backward: input gradient 2920, kernel gradient 480 (stage1_conv1, dense) plus
  # (10240 - 480) x (1 - 0.5) = 4880 for the masked layers: 8280.
  assert report["flops/forward_dense"] == 10240
  assert report["flops/forward_sparse"] == 2920
  assert report["flops/backward_dense"] == 20480
  assert report["flops/backward_sparse"] == 2920 + 480 + 4880
  assert report["flops/train_step_dense"] == (10240 + 20480) * 64
  assert report["flops/train_step_sparse"] == (2920 + 8280) * 64
  # Weight sparsity: 458 kernel entries, 6 + (12 + 24 + 48 + 96 + 192 + 80) / 4 = 119 kept.
  assert report["sparsity/total"] == pytest.approx(1 - 119 / 458)
  assert report["sparsity/stage3_conv2"] == 0.75 and report["sparsity/stage1_conv1"] == 0.0
  # Under pruning the kernel gradient needs only the kept weights: 2920 as well.
  pruned = sparsity.Sparsity(**{**sparse.__dict__, "method": "magnitude"})
  assert pruned.report(masks)["flops/backward_sparse"] == 2920 + 2920
  # The per-step count the training step reports (traced) agrees.
  device_masks = jax.tree.map(jnp.asarray, masks)
  assert float(jax.jit(sparse.train_step_flops)(device_masks)) == (2920 + 8280) * 64


# --- training with masks ---

def _masked(state):
  """{layer: (kernel, mask)} of the masked layers (host arrays, first copy)."""
  params = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  masks = traverse_util.flatten_dict(jax.device_get(state.masks), sep="/")
  return {path[:-len("/kernel")]: (np.asarray(params[path]), np.asarray(mask))
          for path, mask in masks.items()}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_gradual_magnitude_follows_the_cubic_schedule(tiny_config, tmp_path):
  config = tiny_config
  config.train.num_steps = 30
  config.train.eval_every = 5
  config.train.checkpoint_every = 10
  config.sparsity.method = "gradual_magnitude"
  config.sparsity.start_step, config.sparsity.end_step, config.sparsity.update_every = 2, 22, 5
  result = train.train_and_evaluate(config, str(tmp_path))
  # Updates at the start of steps 2, 7, 12, 17, 22; s_t = 0.8 (1 - (1 - (t - 2) / 20)^3).
  # After `done` steps the masks are those of the last update step below `done`.
  expected = {5: 0.0, 10: 0.4625, 15: 0.7, 20: 0.7875, 25: 0.8, 30: 0.8}
  records = {r["step"]: r for r in _metrics(tmp_path) if "sparsity/total" in r}
  assert sorted(records) == sorted(expected)
  layers = {name: kernel.size for name, (kernel, _) in _masked(result.state).items()}
  for step, target in expected.items():
    for name, size in layers.items():
      zeros = size - round((1 - target) * size)
      assert records[step][f"sparsity/{name}"] == pytest.approx(zeros / size, abs=1e-12), step
  # Pruned weights are exactly 0, and so is their momentum; kept weights are not.
  momentum = traverse_util.flatten_dict(jax.device_get(result.state.opt_state[1][0].trace),
                                        sep="/")
  for name, (kernel, mask) in _masked(result.state).items():
    assert np.all(kernel[mask == 0] == 0) and np.all(momentum[f"{name}/kernel"][mask == 0] == 0)
    assert np.count_nonzero(kernel[mask == 1]) == np.sum(mask == 1)

  # Resumed from the checkpoint at step 20 (mid-schedule), the run ends identically.
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path, resumed, ignore=shutil.ignore_patterns("resumed"))
  shutil.rmtree(resumed / "checkpoints" / "30")
  again = train.train_and_evaluate(config, str(resumed))
  assert again.eval_metrics == result.eval_metrics
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.state.masks),
               jax.device_get(result.state.masks))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.state.params),
               jax.device_get(result.state.params))
  assert _metrics(resumed)[-1]["flops/train_total"] == _metrics(tmp_path)[-1]["flops/train_total"]


def test_magnitude_one_shot_on_eight_devices_identical_masks(tiny_config, tmp_path):
  config = tiny_config
  config.parallel.backend = "pmap"
  config.parallel.cpu_devices = 8
  config.sparsity.method = "magnitude"
  config.sparsity.start_step = 3
  config.sparsity.weight_sparsity = 0.9
  config.sparsity.distribution = "erk"
  result = train.train_and_evaluate(config, str(tmp_path))
  # Each device's copy of each mask (the global view is built from them in place).
  for leaf in jax.tree.leaves(result.state.masks):
    copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    assert len(copies) == 8
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy, copies[0])
  masked = _masked(result.state)
  kept = sum(int(mask.sum()) for _, mask in masked.values())
  total = sum(mask.size for _, mask in masked.values())
  assert kept == pytest.approx(0.1 * total, abs=len(masked))  # ERK: 90% overall
  for kernel, mask in masked.values():
    assert np.all(kernel[mask == 0] == 0)


def test_swat_trains_every_weight(tiny_config, tmp_path):
  config = tiny_config
  config.train.num_steps = 12
  config.sparsity.method = "swat"
  config.sparsity.update_every = 4
  config.sparsity.skip_last_layer = True
  result = train.train_and_evaluate(config, str(tmp_path))
  for name, (kernel, mask) in _masked(result.state).items():
    assert np.sum(mask == 0) == kernel.size - round(0.2 * kernel.size), name
    # Dropped weights keep their values and learn: far from all zero.
    assert np.count_nonzero(kernel[mask == 0]) == np.sum(mask == 0), name
    # The mask is the top-K of the weights at the last update (step 8), not of the
    # final weights; most of it agrees with the final top-K still.
    top = np.abs(kernel) >= np.sort(np.abs(kernel).ravel())[::-1][int(mask.sum()) - 1]
    assert np.mean(top == (mask == 1)) > 0.8
  masked = _masked(result.state)
  assert "head" not in masked and "stage3_conv2" in masked  # skip_last_layer: a plain Dense
  final = _metrics(tmp_path)[-1]
  assert final["flops/train_total"] == pytest.approx(12 * final["flops/train_step_sparse"],
                                                     rel=1e-6)


def test_random_masks_are_static(tiny_config, tmp_path):
  config = tiny_config
  config.sparsity.method = "random"
  config.sparsity.weight_sparsity = 0.5
  initial = train.setup(config).state
  result = train.train_and_evaluate(config, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(initial.masks),
               jax.device_get(result.state.masks))
  for name, (kernel, mask) in _masked(result.state).items():
    assert np.sum(mask) == round(0.5 * mask.size) and np.all(kernel[mask == 0] == 0)


# --- config errors ---

@pytest.mark.parametrize("field,value,message", [
    ("method", "topk", "config.sparsity.method='topk' is not valid; choose one of: none, "),
    ("weight_sparsity", 1.0, "config.sparsity.weight_sparsity=1.0 is not valid; it must be a "
                             "fraction in [0, 1)"),
    ("update_every", 0, "config.sparsity.update_every=0 is not valid; it must be an integer >= 1"),
    ("scope", "global", "config.sparsity.distribution='erk' sets each layer's sparsity"),
])
def test_config_errors(tiny_config, field, value, message):
  tiny_config.sparsity.distribution = "erk"
  tiny_config.sparsity[field] = value
  with pytest.raises(config_lib.ConfigError, match="^" + message.replace("(", r"\(").replace(
      ")", r"\)").replace("[", r"\[")):
    config_lib.validate(tiny_config)


@pytest.mark.parametrize("fields,message", [
    ({"method": "magnitude", "start_step": 10},
     "config.sparsity.start_step=10 is not before the end of training (10 steps)"),
    ({"method": "gradual_magnitude", "start_step": 8},
     "config.sparsity.end_step=0 (3/4 of the 10 steps: 7) must be after "
     "config.sparsity.start_step=8"),
])
def test_schedule_errors(tiny_config, fields, message):
  tiny_config.sparsity.update(fields)
  recipe = config_lib.resolve(tiny_config, num_train_examples=4000, num_test_examples=1000,
                              num_devices=1)
  model = models.create_model(tiny_config, 10)
  with pytest.raises(config_lib.ConfigError) as error:
    sparsity.create(tiny_config, recipe, model, (40, 1))
  assert str(error.value).startswith(message)
