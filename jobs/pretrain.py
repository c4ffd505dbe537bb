"""`raybert pretrain` and `raybert vocab`: MLM pretraining on Ray Train + DeepSpeed ZeRO.

Contract:
- `main(cfg: PretrainConfig) -> PretrainResult` pretrains BERT on a text corpus (Parquet, CSV or JSON Lines) and
  returns where the last checkpoint and its HF export are. The corpus is read and tokenized by
  Ray Data (pipelines/training/pretrain_data.py) and streamed to `scaling.num_workers` Ray Train workers
  running pipelines/training/loop.py. Without `address` / RAY_ADDRESS it starts an embedded local Ray.
- The run directory holds Ray Train's checkpoints (the last `train.keep_last` kept; each the
  DeepSpeed state, an HF export and the step and data position: pipelines/training/run_dir.py
  lays them out), `metrics.jsonl`, `tensorboard/`, `runs.jsonl` and `export/`: a copy of the
  final HF export. It is a local path (on a cluster,
  shared storage mounted at the same path on every node) or an object-store URI (`s3://...`,
  `gs://...`) that every node can reach; pipelines/storage.py says how each file gets there.
- `resume="auto"` continues from the run dir's latest checkpoint (step, LR schedule, optimizer,
  data position) under the run's own recipe: any other change than a per-invocation setting is
  refused, naming each (jobs/resume.py); `"never"` refuses a run dir that already has
  checkpoints. A run dir of files no raybert run wrote is refused (jobs.training.check_run_dir).
- Before Ray starts, `validate` checks every setting's rule (pipelines/settings.py), and `check_inputs`
  the run dir, tokenizer, `init_from`, `data.seq_len` against the model's position table, the
  corpus and the resume: a refusal writes nothing.
- Scheduled runs: each invocation holds an exclusive lock on the run dir (an overlapping one is
  refused: `RunLocked`, CLI exit status 75), may be budgeted (`train.steps_per_run`,
  `time_budget`: seconds of wall time from the invocation's start, checkpoint included), and
  appends one record to `<run_dir>/runs.jsonl` (jobs/schedule.py), whatever its outcome.
- Config: `PRESETS[name]` (model size plus matching training settings; `debug` runs in seconds),
  then a YAML file (keys = the dataclass fields below, nested), then the flags, then each
  `--set section.key=value` (jobs/config.py), checked as a whole (pipelines/settings.py).
- `vocab(...)` trains a WordPiece tokenizer on the corpus (bert_core.train_tokenizer) into a
  new or empty directory that `--tokenizer` accepts; its settings and `--out` are checked before
  any text is read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple, Optional

import click

from pipelines import PathInTheWay, UserError, as_user_error
from jobs.checks import check_seq_len, model_config
from jobs.config import echo_config, from_preset, stdout_for_the_result, user_errors
from jobs.resume import check_resume
from jobs.training import (FP16_NEEDS_GPU, SHARED_FLAGS, ScalingConfig, check_init_from, check_outside_data,
                           check_run_dir, expects_gpu, training_command)
from pipelines.settings import Choice, Range, check
from pipelines.training.pretrain_data import DataConfig
from pipelines.training.config import ModelConfig, TrainConfig


# The least --time-budget that can fit start-up, one step and a checkpoint: a Ray Train fit takes
# 25-35 s to reach its first step on a 2-core CPU node (tens of seconds on GPU clusters too). A
# shorter budget used to train one step and record `ok` at several times the budget.
MIN_TIME_BUDGET_S = 30.0


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"  # a local path (made absolute) or an object-store URI (s3://b/run)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    resume: str = "auto"  # auto | never
    time_budget: Optional[float] = None  # seconds this invocation may take; it checkpoints before
    address: Optional[str] = None  # Ray cluster address; None = RAY_ADDRESS or embedded local Ray

    # The rules of these fields (pipelines/settings.py holds those of the sections).
    RULES: ClassVar[dict] = {
        "resume": Choice(("auto", "never")),
        "time_budget": Range(lo=MIN_TIME_BUDGET_S, unset=True,
                             why="seconds: an invocation first starts Ray Train and its data pipeline, then trains, "
                                 "then checkpoints; or bound it by steps with --max-steps-per-run"),
    }


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
    return cfg


def _small_budget(name: str, **train) -> PretrainConfig:
    """The small-budget recipe (#22, #35, BENCHMARKS.md): neighbour init (bert_core/init.py: the
    first layer's heads start on the neighbouring tokens, which takes the run past the plateau
    where BERT's init sits for its first thousands of steps), no dropout while pretraining (exports
    keep the config's 0.1 for fine-tuning) and 30% masking; validation still masks 15%."""
    cfg = _preset(name, **train)
    cfg.model.init = "neighbour"
    cfg.model.train_dropout = 0.0
    cfg.data.masking.mlm_probability = 0.3
    return cfg


# Whole-run presets: the bert_core model size plus training settings that suit it (mini and small
# with the small-budget recipe; base and large as BERT, not measured at that scale here).
PRESETS = {
    "debug": _debug,
    "mini": lambda: _small_budget("mini", max_steps=10_000, micro_batch_size=32, lr=1e-3, warmup_steps=200,
                                  log_every=20, eval_every=200, save_every=500),
    "small": lambda: _small_budget("small", max_steps=50_000, micro_batch_size=32, lr=5e-4, warmup_steps=1_000,
                                   log_every=50, eval_every=1_000, save_every=2_000),
    "base": lambda: _preset("base", max_steps=100_000, micro_batch_size=32, lr=1e-4, warmup_steps=10_000,
                            log_every=100, eval_every=2_000, save_every=5_000, dtype="bf16", zero_stage=2),
    "large": lambda: _preset("large", max_steps=100_000, micro_batch_size=16, grad_accum=2, lr=1e-4,
                             warmup_steps=10_000, log_every=100, eval_every=2_000, save_every=5_000,
                             dtype="bf16", zero_stage=3),
}


def preset_config(name: str) -> PretrainConfig:
    return from_preset(PRESETS, name)


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: Optional[str]  # the latest Ray checkpoint directory
    export: Optional[str]  # HF export (config.json, model.safetensors, tokenizer) of that checkpoint
    metrics: dict  # the last reported metrics


# The flags of `raybert pretrain` not named --<field> (errors name the flag that gave a value).
FLAGS = {**SHARED_FLAGS, "train.steps_per_run": "--max-steps-per-run", "train.total_time_budget_s": "--total-time-budget",
         "data.paths": "--data"}


def validate(cfg: PretrainConfig) -> None:
    """Fail before starting Ray on settings that can't work (and make local-path settings plain paths)."""
    from jobs.config import as_model_location, as_run_location, load_deepspeed
    from pipelines.training.tracking import check_trackers
    from pipelines.training.engine import ds_config

    cfg.run_dir = as_run_location(cfg.run_dir)
    cfg.data.tokenizer = as_model_location("tokenizer", cfg.data.tokenizer)
    cfg.model.init_from = as_model_location("init_from", cfg.model.init_from)
    cfg.train.deepspeed = load_deepspeed(cfg.train.deepspeed)
    check(cfg)  # every setting's type and rule, for a config built or changed in code (the CLI checked its sources)
    if cfg.train.dtype == "fp16" and expects_gpu(cfg.scaling, cfg.address) is False:
        raise UserError(FP16_NEEDS_GPU)
    if not cfg.data.paths:
        raise UserError("no training data: pass --data (Parquet, CSV or JSON Lines files, directories or globs)")
    ds_config(cfg.train, cfg.scaling.num_workers)  # a contradicting --deepspeed file fails here
    check_trackers(cfg.train.mlflow, cfg.train.wandb)


def resolve_tokenizer(cfg: PretrainConfig) -> str:
    tok = cfg.data.tokenizer or cfg.model.init_from
    if not tok:
        raise UserError("no tokenizer: pass --tokenizer (a checkpoint dir or vocab.txt), "
                         "or train one with `raybert vocab`")
    from pipelines import storage

    return tok if storage.is_uri(tok) else str(Path(tok).absolute())


class CheckedInputs(NamedTuple):
    tokenizer: str  # the resolved tokenizer path
    corpus: object  # pipelines.training.pretrain_data.CorpusCheck


def check_inputs(cfg: PretrainConfig, run_dir: str) -> CheckedInputs:
    """Every check that needs no Ray, before anything on disk changes: the run dir's resume mode
    and compatibility, the tokenizer, `init_from`, the corpus. Returns the tokenizer path and the
    corpus check (pipelines.training.pretrain_data.CorpusCheck)."""
    from bert_core.checkpoint import check_checkpoint
    from bert_core.tokenizer import load_tokenizer
    from pipelines.training.pretrain_data import check_corpus
    from pipelines.training.run_dir import has_checkpoints

    if cfg.resume == "never" and has_checkpoints(run_dir):
        raise PathInTheWay(f"{run_dir} already holds checkpoints; use --resume auto to continue "
                              f"it, or a new --run-dir")
    check_run_dir(run_dir, cfg.data.paths)
    from pipelines.storage import cached_copy

    with as_user_error("init_from"):  # bert_core's words about the checkpoint, as the user's error
        init = check_checkpoint(cached_copy(cfg.model.init_from)) if cfg.model.init_from else None
    tokenizer = resolve_tokenizer(cfg)
    with as_user_error("tokenizer"):
        tok = load_tokenizer(cached_copy(tokenizer))
    if init is not None:
        check_init_from(cached_copy(cfg.model.init_from), init, cached_copy(tokenizer), tok)
    bert_config = model_config(cfg.model, len(tok))
    check_seq_len("data.seq_len", cfg.data.seq_len, bert_config, cfg.model)  # before the corpus is read
    t = cfg.train
    corpus = check_corpus(cfg.data, tokenizer, rows_needed=cfg.scaling.num_workers * t.micro_batch_size * t.grad_accum)
    check_resume(cfg, run_dir, tok, bert_config, corpus)
    return CheckedInputs(tokenizer, corpus)


def main(cfg: PretrainConfig) -> PretrainResult:
    """One invocation: check everything the driver can, then lock the run dir, train (to max_steps
    or this invocation's budget), record it."""
    from jobs.schedule import Refused, new_invocation_id, now_iso

    t0 = time.time()
    validate(cfg)
    from pipelines import storage

    run_dir = storage.normalize(cfg.run_dir)
    tokenizer, corpus = check_inputs(cfg, run_dir)
    record = {"invocation": new_invocation_id(), "start": now_iso(), "pid": os.getpid(),
              "host": socket.gethostname(), "max_steps": cfg.train.max_steps,
              "steps_per_run": cfg.train.steps_per_run, "time_budget": cfg.time_budget}
    made_run_dir = not storage.is_uri(run_dir) and not os.path.exists(run_dir)
    if not storage.is_uri(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    try:
        return _locked(cfg, run_dir, t0, record, tokenizer, corpus)
    except Refused:
        if made_run_dir:  # a refusal leaves nothing behind: the run dir held only the lock and this record
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _locked(cfg: PretrainConfig, run_dir: str, t0: float, record: dict, tokenizer: str, corpus) -> PretrainResult:
    """The invocation under the run lock, recorded in the ledger whatever its outcome."""
    from jobs.schedule import Refused, RunLock, RunLocked, append_record, begin_invocation, end_invocation, now_iso
    from pipelines.training.run_dir import budget_spent, latest_state, latest_step

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(RunLock(run_dir))
        except RunLocked as e:
            record.update(status="refused", error=str(e), end=now_iso(), seconds=round(time.time() - t0, 1))
            append_record(run_dir, record)
            raise
        try:
            # Where Ray Train resumes (not the newest dir); a killed predecessor's record is written first.
            record["start_step"] = begin_invocation(run_dir, record)
            complete = (record["start_step"] >= cfg.train.max_steps
                        or budget_spent(latest_state(run_dir), cfg.train.total_time_budget_s))
            if complete:
                result = _already_complete(run_dir, record["start_step"], cfg.train)
            else:
                result = _run(cfg, run_dir, t0, tokenizer, corpus)
            record.update(status="complete" if complete else "ok",
                          end_step=latest_step(run_dir), checkpoint=result.checkpoint, export=result.export)
            return result
        except BaseException as e:
            record.update(status="refused" if isinstance(e, Refused) else "failed", error=f"{type(e).__name__}: {e}")
            if "start_step" in record:
                record["end_step"] = latest_step(run_dir)
            raise
        finally:
            record["seconds"] = round(time.time() - t0, 1)
            if record.get("time_budget") is not None:
                # Start-up counts against the budget, and a fit can't stop before its first step.
                record["over_budget"] = record["seconds"] > record["time_budget"]
            end_invocation(run_dir, record)


def _already_complete(run_dir: str, step: int, train: TrainConfig) -> PretrainResult:
    """A run that has reached its max_steps or spent its total time budget: nothing to train, so no cluster is started (a
    scheduled invocation on a finished run costs seconds, not a Ray Train start-up). The result is
    the registered latest checkpoint and its export, as the fit that reached it returned them."""
    from pipelines.training.run_dir import publish_export, registered_checkpoint

    ckpt = registered_checkpoint(run_dir)
    end = ("the end of its LR schedule, planned by its total time budget" if step < train.max_steps
           else f"max_steps {train.max_steps:,}")
    from pipelines.console import shows_progress

    if shows_progress():  # --quiet: errors and the result only
        print(f"[raybert] {run_dir} is at step {step:,}, {end}: nothing to train", flush=True)
    return PretrainResult(run_dir=run_dir, checkpoint=ckpt, export=publish_export(ckpt, run_dir),
                          metrics={"step": step})


def _run(cfg: PretrainConfig, run_dir: str, t0: float, tokenizer: str, corpus) -> PretrainResult:
    from jobs.ray_env import ray_session
    from jobs.training import plan_workers, run_trainer
    from pipelines import storage
    from pipelines.compat import disable_deepspeed_jit
    from pipelines.training.pretrain_data import ensure_val_set
    from pipelines.training.loop import LoopConfig, as_loop_config, train_loop_per_worker

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    disable_deepspeed_jit()
    with ray_session(cfg.address):
        plan = plan_workers(cfg.scaling, cfg.data.num_cpus, cfg.train.dtype)
        train = copy.deepcopy(cfg.train)
        if cfg.time_budget is not None:
            train.deadline = t0 + cfg.time_budget
        model = copy.deepcopy(cfg.model)
        if model.init_from and not storage.is_uri(model.init_from):  # workers may run in another directory
            model.init_from = str(Path(model.init_from).absolute())
        loop_cfg = LoopConfig(run_dir=run_dir, tokenizer=tokenizer, model=model, data=copy.deepcopy(cfg.data),
                              train=train, use_gpu=plan.use_gpu, torch_threads=plan.torch_threads,
                              pieces=corpus.pieces)
        # Written only now, with every check passed: a refused invocation leaves the run dir as it was.
        storage.write_text(storage.join(run_dir, "config.json"), json.dumps(
            {"pretrain": _asdict(cfg), "tokenizer": tokenizer, "plan": plan.to_dict(),
             "corpus": {"files": corpus.files, "fingerprint": corpus.fingerprint}}, indent=1, default=str) + "\n")
        # Built at the run's first start and read by every evaluation after: never the corpus again.
        if ensure_val_set(cfg.data, tokenizer, run_dir) == 0 and cfg.data.val_fraction > 0:
            print(f"[raybert] no validation rows: none of the corpus's documents held out by "
                  f"data.val_fraction {cfg.data.val_fraction} packs into a row of {cfg.data.seq_len} tokens; "
                  f"training goes on without validation metrics", flush=True)
        # The loop plans each epoch's read itself (pipelines.training.pretrain_data.epoch_split): no datasets= here.
        fit = run_trainer(
            train_loop_per_worker, as_loop_config(loop_cfg), run_dir=run_dir, plan=plan, scaling=cfg.scaling,
            keep_last=cfg.train.keep_last, datasets={}, stall_timeout_s=cfg.train.stall_timeout_s)
    return PretrainResult(run_dir=run_dir, checkpoint=fit.checkpoint, export=fit.export, metrics=fit.metrics)


def _asdict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl`, in order."""
    from pipelines import storage

    text = storage.read_text(storage.join(str(run_dir), "metrics.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_config(preset: Optional[str], config_path: Optional[str], overrides: dict, sets=()) -> PretrainConfig:
    """Defaults < preset (--preset, else the file's model.preset) < --config < flags < --set."""
    from jobs.config import chosen_preset, load_config

    name = chosen_preset(preset, config_path, sets)
    return load_config(PretrainConfig, config_path, {"model.preset": preset, **overrides}, sets=sets, flags=FLAGS,
                       base=preset_config(name) if name else None, base_source=f"preset {name}" if name else "defaults")


@click.command()
@click.option("--data", "data", multiple=True, help="Parquet, CSV or JSON Lines file, directory or glob (repeatable).")
@click.option("--run-dir", help="Run directory: checkpoints, metrics.jsonl, runs.jsonl, export/.")
@click.option("--tokenizer", help="Tokenizer: checkpoint dir or vocab.txt (see `raybert vocab`).")
@click.option("--init-from", help="Start from this HF checkpoint's weights instead of fresh ones.")
@click.option("--max-steps", type=int, help="Optimizer steps of the whole run.")
@click.option("--resume", type=click.Choice(["auto", "never"]), help="Continue the run dir's latest checkpoint.")
@click.option("--max-steps-per-run", type=int, help="Scheduled runs: train at most this many steps, then checkpoint and exit.")
@click.option("--time-budget", type=float, help="Scheduled runs: seconds this invocation may take; it checkpoints before.")
@click.option("--seq-len", type=int, help="Tokens per packed row, [CLS] included (data.seq_len).")
@click.option("--total-time-budget", type=float,
              help="Training seconds of the whole run, across invocations: the LR schedule ends (at its floor) when they do.")
@training_command(PRESETS)
def pretrain(data, run_dir, config_path, preset, sets, tokenizer, init_from, max_steps, resume, max_steps_per_run,
             time_budget, seq_len, total_time_budget, training, print_config):
    """MLM-pretrain BERT on a text corpus (Parquet, CSV, JSON Lines) with Ray Train + DeepSpeed.

    Run it on a schedule with `--resume auto` and a budget: each invocation continues the run
    dir's latest checkpoint, overlapping invocations are refused (exit status 75), and
    RUN_DIR/runs.jsonl records each one."""
    overrides = {
        "train.steps_per_run": max_steps_per_run, "time_budget": time_budget,
        "train.total_time_budget_s": total_time_budget,
        "run_dir": run_dir, "data.paths": list(data) or None, "data.tokenizer": tokenizer,
        "model.init_from": init_from, "train.max_steps": max_steps, "resume": resume, "data.seq_len": seq_len,
        **training,
    }
    cfg = build_config(preset, config_path, overrides, sets)
    if print_config:
        return echo_config(cfg)
    with stdout_for_the_result():
        result = main(cfg)
    click.echo(json.dumps({"run_dir": result.run_dir, "checkpoint": result.checkpoint,
                           "export": result.export, "metrics": result.metrics}, default=str))  # one line: `| jq` pretty-prints


def iter_texts(paths: list[str], text_column: str = "text", limit: Optional[int] = None):
    """Stream the non-empty texts of a corpus (Parquet, CSV, JSON Lines) batch by batch (nothing held whole); the
    files are checked first (readable, a string `text_column`), naming the one that isn't."""
    from pipelines.training.pretrain_data import open_corpus

    n = 0
    for _, pf in open_corpus(paths, text_column):
        for batch in pf.iter_batches(columns=[text_column]):
            for t in batch.column(0).to_pylist():
                if isinstance(t, str) and t:
                    yield t
                    n += 1
                    if limit is not None and n >= limit:
                        return


def check_vocab_settings(out: str, vocab_size: int, max_docs: Optional[int]) -> None:
    """Refuse what `raybert vocab` can't do well, before it reads the corpus: no documents, a vocab
    the special tokens fill, or an `--out` that is a file or holds files (the tokenizer's files
    would land among or over them)."""
    from bert_core.tokenizer import SPECIAL_TOKENS

    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs must be >= 1 (or left out: the whole corpus), got {max_docs}")
    if vocab_size <= len(SPECIAL_TOKENS):  # bert_core.train_tokenizer's words, said before any reading
        raise UserError(f"vocab_size {vocab_size:,} is too small: the {len(SPECIAL_TOKENS)} special tokens alone "
                         f"take {len(SPECIAL_TOKENS)}; BERT vocabs are ~20-30k (Google's Chinese BERT: 21,128)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise PathInTheWay(f"--out {out} is a file; give a directory (new or empty) for the tokenizer files")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held:
        shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
        raise PathInTheWay(f"--out {out} already holds files ({shown}); the tokenizer's files would be written "
                              f"among them. Choose a new or empty --out directory")


@click.command()
@click.option("--data", "data", multiple=True, required=True, help="Parquet, CSV or JSON Lines file, directory or glob (repeatable).")
@click.option("--out", required=True, help="Directory for the tokenizer files.")
@click.option("--vocab-size", type=int, default=21_128, show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--max-docs", type=int, help="Train on at most this many documents.")
@click.option("--cased", is_flag=True, help="Keep case (default: lowercase, as uncased BERT).")
@user_errors()
def vocab(data, out, vocab_size, text_column, max_docs, cased):
    """Train a WordPiece vocab on a text corpus (Parquet, CSV, JSON Lines), for `raybert pretrain --tokenizer`."""
    import itertools

    from bert_core.tokenizer import train_tokenizer

    check_vocab_settings(out, vocab_size, max_docs)  # before any text is read
    check_outside_data(out, "--out", list(data))
    texts = iter_texts(list(data), text_column, max_docs)
    first = next(texts, None)  # before anything is written to --out
    if first is None:
        raise UserError(f"no text to train a vocab on: column {text_column!r} of {', '.join(data)} is null "
                         f"or empty in every row (or there are no rows); check --data and --text-column")
    with as_user_error("vocab"):  # e.g. a vocab_size too small for this corpus
        tok = train_tokenizer(itertools.chain([first], texts), vocab_size, out, lowercase=not cased)
    if len(tok) < vocab_size:  # WordPiece stops once every word of the corpus is covered
        click.echo(f"note: the vocab has {len(tok):,} tokens, fewer than --vocab-size {vocab_size:,}: this corpus has "
                   f"no more distinct pieces to learn; a larger corpus gives a larger vocab (pretraining sizes its "
                   f"embeddings to the vocab it is given)", err=True)
    click.echo(json.dumps({"out": str(Path(out).absolute()), "vocab_size": len(tok)}))


if __name__ == "__main__":  # `python -m jobs.pretrain --config FILE`: the Ray Jobs entrypoint
    pretrain()
