"""Scheduled pretraining runs: budgeted invocations on one run dir continue each other, never
overlap, and leave one `runs.jsonl` record each (jobs/schedule.py, jobs/pretrain.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from jobs.pretrain import build_config, main, pretrain, read_metrics
from jobs.schedule import EXIT_LOCKED, LOCK_NAME, RunLock, RunLocked, latest_step, read_ledger
from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
from pipelines.pretrain_data import write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schedule_yaml(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sched")
    corpus = write_corpus(peoples_daily_sentences()[:420], str(d / "corpus.parquet"))
    cfg = {"data": {"paths": [corpus], "tokenizer": str(chinese_vocab_path()), "seq_len": 64},
           "train": {"max_steps": 40, "micro_batch_size": 8, "log_every": 5, "eval_every": 1000,
                     "save_every": 1000, "zero_stage": 1},
           "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0}}
    path = d / "schedule.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(RunLocked, match="in use by another invocation"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


@pytest.mark.timeout(900)
def test_budgeted_invocations_continue_the_run_and_never_overlap(schedule_yaml, tmp_path):
    """Acceptance 4: three invocations of 10 steps each take the run from 0 to 10, 20, 30 (each
    resuming the last one's checkpoint, with one runs.jsonl record each); a fourth, started as
    `python -m jobs.pretrain` in another process, holds the lock while an overlapping invocation is
    refused with exit status 75 and a clear message; the fourth then finishes at 40."""
    from conftest import local_ray

    run_dir = tmp_path / "run"
    with local_ray():  # one Ray for the three in-process invocations: they differ only in the lock
        for i in range(3):
            cfg = build_config("debug", str(schedule_yaml), {"run_dir": str(run_dir), "train.steps_per_run": 10})
            result = main(cfg)
            assert result.metrics["step"] == 10 * (i + 1)
            assert Path(result.checkpoint).name == f"checkpoint_{10 * (i + 1):08d}"
    ledger = read_ledger(run_dir)
    assert len(ledger) == 3
    assert [(r["status"], r["start_step"], r["end_step"], r["steps"]) for r in ledger] == [
        ("ok", 0, 10, 10), ("ok", 10, 20, 10), ("ok", 20, 30, 10)]
    assert all(r["start"] <= r["end"] and r["checkpoint"].endswith(f"{r['end_step']:08d}") for r in ledger)
    events = [(r["event"], r["step"]) for r in read_metrics(run_dir) if r.get("event") in ("start", "resume")]
    assert events == [("start", 0), ("resume", 10), ("resume", 20)]

    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.pretrain", "--config", str(schedule_yaml), "--preset", "debug",
         "--run-dir", str(run_dir), "--max-steps-per-run", "10", "--time-budget", "300"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = run_dir / LOCK_NAME
        deadline = time.time() + 120
        while f"pid {proc.pid}" not in (lock.read_text() if lock.exists() else "") and proc.poll() is None:
            assert time.time() < deadline, "the scheduled invocation never took the lock"
            time.sleep(0.2)
        refused = CliRunner().invoke(pretrain, ["--config", str(schedule_yaml), "--preset", "debug",
                                                "--run-dir", str(run_dir), "--max-steps-per-run", "10"])
        assert refused.exit_code == EXIT_LOCKED, refused.output
        assert "in use by another invocation" in refused.output and f"pid {proc.pid}" in refused.output
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert latest_step(run_dir) == 40
    ledger = read_ledger(run_dir)
    assert [r["status"] for r in ledger] == ["ok", "ok", "ok", "refused", "ok"]
    assert ledger[-1]["start_step"] == 30 and ledger[-1]["end_step"] == 40 and ledger[-1]["time_budget"] == 300
    assert ledger[-1]["pid"] == proc.pid
    steps = [r["end_step"] for r in ledger if r["status"] == "ok"]
    assert steps == sorted(steps) == [10, 20, 30, 40]


@pytest.mark.timeout(450)
def test_time_budget_ends_the_invocation_with_a_checkpoint(schedule_yaml, tmp_path):
    """--time-budget: the invocation stops taking steps early enough to checkpoint within it."""
    run_dir = tmp_path / "run"
    cfg = build_config("debug", str(schedule_yaml), {"run_dir": str(run_dir), "time_budget": 1.0,
                                                     "train.max_steps": 100_000})
    t0 = time.time()
    result = main(cfg)
    (record,) = read_ledger(run_dir)
    assert record["status"] == "ok" and 1 <= record["end_step"] < 100_000
    assert latest_step(run_dir) == record["end_step"] == result.metrics["step"]
    assert time.time() - t0 < 240
    # A run already at its max_steps: the next scheduled invocation trains nothing and says so.
    done = build_config("debug", str(schedule_yaml), {"run_dir": str(run_dir), "train.max_steps": record["end_step"]})
    main(done)
    last = read_ledger(run_dir)[-1]
    assert (last["status"], last["steps"], last["end_step"]) == ("complete", 0, record["end_step"])


@pytest.mark.timeout(900)
def test_ledger_says_where_training_resumed_and_an_incompatible_resume_changes_nothing(schedule_yaml, tmp_path):
    """Issue 10, defect 4. An invocation killed mid-report can leave a checkpoint directory that Ray
    never registered (planted here: checkpoint 10 copied as step 20). The next invocation resumes
    from the registered checkpoint 10, and runs.jsonl must say so (start 10, end 20, 10 steps), not
    start from the stray 20. Then an invocation with another preset is refused on the driver within
    20 s, naming what differs, and leaves the run dir byte for byte as it was."""
    import json
    import shutil

    from conftest import local_ray

    run_dir = tmp_path / "run"
    with local_ray():
        main(build_config("debug", str(schedule_yaml), {"run_dir": str(run_dir), "train.steps_per_run": 10}))
        stray = run_dir / "checkpoint_00000020"
        shutil.copytree(run_dir / "checkpoint_00000010", stray)
        state = json.loads((stray / "raybert_state.json").read_text())
        (stray / "raybert_state.json").write_text(json.dumps(dict(state, step=20)))
        assert latest_step(run_dir) == 10  # Ray's registered latest, not the newest directory
        result = main(build_config("debug", str(schedule_yaml), {"run_dir": str(run_dir), "train.steps_per_run": 10}))
    assert result.metrics["step"] == 20 and latest_step(run_dir) == 20
    assert [(r["status"], r["start_step"], r["end_step"], r["steps"]) for r in read_ledger(run_dir)] == [
        ("ok", 0, 10, 10), ("ok", 10, 20, 10)]
    events = [(r["event"], r["step"]) for r in read_metrics(run_dir) if r.get("event") in ("start", "resume")]
    assert events == [("start", 0), ("resume", 10)]

    def snapshot() -> dict:
        return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
                for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    t0 = time.time()
    refused = CliRunner().invoke(pretrain, ["--config", str(schedule_yaml), "--preset", "mini",
                                            "--run-dir", str(run_dir), "--max-steps-per-run", "10"])
    assert time.time() - t0 < 20
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output[-3000:]
    (error,) = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert "can't resume" in error and "model hidden_size 64 -> 256" in error and "new --run-dir" in error
    assert snapshot() == before

    # A registered checkpoint deleted by hand: one Error line naming the run dir, not a Ray traceback.
    shutil.rmtree(run_dir / "checkpoint_00000020")
    broken = CliRunner().invoke(pretrain, ["--config", str(schedule_yaml), "--preset", "debug", "--run-dir", str(run_dir)])
    assert broken.exit_code == 1 and "Traceback" not in broken.output, broken.output[-3000:]
    assert "checkpoint record can't be read" in broken.output and str(run_dir) in broken.output
