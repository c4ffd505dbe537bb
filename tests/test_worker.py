"""The worker toolkit (pipelines/training/worker.py, run_log.py, watchdog.py, trainer.py) and the pretraining loop's parts: threads from held
CPUs, the background metrics writer, the heartbeat and the driver's stall watchdog, the measured
MFU peak, the stop policy and the on-device metrics window. Two tests read one real job on a
2-CPU Ray: one worker holding 1.5 CPUs trains on 2 threads with an honest MFU, then its stalled
rank ends the job with TrainingStalled, a kept checkpoint and a `failed` ledger record."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from pipelines.training.run_plan import LRSchedule, StopPolicy, TimeBudget, lr_factor
from pipelines.training.loop import MetricsWindow
from pipelines.training.run_log import MetricsWriter
from pipelines.training.config import FAULT_DRILL_ENV, FaultDrill, TrainConfig
from pipelines.training.watchdog import Heartbeat, TrainingStalled, fit_with_watchdog
from pipelines.training.worker import peak_flops, torch_threads_for


def test_threads_follow_the_cpus_held_rounded_up():
    assert [torch_threads_for(c) for c in (0.0, 0.5, 1.0, 1.5, 2.0, 7.25)] == [1, 1, 1, 2, 2, 8]
    assert torch_threads_for(1.5, override=1) == 1
    with pytest.raises(ValueError, match="torch_threads"):
        torch_threads_for(2.0, override=0)


def test_metrics_writer_appends_in_order_from_its_thread(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}\n')  # a previous invocation's lines are kept
    log = MetricsWriter(path)
    for i in range(200):
        log.write({"step": i})
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"event": "start"} and [x["step"] for x in lines[1:]] == list(range(200))
    MetricsWriter(None).write({"step": 1})  # ranks > 0: a no-op, no file


def test_metrics_writer_mirrors_numeric_fields_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log.write({"event": "start", "step": 0, "world_size": 2})  # bookkeeping: no curves
    for i in range(1, 4):
        log.write({"step": i * 10, "loss": 10.0 - i, "mfu": 0.1 * i, "time": 1e9 + i, "epoch": 0})
    log.write({"step": 30, "val_loss": 6.5, "early_stop": True})  # bools are not curves
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "mfu", "val_loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 9.0), (20, 8.0), (30, 7.0)]
    assert [e.wall_time for e in events.Scalars("loss")] == [1e9 + 1, 1e9 + 2, 1e9 + 3]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(30, 6.5)]


def test_metrics_reach_a_remote_run_dir_when_synced_not_only_at_close(tmp_path):
    """A remote run dir's metrics are a local file mirrored every 30 s and at close: a run killed
    in between (kill -9: no close) lost them on the store. The loop calls `sync()` before each
    checkpoint, which uploads at once, without waiting for the mirror interval or the close."""
    from pipelines.storage import Mirror

    staging, remote = tmp_path / "staging", tmp_path / "remote"
    staging.mkdir()
    remote.mkdir()  # a stand-in for the store (which needs no directories)
    log = MetricsWriter(staging / "metrics.jsonl", mirror=Mirror(str(staging), str(remote)))
    for step in (5, 10):
        log.write({"step": step, "loss": 9.0})
    log.sync()
    uploaded, deadline = [], time.time() + 10
    while time.time() < deadline and len(uploaded) < 2:
        time.sleep(0.05)
        text = (remote / "metrics.jsonl").read_text() if (remote / "metrics.jsonl").exists() else ""
        uploaded = [json.loads(x)["step"] for x in text.splitlines()]
    assert uploaded == [5, 10]
    log.close()


def test_heartbeat_publishes_step_and_phase(tmp_path):
    path = tmp_path / "heartbeat.json"
    hb = Heartbeat(path, interval_s=0.1)
    first = json.loads(path.read_text())
    assert (first["step"], first["phase"], first["stepped"]) == (0, "starting", False)
    hb.beat("data")
    hb.beat("step", 3)
    hb.beat("checkpoint")
    time.sleep(0.3)  # the thread writes meanwhile; close() leaves the final state in any case
    hb.close()
    last = json.loads(path.read_text())
    assert (last["step"], last["phase"], last["ticks"], last["stepped"]) == (3, "checkpoint", 3, True)
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat.json"]  # no temp files left


class _BlockingTrainer:
    """fit() blocks like a hung Ray Train run (until interrupted), or returns `result`; with
    `heartbeat`, rank 0 writes that one heartbeat as the run starts, then nothing more."""

    def __init__(self, seconds: float = 60, result=None, heartbeat: tuple = ()):
        self.seconds, self.result, self.heartbeat = seconds, result, heartbeat

    def fit(self):
        if self.heartbeat:
            _write_heartbeat(*self.heartbeat[:1], **self.heartbeat[1])
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            time.sleep(0.05)
        return self.result


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """The watchdog stops a fit as Ctrl-C would (`_thread.interrupt_main`), which runs whatever SIGINT
    handler is installed. A handler left by an earlier test in the same pytest process (the full
    suite's CI run at faec314 showed one that swallowed the interrupt) must not decide these
    tests: each runs with Python's own, as a fresh `raybert` process does, and gets the old one back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_heartbeat(run_dir: Path, **fields) -> None:
    (run_dir / "heartbeat.json").write_text(json.dumps({"time": time.time(), "ticks": 1, **fields}))


@pytest.mark.timeout(60)
def test_watchdog_names_workers_when_no_heartbeat_ever_appears(tmp_path):
    # A previous invocation's heartbeat (older than this fit) must not count as a live worker.
    (tmp_path / "heartbeat.json").write_text(json.dumps({"time": time.time() - 3600, "step": 9, "phase": "step"}))
    before = signal.getsignal(signal.SIGINT)
    t = time.monotonic()
    with pytest.raises(TrainingStalled) as e:
        fit_with_watchdog(_BlockingTrainer(), tmp_path, stall_timeout_s=1.0, startup_s=2.0)
    assert 2.0 <= time.monotonic() - t < 10
    assert e.value.stage == "workers" and e.value.step is None
    assert "no worker ever started" in str(e.value) and "resources" in str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.timeout(60)
def test_watchdog_names_the_stage_a_started_run_is_stuck_in(tmp_path):
    trainer = _BlockingTrainer(heartbeat=(tmp_path, dict(step=7, phase="data", stepped=True)))
    with pytest.raises(TrainingStalled) as e:
        fit_with_watchdog(trainer, tmp_path, stall_timeout_s=1.5, startup_s=30.0)
    assert e.value.stage == "data" and e.value.step == 7 and e.value.waited_s >= 1.5
    msg = str(e.value)
    assert "stuck in 'data' after step 7" in msg and "Ray Data" in msg


@pytest.mark.timeout(60)
def test_watchdog_names_the_data_stage_when_the_first_batch_never_comes(tmp_path):
    """Issue #34: a JSON Lines corpus sat in phase 'data' before step 0 until killed, and the
    watchdog's start-up allowance (600 s) said nothing. Waiting for the first batch now gets
    FIRST_BATCH_S (or the stall timeout if shorter), and the error names the Ray Data stage."""
    from pipelines.training.watchdog import FIRST_BATCH_S, _allowed_s

    waiting = {"phase": "data", "step": 0, "stepped": False}
    assert FIRST_BATCH_S == 90 and _allowed_s(waiting, 300.0, 600.0) == 90  # the defaults: 90 s, not 600
    assert _allowed_s({"phase": "starting", "stepped": False}, 300.0, 600.0) == 600  # engine set-up keeps its time
    assert _allowed_s({"phase": "data", "stepped": True}, 300.0, 600.0) == 300  # later batches: the stall timeout
    stage = "Ray Data stage 'Project' of dataset 'train' holds 3 input block(s) and has produced nothing (0.5 of 2 CPUs free)"
    trainer = _BlockingTrainer(heartbeat=(tmp_path, dict(step=0, phase="data", stepped=False)))
    t = time.monotonic()
    with pytest.raises(TrainingStalled) as e:
        fit_with_watchdog(trainer, tmp_path, stall_timeout_s=1.5, startup_s=30.0, report=lambda: stage)
    assert time.monotonic() - t < 15  # the first-batch allowance, not start-up's 30 s
    msg = str(e.value)
    assert e.value.stage == "data" and "no batch reached the workers (stuck in 'data' before the first step" in msg
    assert stage in msg and "Ray Data" in msg


@pytest.mark.timeout(60)
def test_watchdog_lets_a_progressing_or_finished_fit_through(tmp_path):
    assert fit_with_watchdog(_BlockingTrainer(0.1, result="done"), tmp_path, 1.0, startup_s=1.0) == "done"
    assert fit_with_watchdog(_BlockingTrainer(0.1, result="off"), tmp_path, None) == "off"

    class Progressing(_BlockingTrainer):
        def fit(self):  # a step every 0.3 s for 6 s: longer than the timeout, never stalled
            for step in range(1, 21):
                _write_heartbeat(tmp_path, step=step, phase="step", stepped=True)
                time.sleep(0.3)
            return "trained"

    assert fit_with_watchdog(Progressing(), tmp_path, stall_timeout_s=3.0, startup_s=3.0) == "trained"


def test_fault_drill_comes_from_the_environment_only(monkeypatch):
    assert "kill_rank" not in TrainConfig.__dataclass_fields__
    monkeypatch.delenv(FAULT_DRILL_ENV, raising=False)
    assert FaultDrill.from_env() == FaultDrill()
    monkeypatch.setenv(FAULT_DRILL_ENV, json.dumps({"stall_at_step": 4}))
    assert FaultDrill.from_env().stall_at_step == 4


def test_peak_flops_is_measured_once_then_read_from_the_run_dir(tmp_path, monkeypatch):
    import pipelines.training.worker as w

    peak = peak_flops(tmp_path, torch.device("cpu"), "fp32", torch.get_num_threads())
    assert 1e9 < peak < 1e14  # a CPU: between 1 GFLOP/s and 100 TFLOP/s
    (key, cached), = json.loads((tmp_path / "peak_flops.json").read_text()).items()
    assert cached == peak and key.endswith(f"|fp32|{torch.get_num_threads()}")

    def fail(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(w, "measure_peak_flops", fail)
    assert peak_flops(tmp_path, torch.device("cpu"), "fp32", torch.get_num_threads()) == peak


def test_stop_policy_ends_at_the_first_limit():
    tc = TrainConfig(max_steps=100, stop_at=80, steps_per_run=30)
    assert StopPolicy.for_invocation(tc, 20).end == 50
    assert StopPolicy.for_invocation(tc, 60).end == 80
    assert not StopPolicy.for_invocation(TrainConfig(max_steps=100), 0).timed
    now = time.time()
    budget = StopPolicy(end=100, time_budget_s=10, t_start=now - 11)
    assert budget.timed and budget.late(now, 5)
    deadline = StopPolicy(end=100, deadline=now + 30, step_s=1.0, save_s=5.0)
    assert not deadline.late(now, 10)  # 10 steps + 2 saves = 20 s < 30 s
    assert deadline.late(now, 25)  # 35 s > 30 s


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_schedule_replans_its_end_without_a_jump(decay):
    """A budget moves the schedule's end as its step-time estimate changes: the multiplier stays
    continuous at every re-plan, never rises after warmup, and is at its floor at the final end."""
    plain = LRSchedule(10, 100, decay, 0.1)
    assert [plain(s) for s in range(0, 120, 7)] == [lr_factor(s, 10, 100, decay, 0.1) for s in range(0, 120, 7)]
    sched, values = LRSchedule(10, 1000, decay, 0.1), []
    for step in range(0, 161):
        if step in (5, 40, 90, 120):  # during warmup, then shorter, longer and shorter again
            before = sched(step)
            sched.replan(step, {5: 500, 40: 100, 90: 200, 120: 160}[step])
            assert sched(step) == pytest.approx(before, abs=1e-12)
        values.append(sched(step))
    assert values[9] == pytest.approx(1.0) and values[160] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(values[10:], values[11:]))
    moved = LRSchedule(10, 1000, decay, 0.1)
    moved.load(sched.state())
    assert [moved(s) for s in range(150, 170)] == [sched(s) for s in range(150, 170)]


def test_time_budget_plans_from_the_rate_after_the_first_step():
    b = TimeBudget.resume(100.0, None, step=0, now=1000.0)
    assert b.observe(1, 1004.0) == 0.0  # the first step carries start-up: no figure yet
    assert b.observe(11, 1009.0) == 0.5  # then timed from the first step's end
    assert b.used(1009.0) == 9.0
    assert TimeBudget.planned_end(100.0, 11, 9.0, 0.5, 1.0) == 11 + 180  # (100 - 9 - 1) / 0.5
    assert TimeBudget.planned_end(100.0, 11, 120.0, 0.5, 1.0) == 11  # spent
    later = TimeBudget.resume(100.0, b.state(1009.0), step=11, now=2000.0)  # a new invocation
    assert later.used(2001.0) == 10.0 and later.observe(12, 2001.0) == 0.5  # the carried rate, not 1 s


def test_metrics_window_sums_on_the_device_and_resets():
    w = MetricsWindow(torch.device("cpu"))
    w.add(torch.tensor(2.0), torch.tensor(3), 4)
    w.add(torch.tensor(1.0), torch.tensor(1), 4)
    w.steps = 2
    loss, acc, seconds, steps = w.reduce()
    assert loss == pytest.approx(1.5) and acc == pytest.approx(0.5) and steps == 2 and seconds > 0
    assert w.sums.tolist() == [0.0, 0.0, 0.0] and w.steps == 0


# --------------------------------------------------------------------------------------------
# The real job on a 2-CPU Ray
# --------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from pipelines.corpora import peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    return write_corpus(peoples_daily_sentences()[:420], str(tmp_path_factory.mktemp("corpus") / "zh"),
                        rows_per_file=140)


def _one_worker(run_dir: Path, corpus: str, **train):
    from jobs.pretrain import preset_config
    from pipelines.corpora import chinese_vocab_path

    cfg = preset_config("debug")
    cfg.run_dir = str(run_dir)
    cfg.data.paths = [corpus]
    cfg.data.tokenizer = str(chinese_vocab_path())
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.max_failures = 1, 1.5, 0
    cfg.data.val_fraction = 0.0  # no val metrics are read: one Ray Data pipeline fewer
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def stalled_run(corpus, tmp_path_factory):
    """One real job on a 2-CPU Ray serves both tests below (a Ray Train start costs ~30 s on 2
    cores): one worker holding 1.5 CPUs logs every 3 steps, checkpoints at 12, then its rank 0 hangs
    (the fault drill) until the stall watchdog (15 s) ends the job. Returns (run_dir, cfg, the
    TrainingStalled raised, the Ray cluster's CPUs)."""
    from conftest import fast_train_settings, local_ray
    from jobs.pretrain import main

    run_dir = tmp_path_factory.mktemp("stalled") / "run"
    cfg = _one_worker(run_dir, corpus, max_steps=40, log_every=3, eval_every=100, save_every=12,
                      stall_timeout_s=15.0)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # see _python_sigint_handler
    try:
        with pytest.MonkeyPatch.context() as mp, fast_train_settings(), local_ray() as ray:
            mp.setenv(FAULT_DRILL_ENV, json.dumps({"stall_at_step": 12}))
            cpus = ray.cluster_resources()["CPU"]
            with pytest.raises(TrainingStalled) as e:
                main(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    return run_dir, cfg, e.value, cpus


@pytest.mark.timeout(300)
def test_one_worker_holding_1_5_cpus_trains_on_2_threads_with_an_honest_mfu(stalled_run):
    from bert_core.model import mlm_flops_per_token, preset
    from jobs.pretrain import read_metrics

    run_dir, cfg, _, cpus = stalled_run
    assert cpus == 2
    records = read_metrics(run_dir)
    (start,) = [r for r in records if r.get("event") == "start"]
    assert start["threads"] == 2 and start["world_size"] == 1
    assert start["omp_wait_policy"] == "PASSIVE"  # idle OpenMP threads don't spin against data tasks
    logged = [r for r in records if "mfu" in r]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    peaks = json.loads((run_dir / "peak_flops.json").read_text())
    (key, measured), = peaks.items()
    assert key.endswith("|fp32|2")
    fpt = mlm_flops_per_token(preset("debug", vocab_size=21128), cfg.data.seq_len, 0.15)
    for r in logged:
        assert r["peak_flops"] == pytest.approx(measured) == start["peak_flops"]
        assert 0 < r["mfu"] < 1.0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / r["peak_flops"], rel=0.15)


@pytest.mark.timeout(300)
def test_watchdog_ends_a_stalled_run_keeping_its_checkpoint(stalled_run):
    """Rank 0 hangs after step 12 (and its checkpoint): the job ends with TrainingStalled at stage
    "step" within the timeout plus a few polls, checkpoint 12 is on disk, and the ledger says failed."""
    from pipelines.training.run_dir import latest_step

    run_dir, _, stalled, _ = stalled_run
    assert stalled.stage == "step" and stalled.step == 12
    assert 15 <= stalled.waited_s < 30
    assert "after step 12" in str(stalled)
    assert (run_dir / "fault_drill_stall_step12.done").is_file()
    assert (run_dir / "checkpoint_00000012" / "raybert_state.json").is_file() and latest_step(run_dir) == 12
    ledger = [json.loads(x) for x in (run_dir / "runs.jsonl").read_text().splitlines()]
    assert ledger[-1]["status"] == "failed" and "TrainingStalled" in ledger[-1]["error"]
