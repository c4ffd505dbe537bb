"""The worker toolkit shared by the pretraining loop (pipelines/training/loop.py) and the fine-tuning loop
(pipelines/training/finetune.py).

Contract:
- `worker_session` opens what every loop starts with: `worker_context` (rank, world, device;
  torch's CPU threads set from the CPUs the worker holds), rank 0's `Heartbeat`
  (pipelines/training/watchdog.py) and `MetricsWriter` (pipelines/training/run_log.py).
- `all_reduce_sum` sums metrics over ranks (one host sync); `worker_nodes` names each rank's node.
- `derive_seed` makes every random draw a function of the data position; `mlm_step_inputs` masks
  a micro-batch with such a seed.
- `fault_drill` kills or hangs a rank at a step, once per run dir (tests and chaos runs).
- `peak_flops` measures (and caches in the run dir) the dense matmul peak MFU is quoted against.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bert_core.masking import Masker
from pipelines import storage
from pipelines.console import quiet_worker
from pipelines.training.run_log import MetricsWriter
from pipelines.training.config import FaultDrill, TrainConfig
from pipelines.training.watchdog import Heartbeat, heartbeat_interval


# --------------------------------------------------------------------------------------------
# Seeding: every draw is a function of the data position
# --------------------------------------------------------------------------------------------


def derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1, np.uint64)[0] >> 1)


def mlm_step_inputs(masker: Masker, input_ids: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    return masker(input_ids.cpu(), generator=g)


# --------------------------------------------------------------------------------------------
# Worker context, collectives, metrics and the heartbeat
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device
    threads: int  # torch CPU threads this worker computes with


def held_cpus() -> float:
    """CPUs Ray assigned to this worker (0 outside a Ray task/actor)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # not in a Ray worker
        return 0.0


def torch_threads_for(cpus: float, override: Optional[int] = None) -> int:
    """Threads to compute with: the override, else the CPUs held rounded up, at least 1. Ray sets
    OMP_NUM_THREADS=1 for a fractional CPU reservation, so a worker holding 1.5 of 2 CPUs would
    otherwise train on one thread while the other core idles."""
    if override is not None:
        if override < 1:
            raise ValueError(f"torch_threads must be >= 1, got {override}")
        return int(override)
    return max(1, math.ceil(cpus - 1e-9))


def worker_context(use_gpu: bool, torch_threads: Optional[int] = None) -> WorkerContext:
    """Rank, world size and device of this Ray Train worker; sets torch's CPU thread count."""
    import ray.train

    ctx = ray.train.get_context()
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    threads = torch_threads_for(held_cpus(), torch_threads)
    torch.set_num_threads(threads)
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device, threads)


def all_reduce_sum(values, device) -> list[float]:
    """Sum numbers (a list, or a tensor already on `device`) over every rank; one host sync."""
    import torch.distributed as dist

    # On the worker's device: NCCL (GPU workers) reduces CUDA tensors only.
    t = values.to(device, torch.float64) if torch.is_tensor(values) else torch.tensor(
        values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank must call it)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


@contextmanager
def worker_session(run_dir: str, use_gpu: bool, torch_threads: Optional[int], stall_timeout_s: Optional[float],
                   train: Optional[TrainConfig] = None, params: Optional[dict] = None):
    """What every training loop opens first: (WorkerContext, Heartbeat, MetricsWriter); rank 0's
    heartbeat (when the watchdog is on), metrics file and TensorBoard events (`run_dir/tensorboard`)
    live in `run_dir`, and are closed (the metrics queue drained) however the loop ends.

    `run_dir` may be a URI (s3://...): the heartbeat is then written to the store directly (one
    small PUT every few seconds), while metrics and TensorBoard events are written to a local
    staging dir (seeded with the run's metrics so far) and mirrored to the store. `train.mlflow` /
    `train.wandb` open those trackers on rank 0 (pipelines/training/tracking.py), with `params` as the run's
    logged config."""
    wc = worker_context(use_gpu, torch_threads)
    lead = wc.rank == 0
    beat = Heartbeat(storage.join(run_dir, "heartbeat.json") if lead and stall_timeout_s else None,
                     heartbeat_interval(stall_timeout_s))
    trackers = None
    if lead and train is not None and (train.mlflow is not None or train.wandb is not None):
        from functools import partial

        from pipelines.training.tracking import Trackers

        trackers = partial(Trackers, train.mlflow, train.wandb, str(run_dir), params or {})
    staging = None
    if lead and storage.is_uri(run_dir):
        staging = tempfile.mkdtemp(prefix="raybert-run-")
        previous = storage.read_text(storage.join(run_dir, "metrics.jsonl"))
        if previous:
            Path(staging, "metrics.jsonl").write_text(previous)
        local = Path(staging)
        log = MetricsWriter(local / "metrics.jsonl", local / "tensorboard", mirror=storage.Mirror(staging, run_dir),
                            trackers=trackers)
    else:
        log = MetricsWriter(Path(run_dir, "metrics.jsonl") if lead else None, Path(run_dir, "tensorboard"),
                            trackers=trackers)
    try:
        yield wc, beat, log
    finally:
        log.close()
        beat.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def run_in_session(loop, cfg) -> None:
    """Run `loop(cfg, wc, beat, log)` inside `worker_session` (a loop config with run_dir, use_gpu,
    torch_threads, train and to_dict): the body of every `train_loop_per_worker`."""
    quiet_worker()
    with worker_session(cfg.run_dir, cfg.use_gpu, cfg.torch_threads, cfg.train.stall_timeout_s,
                        train=cfg.train, params=cfg.to_dict()) as session:
        loop(cfg, *session)


# --------------------------------------------------------------------------------------------
# Fault drills (tests and chaos runs: pipelines.training.config.FaultDrill)
# --------------------------------------------------------------------------------------------


def fault_drill(fault: FaultDrill, rank: int, step: int, run_dir: str, beat: Heartbeat) -> None:
    """Once per run dir (a marker file records it): SIGKILL rank `kill_rank` after `kill_at_step`,
    or hang rank 0 after `stall_at_step` (showing phase "step" to the watchdog)."""
    if fault.kill_at_step == step and rank == (fault.kill_rank or 0):
        marker = storage.join(run_dir, f"fault_drill_rank{rank}_step{step}.done")
        if not storage.exists(marker):
            storage.write_text(marker, f"killed at step {step}, pid {os.getpid()}, time {time.time()}\n")
            # Ray Train registers a checkpoint only once the controller has polled every rank's
            # report of it (one poll per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A rank that dies before
            # that poll takes the other ranks' unpolled reports with it, and the restart falls back
            # to the checkpoint before. The drill waits out two polls so that "latest checkpoint" is
            # well defined.
            time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1)
            os.kill(os.getpid(), signal.SIGKILL)
    if fault.stall_at_step == step and rank == 0:
        marker = storage.join(run_dir, f"fault_drill_stall_step{step}.done")
        if not storage.exists(marker):
            storage.write_text(marker, f"stalled at step {step}, pid {os.getpid()}, time {time.time()}\n")
            beat.beat("step")
            threading.Event().wait()  # forever: only the watchdog ends this


# --------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU: measured, never assumed
# --------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure_peak_flops(device: torch.device, dtype: str, budget_s: float = 1.0) -> float:
    """Best FLOP/s of square matmuls on `device` in `dtype` at torch's current thread count.

    The size doubles (CPU 256 -> 2048, GPU 1024 -> 8192) while one matmul takes under a tenth of
    the budget, so a fast device is measured at a size that approaches its peak and a slow path
    (bf16 on a CPU without bf16 instructions runs ~1000x slower than fp32) still returns quickly.
    """
    n, n_max = (1024, 8192) if device.type == "cuda" else (256, 2048)
    dt = _TORCH_DTYPES[dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(a, b) -> float:
        t = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t

    t_end = time.perf_counter() + budget_s
    while True:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        timed(a, b)  # warm-up: kernel selection, allocations
        first = timed(a, b)
        if n >= n_max or first > budget_s / 10:
            break
        n *= 2
    best = first
    while time.perf_counter() + best < t_end:
        best = min(best, timed(a, b))
    return 2 * n ** 3 / best


def peak_flops(run_dir: Optional[str | Path], device: torch.device, dtype: str, threads: int) -> float:
    """This worker's measured peak, cached in `<run_dir>/peak_flops.json` (a local path or a URI)
    by (host, device, dtype, threads) so resumes and restarts don't re-measure."""
    key = f"{socket.gethostname()}|{device_name(device)}|{dtype}|{threads if device.type == 'cpu' else 'gpu'}"
    path = storage.join(str(run_dir), "peak_flops.json") if run_dir is not None else None
    cache = {}
    if path is not None:
        try:
            cache = json.loads(storage.read_text(path) or "{}")
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return float(cache[key])
    peak = measure_peak_flops(device, dtype)
    if path is not None:  # a lost race between ranks loses an entry, never the file
        storage.write_text(path, json.dumps({**cache, key: peak}, indent=1) + "\n")
    return peak
