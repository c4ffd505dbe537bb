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
from jobs.schedule import EXIT_LOCKED, LOCK_NAME, RUNNING_NAME, RunLock, RunLocked, read_ledger
from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
from pipelines.training.pretrain_data import write_corpus
from pipelines.training.run_dir import latest_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schedule_yaml(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sched")
    corpus = write_corpus(peoples_daily_sentences()[:420], str(d / "corpus.parquet"))
    # No validation split: nothing here reads val metrics, and each split is a Ray Data pipeline per fit.
    cfg = {"data": {"paths": [corpus], "tokenizer": str(chinese_vocab_path()), "seq_len": 64, "val_fraction": 0.0},
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


# One run dir carried through every scheduled-run behaviour, one invocation after another: each
# invocation is a Ray Train fit (~30 s on 2 cores), so the two that train are shared by all the
# checks below instead of each check starting its own run from step 0 (eight fits before).
@pytest.mark.timeout(900)
def test_scheduled_invocations_continue_one_run_never_overlap_and_keep_a_ledger(schedule_yaml, tmp_path):
    """Budgeted invocations on one run dir, with one `runs.jsonl` record each:

    1. An invocation of 10 steps takes the run 0 -> 10. Then a stray checkpoint directory that Ray
       never registered (checkpoint 10 copied as step 20, what an invocation killed mid-report can
       leave) is planted.
    2. The next, with a time budget of 30 s (the least accepted: start-up takes most of it),
       resumes from the registered 10, and the ledger says so (issue 10, defect 4), not the stray
       20. It holds the lock while an overlapping invocation in another process is refused with
       exit status 75 and a clear message, and stops at its first step, the budget being spent.
    3. An invocation killed with SIGKILL (in another process) can't write its ledger line: the next
       one writes it, `killed`, with the step it left the run at. That next one finds the run at
       its max_steps: it trains nothing, says so, and starts no fit; its result is the latest
       checkpoint, exported again.
    4. An invocation with another preset, or on another corpus, is refused on the driver within
       20 s, naming what differs, and leaves the run dir byte for byte as it was; a registered
       checkpoint deleted by hand gives one Error line naming the run dir, not a Ray traceback.
    """
    import json
    import shutil

    from conftest import local_ray

    run_dir = tmp_path / "run"

    def invoke(**overrides):
        return main(build_config("debug", str(schedule_yaml), {"run_dir": str(run_dir), **overrides}))

    # 1. An invocation of 10 steps, then a stray checkpoint planted beside its registered one.
    with local_ray():
        result = invoke(**{"train.steps_per_run": 10})
    assert result.metrics["step"] == 10 and Path(result.checkpoint).name == "checkpoint_00000010"
    stray = run_dir / "checkpoint_00000020"
    shutil.copytree(run_dir / "checkpoint_00000010", stray)
    state = json.loads((stray / "raybert_state.json").read_text())
    (stray / "raybert_state.json").write_text(json.dumps(dict(state, step=20)))
    assert latest_step(run_dir) == 10  # Ray's registered latest, not the newest directory

    # 2. A budgeted invocation (this process, on the same Ray) resumes from the registered 10, not
    # the stray 20, and holds the lock while an overlapping one, started as `python -m
    # jobs.pretrain`'s command in another process, is refused; it ends within its time budget,
    # with a checkpoint.
    lock = run_dir / LOCK_NAME
    holder = f"pid {os.getpid()}"
    overlapping = (
        "import pathlib, sys, time\n"
        "from jobs.pretrain import pretrain\n"
        f"lock, deadline = pathlib.Path({str(lock)!r}), time.time() + 120\n"
        f"while {holder!r} not in (lock.read_text() if lock.exists() else ''):\n"
        "    if time.time() > deadline:\n"
        "        sys.exit('the budgeted invocation never took the lock')\n"
        "    time.sleep(0.1)\n"
        f"pretrain({['--config', str(schedule_yaml), '--preset', 'debug', '--run-dir', str(run_dir), '--max-steps-per-run', '10']!r})\n")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", overlapping], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        with local_ray():
            budgeted = invoke(**{"train.steps_per_run": 10, "time_budget": 30})
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.time() - t0 < 240
    assert proc.returncode == EXIT_LOCKED, out[-3000:]
    assert "in use by another invocation" in out and holder in out
    ledger = read_ledger(run_dir)
    assert [r["status"] for r in ledger] == ["ok", "refused", "ok"]
    assert [(r["status"], r["start_step"], r["end_step"], r["steps"]) for r in ledger[:1]] == [("ok", 0, 10, 10)]
    assert all(r["start"] <= r["end"] and r["checkpoint"].endswith(f"{r['end_step']:08d}")
               for r in ledger if r["status"] == "ok")
    record = ledger[-1]
    assert record["start_step"] == 10 and 11 <= record["end_step"] < 20 and record["time_budget"] == 30
    assert record["over_budget"] == (record["seconds"] > 30)
    assert record["steps"] == record["end_step"] - 10
    assert record["pid"] == os.getpid() and budgeted.metrics["step"] == record["end_step"]
    assert Path(budgeted.checkpoint).name == f"checkpoint_{record['end_step']:08d}"
    assert latest_step(run_dir) == record["end_step"]  # the stray 20 is still not Ray's
    assert (run_dir / f"checkpoint_{record['end_step']:08d}" / "raybert_state.json").is_file()
    events = [(r["event"], r["step"]) for r in read_metrics(run_dir) if r.get("event") in ("start", "resume")]
    assert events == [("start", 0), ("resume", 10)]

    # 3. An invocation in another process (joining this Ray), SIGKILLed once it holds the run: no
    # ledger line of its own. The next invocation writes it, then finds the run at its max_steps:
    # it trains nothing, says so, and starts no Ray Train fit (no new start/resume event); its
    # result is the latest checkpoint.
    import ray
    import ray.train

    running = run_dir / RUNNING_NAME
    victim = subprocess.Popen(
        [sys.executable, "-m", "jobs.pretrain", "--config", str(schedule_yaml), "--preset", "debug",
         "--run-dir", str(run_dir), "--address", ray.get_runtime_context().gcs_address],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while f'"pid": {victim.pid},' not in (running.read_text() if running.exists() else ""):
        assert victim.poll() is None and time.time() < deadline, "the invocation to kill never took the run"
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    assert [r["status"] for r in read_ledger(run_dir)] == ["ok", "refused", "ok"]  # nothing of its own
    shutil.rmtree(run_dir / "export")
    # Ray Train notes "A run snapshot was found" (INFO) on every lookup of a run's checkpoints: five
    # lines per rerun of a finished run, --quiet included. Ray still does; the rerun says nothing of it.
    import logging

    class Notes(logging.Handler):
        seen: list = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    notes = Notes(level=logging.INFO)
    logging.getLogger("ray.train").addHandler(notes)
    try:
        ray.train.Result.from_path(str(run_dir))
        assert any("A run snapshot was found" in m for m in notes.seen)
        notes.seen.clear()
        done = invoke(**{"train.max_steps": record["end_step"]})
        assert not any("A run snapshot was found" in m for m in notes.seen), notes.seen
    finally:
        logging.getLogger("ray.train").removeHandler(notes)
    *_, killed, last = read_ledger(run_dir)
    assert (killed["status"], killed["pid"], killed["start_step"], killed["end_step"], killed["steps"]) == \
        ("killed", victim.pid, record["end_step"], record["end_step"], 0)
    assert f"found by invocation {last['invocation']}" in killed["error"]
    assert (last["status"], last["steps"], last["end_step"]) == ("complete", 0, record["end_step"])
    assert not running.exists()
    assert Path(done.checkpoint).name == f"checkpoint_{record['end_step']:08d}"
    assert done.metrics["step"] == record["end_step"] and (Path(done.export) / "config.json").is_file()
    assert [(r["event"], r["step"]) for r in read_metrics(run_dir) if r.get("event") in ("start", "resume")] == events

    # 4. An incompatible resume changes nothing; a lost registered checkpoint is one clear error.
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
    other = write_corpus(peoples_daily_sentences()[:500], str(tmp_path / "other.parquet"))
    refused = CliRunner().invoke(pretrain, ["--config", str(schedule_yaml), "--preset", "debug", "--data", other,
                                            "--run-dir", str(run_dir)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output[-3000:]
    (error,) = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert "corpus 1 file(s), 420 rows -> 1 file(s), 500 rows" in error
    assert f"--init-from {run_dir / 'export'}" in error
    assert snapshot() == before

    latest = run_dir / f"checkpoint_{record['end_step']:08d}"
    shutil.rmtree(latest)
    broken = CliRunner().invoke(pretrain, ["--config", str(schedule_yaml), "--preset", "debug", "--run-dir", str(run_dir)])
    assert broken.exit_code == 1 and "Traceback" not in broken.output, broken.output[-3000:]
    assert "checkpoint record can't be read" in broken.output and str(run_dir) in broken.output
