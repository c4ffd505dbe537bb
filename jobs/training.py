"""What pretraining and fine-tuning share on the driver: the scaling config, the checks both make
before Ray starts, and `run_trainer`, the one path from a Ray session to a finished Ray Train fit.

Contract:
- `ScalingConfig`: workers, GPUs and CPUs of a training job (pipelines/resources.py plans them).
- `expects_gpu`, `check_run_dir`, `check_init_from`: driver-side checks, no Ray (the ranges of
  every setting: pipelines/settings.py; what a run dir holds: pipelines/training/run_dir.py).
- `plan_workers(scaling, task_cpus, dtype)`, in a Ray session: the workers' resource plan; settings
  the cluster can't run are refused (`jobs.schedule.Refused`) before any worker starts.
- `training_flags`: the command-line flags every training command shares, handed to the command
  as one `training` dict of config overrides; `training_command(presets)`: those, `--config` and
  `--preset`, `--print-config` and the CLI's error handling, as one decorator.
- `run_trainer(...)`: the TorchTrainer (pipelines/training/trainer.py) under the stall watchdog,
  then the latest checkpoint's HF export published to the run dir's export; returns a
  `TrainerResult` (checkpoint, export, last metrics).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import click

from pipelines import PathInTheWay, UserError, as_user_error
from pipelines.training.config import DTYPES, ScalingConfig  # noqa: F401 (jobs import it from here)


# flag's parameter name -> the config key it overrides
TRAINING_FLAGS = {"num_workers": "scaling.num_workers", "use_gpu": "scaling.use_gpu", "dtype": "train.dtype",
                  "zero_stage": "train.zero_stage", "deepspeed_json": "train.deepspeed", "address": "address",
                  "lr": "train.lr", "warmup_steps": "train.warmup_steps", "micro_batch_size": "train.micro_batch_size",
                  "seed": "train.seed"}
# config key -> the flag that sets it where it isn't --<field-with-dashes>, for errors that name the source
SHARED_FLAGS = {"scaling.use_gpu": "--use-gpu/--cpu", "train.deepspeed": "--deepspeed"}
_TRAINING_OPTIONS = [
    click.option("--num-workers", type=int, help="Ray Train workers."),
    click.option("--use-gpu/--cpu", "use_gpu", default=None,
                 help="One GPU per worker, or CPUs only. Default: GPUs when the cluster has them."),
    click.option("--dtype", type=click.Choice(list(DTYPES)), help="Training precision (fp16: GPU only)."),
    click.option("--zero-stage", type=int, help="DeepSpeed ZeRO stage (0-3)."),
    click.option("--deepspeed", "deepspeed_json", help="DeepSpeed JSON merged over raybert's (ZeRO tuning, offload)."),
    click.option("--address", help="Ray address; default RAY_ADDRESS or an embedded local Ray."),
    click.option("--lr", type=float, help="Peak learning rate (train.lr)."),
    click.option("--warmup-steps", type=int, help="Linear warmup steps (train.warmup_steps)."),
    click.option("--micro-batch-size", type=int, help="Rows per worker per micro-batch (train.micro_batch_size)."),
    click.option("--seed", type=int, help="Seed of the weights, masking and data order (train.seed)."),
]


def training_command(presets: dict):
    """What every training command's click function carries, outermost first: `--config` and
    `--preset` (config_path, preset), the training flags (training), `--print-config`
    (print_config), `--quiet`/`--verbose`, and one `Error:` line for a user's error (a stalled run included)."""
    from jobs.config import config_flags, print_config_option, user_errors, verbosity_options
    from pipelines.training.watchdog import TrainingStalled

    def wrap(command):
        return config_flags(presets)(training_flags(print_config_option(
            verbosity_options(user_errors(TrainingStalled)(command)))))
    return wrap


def training_flags(command):
    """Adds the flags of TRAINING_FLAGS to a click command; it receives them as `training`, a dict
    of config overrides (dotted keys; None where the flag was not given)."""
    @functools.wraps(command)
    def with_training(*args, **kwargs):
        training = {key: kwargs.pop(name) for name, key in TRAINING_FLAGS.items()}
        return command(*args, training=training, **kwargs)

    for option in reversed(_TRAINING_OPTIONS):
        with_training = option(with_training)
    return with_training


FP16_NEEDS_GPU = "dtype fp16 needs GPUs (DeepSpeed on CPU supports fp32 and bf16); use --dtype bf16 or --use-gpu"


def expects_gpu(scaling: ScalingConfig, address: Optional[str]) -> Optional[bool]:
    """Whether the job will train on GPUs, as far as the driver can tell before Ray starts: the
    setting if given, else (embedded local Ray) whether this machine has CUDA; None for a cluster
    not connected to yet (the resource plan decides)."""
    if scaling.use_gpu is not None:
        return scaling.use_gpu
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return torch.cuda.is_available()


def _is_our_run_dir(run_dir: str, names: list[str]) -> bool:
    """Whether `run_dir` (holding `names`) was written by a raybert training job: a ledger or run
    lock, a config.json with a job's settings, or a checkpoint with our state or HF export."""
    from jobs.schedule import LEDGER_NAME, LOCK_NAME, RUNNING_NAME
    from pipelines import storage
    from pipelines.training.run_dir import holds_our_checkpoint

    if {LEDGER_NAME, LOCK_NAME, RUNNING_NAME} & set(names):
        return True
    if "config.json" in names:
        try:
            saved = json.loads(storage.read_text(storage.join(run_dir, "config.json")) or "null")
        except ValueError:
            saved = None
        if isinstance(saved, dict) and ("pretrain" in saved or "finetune" in saved):
            return True
    return holds_our_checkpoint(run_dir, names)


def check_outside_data(loc: str, what: str, data: list) -> None:
    """Refuse a location a job writes (a run dir, `vocab --out`) inside a data directory or glob base
    it reads: the files it writes there (config.json, metrics.jsonl, tokenizer.json: JSON Lines by
    extension) would be found as data by the next job that reads that directory, its own resume
    included."""
    from pipelines.inputs import inside_inputs

    holder = inside_inputs(loc, data)
    if holder is not None:
        raise UserError(f"{what} {loc} lies inside the data {holder}: its files (config.json, metrics.jsonl, "
                         f"tokenizer files) would be read as data by every later job on {holder}; choose a "
                         f"{what} outside the data")


def check_run_dir(run_dir: str, data: list = ()) -> None:
    """Refuse, before anything is written, a run dir that is a file, or a directory of other files
    (a data folder, a home directory, another tool's output): a job would write its checkpoints,
    config.json, logs and export among them (and over a config.json of theirs); or one inside the
    `data` it reads (`check_outside_data`). An empty or new directory, or a raybert run dir
    (resumed, or refused by the job's own rules), passes."""
    from pipelines import storage

    check_outside_data(run_dir, "--run-dir", list(data))
    if not storage.is_uri(run_dir) and os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise PathInTheWay(f"--run-dir {run_dir} is a file; give a directory (new or empty) for the run")
    names = storage.list_names(run_dir)
    if not names or _is_our_run_dir(run_dir, names):
        return
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    raise PathInTheWay(f"--run-dir {run_dir} already holds files that no raybert run wrote ({shown}); a run "
                          f"writes its checkpoints, config.json, logs and export/ there. Choose a new or empty "
                          f"--run-dir")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def check_init_from(init_from: str, config, tokenizer_path: str, tok) -> None:
    """Refuse an `--init-from` checkpoint (`config`: what `bert_core.check_checkpoint` returned for
    it) whose vocabulary isn't the tokenizer's: its embedding rows would be trained as other
    tokens, silently (the weights load either way). Driver side, no Ray; shared by pretraining and
    fine-tuning."""
    from bert_core.tokenizer import load_tokenizer

    ckpt = Path(init_from).absolute()
    if config.vocab_size < len(tok):
        raise UserError(f"--init-from {ckpt} has vocab_size {config.vocab_size:,}, smaller than the "
                         f"{len(tok):,} tokens of the tokenizer {tokenizer_path}: ids past "
                         f"{config.vocab_size - 1} have no embedding. Use the tokenizer the checkpoint "
                         f"was trained with (drop --tokenizer), or drop --init-from to train fresh weights")
    ships_own = any((ckpt / f).is_file() for f in TOKENIZER_FILES)
    if ships_own and Path(tokenizer_path).absolute() != ckpt:
        with as_user_error("init_from"):
            own = load_tokenizer(ckpt)
        if own.get_vocab() != tok.get_vocab():
            raise UserError(f"--init-from {ckpt} ships its own vocabulary ({len(own):,} tokens), and "
                             f"--tokenizer {tokenizer_path} is another ({len(tok):,} tokens): the checkpoint's "
                             f"embeddings would be read as other tokens. Drop --tokenizer to use the "
                             f"checkpoint's, or drop --init-from to train fresh weights on this vocabulary")
    elif not ships_own and config.vocab_size != len(tok):
        raise UserError(f"--init-from {ckpt} has vocab_size {config.vocab_size:,} but the tokenizer "
                         f"{tokenizer_path} has {len(tok):,} tokens, so it was trained with another "
                         f"vocabulary; pass that one with --tokenizer, or drop --init-from")


def plan_workers(scaling: ScalingConfig, task_cpus: float, dtype: str):
    """The workers' resource plan on the connected cluster (pipelines.resources.TrainPlan)."""
    from jobs.schedule import Refused
    from pipelines.resources import cluster_nodes, plan_training

    try:
        plan = plan_training(cluster_nodes(), scaling.num_workers, scaling.cpus_per_worker, scaling.use_gpu,
                             scaling.torch_threads, task_cpus=task_cpus)
    except ValueError as e:
        raise Refused(str(e)) from None
    if dtype == "fp16" and not plan.use_gpu:
        raise Refused(FP16_NEEDS_GPU)
    return plan


class TrainerResult(NamedTuple):
    """A finished fit (`run_trainer`)."""

    checkpoint: Optional[str]  # the latest checkpoint Ray Train registered (None if none)
    export: Optional[str]  # its HF export, published to the run dir's export/
    metrics: dict  # the last reported metrics


def run_trainer(loop_fn, loop_config: dict, *, run_dir: str, plan, scaling: ScalingConfig, keep_last: int,
                datasets: dict, stall_timeout_s: Optional[float], dataset_config=None) -> TrainerResult:
    """Fit `loop_fn` on `plan`'s workers under the stall watchdog."""
    from pipelines.training.run_dir import checkpoint_location, publish_export
    from pipelines.training.trainer import torch_trainer
    from pipelines.training.watchdog import fit_with_watchdog

    trainer = torch_trainer(loop_fn, loop_config, run_dir=run_dir, num_workers=plan.num_workers,
                            use_gpu=plan.use_gpu, cpus_per_worker=plan.cpus_per_worker,
                            max_failures=scaling.max_failures, keep_last=keep_last, datasets=datasets,
                            dataset_config=dataset_config)
    result = fit_with_watchdog(trainer, run_dir, stall_timeout_s)
    ckpt = checkpoint_location(run_dir, result.checkpoint.path) if result.checkpoint is not None else None
    return TrainerResult(checkpoint=ckpt, export=publish_export(ckpt, run_dir), metrics=dict(result.metrics or {}))
