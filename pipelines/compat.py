"""Every workaround raybert carries for a behaviour of Ray, Ray Train, Ray Data or DeepSpeed, in one
place. Each says the version it targets and why, and has a test that fails when an upgrade makes it
unnecessary or stops it from working (tests/test_compat.py), so none outlives its reason.

- `import_deepspeed` (DeepSpeed 0.19): `import deepspeed` without the MLflow import its autotuner makes,
  and with its log on stderr (its handler writes to stdout, ahead of a command's JSON result).
- `disable_deepspeed_jit` (DeepSpeed 0.19): no JIT build of the shm/ccl comm ops on CPU.
- `without_placement_group_cleaner` (Ray 2.60): Ray Train's placement-group cleaner destroys live
  runs when a loaded head's state API answers empty.
- `placement_group_recorder` / `remove_placement_group_by_id` (Ray Train 2.60 under Ray Tune): a
  trial that Tune stops (ASHA) dies with its Train controller, whose placement group outlives
  them until the sweep's driver exits (the cleaner above is off), so the next trial waited forever
  for its CPUs. The trial records its placement group; the sweep removes it when the trial ends.
- `parquet_reader_v1` / `read_parquet_v1` (Ray Data 2.60): the V2 Parquet reader's file-listing
  task asks for a whole CPU, which CPU training workers may leave no room for (training then waits
  forever). Every Parquet read of a training job goes through it (`inputs.read_dataset`).
- `pace_idle_data_scheduler` (Ray Data 2.60): the streaming executor's scheduling loop spins when no
  task is running, a training dataset's steady state; a callback on Ray Data's internal execution
  hook sleeps 50 ms in such a step.
- `http_status` (Ray 2.60): the Ray Jobs client raises a bare RuntimeError for a failed request,
  with the HTTP status only in its text ("Request failed with status code 404: ...").
- `drop_forwarded_lines` (Ray 2.60): the driver prints what Ray's own processes log on stderr; the
  C++ warning that Ray Train's PreemptionWatcher actor has "constructor arguments in the object store
  and max_restarts > 0" came with every fit at the default level, reading as an error of the job,
  and on a loaded machine Ray Train's "Failed to send resource request ... safe to ignore" warning
  with a 27-line traceback (what failed the console test under load).
- `read_train_result` (Ray Train 2.60): `Result.from_path` logs "A run snapshot was found ..." (three
  lines, at INFO, on the root handler) each time a run dir's checkpoints are looked up, five times per
  rerun of a finished pretraining run, `--quiet` included.
- `starved_data_stage` (Ray Data 2.60): which stage of the job's running datasets has produced
  nothing yet, from Ray Data's stats actor (what the dashboard shows), for the training watchdog's
  report of a run whose first batch never came.
- `read_text_files` (Ray Data 2.60): CSV and JSON Lines read in Ray tasks through raybert's own
  reader (pipelines/text_formats.py), by subclassing Ray Data's `FileBasedDatasource` (its
  documented extension point is the private `_read_stream`; a long CSV row re-opens the file with
  its `_open_input_source` and `_filesystem`). Ray's `read_json` + `select_columns` gave a
  projection task asking for a whole CPU (a JSON Lines training corpus never reached step 0
  beside CPU training workers), read numbers in text columns through a float, and gave up on
  rows longer than its block.
- `quiet_dataset` (Ray Data 2.60): the Python API's lazy Dataset runs when the caller consumes it,
  outside any context of ours, and Ray Data has no per-dataset log level: the Dataset gets a
  DataContext of its own (`Dataset.copy`'s private `_deep_copy`) without progress bars or start
  lines, and an execution callback (Ray Data's internal hook, as `pace_idle_data_scheduler`) that
  turns Ray Data's INFO lines off while it runs.
- `row_hashes` (Ray Data 2.60): scoring reads Parquet without Ray Data but keys its rows, and
  names rows without ids, by Ray Data's `include_row_hash` (its private `_compute_row_hashes`,
  recomputed here), so outputs and fallback ids agree with a plain Ray read's and with outputs
  written before.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import time
from typing import NamedTuple, Optional

from pipelines.console import DropMessages


_NO_ACCELERATOR_NOTE = DropMessages("Setting accelerator to CPU")


def import_deepspeed():
    """`import deepspeed`, without the MLflow import that DeepSpeed's autotuner makes on the way.

    DeepSpeed 0.19's `deepspeed.autotuning.autotuner` (loaded by `import deepspeed` itself, through
    `runtime.config`) tries `import mlflow` to log autotuning experiments, which raybert never
    runs. Where MLflow is installed, that import is most of `import deepspeed`: 2.8 of 3.5 s of CPU
    on a 2-core EPYC, paid by every training worker and by the driver. While DeepSpeed loads,
    `mlflow` is hidden (None in sys.modules makes `import mlflow` raise ImportError, which the
    autotuner catches); afterwards it imports as usual, for raybert's own MLflow tracker.

    DeepSpeed's logger ("DeepSpeed") writes to stdout through its own handler, so its lines ("Setting
    accelerator to CPU", ...) came ahead of the JSON a command prints there and `json.load(stdout)`
    failed; the handler is made on stderr (or pointed there, if DeepSpeed was imported before).
    """
    import sys

    from pipelines.console import VERBOSE, verbosity

    if verbosity() != VERBOSE:
        # Its accelerator probe warns "Setting accelerator to CPU" in every process on a CPU machine;
        # raybert chose the device already (--use-gpu/--cpu). A filter on the logger outlives
        # DeepSpeed's own set-up of it at import.
        logging.getLogger("DeepSpeed").addFilter(_NO_ACCELERATOR_NOTE)
    if "deepspeed" not in sys.modules:
        hide = "mlflow" not in sys.modules
        if hide:
            sys.modules["mlflow"] = None
        try:
            # Its logger's handler takes sys.stdout as it is at import: stderr, here.
            with contextlib.redirect_stdout(sys.stderr):
                importlib.import_module("deepspeed")
        finally:
            if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
                del sys.modules["mlflow"]
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return sys.modules["deepspeed"]


def disable_deepspeed_jit() -> None:
    """Keep DeepSpeed from JIT-compiling its shm/ccl comm ops on init (~30 s, 1.5 GB on CPU).

    `deepspeed.ops.__compatible_ops__` is a lazily probed dict (probing spawns compilers); setting
    it before first access skips the probe too. Only deepspeed/comm reads it (0.19.8), and gloo /
    nccl collectives work without those ops.
    """
    import_deepspeed()
    import deepspeed.ops as ops

    compat = ops.__dict__.setdefault("__compatible_ops__", {})
    compat["deepspeed_shm_comm"] = False
    compat["deepspeed_ccl_comm"] = False


def without_placement_group_cleaner(trainer):
    """Drop Ray Train 2.60's PlacementGroupCleaner from `trainer.fit()`.

    The cleaner polls the state API for the controller actor and removes the run's placement group
    when the lookup comes back empty, which a loaded head node's state API does now and then: the
    live run's workers are then destroyed ("Destroying worker since its placement group was
    removed") and the run fails. Our CI saw it twice in one run under load; later Ray treats an
    empty lookup as transient (ray-project/ray#65447). What the cleaner guards against, a
    controller that dies while its job driver lives on, ends with the driver here: Ray frees a
    job's placement groups when its driver exits.
    """
    make_callbacks = getattr(trainer, "_create_default_callbacks", None)
    if make_callbacks is None:  # a Ray without the hook: nothing to drop
        return trainer

    def callbacks():
        return [c for c in make_callbacks() if type(c).__name__ != "PlacementGroupCleanerCallback"]

    trainer._create_default_callbacks = callbacks
    return trainer


def placement_group_recorder(path: str):
    """A Ray Train callback (it runs in the controller) that writes the id of each worker group's
    placement group to `path` (a local path or URI), for `remove_placement_group_by_id`. Ray Train
    runs callbacks that aren't UserCallbacks as its own (data_parallel_trainer: "custom
    workarounds built on top of internal callbacks")."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            from pipelines import storage

            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                storage.write_text(path, pg.id.hex())
            except Exception as e:  # never fail the run for it: only the release after a stop is lost
                logging.getLogger(__name__).warning("can't record the placement group of %s: %s", path, e)

    return RecordPlacementGroup()


def remove_placement_group_by_id(hex_id: str) -> bool:
    """Remove the placement group `hex_id` unless it is gone already; True if this removed it."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id.strip())))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


@contextlib.contextmanager
def parquet_reader_v1():
    """Within it, `ray.data.read_parquet` plans with the V1 datasource, whose read tasks honour
    `num_cpus`.

    Ray 2.60's default V2 reader adds a file-listing task that asks for a whole CPU. When the
    Train workers hold all but a fraction of a CPU (2 workers x 0.75 CPU on a 2-CPU machine), that
    task is never scheduled and training waits forever without an error.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def read_parquet_v1(paths: list[str], **kwargs):
    """`ray.data.read_parquet` through the V1 datasource (`parquet_reader_v1`). The choice is made
    when the read is planned, so the context is restored right after."""
    import ray.data

    with parquet_reader_v1():
        return ray.data.read_parquet(paths, **kwargs)


def http_status(error: BaseException) -> Optional[int]:
    """The HTTP status of a failed Ray Jobs request, else None. Ray 2.60's
    `SubmissionClient._raise_error` keeps no status attribute or exception type, only this text."""
    m = re.match(r"Request failed with status code (\d+)", str(error))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Ray Data 2.60: the scheduling loop of an idle training dataset spins
# --------------------------------------------------------------------------------------------
# The streaming executor waits for task completions with `ray.wait(timeout=0.1)` but skips that
# wait when no task is active (`process_completed_tasks`: `if active_tasks:`), which is a training
# dataset's steady state (the pipeline runs ahead until backpressure pauses it, then waits for the
# trainer to take rows). The loop then spins: the SplitCoordinator took 80% of a core on a 2-core
# node (py-spy: budget arithmetic in `_scheduling_loop_step`), cores the training worker computes
# on. 50 ms is far below what a trainer takes to consume a block of packed rows, so noticing that
# 50 ms late costs nothing. It uses Ray Data's internal callback hook, so it is best effort: on a
# Ray without the hook nothing is registered, and an executor it doesn't understand is left alone.

IDLE_SLEEP_S = 0.05  # Ray waits up to 0.1 s per step when tasks run; a trainer takes a block in far longer


def executor_is_idle(executor) -> bool:
    """No operator of the executor's topology has a running task (False when that can't be told)."""
    try:
        return not any(op.num_active_tasks() for op in executor._topology)
    except Exception:
        return False


@functools.cache
def idle_scheduler_backoff():
    """The callback class that sleeps IDLE_SLEEP_S in a scheduling step when no task of the dataset
    is running; None on a Ray without the hook. Built on first use: importing this module imports
    no Ray."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:  # pragma: no cover - a Ray without the hook
        return None

    class IdleSchedulerBackoff(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            if executor_is_idle(executor):
                time.sleep(IDLE_SLEEP_S)

    return IdleSchedulerBackoff


def pace_idle_data_scheduler() -> bool:
    """Register the backoff in this process's DataContext (once); the datasets built after it
    carry it to their executor (for training, Ray Train's SplitCoordinator actor). Returns whether
    it is registered."""
    import ray.data

    backoff = idle_scheduler_backoff()
    if backoff is None:
        return False
    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    if backoff not in classes:
        classes.append(backoff)
    return True


# --------------------------------------------------------------------------------------------
# Ray 2.60: lines of Ray's own processes that are not errors of the user's job
# --------------------------------------------------------------------------------------------

# Substrings of forwarded lines dropped at the default level (`--verbose` shows them), each with the
# traceback that follows it:
# - Ray Train's PreemptionWatcher is created with its arguments in the object store and
#   max_restarts > 0, and the core worker warns about that at E level in the Train controller's
#   process (ray-project/ray#53727), once per fit.
# - Ray Train's controller re-sends its resource request to Ray's autoscaling coordinator every 20 s
#   with a 5 s timeout; on a loaded machine the call times out and it logs a warning with a
#   27-line traceback that says itself that it is "safe to ignore" when transient. The fit goes on.
HARMLESS_FORWARDED = ("has constructor arguments in the object store and max_restarts > 0",
                      "it's safe to ignore this error")
_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives its handler of forwarded worker output
# A line that continues a traceback: indented, its header, a chaining note, or the exception line.
_TRACEBACK_LINE = re.compile(r"^(\s|Traceback \(most recent call last\)|During handling of the above|"
                             r"The above exception|[\w.]+(Error|Exception|Timeout)\b)")


class Filtered(NamedTuple):
    kept: list  # the lines to print
    skipping: bool  # a traceback was still being skipped at the end


def without_harmless(lines: list, parts: tuple, skipping: bool = False) -> Filtered:
    """(`lines` without those containing any of `parts` and the traceback lines right after them,
    whether a traceback was still being skipped at the end)."""
    kept = []
    for line in lines:
        if any(p in line for p in parts):
            skipping = True
        elif not (skipping and (not line.strip() or _TRACEBACK_LINE.match(line))):
            skipping = False
            kept.append(line)
    return Filtered(kept, skipping)


def drop_forwarded_lines(parts: tuple = HARMLESS_FORWARDED) -> bool:
    """Wrap the driver's printer of forwarded worker output (Ray's `ray_print_logs` handler of
    `global_worker_stdstream_dispatcher`) so lines containing any of `parts`, and the traceback that
    follows one (in the same or the process's next batch), are not printed; the rest pass through
    Ray's own printer (prefixes, deduplication). Call after ray.init; returns whether the handler was
    found (False: nothing changed)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        for i, (name, handle) in enumerate(dispatcher.handlers):
            if name != _PRINT_HANDLER:
                continue
            if getattr(handle, "raybert_drops", None) == parts:
                return True  # wrapped already
            skipping: dict = {}  # (ip, pid) -> inside a dropped traceback at the end of its last batch

            def printer(data, handle=handle, skipping=skipping):
                source = (data.get("ip"), data.get("pid"))
                lines, skipping[source] = without_harmless(data.get("lines", []), parts, skipping.get(source, False))
                if lines:
                    handle({**data, "lines": lines})

            printer.raybert_drops = parts
            dispatcher.handlers[i] = (name, printer)
            return True
    return False


def read_train_result(path: str):
    """`ray.train.Result.from_path(path)`, without its "A run snapshot was found" INFO note (kept at
    `--verbose`)."""
    import ray.train

    from pipelines.console import VERBOSE, verbosity

    log = logging.getLogger("ray.train")
    saved = log.level
    if verbosity() != VERBOSE:
        log.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(path)
    finally:
        log.setLevel(saved)


# --------------------------------------------------------------------------------------------
# Ray Data 2.60: CSV and JSON Lines through raybert's reader
# --------------------------------------------------------------------------------------------


def read_text_files(names: list[str], fmt: str, columns: Optional[list], text_columns: tuple,
                    include_paths: bool, num_cpus: Optional[float]):
    """A Ray Dataset of CSV (`fmt` "csv") or JSON Lines ("json") files read in Ray tasks of
    `num_cpus` CPUs: Ray Data's file datasource (file order, compression by extension, the `path`
    column, retried I/O) parsing with `text_formats` (text columns as source text, long rows), only
    `columns` of each file, chosen inside the read task (no separate projection stage)."""
    import ray.data

    datasource = _text_files_datasource()(names, fmt=fmt, columns=columns, text_columns=text_columns,
                                          include_paths=include_paths)
    return ray.data.read_datasource(datasource, num_cpus=num_cpus)


@functools.cache
def _text_files_datasource():
    """The FileBasedDatasource subclass, made on first use (importing this module imports no Ray)."""
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    from pipelines.text_formats import csv_batches, json_table

    class TextFilesDatasource(FileBasedDatasource):  # Ray names its read stage "ReadTextFiles"
        def __init__(self, paths, *, fmt: str, columns: Optional[list], text_columns: tuple, **kwargs):
            super().__init__(paths, **kwargs)
            self.fmt, self.columns = fmt, columns
            self.text_columns = tuple(c for c in text_columns if c)

        def _read_stream(self, f, path: str):
            if self.fmt == "json":
                table = json_table(f.read_buffer(), path, self.text_columns, keep=self.columns)
                yield table.select(self.columns) if self.columns else table
                return
            given = [f]

            def open_stream():  # first the stream Ray opened; a row longer than the block re-opens the file
                return given.pop() if given else self._open_input_source(self._filesystem, path)

            for batch in csv_batches(open_stream, path, self.text_columns, self.columns):
                yield pa.Table.from_batches([batch])  # Ray Data's blocks are tables

    return TextFilesDatasource


# --------------------------------------------------------------------------------------------
# Ray Data 2.60: which stage of a dataset holds no data
# --------------------------------------------------------------------------------------------


def starved_data_stage(timeout_s: float = 10.0) -> Optional[str]:
    """For each running dataset of this job, the first stage that has produced nothing yet, the
    blocks queued at it, and the cluster's free CPUs, from Ray Data's stats actor (its private
    `get_datasets`, the dashboard's source); None when Ray Data can't tell."""
    import ray

    try:
        from ray.data._internal.stats import get_or_create_stats_actor

        job = ray.get_runtime_context().get_job_id()
        datasets = ray.get(get_or_create_stats_actor().get_datasets.remote(job), timeout=timeout_s)
    except Exception:  # a Ray without the actor, or one too busy to answer: the stall is still reported
        return None
    notes = []
    for tag, ds in datasets.items():
        if ds.get("state") != "RUNNING":
            continue
        for op in ds.get("operators", {}).values():
            if op.get("progress", 0) == 0 and op.get("state") != "FINISHED":
                queued = op.get("queued_blocks", 0)
                holds = f"holds {queued} input block(s) and " if queued else ""
                notes.append(f"Ray Data stage '{op.get('name')}' of dataset '{tag.split('_')[0]}' {holds}has produced "
                             f"nothing")
                break
    if not notes:
        return None
    free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
    return "; ".join(notes) + f" ({free:g} of {total:g} CPUs free)"


# --------------------------------------------------------------------------------------------
# Ray Data 2.60: one Dataset's runs, quiet
# --------------------------------------------------------------------------------------------


def quiet_dataset(ds):
    """`ds` with a DataContext of its own (a copy: the caller's other datasets keep theirs) that draws
    no progress bars and logs no "Starting execution" lines, each of whose runs has Ray Data's INFO
    lines off (`console.data_run_started` / `data_run_ended`, from the execution hooks; on a Ray
    without them, only the context's settings apply). Ray Data's note that the bars are off is
    dropped (`console.drop_data_notes`)."""
    from pipelines.console import drop_data_notes

    own = type(ds).copy(ds, _deep_copy=True)  # a shallow copy of the plan, bound to a copy of the context
    ctx = own.context
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    quiet = _quiet_runs()
    if quiet is not None and quiet not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, quiet]
    drop_data_notes()
    return own


@functools.cache
def _quiet_runs():
    """The callback class for `quiet_dataset`; None on a Ray without the hook. Built on first use."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except ImportError:  # pragma: no cover - a Ray without the hook
        return None
    from pipelines.console import data_run_ended, data_run_started

    class QuietRuns(ExecutionCallback):
        def before_execution_starts(self, executor) -> None:
            data_run_started()

        def after_execution_succeeds(self, executor) -> None:
            data_run_ended()

        def after_execution_fails(self, executor, error) -> None:
            data_run_ended()

    return QuietRuns


def row_hashes(path: str, start: int, n: int):
    """(n,) uint64: Ray Data's `row_hash` of rows start..start+n of file `path` (Ray 2.60,
    `_compute_row_hashes`: MD5 of the path seeds a position, splitmix64 mixes it)."""
    import hashlib

    import numpy as np

    seed = np.uint64(int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], byteorder="little"))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as it does in Ray's
        keys = seed + np.arange(start, start + n, dtype=np.uint64)
        keys ^= keys >> np.uint64(30)
        keys *= np.uint64(0xBF58476D1CE4E5B9)
        keys ^= keys >> np.uint64(27)
        keys *= np.uint64(0x94D049BB133111EB)
        keys ^= keys >> np.uint64(31)
    return keys
