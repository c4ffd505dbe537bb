"""The CPU/GPU reservations of a job, planned on the driver from the cluster before any work: the
Ray Train workers of a training job (pretraining and fine-tuning), and the predictor actor pool
of a scoring job (`cpu_plan`, at the end).

Why: Ray Train workers hold their CPUs for the whole run, and Ray Data's read/tokenize tasks get
only what the workers leave (Ray Train takes the workers' reservation out of Ray Data's budget).
When nothing is left, the dataset never yields a row and training waits forever without an error
("0.25/0 CPU ... backpressured:tasks(ResourceBudget)" in Ray Data's progress line). So every plan leaves the
data pipeline a budget, and settings that can't are refused before anything starts.

Contract:
- `plan_training(nodes, num_workers, ...) -> TrainPlan`. `nodes` are the alive nodes' total
  resources (`cluster_nodes()` once Ray is up; `[{"CPU": 2.0}]` for a 2-core machine).
- GPUs: `use_gpu=None` takes one GPU per worker when the cluster has GPUs, `True` requires them,
  `False` trains on CPUs. Workers that can't each get a GPU are refused, naming the counts.
- The data budget: at least `2 x task_cpus` (a read and a tokenize task at once; 0.5 CPU with
  the default 0.25-CPU tasks). When the plan sizes the workers (`cpus_per_worker=None`), the data
  gets more on big nodes: 1/8 of the cluster's CPUs for CPU training (the workers compute, the
  data only tokenizes), 1/4 for GPU training (a GPU consumes text much faster).
- `cpus_per_worker=None`: CPU workers share everything but the data budget equally (one worker
  on 2 CPUs holds 1.5, and trains on 2 threads); GPU workers take up to `GPU_WORKER_CPUS` each
  for their host-side work (masking, collation), the rest goes to the data. The size is the
  largest that also places every worker on a node (a worker can't span nodes) with the data
  budget left in pieces a task fits in.
- An explicit `cpus_per_worker` is kept as given and refused when it leaves the data less than
  its minimum or the workers can't be placed; the error names the cluster's CPUs, workers x CPUs
  each, what is left, and the fix.
- Autoscaling clusters: the plan sees the nodes alive when the job starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

from pipelines import UserError
from pipelines.scoring.config import DEVICES

GPU_WORKER_CPUS = 4.0  # most CPUs a GPU worker reserves when sized automatically
_GRID = 0.05  # automatic sizes step down in these CPU increments until they fit the nodes


@dataclass
class TrainPlan:
    num_workers: int
    cpus_per_worker: float  # what each worker reserves
    use_gpu: bool  # one GPU per worker
    data_cpus: float  # the cluster's CPUs left to the data pipeline
    cluster_cpus: float
    cluster_gpus: int
    torch_threads: Optional[int]  # the user's override; None = each worker's CPUs, rounded up

    def to_dict(self) -> dict:
        return asdict(self)


def cluster_nodes() -> list[dict]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _place(nodes: list[dict], n: int, per: float, use_gpu: bool, task_cpus: float) -> Optional[float]:
    """Pack n workers of `per` CPUs (and a GPU each with use_gpu) onto the nodes, biggest first, as
    Ray Train's PACK placement does. Returns the CPUs left that data tasks can use (whole task
    slots on each node), or None when the workers don't fit."""
    left_for_data = 0.0
    todo = n
    for node in sorted(nodes, key=lambda r: (-float(r.get("GPU", 0)), -float(r.get("CPU", 0)))):
        cpus = float(node.get("CPU", 0))
        k = todo if per <= 0 else min(todo, int(cpus / per + 1e-9))
        if use_gpu:
            k = min(k, int(float(node.get("GPU", 0)) + 1e-9))
        todo -= k
        rest = cpus - k * per
        left_for_data += math.floor(rest / task_cpus + 1e-9) * task_cpus
    return None if todo > 0 else left_for_data


def plan_training(nodes: list[dict], num_workers: int, cpus_per_worker: Optional[float] = None,
                  use_gpu: Optional[bool] = None, torch_threads: Optional[int] = None,
                  task_cpus: float = 0.25) -> TrainPlan:
    """Size the workers' reservation from the cluster (see the module docstring); raise ValueError
    with the numbers and the fix when the settings can't train."""
    n = num_workers
    cpus = sum(float(r.get("CPU", 0)) for r in nodes)
    gpus = int(sum(float(r.get("GPU", 0)) for r in nodes) + 1e-9)
    if n < 1:
        raise UserError(f"num_workers must be >= 1, got {n}")
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise UserError(f"cpus_per_worker must be > 0 (or unset, to size it from the cluster), "
                         f"got {cpus_per_worker}")
    if use_gpu is True and gpus == 0:
        raise UserError("GPUs were asked for (--use-gpu / scaling.use_gpu), but the Ray cluster has "
                         "none; drop --use-gpu (or pass --cpu) to train on CPUs")
    gpu = gpus > 0 if use_gpu is None else bool(use_gpu)
    if gpu and gpus < n:
        raise UserError(f"{n} workers need one GPU each, but the Ray cluster has {gpus}; use "
                         f"--num-workers {gpus}, or --cpu to train on CPUs")
    min_data = 2 * task_cpus
    what = f"{n} worker{'s' if n > 1 else ''}"

    if cpus_per_worker is not None:
        left = _place(nodes, n, cpus_per_worker, gpu, task_cpus)
        if left is None:
            biggest = max((float(r.get("CPU", 0)) for r in nodes), default=0.0)
            raise UserError(
                f"{what} x {_fmt(cpus_per_worker)} CPU each don't fit the Ray cluster "
                f"({_fmt(cpus)} CPUs in all, at most {_fmt(biggest)} on one node"
                + (f", {gpus} GPUs" if gpu else "") + "): lower scaling.cpus_per_worker or use fewer "
                "workers (leave cpus_per_worker unset to size it from the cluster)")
        if left < min_data:
            room = max(0.0, (cpus - min_data) / n)
            raise UserError(
                f"{what} x {_fmt(cpus_per_worker)} CPU each = {_fmt(n * cpus_per_worker)} of the Ray "
                f"cluster's {_fmt(cpus)} CPUs leave {_fmt(round(left, 4))} to the data pipeline, which "
                f"needs at least {_fmt(min_data)} (else training waits forever for data): set "
                f"scaling.cpus_per_worker to at most {_fmt(math.floor(room / _GRID) * _GRID)}, use "
                f"fewer workers, or leave cpus_per_worker unset to size it from the cluster")
        return TrainPlan(n, float(cpus_per_worker), gpu, round(cpus - n * cpus_per_worker, 4), cpus, gpus,
                         torch_threads)

    data = max(min_data, cpus / (4 if gpu else 8))
    target = (cpus - data) / n
    if gpu:
        target = min(GPU_WORKER_CPUS, target)
    # The even share first, then smaller sizes until the workers fit the nodes with the data's
    # budget left (a multi-node cluster can't give one worker CPUs of two nodes).
    candidates = [target] + [k * _GRID for k in range(int(target / _GRID), 0, -1)]
    for per in candidates:
        per = round(per, 4)
        if per <= 0:
            continue
        left = _place(nodes, n, per, gpu, task_cpus)
        if left is not None and left >= min_data:
            return TrainPlan(n, per, gpu, round(cpus - n * per, 4), cpus, gpus, torch_threads)
    raise UserError(f"the Ray cluster ({_fmt(cpus)} CPUs) has no room for {what} and the data pipeline's "
                     f"{_fmt(min_data)} CPUs; use fewer workers or a bigger cluster")


# --------------------------------------------------------------------------------------------
# Scoring: the predictor actor pool
# --------------------------------------------------------------------------------------------


@dataclass
class CpuPlan:
    num_actors: int  # a fixed pool's size, or an autoscaling pool's maximum
    actor_num_cpus: float  # logical CPUs each predictor actor reserves
    actor_num_gpus: float
    task_num_cpus: float  # Ray Data tasks beside a `score_dataset` pool (its tokenize tasks on GPU plans)
    torch_threads: int  # intra-op threads of each actor
    device: str
    min_actors: Optional[int] = None  # an autoscaling pool's minimum; None: a fixed pool of num_actors
    gpu_wait_s: Optional[float] = None  # fail if none of the pool's GPU actors has started by then


# What one CPU predictor actor holds besides its weights: Python with torch and pyarrow loaded,
# plus activations (measured: 0.93 GiB of RSS for MiniLM, whose weights are 87 MB, after a
# block of 256-token rows).
ACTOR_BASE_BYTES = 1 << 30


def cpu_plan(cluster: dict, num_actors: Optional[int] = None, actor_num_cpus: Optional[float] = None,
             task_num_cpus: float = 0.25, torch_threads: Optional[int] = None, device: str = "auto",
             max_gpu_actors: int = 8, gpu_wait_s: float = 900.0, model_bytes: int = 0,
             ray_data: bool = True) -> CpuPlan:
    """Size the predictor pool from the cluster's resources now (`ray.cluster_resources()`).

    - device auto: one actor per GPU (num_gpus=1, fixed pool) when the cluster has GPUs now, else CPU.
    - device cuda: GPU actors even if no GPU node has joined yet. On an autoscaling cluster (cluster.yaml's
      GPU workers start at 0) the pending actors' `GPU: 1` demand is what makes the autoscaler start GPU
      nodes, so the pool autoscales from 1 actor up to N: num_actors, else the GPUs there now, else
      max_gpu_actors. If no actor has started after gpu_wait_s the run stops (score raises
      GpuWaitTimeout) instead of waiting forever. With GPUs present and num_actors given, the pool
      is a fixed num_actors, as with auto.
    - CPU: by default one actor per CPU, each on one torch thread (it also tokenizes its blocks; see
      pipelines/scoring/job.py's docstring), but no more actors than half the cluster's memory holds at
      ACTOR_BASE_BYTES + 2 x `model_bytes` each. Measured on 2 cores, single runs: two 1-thread actors ran 1.06x
      (MiniLM) to 1.26x (near-free model) one 2-thread actor, whose OpenMP regions stall whenever
      either thread is preempted. With `ray_data` (the actors are a Ray Data pool: `score_dataset`)
      their logical reservations leave 1 CPU plus one task slot to the caller's read and tokenize
      tasks; without (the CPU scoring actors of pipelines/scoring/units.py, which do all the work)
      each reserves 1 CPU, or its share when there are more actors than CPUs."""
    if num_actors is not None and num_actors < 1:
        raise UserError(f"num_actors must be >= 1 (or unset for the default), got {num_actors}")
    if device not in DEVICES:
        raise UserError(f"device must be one of {DEVICES}, got {device!r}")
    cpus = float(cluster.get("CPU", 1))
    gpus = int(cluster.get("GPU", 0))
    per_gpu_actor = actor_num_cpus if actor_num_cpus is not None else 1.0
    if device == "cuda" and not (gpus and num_actors):
        n = num_actors or gpus or max_gpu_actors
        return CpuPlan(n, per_gpu_actor, 1.0, task_num_cpus, torch_threads or max(1, int(cpus // n)), "cuda",
                       min_actors=1, gpu_wait_s=gpu_wait_s)
    if gpus > 0 and device in ("auto", "cuda"):
        n = num_actors or gpus
        return CpuPlan(n, per_gpu_actor, 1.0, task_num_cpus, torch_threads or max(1, int(cpus // n)), "cuda")
    if num_actors is None:
        n = max(1, int(cpus))
        memory = float(cluster.get("memory", 0))
        if memory > 0:
            n = max(1, min(n, int(memory / 2 // (ACTOR_BASE_BYTES + 2 * model_bytes))))
    else:
        n = num_actors
    room = max(cpus - 1.0 - task_num_cpus, 0.1) if ray_data else cpus  # what the actors may reserve in total
    per = actor_num_cpus if actor_num_cpus is not None else min(1.0, room / n)
    if per > cpus:  # no node could place one: the job would wait for actors that never start
        raise UserError(f"resources.actor_num_cpus {per:g} is more than the Ray cluster's {cpus:g} CPUs; "
                         f"set it to at most {cpus:g}, or leave it unset to size it from the cluster")
    threads = torch_threads or max(1, int(min(cpus, os.cpu_count() or 1) // n))
    return CpuPlan(n, per, 0.0, task_num_cpus, threads, "cpu")


def actor_pool(plan: CpuPlan):
    """The Ray Data compute strategy of `plan` for `score_dataset`: a pool autoscaling from one actor
    (`min_actors`) up to `num_actors`. A caller's dataset may be a block or two: a fixed pool loaded
    the model in actors that got nothing to score (and Ray Data warned that it "won't fully utilize
    the available concurrency"); Ray Data adds actors while blocks wait."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=plan.min_actors or 1, max_size=plan.num_actors)


def gpu_wait_message(plan: CpuPlan, gpus_now: int) -> str:
    """Why a run that asked for GPU actors stopped (score raises it as GpuWaitTimeout)."""
    why = ("no GPU node joined the cluster" if not gpus_now else
           f"the cluster has {gpus_now} GPU(s) now, but none was free for a predictor actor")
    return (f"device cuda: no GPU predictor actor started within {plan.gpu_wait_s:g} s "
            f"(resources.gpu_wait_s): {why}. Ray was asked for actors of 1 GPU each (a pool of "
            f"{plan.min_actors} to {plan.num_actors}); on an autoscaling cluster check the GPU worker type in "
            f"cluster.yaml (available_node_types, max_workers) and the autoscaler (`ray status`, its "
            f"monitor log). To score on CPU instead, pass --device cpu (or --device auto).")
