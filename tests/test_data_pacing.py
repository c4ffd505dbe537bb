"""pipelines/data_pacing.py: the backoff for Ray Data 2.60's idle scheduling loop. It sleeps only
when no task runs, and it reaches the datasets training builds (through their DataContext)."""

from __future__ import annotations

import time

from pipelines.data_pacing import IDLE_SLEEP_S, IdleSchedulerBackoff, executor_is_idle, pace_idle_data_scheduler


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
    IdleSchedulerBackoff().on_execution_step(executor)
    return time.perf_counter() - t0


def test_backs_off_only_when_no_task_runs():
    assert executor_is_idle(_Executor(0, 0)) and not executor_is_idle(_Executor(0, 2))
    assert _step_seconds(_Executor(0, 0)) >= IDLE_SLEEP_S * 0.9
    assert _step_seconds(_Executor(1, 0)) < IDLE_SLEEP_S / 2  # tasks running: Ray's own ray.wait paces the loop
    assert not executor_is_idle(object())  # an executor it doesn't understand is left alone
    assert _step_seconds(object()) < IDLE_SLEEP_S / 2


def test_training_datasets_carry_the_backoff(ray_local, tmp_path):
    import ray.data

    from pipelines.corpora import chinese_vocab_path
    from pipelines.pretrain_data import DataConfig, build_datasets, write_corpus

    ctx = ray.data.DataContext.get_current()
    saved = list(ctx.custom_execution_callback_classes)
    try:
        ctx.custom_execution_callback_classes[:] = []
        corpus = write_corpus(["一二三四五六七八九十"] * 20, str(tmp_path / "c.parquet"))
        ds = build_datasets(DataConfig(paths=[corpus], val_fraction=0.0), str(chinese_vocab_path()))["train"]
        assert IdleSchedulerBackoff in ds.context.custom_execution_callback_classes
        assert ds.context.execution_callback_classes.count(IdleSchedulerBackoff) == 1
        pace_idle_data_scheduler()  # idempotent
        assert ctx.custom_execution_callback_classes.count(IdleSchedulerBackoff) == 1
    finally:
        ctx.custom_execution_callback_classes[:] = saved
