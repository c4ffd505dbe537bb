"""Shared fixtures. Every test that starts Ray shuts it down; every test has a timeout
(pyproject's pytest `timeout`), since several Ray failures hang instead of raising."""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def local_ray():
    """A private local Ray with 2 CPUs (the CI machine's size), shut down on exit even on failure."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local": never join a cluster another test started with `ray start`.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 << 20,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def fast_train_settings():
    """Ray Data progress bars off, and the Ray Train controller polling workers every 0.5 s instead
    of 2 s (it bounds how fast a report or a dead worker is noticed). Set before Ray starts, so an
    embedded Ray that a job's main() starts inherits it; both are restored on exit."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old_bars, old_env = ctx.enable_progress_bars, os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    ctx.enable_progress_bars = False
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    try:
        yield
    finally:
        ctx.enable_progress_bars = old_bars
        if old_env is None:
            os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
        else:
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old_env


@pytest.fixture
def fast_train():
    """fast_train_settings for one test."""
    with fast_train_settings():
        yield


@pytest.fixture
def ray_local():
    """Ray for one test."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def ray_module():
    """Ray shared by a module's tests (jobs reuse an initialized Ray and leave it running)."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="session")
def minilm_dir():
    from pipelines.corpora import minilm_path

    return minilm_path()


def free_port() -> int:
    """A TCP port free on loopback now: for a test cluster's dashboard, whose default (8265) another
    Ray on the machine may hold."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
