"""Driver side of every training job: `torch_trainer` builds the TorchTrainer it runs under (one
rank per worker, gloo on CPU or NCCL on GPU, checkpoints in the run dir, worker-group restarts).
What the run dir holds, and publishing a checkpoint's export, is pipelines/training/run_dir.py's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pipelines import storage
from pipelines.compat import without_placement_group_cleaner
from pipelines.console import train_logging_level, worker_env


def torch_trainer(loop_fn, loop_config: dict, *, run_dir: str | Path, num_workers: int, use_gpu: bool,
                  cpus_per_worker: float, max_failures: int, keep_last: int, datasets: dict,
                  dataset_config=None, callbacks: Optional[list] = None):
    """The TorchTrainer every training job runs under: one rank per worker (a GPU each with
    `use_gpu`, NCCL; else gloo on CPU), checkpoints in `run_dir` (a local path or a URI: Ray
    Train writes through pyarrow.fs), worker-group restarts on failure; `callbacks` (Ray Train
    UserCallbacks, e.g. a sweep trial's TuneReportCallback)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=storage.basename(str(run_dir)), storage_path=storage.parent(str(run_dir)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_last),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level=train_logging_level()),
            worker_runtime_env=worker_runtime_env(use_gpu), callbacks=callbacks),
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    return without_placement_group_cleaner(trainer)


def worker_runtime_env(use_gpu: bool) -> dict:
    """Environment for training workers: the console's verbosity (`console.worker_env`), and on CPU,
    `cpu_worker_runtime_env`'s."""
    env = {"env_vars": worker_env()}
    if not use_gpu:
        env["env_vars"].update(cpu_worker_runtime_env()["env_vars"])
    return env


def cpu_worker_runtime_env() -> dict:
    """Environment for CPU training workers: OpenMP threads sleep when idle instead of spinning.

    A CPU worker shares its node's cores with Ray Data's read/tokenize/mask tasks. With OpenMP's
    default (active) waiting, the worker's idle threads spin between parallel regions and take
    those cores from the data tasks, which the step then waits on: passive waiting made the whole
    `raybert pretrain` job 1.3x faster on 2 cores (BENCHMARKS.md). libgomp reads the variable once,
    when torch loads, so it must be in the worker's environment from process start, not set by the
    loop. A value the user exported on the driver wins.
    """
    return {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
