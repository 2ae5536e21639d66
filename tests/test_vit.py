"""The Vision Transformer (jaxddp/models/vit.py), registered through jaxddp.models.register.

Shapes for 1-D and 2-D inputs and both poolings; the layer hooks (dtype, masked layers,
SWAT) reach its dense layers; its layer names do not depend on them; it trains
data-parallel with dropout.
"""

import contextlib
import io

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from conftest import make_tiny_config
from jaxddp import config as config_lib
from jaxddp import models, sparsity, train
from jaxddp.config import ConfigError
from test_mixed_precision import _equations


def _config(name="vit_ti", depth=1, patch_size=4, pooling="cls", **sparse):
  config = make_tiny_config()
  config.model.update(name=name, depth=depth, patch_size=patch_size, pooling=pooling)
  config.sparsity.update(sparse)
  return config


def _init(config, input_shape, num_classes=10):
  model = models.create_model(config, num_classes)
  x = jnp.zeros((3, *input_shape))
  logits, variables = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), x, train=False))
  return model, logits, variables


@pytest.mark.parametrize("input_shape, patch_size, pooling, tokens", [
    ((40, 1), 4, "cls", 11), ((40, 1), 8, "mean", 5), ((8, 8, 3), 2, "cls", 17),
    ((32, 32, 3), 16, "mean", 4)])
def test_shapes_for_signals_and_images(input_shape, patch_size, pooling, tokens):
  _, logits, variables = _init(_config(patch_size=patch_size, pooling=pooling), input_shape)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  params = variables["params"]
  assert params["pos_embed"].shape == (1, tokens, 192)
  assert ("cls_token" in params) == (pooling == "cls")
  assert params["block0"]["attention"]["qkv"]["kernel"].shape == (192, 3 * 192)
  assert params["block0"]["mlp1"]["kernel"].shape == (192, 768)


@pytest.mark.parametrize("name, width, heads, mlp", [("vit_ti", 192, 3, 768),
                                                     ("vit_s", 384, 6, 1536),
                                                     ("vit_b", 768, 12, 3072)])
def test_variants_have_their_published_sizes(name, width, heads, mlp):
  config = _config(name=name, depth=0, patch_size=16)
  model, _, variables = _init(config, (224, 224, 3), num_classes=1000)
  assert (model.width, model.depth, model.num_heads, model.mlp_size) == (width, 12, heads, mlp)
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  # 5.7M, 22M and 86M parameters at 224x224 with a 1000-class head (Touvron et al. 2021).
  assert count == pytest.approx({"vit_ti": 5.7e6, "vit_s": 22.1e6, "vit_b": 86.6e6}[name],
                                rel=0.01)


def test_masked_layers_keep_the_names_and_swat_reaches_the_dense_layers():
  dense_config = _config()
  _, _, dense = _init(dense_config, (40, 1))
  swat_config = _config(method="swat", activation_sparsity=0.5)
  model, _, masked = _init(swat_config, (40, 1))
  assert jax.tree.structure(dense["params"]) == jax.tree.structure(masked["params"])
  masks = set(traverse_util.flatten_dict(masked["masks"], sep="/"))
  assert masks == {f"block0/{name}/kernel" for name in ("attention/qkv", "attention/out",
                                                        "mlp1", "mlp2")} | {"head/kernel"}
  recipe = config_lib.resolve(swat_config, num_train_examples=4000, num_test_examples=1000,
                              num_devices=8)
  sparse = sparsity.create(swat_config, recipe, model, (40, 1))
  by_name = {layer.name: layer for layer in sparse.layers}
  assert not by_name["patch_embed"].masked  # skip_first_layer
  assert by_name["block0/mlp1"].positions == 11  # one per token, class token included
  assert by_name["block0/mlp1"].activation_sparsity == 0.5


def test_bfloat16_matmuls_and_float32_logits():
  config = _config()
  config.model.dtype = "bfloat16"
  model, _, variables = _init(config, (40, 1))
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.zeros((3, 40, 1)))
  products = [e for e in _equations(closed.jaxpr)
              if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert len(products) == 1 + 4 + 2 + 1  # patch embedding, 4 dense, 2 attention, head
  assert {str(v.aval.dtype) for e in products[:-1] for v in e.invars} == {"bfloat16"}
  assert closed.out_avals[0].dtype == jnp.float32
  assert {str(x.dtype) for x in jax.tree.leaves(variables["params"])} == {"float32"}


def test_a_patch_that_does_not_divide_the_input_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config.model.patch_size=16 does not divide the "
                                        r"input's spatial size 40"):
    _init(_config(patch_size=16), (40, 1))
  with pytest.raises(ConfigError, match="config.model.pooling='max' is not valid"):
    _init(_config(pooling="max"), (40, 1))


def test_trains_data_parallel_with_dropout(tmp_path):
  """One block on digits (2x2 patches), 8 devices, dropout: 30 steps learn something."""
  config = _config(patch_size=2)
  config.dataset.name = "digits"
  config.model.dropout = 0.1
  config.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=0.05)
  config.train.num_steps = 30
  config.train.log_every = 10
  with contextlib.redirect_stdout(io.StringIO()):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result.eval_metrics["accuracy"] > 0.4  # chance is 0.1; measured 0.60
