"""`raybert submit`: the pure pieces (ids, runtime_env, address), then the acceptance test on a
real local head (`ray start --head`, dashboard on loopback) that scores a small corpus through
Ray Jobs, refuses a duplicate and accepts a keyed re-run.

The head is ours alone: free ports chosen at run time, its own short --temp-dir, and teardown
that ends exactly the processes it started (never `ray stop`, which would kill every Ray on the
machine, including other tests' clusters)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from jobs.cli import cli
from jobs.submit import (EXCLUDES, TORCH_PIN, AlreadySubmitted, SubmitConfig, build_runtime_env,
                         canonical_config, main, resolve_address, runtime_dependencies, submission_id)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------

def test_submission_id_is_deterministic_in_content_and_key():
    a = canonical_config("# scoring\ninput: /d/in\noutput: /d/out\nresources: {num_actors: 1}\n", "a")
    b = canonical_config("resources:\n  num_actors: 1\noutput: /d/out   # same\ninput: /d/in\n", "b")
    sid = submission_id("score", a)
    assert sid == submission_id("score", b)  # comments, layout and key order don't count
    assert sid.startswith("raybert-score-") and len(sid) == len("raybert-score-") + 16
    assert submission_id("score", a, key="2026-11-28") != sid
    assert submission_id("score", a, key="2026-11-28") == submission_id("score", b, key="2026-11-28")
    assert submission_id("pretrain", a) != sid
    assert submission_id("score", {**a, "output": "/d/out2"}) != sid
    with pytest.raises(ValueError, match="mapping"):
        canonical_config("- a list\n", "x.yaml")


def test_runtime_env_ships_code_only_and_deps_on_request():
    env = build_runtime_env(ROOT, "task: embed\n", "s.yaml")
    assert env["working_dir"] == str(ROOT) and "pip" not in env
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["env_vars"]["RAYBERT_CONFIG_YAML"] == "task: embed\n"
    for pattern in ("/.?*", "/runs/", "/data/", "*.egg-info", "__pycache__"):
        assert pattern in env["excludes"]
    deps = build_runtime_env(ROOT, "", "s.yaml", install_deps=True)["pip"]["packages"]
    assert deps[0] == TORCH_PIN == "torch==2.13.0"
    assert not any(d.lower().startswith(("ray", "torch>", "torch<")) for d in deps)
    assert deps[1:] == [d for d in runtime_dependencies(ROOT / "pyproject.toml")][1:]
    assert any(d.startswith("transformers") for d in deps)


def test_upload_is_small_and_holds_the_packages(tmp_path):
    """What Ray would actually zip from this checkout with our excludes (and .gitignore)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    zpath = tmp_path / "pkg.zip"
    create_package(str(ROOT), zpath, include_gitignore=True, excludes=list(EXCLUDES))
    names = zipfile.ZipFile(zpath).namelist()
    assert {"jobs/submit.py", "jobs/score.py", "pipelines/scoring/job.py", "bert_core/model.py"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in {".venv", ".git", "runs", "data", "out"}]
    assert zpath.stat().st_size < 5 << 20, sorted(names)


def test_address_is_explicit_or_from_the_environment(monkeypatch, tmp_path):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="--address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://h:8265")
    assert resolve_address(None) == "http://h:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert resolve_address(None) == "http://api:8265"
    assert resolve_address("http://x:1") == "http://x:1"

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: embed\n")
    r = CliRunner().invoke(cli, ["submit", "score", "--config", str(cfg)])
    assert r.exit_code == 1 and "--address" in r.output
    r = CliRunner().invoke(cli, ["submit", "nope", "--config", str(cfg), "--address", "http://h:1"])
    assert r.exit_code == 2  # click's usage error: JOB is a fixed choice


class _FakeClient:
    """The JobSubmissionClient surface main() uses, scripted: statuses seen after submitting."""

    def __init__(self, address, statuses=("PENDING", "RUNNING", "FAILED"), twin=False):
        from types import SimpleNamespace

        self.address, self.twin, self.submitted, self.known = address, twin, [], False
        self._infos = [SimpleNamespace(status=s, message=f"job {s.lower()}") for s in statuses]

    def get_job_info(self, sid):
        if not self.known:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return self._infos.pop(0) if len(self._infos) > 1 else self._infos[0]

    def submit_job(self, **kw):
        self.submitted.append(kw)
        self.known = True
        if self.twin:  # a twin got in between main()'s check and its submit (Ray 2.60's wording)
            raise RuntimeError("Request failed with status code 500: Traceback ...\nValueError: Job "
                               f"with submission_id {kw['submission_id']} already exists. Please use a "
                               "different submission_id.\n.")
        return kw["submission_id"]

    def get_job_logs(self, sid):
        return "".join(f"line {i}\n" for i in range(100)) + "ValueError: score: input is required\n"


def test_wait_exits_nonzero_with_the_log_tail_and_a_raced_twin_is_refused(monkeypatch, tmp_path):
    import ray.job_submission

    cfg = tmp_path / "s.yaml"
    # Valid here (submit checks keys, types and the job's rules first); it fails on the cluster.
    text = "input: /data/in\noutput: /data/out\nmodel: /models/m\ntask: embed\n"
    cfg.write_text(text)
    shipped = yaml.safe_load(text)
    made = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda address: made.append(_FakeClient(address)) or made[-1])
    r = CliRunner().invoke(cli, ["submit", "score", "--config", str(cfg), "--address", "http://h:1", "--wait"])
    sid = submission_id("score", shipped)
    assert r.exit_code == 1 and r.stdout.splitlines() == [sid, f"{sid} FAILED"]
    assert "input is required" in r.stderr and "line 99" in r.stderr and "line 10\n" not in r.stderr
    kw = made[0].submitted[0]
    assert kw["entrypoint"] == "python -m jobs.submit score" and kw["submission_id"] == sid
    assert kw["runtime_env"]["env_vars"]["RAYBERT_CONFIG_YAML"] == text

    # Without --wait: submitted, exit 0, status as seen right after the submission.
    made.clear()
    res = main(SubmitConfig(job="score", config=str(cfg), address="http://h:1", key="k"))
    assert res.status == "PENDING" and res.submission_id == submission_id("score", shipped, "k")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda address: _FakeClient(address, statuses=("RUNNING",), twin=True))
    r = CliRunner().invoke(cli, ["submit", "score", "--config", str(cfg), "--address", "http://h:1"])
    assert r.exit_code == 3 and sid in r.output and "RUNNING" in r.output


def test_a_config_the_job_would_refuse_is_not_submitted(monkeypatch, tmp_path):
    """An unknown key, a value of the wrong type, or (score) a missing input: one Error line
    naming it, before any client is made or anything is uploaded."""
    import ray.job_submission

    made = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: made.append(address))
    for job, text, needle in [("score", "input: /in\noutput: /out\nmodel: /m\nmax_lenght: 64\n", "max_lenght"),
                              ("score", "task: embed\n", "score: input is required"),
                              ("pretrain", "train:\n  max_steps: [10]\n", "train.max_steps"),
                              ("finetune", "tasks:\n  - name: s\n    wieght: 2\n", "wieght")]:
        (tmp_path / "c.yaml").write_text(text)
        r = CliRunner().invoke(cli, ["submit", job, "--config", str(tmp_path / "c.yaml"), "--address", "http://h:1",
                                     "--follow"])
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0], (job, r.output)
    assert made == []


# --------------------------------------------------------------------------------------------
# A private head: `ray start --head --block` in its own session, ended by SIGTERM
# --------------------------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    # Hold all sockets open while choosing so the ports are distinct from one another.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _ours(temp_dir: str, procs) -> list:
    """Live processes of our head: the recorded ones plus any whose command line names temp_dir."""
    import psutil

    def live(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    alive = {p.pid: p for p in procs if live(p)}
    for p in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or ()) and live(p):
            alive.setdefault(p.pid, p)
    return list(alive.values())


def _term_with_parent() -> None:
    """In the child: SIGTERM it when pytest dies, even by SIGKILL, so no head outlives the run."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _describe(p) -> str:
    import psutil

    try:
        return f"{p.pid}:{p.name()}"
    except psutil.Error:
        return f"{p.pid}:gone"


def _start_head() -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` on free ports in its own session; returns (process, temp dir, address)."""
    # Short, since Ray's socket paths live under it. Being our own, it also holds the head's
    # address file (ray_current_cluster), so a bare ray.init() elsewhere can't join this head.
    temp_dir = tempfile.mkdtemp(prefix="rbsub", dir="/tmp")
    (gcs, dash, client_port, nm, om, agent_http, agent_grpc, rt_agent, metrics) = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The entrypoint runs `python -m ...`: like a cluster node, our venv's python comes first on PATH.
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               # On SIGTERM, `ray start --block` first drains the node for up to 30 s (a grace
               # period for Serve); a test head has nothing to drain.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={gcs}",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
           "--min-worker-port=0", "--max-worker-port=0",  # OS-chosen: no clash with other clusters
           "--num-cpus=2", f"--object-store-memory={512 << 20}", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    with open(os.path.join(temp_dir, "ray_start.log"), "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_term_with_parent)
    return head, temp_dir, f"http://127.0.0.1:{dash}"


def _wait_ready(head: subprocess.Popen, temp_dir: str, address: str, timeout_s: float = 150):
    """A client once the Jobs API accepts and runs a trivial job; None if `ray start` gave up."""
    from ray.job_submission import JobSubmissionClient

    deadline, last_error = time.monotonic() + timeout_s, None  # a head on 2 busy cores can take a minute
    while True:
        if head.poll() is not None:
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"head not ready ({last_error}): " + _log_tail(temp_dir))
        try:
            client = JobSubmissionClient(address)
            probe = client.submit_job(entrypoint="true")
            break
        except Exception as e:  # dashboard not up yet, or its job agent not registered
            last_error = e
            time.sleep(1)
    while client.get_job_status(probe).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "probe job did not finish"
        time.sleep(0.5)
    assert client.get_job_status(probe).value == "SUCCEEDED", client.get_job_logs(probe)
    return client


def _log_tail(temp_dir: str) -> str:
    with contextlib.suppress(OSError):
        return Path(temp_dir, "ray_start.log").read_text()[-3000:]
    return ""


def _stop_head(head: subprocess.Popen, temp_dir: str) -> dict:
    """SIGTERM `ray start --block` (it kills its Ray processes), then kill exactly our stragglers."""
    import psutil

    # Everything `ray start` spawned, recorded before it goes (drivers run in their own
    # sessions, so neither its process group nor its reaping reaches all of them).
    procs = []
    with contextlib.suppress(psutil.Error):
        procs = psutil.Process(head.pid).children(recursive=True)
    t_stop = time.monotonic()
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    deadline = time.monotonic() + 20
    while (left := _ours(temp_dir, procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    report = {"stop_s": time.monotonic() - t_stop, "killed": [_describe(p) for p in left]}
    for p in left:  # a straggler: exactly ours, by pid (and psutil's create-time check)
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    report["survivors"] = [_describe(p) for p in _ours(temp_dir, procs)]
    if not report["survivors"]:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return report


@contextlib.contextmanager
def private_head(attempts: int = 3):
    """Yields (dashboard address, JobSubmissionClient, report); the report is filled on exit."""
    report: dict = {}
    for attempt in range(attempts):
        head, temp_dir, address = _start_head()
        try:
            client = _wait_ready(head, temp_dir, address)
            if client is not None:
                yield address, client, report
                return
            # `ray start` gives a raylet 30 s (hard-coded) to register with the GCS; on an
            # overloaded machine it can miss that and exit. A fresh head usually makes it.
            failure = f"ray start exited {head.returncode}: " + _log_tail(temp_dir)
        finally:
            report.update(_stop_head(head, temp_dir))
    raise RuntimeError(f"no head after {attempts} attempts; last: {failure}")


def _corpus(path: Path, n: int = 50) -> list[str]:
    words = ("ray streams parquet blocks through a pool of bert actors that write one embedding "
             "per row for every document in the corpus").split()
    ids = [f"doc-{i:03d}" for i in range(n)]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 17)) for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return ids


# Over 60 s: a real Ray head (`ray start`) and three submissions to it, one of them a scoring job.
# signal method: the timeout raises in the test, so the head's teardown still runs.
@pytest.mark.timeout(360, method="signal")
@pytest.mark.filterwarnings("ignore:ssl=None is deprecated")  # inside Ray's tail_job_logs
def test_submit_scores_on_a_real_head_refuses_duplicates_and_accepts_a_key(tmp_path, minilm_dir, monkeypatch):
    from pipelines.scoring.output import read_output

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    ids = _corpus(tmp_path / "in.parquet")
    # The config lives outside the project (the usual case for per-run configs); its content
    # is what travels. Paths are absolute, as they must be on a cluster.
    config = tmp_path / "score.yaml"
    config.write_text(yaml.safe_dump({
        "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
        "model": str(minilm_dir), "task": "embed", "max_length": 64, "batch_size": 64}))
    runner = CliRunner()
    t0 = time.monotonic()
    with private_head() as (address, client, report):
        t_head = time.monotonic() - t0
        r = runner.invoke(cli, ["submit", "score", "--config", str(config), "--address", address, "--wait"])
        t_job = time.monotonic() - t0 - t_head
        sid = submission_id("score", yaml.safe_load(config.read_text()))
        assert r.exit_code == 0, r.output + client.get_job_logs(sid)
        assert r.stdout.splitlines()[0] == sid  # the id comes first
        assert f"{sid} SUCCEEDED" in r.stdout
        assert client.get_job_status(sid).value == "SUCCEEDED"
        logs = client.get_job_logs(sid)
        assert "python -m jobs.score --config" in logs and "shipped score.yaml" in logs

        out = read_output(str(tmp_path / "out"), columns=["id", "embedding", "error"])
        assert out.num_rows == len(ids)
        assert sorted(out.column("id").to_pylist()) == ids  # exactly one row per input id
        assert out.column("error").null_count == len(ids)
        assert pa.types.is_fixed_size_list(out.schema.field("embedding").type)

        # The same job and config again: refused, naming the existing submission; nothing new.
        again = runner.invoke(cli, ["submit", "score", "--config", str(config), "--address", address])
        assert again.exit_code == 3, again.output
        assert sid in again.output and "SUCCEEDED" in again.output and "--key" in again.output
        with pytest.raises(AlreadySubmitted) as e:
            main(SubmitConfig(job="score", config=str(config), address=address))
        assert e.value.submission_id == sid and e.value.status == "SUCCEEDED"
        assert [j.submission_id for j in client.list_jobs()].count(sid) == 1

        # A keyed re-run (e.g. tomorrow's cron slot) is a new submission. Followed: its log
        # streams back; the scoring job finds the finished output and just reports it.
        keyed = runner.invoke(cli, ["submit", "score", "--config", str(config), "--address", address,
                                    "--key", "2026-11-29", "--follow"])
        sid2 = submission_id("score", yaml.safe_load(config.read_text()), "2026-11-29")
        assert keyed.exit_code == 0, keyed.output + client.get_job_logs(sid2)
        assert sid2 != sid and keyed.stdout.splitlines()[0] == sid2
        assert "shipped score.yaml" in keyed.stdout and f"{sid2} SUCCEEDED" in keyed.stdout
        t_rest = time.monotonic() - t0 - t_head - t_job
    print(f"head up {t_head:.1f}s, scoring job {t_job:.1f}s, duplicate + keyed {t_rest:.1f}s, "
          f"teardown {report['stop_s']:.1f}s (killed after SIGTERM: {report['killed']})")
    assert report["survivors"] == [], f"processes of our head survived teardown: {report['survivors']}"


def test_set_applies_over_the_shipped_config_and_is_checked_first(monkeypatch, tmp_path):
    """`raybert submit JOB --config F --set k=v`: the cluster runs the file with the --set applied
    (and the submission id is that config's); a bad --set is refused naming it, before any client."""
    import ray.job_submission

    cfg = tmp_path / "p.yaml"
    cfg.write_text("model:\n  preset: debug\ntrain:\n  lr: 0.001\n")
    made = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda address: made.append(_FakeClient(address, statuses=("RUNNING",))) or made[-1])
    r = CliRunner().invoke(cli, ["submit", "pretrain", "--config", str(cfg), "--address", "http://h:1",
                                 "--set", "train.lr=0.002", "--set", "data.seq_len=96"])
    assert r.exit_code == 0, r.output
    shipped = yaml.safe_load(made[0].submitted[0]["runtime_env"]["env_vars"]["RAYBERT_CONFIG_YAML"])
    assert shipped == {"model": {"preset": "debug"}, "train": {"lr": 0.002}, "data": {"seq_len": 96}}
    assert made[0].submitted[0]["submission_id"] == submission_id("pretrain", shipped)
    made.clear()
    r = CliRunner().invoke(cli, ["submit", "pretrain", "--config", str(cfg), "--address", "http://h:1",
                                 "--set", "train.lr=0"])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and errors == ["Error: --set train.lr=0: train.lr must be > 0, got 0"], r.output
    assert made == []
