"""`--device cuda` on an autoscaling cluster whose GPU workers start at 0 (cluster.yaml's
`min_workers: 0`): the job asks Ray for GPU predictor actors although the cluster has no GPU yet,
so the pending `GPU: 1` demand is there for the autoscaler to act on; if no GPU actor starts within
`resources.gpu_wait_s`, it stops with one `Error:` line, before any row is read, instead of hanging.

The cluster test stands in for that cluster with a `ray.cluster_utils.Cluster` head that has CPUs
and no GPU, and no autoscaler: no GPU node ever joins, so the wait must run out. The job runs as
users run it (the CLI in its own process, `--address` of the cluster); this process watches it
through Ray's state API (served by the head's dashboard). Other engineers' Ray sessions may run on
this machine, so, as in test_multinode.py, the cluster's address is never written to
/tmp/ray/ray_current_cluster, and every state query names the address.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert_core.checkpoint import save_pretrained
from bert_core.model import build_model, preset
from bert_core.tokenizer import load_tokenizer
from pipelines.scoring.config import ResourceConfig, ScoreConfig
from pipelines.resources import actor_pool, cpu_plan
from pipelines.scoring.output import read_output

PREDICTOR = "ScoringActor"  # the state API's class name of the predictor actors (pipelines/scoring/units.py)
GPU_WAIT_S = 10.0


# ---- the plan (no Ray) ------------------------------------------------------------------------


def test_cuda_asks_for_gpu_actors_before_any_gpu_joins():
    no_gpu, two_gpus = {"CPU": 16.0}, {"CPU": 16.0, "GPU": 2.0}
    # No GPU yet: an autoscaling pool of 1-GPU actors, from 1 up to max_gpu_actors, or num_actors.
    p = cpu_plan(no_gpu, device="cuda", max_gpu_actors=5, gpu_wait_s=123.0)
    assert (p.device, p.actor_num_gpus, p.min_actors, p.num_actors, p.gpu_wait_s) == ("cuda", 1.0, 1, 5, 123.0)
    pool = actor_pool(p)
    assert (pool.min_size, pool.max_size) == (1, 5)
    p = cpu_plan(no_gpu, num_actors=3, device="cuda", max_gpu_actors=5)
    assert (p.device, p.actor_num_gpus, p.min_actors, p.num_actors) == ("cuda", 1.0, 1, 3)
    # GPUs there now, no num_actors: up to one actor per GPU there now, still waited for.
    p = cpu_plan(two_gpus, device="cuda", max_gpu_actors=5, gpu_wait_s=123.0)
    assert (p.min_actors, p.num_actors, p.gpu_wait_s) == (1, 2, 123.0)
    # GPUs there now and num_actors given: the fixed pool, as before.
    p = cpu_plan(two_gpus, num_actors=4, device="cuda")
    assert (p.device, p.actor_num_gpus, p.min_actors, p.num_actors, p.gpu_wait_s) == ("cuda", 1.0, None, 4, None)
    pool = actor_pool(p)  # score_dataset's Ray Data pool grows from one actor to the plan's
    assert (pool.min_size, pool.max_size) == (1, 4)
    # auto is unchanged: GPU actors only if the cluster has GPUs now (a fixed pool), else CPU.
    p = cpu_plan(two_gpus, device="auto")
    assert (p.device, p.actor_num_gpus, p.min_actors, p.num_actors, p.gpu_wait_s) == ("cuda", 1.0, None, 2, None)
    p = cpu_plan(no_gpu, device="auto")
    assert (p.device, p.actor_num_gpus, p.min_actors, p.gpu_wait_s) == ("cpu", 0.0, None, None)
    with pytest.raises(ValueError, match="device must be one of"):
        cpu_plan(no_gpu, device="gpu")


def test_cpu_pool_is_one_single_thread_actor_per_cpu_within_memory():
    gib = 2**30
    # One actor per CPU, each on one torch thread, reserving less than a CPU so tasks keep a slot.
    p = cpu_plan({"CPU": 2.0, "memory": 16 * gib}, device="cpu")
    assert (p.num_actors, p.torch_threads, p.device) == (2, 1, "cpu")
    assert p.num_actors * p.actor_num_cpus + 1.0 + p.task_num_cpus <= 2.0
    p = cpu_plan({"CPU": 32.0, "memory": 200 * gib}, device="cpu", model_bytes=gib // 2)
    assert (p.num_actors, p.torch_threads) == (32, 1)
    # A big model on a small-memory node: as many actors as half the memory holds (1 GiB + 2x weights each).
    p = cpu_plan({"CPU": 32.0, "memory": 40 * gib}, device="cpu", model_bytes=2 * gib)
    assert p.num_actors == 4
    # Explicit settings win.
    p = cpu_plan({"CPU": 8.0, "memory": 64 * gib}, num_actors=2, torch_threads=3, device="cpu")
    assert (p.num_actors, p.torch_threads) == (2, 3)


def test_config_refuses_bad_device_settings():
    base = dict(input="in.parquet", output="out", model="m")
    for resources, words in ((ResourceConfig(device="gpu"), "resources.device must be one of"),
                             (ResourceConfig(device="cuda", gpu_wait_s=0), "resources.gpu_wait_s must be > 0"),
                             (ResourceConfig(device="cuda", max_gpu_actors=0), "max_gpu_actors must be >= 1")):
        with pytest.raises(ValueError, match=words):
            ScoreConfig(**base, resources=resources).check()


# ---- on a cluster with no GPU -----------------------------------------------------------------


def _tiny_ckpt(tmp, minilm_dir) -> str:
    """A debug-preset embed model with MiniLM's tokenizer: loads in a blink."""
    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    path = tmp / "tiny-embed"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok)), "embed"), path, tokenizer=tok)
    return str(path)


@pytest.fixture
def cpu_cluster():
    """A head with 3 CPUs and no GPU (nor an autoscaler to add one), torn down even on failure."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        # Keep this cluster private (see the module docstring).
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        from conftest import free_port

        c = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=3, num_gpus=0, include_dashboard=True, dashboard_port=free_port(), object_store_memory=256 << 20))
        try:
            c.wait_for_nodes()
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def _predictor_actors(address: str, state: str) -> list:
    from ray.util.state import list_actors

    try:
        return list_actors(address=address, filters=[("class_name", "=", PREDICTOR), ("state", "=", state)],
                           detail=True, raise_on_missing_output=False)
    except Exception:  # the dashboard's API server answering late: ask again
        return []


@pytest.mark.timeout(90)
def test_cuda_on_a_cluster_without_gpus_asks_for_them_then_stops(cpu_cluster, minilm_dir, tmp_path):
    model = _tiny_ckpt(tmp_path, minilm_dir)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "text": ["a few words to score"] * 8}), src)
    out = tmp_path / "out"
    (tmp_path / "score.yaml").write_text(f"resources:\n  gpu_wait_s: {GPU_WAIT_S}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.score", str(src), str(out), "--model", model, "--task", "embed",
         "--device", "cuda", "--config", str(tmp_path / "score.yaml"), "--address", cpu_cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        # While the job waits, Ray holds its demand for a 1-GPU predictor actor (what an
        # autoscaler turns into a GPU node).
        pending, deadline = [], time.monotonic() + 40
        while not pending and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            pending = _predictor_actors(cpu_cluster.address, "PENDING_CREATION")
        seen = time.monotonic()
        assert pending and job.poll() is None, "no pending predictor actor seen while the job ran"
        assert len(pending) == 1, pending  # the pool starts at its minimum, 1
        assert pending[0].required_resources.get("GPU") == 1.0, pending[0].required_resources
        # Then the wait runs out: the job ends by itself, with the clear error.
        log, _ = job.communicate(timeout=GPU_WAIT_S + 30)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    waited = time.monotonic() - seen
    errors = [line for line in log.splitlines() if line.startswith("Error:")]
    assert job.returncode == 1, log[-3000:]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    for words in (f"within {GPU_WAIT_S:g} s", "no GPU node joined", "cluster.yaml", "autoscaler",
                  "resources.gpu_wait_s", "--device cpu"):
        assert words in errors[0], errors[0]
    # It waited the limit out (from the demand first showing, ~1 s after it was made), no longer.
    assert GPU_WAIT_S - 3 < waited < GPU_WAIT_S + 25, waited
    # Nothing was scored: the pipeline stopped before its first read.
    assert read_output(str(out)).num_rows == 0
    # And the job's exit withdrew the demand: no GPU node would start for a job that gave up.
    left, deadline = [None], time.monotonic() + 15
    while left and time.monotonic() < deadline:
        left = _predictor_actors(cpu_cluster.address, "PENDING_CREATION")
        time.sleep(0.5)
    assert not left, left


def test_cuda_on_the_embedded_local_ray_without_a_gpu_is_refused_at_once(minilm_dir, tmp_path, monkeypatch):
    """No cluster: the embedded local Ray can't gain a GPU, so there is nothing to wait for."""
    import ray

    from jobs.score import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device cuda would run")
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = _tiny_ckpt(tmp_path, minilm_dir)
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "in.parquet")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="no GPU for the local Ray .* --address .* --device auto or cpu"):
        main(ScoreConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=model,
                         resources=ResourceConfig(device="cuda", gpu_wait_s=600)))
    # Refused on the driver before the lock or Ray: nothing started, nothing created.
    assert time.perf_counter() - t0 < 20 and not ray.is_initialized()
    for p in ("out", "out.checkpoint", "out.lock"):
        assert not (tmp_path / p).exists(), p
