"""Data pruning (jaxddp.pruning, jaxddp.score) against references written here.

The selection rules (hard/easy, CCS, class balancing, InfoBatch) are checked against
NumPy implementations of the published rules; the per-example outputs against NumPy
and an explicit per-example jax.grad loop on a fixed model; the forgetting counts
against a hand-made sequence of correctness. Then end to end: the scores are the
same on 1 device, 8 devices and 2 processes x 2 devices; a subset run never sees
an example outside its subset.
"""

import math
import os
import subprocess
import sys
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, make_tiny_config
from jaxddp import evaluate, parallel, pruning, train
from jaxddp.config import ConfigError, resolve
from jaxddp.data import ArrayDataset
from jaxddp.pruning import ExampleTables, scores, select

LAUNCHER = os.path.join(REPO, "scripts", "launch_local.py")


# --- Selection rules. ---

def test_hard_and_easy_keep_the_highest_and_lowest_scores():
  rng = np.random.default_rng(0)
  s = rng.random(1000)
  hard = select.subset(s, 0.3, "hard", seed=0)
  easy = select.subset(s, 0.3, "easy", seed=0)
  np.testing.assert_array_equal(hard, np.sort(np.argsort(s)[-300:]))
  np.testing.assert_array_equal(easy, np.sort(np.argsort(s)[:300]))
  random = select.subset(s, 0.3, "random", seed=0)
  assert len(random) == len(set(random)) == 300
  np.testing.assert_array_equal(random, select.subset(s, 0.3, "random", seed=0))
  assert not np.array_equal(random, select.subset(s, 0.3, "random", seed=1))


def _ccs_budgets_reference(s, keep, drop):
  """CCS (Zheng et al. 2023, Algorithm 1), written from the paper: how many examples
  each equal-width stratum gives, and the examples eligible (the hardest dropped)."""
  n = len(s)
  hardest = set(np.argsort(-s, kind="stable")[:int(drop * n)])
  eligible = [i for i in range(n) if i not in hardest]
  lo, hi = min(s[i] for i in eligible), max(s[i] for i in eligible)
  width = (hi - lo) / 50
  strata = {}
  for i in eligible:
    k = min(int((s[i] - lo) / width), 49) if width > 0 else 0
    strata.setdefault(k, []).append(i)
  budget, given = int(round(keep * n)), {}
  remaining = dict(strata)
  while remaining:
    k = min(remaining, key=lambda k: (len(remaining[k]), k))
    take = min(len(remaining[k]), budget // len(remaining))
    given[k] = take
    budget -= take
    del remaining[k]
  return given, strata, hardest


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.7])
def test_ccs_takes_the_budget_of_each_stratum_and_never_the_hardest(keep):
  rng = np.random.default_rng(1)
  s = np.concatenate([rng.exponential(1.0, 900), rng.uniform(5, 9, 100)])  # skewed, a tail
  kept = select.subset(s, keep, "ccs", seed=3, ccs_drop_fraction=0.1)
  budgets, strata, hardest = _ccs_budgets_reference(s, keep, 0.1)
  assert not set(kept) & hardest
  for k, members in strata.items():
    assert len(set(kept) & set(members)) == budgets[k], (k, len(members))
  assert len(kept) == sum(budgets.values())
  assert abs(len(kept) - round(keep * len(s))) <= 50  # at most one short per stratum


def test_class_balance_keeps_the_fraction_of_every_class():
  rng = np.random.default_rng(2)
  labels = np.repeat(np.arange(3), [100, 300, 600])
  s = rng.random(1000) + labels  # class 2 is hardest: hard alone would keep only it
  kept = select.subset(s, 0.2, "hard", seed=0, labels=labels)
  np.testing.assert_array_equal(np.bincount(labels[kept]), [20, 60, 120])
  for c in range(3):  # within each class, its hardest
    members = np.flatnonzero(labels == c)
    np.testing.assert_array_equal(np.sort(kept[labels[kept] == c]),
                                  np.sort(members[np.argsort(s[members])[-len(members) // 5:]]))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_infobatch_skips_the_ratio_of_low_loss_examples_and_rescales_the_rest(ratio):
  rng = np.random.default_rng(4)
  losses = rng.gamma(1.0, 1.0, 5000).astype(np.float32)
  w = select.infobatch_weights(losses, ratio, seed=7, epoch=3, anneal=False)
  low = losses.astype(np.float64) < losses.astype(np.float64).mean()
  assert (w[~low] == 1).all()  # at or above the mean: always kept, weight 1
  kept_low = int((1 - ratio) * low.sum())  # InfoBatch: int(keep_ratio x |well learned|)
  assert (w[low] == np.float32(1 / (1 - ratio))).sum() == kept_low
  assert (w[low] == 0).sum() == low.sum() - kept_low
  assert set(np.unique(w)) <= {0.0, 1.0, np.float32(1 / (1 - ratio))}
  np.testing.assert_array_equal(w, select.infobatch_weights(losses, ratio, seed=7, epoch=3,
                                                            anneal=False))
  assert not np.array_equal(w, select.infobatch_weights(losses, ratio, seed=7, epoch=4,
                                                        anneal=False))
  assert (select.infobatch_weights(losses, ratio, seed=7, epoch=3, anneal=True) == 1).all()
  # The expected gradient is kept: each low-loss example's weight x keep probability = 1.
  assert w[low].sum() == pytest.approx(kept_low / (1 - ratio), rel=1e-6)


def test_infobatch_anneals_at_the_rounded_fraction_of_the_epochs():
  """anneal_fraction=0.55 over 100 epochs anneals from epoch 55: ceil(0.55 * 100) alone
  is ceil(55.00000000000001) = 56. Every fraction k/1000 over 1..300 epochs agrees with
  exact arithmetic (13 fractions did not before the rounding)."""
  config = make_tiny_config()
  config.train.num_steps, config.train.num_epochs = 0, 100
  config.train.batch_size = 8
  config.data_pruning.dynamic, config.data_pruning.anneal_fraction = "infobatch", 0.55
  dataset = _arrays(n_train=16)
  recipe = resolve(config, num_train_examples=16, num_test_examples=50, num_devices=1)
  infobatch = pruning.create(config, dataset, recipe, None)
  assert infobatch.anneal_epoch == 55
  assert "prunes in the first 55 of 100 epochs" in infobatch.description
  assert (infobatch.weights(54, np.arange(16.0)) == 0).any()  # still pruning
  assert (infobatch.weights(55, np.arange(16.0)) == 1).all()  # all the data from epoch 55
  wrong = [(k, epochs) for k in range(1, 1000) for epochs in range(1, 301)
           if pruning.anneal_epoch(k / 1000, epochs) != math.ceil(Fraction(k, 1000) * epochs)]
  assert not wrong, wrong[:5]


def test_forgetting_counts_follow_a_hand_made_sequence():
  # Examples 0..3 over five presentations (1 = classified correctly).
  sequence = np.array([[0, 1, 1, 0],
                       [1, 1, 0, 0],
                       [0, 1, 1, 0],
                       [1, 1, 0, 0],
                       [1, 0, 0, 0]], np.float32)
  expected_forgotten = [1, 1, 2, 0]  # 0: 1->0 once; 1: once, at the end; 2: twice; 3: never
  tables = {name: jnp.zeros(4) for name in ("correct", "forgotten", "learned")}
  for step, row in enumerate(sequence):
    order = np.roll(np.arange(4), step)  # presented in another order every time
    tables = ExampleTables(forgetting=True).update(tables, jnp.asarray(order), jnp.zeros(4),
                                                   jnp.asarray(row[order]))
  np.testing.assert_array_equal(tables["forgotten"], expected_forgotten)
  np.testing.assert_array_equal(tables["learned"], [1, 1, 1, 0])
  # Never learned ranks hardest: above the largest count.
  np.testing.assert_array_equal(scores.forgetting(tables["forgotten"], tables["learned"]),
                                [1, 1, 2, 3])


def test_el2n_formula():
  logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  labels = np.array([0, 2])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = [np.linalg.norm(p[0] - [1, 0, 0]), np.linalg.norm(p[1] - [0, 0, 1])]
  np.testing.assert_allclose(scores.el2n(logits, labels), expected, rtol=1e-12)


# --- Per-example outputs on a fixed model. ---

class Linear:
  """Fixed weights of a linear classifier on flattened inputs, and its NumPy outputs."""

  def __init__(self, dataset, seed=0):
    rng = np.random.default_rng(seed)
    d = int(np.prod(dataset.input_shape))
    self.w = rng.standard_normal((d, dataset.num_classes)).astype(np.float32) * 0.3
    self.b = rng.standard_normal(dataset.num_classes).astype(np.float32) * 0.1

  def logits(self, x):
    return x.reshape(len(x), -1).astype(np.float64) @ self.w + self.b


def _arrays(n_train=203, n_test=50, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_train + n_test, 12, 1)).astype(np.float32)
  y = rng.integers(0, 4, n_train + n_test).astype(np.int32)
  return ArrayDataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 4)


@pytest.fixture(scope="module", params=["shard_map", "pmap"])
def linear_run(request):
  """A Setup of a one-layer flax model on 8 devices, on each backend, its parameters
  replaced by fixed NumPy weights."""
  import flax.linen as nn

  class OneLayer(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train):
      return nn.Dense(self.num_classes, name="head")(x.reshape(len(x), -1))

  dataset = _arrays()
  config = make_tiny_config()
  config.train.batch_size = 16
  config.train.eval_batch_size = 24  # 203 = 8 x 24 + 11: the last batch is padded
  config.model.norm = "none"
  config.parallel.backend = request.param
  run = train.setup(config, model=OneLayer(num_classes=4), dataset=dataset)
  fixed = Linear(dataset)
  state = jax.tree.map(parallel.local_value, run.backend.global_state(run.state))
  state = state.replace(params={"head": {"kernel": fixed.w, "bias": fixed.b}})
  return run, run.backend.put_state(state), dataset, fixed


def _outputs(run, state, dataset, what, chunk_size=5):
  batches = dataset.eval_batches(global_batch_size=run.recipe.eval_global_batch_size,
                                 split="train")
  return evaluate.per_example_outputs(run.backend, state, batches, dataset.num_train_examples,
                                     what, chunk_size=chunk_size)


def test_loss_logits_embedding_and_el2n_against_numpy(linear_run):
  run, state, dataset, fixed = linear_run
  out = _outputs(run, state, dataset, ("logits", "loss", "correct", "embedding"))
  logits = fixed.logits(dataset.train_x)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  y = dataset.train_y
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["loss"], -log_p[np.arange(len(y)), y], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["correct"], logits.argmax(1) == y)
  np.testing.assert_array_equal(out["label"], y)
  # The penultimate embedding of a one-layer model is its (flattened) input.
  np.testing.assert_allclose(out["embedding"], dataset.train_x.reshape(len(y), -1), rtol=1e-6)
  p = np.exp(log_p)
  p[np.arange(len(y)), y] -= 1
  np.testing.assert_allclose(scores.el2n(out["logits"], out["label"]),
                             np.linalg.norm(p, axis=1), rtol=1e-5, atol=1e-6)


def test_grad_norms_against_a_per_example_grad_loop(linear_run):
  run, state, dataset, fixed = linear_run
  out = _outputs(run, state, dataset, ("grad_norm",), chunk_size=3)  # 3 does not divide 24/8
  params = {"head": {"kernel": jnp.asarray(fixed.w), "bias": jnp.asarray(fixed.b)}}
  model_apply = jax.tree.map(parallel.local_value, run.backend.global_state(run.state)).apply_fn

  def loss(params, x, y):
    logits = model_apply({"params": params}, x[None], train=False)
    return -jax.nn.log_softmax(logits)[0, y]

  grad = jax.jit(jax.grad(loss))
  expected = []
  for x, y in zip(dataset.train_x, dataset.train_y):  # one example at a time
    g = grad(params, x, y)
    expected.append(np.sqrt(sum(float(np.sum(np.square(v))) for v in jax.tree.leaves(g))))
  np.testing.assert_allclose(out["grad_norm"], expected, rtol=2e-5)


def test_outputs_refuse_batches_that_miss_or_repeat_examples(linear_run):
  run, state, dataset, _ = linear_run
  batches = list(dataset.eval_batches(global_batch_size=24, split="train"))
  with pytest.raises(ValueError, match="1[0-9]* never appeared"):
    evaluate.per_example_outputs(run.backend, state, batches[:-1], dataset.num_train_examples)
  with pytest.raises(ValueError, match="appeared more than once"):
    evaluate.per_example_outputs(run.backend, state, batches + batches[:1],
                                dataset.num_train_examples)


# --- End to end: devices and processes; subsets. ---

SCORE_ARGS = ["--config=configs/mnist1d.py", "--config.model.width=8",
              "--config.train.batch_size=64", "--config.train.eval_batch_size=96",
              "--config.optimizer.learning_rate=0.01", "--config.data_pruning.num_runs=2",
              "--config.data_pruning.score_epochs=0", "--config.data_pruning.chunk_size=8",
              "--config.data_pruning.score=grand"]


def test_scores_agree_on_1_and_8_devices_and_2_processes(tmp_path):
  """GraNd at initialisation (two seeds), averaged: the per-example gradients of a CNN
  with batch norm, every example once, the remainder batch padded (4000 = 41 x 96 + 64).
  1 and 8 devices here; 2 processes x 2 devices through scripts/launch_local.py."""
  from jaxddp import score
  command = [sys.executable, LAUNCHER, "-n", "2", "--", sys.executable, "-m", "jaxddp.score",
             *SCORE_ARGS, f"--workdir={tmp_path / 'two'}", "--config.parallel.cpu_devices=2"]
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  two_by_two = np.load(tmp_path / "two" / "scores" / "grand.npy")
  config = make_tiny_config()
  config.train.batch_size, config.train.eval_batch_size = 64, 96
  dp = config.data_pruning
  dp.num_runs, dp.score_epochs, dp.chunk_size, dp.score = 2, 0, 8, "grand"
  by_devices = {}
  for devices in (1, 8):
    config.parallel.cpu_devices = devices
    by_devices[devices] = score.score(config, str(tmp_path / f"devices{devices}"))
  one, eight = by_devices[1], by_devices[8]
  assert one.shape == eight.shape == two_by_two.shape == (4000,)
  assert np.isfinite(one).all() and (one > 0).all()
  for other in (eight, two_by_two):
    print(f"max relative difference {np.max(np.abs(other - one) / one):.2e}")
    np.testing.assert_allclose(other, one, rtol=1e-5)


def test_a_subset_run_never_sees_another_example(tmp_path):
  """Examples outside the subset have inputs of 1e30: one in any batch would make the
  loss infinite, which stops the run. The subset's own run trains fine."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((400, 8, 1)).astype(np.float32)
  y = (x[:, 0, 0] > 0).astype(np.int32)
  s = rng.random(400)
  scores_path = str(tmp_path / "scores.npy")
  np.save(scores_path, s)
  kept = select.subset(s, 0.25, "hard", seed=0)
  poisoned = x.copy()
  poisoned[np.setdiff1d(np.arange(400), kept)] = 1e30
  config = make_tiny_config()
  config.model.name, config.model.norm = "user_models:MLP", "none"
  config.train.batch_size, config.train.num_steps, config.train.num_epochs = 16, 0, 3
  config.data_pruning.scores, config.data_pruning.keep_fraction = scores_path, 0.25
  dataset = ArrayDataset(poisoned, y, x[:50], y[:50], 2)
  result = train.train_and_evaluate(config, str(tmp_path / "run"), dataset=dataset)
  assert np.isfinite(result.eval_metrics["loss"])
  assert int(parallel.local_value(result.state.step)) == 3 * (100 // 16)  # epochs of the 100
  # The same subset on the clean data, batch by batch: exactly the kept examples each epoch.
  run = train.setup(config, dataset=ArrayDataset(x, y, x[:50], y[:50], 2))
  batches = run.train_batches(0)
  for epoch in range(2):
    seen = np.concatenate([next(batches)["index"] for _ in range(run.recipe.steps_per_epoch)])
    assert len(set(seen)) == len(seen) == 96 and set(seen) <= set(kept)
  # And a bad scores file is one line.
  np.save(scores_path, s[:10])
  with pytest.raises(ConfigError, match=r"has shape \(10,\), but the dataset has 400"):
    train.setup(config, dataset=dataset)


# --- Config errors and the larger MNIST-1D. ---

@pytest.mark.parametrize("changes, message", [
    ({"data_pruning.keep_fraction": 0.0}, r"keep_fraction=0.0 is not valid; it must be a "
                                          r"fraction in \(0, 1\]"),
    ({"data_pruning.policy": "hardest"}, "choose one of: hard, easy, random, ccs"),
    ({"data_pruning.score": "loss"}, "choose one of: el2n, grand, forgetting, prototype, random"),
    ({"data_pruning.keep_fraction": 0.5}, "needs the scores to choose by"),
    ({"data_pruning.dynamic": "infobatch", "data_pruning.keep_fraction": 0.5,
      "data_pruning.policy": "random"}, "cannot be combined"),
    ({"data_pruning.policy": "ccs", "data_pruning.scores": "s.npy",
      "data_pruning.keep_fraction": 0.95}, r"use keep_fraction <= 0.9"),
    ({"data_pruning.prune_ratio": 1.0}, r"prune_ratio=1.0 is not valid"),
    ({"data_pruning.scores": "s.npy"}, "keep_fraction=1 keeps every example"),
    ({"dataset.name": "digits", "dataset.num_train_examples": 100},
     "only for dataset.name=mnist1d"),
])
def test_data_pruning_config_errors(changes, message):
  from jaxddp import config as config_lib
  config = make_tiny_config()
  for field, value in changes.items():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_infobatch_needs_a_length_in_whole_epochs():
  config = make_tiny_config()  # num_steps=10
  config.data_pruning.dynamic = "infobatch"
  with pytest.raises(ConfigError, match="use config.train.num_epochs, not train.num_steps"):
    train.setup(config)


def test_a_larger_mnist1d_keeps_the_standard_examples_and_test_set(tmp_path, monkeypatch):
  from jaxddp.data import embedded
  monkeypatch.setenv("JAXDDP_CACHE", str(tmp_path))
  embedded.mnist1d.cache_clear()  # generated here, and cached in tmp_path
  standard = embedded.mnist1d()
  larger = embedded.mnist1d(4205)
  assert (standard.num_train_examples, larger.num_train_examples) == (4000, 4205)
  np.testing.assert_array_equal(larger.train_x[:4000], standard.train_x)
  np.testing.assert_array_equal(larger.test_x, standard.test_x)
  assert not np.isin(larger.train_x[4000:, 0, 0], standard.train_x[:, 0, 0]).all()  # fresh
  from importlib import metadata
  version = metadata.version("mnist1d")
  cached = sorted(p.name for p in tmp_path.iterdir())
  assert cached == [f"mnist1d_{version}_210_1_seed43.npz",
                    f"mnist1d_{version}_5000_0.8_seed42.npz"]
  embedded.mnist1d.cache_clear()  # read back from the files
  np.testing.assert_array_equal(embedded.mnist1d(4205).train_x, larger.train_x)
  np.testing.assert_array_equal(embedded.mnist1d().test_y, standard.test_y)
  assert embedded.mnist1d(1000).num_train_examples == 1000


def test_bad_scores_files_and_tiny_subsets_are_one_line(tmp_path):
  from jaxddp.pruning import training
  (tmp_path / "scores").mkdir()
  np.save(tmp_path / "scores" / "el2n.npy", np.zeros(100))
  with pytest.raises(ConfigError, match=r"is a directory; give the scores file itself, e\.g\. "
                                        r".*scores/el2n\.npy"):
    training.load_scores(str(tmp_path), 100)
  (tmp_path / "el2n.json").write_text('{"score": "el2n"}')
  with pytest.raises(ConfigError, match=r"is not an \.npy file of numbers"):
    training.load_scores(str(tmp_path / "el2n.json"), 100)
  config = make_tiny_config()  # batch 64
  config.data_pruning.scores = str(tmp_path / "scores" / "el2n.npy")
  config.data_pruning.keep_fraction = 0.5
  with pytest.raises(ConfigError, match="keeps 50 of the 100 training examples, fewer than one "
                                        "batch of 64"):
    training.kept_examples(config, _arrays(n_train=100))


def test_score_runs_are_shared_by_scores_and_renewed_by_a_changed_config():
  """el2n and grand train the same runs (same workdir); another learning rate trains anew."""
  import types
  from jaxddp import score
  def workdir_name(**changes):
    config = make_tiny_config()
    for field, value in changes.items():
      section, name = field.split(".")
      config[section][name] = value
    run_config = score.Scoring._run_config(types.SimpleNamespace(config=config), 3, 2.0)
    return score._digest(run_config, {}, {"dataset": "the same data"})
  el2n = workdir_name(**{"data_pruning.score": "el2n", "data_pruning.num_runs": 4})
  assert workdir_name(**{"data_pruning.score": "grand", "data_pruning.chunk_size": 4}) == el2n
  assert workdir_name(**{"optimizer.learning_rate": 0.05}) != el2n
  assert workdir_name(**{"dataset.num_train_examples": 6000}) != el2n
