"""`raybert finetune`: classifiers and taggers (one task or several) from a pretrained BERT, on
Ray Train + DeepSpeed.

Contract:
- `main(cfg: FinetuneConfig) -> FinetuneResult` fine-tunes `model.init_from` (an HF BERT
  directory, e.g. a `raybert pretrain` export; or fresh weights of `model.preset`) on labeled
  Parquet, CSV or JSON Lines, one head per task (pipelines/training/finetune_data.py for the formats), and writes
  `<run_dir>/export`: an HF directory whose primary task loads in
  `transformers.BertFor{Sequence,Token}Classification`, with `id2label`, and which
  `raybert score --task classify|tag [--head TASK]` serves. Without `address` / RAY_ADDRESS it
  starts an embedded local Ray.
- Labels are discovered with Ray Data unless a task lists them; each task's rows are tokenized and
  materialized in the object store, then streamed to `scaling.num_workers` workers running
  pipelines/training/finetune.py (`train_<task>` / `val_<task>` datasets).
- The step count comes from `options.epochs` (over the labeled training rows, accounting for the
  mixing share of an auxiliary mlm task), and the warmup from `options.warmup_ratio`.
- The run dir (a local path, or an object-store URI as for pretraining) holds Ray's checkpoint
  of the result, `metrics.jsonl`, `config.json` and `export/`.
  A fine-tune does not resume: a run dir that already has a result is refused, and so is a
  directory of files no raybert run wrote (jobs.training.check_run_dir).
- Before Ray starts, `validate` checks every setting's rule (pipelines/settings.py), and `main` the
  row lengths (`data.max_length`, `data.mlm_seq_len`) against the model's position table.
- `sweep` (`--sweep lr=2e-5,5e-5 --sweep seed=0,1`): one fine-tune per combination on Ray Tune
  with ASHA early stopping, in `<run_dir>/trials/`; the trial with the best validation score is
  exported to `<run_dir>/export`, and `<run_dir>/sweep.json` records every trial
  (pipelines/training/sweep.py). A malformed sweep is refused before Ray starts.
- Config: `PRESETS[name]` (model size plus matching settings; `debug` runs in seconds), then a YAML
  file (FinetuneConfig fields; `tasks` is a list of TaskData mappings), then the flags, then each
  `--set section.key=value` (jobs/config.py), checked as a whole (pipelines/settings.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import click

from pipelines import PathInTheWay, UserError, as_user_error
from bert_core.masking_config import MaskingConfig
from jobs.checks import check_seq_len, model_config
from jobs.config import echo_config, from_preset, stdout_for_the_result
from jobs.training import (FP16_NEEDS_GPU, SHARED_FLAGS, ScalingConfig, check_init_from, check_run_dir, expects_gpu,
                           training_command)
from pipelines.settings import check
from pipelines.training.finetune_data import FinetuneData, LabelMaps, TaskData
from pipelines.training.sweep import SweepResult
from pipelines.training.config import FinetuneOptions, ModelConfig, TrainConfig


def _train_defaults() -> TrainConfig:
    # Fine-tuning settings in the range BERT's paper used (lr 2e-5..5e-5, batch 16..32).
    return TrainConfig(max_steps=1000, micro_batch_size=32, lr=5e-5, warmup_steps=0, decay="linear",
                       weight_decay=0.01, zero_stage=1, log_every=20, eval_every=200)


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune"  # made absolute (Ray needs an absolute storage path)
    tasks: list[TaskData] = field(default_factory=list)  # one head each (YAML: a list of TaskData mappings)
    model: ModelConfig = field(default_factory=ModelConfig)  # init_from: the pretrained checkpoint
    tokenizer: Optional[str] = None  # default: model.init_from's tokenizer
    data: FinetuneData = field(default_factory=FinetuneData)
    train: TrainConfig = field(default_factory=_train_defaults)
    options: FinetuneOptions = field(default_factory=FinetuneOptions)
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # mlm tasks
    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(num_workers=1))
    address: Optional[str] = None  # Ray cluster address; None = RAY_ADDRESS or embedded local Ray
    # A Ray Tune sweep: {key: [values]} (pipelines.training.sweep.SWEEP_KEYS: lr, weight_decay, seed, dropout,
    # warmup_ratio, layer_lr_decay), one trial per combination, the best on validation exported.
    sweep: dict = field(default_factory=dict)


# The flags of `raybert finetune` not named --<field> (errors name the flag that gave a value).
FLAGS = {**SHARED_FLAGS, "tasks": "--data"}


def _preset(name: str, lr: float, micro_batch_size: int = 32) -> FinetuneConfig:
    cfg = FinetuneConfig(model=ModelConfig(preset=name))
    cfg.train.lr, cfg.train.micro_batch_size = lr, micro_batch_size
    return cfg


def _debug() -> FinetuneConfig:
    cfg = _preset("debug", lr=1e-3, micro_batch_size=16)
    cfg.options.epochs = 2
    cfg.train.log_every, cfg.train.eval_every = 5, 20
    cfg.data.max_length = 64
    return cfg


# Model size (for fresh weights; `init_from` overrides it) plus a learning rate that suits it.
PRESETS = {
    "debug": _debug,
    "mini": lambda: _preset("mini", lr=1e-4),
    "small": lambda: _preset("small", lr=1e-4),
    "base": lambda: _preset("base", lr=3e-5),
    "large": lambda: _preset("large", lr=2e-5, micro_batch_size=16),
}


def preset_config(name: str) -> FinetuneConfig:
    return from_preset(PRESETS, name)


@dataclass
class FinetuneResult:
    run_dir: str
    export: str  # HF directory of the best weights (every head; the primary under HF's keys)
    metrics: dict  # the final metrics (best evaluation and last step)
    labels: dict  # task -> id2label
    max_steps: int


def validate(cfg: FinetuneConfig) -> list[TaskData]:
    from jobs.config import as_model_location, as_run_location, load_deepspeed
    from pipelines.training.tracking import check_trackers
    from pipelines.training.engine import ds_config

    cfg.run_dir = as_run_location(cfg.run_dir)
    cfg.tokenizer = as_model_location("tokenizer", cfg.tokenizer)
    cfg.model.init_from = as_model_location("init_from", cfg.model.init_from)
    cfg.train.deepspeed = load_deepspeed(cfg.train.deepspeed)
    check(cfg)  # every setting's type and rule, for a config built or changed in code (the CLI checked its sources)
    ds_config(cfg.train, cfg.scaling.num_workers)  # a contradicting --deepspeed file fails here
    check_trackers(cfg.train.mlflow, cfg.train.wandb)
    tasks = list(cfg.tasks)
    if not tasks:
        raise UserError("no task: pass --data (labeled Parquet, CSV or JSON Lines) or list `tasks` in the --config file")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task names must be unique, got {names}")
    if not any(t.kind != "mlm" for t in tasks):
        raise UserError("at least one classify or tag task is needed (mlm is an auxiliary task)")
    for t in tasks:
        if not t.paths:
            raise UserError(f"task {t.name}: no data paths")
    if cfg.train.dtype == "fp16" and expects_gpu(cfg.scaling, cfg.address) is False:
        raise UserError(FP16_NEEDS_GPU)
    if not (cfg.model.init_from or cfg.tokenizer):
        raise UserError("no tokenizer: pass --init-from (a pretrained checkpoint) or --tokenizer")
    if cfg.train.total_time_budget_s is not None:
        raise UserError("train.total_time_budget_s plans pretraining runs; a fine-tune is sized by options.epochs "
                         "(or train.max_steps): drop it from the config")
    if cfg.sweep:
        from pipelines.training.sweep import parse_sweep

        cfg.sweep = parse_sweep(cfg.sweep)
        if cfg.data.val_fraction <= 0 and not any(t.val_paths for t in tasks):
            raise UserError("a sweep chooses its trial on validation rows, and there are none: give --val-data, "
                             "or data.val_fraction > 0")
    return tasks


def _labels(task: TaskData) -> LabelMaps:
    from pipelines.training.finetune_data import discover_labels, encode_labels, label_key

    if task.kind == "mlm":
        return LabelMaps({}, {})
    if task.labels:
        id2label = {i: str(v) for i, v in enumerate(task.labels)}
        label2id = {label_key(v): i for i, v in enumerate(task.labels)} | {str(v): i for i, v in enumerate(task.labels)}
        return LabelMaps(id2label, label2id)
    return encode_labels(discover_labels(task))


class StepPlan(NamedTuple):
    max_steps: int
    warmup_steps: int


def plan_steps(cfg: FinetuneConfig, specs: list) -> StepPlan:
    """(max_steps, warmup_steps) from epochs over the labeled rows and the warmup ratio."""
    from pipelines.training.finetune import mixing_probabilities

    t = cfg.train
    steps = t.max_steps
    if cfg.options.epochs is not None:
        labeled = [s for s in specs if s.kind != "mlm"]
        share = 1.0
        if cfg.options.mixing == "round_robin":
            share = len(labeled) / len(specs)
        elif len(specs) > 1:
            p = mixing_probabilities(specs, cfg.options.mixing)
            share = float(sum(pi for pi, s in zip(p, specs) if s.kind != "mlm"))
        rows_per_step = t.micro_batch_size * t.grad_accum * cfg.scaling.num_workers
        if not 0 < cfg.options.epochs < math.inf:  # validate refuses it; never round it up to a step here
            raise UserError(f"options.epochs must be > 0 (or unset), got {cfg.options.epochs}")
        steps = math.ceil(cfg.options.epochs * sum(s.train_rows for s in labeled) / rows_per_step / share)
    warmup = t.warmup_steps if cfg.options.warmup_ratio is None else int(cfg.options.warmup_ratio * steps)
    return StepPlan(steps, warmup)


def main(cfg: FinetuneConfig) -> FinetuneResult:
    tasks = validate(cfg)
    from pipelines import storage

    run_dir = storage.normalize(cfg.run_dir)
    check_new_run_dir(run_dir, tasks)
    tokenizer = cfg.tokenizer or cfg.model.init_from
    tokenizer = tokenizer if storage.is_uri(tokenizer) else str(Path(tokenizer).absolute())
    from bert_core.checkpoint import check_checkpoint
    from bert_core.tokenizer import load_tokenizer

    with as_user_error("init_from"):  # bert_core's words about the checkpoint, as the user's error
        init = check_checkpoint(storage.cached_copy(cfg.model.init_from)) if cfg.model.init_from else None  # before its tokenizer
    with as_user_error("tokenizer"):
        tok = load_tokenizer(storage.cached_copy(tokenizer))  # fail here, not on every worker
    if init is not None:
        check_init_from(storage.cached_copy(cfg.model.init_from), init, storage.cached_copy(tokenizer), tok)
    check_seq_lens(cfg, tasks, len(tok))
    # Labels are read with pyarrow on the driver: a bad label set is refused before Ray starts
    # and before the run dir exists.
    labels = {t.name: _labels(t) for t in tasks}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from jobs.ray_env import ray_session
    from jobs.training import plan_workers, run_trainer
    from pipelines.compat import disable_deepspeed_jit
    from pipelines.training.finetune import FinetuneLoopConfig, finetune_loop_per_worker
    from pipelines.training.loop import as_loop_config

    disable_deepspeed_jit()
    with ray_session(cfg.address):
        plan = plan_workers(cfg.scaling, cfg.data.num_cpus, cfg.train.dtype)
        datasets, specs = task_datasets(cfg, tasks, labels, tokenizer)
        train = copy.deepcopy(cfg.train)
        train.max_steps, train.warmup_steps = plan_steps(cfg, specs)
        model = copy.deepcopy(cfg.model)
        if model.init_from and not storage.is_uri(model.init_from):  # workers may run in another directory
            model.init_from = str(Path(model.init_from).absolute())
        loop = FinetuneLoopConfig(run_dir=run_dir, tokenizer=tokenizer, tasks=specs,
                                  model=model, data=copy.deepcopy(cfg.data), train=train,
                                  options=copy.deepcopy(cfg.options), masking=copy.deepcopy(cfg.masking),
                                  use_gpu=plan.use_gpu, torch_threads=plan.torch_threads)
        # The run dir is made only now, every check passed (some need the tokenized rows): a refused
        # fine-tune leaves nothing behind.
        storage.write_text(storage.join(run_dir, "config.json"), json.dumps(
            {"finetune": asdict(cfg) | {"tasks": [asdict(t) for t in tasks]}, "loop": loop.to_dict(),
             "plan": plan.to_dict()}, indent=1, default=str) + "\n")
        if cfg.sweep:
            export, metrics = _sweep(cfg, loop, datasets, plan, run_dir, specs)
        else:
            fit = run_trainer(finetune_loop_per_worker, as_loop_config(loop), run_dir=run_dir, plan=plan, scaling=cfg.scaling,
                              keep_last=1, datasets=datasets, stall_timeout_s=cfg.train.stall_timeout_s)
            export, metrics = fit.export, fit.metrics
    if export is None:
        raise RuntimeError(f"fine-tune finished without a result checkpoint in {run_dir}")
    return FinetuneResult(run_dir=run_dir, export=export, metrics=metrics,
                          labels={s.name: s.id2label for s in specs if s.id2label}, max_steps=train.max_steps)


def check_new_run_dir(run_dir: str, tasks: list) -> None:
    """A fine-tune's run dir: new, empty, or a raybert run dir without a result (fine-tunes don't
    resume), and outside every task's data (jobs.training.check_run_dir)."""
    from pipelines import storage
    from pipelines.training.run_dir import export_dir, has_checkpoints

    check_run_dir(run_dir, [p for t in tasks for p in t.paths + t.val_paths])
    if has_checkpoints(run_dir) or storage.exists(storage.join(run_dir, "trials")):
        saved = json.loads(storage.read_text(storage.join(run_dir, "config.json")) or "{}")
        what = ("a pretraining run" if "pretrain" in saved else "a sweep's trials" if saved.get("finetune", {}).get("sweep")
                else "a fine-tune result")
        hint = f" (--init-from {export_dir(run_dir)} fine-tunes its weights)" if "pretrain" in saved else ""
        raise PathInTheWay(f"{run_dir} already holds {what}; fine-tunes don't resume and never write into "
                              f"another run, use a new --run-dir{hint}")


def check_seq_lens(cfg: FinetuneConfig, tasks: list, vocab_size: int) -> None:
    """The row lengths the tasks use fit the model's position table (init_from's config, or the
    preset's, with model.overrides)."""
    bert_config = model_config(cfg.model, vocab_size)
    if any(t.kind != "mlm" for t in tasks):
        check_seq_len("data.max_length", cfg.data.max_length, bert_config, cfg.model)
    if any(t.kind == "mlm" for t in tasks):
        check_seq_len("data.mlm_seq_len", cfg.data.mlm_seq_len, bert_config, cfg.model)


def _sweep(cfg: FinetuneConfig, loop, datasets: dict, plan, run_dir: str, specs: list) -> SweepResult:
    from pipelines.training.sweep import run_sweep

    if not any(s.has_val for s in specs):
        raise UserError("a sweep chooses its trial on validation rows, and no task has any (the hashed "
                         "data.val_fraction split left none): give --val-data, or a larger val_fraction")
    return run_sweep(loop, datasets, plan.to_dict(), run_dir, cfg.sweep)


class TaskDatasets(NamedTuple):
    datasets: dict  # train_<task> / val_<task> -> Ray Dataset
    specs: list  # TaskSpec per task


def task_datasets(cfg: FinetuneConfig, tasks: list, labels: dict, tokenizer: str) -> TaskDatasets:
    """In a Ray session: each task's tokenized train (and val) datasets, keyed `train_<task>` /
    `val_<task>`, and its TaskSpec; a task with fewer training rows than one step is refused."""
    from pipelines.training.finetune import TaskSpec
    from pipelines.training.finetune_data import build_task_datasets

    datasets, specs = {}, []
    need = cfg.train.micro_batch_size * cfg.scaling.num_workers
    for task in tasks:
        id2label, label2id = labels[task.name]
        ds = build_task_datasets(task, cfg.data, tokenizer, label2id)
        rows = ds["train"].count()
        if rows < need:
            raise UserError(f"task {task.name}: {rows} training rows, fewer than one step needs "
                             f"({cfg.train.micro_batch_size} x {cfg.scaling.num_workers} workers)")
        has_val = "val" in ds and ds["val"].count() > 0
        datasets[f"train_{task.name}"] = ds["train"]
        if has_val:
            datasets[f"val_{task.name}"] = ds["val"]
        specs.append(TaskSpec(task.name, task.kind, id2label or None, task.weight, rows, has_val))
    return TaskDatasets(datasets, specs)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_config(preset: Optional[str], config_path: Optional[str], overrides: dict,
                 task: Optional[dict] = None, sets=()) -> FinetuneConfig:
    """Defaults < preset (--preset, else the file's model.preset) < --config < flags < --set; --data
    makes one task of the flags, replacing the config's tasks."""
    from jobs.config import chosen_preset, load_config

    name = chosen_preset(preset, config_path, sets)
    tasks = [{k: v for k, v in task.items() if v is not None}] if task is not None else None
    return load_config(FinetuneConfig, config_path, {"model.preset": preset, "tasks": tasks, **overrides}, sets=sets,
                       flags=FLAGS, base=preset_config(name) if name else None,
                       base_source=f"preset {name}" if name else "defaults")


@click.command()
@click.option("--data", "data", multiple=True, help="Labeled Parquet, CSV or JSON Lines: file, directory or glob (repeatable).")
@click.option("--val-data", multiple=True, help="Validation data, as --data (default: a hashed split of --data).")
@click.option("--task", "kind", type=click.Choice(["classify", "tag"]), default="classify", show_default=True,
              help="With --data: the head to train.")
@click.option("--name", default="task", show_default=True, help="With --data: the task (head) name.")
@click.option("--text-column", help="With --data: the text column (default: text).")
@click.option("--label-column", help="With --data: the label column (default: label; tag: tags).")
@click.option("--run-dir", help="Run directory: metrics.jsonl, checkpoint, export/.")
@click.option("--init-from", help="Pretrained HF BERT directory to start from.")
@click.option("--tokenizer", help="Tokenizer (default: --init-from's).")
@click.option("--epochs", type=float, help="Passes over the labeled training rows.")
@click.option("--max-length", type=int, help="Tokens per row before truncation (data.max_length).")
@click.option("--patience", type=int, help="Stop after this many evaluations without improvement (0: never early).")
@click.option("--sweep", multiple=True, metavar="KEY=V1,V2,...",
              help="Ray Tune sweep (repeatable): lr, weight_decay, seed, dropout, warmup_ratio or layer_lr_decay; "
                   "one trial per combination, ASHA early stopping, the best on validation exported.")
@training_command(PRESETS)
def finetune(data, val_data, kind, name, text_column, label_column, run_dir, config_path, preset, sets, init_from,
             tokenizer, epochs, max_length, patience, sweep, training, print_config):
    """Fine-tune a pretrained BERT into a classifier or tagger (or several heads, from --config)."""
    from pipelines.training.sweep import parse_sweep

    overrides = {"run_dir": run_dir, "model.init_from": init_from, "tokenizer": tokenizer,
                 "options.epochs": epochs, "data.max_length": max_length, "options.patience": patience,
                 "sweep": parse_sweep(sweep) or None, **training}
    if not data and (text_column or label_column):
        raise click.UsageError("--text-column and --label-column go with --data (a --config's tasks name their "
                               "own columns: tasks[i].text_column, tasks[i].label_column)")
    task = dict(name=name, kind=kind, paths=list(data), val_paths=list(val_data), text_column=text_column,
                label_column=label_column) if data else None
    cfg = build_config(preset, config_path, overrides, task, sets)
    if print_config:
        return echo_config(cfg)
    with stdout_for_the_result():
        result = main(cfg)
    click.echo(json.dumps({"run_dir": result.run_dir, "export": result.export, "max_steps": result.max_steps,
                           "labels": result.labels, "metrics": result.metrics}, default=str))  # one line: `| jq` pretty-prints


if __name__ == "__main__":  # `python -m jobs.finetune --config FILE`: the Ray Jobs entrypoint
    finetune()
