"""scripts/gpu_check.py --smoke runs every check on the CPU in tiny shapes, writes the same
figures as JSON and Markdown, and puts the table between README's markers and nowhere else."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
BEFORE = "# A README\n\nText before, kept as it is: ünïcödé, `code`, | pipes |\n\n"
AFTER = "\nText after, kept too.\n\n## Another section\nno final newline"
CHECKS = ["resnet50", "vit_b16", "resnet50_jpeg"]
SMOKE_MODELS = {"resnet50": "cnn", "vit_b16": "vit_b", "resnet50_jpeg": "cnn"}  # --smoke's


def _gpu_check(args, timeout=600):
  return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _readme(tmp_path, old="| old | table |\n|---|---|\nold line\n"):
  path = tmp_path / "README.md"
  path.write_bytes(f"{BEFORE}{BEGIN}\n{old}{END}\n{AFTER}".encode())
  return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One --smoke run of every check (the expensive part, shared by the tests below)."""
  tmp_path = tmp_path_factory.mktemp("gpu_check")
  readme = _readme(tmp_path)
  out = tmp_path / "out"
  completed = _gpu_check(["--smoke", f"--out={out}", f"--readme={readme}"])
  assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
  return completed, json.loads((out / "gpu_check.json").read_text()), \
      (out / "gpu_check.md").read_text(), readme


def _markdown_rows(markdown):
  """The table's rows as {column: cell}."""
  lines = [line for line in markdown.splitlines() if line.startswith("| ")]
  header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
  return [dict(zip(header, (cell.strip() for cell in line.strip("|").split(" | "))))
          for line in lines[1:]]


def test_smoke_measures_every_check(smoke):
  completed, report, markdown, _ = smoke
  rows = report["rows"]
  assert [row["check"] for row in rows] == CHECKS  # one row per check, in order
  for row in rows:
    assert row["error"] is None
    assert row["model"] == SMOKE_MODELS[row["check"]] and row["dtype"] == "bfloat16"
    assert row["batch_size"] == row["per_device_batch_size"] == 8 and row["devices"] == 1
    assert row["image_size"] == 32 and row["device"] == "cpu"
    assert row["images_per_second"] > 0 and row["step_seconds"] > 0
    assert row["images_per_second"] == pytest.approx(8 / row["step_seconds"])
    assert row["mfu"] is None  # a CPU: no known peak
    assert row["seconds"] > 0
    assert f"{row['check']}: start" in completed.stdout
    assert f"{row['check']}: done in" in completed.stdout
  steps = {row["check"]: row for row in rows}
  for name in ("resnet50", "vit_b16"):
    assert steps[name]["step_time_kind"] == "median of 3 steps"
    assert steps[name]["flops_per_step_per_device"] > 0
    assert steps[name]["xla_peak_memory_bytes"] > 0
    assert steps[name]["data_wait_fraction"] is None
  loop = steps["resnet50_jpeg"]
  assert 0 <= loop["data_wait_fraction"] < 1
  assert loop["jpeg_images"] == 24 and loop["jpeg_bytes"] > 0 and loop["loop_steps"] == 4
  assert "total" in completed.stdout.splitlines()[-1]

  # The Markdown table holds the same figures.
  cells = _markdown_rows(markdown)
  assert [cell["check"] for cell in cells] == CHECKS
  for row, cell in zip(rows, cells):
    assert cell["model"] == f"{row['model']} bfloat16 32x32"
    assert cell["device"] == "cpu" and cell["batch"] == "8"
    assert cell["images/s"] == f"{row['images_per_second']:.1f}"
    assert cell["step time"] == f"{row['step_seconds'] * 1e3:.2f} ms ({row['step_time_kind']})"
    assert cell["MFU"] == "-" and cell["peak memory"] == "-"  # no allocator stats on a CPU
    wait = row["data_wait_fraction"]
    assert cell["data wait"] == ("-" if wait is None else f"{wait:.2%}")
    assert cell["time"] == f"{row['seconds']:.0f} s"
  assert "python scripts/gpu_check.py --smoke" in markdown.splitlines()[0]
  assert "cpu" in markdown.splitlines()[0]


def test_smoke_replaces_only_the_text_between_the_markers(smoke):
  _, _, markdown, readme = smoke
  text = readme.read_bytes().decode()
  head, tail = f"{BEFORE}{BEGIN}\n", f"{END}\n{AFTER}"
  assert text.startswith(head) and text.endswith(tail)  # byte for byte
  assert text[len(head):len(text) - len(tail)] == markdown  # the old table is gone
  assert "old line" not in text


def test_a_stopped_check_is_an_error_row_and_the_rest_run_or_are_skipped(tmp_path):
  """--max_seconds stops the running check and skips the rest; nothing succeeded, so the
  README is left as it is."""
  readme = _readme(tmp_path)
  before = readme.read_bytes()
  completed = _gpu_check(["--smoke", "--checks=vit_b16,resnet50", "--max_seconds=1.5",
                          f"--out={tmp_path / 'out'}", f"--readme={readme}"], timeout=120)
  assert completed.returncode == 1, completed.stderr[-3000:]
  rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]
  assert [row["check"] for row in rows] == ["vit_b16", "resnet50"]
  assert rows[0]["error"].startswith("stopped after")
  assert rows[1]["error"].startswith("skipped")
  assert [cell["note"] for cell in _markdown_rows(
      (tmp_path / "out" / "gpu_check.md").read_text())] == [
          "error: " + row["error"] for row in rows]
  assert readme.read_bytes() == before
  assert "no check succeeded" in completed.stdout


def test_readme_without_markers_and_smoke_default_are_left_alone(tmp_path):
  plain = tmp_path / "plain.md"
  plain.write_text("# No markers here\n")
  completed = _gpu_check(["--dry_run", f"--readme={plain}"], timeout=120)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert f"{plain} has no lines {BEGIN} and {END}" in completed.stdout
  assert plain.read_text() == "# No markers here\n"
  completed = _gpu_check(["--smoke", "--dry_run"], timeout=120)
  assert completed.returncode == 0 and "README: not updated" in completed.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["--steps=many"], "flag --steps=many"),
    (["--checks=resnet50,nope"], "unknown nope; the checks are resnet50, vit_b16, resnet50_jpeg"),
    (["--loop_steps=1"], "--loop_steps=1: must be at least 2"),
    (["--jpeg_size=400"], "--jpeg_size='400': use WIDTHxHEIGHT"),
    (["--config=configs/mnist1d.py"], "Unknown command line flag 'config'"),  # benchmark.py's
])
def test_bad_flags_are_one_line_and_exit_2(args, message):
  completed = _gpu_check([*args, "--dry_run"], timeout=120)
  assert completed.returncode == 2
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: ")
  assert message in completed.stderr and "Traceback" not in completed.stderr
