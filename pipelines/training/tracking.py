"""Opt-in experiment trackers for training: MLflow and Weights & Biases, beside metrics.jsonl and
TensorBoard (which are always on).

Contract:
- Enabled per run by `TrainConfig.mlflow` / `TrainConfig.wandb`: a mapping of settings (YAML
  `train: {mlflow: {tracking_uri: ..., experiment_name: ...}}`), or `{}` for the defaults; None
  (the default) = off. The package must be installed where the workers run (`pip install
  mlflow-skinny` / `wandb`); `check_trackers` refuses, on the driver, a tracker whose package is
  missing or a setting its API doesn't take.
- MLflow goes through Ray's `setup_mlflow` (experiment created if missing, the run's config
  logged as params); its settings are that function's keyword arguments. The MLflow run is named
  after the run dir and tagged `raybert.run_dir`; each invocation of a scheduled run is one MLflow
  run. W&B settings are `wandb.init` keyword arguments; the W&B run id defaults to one derived from
  the run dir with `resume="allow"`, so a scheduled run's invocations continue one W&B run.
- Only rank 0 tracks, from the metrics thread: a step never waits on a tracking server. A tracker
  that fails (server down, bad credentials) prints one line and is dropped; training goes on. An
  MLflow server over http(s) gets one TCP connect of `CONNECT_TIMEOUT_S` first: MLflow's client
  retries a refused connection with backoff for minutes, and the run waited for it at its end.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import socket
from typing import Optional

from pipelines import UserError

TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}  # config key -> the module that must be importable
_MLFLOW_FIXED = {"config", "rank_zero_only"}  # set by us
CONNECT_TIMEOUT_S = 5.0


def check_reachable(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connect to an http(s) server's host and port; ConnectionError naming it if none."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return  # a local file store, databricks, ...: nothing to connect to
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"tracking server {uri} is unreachable ({e})") from None


def _mlflow_keys() -> set[str]:
    from ray.air.integrations.mlflow import setup_mlflow

    return set(inspect.signature(setup_mlflow).parameters) - _MLFLOW_FIXED


def _wandb_keys() -> set[str]:
    import wandb

    return set(inspect.signature(wandb.init).parameters) - {"config"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_trackers(mlflow: Optional[dict], wandb: Optional[dict]) -> None:
    """Driver side: each enabled tracker's package is installed and its settings are ones its API takes."""
    for name, settings, keys in (("mlflow", mlflow, _mlflow_keys), ("wandb", wandb, _wandb_keys)):
        if settings is None:
            continue
        if not isinstance(settings, dict):
            raise UserError(f"train.{name} must be a mapping of settings ({{}} for the defaults), "
                             f"got {type(settings).__name__}")
        if not _installed(TRACKERS[name]):
            package = "mlflow-skinny" if name == "mlflow" else "wandb"
            raise UserError(f"train.{name} is set but {name} is not installed; pip install {package} on the "
                             f"driver and every node, or drop train.{name}")
        unknown = sorted(set(settings) - keys())
        if unknown:
            raise UserError(f"train.{name}: unknown setting(s) {unknown}; see "
                             f"{'ray.air.integrations.mlflow.setup_mlflow' if name == 'mlflow' else 'wandb.init'}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """Rank 0's open trackers; `log(scalars, step)` and `close()` from the thread that opened them."""

    def __init__(self, mlflow: Optional[dict], wandb: Optional[dict], run_dir: str, params: dict):
        self._open: dict[str, object] = {}
        name = str(run_dir).rstrip("/").rsplit("/", 1)[-1]
        params = {k: v for k, v in _flat(params).items() if v is not None}
        if mlflow is not None:
            self._start("mlflow", lambda: self._mlflow(mlflow, name, run_dir, params))
        if wandb is not None:
            self._start("wandb", lambda: self._wandb(wandb, name, run_dir, params))

    def _start(self, name: str, open_fn) -> None:
        try:
            self._open[name] = open_fn()
        except Exception as e:  # tracking is an add-on: say so once, keep training
            print(f"raybert: {name} tracking is off for this run: {type(e).__name__}: {e}", flush=True)

    @staticmethod
    def _mlflow(settings: dict, name: str, run_dir: str, params: dict):
        from ray.air.integrations.mlflow import setup_mlflow

        uri = settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            check_reachable(uri)
        # A server that goes away mid-run: a few short retries per call, not minutes (unless the
        # user set these).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        kw = {"experiment_name": "raybert", "create_experiment_if_not_exists": True, "run_name": name} | settings
        kw["tags"] = {"raybert.run_dir": run_dir} | (settings.get("tags") or {})
        return setup_mlflow(config=params, rank_zero_only=False, **kw)

    @staticmethod
    def _wandb(settings: dict, name: str, run_dir: str, params: dict):
        import wandb

        run_id = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
        kw = {"project": "raybert", "name": name, "id": run_id, "resume": "allow"} | settings
        return wandb.init(config=params, **kw)

    def log(self, scalars: dict, step: int) -> None:
        for name, client in list(self._open.items()):
            try:
                if name == "mlflow":
                    client.log_metrics(scalars, step=step)
                else:
                    client.log(scalars, step=step)
            except Exception as e:
                print(f"raybert: {name} logging failed, {name} tracking is off from step {step}: "
                      f"{type(e).__name__}: {e}", flush=True)
                del self._open[name]

    def close(self) -> None:
        for name, client in self._open.items():
            try:
                client.end_run() if name == "mlflow" else client.finish()
            except Exception as e:
                print(f"raybert: closing {name} failed: {type(e).__name__}: {e}", flush=True)
        self._open = {}
