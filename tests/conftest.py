"""Shared fixtures. Tests share one local Ray (`local_ray`), shut down when the session ends or when
a test needs a private cluster; every test has a timeout (pyproject's pytest `timeout`), since
several Ray failures hang instead of raising."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow 3 refuses a file store unless this is set; tests track to one (test_pretrain_ray.py). Set
# before any Ray starts, so the training workers of the shared Ray have it too.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# Ray Train's preemption watcher (an actor per worker group, watching for spot-node preemption) is
# one more Python process per fit, ~4 s of CPU on 2 cores; a local test cluster is never preempted.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# The tests' shared local Ray. Starting Ray costs a few seconds, and its first Ray Data job pays
# for cold worker processes (imports: torch, tokenizers, pyarrow): 10-25 s on 2 cores, against 1-2 s
# once they are warm. So one Ray serves every test that asks for `local_ray()`; a test that needs a
# private cluster (multi-node, a real head, S3 settings its workers must inherit) shuts it down, and
# the next `local_ray()` starts it again. The session's end shuts it down (`_shared_ray_down`).
_SHARED_RAY = {"node": None}  # the node id of the shared Ray, while it is up


def _cpus_free(ray, timeout_s: float = 15.0) -> bool:
    """Whether every CPU is free again (an earlier test's actors are gone), waiting a little for
    Ray to release what a finished job held."""
    import time

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def local_ray():
    """The shared local Ray with 2 CPUs (the CI machine's size), started if it isn't up, and
    replaced if a Ray another test started is up, or if an earlier test left work holding CPUs.
    Started with the Ray Train controller polling every 0.5 s (fast_train_settings: it bounds how
    fast a report or a dead worker is noticed). Left running for the next test."""
    import ray

    if ray.is_initialized() and not (ray.get_runtime_context().get_node_id() == _SHARED_RAY["node"]
                                     and _cpus_free(ray)):
        ray.shutdown()
    if not ray.is_initialized():
        # address="local": never join a cluster another test started with `ray start`.
        with _env("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"):
            ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 << 20,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        _SHARED_RAY["node"] = ray.get_runtime_context().get_node_id()
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_down():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def fast_train_settings():
    """Ray Data progress bars off, and the Ray Train controller polling workers every 0.5 s instead
    of 2 s (it bounds how fast a report or a dead worker is noticed). Set before Ray starts, so an
    embedded Ray that a job's main() starts inherits it; both are restored on exit."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        with _env("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"):
            yield
    finally:
        ctx.enable_progress_bars = old_bars


@pytest.fixture
def fast_train():
    """fast_train_settings for one test."""
    with fast_train_settings():
        yield


@pytest.fixture
def ray_local():
    """The shared local Ray, for one test."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def ray_module():
    """The shared local Ray, for a module's tests (jobs reuse an initialized Ray and leave it running)."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="session")
def minilm_dir():
    from pipelines.corpora import minilm_path

    return minilm_path()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    """A small random BERT (the `debug` preset) with the MiniLM tokenizer: fast to load and to score."""
    import torch

    from bert_core.checkpoint import save_pretrained
    from bert_core.model import build_model, preset
    from bert_core.tokenizer import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok)), "embed"), path, tokenizer=tok)
    return str(path)


def free_port() -> int:
    """A TCP port free on loopback now: for a test cluster's dashboard, whose default (8265) another
    Ray on the machine may hold."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group(port: int):
    """A world-size-1 gloo group in this pytest process (DeepSpeed engines without Ray), torn down
    after, with DeepSpeed's per-process cache of the group forgotten so a later one starts clean."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_comm.cdb = None
        ds_groups._WORLD_GROUP = None


def assert_export_matches_zero_state(ckpt, exported: dict, dtype) -> None:
    """A checkpoint's HF export (`exported`: its state dict) equals the fp32 weights consolidated
    from its DeepSpeed ZeRO state (exactly in fp32; to bf16's precision in bf16)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    fp32.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
    assert set(fp32) == set(exported)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for k, v in fp32.items():
        torch.testing.assert_close(exported[k], v.float(), **tol, msg=k)
