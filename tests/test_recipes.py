"""Large-batch recipes: LR scaling and schedules, optimizers and their masks,
gradient accumulation, train-longer, and the recipe configs."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_tiny_config, run_main
from jaxddp import config as config_lib
from jaxddp import losses, models, optim, train


def _resolve(config, num_train_examples=4096, num_devices=8):
  config_lib.validate(config)
  return config_lib.resolve(config, num_train_examples=num_train_examples, num_test_examples=1000,
                            num_devices=num_devices)


def closed_form_lr(t, *, base, batch, reference, scaling, schedule, warmup, total,
                   decay_steps=(), factor=0.1, power=2.0):
  """The learning rate of update t (from 0), written out from the formulas."""
  peak = base * {"none": 1, "linear": batch / reference,
                 "sqrt": math.sqrt(batch / reference)}[scaling]
  if t < warmup:
    return peak * t / warmup
  s = (t - warmup) / (total - warmup)
  if schedule == "cosine":
    return peak * 0.5 * (1 + math.cos(math.pi * s))
  if schedule == "polynomial":
    return peak * (1 - s) ** power
  if schedule == "step":
    return peak * factor ** sum(1 for d in decay_steps if t >= d)
  return peak


# --- 1. Scaling rules, warmup and schedules: the closed-form values. ---

@pytest.mark.parametrize("batch", [64, 256, 1024])
@pytest.mark.parametrize("scaling", ["none", "linear", "sqrt"])
@pytest.mark.parametrize("schedule", ["cosine", "step", "polynomial", "constant"])
def test_schedule_matches_closed_form(batch, scaling, schedule):
  config = make_tiny_config()
  config.train.batch_size = batch
  config.train.num_steps = 0
  config.train.num_epochs = 10
  config.optimizer.update(learning_rate=0.1, scaling=scaling, reference_batch_size=256,
                          schedule=schedule, warmup_epochs=2, decay_epochs=(3, 6, 8),
                          decay_factor=0.1, polynomial_power=2.0)
  recipe = _resolve(config, num_train_examples=8192)
  steps_per_epoch = 8192 // batch
  assert recipe.steps_per_epoch == steps_per_epoch
  assert recipe.total_steps == 10 * steps_per_epoch
  assert recipe.warmup_steps == 2 * steps_per_epoch
  if schedule == "step":
    assert recipe.decay_steps == tuple(e * steps_per_epoch for e in (3, 6, 8))
  schedule_fn = optim.learning_rate_schedule(config, recipe)
  expected = lambda t: closed_form_lr(
      t, base=0.1, batch=batch, reference=256, scaling=scaling, schedule=schedule,
      warmup=recipe.warmup_steps, total=recipe.total_steps, decay_steps=recipe.decay_steps)
  w, total = recipe.warmup_steps, recipe.total_steps
  points = sorted({0, 1, w // 2, w - 1, w, w + 1, (w + total) // 2, total - 1,
                   *[d + o for d in recipe.decay_steps for o in (-1, 0)]})
  for t in points:
    assert float(schedule_fn(t)) == pytest.approx(expected(t), rel=1e-5, abs=1e-9), t
  assert float(schedule_fn(w)) == pytest.approx(recipe.peak_learning_rate, rel=1e-6)


@pytest.mark.parametrize("batch, scaling, schedule, accumulation", [
    (32, "linear", "step", 1),
    (64, "sqrt", "cosine", 1),
    (32, "linear", "polynomial", 4),  # effective batch 128
])
def test_logged_learning_rate_matches_closed_form(tmp_path, batch, scaling, schedule,
                                                  accumulation):
  config = make_tiny_config()
  config.dataset.name = "synthetic"
  config.dataset.update(synthetic_shape=(16, 2), synthetic_train_size=1024,
                        synthetic_test_size=64, synthetic_num_classes=4)
  config.model.width = 4
  config.parallel.cpu_devices = 2
  config.train.update(batch_size=batch, accumulation_steps=accumulation, num_steps=0,
                      num_epochs=1, log_every=1, checkpoint_every=1000)
  config.optimizer.update(learning_rate=0.05, scaling=scaling, reference_batch_size=64,
                          schedule=schedule, warmup_steps=3, decay_epochs=(0.5, 0.75))
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    logged = {r["step"]: r["train/learning_rate"] for r in map(json.loads, f)
              if "train/learning_rate" in r}
  effective = batch * accumulation
  total = 1024 // effective
  assert sorted(logged) == list(range(1, total + 1)), "one record per optimizer update"
  decay_steps = (round(0.5 * total), round(0.75 * total)) if schedule == "step" else ()
  for done, lr in logged.items():  # the record at `done` holds the rate of update done - 1
    expected = closed_form_lr(done - 1, base=0.05, batch=effective, reference=64,
                              scaling=scaling, schedule=schedule, warmup=3, total=total,
                              decay_steps=decay_steps)
    assert lr == pytest.approx(expected, rel=1e-5, abs=1e-9), done


def test_train_longer_scales_epochs_and_decay_points():
  config = make_tiny_config()
  config.train.update(batch_size=1024, num_steps=0, num_epochs=10, epochs_scaling="linear")
  config.optimizer.update(reference_batch_size=256, schedule="step", decay_epochs=(3, 6))
  recipe = _resolve(config, num_train_examples=8192)
  assert recipe.epochs_scale == 4.0
  assert recipe.total_steps == 10 * 4 * 8
  assert recipe.decay_steps == (3 * 4 * 8, 6 * 4 * 8)
  assert recipe.warmup_steps == 0  # warmup stays in unscaled epochs (here none)


def test_recipe_counts_effective_batches():
  config = make_tiny_config()
  config.train.update(batch_size=64, accumulation_steps=4, num_steps=0, num_epochs=2)
  config.optimizer.update(scaling="linear", reference_batch_size=128, learning_rate=0.1,
                          warmup_epochs=1)
  recipe = _resolve(config, num_train_examples=4000)
  assert recipe.effective_batch_size == 256
  assert recipe.per_device_batch_size == 8
  assert recipe.steps_per_epoch == 4000 // 256
  assert recipe.total_steps == 2 * (4000 // 256)
  assert recipe.warmup_steps == 4000 // 256
  assert recipe.peak_learning_rate == pytest.approx(0.2)


# --- 2. Gradient accumulation equals one large batch. ---

def test_accumulation_equals_one_large_batch(tmp_path):
  """k=4 micro-batches of 16 give the parameters of one batch of 64.

  The model has no batch norm (model.norm = "none"), so each example's gradient does
  not depend on the others. The only difference is float32 summation order: the sum of
  four micro-batch means / 4 vs one mean of 64, about 1e-7 relative per step.
  """
  def run(batch, accumulation, workdir):
    config = make_tiny_config()
    config.model.norm = "none"
    config.parallel.cpu_devices = 2
    config.optimizer.learning_rate = 0.05
    config.train.update(batch_size=batch, accumulation_steps=accumulation, num_steps=8,
                        log_every=1)
    result = train.train_and_evaluate(config, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
      losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    return jax.device_get(result.state.params), np.array(losses)

  params_k, losses_k = run(16, 4, tmp_path / "accumulated")
  params_1, losses_1 = run(64, 1, tmp_path / "large")
  assert len(losses_k) == len(losses_1) == 8
  np.testing.assert_allclose(losses_k, losses_1, rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_k, params_1)
  print(f"max parameter difference after 8 updates: {max(jax.tree.leaves(diffs)):.2e}")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_k, params_1)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_1,
                       jax.device_get(_initial_params(norm="none")))
  assert max(jax.tree.leaves(moved)) > 1e-3, "the parameters should have moved"


def _initial_params(norm):
  config = make_tiny_config()
  config.model.norm = norm
  model = models.create_model(config, 10)
  return model.init(jax.random.key(config.seed), jnp.zeros((1, 40, 1)), train=False)["params"]


# --- 3. Weight decay and trust ratios skip exactly the norm parameters and biases. ---

def _resnet_params():
  config = make_tiny_config()
  config.model.update(name="resnet18", width=4)
  model = models.create_model(config, 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  return variables["params"]


def _is_norm_or_bias(path) -> bool:
  names = [p.key for p in path]
  return names[-1] == "bias" or any("norm" in n for n in names)


def test_decay_mask_excludes_exactly_norm_parameters_and_biases():
  params = _resnet_params()
  mask = optim.decay_mask(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert sum(_is_norm_or_bias(p) for p, _ in flat) > 20  # BN scales and biases, the Dense bias
  for path, decayed in flat:
    assert decayed == (not _is_norm_or_bias(path)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trust_ratio_skips_exactly_norm_parameters_and_biases(name):
  """First update, no weight decay: a skipped leaf moves by the plain direction times
  the LR; a kernel by that times its trust ratio ||w|| / ||direction|| (x eta for LARS)."""
  params = _resnet_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01) + 0.001 * jnp.arange(p.size).reshape(
      p.shape) / p.size, params)
  config = make_tiny_config()
  config.optimizer.update(name=name, weight_decay=0.0, trust_coefficient=0.001)
  lr = 0.5
  tx = optim.create_optimizer(config, optax.constant_schedule(lr))
  updates, _ = tx.update(grads, tx.init(params), params)
  if name == "lars":  # direction: the gradient (momentum trace after one step)
    direction, eta = grads, 0.001
  else:  # direction: Adam's first step, m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
    direction, eta = jax.tree.map(lambda g: g / (jnp.abs(g) + 1e-6), grads), 1.0
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, update), p, d in zip(flat, jax.tree.leaves(params), jax.tree.leaves(direction)):
    if _is_norm_or_bias(path):
      expected = -lr * d
    else:
      expected = -lr * eta * jnp.linalg.norm(p) / jnp.linalg.norm(d) * d
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-9,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_weight_decay_respects_decay_norm_and_bias(decay_norm_and_bias):
  params = _resnet_params()
  params = jax.tree.map(lambda p: p + 1.0, params)  # no zero leaves
  config = make_tiny_config()
  config.optimizer.update(name="sgd", weight_decay=0.1, decay_norm_and_bias=decay_norm_and_bias)
  tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, update), p in zip(flat, jax.tree.leaves(params)):
    decayed = decay_norm_and_bias or not _is_norm_or_bias(path)
    np.testing.assert_allclose(update, -0.1 * p if decayed else 0 * p, rtol=1e-6)


# --- Clipping, label smoothing, zero-init residual. ---

def test_gradient_clipping_bounds_the_global_norm():
  config = make_tiny_config()
  config.optimizer.update(name="sgd", weight_decay=0.0, grad_clip_norm=1.0)
  tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  grads = {"a": jnp.full(3, 10.0), "b": jnp.full((2, 2), 10.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = optax.tree.norm(updates)
  assert float(norm) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_allclose(updates["a"], -10.0 / np.sqrt(700.0) * np.ones(3), rtol=1e-6)


def test_label_smoothing_loss():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 1])
  alpha = 0.2
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  targets = np.full((2, 3), alpha / 3) + (1 - alpha) * np.eye(3)[np.asarray(labels)]
  expected = -(targets * log_probs).sum(-1)
  config = make_tiny_config()
  config.train.label_smoothing = alpha
  train_loss, eval_loss = losses.get(config)
  np.testing.assert_allclose(train_loss(logits, labels), expected, rtol=1e-6)
  plain = -log_probs[np.arange(2), np.asarray(labels)]
  np.testing.assert_allclose(eval_loss(logits, labels), plain, rtol=1e-6)  # reported unsmoothed


def test_zero_init_residual_zeroes_the_last_norm_of_every_block():
  config = make_tiny_config()
  config.model.update(name="resnet18", width=4, zero_init_residual=True)
  params = models.create_model(config, 10).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
  blocks = [k for k in params if re.fullmatch(r"stage\d_block\d", k)]
  assert len(blocks) == 8
  for block in blocks:
    # norm2 follows the block's second conv; shortcut_norm, if any, is the shortcut's.
    np.testing.assert_array_equal(params[block]["norm2"]["scale"], 0.0)
    np.testing.assert_array_equal(params[block]["norm1"]["scale"], 1.0)
    if "shortcut_norm" in params[block]:
      np.testing.assert_array_equal(params[block]["shortcut_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["stem_norm"]["scale"], 1.0)


# --- The recipe configs. ---

@pytest.mark.parametrize("name, batch, peak", [("imagenet", 1024, 0.4), ("imagenet_8k", 8192, 3.2)])
def test_imagenet_recipes_resolve_goyal_numbers(name, batch, peak):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  recipe = _resolve(config, num_train_examples=1281167, num_devices=8)
  steps_per_epoch = 1281167 // batch
  assert recipe.effective_batch_size == batch
  assert recipe.peak_learning_rate == pytest.approx(peak)
  assert recipe.warmup_steps == 5 * steps_per_epoch
  assert recipe.total_steps == 90 * steps_per_epoch
  assert recipe.decay_steps == tuple(e * steps_per_epoch for e in (30, 60, 80))
  assert config.optimizer.weight_decay == 1e-4 and config.optimizer.momentum == 0.9


def test_imagenet_without_the_dataset_fails_cleanly(tmp_path):
  """No prepared ImageNet under data_dir: one line that says where and how, nothing written."""
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  completed = run_main(["--config=configs/imagenet.py", f"--workdir={workdir}",
                        f"--config.dataset.data_dir={data_dir}"], timeout=120)
  assert completed.returncode == 2, completed.stderr
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1, completed.stderr
  (line,) = lines
  assert line.startswith("jaxddp: error: config.dataset.name='imagenet2012': no prepared data in "
                         f"{data_dir}/imagenet2012/"), line
  for text in ("ILSVRC2012_img_train.tar", "tfds build imagenet2012", "--config.dataset.data_dir"):
    assert text in line, f"{text!r} not in {line!r}"
  assert not workdir.exists(), f"{workdir} was created by a run that failed"
  assert not data_dir.exists(), "tfds wrote to data_dir (jaxddp never downloads)"


def test_imagenet_recipe_runs_on_synthetic_images(tmp_path):
  """The recipe's model and optimizer, at a small batch and image size to stay fast."""
  completed = run_main(["--config=configs/imagenet.py", f"--workdir={tmp_path}",
                        "--config.dataset.name=synthetic", "--config.train.num_steps=2",
                        "--config.train.batch_size=16", "--config.dataset.synthetic_shape=(32,32,3)",
                        "--config.parallel.cpu_devices=2"], timeout=600)
  assert completed.returncode == 0, completed.stderr
  assert "final test accuracy" in completed.stdout
  with open(os.path.join(tmp_path, "config.json")) as f:
    recipe = json.load(f)["recipe"]
  assert recipe["peak_learning_rate"] == pytest.approx(0.1 * 16 / 256)
  assert recipe["scaling"] == "linear" and recipe["schedule"] == "step"
