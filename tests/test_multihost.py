"""Multi-process training with real processes on this machine.

Each multi-process run goes through scripts/launch_local.py: N processes of
`python -m jaxddp.main`, each with 2 emulated CPU devices, joined by JAX's
distributed runtime on 127.0.0.1 and talking over gloo. They are compared with
one process that has as many devices (4), which the other tests already tie to
one device.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, make_tiny_config, run_main
from jaxddp import data, models, train

LAUNCHER = os.path.join(REPO, "scripts", "launch_local.py")
TINY = ["--config=configs/mnist1d.py", "--config.model.width=8", "--config.train.batch_size=64",
        "--config.optimizer.learning_rate=0.01"]


def _launch_command(num_processes, args):
  return [sys.executable, LAUNCHER, "-n", str(num_processes), "--",
          sys.executable, "-m", "jaxddp.main", *args, "--config.parallel.cpu_devices=2"]


def launch(num_processes, args, timeout=300):
  """Runs jaxddp.main in `num_processes` processes of 2 CPU devices each."""
  return subprocess.run(_launch_command(num_processes, args), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def _records(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if key in r]


def _assert_same_eval(a, b, num_examples=1000):
  """Same final eval metrics: loss to float32 reduction-order noise, accuracy to one example."""
  print(f"final eval loss {a['eval/loss']:.6f} vs {b['eval/loss']:.6f} (relative difference "
        f"{abs(a['eval/loss'] - b['eval/loss']) / b['eval/loss']:.1e}), accuracy "
        f"{a['eval/accuracy']:.3f} vs {b['eval/accuracy']:.3f}")
  assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-4)
  assert abs(a["eval/accuracy"] - b["eval/accuracy"]) <= 1 / num_examples + 1e-9


# --- Two processes x 2 devices train like one process x 4 devices. ---

@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_two_processes_equal_one_process(tmp_path, backend):
  steps = ["--config.train.num_steps=10", "--config.train.log_every=1",
           f"--config.parallel.backend={backend}"]
  two = launch(2, [*TINY, *steps, f"--workdir={tmp_path / 'two'}"])
  assert two.returncode == 0, two.stderr[-3000:]
  assert "2 process(es)" in two.stdout and "[0] jaxddp: " in two.stdout
  assert "[1] jaxddp: " not in two.stdout, "only process 0 reports progress"
  assert not os.path.exists(tmp_path / "two" / "metrics.jsonl.1")

  config = make_tiny_config()
  config.train.num_steps, config.train.log_every = 10, 1
  config.parallel.cpu_devices, config.parallel.backend = 4, backend
  train.train_and_evaluate(config, str(tmp_path / "one"))

  losses_two = np.array([r["train/loss"] for r in _records(tmp_path / "two", "train/loss")])
  losses_one = np.array([r["train/loss"] for r in _records(tmp_path / "one", "train/loss")])
  assert len(losses_two) == len(losses_one) == 10
  rel = np.abs(losses_two - losses_one) / losses_one
  print(f"{backend}: max per-step relative loss difference, 2x2 vs 1x4: {rel.max():.2e}")
  assert rel.max() <= 1e-4, rel
  assert losses_one[-1] < losses_one[0]
  _assert_same_eval(_records(tmp_path / "two", "eval/loss")[-1],
                    _records(tmp_path / "one", "eval/loss")[-1])


# --- Uneven evaluation shards: every example once, no hang. ---

def test_uneven_eval_shards_count_every_example_once(tmp_path):
  # 1000 test examples in global eval batches of 48 (24 per process): the last batch
  # holds 40 examples, 24 on process 0 and 16 (+ 8 padding) on process 1.
  workdir = tmp_path / "run"
  args = ["--config=configs/mnist1d.py", "--config.model.width=8", "--config.train.batch_size=64",
          "--config.train.num_steps=60", "--config.train.log_every=60",
          "--config.train.eval_batch_size=48", f"--workdir={workdir}"]
  completed = launch(2, args, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  reported = _records(workdir, "eval/loss")[-1]

  config = make_tiny_config()
  dataset = data.embedded.mnist1d()
  assert len(dataset.test_x) % 48 != 0
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    # Written by 2 processes: restoring here needs a target on this process's devices.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(60).tree)
    items = jax.device_get(manager.restore(60, args=ocp.args.StandardRestore(target)))
  model = models.create_model(config, dataset.num_classes)
  logits = np.asarray(model.apply({"params": items["params"], "batch_stats": items["batch_stats"]},
                                  jnp.asarray(dataset.test_x), train=False), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  losses = -log_probs[np.arange(len(dataset.test_y)), dataset.test_y]
  # A missing or doubled example moves the mean by ~std/1000, far above the tolerance.
  assert losses.std() > 0.1
  print(f"2 processes reported eval loss {reported['eval/loss']:.6f}, accuracy "
        f"{reported['eval/accuracy']:.4f}; per-example reference {losses.mean():.6f}, "
        f"{(logits.argmax(-1) == dataset.test_y).mean():.4f}")
  assert reported["eval/loss"] == pytest.approx(losses.mean(), rel=1e-5)
  assert reported["eval/accuracy"] == pytest.approx((logits.argmax(-1) == dataset.test_y).mean(),
                                                    abs=1e-9)


# --- Checkpoints move between topologies. ---

# Short runs: past ~50 steps the float32 rounding differences between topologies
# (1e-8 at step 10) grow to 1e-4, and would hide a resume that lost something.
RESUME_STEPS = 40
RESUME = [*TINY, f"--config.train.num_steps={RESUME_STEPS}", "--config.train.checkpoint_every=5",
          "--config.train.log_every=5"]


@pytest.fixture(scope="module")
def uninterrupted_1x4(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  completed = run_main([*RESUME, f"--workdir={workdir}", "--config.parallel.cpu_devices=4"])
  assert completed.returncode == 0, completed.stderr
  return _records(workdir, "eval/loss")[-1]


def _latest_step(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    return manager.latest_step()


def test_killed_rank_stops_the_launcher_and_the_run_resumes_on_one_process(
    tmp_path, uninterrupted_1x4):
  launcher = subprocess.Popen(_launch_command(2, [*RESUME, f"--workdir={tmp_path}"]), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  pids = None
  for line in launcher.stderr:  # "launch_local: pids: rank 0 = 123, rank 1 = 124"
    if "pids:" in line:
      pids = {int(r): int(p) for r, p in re.findall(r"rank (\d+) = (\d+)", line)}
      break
  assert pids and len(pids) == 2
  checkpoints = os.path.join(tmp_path, "checkpoints")
  deadline = time.time() + 240
  while not (os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))):
    assert launcher.poll() is None and time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  os.kill(pids[1], signal.SIGKILL)
  killed_at = time.time()
  _, stderr = launcher.communicate(timeout=120)
  elapsed = time.time() - killed_at
  print(f"the launcher exited {elapsed:.1f} s after rank 1 was killed")
  assert elapsed < 60
  assert launcher.returncode != 0
  # "...; stopping the other ranks", unless rank 0 had already failed its next collective
  # and exited by the time the launcher looked: then every rank is gone and it says so.
  assert "launch_local: rank 1 was killed by SIGKILL" in stderr
  with pytest.raises(ProcessLookupError):
    os.kill(pids[0], 0)  # rank 0 is gone too
  stopped_at = _latest_step(tmp_path)
  assert 0 < stopped_at < RESUME_STEPS

  resumed = run_main([*RESUME, f"--workdir={tmp_path}", "--config.parallel.cpu_devices=4"])
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming from the checkpoint at step {stopped_at}" in resumed.stdout
  assert "1 process(es)" in resumed.stdout
  _assert_same_eval(_records(tmp_path, "eval/loss")[-1], uninterrupted_1x4)


def test_one_process_stopped_resumes_on_two(tmp_path, uninterrupted_1x4):
  process = subprocess.Popen(
      [sys.executable, "-m", "jaxddp.main", *RESUME, f"--workdir={tmp_path}",
       "--config.parallel.cpu_devices=4"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith("step 5/"):  # a single process stops after the step it is in
      break
  process.send_signal(signal.SIGTERM)
  process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGTERM
  stopped_at = _latest_step(tmp_path)
  assert 0 < stopped_at < RESUME_STEPS

  resumed = launch(2, [*RESUME, f"--workdir={tmp_path}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"[0] resuming from the checkpoint at step {stopped_at}" in resumed.stdout
  assert "2 process(es)" in resumed.stdout
  _assert_same_eval(_records(tmp_path, "eval/loss")[-1], uninterrupted_1x4)


def test_sigterm_to_the_launcher_stops_every_process_after_the_same_step(tmp_path):
  launcher = subprocess.Popen(
      _launch_command(2, [*TINY, "--config.train.num_steps=100000", "--config.train.log_every=10",
                          f"--workdir={tmp_path}"]),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in launcher.stdout:
    if line.startswith("[0] step 10/"):
      break
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=120)
  assert launcher.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  stopped = re.findall(r"\[(\d)\] jaxddp: stopped by SIGTERM after step (\d+)", stderr)
  assert len(stopped) == 1 and stopped[0][0] == "0", "process 0 reports the stop, once"
  assert _latest_step(tmp_path) == int(stopped[0][1])


# --- Failures end the run; they never leave a process waiting. ---

def _free_port():
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _process_env(address, rank, num_processes=2):
  return dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
              JAX_PROCESS_ID=str(rank), PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_without_launcher_a_dead_or_frozen_peer_stops_the_others(tmp_path, sig):
  # Started one by one, as a cluster scheduler would. A dead peer fails the next
  # collective; a frozen one (SIGSTOP: no heartbeats either) is noticed by JAX's
  # heartbeat check, here after 5 s.
  address = f"127.0.0.1:{_free_port()}"
  args = [sys.executable, "-m", "jaxddp.main", *TINY, "--config.train.num_steps=100000",
          "--config.train.log_every=10", "--config.parallel.cpu_devices=2",
          "--config.distributed.heartbeat_timeout=5", f"--workdir={tmp_path}"]
  processes = [subprocess.Popen(args, cwd=REPO, env=_process_env(address, rank), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for rank in range(2)]
  for line in processes[0].stdout:
    if line.startswith("step "):
      break
  processes[1].send_signal(sig)
  killed_at = time.time()
  _, stderr = processes[0].communicate(timeout=120)
  elapsed = time.time() - killed_at
  processes[1].kill()
  processes[1].communicate()
  print(f"process 0 exited {elapsed:.1f} s after process 1 got {sig.name}")
  assert elapsed < 60
  assert processes[0].returncode != 0
  assert re.search(r"another (task|process) (died|has probably died)", stderr), stderr[-2000:]


@pytest.mark.parametrize("cluster", ["slurm", "ompi"])
def test_cluster_detection_starts_a_multi_process_run(tmp_path, cluster):
  # What srun and mpirun put in each task's environment, on this one machine.
  def environment(rank):
    if cluster == "slurm":
      variables = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
                   "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
    else:
      variables = {"OMPI_MCA_orte_hnp_uri": "4096.0;tcp://127.0.0.1:1",
                   "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(rank),
                   "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR_ADDRESS",
                                                                     "JAX_NUM", "JAX_PROCESS"))}
    return dict(env, **variables, JAX_COORDINATOR_PORT=str(port))

  port = _free_port()
  args = [sys.executable, "-m", "jaxddp.main", *TINY, "--config.train.num_steps=5",
          "--config.parallel.cpu_devices=2", f"--workdir={tmp_path}"]
  processes = [subprocess.Popen(args, cwd=REPO, env=environment(rank), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for rank in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:]
  assert "jaxddp: shard_map on 4 cpu device(s), 2 process(es)" in outputs[0][0]
  assert "final test accuracy" in outputs[0][0] and "final test accuracy" not in outputs[1][0]


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
  address = f"127.0.0.1:{_free_port()}"  # nobody listens there
  completed = run_main(["--config=configs/mnist1d.py", f"--workdir={tmp_path}",
                        "--config.distributed.initialization_timeout=2"],
                       env=_process_env(address, rank=1))
  assert completed.returncode == 1
  assert completed.stderr.strip() == (
      f"jaxddp: error: [process 1] could not reach the coordinator at {address} within 2 s "
      "(config.distributed.initialization_timeout): is process 0 running, and is that address "
      "and port reachable from this host?")


def test_missing_process_is_a_clear_error(tmp_path):
  completed = run_main(["--config=configs/mnist1d.py", f"--workdir={tmp_path}",
                        "--config.distributed.initialization_timeout=3"],
                       env=_process_env(f"127.0.0.1:{_free_port()}", rank=0))
  assert completed.returncode == 1
  assert completed.stderr.strip().splitlines()[-1] == (
      "jaxddp: error: [process 0] not all 2 processes joined the distributed runtime within 3 s "
      "(config.distributed.initialization_timeout); check that every process was started with "
      "the same coordinator address and process count")


def test_launcher_blames_the_killed_rank_when_several_fail_at_once():
  """A rank killed by a signal is the cause; ranks that then failed a collective are not."""
  import importlib.util
  import types
  spec = importlib.util.spec_from_file_location("launch_local", LAUNCHER)
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  ranks = [types.SimpleNamespace(returncode=code) for code in (1, -9, 0, None, 2)]
  assert launcher._failed_ranks(ranks) == [1, 0, 4]


def test_errors_name_their_process(tmp_path):
  completed = launch(2, [*TINY, "--config.train.batch_size=102", f"--workdir={tmp_path}"])
  assert completed.returncode == 2
  for rank in range(2):
    assert (f"[{rank}] jaxddp: error: [process {rank}/2] config.train.batch_size=102 is not "
            "divisible by the 4 devices") in completed.stderr
  assert "launch_local: rank" in completed.stderr


# --- Where a process sits: config, environment, cluster. ---

def _settings(environ, **distributed):
  from jaxddp import distributed as distributed_lib
  config = make_tiny_config()
  config.distributed.update(distributed)
  return distributed_lib.launch_settings(config, environ)


SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8",
         "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


def test_launch_settings():
  from jaxddp.distributed import Launch
  assert _settings({}) == Launch("none")
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2"}
  assert _settings(env) == Launch("explicit", "10.0.0.1:1234", 4, 2)
  # The config beats the environment.
  assert _settings(env, process_id=3, local_device_ids="0,1") == Launch(
      "explicit", "10.0.0.1:1234", 4, 3, [0, 1])
  assert _settings(dict(env, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")) == Launch("none")
  # Clusters: JAX reads the rest from their variables.
  assert _settings(SLURM) == Launch("slurm", None, None, 5)
  assert _settings(SLURM, local_device_ids="all") == Launch("slurm", None, None, 5, [])
  assert _settings(dict(SLURM, SLURM_NTASKS="1")) == Launch("none")
  assert _settings(OMPI) == Launch("ompi", None, None, 3)
  assert _settings(SLURM, cluster="none") == Launch("none")
  assert _settings({"KUBERNETES_SERVICE_HOST": "10.0.0.9"}) == Launch("none")


@pytest.mark.parametrize("environ, distributed, message", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {},
     "a coordinator is given (10.0.0.1:1234) but not config.distributed.num_processes (or "
     "JAX_NUM_PROCESSES); an explicit launch needs all three"),
    ({}, {"coordinator_address": "10.0.0.1", "num_processes": 2, "process_id": 0},
     "config.distributed.coordinator_address='10.0.0.1' needs a port, e.g. 10.0.0.1:1234"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, {},
     "config.distributed.process_id=2 is not in [0, 2) (num_processes=2)"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, {},
     "JAX_NUM_PROCESSES='two' (the environment's value of config.distributed.num_processes) "
     "is not an integer"),
    ({}, {"local_device_ids": "gpu0"},
     "config.distributed.local_device_ids='gpu0' is not valid; use '' (JAX's default), 'all', "
     "or device numbers such as '0,1,2,3'"),
    ({}, {"cluster": "slurm"},
     "config.distributed.cluster='slurm' but this process was not started by srun "
     "(SLURM_STEP_NODELIST, SLURM_PROCID, ... are not set)"),
])
def test_launch_settings_errors(environ, distributed, message):
  from jaxddp.config import ConfigError
  with pytest.raises(ConfigError) as error:
    _settings(environ, **distributed)
  assert str(error.value) == message


def test_kubernetes_needs_its_package_or_explicit_settings(monkeypatch):
  from jaxddp.config import ConfigError
  monkeypatch.setitem(sys.modules, "kubernetes", None)  # `import kubernetes` fails
  with pytest.raises(ConfigError, match=r"pip install 'jax\[k8s\]'; or set JAX_COORDINATOR"):
    _settings({"KUBERNETES_SERVICE_HOST": "10.0.0.9"}, cluster="k8s")


def test_watchdog_ends_a_stuck_process_and_spares_a_live_one():
  code = """
import sys, time
from jaxddp.distributed import Watchdog
with Watchdog(1.0, "nothing happened", "process 1/2") as watchdog:
  for _ in range(30):  # 3 s of progress, petted every 0.1 s: no alarm
    time.sleep(0.1)
    watchdog.pet()
  print("alive", flush=True)
  time.sleep(30)  # stuck
"""
  start = time.time()
  completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
  assert completed.returncode == 1
  assert completed.stdout == "alive\n"
  assert completed.stderr == "jaxddp: error: [process 1/2] nothing happened\n"
  assert time.time() - start < 20
