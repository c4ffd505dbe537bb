"""Scheduled runs: one run directory, many budgeted invocations that never overlap, and a ledger.

Contract:
- `RunLock(run_dir)` is an exclusive, non-blocking `flock` on `<run_dir>/.raybert.lock`, held for
  the whole invocation. A second invocation on the same run dir raises `RunLocked` at once (the
  CLI exits with status 75, EX_TEMPFAIL, so a scheduler can tell "skipped, still running" from
  "failed"). The kernel drops the lock when its process dies, so a crashed or killed invocation
  never leaves a stale lock behind. The lock file says who holds it (pid, host, start time).
  flock is reliable on local disks and NFSv4. An object-store run dir (s3://...) can't be flocked:
  there the lock is a lease object, `<run_dir>/.raybert.lock`, renewed every minute by the holder
  and deleted on exit; one not renewed for `LEASE_TTL_S` (a killed invocation's) is taken over.
  Object stores offer pyarrow no compare-and-swap, so two invocations started within the same
  second could both pass; keep the scheduler from overlapping runs as well (e.g.
  `concurrencyPolicy: Forbid` on a CronJob).
- `<run_dir>/runs.jsonl` gets one JSON line per invocation: invocation id, start and end (UTC ISO
  8601), start and end step (those of the checkpoints Ray Train registered,
  pipelines.training.run_dir.latest_step: where the invocation really resumed and where it left
  the run), steps trained, the checkpoint it left, status (`ok`, `complete`: the run had already
  reached max_steps, `failed`, `refused`: the run dir was locked or the cluster can't run the
  settings, or `killed`) and the error if any. A killed invocation can't write its line: the next
  invocation writes it for it, from the running record each invocation leaves in
  `<run_dir>/.raybert.invocation.json` until its own line is written (`begin_invocation`). Lines
  are appended with O_APPEND, whole or not at all. On an object store, which can't append, the
  ledger is read and rewritten whole; a refused invocation's record, written without the lock, can
  then race the holder's and one of the two may be lost (the run's checkpoints are unaffected).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from pipelines import UserError, storage
from pipelines.training.run_dir import latest_step

LOCK_NAME = ".raybert.lock"
LEDGER_NAME = "runs.jsonl"
RUNNING_NAME = ".raybert.invocation.json"  # the running invocation's record, until it is in the ledger
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later
LEASE_TTL_S = 300.0  # an object-store lock not renewed for this long is a dead invocation's
LEASE_RENEW_S = 60.0


class RunLocked(RuntimeError):
    """Another invocation holds the run directory."""


class Refused(UserError):
    """Settings refused once the cluster is known (its resources can't run them), before any
    training: recorded as `refused`, like a locked run dir, not as a failure."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """`RunLock(run_dir)` locks `<run_dir>/.raybert.lock`. `RunLock(lock_file=..., subject=...)`
    locks an explicit file instead, for a target that can't hold its own lock file (a scoring
    output, which overwrite deletes: its lock lives beside it); `subject` is named in the refusal."""

    def __init__(self, run_dir: str | Path | None = None, *, lock_file: str | Path | None = None,
                 subject: Optional[str] = None):
        if (run_dir is None) == (lock_file is None):
            raise TypeError("RunLock takes exactly one of run_dir or lock_file")
        self._lease = None
        if run_dir is not None and storage.is_uri(run_dir):
            self._lease = LeaseLock(storage.join(str(run_dir), LOCK_NAME), subject or str(run_dir))
            return
        self.path = Path(lock_file) if lock_file is not None else Path(run_dir) / LOCK_NAME
        self.subject = subject or str(self.path.parent)
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        if self._lease is not None:
            self._lease.acquire()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLocked(f"{self.subject} is in use by another invocation ({holder}); refusing "
                                f"to overlap it. Let it finish; the next scheduled run continues from its "
                                f"checkpoint.") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._lease is not None:
            self._lease.release()
            return
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LeaseLock:
    """The run lock on an object store: a lease object holding {owner, host, pid, renewed}."""

    def __init__(self, loc: str, subject: str, ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S):
        self.loc, self.subject, self.ttl_s, self.renew_s = loc, subject, ttl_s, renew_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(storage.read_text(self.loc) or "null")
        except ValueError:
            return None

    def _write(self) -> None:
        storage.write_text(self.loc, json.dumps({"owner": self.owner, "pid": os.getpid(),
                                                 "host": socket.gethostname(), "renewed": time.time(),
                                                 "since": now_iso()}) + "\n")

    def _refuse(self, held: dict) -> RunLocked:
        return RunLocked(f"{self.subject} is in use by another invocation (pid {held.get('pid')} on "
                         f"{held.get('host')} since {held.get('since')}); refusing to overlap it. Let it "
                         f"finish; the next scheduled run continues from its checkpoint.")

    def acquire(self) -> None:
        held = self._read()
        if held and held.get("owner") != self.owner and time.time() - float(held.get("renewed", 0)) < self.ttl_s:
            raise self._refuse(held)
        self._write()
        time.sleep(1.0)  # a rival that wrote in the same moment: the later write wins, the other backs off
        held = self._read()
        if not held or held.get("owner") != self.owner:
            raise self._refuse(held or {})
        self._thread = threading.Thread(target=self._renew, name="raybert-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self._write()
            except (OSError, ValueError):  # retried at the next renewal; the TTL allows several misses
                pass

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("owner") == self.owner:
            storage.delete(self.loc)


def append_record(run_dir: str | Path, record: dict) -> None:
    storage.append_line(storage.join(str(run_dir), LEDGER_NAME), json.dumps(record, default=str))


def begin_invocation(run_dir: str | Path, record: dict) -> int:
    """Under the run lock, before any work: if the previous holder left its running record (it was
    killed, or its machine went down, so it never wrote its ledger line), append that record as
    `killed`, with the step it left the run at (`end_step`: the checkpoint this invocation resumes
    from) and the last step it logged (`last_step`). Then leave this invocation's record in its
    place. Returns this invocation's start step (`latest_step`)."""
    step = latest_step(run_dir)
    running = storage.join(str(run_dir), RUNNING_NAME)
    try:
        previous = json.loads(storage.read_text(running) or "null")
    except ValueError:  # cut short by a crash mid-write (local writes are atomic, so hardly ever)
        previous = None
    if isinstance(previous, dict) and previous.get("invocation") not in {r.get("invocation") for r in read_ledger(run_dir)}:
        start = previous.get("start_step", step)
        last = _last_logged_step(run_dir)
        previous.update(status="killed", end=None, end_step=step, steps=step - start,
                        last_step=last if last is not None and last > start else None,
                        error=f"ended without recording itself (killed, or its node went down); found by "
                              f"invocation {record['invocation']} at {now_iso()}")
        append_record(run_dir, previous)
    storage.write_text(running, json.dumps(dict(record, start_step=step), default=str))
    return step


def end_invocation(run_dir: str | Path, record: dict) -> None:
    """Append this invocation's record (its end time and steps filled in), then drop its running record."""
    record["end"] = now_iso()
    if "end_step" in record and "start_step" in record:
        record["steps"] = record["end_step"] - record["start_step"]
    append_record(run_dir, record)
    storage.delete(storage.join(str(run_dir), RUNNING_NAME))


def _last_logged_step(run_dir: str | Path) -> Optional[int]:
    """The last step in metrics.jsonl since its last start/resume event (the killed invocation's)."""
    text = storage.read_text(storage.join(str(run_dir), "metrics.jsonl")) or ""
    last = None
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if r.get("event") in ("start", "resume"):
            last = None
        elif isinstance(r.get("step"), int):
            last = r["step"]
    return last


def read_ledger(run_dir: str | Path) -> list[dict]:
    text = storage.read_text(storage.join(str(run_dir), LEDGER_NAME)) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def new_invocation_id() -> str:
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
