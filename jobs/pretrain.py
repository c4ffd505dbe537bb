"""`raybert pretrain` and `raybert vocab`: MLM pretraining on Ray Train + DeepSpeed ZeRO.

Contract:
- `main(cfg: PretrainConfig) -> PretrainResult` pretrains BERT on a Parquet text corpus and
  returns where the last checkpoint and its HF export are. The corpus is read and tokenized by
  Ray Data (pipelines/pretrain_data.py) and streamed to `scaling.num_workers` Ray Train workers
  running pipelines/train.py. Without `address` / RAY_ADDRESS it starts an embedded local Ray.
- The run directory (absolute; on a cluster, shared storage) holds Ray Train's checkpoints
  (`checkpoint_<step>/{deepspeed,hf,raybert_state.json}`, the last `train.keep_last` kept),
  `metrics.jsonl`, and `export/`: a copy of the final HF export.
- `resume="auto"` continues from the run dir's latest checkpoint (step, LR schedule, optimizer,
  data position); `"never"` refuses a run dir that already has checkpoints.
- Scheduled runs: each invocation holds an exclusive lock on the run dir (an overlapping one is
  refused: `RunLocked`, CLI exit status 75), may be budgeted (`train.steps_per_run`,
  `time_budget`: seconds of wall time from the invocation's start, checkpoint included), and
  appends one record to `<run_dir>/runs.jsonl` (jobs/schedule.py), whatever its outcome.
- Config: `PRESETS[name]` (model size plus matching training settings; `debug` runs in seconds),
  then a YAML file (keys = the dataclass fields below, nested), then a few CLI flags.
- `vocab(...)` trains a WordPiece tokenizer on the corpus (bert_core.train_tokenizer) into a
  directory that `--tokenizer` accepts.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click

from pipelines.pretrain_data import DataConfig
from pipelines.train import ModelConfig, TrainConfig


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = False  # one GPU per worker, NCCL; else CPU and gloo
    cpus_per_worker: float = 1.0  # CPU slots a worker reserves; keep some for the Ray Data tasks
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before giving up


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"  # made absolute (Ray needs an absolute storage path)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    resume: str = "auto"  # auto | never
    time_budget: Optional[float] = None  # seconds this invocation may take; it checkpoints before
    address: Optional[str] = None  # Ray cluster address; None = RAY_ADDRESS or embedded local Ray


def _preset(name: str, **train) -> PretrainConfig:
    cfg = PretrainConfig(model=ModelConfig(preset=name))
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _debug() -> PretrainConfig:
    cfg = _preset("debug", max_steps=20, micro_batch_size=8, lr=2e-3, warmup_steps=2, log_every=5,
                  eval_every=10, save_every=10, keep_last=2)
    cfg.data.seq_len = 64
    cfg.data.tokenize_batch_rows = 256
    cfg.data.val_fraction = 0.05
    cfg.scaling.cpus_per_worker = 0.5
    return cfg


# Whole-run presets: the bert_core model size plus training settings that suit it.
PRESETS = {
    "debug": _debug,
    "mini": lambda: _preset("mini", max_steps=10_000, micro_batch_size=32, lr=1e-3, warmup_steps=200,
                            log_every=20, eval_every=200, save_every=500),
    "small": lambda: _preset("small", max_steps=50_000, micro_batch_size=32, lr=5e-4, warmup_steps=1_000,
                             log_every=50, eval_every=1_000, save_every=2_000),
    "base": lambda: _preset("base", max_steps=100_000, micro_batch_size=32, lr=1e-4, warmup_steps=10_000,
                            log_every=100, eval_every=2_000, save_every=5_000, dtype="bf16", zero_stage=2),
    "large": lambda: _preset("large", max_steps=100_000, micro_batch_size=16, grad_accum=2, lr=1e-4,
                             warmup_steps=10_000, log_every=100, eval_every=2_000, save_every=5_000,
                             dtype="bf16", zero_stage=3),
}


def preset_config(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: Optional[str]  # the latest Ray checkpoint directory
    export: Optional[str]  # HF export (config.json, model.safetensors, tokenizer) of that checkpoint
    metrics: dict  # the last reported metrics


def validate(cfg: PretrainConfig) -> None:
    """Fail before starting Ray on settings that can't work."""
    if cfg.train.dtype == "fp16" and not cfg.scaling.use_gpu:
        raise ValueError("dtype fp16 needs GPUs (DeepSpeed on CPU supports fp32 and bf16); "
                         "use --dtype bf16 or --use-gpu")
    if cfg.resume not in ("auto", "never"):
        raise ValueError(f"resume must be 'auto' or 'never', got {cfg.resume!r}")
    if cfg.scaling.num_workers < 1:
        raise ValueError("num_workers must be >= 1")
    if not cfg.data.paths:
        raise ValueError("no training data: pass --data (Parquet files, directories or globs)")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    if cfg.train.steps_per_run is not None and cfg.train.steps_per_run < 1:
        raise ValueError("max_steps_per_run must be >= 1")
    if cfg.time_budget is not None and cfg.time_budget <= 0:
        raise ValueError("time_budget must be > 0 seconds")


def resolve_tokenizer(cfg: PretrainConfig) -> str:
    tok = cfg.data.tokenizer or cfg.model.init_from
    if not tok:
        raise ValueError("no tokenizer: pass --tokenizer (a checkpoint dir or vocab.txt), "
                         "or train one with `raybert vocab`")
    from bert_core.tokenizer import load_tokenizer

    load_tokenizer(tok)  # fail here, not on every worker
    return str(Path(tok).absolute())


def has_checkpoints(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())


def main(cfg: PretrainConfig) -> PretrainResult:
    """One invocation: lock the run dir, train (to max_steps or this invocation's budget), record it."""
    from jobs.schedule import RunLock, RunLocked, append_record, latest_step, new_invocation_id, now_iso

    validate(cfg)
    run_dir = Path(cfg.run_dir).absolute()
    t0 = time.time()
    record = {"invocation": new_invocation_id(), "start": now_iso(), "pid": os.getpid(),
              "host": socket.gethostname(), "max_steps": cfg.train.max_steps,
              "steps_per_run": cfg.train.steps_per_run, "time_budget": cfg.time_budget}
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(run_dir):
            record["start_step"] = latest_step(run_dir)
            try:
                result = _run(cfg, run_dir, t0)
            except BaseException as e:
                record.update(status="failed", error=f"{type(e).__name__}: {e}", end_step=latest_step(run_dir))
                raise
            end = int(result.metrics.get("step", latest_step(run_dir)))
            record.update(status="complete" if record["start_step"] >= cfg.train.max_steps else "ok",
                          end_step=end, checkpoint=result.checkpoint, export=result.export)
            return result
    except RunLocked as e:
        record.update(status="refused", error=str(e))
        raise
    finally:
        record["end"] = now_iso()
        record["seconds"] = round(time.time() - t0, 1)
        if "end_step" in record and "start_step" in record:
            record["steps"] = record["end_step"] - record["start_step"]
        append_record(run_dir, record)


def _run(cfg: PretrainConfig, run_dir: Path, t0: float) -> PretrainResult:
    if cfg.resume == "never" and has_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints; use --resume auto to continue "
                              f"it, or a new --run-dir")
    tokenizer = resolve_tokenizer(cfg)

    from pipelines.train import LoopConfig, train_loop_per_worker
    from pipelines.worker import disable_deepspeed_jit, fit_with_watchdog, publish_export, torch_trainer

    train = copy.deepcopy(cfg.train)
    if cfg.time_budget is not None:
        train.deadline = t0 + cfg.time_budget
    model = copy.deepcopy(cfg.model)
    if model.init_from:  # workers may run in another directory (a Ray Jobs working dir)
        model.init_from = str(Path(model.init_from).absolute())
    loop_cfg = LoopConfig(run_dir=str(run_dir), tokenizer=tokenizer, model=model,
                          data=copy.deepcopy(cfg.data), train=train, use_gpu=cfg.scaling.use_gpu)
    (run_dir / "config.json").write_text(json.dumps({"pretrain": _asdict(cfg), "tokenizer": tokenizer},
                                                    indent=1, default=str) + "\n")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    disable_deepspeed_jit()

    import ray.data
    import ray.train

    from jobs.ray_env import ray_session
    from pipelines.pretrain_data import build_datasets

    with ray_session(cfg.address):
        datasets = build_datasets(cfg.data, tokenizer)
        # Deterministic order end to end: the same rows reach the same worker in the same order
        # on every run, which is what lets a resume skip exactly the batches already trained on.
        exec_opts = ray.data.ExecutionOptions(preserve_order=True)
        trainer = torch_trainer(
            train_loop_per_worker, loop_cfg.to_dict(), run_dir=run_dir, num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu, cpus_per_worker=cfg.scaling.cpus_per_worker,
            max_failures=cfg.scaling.max_failures, keep_last=cfg.train.keep_last, datasets=datasets,
            dataset_config=ray.train.DataConfig(execution_options=exec_opts))
        result = fit_with_watchdog(trainer, run_dir, cfg.train.stall_timeout_s)

    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    export = publish_export(ckpt, run_dir)
    return PretrainResult(run_dir=str(run_dir), checkpoint=ckpt, export=str(export) if export else None,
                          metrics=dict(result.metrics or {}))


def _asdict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl`, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_config(preset: Optional[str], config_path: Optional[str], overrides: dict) -> PretrainConfig:
    from jobs.config import load_config

    base = preset_config(preset) if preset else None
    cfg = load_config(PretrainConfig, config_path, overrides, base=base)
    if isinstance(cfg.data.paths, str):
        cfg.data.paths = [cfg.data.paths]
    return cfg


@click.command()
@click.option("--data", "data", multiple=True, help="Parquet file, directory or glob (repeatable).")
@click.option("--run-dir", help="Run directory: checkpoints, metrics.jsonl, runs.jsonl, export/.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML config.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Model size and matching training settings.")
@click.option("--tokenizer", help="Tokenizer: checkpoint dir or vocab.txt (see `raybert vocab`).")
@click.option("--init-from", help="Start from this HF checkpoint's weights instead of fresh ones.")
@click.option("--max-steps", type=int, help="Optimizer steps of the whole run.")
@click.option("--zero-stage", type=click.IntRange(0, 3), help="DeepSpeed ZeRO stage.")
@click.option("--num-workers", type=int, help="Ray Train workers.")
@click.option("--use-gpu", is_flag=True, default=None, help="One GPU per worker.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), help="Training precision (fp16: GPU only).")
@click.option("--resume", type=click.Choice(["auto", "never"]), help="Continue the run dir's latest checkpoint.")
@click.option("--max-steps-per-run", type=int, help="Scheduled runs: train at most this many steps, then checkpoint and exit.")
@click.option("--time-budget", type=float, help="Scheduled runs: seconds this invocation may take; it checkpoints before.")
@click.option("--address", help="Ray address; default RAY_ADDRESS or an embedded local Ray.")
def pretrain(data, run_dir, config_path, preset, tokenizer, init_from, max_steps, zero_stage, num_workers,
             use_gpu, dtype, resume, max_steps_per_run, time_budget, address):
    """MLM-pretrain BERT on a Parquet text corpus with Ray Train + DeepSpeed.

    Run it on a schedule with `--resume auto` and a budget: each invocation continues the run
    dir's latest checkpoint, overlapping invocations are refused (exit status 75), and
    RUN_DIR/runs.jsonl records each one."""
    from jobs.schedule import EXIT_LOCKED, RunLocked

    overrides = {
        "train.steps_per_run": max_steps_per_run, "time_budget": time_budget,
        "run_dir": run_dir, "data.paths": list(data) or None, "data.tokenizer": tokenizer,
        "model.init_from": init_from, "train.max_steps": max_steps, "train.zero_stage": zero_stage,
        "scaling.num_workers": num_workers, "scaling.use_gpu": use_gpu, "train.dtype": dtype,
        "resume": resume, "address": address,
    }
    try:
        result = main(build_config(preset, config_path, overrides))
    except RunLocked as e:
        err = click.ClickException(str(e))
        err.exit_code = EXIT_LOCKED
        raise err from e
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # a config problem: no traceback
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({"run_dir": result.run_dir, "checkpoint": result.checkpoint,
                           "export": result.export, "metrics": result.metrics}, indent=1, default=str))


def iter_texts(paths: list[str], text_column: str = "text", limit: Optional[int] = None):
    """Stream the text column of a Parquet corpus batch by batch (nothing held whole)."""
    import pyarrow.dataset as pads

    from pipelines.pretrain_data import resolve_paths

    n = 0
    for path in resolve_paths(paths):
        for batch in pads.dataset(path, format="parquet").to_batches(columns=[text_column]):
            for t in batch.column(0).to_pylist():
                if isinstance(t, str) and t:
                    yield t
                    n += 1
                    if limit is not None and n >= limit:
                        return


@click.command()
@click.option("--data", "data", multiple=True, required=True, help="Parquet file, directory or glob (repeatable).")
@click.option("--out", required=True, help="Directory for the tokenizer files.")
@click.option("--vocab-size", type=int, default=21_128, show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--max-docs", type=int, help="Train on at most this many documents.")
@click.option("--cased", is_flag=True, help="Keep case (default: lowercase, as uncased BERT).")
def vocab(data, out, vocab_size, text_column, max_docs, cased):
    """Train a WordPiece vocab on a Parquet corpus, for `raybert pretrain --tokenizer`."""
    from bert_core.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_texts(list(data), text_column, max_docs), vocab_size, out, lowercase=not cased)
    click.echo(json.dumps({"out": str(Path(out).absolute()), "vocab_size": len(tok)}))


if __name__ == "__main__":  # `python -m jobs.pretrain --config FILE`: the Ray Jobs entrypoint
    pretrain()
