"""Rank 0's run log: `metrics.jsonl` lines and TensorBoard scalars (and the opt-in trackers),
written by a background thread so a log step never waits on storage or a tracking server; on an
object store, a local staging file mirrored to the run dir."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Optional

from pipelines.storage import Mirror

_SYNC = object()  # MetricsWriter.sync's request to the metrics thread


class MetricsWriter:
    """Appends JSON lines to `path`, and the numeric fields of each record with a `step` as
    TensorBoard scalars under `tensorboard_dir`, from a background thread (path None: a no-op,
    for ranks > 0).

    `write` only enqueues, so a log step never waits on storage (a network file system can take
    seconds); `close` drains the queue. Records are written in order.
    """

    # Not curves: the step is the x axis, the rest are wall-clock and bookkeeping.
    _NOT_SCALARS = frozenset({"step", "time", "epoch", "world_size", "threads"})

    def __init__(self, path: Optional[Path], tensorboard_dir: Optional[Path] = None,
                 mirror: Optional[Mirror] = None, mirror_every_s: float = 30.0, trackers=None):
        self.path, self.tensorboard_dir = path, tensorboard_dir
        # Opt-in MLflow / W&B (pipelines/training/tracking.py): a factory, called in the metrics thread so
        # the trackers are opened, fed and closed by one thread and never by the step.
        self.trackers = trackers
        # A remote run dir: the files are written to a local staging dir, and `mirror` uploads
        # what changed every `mirror_every_s` and at close (object stores can't append).
        self.mirror, self.mirror_every_s = mirror, mirror_every_s
        self._q: queue.Queue = queue.Queue()
        self._thread = None
        if path is not None:
            self._thread = threading.Thread(target=self._drain, name="raybert-metrics", daemon=True)
            self._thread.start()

    def write(self, record: dict) -> None:
        if self._thread is not None:
            self._q.put(record)

    def sync(self) -> None:
        """Flush what was written so far and, for a remote run dir, upload it now rather than at the
        next `mirror_every_s`: called before each checkpoint, so a killed run's store holds the
        metrics of every step its checkpoints cover. Returns at once (the metrics thread does it)."""
        if self._thread is not None:
            self._q.put(_SYNC)

    def _scalars(self, tb, trackers, record: dict) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        scalars = {k: float(v) for k, v in record.items()
                   if k not in self._NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        if tb is not None:
            for k, v in scalars.items():
                tb.add_scalar(k, v, global_step=step, walltime=record.get("time"))
        if trackers is not None:
            trackers.log(scalars, step)

    def _drain(self) -> None:
        tb = None
        if self.tensorboard_dir is not None:
            from tensorboardX import SummaryWriter  # a ray[train] dependency

            tb = SummaryWriter(logdir=str(self.tensorboard_dir), flush_secs=30)
        trackers = self.trackers() if self.trackers is not None else None
        synced = time.monotonic()
        try:
            with open(self.path, "a") as f:
                while True:
                    try:
                        record = self._q.get(timeout=self.mirror_every_s if self.mirror else None)
                    except queue.Empty:
                        record = ...  # time to mirror, nothing to write
                    if record is None:
                        return
                    if record is not ... and record is not _SYNC:
                        f.write(json.dumps(record) + "\n")
                        self._scalars(tb, trackers, record)
                    if self._q.empty() or record is _SYNC:
                        f.flush()
                        if self.mirror and (record is _SYNC or time.monotonic() - synced >= self.mirror_every_s):
                            if tb is not None:
                                tb.flush()
                            self._sync()
                            synced = time.monotonic()
        finally:
            if tb is not None:
                tb.close()
            if trackers is not None:
                trackers.close()
            self._sync()

    def _sync(self) -> None:
        if self.mirror is None:
            return
        try:
            self.mirror.sync()
        except (OSError, ValueError) as e:  # an unreachable store must not kill training; retried next time
            print(f"raybert: could not upload metrics to {self.mirror.loc}: {e}", flush=True)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
