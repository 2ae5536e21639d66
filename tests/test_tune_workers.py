"""jaxddp.tune with several worker processes: two sharing a study on SQLite and on a real
PostgreSQL server, and four packed onto 8 emulated devices. (A file of its own, so that
pytest-xdist runs it beside tests/test_tune.py.)"""

import csv
import json
import subprocess
import sys

import pytest

from conftest import REPO
from test_tune import ended, final_accuracy, load, run_tune, study_config


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
  import pgserver
  server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
  yield server.get_uri()
  server.cleanup()


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_two_workers_share_a_study_of_exactly_num_trials(storage, tmp_path, request):
  """Two worker processes (one emulated device each) against one storage run 8 trials in
  all; a trial's value is what jaxddp.main gives for its config."""
  workdir = tmp_path / "study"
  url = request.getfixturevalue("postgres") if storage == "postgresql" else ""
  config = study_config(devices_per_trial=1, storage=url)
  config.parallel.cpu_devices = 2
  done = run_tune(workdir, config, "--workers=auto")
  assert done.returncode == 0, done.stdout + done.stderr
  study = load(workdir, url)
  trials = ended(study)
  assert len(study.trials) == len(trials) == 8
  assert sorted(t.number for t in trials) == list(range(8))
  assert len({t.user_attrs["workdir"] for t in trials}) == 8
  for trial in trials:  # each ran once, by one worker
    with open(workdir / trial.user_attrs["workdir"] / "attempts.jsonl") as f:
      events = [json.loads(line)["event"] for line in f]
    assert events.count("started") == 1 and len(events) == 2, (trial.number, events)
  workers = {t.user_attrs["worker"].split(" (")[0] for t in trials}
  assert workers == {"worker 0", "worker 1"}, workers
  assert done.stdout.count("trials ended") == 8  # a progress line per trial
  with open(workdir / "trials.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["number"]) for r in rows] == list(range(8))
  assert {r["state"] for r in rows} <= {"complete", "pruned"}
  for name in ("history", "intermediate_values", "parallel_coordinate", "param_importances"):
    assert (workdir / "plots" / f"{name}.png").stat().st_size > 1000, name

  # The best trial's config, rerun by jaxddp.main, gives the best trial's value.
  rerun = tmp_path / "best"
  main = subprocess.run([sys.executable, "-m", "jaxddp.main",
                         f"--config={workdir}/best_config.py", f"--workdir={rerun}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert main.returncode == 0, main.stderr
  assert final_accuracy(rerun) == study.best_value
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["best_trial"] == study.best_trial.number
  assert summary["complete"] + summary["pruned"] == 8


def test_eight_devices_packed_two_per_trial_run_four_trials_at_once(tmp_path):
  config = study_config(num_trials=4, devices_per_trial=2, pruner="none")
  config.parallel.cpu_devices = 8
  config.train.eval_every = 0
  workdir = tmp_path / "study"
  done = run_tune(workdir, config, "--workers=auto")
  assert done.returncode == 0, done.stdout + done.stderr
  study = load(workdir)
  assert len(ended(study)) == 4
  groups, spans = [], []
  for trial in study.trials:
    trial_dir = workdir / trial.user_attrs["workdir"]
    recipe = json.loads((trial_dir / "config.json").read_text())["recipe"]
    assert recipe["num_devices"] == 2
    # "cpu 0,1 (host devices 2,3 of 0-7)": the process's devices, and which of the host's.
    groups.append(recipe["devices"].split("host devices ")[1].split(" of")[0])
    with open(trial_dir / "attempts.jsonl") as f:
      times = {a["event"]: a["time"] for a in map(json.loads, f)}
    spans.append((times["started"], times["complete"]))
  assert sorted(groups) == ["0,1", "2,3", "4,5", "6,7"]  # four groups, no device shared
  assert max(start for start, _ in spans) < min(end for _, end in spans)  # all four at once
