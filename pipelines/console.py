"""What a job shows on the console, and how much: quiet by default, with progress.

Contract:
- One level per process, `quiet`, `normal` (the default) or `verbose`, set by the CLI
  (`--quiet`/`--verbose`) through `set_verbosity` and kept in the environment (RAYBERT_VERBOSITY),
  so the processes started after it (the embedded local Ray and its workers) inherit it; Ray Train
  workers get it, on any cluster, through `worker_env()`.
  - `normal`: raybert's own progress and summary, and the libraries' errors; Ray's, Ray Data's, Ray
    Train's and DeepSpeed's INFO lines, operator progress bars and known-harmless warnings are off.
  - `quiet`: errors and the result only (no progress lines, no summary line on stderr).
  - `verbose`: every library as it is by default, raybert's progress too.
- Results meant for programs (the JSON summary) go to stdout alone, everything else to stderr.
- `quiet_libraries()` (a context, one job long) sets the driver's side, before Ray starts
  (`ray_init_kwargs()` adds ray.init's own level); `quiet_worker()` runs first thing in a training worker;
  `train_logging_level()` is Ray Train's console level (RunConfig.logging_config).
- The Python API (`pipelines.scoring.job.score_dataset`) runs in the caller's process, on the caller's
  Ray, and returns a lazy Dataset that runs when the caller consumes it: that Dataset carries its
  own quiet settings (`compat.quiet_dataset`: no progress bars or start lines; Ray Data's INFO lines
  off while it runs, `data_run_started` / `data_run_ended`). Nothing else of the caller's changes,
  but for Ray Data's note that its bars are off, dropped from then on (`drop_data_notes`).
- `Progress`: one progress line (done / total, tokens/s, ETA) redrawn in place on a terminal, and
  a plain line every so often in a log (15 s for the first two minutes, then every minute).

Imports neither torch nor ray at module level (the CLI's `--help` stays fast).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from typing import Optional, TextIO

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
LEVELS = (QUIET, NORMAL, VERBOSE)
ENV = "RAYBERT_VERBOSITY"


def set_verbosity(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"verbosity {level!r}: use one of {', '.join(LEVELS)}")
    os.environ[ENV] = level


def verbosity() -> str:
    level = os.environ.get(ENV, NORMAL)
    return level if level in LEVELS else NORMAL


def shows_progress() -> bool:
    return verbosity() != QUIET


def ray_init_kwargs() -> dict:
    """ray.init's own log level: its "Started a local Ray instance" and connection lines are INFO."""
    return {} if verbosity() == VERBOSE else {"logging_level": logging.WARNING}


def train_logging_level() -> str:
    """Ray Train's console level (controller and workers): its worker-group, checkpoint and report
    lines are INFO."""
    return "INFO" if verbosity() == VERBOSE else "WARNING"


def worker_env() -> dict:
    """Environment variables for Ray Train workers. Ray Train 2.60 patches `print` in its workers to
    log as well, and each of our progress lines reached the console twice: the patch is off."""
    return {ENV: verbosity(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message contains any of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in self.parts)


# Ray Data's notes that don't apply to our jobs: that its progress bars are off (how we run it),
# and, when actors hold every CPU at the start, that the job "will hang unless more CPUs are freed
# up": the predictor pool's plan (resources.cpu_plan) leaves the tasks their CPUs, so it never does.
# Its warning that a job can't get the resources to run at all stays.
_PROGRESS_BARS_OFF = DropMessages("Progress bars disabled", "does not have any available CPUs")


@contextlib.contextmanager
def quiet_libraries():
    """The driver's side of `normal` and `quiet`, for one job (entered before Ray starts; restored
    after, so a program that runs a job keeps its own settings): Ray Data's INFO lines and progress
    bars are off (scoring draws its own `Progress`, training prints a line per log step), its
    warnings stay (one says when a job can't get the resources to run: that one must show), but for
    two notes that don't apply (`_PROGRESS_BARS_OFF`); Ray Train's driver-side INFO lines are off. Processes the
    embedded Ray starts from here inherit RAY_DATA_LOG_LEVEL=ERROR: there Ray Data runs Ray Train's
    datasets, whose starved stages the training watchdog names itself, and its note that the bars
    are off can't be filtered."""
    if verbosity() == VERBOSE:
        yield
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    data_log, train_log = logging.getLogger("ray.data"), logging.getLogger("ray.train")
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, data_log.level, train_log.level,
             {k: os.environ.get(k) for k in ("RAY_DATA_LOG_LEVEL", "PYTHONWARNINGS")})
    os.environ["RAY_DATA_LOG_LEVEL"] = "ERROR"
    # Ray's own actors (Ray Train's DatasetManager) warn about Ray's deprecated internals: nothing a
    # user can act on. Read by the Python processes the embedded Ray starts from here.
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [saved[4]["PYTHONWARNINGS"], "ignore::DeprecationWarning"]))
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    data_log.setLevel(logging.WARNING)
    handlers = [h for h in data_log.handlers if _PROGRESS_BARS_OFF not in h.filters]
    for handler in handlers:
        handler.addFilter(_PROGRESS_BARS_OFF)
    train_log.setLevel(logging.WARNING)  # "A run snapshot was found ..." after a fit
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved[:2]
        data_log.setLevel(saved[2])
        train_log.setLevel(saved[3])
        for handler in handlers:
            handler.removeFilter(_PROGRESS_BARS_OFF)
        for key, value in saved[4].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Ray Data runs of raybert's own datasets in a caller's process (`score_dataset`): its INFO lines are
# off while any of them runs; compat.quiet_dataset calls these from Ray Data's execution hooks.
_data_runs = {"n": 0, "level": logging.NOTSET}
_data_runs_lock = threading.Lock()


def drop_data_notes() -> None:
    """From now on, drop Ray Data's notes that don't apply (`_PROGRESS_BARS_OFF`) from its console."""
    for handler in logging.getLogger("ray.data").handlers:
        if _PROGRESS_BARS_OFF not in handler.filters:
            handler.addFilter(_PROGRESS_BARS_OFF)


def data_run_started() -> None:
    """A quiet Ray Data run began: Ray Data's INFO lines are off until the last such run ends."""
    log = logging.getLogger("ray.data")
    with _data_runs_lock:
        if _data_runs["n"] == 0:
            _data_runs["level"] = log.level
            log.setLevel(logging.WARNING)
        _data_runs["n"] += 1


def data_run_ended() -> None:
    with _data_runs_lock:
        if _data_runs["n"] == 0:
            return
        _data_runs["n"] -= 1
        if _data_runs["n"] == 0:
            logging.getLogger("ray.data").setLevel(_data_runs["level"])


def quiet_worker() -> None:
    """A training worker's side, at `normal` and `quiet`: the warning DeepSpeed 0.19's ZeRO triggers
    in torch on every step (`all_gather_into_tensor` is deprecated: not the user's to act on) is
    silenced, and INFO records stay out of the console (our progress lines are prints);
    DeepSpeed's own accelerator line is dropped by `compat.import_deepspeed`."""
    if verbosity() == VERBOSE:
        return
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    # Ray Train sets the workers' root logger to INFO, and its report lines ("Reporting training
    # result ...", a logger named by its file, not under `ray.train`) reach the console through it.
    logging.getLogger().setLevel(logging.WARNING)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Progress of one job: `update(done, tokens)` with cumulative counts; `close()` ends the line.
    Counts done before this run (a resume) are `start` and don't enter the rates."""

    def __init__(self, what: str, total: int, start: int = 0, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None):
        self.what, self.total, self.start = what, total, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.last_line = self.t0  # in a log, the first line after one interval (a short job: just the last)
        self.done, self.tokens = start, 0
        self.enabled = shows_progress()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"[raybert] {self.what}: {self.done:,}/{self.total:,} rows ({pct:.0f}%) "
                f"{self.tokens / elapsed:,.0f} tokens/s, elapsed {format_duration(elapsed)}, eta {eta}")

    def update(self, done: int, tokens: int, draw: bool = True) -> None:
        self.done, self.tokens = done, tokens
        if not (self.enabled and draw):
            return
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
            return
        now = time.monotonic()
        every = 15.0 if now - self.t0 < 120 else 60.0
        if now - self.last_line >= every:
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
        else:
            print(self.line(), file=self.stream)
        self.stream.flush()
