"""Faults, for real: kill -9 of the driver mid-run then a rerun of the same command, and a
SIGKILL of one predictor actor mid-run. Both must end with exactly one output row per input row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.score import ResourceConfig, ScoreConfig, main
from pipelines.corpora import shakespeare_paragraphs
from pipelines.scoring.output import MANIFEST, default_checkpoint_dir, read_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(d, rows: int, files: int = 3) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    paras = shakespeare_paragraphs()[:rows]
    ids = [f"p{i}" for i in range(len(paras))]
    per = -(-len(paras) // files)
    for f in range(files):
        pq.write_table(pa.table({"id": ids[f * per:(f + 1) * per], "text": paras[f * per:(f + 1) * per]}),
                       d / f"part-{f}.parquet")
    return ids


def _data_files(out) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(f for f in os.listdir(out) if f.endswith(".parquet") and not f.startswith(("_", ".")))


def _kill_tree(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_kill_driver_then_rerun_completes_without_duplicates(tmp_path, minilm_dir):
    ids = _corpus(tmp_path / "in", 800)
    out = tmp_path / "out"
    (tmp_path / "score.yaml").write_text("max_length: 64\nresources:\n  num_actors: 1\n")
    cmd = [sys.executable, "-m", "jobs.cli", "score", str(tmp_path / "in"), str(out), "--model", str(minilm_dir),
           "--task", "embed", "--batch-size", "30", "--config", str(tmp_path / "score.yaml")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while len(_data_files(out)) < 3 and proc.poll() is None and time.time() < deadline:
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stdout.read().decode()[-2000:]
        assert len(_data_files(out)) >= 3, "no output appeared in time"
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run, with no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(2)
        _kill_tree(tree)  # Ray processes the dead driver started (most fate-share; some linger)
        proc.stdout.close()

    first_run = set(_data_files(out))
    assert not (out / MANIFEST).exists() and os.path.isdir(default_checkpoint_dir(str(out)))
    partial = read_output(str(out), ["id"]).num_rows
    assert partial < len(ids)  # killed mid-run

    # The same command again, here on the tests' shared Ray (what resumes is the output and its
    # checkpoint, not the dead driver's Ray, so a second private Ray would only add its start-up).
    from click.testing import CliRunner

    from conftest import local_ray
    from jobs.cli import cli

    assert cmd[:4] == [sys.executable, "-m", "jobs.cli", "score"]
    # Rerun with another recipe (here another length; also another task, model, pooling...): refused,
    # naming the difference, instead of finishing the output with rows of another kind.
    (tmp_path / "other.yaml").write_text("max_length: 32\nresources:\n  num_actors: 1\n")
    other = CliRunner().invoke(cli, [*cmd[3:-1], str(tmp_path / "other.yaml")])
    errors = [line for line in other.output.splitlines() if line.startswith("Error:")]
    assert other.exit_code == 1 and len(errors) == 1 and "max_length 64 -> 32" in errors[0], other.output[-3000:]
    assert set(_data_files(out)) == first_run and os.path.isdir(default_checkpoint_dir(str(out)))
    with local_ray():
        rerun = CliRunner().invoke(cli, cmd[3:])
    assert rerun.exit_code == 0, rerun.output[-3000:]
    assert f"rows={len(ids)} " in rerun.output and "(resumed)" in rerun.output
    table = read_output(str(out))
    got = table["id"].to_pylist()
    assert len(got) == len(ids) and sorted(got) == sorted(ids)  # exactly one row per input row
    assert len(set(table["row_hash"].to_pylist())) == len(ids)
    assert first_run & set(_data_files(out)), "the rerun should keep the first run's committed files"
    assert (out / MANIFEST).exists() and not os.path.exists(default_checkpoint_dir(str(out)))


def test_killing_a_predictor_actor_mid_run_loses_no_rows(ray_local, tmp_path, minilm_dir):
    ids = _corpus(tmp_path / "in", 800)
    out = tmp_path / "out"
    killed: dict = {}

    def killer():
        me = psutil.Process()
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if len(_data_files(out)) >= 2:
                for p in me.children(recursive=True):  # only processes of this test's own Ray
                    try:
                        if "ScoringActor" in " ".join(p.cmdline()):  # pipelines/scoring/units.py
                            p.send_signal(signal.SIGKILL)
                            killed.update(pid=p.pid, files=len(_data_files(out)))
                            return
                    except psutil.NoSuchProcess:
                        continue
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cfg = ScoreConfig(input=str(tmp_path / "in"), output=str(out), model=str(minilm_dir), task="embed",
                      max_length=64, batch_size=30, resources=ResourceConfig(num_actors=1))
    result = main(cfg)
    t.join(timeout=5)
    assert killed, "the predictor actor was never killed"
    assert killed["files"] < len(_data_files(out))  # the kill happened before the end
    got = read_output(str(out))["id"].to_pylist()
    assert result.rows == len(got) == len(ids) and sorted(got) == sorted(ids)
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
