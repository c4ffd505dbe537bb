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
