"""`raybert submit`: run a raybert job (score | pretrain | finetune) on a Ray cluster via Ray Jobs.

Contract: `main(cfg: SubmitConfig) -> SubmitResult` submits `python -m jobs.<JOB> --config FILE`
to the Ray Jobs API at `cfg.address` (else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; no address is
an error) and prints the submission id as the first line of stdout. With `wait` (or `follow`,
which also streams the job's logs) it blocks until the job is SUCCEEDED, FAILED or STOPPED and
returns that status; otherwise it returns right after the submission. The click command only
parses flags, calls `main` and turns the outcome into an exit code: 0 submitted (or SUCCEEDED
when waiting), 1 error or a finished job that did not succeed, 3 refused duplicate.

- **Code**: the project root (the directory holding jobs/, pipelines/, bert_core/) is uploaded as
  the job's `working_dir`, so those top-level packages import on every node. Only code and
  configs travel: .gitignore'd paths, hidden entries (.venv, .git, caches), runs/, out/, data/,
  *.egg-info and bulky data/weight files are excluded (see EXCLUDES). It needs a source checkout
  (`pip install -e .`); a site-packages install has no project root to ship.
- **Config**: the YAML file's content travels in the job's runtime_env (env var
  RAYBERT_CONFIG_YAML) wherever the file lives, inside or outside the project; on the cluster
  `python -m jobs.submit JOB` writes it to a temp file and runs `jobs.<JOB>` with `--config` on
  it. So the job runs exactly the content that was hashed, and the user's tree is never
  touched. (Relying on the uploaded copy would silently lose configs kept in gitignored dirs
  such as data/ or runs/.)
- **Paths inside the YAML** (input, output, model, run_dir, ...) are read on the cluster, by the
  job's driver and workers. Use absolute paths on shared storage (or URIs); a relative path
  resolves inside the job's temporary unpacked working dir and its output is lost.
- **One submission per job + config (+ key)**: the submission id is
  `raybert-<job>-<sha256(job, canonical YAML content, key)[:16]>`; comments and key order do not
  change it. Submitting it again is refused (AlreadySubmitted, naming the existing submission
  and its status) instead of starting a duplicate. `key` (e.g. a cron slot date) gives a
  scheduled or deliberate re-run of the same config its own id.
- **Dependencies**: the cluster's Python must already have the project's dependencies
  (cluster.yaml's setup_commands install them). `install_deps` adds a runtime_env `pip` section
  with the dependencies from pyproject.toml instead: torch pinned to 2.13.0 first, Ray itself
  left out (the cluster's Ray runs the job; Ray refuses a runtime_env that changes its version).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click

from pipelines import MissingPath, UserError
from jobs.config import set_option, user_errors

JOBS = ("score", "pretrain", "finetune")
TORCH_PIN = "torch==2.13.0"  # the version the project is built and tested with (see make setup)
CONFIG_ENV = "RAYBERT_CONFIG_YAML"  # the YAML content, shipped in the runtime_env
CONFIG_NAME_ENV = "RAYBERT_CONFIG_NAME"  # its file name, so errors on the cluster name a familiar file
MAX_CONFIG_BYTES = 64 << 10  # an env var must stay well under Linux's 128 KiB per-string limit
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_REFUSED = 3  # distinct from a failure, so a cron wrapper can tell "already ran" apart

# gitignore-style patterns, relative to the project root, on top of .gitignore (which Ray's
# packager honours) and Ray's defaults. The upload is code and configs only: data, weights and
# run outputs belong on shared storage, and Ray caps a package at a few hundred MiB anyway.
EXCLUDES = [
    # Hidden entries (.git, .venv, .pytest_cache, other tooling): never needed by a job. ".?*",
    # not ".*": the root itself is matched as "." and would exclude everything.
    "/.?*",
    "venv", "__pycache__", "*.egg-info", "/build/", "/dist/",
    "/runs/", "/out/", "/data/",
    "*.parquet", "*.arrow", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.npy", "*.npz",
    "*.whl", "*.zip", "*.tar", "*.tar.*", "*.tgz",
]


class AlreadySubmitted(RuntimeError):
    """This job + config (+ key) was submitted before; it is not submitted again."""

    def __init__(self, submission_id: str, status: str, message: str, address: str):
        self.submission_id, self.status = submission_id, status
        detail = f": {message}" if message else ""
        super().__init__(
            f"{submission_id} was already submitted to {address} (status {status}{detail}); "
            "not submitting the same job and config again. To run it again on purpose, pass a "
            "distinct --key (e.g. --key $(date +%F)). Inspect it with: "
            f"ray job logs {submission_id} --address {address}")


@dataclass
class SubmitConfig:
    job: str = "score"  # score | pretrain | finetune: runs `python -m jobs.<job> --config FILE`
    config: str = ""  # YAML config of that job (local path; its content is shipped)
    address: Optional[str] = None  # Ray Jobs API, http://HEAD:8265; None: RAY_API_SERVER_ADDRESS / RAY_ADDRESS
    key: Optional[str] = None  # distinguishes deliberate re-runs of the same config (e.g. a date)
    wait: bool = False  # block until the job ends; the result carries its final status
    follow: bool = False  # stream the job's logs to stdout, then as wait
    install_deps: bool = False  # pip-install the project's dependencies in the job's runtime_env
    poll_s: float = 2.0  # status poll interval while waiting
    project_root: Optional[str] = None  # what is uploaded; None: the checkout this module is in
    sets: tuple = ()  # `--set section.key=value` over the config file: the job runs the merged config


@dataclass
class SubmitResult:
    submission_id: str
    job: str
    address: str
    entrypoint: str
    status: str  # the final status when waited for, else the status right after submission

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


# --------------------------------------------------------------------------------------------
# Pieces (pure; unit-tested without a cluster)
# --------------------------------------------------------------------------------------------

def project_root(root: Optional[str | Path] = None) -> Path:
    """The directory to upload: it must hold the three top-level packages and pyproject.toml."""
    path = Path(root).resolve() if root else Path(__file__).resolve().parents[1]
    missing = [m for m in ("jobs", "pipelines", "bert_core", "pyproject.toml") if not (path / m).exists()]
    if missing:
        raise UserError(f"submit: {path} is not a raybert source checkout (missing {missing}); "
                         "run raybert submit from a checkout installed with `pip install -e .`")
    return path


def canonical_config(text: str, where: str) -> dict:
    """The YAML as a mapping; what the submission id is computed from."""
    from jobs.config import read_yaml

    return read_yaml(text, where)


def submission_id(job: str, config: dict, key: Optional[str] = None) -> str:
    """`raybert-<job>-<16 hex>`: the same job, config content and key always give the same id."""
    # Sorted keys: key order and formatting don't matter; default=str covers YAML dates.
    blob = json.dumps({"job": job, "config": config, "key": key or ""}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return f"raybert-{job}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def runtime_dependencies(pyproject: str | Path) -> list[str]:
    """The project's dependencies for a runtime_env pip section: torch pinned first, Ray dropped."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise UserError("submit: --install-deps reads pyproject.toml and needs Python 3.11+ "
                             "or the tomli package") from e
    deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    out = [TORCH_PIN]
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
        # torch: the pin above replaces the range (a bare range could resolve to another build).
        # ray: the job already runs on the cluster's Ray; reinstalling it is refused by Ray.
        if name not in ("torch", "ray"):
            out.append(dep)
    return out


def build_runtime_env(root: Path, config_text: str, config_name: str, install_deps: bool = False) -> dict:
    env = {
        "working_dir": str(root),
        "excludes": list(EXCLUDES),
        "env_vars": {
            "TOKENIZERS_PARALLELISM": "false",  # tokenizers' own threads deadlock after Ray forks
            CONFIG_ENV: config_text,
            CONFIG_NAME_ENV: config_name,
        },
    }
    if install_deps:
        # One `pip install` into a virtualenv on each node, cached per package list. torch comes
        # first and pinned, so the resolver settles on 2.13.0 (on Linux PyPI that is the CUDA
        # build, as on cluster.yaml's GPU nodes).
        env["pip"] = {"packages": runtime_dependencies(root / "pyproject.toml"), "pip_check": False}
    return env


def resolve_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("submit: no Ray Jobs address; pass --address http://HEAD:8265 (e.g. "
                         "after `ray dashboard cluster.yaml`) or set RAY_API_SERVER_ADDRESS")
    return address


PATH_KEYS = ("input", "output", "model", "tokenizer", "checkpoint_dir", "run_dir", "data", "init_from",
             "output_dir")


def _relative_path_warnings(config: dict, where: str) -> list[str]:
    """Relative paths resolve in the job's unpacked working dir on the cluster: code only (data
    is excluded) and thrown away after the job, so inputs are missing and outputs are lost."""
    out = []
    for key in PATH_KEYS:
        values = config.get(key)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
                out.append(f"warning: {where}: {key}: {value!r} is relative; on the cluster it resolves "
                           "inside the job's temporary working dir. Use an absolute shared path.")
    return out


# --------------------------------------------------------------------------------------------
# Submit and wait
# --------------------------------------------------------------------------------------------

def _existing(client, sid: str):
    from pipelines.compat import http_status

    try:
        return client.get_job_info(sid)
    except RuntimeError as e:
        if http_status(e) == 404:  # no such job
            return None
        raise


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _tail(client, sid: str) -> None:
    async for chunk in client.tail_job_logs(sid):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait(client, sid: str, poll_s: float, follow: bool) -> str:
    import time

    if follow:
        try:
            asyncio.run(_tail(client, sid))  # returns when the job ends and its log is drained
        except RuntimeError as e:  # websocket dropped: keep waiting on the status instead
            _err(f"log stream ended early ({e}); waiting for the job's status")
    while True:
        info = client.get_job_info(sid)
        status = _status(info)
        if status in TERMINAL:
            if status != "SUCCEEDED":
                _err(f"{sid} {status}: {info.message or ''}")
                if not follow:  # show why, without a second command
                    tail = (client.get_job_logs(sid) or "").splitlines()[-40:]
                    _err("--- last lines of the job's log ---\n" + "\n".join(tail))
            return status
        time.sleep(poll_s)


def check_config(job: str, path: Path, sets: tuple = ()) -> None:
    """What the job itself would refuse in its config (the file, then `sets`), checked here before
    anything is submitted: unknown keys, values of the wrong type or out of range, each naming its
    source, and for score the config's own rules. Paths are not checked: they name the cluster's
    storage, which this machine may not see."""
    from jobs.config import load_config

    if job == "score":
        from pipelines.scoring.config import ScoreConfig

        load_config(ScoreConfig, path, sets=sets).check()
    elif job == "pretrain":
        from jobs.pretrain import build_config

        build_config(None, str(path), {}, sets=sets)  # the file over its preset, as the job reads it
    else:
        from jobs.finetune import build_config

        build_config(None, str(path), {}, sets=sets)  # each task's keys and types too


def with_sets(text: str, sets: tuple, where: str) -> str:
    """The config file's YAML with each `--set` applied: what the cluster runs (and what the
    submission id is computed from)."""
    import yaml

    from jobs.config import merged, nested, parse_sets, read_yaml

    data = read_yaml(text, where)
    for _, values in parse_sets(sets):
        data = merged(data, nested(values))
    return yaml.safe_dump(data, sort_keys=False)


def main(cfg: SubmitConfig) -> SubmitResult:
    """Submit the job once; print its id first; wait for it if asked. See the module docstring."""
    if cfg.job not in JOBS:
        raise UserError(f"submit: job must be one of {JOBS}, got {cfg.job!r}")
    root = project_root(cfg.project_root)
    if not (root / "jobs" / f"{cfg.job}.py").is_file():
        raise UserError(f"submit: {root / 'jobs' / (cfg.job + '.py')} does not exist in this checkout")
    path = Path(cfg.config)
    if not cfg.config or not path.is_file():
        raise MissingPath(f"submit: config file {cfg.config!r} does not exist")
    from jobs.config import read_text

    text = read_text(path, "submit: config file")
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise UserError(f"submit: {path} is larger than {MAX_CONFIG_BYTES >> 10} KiB; "
                         "a job config should only hold settings and paths")
    address = resolve_address(cfg.address)
    check_config(cfg.job, path, cfg.sets)
    if cfg.sets:
        text = with_sets(text, cfg.sets, str(path))
    config = canonical_config(text, str(path))
    sid = submission_id(cfg.job, config, cfg.key)
    for line in _relative_path_warnings(config, str(path)):
        _err(line)

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    # Refuse before uploading anything; the submit below still catches a concurrent twin.
    info = _existing(client, sid)
    if info is not None:
        raise AlreadySubmitted(sid, _status(info), info.message or "", address)
    entrypoint = f"python -m jobs.submit {cfg.job}"
    try:
        client.submit_job(
            entrypoint=entrypoint, submission_id=sid,
            runtime_env=build_runtime_env(root, text, path.name, cfg.install_deps),
            metadata={"raybert_job": cfg.job, "raybert_config": str(path.resolve()),
                      "raybert_key": cfg.key or ""})
    except RuntimeError as e:
        # A twin submitted between our check and this call (Ray 2.60 answers a taken
        # submission_id with HTTP 500): the job exists now, and it is not ours.
        info = _existing(client, sid)
        if info is None:
            raise
        raise AlreadySubmitted(sid, _status(info), info.message or "", address) from e
    print(sid, flush=True)  # first line of stdout: scripts can capture it
    _err(f"submitted {cfg.job} ({path}) to {address}; logs: ray job logs --follow {sid} --address {address}")
    status = _wait(client, sid, cfg.poll_s, cfg.follow) if (cfg.wait or cfg.follow) else \
        _status(client.get_job_info(sid))
    if cfg.wait or cfg.follow:
        print(f"{sid} {status}", flush=True)
    return SubmitResult(submission_id=sid, job=cfg.job, address=address, entrypoint=entrypoint, status=status)


# --------------------------------------------------------------------------------------------
# Cluster side: `python -m jobs.submit JOB` (the entrypoint main() submits)
# --------------------------------------------------------------------------------------------

def run_shipped(job: str) -> None:
    """Write the shipped YAML to a temp file and run `python -m jobs.<job> --config <it>` in-process."""
    import runpy
    import tempfile

    if job not in JOBS:
        raise SystemExit(f"jobs.submit: unknown job {job!r}; expected one of {JOBS}")
    text = os.environ.get(CONFIG_ENV)
    if text is None:
        raise SystemExit(f"jobs.submit: {CONFIG_ENV} is not set; this entrypoint runs under `raybert submit`")
    name = os.path.basename(os.environ.get(CONFIG_NAME_ENV) or f"{job}.yaml")
    with tempfile.TemporaryDirectory(prefix="raybert-config-") as tmp:
        config = os.path.join(tmp, name)
        with open(config, "w") as f:
            f.write(text)
        print(f"raybert: python -m jobs.{job} --config {config} (shipped {name})", flush=True)
        sys.argv = [f"jobs.{job}", "--config", config]
        # As `python -m`: the job's click command parses sys.argv and exits via SystemExit,
        # which unwinds through here and removes the temp dir.
        runpy.run_module(f"jobs.{job}", run_name="__main__", alter_sys=True)


class _Refused(click.ClickException):
    exit_code = EXIT_REFUSED


@click.command("submit")
@click.argument("job", type=click.Choice(JOBS))
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The job's YAML config (its content is shipped). Paths in it are read on the "
                   "cluster: use absolute shared-storage paths.")
@set_option
@click.option("--address", help="Ray Jobs API, e.g. http://127.0.0.1:8265 (default: "
                                "RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; one is required).")
@click.option("--wait", is_flag=True, help="Block until the job ends; exit 1 unless it SUCCEEDED.")
@click.option("--follow", is_flag=True, help="Stream the job's logs, then as --wait.")
@click.option("--key", help="Tells re-runs of the same config apart (e.g. a cron slot date); "
                            "without it a second submission of the same config is refused.")
@click.option("--install-deps", is_flag=True,
              help="Also pip-install the project's dependencies (pyproject.toml, torch==2.13.0 "
                   "first) in the job's runtime_env, for clusters whose Python lacks them. Off by "
                   "default: cluster.yaml's setup_commands install them.")
@user_errors(ConnectionError, RuntimeError)
def submit(job, config_path, sets, address, wait, follow, key, install_deps):
    """Submit JOB (score | pretrain | finetune) to a Ray cluster via Ray Jobs.

    Uploads this checkout's code, ships the --config content and runs `python -m jobs.JOB
    --config FILE` on the cluster. Prints the submission id first. The same JOB + config
    (+ --key) is submitted at most once: a repeat is refused (exit 3)."""
    cfg = SubmitConfig(job=job, config=config_path, address=address, key=key, wait=wait,
                       follow=follow, install_deps=install_deps, sets=tuple(sets))
    try:
        result = main(cfg)
    except AlreadySubmitted as e:
        raise _Refused(str(e)) from e
    except KeyboardInterrupt:
        # Only the waiting stops; the job itself keeps running on the cluster.
        raise click.ClickException("interrupted; the job keeps running on the cluster "
                                   "(ray job stop <id> --address ... to stop it)") from None
    if (wait or follow) and not result.succeeded:
        raise click.ClickException(f"{result.submission_id} ended {result.status}")


__all__ = ["SubmitConfig", "SubmitResult", "AlreadySubmitted", "main", "submit", "submission_id",
           "build_runtime_env", "runtime_dependencies", "run_shipped", "EXCLUDES"]

if __name__ == "__main__":  # the cluster-side entrypoint: `python -m jobs.submit JOB`
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m jobs.submit JOB  (the entrypoint `raybert submit` runs on the cluster)")
    run_shipped(sys.argv[1])
