"""Opt-in trackers (pipelines/training/tracking.py) without a server: W&B through a stand-in `wandb` module
that records what raybert calls (the real one needs an account or writes a binary log), and the
driver-side refusals. MLflow end to end, through a real pretraining run: tests/test_pretrain_ray.py."""

from __future__ import annotations

import sys
import types

import pytest

from pipelines.training.tracking import Trackers, check_trackers


class _WandbRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    mod = types.ModuleType("wandb")

    def init(project=None, entity=None, name=None, id=None, resume=None, mode=None, config=None, group=None):
        calls.append(("init", dict(project=project, name=name, id=id, resume=resume, mode=mode, config=config)))
        return _WandbRun(calls)

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setattr("pipelines.training.tracking._installed", lambda m: True)
    return calls


def test_wandb_run_is_named_after_the_run_dir_and_continues_across_invocations(fake_wandb):
    check_trackers(None, {"project": "zh", "mode": "offline"})
    for _ in range(2):  # two invocations of one scheduled run
        t = Trackers(None, {"project": "zh", "mode": "offline"}, "s3://b/runs/zh-base", {"train": {"lr": 1e-3}})
        t.log({"loss": 9.5, "lr": 1e-3}, 10)
        t.close()
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    assert inits[0] == inits[1]  # same id + resume="allow": one W&B run
    assert inits[0]["project"] == "zh" and inits[0]["name"] == "zh-base" and inits[0]["resume"] == "allow"
    assert inits[0]["mode"] == "offline" and inits[0]["config"] == {"train.lr": 1e-3}
    assert [c for c in fake_wandb if c[0] == "log"] == [("log", {"loss": 9.5, "lr": 1e-3}, 10)] * 2
    assert [c[0] for c in fake_wandb].count("finish") == 2


def test_a_failing_tracker_is_dropped_and_training_goes_on(fake_wandb, capsys):
    t = Trackers(None, {}, "/runs/a", {})

    def boom(data, step=None):
        raise ConnectionError("server went away")

    t._open["wandb"].log = boom
    t.log({"loss": 1.0}, 5)  # no raise
    t.log({"loss": 0.9}, 10)
    t.close()
    out = capsys.readouterr().out
    assert out.count("wandb logging failed") == 1 and "from step 5" in out and "server went away" in out


def test_trackers_refused_on_the_driver(monkeypatch):
    with pytest.raises(ValueError, match=r"train.mlflow: unknown setting\(s\) \['trackin_uri'\]"):
        check_trackers({"trackin_uri": "http://x"}, None)
    with pytest.raises(ValueError, match="must be a mapping"):
        check_trackers("http://mlflow:5000", None)
    monkeypatch.setattr("pipelines.training.tracking._installed", lambda m: m != "wandb")
    with pytest.raises(ValueError, match="train.wandb is set but wandb is not installed; pip install wandb"):
        check_trackers(None, {"project": "p"})
    check_trackers(None, None)  # off: nothing checked


def test_a_pretrain_config_with_a_bad_tracker_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.cli import cli
    from pipelines.corpora import chinese_vocab_path

    (tmp_path / "t.yaml").write_text("train:\n  mlflow: {experiment: x}\n")
    data = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["一二三四五六七八九十"] * 64}), data)
    res = CliRunner().invoke(cli, ["pretrain", "--preset", "debug", "--config", str(tmp_path / "t.yaml"), "--data",
                                   str(data), "--tokenizer", str(chinese_vocab_path()), "--run-dir",
                                   str(tmp_path / "run")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output[-2000:]
    (error,) = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert "train.mlflow" in error and "'experiment'" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_an_unreachable_mlflow_server_is_dropped_after_one_short_attempt(capsys, monkeypatch):
    """A tracking server that refuses connections: MLflow's client retried it with backoff for
    minutes (a 35 s run took 266 s). One connect, one line, and logging goes on without it."""
    import time

    from conftest import free_port

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    t = Trackers({"tracking_uri": uri}, None, "/runs/a", {"train": {"lr": 1e-3}})
    t.log({"loss": 1.0}, 5)
    t.close()
    assert time.time() - t0 < 10
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "mlflow tracking is off" in lines[0] and uri in lines[0], lines
