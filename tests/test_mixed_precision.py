"""Mixed precision: config.model.dtype = "bfloat16" computes in bfloat16 and keeps
parameters, optimizer state, batch-norm statistics, masks, logits and loss float32.

bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 2e-3
relative, and a few layers of them add up to about 1e-2. bf16 results are
therefore compared with float32 ones at tolerances of a few 1e-2, which the
errors looked for here (a wrong dtype, a dense SWAT gradient, a mis-ranked top-K,
a broken normalisation) exceed by far.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_tiny_config
from jaxddp import config as config_lib
from jaxddp import models, optim, train
from jaxddp.nn import GhostBatchNorm, MaskedConv, MaskedDense

SHAPE = (8, 8, 3)  # tiny images
BATCH = 16


def _config(name, norm="batch_norm", method="none", dtype="bfloat16"):
  config = make_tiny_config()
  config.dataset.name = "synthetic"
  config.dataset.synthetic_shape = SHAPE
  config.dataset.synthetic_num_classes = 10
  config.dataset.synthetic_train_size = 4 * BATCH
  config.dataset.synthetic_test_size = BATCH
  config.model.name = name
  config.model.width = 4
  config.model.norm = norm
  config.model.ghost_batch_size = 1  # 8 devices: 2 examples per device, 2 ghost batches
  config.model.dtype = dtype
  config.sparsity.method = method
  config.sparsity.activation_sparsity = 0.5
  config.train.batch_size = BATCH
  return config


def _floating_leaves(tree):
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert leaves, "no floating-point leaves to check"
  return leaves


def _all_float32(tree):
  return {str(x.dtype) for x in _floating_leaves(tree)} == {"float32"}


def _equations(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (custom_vjp, pjit, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def _conv_dtypes(apply_fn, variables, num_convs):
  """{dtypes of the inputs and kernels of every convolution}, and the logits' dtype."""
  x = jnp.zeros((BATCH, *SHAPE), jnp.float32)  # what the data pipeline delivers
  closed = jax.make_jaxpr(lambda v, x: apply_fn(v, x, train=False))(variables, x)
  convs = [e for e in _equations(closed.jaxpr) if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == num_convs  # SWAT's are inside custom_vjp_call: all must be found
  return {str(v.aval.dtype) for e in convs for v in e.invars}, closed.out_avals[0].dtype


def _variables_and_optimizer_state(config):
  """The model's variables and its optimizer's state, as shapes and dtypes (no compiling)."""
  model = models.create_model(config, 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)),
                                                train=False))
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  return model, variables, jax.eval_shape(tx.init, variables["params"])


@pytest.mark.parametrize("name,norm,method,num_convs", [
    ("resnet18", "batch_norm", "none", 20),  # stem, 8 blocks x 2, 3 projections
    ("cnn", "ghost_batch_norm", "swat", 6)])  # 5 of them masked (skip_first_layer)
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(name, norm, method, num_convs):
  """Under bf16: params, batch_stats, masks and the optimizer state are float32; every
  convolution of the model, masked (SWAT) ones included, runs on bf16 operands; the
  logits are float32. With dtype=float32 the same convolutions run in float32."""
  model, variables, opt_state = _variables_and_optimizer_state(_config(name, norm, method))
  assert _all_float32(variables["params"])
  assert _all_float32(variables["batch_stats"])
  assert _all_float32(opt_state)
  if method != "none":
    assert _all_float32(variables["masks"])
  conv_dtypes, logits_dtype = _conv_dtypes(model.apply, variables, num_convs)
  assert conv_dtypes == {"bfloat16"}
  assert logits_dtype == jnp.float32

  model32 = models.create_model(_config(name, norm, method, dtype="float32"), 10)
  conv_dtypes, logits_dtype = _conv_dtypes(model32.apply, variables, num_convs)
  assert conv_dtypes == {"float32"}
  assert logits_dtype == jnp.float32


def test_train_step_bfloat16_close_to_float32():
  """One real training step (train.setup: 8 devices, shard_map, synchronised batch norm)
  of the CNN in bf16: the state is float32 before and after, the loss finite and within
  2e-2 relative of the float32 loss at the same parameters and batch (a few bf16
  roundings of about 4e-3 each through the network, see the module docstring). The
  float32 loss is the float32 model's on one device with batch norm over the whole
  batch of 16, which is what synchronised batch norm over 8 devices computes."""
  config = _config("cnn")
  run = train.setup(config)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(BATCH, *SHAPE)).astype(np.float32),
           "y": rng.integers(0, 10, BATCH).astype(np.int32)}
  for tree in (run.state.params, run.state.batch_stats, run.state.opt_state):
    assert _all_float32(tree)

  config32 = _config("cnn", dtype="float32")
  config32.model.sync_batch_stats = False  # one device: its batch is the global batch
  model32 = models.create_model(config32, 10)
  variables = jax.device_get(run.state.variables())  # before train_step donates the state
  logits32, _ = jax.jit(lambda v, x: model32.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, batch["x"])
  loss32 = float(optax.softmax_cross_entropy_with_integer_labels(logits32, batch["y"]).mean())

  state, metrics = run.backend.train_step(run.state, run.backend.put_batch(batch))
  loss16 = float(metrics["loss_sum"] / metrics["count"])
  assert float(metrics["count"]) == BATCH and float(metrics["params_finite"]) == 1.0
  for tree in (state.params, state.batch_stats, state.opt_state):
    assert _all_float32(tree)
  assert np.isfinite(loss16)
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_ghost_batch_norm_bfloat16():
  """GhostBatchNorm(dtype=bfloat16): bf16 output (training and evaluation), float32
  running statistics and parameters. The input holds bf16 values, so the float32
  statistics are those of the float32 layer (to float32 rounding), and the output is
  the float32 layer's up to one bf16 rounding (ghost batches of 4 x 5 values per
  feature: |y| <= sqrt(19))."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([0.0, 50.0, -2.0])
  x = jnp.asarray(x, jnp.bfloat16)
  layers = {dtype: GhostBatchNorm(ghost_batch_size=4, momentum=0.9, dtype=dtype)
            for dtype in (jnp.float32, jnp.bfloat16)}
  variables = layers[jnp.float32].init(jax.random.key(0), x.astype(jnp.float32),
                                       use_running_average=False)
  out, stats = {}, {}
  for dtype, layer in layers.items():
    out[dtype], updates = layer.apply(variables, x.astype(dtype), use_running_average=False,
                                      mutable=["batch_stats"])
    stats[dtype] = updates["batch_stats"]
  assert out[jnp.bfloat16].dtype == jnp.bfloat16
  assert _all_float32(stats[jnp.bfloat16])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats[jnp.bfloat16], stats[jnp.float32])
  np.testing.assert_allclose(np.asarray(out[jnp.bfloat16], np.float32), out[jnp.float32],
                             atol=2e-2)  # |y| <= sqrt(20 - 1) < 8: one bf16 rounding <= 2^-6
  evaluated = layers[jnp.bfloat16].apply({**variables, "batch_stats": stats[jnp.bfloat16]}, x,
                                         use_running_average=True)
  assert evaluated.dtype == jnp.bfloat16


@pytest.mark.parametrize("layer_type", ["dense", "conv"])
def test_swat_masked_layers_bfloat16(layer_type):
  """MaskedDense / MaskedConv with SWAT (half the input zeroed for the kernel gradient)
  and a half-zero mask, in bf16: bf16 output; float32 kernel gradient close to the f32
  layer's (same bf16-valued input, so the same entries survive the top-K), and farther
  from the dense (non-SWAT) gradient than the tolerance, so the check can tell them apart."""
  rng = np.random.default_rng(1)
  if layer_type == "dense":
    x, kernel_shape = rng.normal(size=(16, 24)), (24, 8)
    make = lambda dtype, s: MaskedDense(8, activation_sparsity=s, dtype=dtype)
  else:
    x, kernel_shape = rng.normal(size=(4, 8, 8, 3)), (3, 3, 3, 8)
    make = lambda dtype, s: MaskedConv(8, (3, 3), activation_sparsity=s, dtype=dtype)
  x = jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)  # bf16 values: same top-K in both
  fan_in = np.prod(kernel_shape[:-1])
  variables = {  # the layers' variables (float32), written out rather than compiling an init
      "params": {"kernel": jnp.asarray(rng.normal(size=kernel_shape) / np.sqrt(fan_in),
                                       jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=8), jnp.float32)},
      "masks": {"kernel": jnp.asarray(rng.random(kernel_shape) < 0.5, jnp.float32)}}

  def kernel_grad(dtype, sparsity):
    layer = make(dtype, sparsity)
    out_shape = jax.eval_shape(layer.apply, variables, x).shape
    g = jnp.asarray(np.random.default_rng(2).normal(size=out_shape), jnp.float32)

    @jax.jit  # one compile instead of one per operation
    def output_and_grad(params):
      loss = lambda params: jnp.sum(layer.apply({**variables, "params": params}, x)
                                    .astype(jnp.float32) * g)
      return layer.apply({**variables, "params": params}, x), jax.grad(loss)(params)["kernel"]

    return output_and_grad(variables["params"])

  y16, grad16 = kernel_grad(jnp.bfloat16, 0.5)
  _, grad32 = kernel_grad(jnp.float32, 0.5)
  _, dense32 = kernel_grad(jnp.float32, 0.0)
  assert y16.dtype == jnp.bfloat16
  assert grad16.dtype == jnp.float32
  tolerance = 3e-2 * float(jnp.max(jnp.abs(grad32)))
  np.testing.assert_allclose(grad16, grad32, atol=tolerance)
  assert float(jnp.max(jnp.abs(dense32 - grad32))) > 5 * tolerance


def test_dtype_validation():
  """float16 (which would need loss scaling) is refused, naming the field; bfloat16 passes."""
  config = _config("cnn", dtype="float16")
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.dtype='float16'.*bfloat16"):
    config_lib.validate(config)
  config_lib.validate(_config("cnn", dtype="bfloat16"))
  assert make_tiny_config().model.dtype == "float32"  # the default


def test_no_norm_casts_to_dtype():
  """norm=none: the identity layer still hands the next layer bf16 (a cast, no variables)."""
  norm = models.norm_layer(_config("cnn", norm="none"))
  y, variables = norm().init_with_output(jax.random.key(0), jnp.ones((2, 3), jnp.float32))
  assert y.dtype == jnp.bfloat16 and not variables
