r"""A cascade of a cheap and a large model on MNIST-1D: accuracy against inference FLOPs.

    python -m experiments.cascade --config=configs/mnist1d.py --out=runs/cascade \
        --config.dataset.num_train_examples=8000 --validation_examples=4000

The last --validation_examples of the config's training set are held out: both
models (the config's model at --cheap_width and at --large_width) train on the rest,
in OUT/cheap and OUT/large (or --cheap_workdir / --large_workdir; a finished run there
is reused, one made with another config or on other examples is refused). With the
command above they train on the standard 4000 and the held-out 4000 are fresh MNIST-1D
examples.

Both models' logits on every validation and test example, each exactly once,
come from jaxddp.evaluate.split_outputs (data-parallel over the
config's devices). For each threshold t of --thresholds the cheap model answers where
its top softmax probability is at least t and the large model answers the rest
(jaxddp.cascade). The threshold is chosen on the validation slice, never on the
test set: the cheapest (fewest inference FLOPs per example) whose validation accuracy
is within --tolerance of the large model's.

Writes OUT/cascade.csv (split, threshold, accuracy, fraction deferred, FLOPs per
example), OUT/summary.json, OUT/test_outputs.npz (per-example labels and both
models' logits on the test set) and OUT/cascade.png. --quick: tiny runs, for tests.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import common
from experiments.common import Error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config, e.g. configs/mnist1d.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_CHEAP_WIDTH = flags.DEFINE_integer("cheap_width", 8, "config.model.width of the cheap model.")
_LARGE_WIDTH = flags.DEFINE_integer("large_width", 64, "config.model.width of the large model.")
_CHEAP_WORKDIR = flags.DEFINE_string("cheap_workdir", None, "The cheap run (default OUT/cheap).")
_LARGE_WORKDIR = flags.DEFINE_string("large_workdir", None, "The large run (default OUT/large).")
_VALIDATION = flags.DEFINE_integer("validation_examples", 4000,
                                   "Training examples held out to choose the threshold.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.001,
                                "Accuracy the cascade may lose against the large model (0.001 "
                                "= 0.1 points).")
_THRESHOLDS = flags.DEFINE_integer("thresholds", 200, "Thresholds in [0, 1] (and one above 1).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny runs: a smoke test.")


# More thresholds than test examples tell nothing new, and each costs a sweep over them.
MAX_THRESHOLDS = 100_000


def _model_config(base, width: int):
  return common.quiet(base, **{"model.width": width})


def _split(dataset, validation: int):
  """(training part, validation part) of an ArrayDataset: the last `validation` held out."""
  from jaxddp import data
  if not isinstance(dataset, data.ArrayDataset):
    raise Error("cascade.py holds out part of an in-memory training set (ArrayDataset); "
                f"{type(dataset).__name__} is not one")
  n = dataset.num_train_examples
  if not 0 < validation < n:
    raise Error(f"--validation_examples={validation} must be between 1 and {n - 1} (the "
                f"training set has {n}; for MNIST-1D, raise "
                "--config.dataset.num_train_examples to hold out fresh examples)")
  keep = n - validation
  make = lambda x, y, name: data.ArrayDataset(x, y, dataset.test_x, dataset.test_y,
                                              dataset.num_classes, name=name,
                                              max_shift=dataset.max_shift)
  return (make(dataset.train_x[:keep], dataset.train_y[:keep], f"{dataset.name}[:{keep}]"),
          make(dataset.train_x[keep:], dataset.train_y[keep:], f"{dataset.name}[{keep}:]"))


def _check_workdir(workdir: str, config, training, flag: str) -> None:
  """Refuses a run made with another config, or on other examples: resuming it would
  train further on a schedule that is not this one's."""
  from jaxddp import train
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  # A run of an earlier invocation (or another script), read before this one trains on:
  # its config.json is the only record of what it trained on.
  with open(path) as f:
    trained_on = json.load(f)["recipe"]["num_train_examples"]
  changes = train.config_changes(workdir, config, {"dataset": train.describe(training)})
  if trained_on != training.num_train_examples:
    changes.insert(0, f"it trained on {trained_on} examples, not the first "
                      f"{training.num_train_examples}")
  if changes:
    raise Error(f"{flag}={workdir} holds another run ({changes[0]}); give another --out or "
                f"{flag}")


def _logits(config, state, dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"validation" / "test": (logits, labels)} for every example of dataset's training
  split (the held-out slice) and test split, each exactly once."""
  from jaxddp import evaluate, train
  run = train.setup(config, dataset=dataset)
  result = {}
  for name, split in (("validation", "train"), ("test", "test")):
    out = evaluate.split_outputs(run, state, split, ("logits",))
    result[name] = out["logits"], out["label"]
  return result


class Model:
  """A trained member of the cascade: its logits on validation and test, its FLOPs."""

  def __init__(self, base, width: int, workdir: str, training, validation):
    import jax

    from jaxddp import scaling, train
    from jaxddp.state import local_value
    config = _model_config(base, width)
    result = train.train_and_evaluate(config, workdir, dataset=training)
    state = jax.tree.map(local_value, result.state)
    self.width, self.workdir = width, workdir
    self.run_test_accuracy = result.eval_metrics["accuracy"]
    logits = _logits(config, state, validation)
    self.validation_logits, self.validation_labels = logits["validation"]
    self.test_logits, self.test_labels = logits["test"]
    self.flops = scaling.model_cost(config, training.input_shape,
                                    training.num_classes).forward_flops


def plot(rows: list[dict], summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5))
  for split, style in (("test", dict(color="C0", lw=1.5)),
                       ("validation", dict(color="C0", lw=1, ls=":"))):
    points = sorted((r["flops"], r["accuracy"] * 100) for r in rows if r["split"] == split)
    ax.plot(*zip(*points), label=f"cascade, thresholds 0 to 1 ({split})", **style)
  for name, marker in (("cheap", "o"), ("large", "s")):
    model = summary[name]
    ax.scatter([model["flops"]], [model["test_accuracy"] * 100], marker=marker, s=70, zorder=3,
               color="black", label=f"{name} model alone (width {model['width']}, test)")
  chosen = summary["chosen"]
  what = ("the large model alone" if chosen["threshold"] is None
          else f"threshold {chosen['threshold']:.3f}")
  ax.scatter([chosen["test_flops"]], [chosen["test_accuracy"] * 100], marker="*", s=200,
             color="C3", zorder=4, label=f"{what}, chosen on validation (test)")
  ax.set(xscale="log", xlabel="inference FLOPs per example", ylabel="accuracy (%)",
         title="cheap model answers when its top probability >= t, else the large one")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small", loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _workdirs(out: str) -> dict[str, str]:
  """{"cheap": ..., "large": ...}: the flags' or OUT/cheap and OUT/large, checked to be
  usable and distinct before anything trains."""
  from jaxddp.workdir import checked
  flags_given = {"cheap": _CHEAP_WORKDIR.value, "large": _LARGE_WORKDIR.value}
  out = checked(out, "--out")
  workdirs = {name: checked(given, f"--{name}_workdir") if given is not None else
              os.path.join(out, name) for name, given in flags_given.items()}
  if os.path.abspath(workdirs["cheap"]) == os.path.abspath(workdirs["large"]):
    raise Error(f"--cheap_workdir and --large_workdir are both {workdirs['cheap']}; the two "
                "models need a directory each")
  return workdirs


def run(cheap_width: int, large_width: int, validation: int) -> None:
  from jaxddp import cascade, data, scaling
  from jaxddp import config as config_lib
  base, out = _CONFIG.value, _OUT.value
  config_lib.validate(base)
  training, held_out = _split(data.load_dataset(base), validation)
  workdirs = _workdirs(out)
  flops = {name: scaling.model_cost(_model_config(base, width), training.input_shape,
                                    training.num_classes).forward_flops
           for name, width in (("cheap", cheap_width), ("large", large_width))}
  if flops["cheap"] >= flops["large"]:
    raise Error(f"--cheap_width={cheap_width} costs {flops['cheap'] / 1e6:.3f} MFLOPs per "
                f"example, not less than --large_width={large_width} "
                f"({flops['large'] / 1e6:.3f}): the cheap model must be the smaller one")
  for name, workdir in workdirs.items():
    _check_workdir(workdir, _model_config(base, cheap_width if name == "cheap" else large_width),
                   training, f"--{name}_workdir")
  common.out_dir(out)
  cheap = Model(base, cheap_width, workdirs["cheap"], training, held_out)
  large = Model(base, large_width, workdirs["large"], training, held_out)
  thresholds = [*np.linspace(0.0, 1.0, _THRESHOLDS.value + 1), 1.01]
  sweeps = {split: cascade.sweep(getattr(cheap, f"{split}_logits"),
                                 getattr(large, f"{split}_logits"),
                                 getattr(cheap, f"{split}_labels"), thresholds, cheap.flops,
                                 large.flops) for split in ("validation", "test")}
  large_validation = sweeps["validation"][-1].accuracy  # t > 1: the large model's answers
  chosen = cascade.cheapest_within(sweeps["validation"], large_validation, _TOLERANCE.value)
  on_test = sweeps["test"][thresholds.index(chosen.threshold)]
  if chosen.flops >= large.flops:  # no threshold saves anything: the large model alone
    chosen = cascade.Point(math.inf, large_validation, 1.0, large.flops)
    on_test = cascade.Point(math.inf, sweeps["test"][-1].accuracy, 1.0, large.flops)
  models = {name: {"width": m.width, "workdir": m.workdir, "flops": m.flops,
                   "validation_accuracy": sweeps["validation"][0 if name == "cheap" else -1]
                   .accuracy, "test_accuracy": sweeps["test"][0 if name == "cheap" else -1]
                   .accuracy, "run_test_accuracy": m.run_test_accuracy}
            for name, m in (("cheap", cheap), ("large", large))}
  summary = {**models, "validation_examples": validation, "test_examples": len(cheap.test_labels),
             "tolerance": _TOLERANCE.value,
             "chosen": {"threshold": chosen.threshold if math.isfinite(chosen.threshold)
                        else None,  # None: the large model alone
                        "validation_accuracy": chosen.accuracy,
                        "validation_deferred": chosen.deferred,
                        "test_accuracy": on_test.accuracy, "test_deferred": on_test.deferred,
                        "test_flops": on_test.flops,
                        "flops_saved": 1 - on_test.flops / large.flops}}
  rows = [{"split": split, "threshold": p.threshold, "accuracy": p.accuracy,
           "deferred": p.deferred, "flops": p.flops}
          for split, points in sweeps.items() for p in points]
  path = os.path.join(out, "cascade.csv")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  np.savez(os.path.join(out, "test_outputs.npz"), labels=cheap.test_labels,
           cheap_logits=cheap.test_logits, large_logits=large.test_logits,
           large_labels=large.test_labels)
  plot(rows, summary, os.path.join(out, "cascade.png"))
  for name in ("cheap", "large"):
    m = summary[name]
    print(f"{name} model (width {m['width']}): {m['flops'] / 1e6:.3f} MFLOPs per example, "
          f"accuracy {m['validation_accuracy']:.2%} validation, {m['test_accuracy']:.2%} test")
  c = summary["chosen"]
  if c["threshold"] is None:
    print(f"cascade: no threshold within {_TOLERANCE.value:.1%} of the large model on "
          f"{validation} validation examples costs less than the large model alone: use it")
  else:
    print(f"cascade: threshold {c['threshold']:.3f} (the cheapest within "
          f"{_TOLERANCE.value:.1%} of the large model on {validation} validation examples): "
          f"test accuracy {c['test_accuracy']:.2%}, {c['test_deferred']:.1%} deferred, "
          f"{c['test_flops'] / 1e6:.3f} MFLOPs per example, {c['flops_saved']:.1%} fewer than "
          "the large model alone")
  print(f"wrote {path}, {os.path.join(out, 'summary.json')} and "
        f"{os.path.join(out, 'cascade.png')}")


def main() -> None:
  if _CONFIG.value is None or not _OUT.value:
    raise Error("--config and --out are required")
  widths = (_CHEAP_WIDTH.value, _LARGE_WIDTH.value)
  validation = _VALIDATION.value
  if min(widths) < 1:
    raise Error(f"--cheap_width={widths[0]} and --large_width={widths[1]} must be at least 1")
  if not 1 <= _THRESHOLDS.value <= MAX_THRESHOLDS or not 0 <= _TOLERANCE.value < 1:
    raise Error(f"--thresholds={_THRESHOLDS.value} must be in [1, {MAX_THRESHOLDS}] and "
                f"--tolerance={_TOLERANCE.value} in [0, 1)")
  if _QUICK.value:  # these replace the flags of the same names
    _CONFIG.value.train.num_steps, _CONFIG.value.train.batch_size = 20, 32
    widths, validation = (2, 8), 500
  run(*widths, validation)


if __name__ == "__main__":
  common.run("cascade.py", main)
