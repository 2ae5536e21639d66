"""train_and_evaluate end to end: what a run leaves in its workdir and prints.

One finished run (module fixture) is shared: its config.json, metrics.jsonl,
TensorBoard events, checkpoints and console output are checked, and copies of
its workdir are used to resume and to resume with a changed config. A diverging
run checks the stop on a non-finite loss. Two subprocesses check the exit
status and the one error line of the command line for those failures.
"""

import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
import struct

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import NUM_DEVICES, make_tiny_config, run_main
from jaxddp import config as config_lib
from jaxddp import metrics, optim, train

STEPS = 10
BATCH = 64
TRAIN_EXAMPLES = 4000  # MNIST-1D
TEST_EXAMPLES = 1000
WARMUP_EPOCHS = 0.05  # round(0.05 * 62) = 3 warmup steps
WARMUP_STEPS = 3

# Lines that JAX or absl may print on their own (platform warnings, absl log lines).
_NOISE = re.compile(r"^(WARNING[: ]|[WI]\d{4} \d\d:\d\d:\d\d)")
_PLAIN_LINE = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  accuracy (\S+)  (\d+) examples/s  "
                         r"ETA (\?|\d+:\d\d(:\d\d)?)$")


def _config(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.train.num_steps = STEPS
  config.train.log_every = 5
  config.train.checkpoint_every = 5
  config.optimizer.warmup_epochs = WARMUP_EPOCHS
  config.optimizer.schedule = "cosine"
  return config


def _cli_args(workdir, **overrides):
  """Command-line flags that give _config(tiny_config), plus `overrides`."""
  flags = {"model.width": 8, "train.batch_size": BATCH, "train.num_steps": STEPS,
           "train.log_every": 5, "train.checkpoint_every": 5,
           "optimizer.learning_rate": 0.01, "optimizer.warmup_epochs": WARMUP_EPOCHS,
           "parallel.cpu_devices": NUM_DEVICES}
  flags.update(overrides)
  return (["--config=configs/mnist1d.py", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in flags.items()])


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _snapshot(directory):
  """{relative path: (is_dir, size, mtime_ns)} of everything under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (name in dirs, st.st_size, st.st_mtime_ns)
  return out


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _restore(workdir, step):
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    return jax.device_get(manager.restore(step))


def _read_tensorboard_scalars(directory):
  """{tag: [(step, value), ...]} from the event files, checking the TFRecord framing.

  Each record: uint64 length, uint32 masked crc32c of the length, the data (an
  Event protobuf), uint32 masked crc32c of the data.
  """
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  scalars = {}
  files = sorted(glob.glob(os.path.join(directory, "**", "events.out.tfevents*"), recursive=True))
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
      assert header_crc == masked_crc32c(header), f"bad length crc in {path} at {pos}"
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert body_crc == masked_crc32c(body), f"bad data crc in {path} at {pos}"
      pos += 16 + length
      event = event_pb2.Event()
      event.ParseFromString(body)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _assert_one_error_line(result, status, *expected):
  stderr = result.stderr
  assert "Traceback" not in stderr, stderr
  assert result.returncode == status, f"exit status {result.returncode}, stderr:\n{stderr}"
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("jaxddp: error:")]
  assert len(errors) == 1, f"want exactly one 'jaxddp: error:' line, got:\n{stderr}"
  unexplained = [line for line in lines if line not in errors and not _NOISE.match(line)]
  assert not unexplained, f"unexpected stderr lines besides the error:\n{stderr}"
  for text in expected:
    assert text in errors[0], f"{text!r} not in {errors[0]!r}"
  return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One finished run: (config, workdir, TrainResult, console output)."""
  config = _config(make_tiny_config())
  workdir = str(tmp_path_factory.mktemp("finished"))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = train.train_and_evaluate(config.copy_and_resolve_references(), workdir)
  return config, workdir, result, out.getvalue()


@pytest.fixture
def finished_copy(finished, tmp_path):
  """A private copy of the finished run's workdir (timestamps kept)."""
  config, workdir, result, _ = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  return config.copy_and_resolve_references(), copy, result


# --- 1. What a run leaves in its workdir. ---


def test_train_result_holds_what_the_workdir_holds(finished):
  """A caller reads the run from its TrainResult, never from its files: the recipe of
  config.json, the train windows and final report of metrics.jsonl."""
  _, workdir, result, _ = finished
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.loads(json.dumps(result.recipe.to_dict())) == json.load(f)["recipe"]
  records = _records(workdir)
  windows = [r for r in records if "train/loss" in r]
  assert result.last_step == records[-1]["step"] == STEPS
  assert [w["step"] for w in result.train_history] == [w["step"] for w in windows]
  for window, record in zip(result.train_history, windows):
    assert window["train/loss"] == pytest.approx(record["train/loss"], rel=1e-12)
  assert result.train_metrics == {k: v for k, v in result.train_history[-1].items()
                                  if k != "step"}
  final = {k: v for k, v in records[-1].items() if k != "step" and not k.startswith("eval/")}
  assert result.report == pytest.approx(final, rel=1e-12)
  assert result.eval_metrics == pytest.approx(
      {k[len("eval/"):]: v for k, v in records[-1].items() if k.startswith("eval/")})
  assert result.seconds > 0


def test_config_json_holds_config_and_recipe(finished):
  config, workdir, _, _ = finished
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert set(saved) == {"config", "given", "data", "recipe"}
  assert saved["given"] == {}  # no model, dataset or loss passed as an object
  # The data it trains on (checked on resume): MNIST-1D's arrays, by their digest.
  assert re.fullmatch(rf"arrays of {TRAIN_EXAMPLES} training and {TEST_EXAMPLES} test "
                      r"examples, sha1 [0-9a-f]{16}", saved["data"]["dataset"]), saved["data"]
  assert saved["config"]["model"]["width"] == 8
  assert saved["config"]["train"]["batch_size"] == BATCH
  assert saved["config"]["train"]["num_steps"] == STEPS
  assert saved["config"]["optimizer"]["warmup_epochs"] == WARMUP_EPOCHS
  recipe = saved["recipe"]
  steps_per_epoch = TRAIN_EXAMPLES // BATCH
  assert recipe["steps_per_epoch"] == steps_per_epoch == 62
  assert recipe["total_steps"] == STEPS
  assert recipe["num_devices"] == NUM_DEVICES
  assert recipe["batch_size"] == recipe["effective_batch_size"] == BATCH
  assert recipe["per_device_batch_size"] == BATCH // NUM_DEVICES
  assert recipe["warmup_steps"] == round(WARMUP_EPOCHS * steps_per_epoch) == WARMUP_STEPS
  assert recipe["epochs"] == pytest.approx(STEPS / steps_per_epoch)
  assert recipe["peak_learning_rate"] == pytest.approx(config.optimizer.learning_rate)
  assert recipe["num_train_examples"] == TRAIN_EXAMPLES
  assert recipe["num_test_examples"] == TEST_EXAMPLES
  assert recipe["eval_steps"] == math.ceil(TEST_EXAMPLES / BATCH)


def test_metrics_jsonl_has_train_and_eval_records(finished):
  _, workdir, result, _ = finished
  records = _records(workdir)
  train_records = {r["step"]: r for r in records if "train/loss" in r}
  eval_records = [r for r in records if "eval/loss" in r]
  assert sorted(train_records) == [5, 10]
  # A dense run: every step costs the dense step's FLOPs (the final report's figure).
  step_flops = eval_records[-1]["flops/train_step_dense"]
  assert eval_records[-1]["flops/train_step_sparse"] == step_flops
  for step, record in train_records.items():
    assert set(record) == {"step", "train/loss", "train/accuracy", "train/learning_rate",
                           "train/examples_per_second", "train/data_wait_fraction",
                           "flops/train_total"}, record
    assert record["flops/train_total"] == pytest.approx(step * step_flops, rel=1e-6)
    assert math.isfinite(record["train/loss"]) and record["train/loss"] > 0
    assert 0.0 <= record["train/accuracy"] <= 1.0
    assert record["train/examples_per_second"] > 0
    assert 0.0 <= record["train/data_wait_fraction"] < 1.0
  # eval_every=0: one evaluation, at the end, equal to what train_and_evaluate returned.
  assert len(eval_records) == 1
  (final,) = eval_records
  assert final["step"] == STEPS
  assert set(result.eval_metrics) == {"loss", "accuracy"}
  assert final["eval/loss"] == result.eval_metrics["loss"]
  assert final["eval/accuracy"] == result.eval_metrics["accuracy"]
  assert int(jax.device_get(result.state.step)) == STEPS


def test_tensorboard_events_hold_the_scalars(finished):
  _, workdir, result, _ = finished
  directory = os.path.join(workdir, "tensorboard")
  names = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "**", "*"),
                                                  recursive=True)]
  assert any(n.startswith("events.out.tfevents") for n in names), names
  scalars = _read_tensorboard_scalars(directory)
  jsonl = {r["step"]: r for r in _records(workdir) if "train/loss" in r}
  assert [step for step, _ in scalars["train/loss"]] == [5, 10]
  for step, value in scalars["train/loss"]:
    assert value == pytest.approx(jsonl[step]["train/loss"], rel=1e-6)
  assert [step for step, _ in scalars["train/learning_rate"]] == [5, 10]
  (eval_loss,) = scalars["eval/loss"]
  assert eval_loss == (STEPS, pytest.approx(result.eval_metrics["loss"], rel=1e-6))


def test_checkpoints_at_every_checkpoint_step(finished):
  _, workdir, result, _ = finished
  assert _checkpoint_steps(workdir) == [5, 10]
  items = _restore(workdir, 10)
  assert int(items["step"]) == STEPS
  jax.tree.map(np.testing.assert_array_equal, items["params"],
               jax.device_get(result.state.params))
  assert int(_restore(workdir, 5)["step"]) == 5


# --- 2. The logged learning rate follows the schedule. ---


def test_logged_learning_rate_follows_the_schedule(finished):
  config, workdir, _, _ = finished
  with open(os.path.join(workdir, "config.json")) as f:
    recipe = config_lib.Recipe(**json.load(f)["recipe"])
  schedule = optim.learning_rate_schedule(config, recipe)
  lr = {r["step"]: r["train/learning_rate"] for r in _records(workdir) if "train/loss" in r}
  # A record at step `done` holds the rate of its window's last update: step index done - 1.
  assert lr[5] == pytest.approx(float(schedule(4)), rel=1e-6)
  assert lr[10] == pytest.approx(float(schedule(9)), rel=1e-6)
  # The check tells neighbouring steps (and the window's mean) apart.
  for other in (float(schedule(3)), float(schedule(5)),
                float(np.mean([schedule(i) for i in range(5)]))):
    assert abs(lr[5] - other) > 1e-5, (lr[5], other)
  assert float(schedule(0)) == 0.0  # linear warmup from 0 ...
  assert float(schedule(WARMUP_STEPS)) == pytest.approx(config.optimizer.learning_rate)  # peak


# --- 6a. Console output when stdout is not a terminal. ---


def test_plain_progress_lines_and_final_line(finished):
  _, workdir, result, out = finished
  lines = out.splitlines()
  assert "jaxddp: shard_map on 8 cpu device(s), 1 process(es)" in lines
  assert "resuming" not in out
  progress = [m for m in map(_PLAIN_LINE.match, lines) if m]
  assert [(int(m[1]), int(m[2])) for m in progress] == [(5, STEPS), (10, STEPS)], out
  jsonl = {r["step"]: r for r in _records(workdir) if "train/loss" in r}
  for m in progress:
    record = jsonl[int(m[1])]
    assert float(m[3]) == pytest.approx(record["train/loss"], abs=1e-4)
    assert float(m[4]) == pytest.approx(record["train/accuracy"], abs=1e-4)
  final = lines[-1]
  expected = (f"final test accuracy {result.eval_metrics['accuracy']:.2%} "
              f"(loss {result.eval_metrics['loss']:.4f}) after {STEPS} steps")
  assert final.startswith(expected), final
  assert re.fullmatch(r"final test accuracy \d+\.\d\d% \(loss \d+\.\d{4}\) after 10 steps, "
                      r"\d+\.\ds of training", final), final


# --- 6b. Console output on a terminal: a tqdm bar. ---


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_on_a_terminal_uses_a_bar():
  stream = _Terminal()
  progress = metrics.Progress(10, 0, stream=stream)
  scalars = {"train/loss": 2.3456, "train/accuracy": 0.25, "train/examples_per_second": 1234.0}
  progress.update(5, scalars)
  progress.print("a message")
  progress.update(10, scalars)
  progress.close()
  text = stream.getvalue()
  assert "5/10" in text and "10/10" in text, text
  assert "loss=2.346" in text and "acc=0.25" in text, text
  assert "\r" in text  # redrawn in place
  assert "a message\n" in text
  assert "step 5/10" not in text and "examples/s  ETA" not in text, text


def test_progress_off_a_terminal_prints_lines():
  stream = io.StringIO()
  progress = metrics.Progress(10, 0, stream=stream)
  scalars = {"train/loss": 2.3456, "train/accuracy": 0.25, "train/examples_per_second": 1234.0}
  progress.update(5, scalars)
  progress.update(10, scalars)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and "\r" not in stream.getvalue()
  assert all(_PLAIN_LINE.match(line) for line in lines), lines
  assert lines[0].startswith("step 5/10  loss 2.3456  accuracy 0.2500  1234 examples/s  ETA ")


def test_disabled_progress_prints_nothing():
  stream = _Terminal()
  progress = metrics.Progress(10, 0, enabled=False, stream=stream)
  progress.update(5, {"train/loss": 1.0, "train/accuracy": 0.5,
                      "train/examples_per_second": 1.0})
  progress.print("hidden")
  progress.close()
  assert stream.getvalue() == ""


def test_progress_follows_redirected_stdout(capsys):
  progress = metrics.Progress(10, 0)
  progress.print("hello from progress")
  progress.close()
  assert "hello from progress" in capsys.readouterr().out


# --- 4. Running a finished run again. ---


def test_rerunning_a_finished_run_trains_no_more(finished_copy, capsys):
  config, workdir, first = finished_copy
  checkpoints_before = _snapshot(os.path.join(workdir, "checkpoints"))
  records_before = _records(workdir)
  result = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "resuming from the checkpoint at step 10" in out
  assert not re.search(r"^step \d+/", out, re.M), out  # no training window was logged
  assert int(jax.device_get(result.state.step)) == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params),
               jax.device_get(first.state.params))
  assert result.eval_metrics == first.eval_metrics
  # Nothing trained: no new train records, one more final evaluation, no new checkpoint.
  new = _records(workdir)[len(records_before):]
  assert _records(workdir)[:len(records_before)] == records_before
  assert len(new) == 1 and not any(key.startswith("train/") for key in new[0])
  assert new[0]["step"] == STEPS and new[0]["eval/loss"] == first.eval_metrics["loss"]
  # The FLOPs count picks up where the checkpoint's left it: no step was added.
  assert new[0]["flops/train_total"] == records_before[-1]["flops/train_total"] > 0
  assert _snapshot(os.path.join(workdir, "checkpoints")) == checkpoints_before


def test_rerun_with_a_changed_config_says_what_changed(finished_copy, capsys):
  """Rerunning with train.num_steps 10 -> 12 changes the cosine schedule mid-run: the
  run says so, one line per changed field, before it resumes."""
  config, workdir, _ = finished_copy
  config.train.num_steps = 12
  config.train.log_every = 6
  train.train_and_evaluate(config, workdir)
  lines = capsys.readouterr().out.splitlines()
  changed = [line for line in lines if "changed since" in line]
  assert changed == [
      "config.train.log_every changed since this workdir's config.json: 5 -> 6",
      "config.train.num_steps changed since this workdir's config.json: 10 -> 12"]
  assert lines.index(changed[-1]) < lines.index("resuming from the checkpoint at step 10")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["config"]["train"]["num_steps"] == 12  # the new config is recorded


# --- 3. A checkpoint written with a different config. ---


@pytest.mark.parametrize("field, value, expected", [
    ("model.width", 16, "different model"),
    ("optimizer.name", "adamw", "optimizer"),
], ids=["model", "optimizer"])
def test_resume_with_a_changed_config_is_an_error(finished_copy, field, value, expected):
  config, workdir, _ = finished_copy
  before = _snapshot(workdir)
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    config_json = f.read()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert expected in message, message
  assert os.path.join(workdir, "checkpoints") in message, message
  assert "\n" not in message
  # Nothing in the workdir changed: checkpoints, config.json, metrics, events.
  assert _checkpoint_steps(workdir) == [5, 10]
  assert _snapshot(workdir) == before
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    assert f.read() == config_json


def test_cli_resume_with_a_different_model_exits_2(finished_copy):
  _, workdir, _ = finished_copy
  before = _snapshot(workdir)
  result = run_main(_cli_args(workdir, **{"model.width": 16}))
  _assert_one_error_line(result, 2, "different model", os.path.join(workdir, "checkpoints"))
  assert _snapshot(workdir) == before


# --- 5. A diverging run stops at the first non-finite loss. ---

DIVERGING_LR = 1e3  # diverges within a few steps, after the first checkpoints


def test_non_finite_loss_stops_and_keeps_the_good_checkpoints(tiny_config, tmp_path):
  config = _config(tiny_config)
  config.optimizer.learning_rate = DIVERGING_LR
  config.optimizer.warmup_epochs = 0.0
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = STEPS
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  match = re.search(r"\bat step (\d+)\b", message)
  assert match, message
  bad_step = int(match[1])
  assert 1 <= bad_step <= STEPS
  assert "last good checkpoint" in message and "is kept" in message, message
  assert os.path.join(workdir, "checkpoints") in message, message
  # Every step before the bad one was checkpointed (checkpoint_every=1); none after it.
  steps = _checkpoint_steps(workdir)
  assert steps == list(range(1, bad_step)), (steps, bad_step)
  assert steps, f"diverged at step {bad_step}, before any checkpoint: raise the checkpoint test"
  for step in steps:
    items = _restore(workdir, step)
    assert int(items["step"]) == step
    for leaf in jax.tree.leaves((items["params"], items["batch_stats"])):
      assert np.all(np.isfinite(leaf)), f"non-finite values in the checkpoint at step {step}"
  # Nothing non-finite was logged, and no record is for the bad step or later.
  for record in _records(workdir):
    assert record["step"] < bad_step, record
    assert all(math.isfinite(v) for v in record.values()), record


def test_cli_non_finite_loss_exits_1(tmp_path):
  # Two devices rather than eight: the same stop, compiled faster.
  result = run_main(_cli_args(tmp_path, **{"optimizer.learning_rate": DIVERGING_LR,
                                            "optimizer.warmup_epochs": 0.0,
                                            "parallel.cpu_devices": 2}))
  line = _assert_one_error_line(result, 1, "at step")
  bad_step = int(re.search(r"at step (\d+)", line)[1])
  kept = _checkpoint_steps(tmp_path)
  assert all(step < bad_step for step in kept), line
  # It names the checkpoint kept only if there is one (issue 22: it once claimed one).
  assert ("last good checkpoint" in line) == bool(kept), (line, kept)
  assert ("no checkpoint was written before it" in line) == (not kept), (line, kept)
