"""Stall detection: rank 0's heartbeat in the worker, the watchdog on the driver.

Contract:
- `Heartbeat` writes {step, phase, ticks} to `<run_dir>/heartbeat.json` every few seconds from a
  thread; the loop only assigns fields. Phases: "starting" (model and engine set-up), "data"
  (waiting for the next micro-batch), "step" (forward/backward/optimizer), "eval", "checkpoint".
- `fit_with_watchdog` runs `trainer.fit()` and ends it with `TrainingStalled` (naming the starved
  stage and what to do) when the heartbeat stops moving for the stall timeout. Before the first
  step, workers waiting for their first batch ("data") are given `FIRST_BATCH_S` (90 s, or the
  stall timeout if shorter), and the error then names the Ray Data stage that holds no data
  (`compat.starved_data_stage`: the first stage of a running dataset that has produced nothing,
  and the blocks waiting at it) and the cluster's free CPUs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from pipelines import storage


class Heartbeat:
    """Rank 0's liveness for the driver's watchdog: {step, phase, ticks}, written atomically to
    `<run_dir>/heartbeat.json` every `interval_s` by a background thread. The loop only assigns
    attributes (`ticks` counts micro-batches and eval batches), so beating costs the step nothing.
    """

    def __init__(self, path: Optional[str], interval_s: float):
        self.path, self.interval_s = path, interval_s  # a local path or a URI (pipelines/storage.py)
        self.step, self.phase, self.ticks = 0, "starting", 0
        self.stepped = False  # a step completed in this invocation: start-up is over
        self._stop = threading.Event()
        self._thread = None
        if path is not None:
            self._write()
            self._thread = threading.Thread(target=self._run, name="raybert-heartbeat", daemon=True)
            self._thread.start()

    def beat(self, phase: str, step: Optional[int] = None) -> None:
        """Enter `phase` (the loops use "data", "step", "eval", "checkpoint"; a new beat starts in
        "starting"); `step` when a step has just completed."""
        self.phase = phase
        self.ticks += 1
        if step is not None:
            self.step, self.stepped = step, True

    def _write(self) -> None:
        record = {"step": self.step, "phase": self.phase, "ticks": self.ticks, "stepped": self.stepped,
                  "time": time.time(),
                  "pid": os.getpid(), "host": socket.gethostname()}
        storage.write_text(self.path, json.dumps(record) + "\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._write()
            except (OSError, ValueError):  # a full disk or flaky store must not kill training; the watchdog will tell
                pass

    def close(self) -> None:
        """Stop the thread and leave the last state on disk."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self._write()
            except (OSError, ValueError):
                pass


# Workers waiting this long for their first batch are stalled (with start-up, the report comes about
# 110 s into the invocation): a read and a tokenize task take seconds
# to deliver one even on a loaded 2-core machine, and a stage that can't be scheduled never will.
FIRST_BATCH_S = 90.0


def heartbeat_interval(stall_timeout_s: Optional[float]) -> float:
    return min(5.0, max(0.5, (stall_timeout_s or 60.0) / 6))


class TrainingStalled(RuntimeError):
    """No training progress for the stall timeout; `stage` names where it stopped: "workers" (never
    started: the cluster lacks the resources requested), "starting", "data", "step", "eval" or
    "checkpoint"."""

    def __init__(self, message: str, stage: str, step: Optional[int], waited_s: float):
        super().__init__(message)
        self.stage, self.step, self.waited_s = stage, step, waited_s


_ADVICE = {
    "workers": "the cluster lacks the resources the workers request (CPUs/GPUs per worker x "
               "num_workers); use fewer workers or fewer CPUs per worker, or add nodes",
    "starting": "the workers started but never became ready (model, DeepSpeed or process-group "
                "set-up); check the worker logs and that every worker can reach the others",
    "data": "the data pipeline delivered no batch: it is likely starved of CPUs; leave CPUs "
            "for Ray Data (fewer workers or fewer CPUs per worker) or check the input files",
    "step": "a training step never finished: a worker is hung or the step is slower than the "
            "timeout; check the worker logs, or raise train.stall_timeout_s",
    "eval": "evaluation stopped making progress; check the worker logs or the validation data",
    "checkpoint": "writing a checkpoint never finished; check that the run dir's storage is "
                  "reachable and has space, or raise train.stall_timeout_s",
}


def _read_heartbeat(path: str, since: float) -> Optional[dict]:
    try:
        hb = json.loads(storage.read_text(path) or "null")
    except (OSError, ValueError):  # caught mid-replace on a non-POSIX store, or the store unreachable
        return None
    if not isinstance(hb, dict):
        return None
    return hb if hb.get("time", 0) >= since else None  # ignore a previous invocation's


def stall_error(hb: Optional[dict], waited_s: float, detail: Optional[str] = None) -> TrainingStalled:
    stage = "workers" if hb is None else hb.get("phase", "step")
    step = None if hb is None else hb.get("step")
    where = "no worker ever started" if hb is None else f"stuck in '{stage}' after step {step}"
    if awaiting_first_batch(hb):
        where = f"no batch reached the workers (stuck in 'data' before the first step, at step {step})"
    return TrainingStalled(f"training stalled: {where}, no progress for {waited_s:.0f} s; "
                           + (f"{detail}; " if detail else "") + _ADVICE.get(stage, _ADVICE["step"]),
                           stage, step, waited_s)


def first_batch_report() -> Optional[str]:
    """What Ray Data says of the job's running datasets, for a stall before the first batch (None if
    it can't be told)."""
    from pipelines.compat import starved_data_stage

    return starved_data_stage()


def awaiting_first_batch(hb: Optional[dict]) -> bool:
    """The workers are set up and wait for the data pipeline's first batch."""
    return hb is not None and hb.get("phase") == "data" and not hb.get("stepped")


def _allowed_s(hb: Optional[dict], stall_timeout_s: float, startup_s: float) -> float:
    if hb is not None and hb.get("stepped"):
        return stall_timeout_s
    if awaiting_first_batch(hb):
        return min(startup_s, stall_timeout_s, FIRST_BATCH_S)
    return startup_s


def fit_with_watchdog(trainer, run_dir: str | Path, stall_timeout_s: Optional[float],
                      startup_s: Optional[float] = None, report=first_batch_report):
    """`trainer.fit()`, ended with `TrainingStalled` when rank 0's heartbeat shows no progress
    (step, phase or tick unchanged) for `stall_timeout_s`; before the first step of this
    invocation, the allowance is `startup_s`, by default max(2 x timeout, 120 s) (Ray Train
    start-up, engine set-up), and at most FIRST_BATCH_S while the workers wait for their first
    batch, when `report()` says which data stage holds no data.

    Stopping: a watchdog thread interrupts the main thread as Ctrl-C would; Ray Train's own SIGINT
    handler (installed by `fit` on the main thread) aborts the controller, which kills the worker
    group and its actors, and this function raises `TrainingStalled` in place of what `fit` raised.
    Checkpoints already written stay in the run dir. Off the main thread, or with a timeout of
    None/0, this is plain `trainer.fit()`.
    """
    import _thread
    import signal

    if not stall_timeout_s or threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    path = storage.join(str(run_dir), "heartbeat.json")
    t0 = time.time()
    stop, lock = threading.Event(), threading.Lock()
    stalled: list[TrainingStalled] = []
    startup_s = max(2 * stall_timeout_s, 120.0) if startup_s is None else startup_s

    def watch():
        seen, changed = None, time.monotonic()
        while not stop.wait(min(1.0, stall_timeout_s / 4)):
            hb = _read_heartbeat(path, t0)
            state = None if hb is None else (hb.get("step"), hb.get("phase"), hb.get("ticks"))
            now = time.monotonic()
            if state != seen:
                seen, changed = state, now
            if now - changed > _allowed_s(hb, stall_timeout_s, startup_s):
                detail = report() if awaiting_first_batch(hb) else None
                with lock:
                    if stop.is_set():
                        return
                    stalled.append(stall_error(hb, now - changed, detail))
                    _thread.interrupt_main()
                return

    previous = signal.getsignal(signal.SIGINT)
    watchdog = threading.Thread(target=watch, name="raybert-watchdog", daemon=True)
    watchdog.start()
    try:
        result = trainer.fit()
    except BaseException as e:
        if stalled:
            raise stalled[0] from None
        raise e
    finally:
        with lock:
            stop.set()
        watchdog.join()
        signal.signal(signal.SIGINT, previous)  # fit leaves Ray's abort-this-run handler installed
    if stalled:  # fit returned as the interrupt landed: the run did stall
        raise stalled[0]
    return result
