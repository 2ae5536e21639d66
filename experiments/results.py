"""results.csv of an experiment: one row per finished run, appended as runs finish,
so an interrupted sweep continues where it stopped."""

from __future__ import annotations

import csv
import os
from typing import Callable


def read_rows(path: str) -> list[dict[str, str]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(csv.DictReader(f))


def finished(path: str, key: Callable[[dict[str, str]], tuple]) -> set[tuple]:
  """The keys of the runs already in `path`."""
  return {key(row) for row in read_rows(path)}


def append_row(path: str, fields: list[str], row: dict) -> None:
  new_file = not os.path.exists(path)
  with open(path, "a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    if new_file:
      writer.writeheader()
    writer.writerow(row)
