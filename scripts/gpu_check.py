r"""The GPU measurements of jaxddp in one command, sized for a short GPU lease (< 8 minutes).

    python scripts/gpu_check.py                      # all checks, on the GPU(s) JAX sees
    python scripts/gpu_check.py --checks=vit_b16     # some of them
    python scripts/gpu_check.py --dry_run            # what would run; nothing runs
    python scripts/gpu_check.py --smoke              # tiny shapes on a CPU (tests)

Checks (--checks, in this order; CHECKS below):

* resnet50: ResNet-50 (configs/imagenet.py, model.dtype=bfloat16) on random 224x224
  images, 256 per device: jaxddp's compiled training step, timed as
  scripts/benchmark.py times it (--warmup untimed steps, then the median of --steps);
* vit_b16: ViT-B/16 (configs/imagenet_vit.py, model.name=vit_b, bfloat16), the same way;
* resnet50_jpeg: ResNet-50 in bfloat16 trained by the real loop
  (jaxddp.train.train_and_evaluate, --loop_steps steps) from a folder of --jpeg_images
  random JPEGs of about --jpeg_size pixels (dataset.name=image_folder, read, decoded and
  cropped by jaxddp's tfds pipeline): images/s and train/data_wait_fraction of its last
  logging window.

Each row: images/s, step time, MFU (XLA's FLOPs per step from the compiled step's cost
analysis / step time / the device's peak FLOP/s for the compute dtype; "-" where the
peak is unknown, e.g. on a CPU), the allocator's peak device memory (GPUs), XLA's
estimate of the step's peak memory, the data-wait fraction (the loop), the device.

Each check runs in a process of its own: the allocator's peak is then that check's,
and a check that fails or crashes becomes an error row while the next one runs. The
whole run stops at --max_seconds (450 s): the check running then is stopped, the rest
skipped. The results are written whatever happened: OUT/gpu_check.json and OUT/gpu_check.md, and
the same table between the lines <!-- gpu-check:begin --> and <!-- gpu-check:end --> of
--readme (README.md; with --smoke, none unless given), if some check succeeded.
Exit status: 0 if every check succeeded, 1 if one failed, 2 for bad flags.

A new check is a function (Settings -> list of row dicts, see _step_row) and an entry
in CHECKS. Compiled programs are cached in $JAX_COMPILATION_CACHE_DIR (default: a
folder in the temporary directory), so a second run on the same machine compiles
little.
"""

from __future__ import annotations

import os

# TensorFlow (jaxddp's tfds pipeline) stays quiet; set before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

from absl import flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/benchmark.py; it also puts the repository on sys.path)

REPO = benchmark.REPO
SCRIPT = "gpu_check.py"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"

# gpu_check's flags live apart from absl's global FLAGS, where importing benchmark.py
# defined its own (--steps, --warmup, --config, ...): no name can collide, and those
# of benchmark.py are unknown flags here, not silently ignored ones.
FLAGS = flags.FlagValues()
_CHECKS = flags.DEFINE_list("checks", None, "Checks to run, comma-separated (default: all).",
                            flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "runs/gpu_check",
                           "Folder for gpu_check.json, gpu_check.md (and error tracebacks).",
                           flag_values=FLAGS)
_README = flags.DEFINE_string(
    "readme", None, "File whose text between the gpu-check marker lines becomes the table "
    f"(default: {os.path.join(REPO, 'README.md')}; with --smoke: none); empty: none.",
    flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny models and shapes on a CPU, for tests (the "
                           "'--smoke:' defaults of the other flags); no README unless --readme.",
                           flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the flags and the README markers, print "
                             "the plan, run nothing.", flag_values=FLAGS)
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds", None, "Time limit of the whole run (default 450; --smoke: 600): the check "
    "running then is stopped, the rest skipped.", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", None, "Batch per device (default 256; --smoke: 8).",
                              flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Side of the (square) training images "
                                   "(default 224; --smoke: 32).", flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed steps first, compilation included "
                               "(default 5; --smoke: 1).", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps of resnet50 and vit_b16 "
                              "(default 50; --smoke: 3).", flag_values=FLAGS)
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", None, "Steps of the real loop (resnet50_jpeg), two logging windows; the last "
    "is reported (default 100; --smoke: 4).", flag_values=FLAGS)
_JPEG_IMAGES = flags.DEFINE_integer("jpeg_images", None, "Training JPEGs written for "
                                    "resnet50_jpeg (default 2560; --smoke: 24).",
                                    flag_values=FLAGS)
_JPEG_SIZE = flags.DEFINE_string("jpeg_size", None, "WIDTHxHEIGHT, the JPEGs' mean size; each "
                                 "side varies by up to 20% (default 400x350; --smoke: 64x56).",
                                 flag_values=FLAGS)
# Internal: the parent runs each check as `gpu_check.py FLAGS --worker=NAME ...`.
_WORKER = flags.DEFINE_string("worker", None, "(internal) Run this one check, write its rows "
                              "to --worker_result.", flag_values=FLAGS)
_WORKER_RESULT = flags.DEFINE_string("worker_result", None, "(internal)", flag_values=FLAGS)
_T0 = flags.DEFINE_float("t0", None, "(internal) When the whole run started (time.time()).",
                         flag_values=FLAGS)

# (full run, --smoke) defaults of the sizing flags.
DEFAULTS = {"max_seconds": (450.0, 600.0), "batch": (256, 8), "image_size": (224, 32),
            "warmup": (5, 1), "steps": (50, 3), "loop_steps": (100, 4),
            "jpeg_images": (2560, 24), "jpeg_size": ("400x350", "64x56")}
JPEG_CLASSES = 10  # class folders; the test split has one image of each


class Error(Exception):
  """A mistake in the flags: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Settings:
  smoke: bool
  batch: int  # per device
  image_size: int
  warmup: int
  steps: int
  loop_steps: int
  jpeg_images: int
  jpeg_size: tuple[int, int]  # (width, height)
  out: str
  t0: float


def settings_from_flags() -> Settings:
  smoke = _SMOKE.value
  value = {name: getattr(FLAGS, name) if getattr(FLAGS, name) is not None else
           DEFAULTS[name][smoke] for name in DEFAULTS}
  for name in ("batch", "image_size", "warmup", "steps", "jpeg_images"):
    if value[name] < 1:
      raise Error(f"--{name}={value[name]}: must be at least 1")
  if value["loop_steps"] < 2:
    raise Error(f"--loop_steps={value['loop_steps']}: must be at least 2 (two logging windows)")
  if not value["max_seconds"] > 0:
    raise Error(f"--max_seconds={value['max_seconds']}: must be above 0")
  width, x, height = value["jpeg_size"].lower().partition("x")
  if not (x and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
    raise Error(f"--jpeg_size={value['jpeg_size']!r}: use WIDTHxHEIGHT, e.g. 400x350")
  value["jpeg_size"] = (int(width), int(height))
  del value["max_seconds"]
  return Settings(smoke=smoke, out=_OUT.value, t0=_T0.value or time.time(), **value)


def say(settings_or_t0, message: str) -> None:
  """One progress line, stamped with the seconds since the whole run started."""
  t0 = getattr(settings_or_t0, "t0", settings_or_t0)
  print(f"gpu_check [{time.time() - t0:6.1f} s] {message}", flush=True)


# --- The checks: name -> function(Settings) -> list of row dicts. ---

def _configs():
  from configs import imagenet, imagenet_vit
  return imagenet, imagenet_vit


def _resnet50(s: Settings):
  imagenet, _ = _configs()
  config = imagenet.get_config()
  config.model.dtype = "bfloat16"
  if s.smoke:  # a small CNN: what compiles fastest on a CPU; resnet50_jpeg's classes, so
    # that the two checks share their initialisation's programs (compilation cache)
    config.model.name, config.model.width = "cnn", 4
    config.dataset.synthetic_num_classes = JPEG_CLASSES
  return config


def _global_batch(config, s: Settings) -> None:
  """config.train.batch_size = --batch on each device JAX sees (one, with --smoke)."""
  import jax
  if s.smoke:
    config.parallel.cpu_devices = 1
  config.train.batch_size = s.batch * (1 if s.smoke else jax.device_count())


def _step_row(check: str, config, s: Settings, note: str) -> dict:
  """A config's training step on random images, measured by scripts/benchmark.py."""
  _global_batch(config, s)
  config = benchmark.with_data(config, "synthetic", s.image_size)
  (r,) = benchmark.benchmark(config, None, [None], steps=s.steps, rounds=1, warmup=s.warmup,
                             bare=False, pipeline_batches=0, loop_steps=0)
  return _row(check, config, r["device_kind"], r["devices"],
              images_per_second=r["examples_per_second"],
              step_seconds=r["median_step_seconds"],
              step_time_kind=f"median of {r['timed_steps']} steps",
              flops_per_step_per_device=r["flops_per_step_per_device"],
              peak_flops=benchmark.peak_flops(r["device_kind"], r["dtype"]),
              mfu=r.get("fraction_of_peak"), peak_memory_bytes=r["peak_memory_bytes"],
              xla_peak_memory_bytes=r["xla_peak_memory_bytes"], note=note)


def _row(check: str, config, device_kind: str, devices: int, **figures) -> dict:
  import jax
  row = {"check": check, "model": config.model.name, "dtype": config.model.dtype,
         "image_size": _image_size(config), "device": device_kind, "devices": devices,
         "platform": jax.devices()[0].platform, "batch_size": config.train.batch_size,
         "per_device_batch_size": config.train.batch_size // devices,
         "images_per_second": None, "step_seconds": None, "step_time_kind": None,
         "flops_per_step_per_device": None, "peak_flops": None, "mfu": None,
         "peak_memory_bytes": None, "xla_peak_memory_bytes": None,
         "data_wait_fraction": None, "note": "", "error": None}
  row.update(figures)
  return row


def _image_size(config) -> int:
  if config.dataset.name == "synthetic":
    return config.dataset.synthetic_shape[0]
  return config.dataset.image_size


def check_resnet50(s: Settings) -> list[dict]:
  """ResNet-50, bfloat16, random images: the training step"""
  return [_step_row("resnet50", _resnet50(s), s, "jaxddp's step alone, random images")]


def check_vit_b16(s: Settings) -> list[dict]:
  """ViT-B/16, bfloat16, random images: the training step"""
  _, imagenet_vit = _configs()
  config = imagenet_vit.get_config()
  config.model.name = "vit_b"
  config.model.dtype = "bfloat16"
  if s.smoke:  # one block; 8x8 patches, 16 of a 32x32 image
    config.model.depth, config.model.patch_size = 1, 8
  return [_step_row("vit_b16", config, s, "jaxddp's step alone, random images")]


def check_resnet50_jpeg(s: Settings) -> list[dict]:
  """ResNet-50, bfloat16: the real training loop reading JPEGs through tfds"""
  import jax
  config = _resnet50(s)
  _global_batch(config, s)
  with tempfile.TemporaryDirectory(prefix="gpu_check_jpeg_") as folder:
    start = time.perf_counter()
    written = write_jpeg_folder(folder, s.jpeg_images, JPEG_CLASSES, s.jpeg_size)
    say(s, f"resnet50_jpeg: wrote {s.jpeg_images} + {JPEG_CLASSES} JPEGs of about "
        f"{s.jpeg_size[0]}x{s.jpeg_size[1]} ({written / (s.jpeg_images + JPEG_CLASSES) / 1e3:.0f} "
        f"kB each) in {time.perf_counter() - start:.1f} s; training {s.loop_steps} steps")
    config.dataset.name = "image_folder"
    config.dataset.data_dir = folder
    config.dataset.eval_split = "test"
    config.dataset.image_size = s.image_size
    start = time.perf_counter()
    loop = benchmark.real_loop(config, s.loop_steps)
    say(s, f"resnet50_jpeg: train_and_evaluate took {time.perf_counter() - start:.1f} s "
        "(TensorFlow's import, set-up, compilation, evaluation and checkpoint included)")
  devices = 1 if s.smoke else jax.device_count()
  images_per_second = loop["loop_images_per_second"]
  log_every = max(1, s.loop_steps // 2)  # as real_loop logs
  window = s.loop_steps % log_every or log_every  # the steps of its last logging window
  return [_row("resnet50_jpeg", config, jax.devices()[0].device_kind, devices,
               images_per_second=images_per_second,
               step_seconds=config.train.batch_size / images_per_second,
               step_time_kind=f"mean of the loop's last {window} steps",
               data_wait_fraction=loop["loop_data_wait_fraction"],
               peak_memory_bytes=benchmark.memory_in_use_peak(jax.devices()[:devices]),
               jpeg_images=s.jpeg_images, jpeg_bytes=written, loop_steps=s.loop_steps,
               note=f"train_and_evaluate on {s.jpeg_images} JPEGs of ~{s.jpeg_size[0]}x"
                    f"{s.jpeg_size[1]} (image_folder, tfds), last logging window")]


CHECKS: dict[str, Callable[[Settings], list[dict]]] = {
    "resnet50": check_resnet50,
    "vit_b16": check_vit_b16,
    "resnet50_jpeg": check_resnet50_jpeg,
}


def write_jpeg_folder(root: str, num_train: int, num_classes: int,
                      size: tuple[int, int]) -> int:
  """root/train/<class>/<i>.jpg (num_train, round-robin over the classes) and
  root/test/<class>/<i>.jpg (one per class): random smooth colours plus noise, sides
  within 20% of `size`, so that they compress about as photographs do. Bytes written."""
  from concurrent.futures import ThreadPoolExecutor

  import numpy as np
  from PIL import Image

  for split in ("train", "test"):
    for c in range(num_classes):
      os.makedirs(os.path.join(root, split, f"class_{c:02d}"))

  def write(i: int) -> int:
    rng = np.random.default_rng(i)
    w, h = (max(8, int(side * rng.uniform(0.8, 1.2))) for side in size)
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    pixels = np.clip(smooth + rng.integers(-20, 21, (h, w, 3), dtype=np.int16), 0, 255)
    split, c = ("train", i % num_classes) if i < num_train else ("test", i - num_train)
    path = os.path.join(root, split, f"class_{c:02d}", f"{i:05d}.jpg")
    Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)

  with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL and NumPy release the GIL
    return sum(pool.map(write, range(num_train + num_classes)))


# --- One check, in its own process. ---

def run_worker(name: str, s: Settings, result_path: str) -> None:
  # Anything that reads absl's global flags (orbax, absl logging) sees them parsed.
  flags.FLAGS([sys.argv[0]])
  logging.set_verbosity(logging.WARNING)
  try:
    rows = CHECKS[name](s)
  except Exception as error:  # noqa: BLE001  one row, and the next check runs
    rows = [error_row(name, _one_line(error))]
    os.makedirs(s.out, exist_ok=True)
    path = os.path.join(s.out, f"{name}.error.txt")
    with open(path, "w") as f:
      f.write(traceback.format_exc())
    rows[0]["traceback"] = path
  with open(result_path, "w") as f:
    json.dump(rows, f, default=_json_value)


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _json_value(value):
  try:
    return value.item()  # NumPy scalars
  except AttributeError:
    return str(value)


def error_row(name: str, error: str) -> dict:
  return {"check": name, "error": error}


# --- The whole run: every check in a process of its own, then the files. ---

def run_checks(names: list[str], s: Settings, max_seconds: float, argv: list[str],
               after_each: Callable[[list[dict]], object]) -> list[dict]:
  """Every check in a process of its own; after_each(rows so far) after each."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
    for index, name in enumerate(names):
      start = time.time()
      left = max_seconds - (start - s.t0)
      if left < 1:
        rows.append(error_row(name, f"skipped: --max_seconds={max_seconds:g} reached"))
        say(s, f"{name}: skipped, --max_seconds={max_seconds:g} reached")
        after_each(rows)
        continue
      say(s, f"{name}: start ({index + 1}/{len(names)}: {CHECKS[name].__doc__.strip()})")
      result = os.path.join(scratch, f"{name}.json")
      command = [sys.executable, os.path.abspath(__file__), *argv, f"--worker={name}",
                 f"--worker_result={result}", f"--t0={s.t0!r}"]
      worker = subprocess.Popen(command)
      try:
        status = worker.wait(timeout=left)
        stopped = None
      except subprocess.TimeoutExpired:
        worker.kill()
        status = worker.wait()
        stopped = (f"stopped after {time.time() - start:.0f} s: --max_seconds={max_seconds:g} "
                   "reached")
      seconds = time.time() - start
      if os.path.exists(result):
        with open(result) as f:
          new = json.load(f)
      else:
        new = [error_row(name, stopped or f"its process ended with status {status} and no "
                         "result (its output is above)")]
      for row in new:
        row["seconds"] = seconds
        rows.append(row)
        say(s, f"{name}: {'FAILED' if row.get('error') else 'done'} in {seconds:.1f} s: "
            f"{summary(row)}")
      after_each(rows)
  return rows


def summary(row: dict) -> str:
  if row.get("error"):
    return row["error"] + (f" (traceback: {row['traceback']})" if row.get("traceback") else "")
  cells = dict(zip(COLUMNS, table_cells(row)))
  return (f"{cells['images/s']} images/s, step {cells['step time']}, MFU {cells['MFU']}, "
          f"peak memory {cells['peak memory']}, data wait {cells['data wait']}")


COLUMNS = ["check", "model", "device", "batch", "images/s", "step time", "MFU", "peak memory",
           "XLA memory estimate", "data wait", "time", "note"]


def table_cells(row: dict) -> list[str]:
  def fmt(key, form):
    value = row.get(key)
    return "-" if value is None else form(value)
  if row.get("error"):
    return [row["check"]] + ["-"] * (len(COLUMNS) - 3) + [
        fmt("seconds", lambda v: f"{v:.0f} s"), "error: " + row["error"]]
  batch = str(row["batch_size"])
  if row["devices"] > 1:
    batch += f" ({row['per_device_batch_size']} x {row['devices']})"
  return [row["check"],
          f"{row['model']} {row['dtype']} {row['image_size']}x{row['image_size']}",
          row["device"] + (f" x{row['devices']}" if row["devices"] > 1 else ""),
          batch,
          fmt("images_per_second", lambda v: f"{v:.1f}"),
          fmt("step_seconds", lambda v: f"{v * 1e3:.2f} ms") +
          (f" ({row['step_time_kind']})" if row.get("step_time_kind") else ""),
          fmt("mfu", lambda v: f"{v:.1%}"),
          fmt("peak_memory_bytes", lambda v: benchmark._si(v, "B")),
          fmt("xla_peak_memory_bytes", lambda v: benchmark._si(v, "B")),
          fmt("data_wait_fraction", lambda v: f"{v:.2%}"),
          fmt("seconds", lambda v: f"{v:.0f} s"),
          row.get("note", "")]


def markdown_table(rows: list[dict]) -> str:
  def line(cells):
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(COLUMNS), "|" + "---|" * len(COLUMNS)] +
                   [line(table_cells(row)) for row in rows])


def replace_between_markers(text: str, content: str) -> str | None:
  """text with the lines between the BEGIN and END marker lines replaced by content (which
  ends with a newline); None unless each marker is there once, BEGIN first."""
  if text.count(BEGIN) != 1 or text.count(END) != 1:
    return None
  begin, end = text.index(BEGIN), text.index(END)
  after_begin = text.find("\n", begin) + 1  # the line after BEGIN's
  end_line = text.rfind("\n", 0, end) + 1  # the start of END's line
  if after_begin == 0 or end_line < after_begin:
    return None
  return text[:after_begin] + content + text[end_line:]


def readme_problem(path: str) -> str | None:
  """Why the table cannot go into `path` (one line), or None."""
  if not os.path.isfile(path):
    return f"{path} does not exist; it is left as it is"
  with open(path, encoding="utf-8", newline="") as f:
    if replace_between_markers(f.read(), "\n") is None:
      return (f"{path} has no lines {BEGIN} and {END} (each once, in this order); it is left "
              "as it is")
  return None


def write_readme(path: str, content: str) -> str:
  """Puts content between the markers of `path` (read again: it may have changed since
  the start); what happened, in one line."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = replace_between_markers(f.read(), content)
    if text is None:
      return f"{path} has lost its markers since the start; it is left as it is"
    temporary = f"{path}.gpu_check.tmp"
    with open(temporary, "w", encoding="utf-8", newline="") as f:
      f.write(text)
    shutil.copymode(path, temporary)
    os.replace(temporary, path)  # whole, or not at all
  except OSError as error:
    return f"{path} not updated: {error}"
  return f"{path}: table written between the markers"


def readme_path() -> str | None:
  if _README.value is not None:
    return _README.value or None
  return None if _SMOKE.value else os.path.join(REPO, "README.md")


def main(argv: list[str]) -> int:
  s = settings_from_flags()
  if _WORKER.value:
    if _WORKER.value not in CHECKS or not _WORKER_RESULT.value:
      raise Error("--worker needs a check's name and --worker_result")
    run_worker(_WORKER.value, s, _WORKER_RESULT.value)
    return 0
  names = _CHECKS.value if _CHECKS.value is not None else list(CHECKS)
  unknown = [name for name in names if name not in CHECKS]
  if unknown or not names:
    raise Error(f"--checks={','.join(names)}: "
                f"{'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                f"the checks are {', '.join(CHECKS)}")
  max_seconds = _MAX_SECONDS.value or DEFAULTS["max_seconds"][s.smoke]
  readme = readme_path()
  problem = readme_problem(readme) if readme else None
  say(s, f"{len(names)} check(s): {', '.join(names)}{' (--smoke)' if s.smoke else ''}; at most "
      f"{max_seconds:g} s in all (--max_seconds); results in {s.out}; README: "
      f"{problem or readme or 'not updated'}")
  if _DRY_RUN.value:
    print(json.dumps(dataclasses.asdict(s)))
    return 0
  try:  # before the checks: a folder that cannot be written must not waste them
    os.makedirs(s.out, exist_ok=True)
  except OSError as error:
    raise Error(f"--out={s.out}: {error.strerror}") from None
  if s.smoke:  # workers inherit the environment
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(tempfile.gettempdir(), "jaxddp-gpu-check-jax-cache"))
  command = shlex.join(["python", "scripts/gpu_check.py", *argv[1:]])
  json_path, md_path = os.path.join(s.out, "gpu_check.json"), os.path.join(s.out, "gpu_check.md")

  def write_results(rows: list[dict]) -> str:
    """OUT/gpu_check.json and .md, rewritten after each check (a run cut short keeps its
    finished checks); the Markdown's text."""
    ok = [row for row in rows if not row.get("error")]
    devices = sorted({row["device"] + (f" x{row['devices']}" if row["devices"] > 1 else "")
                      for row in ok}) or ["no device measured"]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    jax_version = importlib.metadata.version("jax")
    total = time.time() - s.t0
    content = (f"`{command}` on {date}, {', '.join(devices)}, JAX {jax_version}, "
               f"{total:.0f} s in all:\n\n{markdown_table(rows)}\n")
    with open(json_path, "w") as f:
      json.dump({"command": command, "checks": names, "date": date, "devices": devices,
                 "jax": jax_version,
                 "settings": dataclasses.asdict(s), "total_seconds": total, "rows": rows}, f,
                indent=2, default=_json_value)
    with open(md_path, "w") as f:
      f.write(content)
    return content

  rows = run_checks(names, s, max_seconds, argv[1:], write_results)
  content = write_results(rows)
  total = time.time() - s.t0
  ok = [row for row in rows if not row.get("error")]
  print(f"\n{content}")
  if not readme:
    readme_note = "README not updated" + (" (--smoke)" if s.smoke else " (--readme=)")
  elif problem:
    readme_note = problem
  elif not ok:
    readme_note = f"{readme} left as it is: no check succeeded"
  else:
    readme_note = write_readme(readme, content)
  say(s, f"total {total:.1f} s; {len(ok)}/{len(rows)} row(s) measured; wrote {json_path} and "
      f"{md_path}; {readme_note}")
  return 0 if len(ok) == len(rows) else 1


def cli(argv: list[str]) -> None:
  if any(arg in ("-h", "--help", "-help", "--helpshort", "--helpfull") for arg in argv[1:]):
    print(__doc__)
    print(FLAGS.get_help())
    sys.exit(0)
  try:
    try:
      rest = FLAGS(argv)
    except flags.Error as error:
      raise Error(" ".join(str(error).split())) from None
    if len(rest) > 1:
      raise Error(f"unexpected argument(s) {' '.join(rest[1:])!r}; flags are --name=value")
    sys.exit(main(argv))
  except Error as error:
    print(f"{SCRIPT}: error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{SCRIPT}: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  cli(sys.argv)
