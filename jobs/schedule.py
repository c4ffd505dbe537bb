"""Scheduled runs: one run directory, many budgeted invocations that never overlap, and a ledger.

Contract:
- `RunLock(run_dir)` is an exclusive, non-blocking `flock` on `<run_dir>/.raybert.lock`, held for
  the whole invocation. A second invocation on the same run dir raises `RunLocked` at once (the
  CLI exits with status 75, EX_TEMPFAIL, so a scheduler can tell "skipped, still running" from
  "failed"). The kernel drops the lock when its process dies, so a crashed or killed invocation
  never leaves a stale lock behind. The lock file says who holds it (pid, host, start time).
  flock is reliable on local disks and NFSv4; on object stores or other shared filesystems keep
  the scheduler itself from overlapping runs (e.g. `concurrencyPolicy: Forbid` on a CronJob).
- `<run_dir>/runs.jsonl` gets one JSON line per invocation: invocation id, start and end (UTC ISO
  8601), start and end step (those of the checkpoints Ray Train registered, `latest_step`: where
  the invocation really resumed and where it left the run), steps trained, the checkpoint it
  left, status (`ok`, `complete`: the run had already reached max_steps, `failed`, or `refused`:
  the run dir was locked) and the error if any. Lines are appended with O_APPEND, whole or not at all.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Optional

LOCK_NAME = ".raybert.lock"
LEDGER_NAME = "runs.jsonl"
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later


class RunLocked(RuntimeError):
    """Another invocation holds the run directory."""


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
        self.path = Path(lock_file) if lock_file is not None else Path(run_dir) / LOCK_NAME
        self.subject = subject or str(self.path.parent)
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
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
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def append_record(run_dir: str | Path, record: dict) -> None:
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(Path(run_dir) / LEDGER_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_ledger(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LEDGER_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def registered_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint Ray Train resumes `run_dir` from: the latest one its checkpoint manager
    registered (None if none). A checkpoint directory that a killed invocation left on disk before
    Ray registered it is not one, whatever its step: the next invocation resumes from the one
    before, and the ledger must say so."""
    import ray.train

    try:
        result = ray.train.Result.from_path(str(Path(run_dir).absolute()))
    except RuntimeError:  # not a Ray Train run dir (yet): no checkpoint manager snapshot
        return None
    except Exception as e:  # the snapshot names checkpoints that are gone, or another Ray's format
        raise ValueError(f"{run_dir}: Ray Train's checkpoint record can't be read ({type(e).__name__}: {e}); "
                         f"restore the run dir's checkpoints, or start a new --run-dir") from None
    return Path(result.checkpoint.path) if result.checkpoint is not None else None


def latest_step(run_dir: str | Path) -> int:
    """The step of the registered latest checkpoint (0 if none)."""
    ckpt = registered_checkpoint(run_dir)
    if ckpt is None:
        return 0
    return int(json.loads((ckpt / "raybert_state.json").read_text())["step"])


def new_invocation_id() -> str:
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
