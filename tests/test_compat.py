"""pipelines/compat.py: each workaround for a library behaviour still applies (the behaviour is
still there, so the workaround is needed, and the workaround still works). When an upgrade removes
the behaviour, the first assertion of its test fails and says the workaround can go."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.compat import IDLE_SLEEP_S, executor_is_idle, idle_scheduler_backoff, pace_idle_data_scheduler

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_runs_without_ray_train_placement_group_cleaner(tmp_path):
    """Ray 2.60's cleaner removed a live run's placement group on an empty state-API lookup under
    load (two CI failures: "Destroying worker since its placement group was removed"); our trainer
    leaves it out and keeps every other default callback."""
    from ray.train.torch import TorchTrainer

    from pipelines.training.trainer import torch_trainer

    trainer = torch_trainer(print, {}, run_dir=tmp_path / "run", num_workers=1, use_gpu=False, cpus_per_worker=1.0,
                            max_failures=0, keep_last=1, datasets={})
    ours = [type(c).__name__ for c in trainer._create_default_callbacks()]
    ray_default = [type(c).__name__ for c in TorchTrainer._create_default_callbacks(trainer)]
    assert "PlacementGroupCleanerCallback" in ray_default and "PlacementGroupCleanerCallback" not in ours
    assert ours == [c for c in ray_default if c != "PlacementGroupCleanerCallback"]


def test_sweep_trials_record_their_placement_group_through_a_train_callback(tmp_path):
    """The sweep's trials record their worker group's placement group (released when Tune stops a
    trial: its controller dies with it and Ray Train 2.60 leaves the group reserved, without the
    cleaner above). Ray Train must still run a non-UserCallback passed in RunConfig as its own, with
    the `after_worker_group_start` hook and the state chain the recorder reads; when it stops, this
    fails (and tests/test_finetune.py's sweep finds the CPUs still held)."""
    import inspect

    from ray.train.v2._internal.execution.worker_group import WorkerGroup
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState

    from pipelines.compat import placement_group_recorder
    from pipelines.training.trainer import torch_trainer

    recorder = placement_group_recorder(str(tmp_path / "pg"))
    trainer = torch_trainer(print, {}, run_dir=tmp_path / "run", num_workers=1, use_gpu=False, cpus_per_worker=1.0,
                            max_failures=0, keep_last=1, datasets={}, callbacks=[recorder])
    assert recorder in trainer._create_default_callbacks()  # run by Ray Train itself, not the user handler
    assert "placement_group_handle" in inspect.signature(WorkerGroupState).parameters
    assert callable(WorkerGroup.get_worker_group_state)

    class FakeGroup:  # the recorder never fails the run, whatever the internals look like
        def get_worker_group_state(self):
            raise AttributeError("moved")

    recorder.after_worker_group_start(FakeGroup())
    assert not (tmp_path / "pg").exists()


def test_deepspeed_loads_without_importing_mlflow():
    """DeepSpeed 0.19's autotuner imports MLflow when it is installed: most of `import deepspeed`,
    paid by every training worker. import_deepspeed hides MLflow while DeepSpeed loads (the
    autotuner goes without), and MLflow still imports afterwards for raybert's tracker. When a
    DeepSpeed upgrade drops that import, the first assertion says the workaround can go."""
    import importlib.util
    import subprocess
    import sys

    (pkg,) = importlib.util.find_spec("deepspeed").submodule_search_locations
    assert "import mlflow" in Path(pkg, "autotuning", "autotuner.py").read_text()
    code = ("import sys; from pipelines.compat import import_deepspeed; ds = import_deepspeed(); "
            "assert 'mlflow' not in sys.modules and ds.autotuning.autotuner.has_mlflow is False; "
            "import logging; logging.getLogger('DeepSpeed').warning('to stderr please'); "
            "import mlflow; print('mlflow', mlflow.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "mlflow " in out.stdout, out.stdout + out.stderr
    # The same process shows DeepSpeed's log on stderr (test_deepspeed_logs_to_stderr_...): its
    # import-time "Setting accelerator" line and later lines, and stdout holds only our print.
    assert out.stdout.startswith("mlflow ") and out.stdout.count("\n") == 1, out.stdout
    assert "to stderr please" in out.stderr


def test_deepspeed_comm_ops_are_not_jit_built():
    """DeepSpeed 0.19 probes (and may JIT-build) its shm/ccl comm ops the first time
    `deepspeed.ops.__compatible_ops__` is read, from deepspeed/comm: ~30 s and 1.5 GB on CPU.
    disable_deepspeed_jit fills the dict first, so the probe never runs."""
    (pkg,) = importlib.util.find_spec("deepspeed").submodule_search_locations
    assert "_probe_compatible_ops()" in Path(pkg, "ops", "__init__.py").read_text()  # still lazy and probing
    assert "__compatible_ops__" in Path(pkg, "comm", "torch.py").read_text()  # still read by comm
    code = ("import deepspeed.ops as ops\n"
            "ops._probe_compatible_ops = lambda: (_ for _ in ()).throw(AssertionError('probed'))\n"
            "from pipelines.compat import disable_deepspeed_jit; disable_deepspeed_jit()\n"
            "assert ops.__compatible_ops__['deepspeed_shm_comm'] is False and ops.__compatible_ops__['deepspeed_ccl_comm'] is False\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_ray_jobs_errors_still_carry_the_status_only_in_their_text():
    """The Ray Jobs client raises RuntimeError("Request failed with status code N: ...") with no
    status attribute; http_status reads N back. When Ray gives the error a type or a status, the
    first assertion fails and http_status can go."""
    import inspect

    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    from pipelines.compat import http_status

    assert 'RuntimeError(\n            f"Request failed with status code {r.status_code}' in inspect.getsource(
        SubmissionClient._raise_error)
    assert http_status(RuntimeError("Request failed with status code 404: Job not found.")) == 404
    assert http_status(RuntimeError("Failed to connect")) is None



# Ray Data 2.60's idle scheduling loop (pace_idle_data_scheduler): it sleeps only when no task runs,
# and it reaches the datasets training builds (through their DataContext).

def test_ray_data_scheduling_loop_still_skips_its_wait_when_no_task_runs():
    """The behaviour the backoff answers, and the hook and attribute it relies on. When Ray waits
    even with no task active, the first assertion fails and the backoff can go."""
    import inspect

    from ray.data._internal.execution import streaming_executor, streaming_executor_state

    waits = inspect.getsource(streaming_executor_state.process_completed_tasks)
    assert "if active_tasks:" in waits and waits.index("if active_tasks:") < waits.index("ray.wait(")
    loop = inspect.getsource(streaming_executor.StreamingExecutor)
    assert "callback.on_execution_step(self)" in loop and "self._topology = " in loop


class _Op:
    def __init__(self, active: int):
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


class _Executor:
    def __init__(self, *active: int):
        self._topology = {_Op(a): None for a in active}


def _step_seconds(executor) -> float:
    t0 = time.perf_counter()
    idle_scheduler_backoff()().on_execution_step(executor)
    return time.perf_counter() - t0


def test_idle_data_scheduler_backs_off_only_when_no_task_runs():
    assert executor_is_idle(_Executor(0, 0)) and not executor_is_idle(_Executor(0, 2))
    assert _step_seconds(_Executor(0, 0)) >= IDLE_SLEEP_S * 0.9
    assert _step_seconds(_Executor(1, 0)) < IDLE_SLEEP_S / 2  # tasks running: Ray's own ray.wait paces the loop
    assert not executor_is_idle(object())  # an executor it doesn't understand is left alone
    assert _step_seconds(object()) < IDLE_SLEEP_S / 2


def test_training_datasets_carry_the_idle_scheduler_backoff(ray_local, tmp_path):
    import ray.data

    from pipelines.corpora import chinese_vocab_path
    from pipelines.training.pretrain_data import DataConfig, build_datasets, check_corpus, write_corpus

    backoff = idle_scheduler_backoff()
    ctx = ray.data.DataContext.get_current()
    saved = list(ctx.custom_execution_callback_classes)
    try:
        ctx.custom_execution_callback_classes[:] = []
        corpus = write_corpus(["一二三四五六七八九十"] * 20, str(tmp_path / "c.parquet"))
        data, vocab = DataConfig(paths=[corpus], val_fraction=0.0), str(chinese_vocab_path())
        ds = build_datasets(data, vocab, check_corpus(data, vocab, rows_needed=1).pieces)["train"]
        assert backoff in ds.context.custom_execution_callback_classes
        assert ds.context.execution_callback_classes.count(backoff) == 1
        pace_idle_data_scheduler()  # idempotent
        assert ctx.custom_execution_callback_classes.count(backoff) == 1
    finally:
        ctx.custom_execution_callback_classes[:] = saved


def test_ray_data_v2_parquet_listing_still_asks_for_a_whole_cpu():
    """Ray Data 2.60 reads Parquet through V2 by default, and V2's ListFiles task sets no num_cpus
    (so Ray's default, 1 CPU, which CPU training workers may leave no room for). When either
    changes, parquet_reader_v1 can go. Within it the V1 reader is planned; after it, the setting is
    the caller's again."""
    import inspect

    import ray.data
    from ray.data import context
    from ray.data._internal.planner import plan_list_files_op

    from pipelines.compat import parquet_reader_v1

    assert context.DEFAULT_USE_DATASOURCE_V2 is True
    listing = inspect.getsource(plan_list_files_op)
    assert 'name="ListFiles"' in listing and "num_cpus" not in listing
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    with parquet_reader_v1():
        assert ctx.use_datasource_v2 is False
    assert ctx.use_datasource_v2 == before


def test_deepspeed_logs_to_stderr_so_stdout_keeps_a_commands_result():
    """DeepSpeed 0.19 logs through a handler on stdout ("Setting accelerator to CPU" landed ahead of
    `raybert pretrain`'s JSON); after import_deepspeed its log goes to stderr."""
    import inspect
    import logging

    import deepspeed.utils.logging as ds_logging

    assert "StreamHandler(stream=sys.stdout)" in inspect.getsource(ds_logging)
    # A fresh import, through import_deepspeed, in a subprocess: asserted in
    # test_deepspeed_loads_without_importing_mlflow (one DeepSpeed import fewer). Here, a DeepSpeed
    # imported before: its handler is pointed at stderr.
    from pipelines.compat import import_deepspeed

    import_deepspeed()
    handlers = [h for h in logging.getLogger("DeepSpeed").handlers if isinstance(h, logging.StreamHandler)]
    assert handlers and all(h.stream is not sys.stdout for h in handlers)


def test_row_hashes_are_ray_datas():
    """CPU scoring's row_hash is Ray Data's include_row_hash, computed as Ray 2.60 computes it (and
    read through its reader end to end in tests/test_scoring_pipeline.py::
    test_ids_from_file_and_row_hash_when_absent). A Ray that hashes otherwise fails here."""
    import numpy as np
    from ray.data._internal.datasource_v2.common.synthesized_columns import _compute_row_hashes

    from pipelines.compat import row_hashes

    for path, start, n in (("/data/in/x.parquet", 0, 100), ("bucket/key/y.parquet", 12_345, 7)):
        assert np.array_equal(row_hashes(path, start, n), _compute_row_hashes(path, start, n))
    assert row_hashes("/a", 0, 5).dtype == np.uint64


def test_ray_train_preemption_watcher_line_is_dropped_and_the_rest_printed(capsys):
    """Every fit printed Ray's E-level core_worker line about Ray Train's PreemptionWatcher
    ("constructor arguments in the object store and max_restarts > 0") at the default level. The
    driver's printer of forwarded lines drops it and prints the rest through Ray's own printer."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from conftest import local_ray
    from pipelines.compat import HARMLESS_FORWARDED, drop_forwarded_lines

    with local_ray():
        assert "ray_print_logs" in [name for name, _ in dispatcher.handlers]  # what the wrapper wraps
        assert drop_forwarded_lines() and drop_forwarded_lines()  # idempotent: wrapped once
        noise = (f"[2026-12-06 01:16:08,898 E 2534 2564] core_worker.cc:2465: Actor with class name: "
                 f"'PreemptionWatcher' and ID: 'ab' {HARMLESS_FORWARDED[0]}. If the arguments ...")
        capsys.readouterr()
        dispatcher.emit({"ip": "h", "localhost": "h", "pid": 4321, "is_err": True, "job": "01000000",
                         "actor_name": "TrainController", "lines": [noise, "a real error of the job"]})
        err = capsys.readouterr().err
    assert "a real error of the job" in err and "PreemptionWatcher" not in err


def test_a_harmless_ray_warning_goes_with_its_traceback_and_nothing_else():
    """On a loaded machine Ray Train's controller logs "Failed to send resource request ... safe to
    ignore" with a traceback (seen failing the console test's line count under load)."""
    from pipelines.compat import HARMLESS_FORWARDED, without_harmless

    logged = ["[raybert] step 5/10 loss 9.8",
              "Failed to send resource request for train-9939. If this only happens transiently during network "
              "partition or CPU being overloaded, it's safe to ignore this error. If this error persists, file a "
              "GitHub issue.",
              "Traceback (most recent call last):",
              '  File "/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58',
              "    ray.get(",
              "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
              "[raybert] step 10/10 loss 9.4",
              "ValueError: a real error of the job"]
    assert without_harmless(logged, HARMLESS_FORWARDED) == (
        ["[raybert] step 5/10 loss 9.8", "[raybert] step 10/10 loss 9.4", "ValueError: a real error of the job"], False)
    # A traceback split across two batches of the same process: the second batch's part goes too.
    first, skipping = without_harmless(logged[:4], HARMLESS_FORWARDED)
    assert first == logged[:1] and skipping
    assert without_harmless(logged[4:], HARMLESS_FORWARDED, skipping)[0] == logged[6:]


def test_starved_data_stage_names_the_stage_that_has_produced_nothing(tmp_path):
    """The first-batch watchdog's report: Ray Data's stats actor still says, per running dataset,
    which stage has produced no block yet (here a map whose tasks wait on a gate the test opens
    once it has read the report: nothing depends on how fast the machine is)."""
    import threading

    import ray.data

    from conftest import local_ray
    from pipelines.compat import starved_data_stage

    gate = str(tmp_path / "open")

    def slow(batch):
        end = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.1)
        return batch

    with local_ray():
        ds = ray.data.range(8, override_num_blocks=2).map_batches(slow, num_cpus=0.25)
        done = threading.Thread(target=lambda: ds.take_all(), daemon=True)
        done.start()
        reports = []
        deadline = time.monotonic() + 90  # the read and the map tasks' start, however slow the machine
        while not any("slow" in (r or "") for r in reports) and time.monotonic() < deadline:
            time.sleep(0.5)
            reports.append(starved_data_stage())
        open(gate, "w").close()
        done.join(60)
    report = reports[-1]
    assert report is not None and "Ray Data stage 'MapBatches(slow)' of dataset " in report, reports
    assert "has produced nothing" in report and "CPUs free" in report


def test_text_files_read_through_ray_datas_file_datasource_hooks():
    """compat.read_text_files subclasses FileBasedDatasource: `_read_stream(f, path)` is still the
    hook a read task calls per file, and `_open_input_source(filesystem, path)` with `_filesystem`
    still re-opens one (a CSV row longer than the block restarts its read). The behaviour it
    replaces is still Ray's: `select_columns` plans a separate projection stage of one CPU."""
    import inspect

    import ray.data
    from ray.data.datasource import FileBasedDatasource

    assert list(inspect.signature(FileBasedDatasource._read_stream).parameters) == ["self", "f", "path"]
    assert list(inspect.signature(FileBasedDatasource._open_input_source).parameters)[:3] == ["self", "filesystem", "path"]
    assert "self._filesystem" in inspect.getsource(FileBasedDatasource.__init__)
    assert inspect.signature(ray.data.Dataset.select_columns).parameters["num_cpus"].default is None


def test_a_quiet_dataset_has_its_own_context_and_quiets_only_its_own_runs(ray_local):
    """compat.quiet_dataset (score_dataset's console): Ray Data 2.60 binds a Dataset to its parent's
    context and runs it when the caller consumes it. The copy `Dataset.copy(_deep_copy=True)` makes
    has a context of its own, without bars or start lines, whose execution hooks turn Ray Data's
    INFO lines off while it runs and back on after; the caller's dataset keeps its context."""
    import logging

    import ray.data
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    from pipelines.compat import quiet_dataset

    data_log = logging.getLogger("ray.data")
    theirs = ray.data.range(8, override_num_blocks=2).map_batches(lambda b: b)
    # The caller's settings, whatever earlier code in this process made them: left as they are.
    before = (theirs.context.enable_progress_bars, theirs.context.print_on_execution_start)
    ours = quiet_dataset(theirs)
    assert ours.context is not theirs.context
    assert (theirs.context.enable_progress_bars, theirs.context.print_on_execution_start) == before
    assert not (ours.context.enable_progress_bars or ours.context.print_on_execution_start)
    assert [c.__name__ for c in ours.context.custom_execution_callback_classes].count("QuietRuns") == 1
    assert "QuietRuns" not in [c.__name__ for c in theirs.context.custom_execution_callback_classes]
    levels = []

    class Spy(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            levels.append(data_log.level)

    ours.context.custom_execution_callback_classes.append(Spy)
    assert sorted(r["id"] for r in ours.take_all()) == list(range(8))
    assert levels and set(levels) == {logging.WARNING}  # while it ran
    assert data_log.getEffectiveLevel() <= logging.INFO  # and after
