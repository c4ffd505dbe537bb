"""`raybert score`: batch scoring, Parquet in, Parquet out, every row accounted for.

Contract: `main(cfg: ScoreConfig) -> ScoreResult` connects to Ray (`--address`/`RAY_ADDRESS`, or
an embedded local Ray that it shuts down after), runs pipelines.scoring.score, prints the summary
line (rows, error rows, tokens, tokens/s, output path) and returns it. Rerunning the same
command after a crash resumes; after success it reports the finished run (`overwrite: true` to
redo). Before the lock or Ray, `pipelines.scoring.preflight` checks the model, tokenizer, inputs
and output, creating nothing if it refuses. A run holds `output_lock` for its whole life: a second
run on the same output is refused with `RunLocked` (CLI exit status 75, EX_TEMPFAIL). The click
command only parses flags, loads the YAML config and calls `main`; a bad config or input is one
`Error:` line, exit status 1 (2 for a bad flag).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import click


@dataclass
class ResourceConfig:
    """How the job uses the cluster. None means: size it from the cluster (see cpu_plan)."""

    num_actors: Optional[int] = None  # predictor actors; default one per GPU, else one per 2 CPUs
    actor_num_cpus: Optional[float] = None  # logical CPUs each actor reserves (CPU clusters: auto)
    task_num_cpus: float = 0.25  # read/tokenize/write tasks; fractional so actors can't starve them
    torch_threads: Optional[int] = None  # intra-op threads per actor
    device: str = "auto"  # auto | cpu | cuda
    max_restarts: int = 4  # restarts of a killed predictor actor
    max_task_retries: int = 4  # retries of a block whose actor died
    task_max_retries: int = 4  # retries of a failed read/tokenize/write task


@dataclass
class ScoreConfig:
    input: Union[str, list] = ""  # Parquet file(s), directory or glob (or a list of them)
    output: str = ""  # output directory (Parquet files + _SUCCESS.json)
    model: str = ""  # HF BERT directory or raybert checkpoint
    task: str = "embed"  # embed | classify | tag | fill-mask
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # second text for sentence pairs
    id_column: str = "id"  # if absent from the data, ids are "<file>:<row index>"
    max_length: int = 512  # tokens per row (longer rows are truncated and flagged); capped by the model
    max_tokens: int = 4096  # token budget per forward pass: rows x longest row
    batch_size: int = 1024  # rows per block; the token-budget batcher sorts by length within it
    max_batch_rows: Optional[int] = None  # optional cap on rows per forward pass
    dtype: str = "fp32"  # fp32 | bf16 (CPU or GPU autocast) | fp16 (GPU only)
    pooling: Optional[str] = None  # embed: mean | cls (default: the checkpoint's, else mean)
    normalize: Optional[bool] = None  # embed: L2-normalize (default: the checkpoint's, else True)
    top_k: int = 5  # fill-mask: candidates per [MASK]
    tokenizer: Optional[str] = None  # tokenizer dir if not the model's
    head: Optional[str] = None  # task head of a multi-task checkpoint (default: its primary task)
    address: Optional[str] = None  # Ray address; None: RAY_ADDRESS or an embedded local Ray
    checkpoint_dir: Optional[str] = None  # resume state; default "<output>.checkpoint" (shared storage on a cluster)
    overwrite: bool = False  # discard an existing output/checkpoint and score again
    resources: ResourceConfig = field(default_factory=ResourceConfig)


def validate(cfg: ScoreConfig) -> None:
    from pipelines.predictors import DTYPES, TASKS

    for name in ("input", "output", "model"):
        if not getattr(cfg, name):
            raise ValueError(f"score: {name} is required")
    if cfg.task not in TASKS:
        raise ValueError(f"score: task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"score: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.max_tokens < 1 or cfg.batch_size < 1 or cfg.max_length < 3:
        raise ValueError("score: max_tokens and batch_size must be >= 1, max_length >= 3")
    if cfg.resources.num_actors is not None and cfg.resources.num_actors < 1:
        raise ValueError(f"score: resources.num_actors must be >= 1 (leave it unset for one per GPU, else one "
                         f"per 2 CPUs), got {cfg.resources.num_actors}")


def output_lock(output: str):
    """The exclusive lock a run holds on its output: a `flock` on `<output>.lock`, beside the
    output since overwrite deletes the output dir. A second run on the same output is refused
    (`RunLocked`, CLI exit 75) instead of writing every row twice. flock needs a local or NFS
    path: for an object-store URI there is nothing to lock, so we warn and go on (keep the
    scheduler from overlapping such runs)."""
    import contextlib
    import logging
    import os

    from jobs.schedule import RunLock

    if "://" in output:
        logging.getLogger(__name__).warning("%s: an object-store output can't be locked; make sure no other "
                                            "run writes it at the same time", output)
        return contextlib.nullcontext()
    return RunLock(lock_file=os.path.abspath(output.rstrip("/")) + ".lock", subject=f"output {output}")


def main(cfg: ScoreConfig):
    """Run the scoring job; returns pipelines.scoring.ScoreResult and prints its summary line."""
    validate(cfg)
    from pipelines.scoring import preflight, score

    common = dict(inputs=cfg.input, output=cfg.output, model=cfg.model, task=cfg.task,
                  text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, id_column=cfg.id_column,
                  checkpoint_dir=cfg.checkpoint_dir, overwrite=cfg.overwrite, tokenizer=cfg.tokenizer)
    # Bad inputs are refused here, before the lock file or Ray exist; score() checks again under
    # the lock, since the output may have changed in between.
    max_length = min(cfg.max_length, preflight(**common).model_config.max_position_embeddings)
    from jobs.ray_env import ray_session

    r = cfg.resources
    with output_lock(cfg.output), ray_session(cfg.address):
        result = score(**common, max_length=max_length, max_tokens=cfg.max_tokens,
                       batch_size=cfg.batch_size, max_batch_rows=cfg.max_batch_rows, dtype=cfg.dtype,
                       pooling=cfg.pooling, normalize=cfg.normalize, top_k=cfg.top_k,
                       num_actors=r.num_actors, actor_num_cpus=r.actor_num_cpus, task_num_cpus=r.task_num_cpus,
                       torch_threads=r.torch_threads, device=r.device, max_restarts=r.max_restarts,
                       max_task_retries=r.max_task_retries, task_max_retries=r.task_max_retries, head=cfg.head)
    print(result.line(), flush=True)
    return result


@click.command("score")
@click.argument("input", required=False)
@click.argument("output", required=False)
@click.option("--model", help="HF BERT directory or raybert checkpoint.")
@click.option("--task", type=click.Choice(["embed", "classify", "tag", "fill-mask"]))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of ScoreConfig fields; flags override it.")
@click.option("--max-tokens", type=int, help="Token budget per forward pass (rows x longest row).")
@click.option("--batch-size", type=int, help="Rows per block, sorted by length within it.")
@click.option("--num-actors", type=click.IntRange(min=1), help="Predictor actors (default: one per GPU, else per 2 CPUs).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), help="fp16 needs a GPU.")
@click.option("--head", help="Task head of a multi-task checkpoint (default: its primary task).")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
def score(input, output, model, task, config_path, max_tokens, batch_size, num_actors, dtype, head, address):
    """Score Parquet INPUT (file, directory or glob) into Parquet OUTPUT, one row per input row.

    INPUT and OUTPUT may instead come from the --config file (as under `ray job submit ... --
    python -m jobs.score --config FILE`)."""
    from jobs.config import load_config
    from jobs.schedule import EXIT_LOCKED, RunLocked

    try:
        main(load_config(ScoreConfig, config_path, {
            "input": input, "output": output, "model": model, "task": task, "max_tokens": max_tokens,
            "batch_size": batch_size, "resources.num_actors": num_actors, "dtype": dtype, "head": head,
            "address": address}))
    except RunLocked as e:  # another run holds the output: "skipped, try later", not "failed"
        err = click.ClickException(str(e))
        err.exit_code = EXIT_LOCKED
        raise err from e
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # a config, data or model problem
        raise click.ClickException(str(e)) from e


__all__ = ["ScoreConfig", "ResourceConfig", "main", "score"]

if __name__ == "__main__":  # `python -m jobs.score --config FILE`: the Ray Jobs entrypoint
    score()
