"""`raybert score`: batch scoring, Parquet (or CSV, JSON Lines) in, Parquet out, every row accounted for.

Contract: `main(cfg: ScoreConfig) -> ScoreResult` connects to Ray (`--address`/`RAY_ADDRESS`, or
an embedded local Ray that it shuts down after), runs pipelines.scoring.job.score, prints the summary
line (rows, error rows, tokens, tokens/s, output path) on stderr and returns it; `raybert score`
then prints the result as one JSON line on stdout (pipelines/console.py: what the console shows). Rerunning the same
command after a crash resumes; after success it reports the finished run (`overwrite: true` to
redo). Before the lock or Ray, `pipelines.scoring.job.preflight` checks the model, tokenizer, inputs
and output, creating nothing if it refuses. A run holds `output_lock` for its whole life: a second
run on the same output is refused with `RunLocked` (CLI exit status 75, EX_TEMPFAIL). With
`--device cuda` on a cluster, a run whose GPU actors don't start within `resources.gpu_wait_s`
stops with `GpuWaitTimeout` (one `Error:` line, exit 1); on the embedded local Ray, which can't
gain a GPU, it is refused before the lock or Ray. The click command only parses flags, loads the
YAML config and calls `main`; a bad config or input is one `Error:` line, exit status 1 (2 for a
bad flag).
"""

from __future__ import annotations

import json

import click

from jobs.config import (echo_config, print_config_option, set_option, stdout_for_the_result, user_errors,
                         verbosity_options)

from pipelines import UserError
# The job's typed config is the pipeline's: one dataclass, checked by pipelines.settings' walker.
from pipelines.scoring.config import POOLINGS, ActorsLost, GpuWaitTimeout, ResourceConfig, ScoreConfig, UnitFailed


def output_lock(output: str):
    """The exclusive lock a run holds on its output, beside the output since overwrite deletes the
    output dir: a `flock` on `<output>.lock` locally, a lease object `<output>.lock` on an object
    store (jobs/schedule.py says what each guarantees). A second run on the same output is refused
    (`RunLocked`, CLI exit 75) instead of writing every row twice."""
    from jobs.schedule import LeaseLock, RunLock
    from pipelines import storage

    out = storage.normalize(output)
    if storage.is_uri(out):
        return LeaseLock(out + ".lock", f"output {output}")
    return RunLock(lock_file=out + ".lock", subject=f"output {output}")


def main(cfg: ScoreConfig):
    """Run the scoring job; returns pipelines.scoring.job.ScoreResult and prints its summary line (on
    stderr; `raybert score` prints the result as JSON on stdout)."""
    import os
    import sys

    import ray
    import torch

    from jobs.ray_env import ray_session
    from pipelines.console import shows_progress
    from pipelines.scoring.job import preflight, score

    # Bad config or inputs are refused here, before the lock file or Ray exist; score() checks
    # again under the lock, since the output may have changed in between.
    preflight(cfg)
    embedded = not (ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS"))
    if embedded and cfg.resources.device == "cuda" and not torch.cuda.is_available():
        # On a cluster, device cuda waits (resources.gpu_wait_s) for the autoscaler to add a GPU
        # node; the embedded local Ray runs on this machine alone, so waiting would only delay this.
        raise UserError("device cuda asked for, but this machine has no GPU for the local Ray (and no "
                         "autoscaler to add one); pass --address of a cluster with GPU workers, or "
                         "--device auto or cpu")
    with output_lock(cfg.output), ray_session(cfg.address):
        result = score(cfg)
    if shows_progress():
        print(result.line(), file=sys.stderr, flush=True)
    return result


@click.command("score")
@click.argument("input", required=False)
@click.argument("output", required=False)
@click.option("--model", help="HF BERT directory or raybert checkpoint.")
@click.option("--task", type=click.Choice(["embed", "classify", "tag", "fill-mask"]))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of ScoreConfig fields; flags override it.")
@click.option("--max-tokens", type=int, help="Token budget per forward pass (rows x longest row).")
@click.option("--batch-size", type=int,
              help="Rows per block (sorted by length within it), not per forward pass: forward-pass "
                   "size is set by --max-tokens.")
@click.option("--num-actors", type=int, help="Predictor actors (default: one per GPU, else one per CPU, memory permitting).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto (default): GPU actors if the cluster has GPUs now, else CPU. cuda: GPU actors even before "
                   "a GPU node has joined, so an autoscaling cluster starts them (pool of 1 to N; fails after "
                   "resources.gpu_wait_s if none starts).")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Default auto: bf16 on GPUs (one precision for every actor; pre-Ampere GPUs emulate it: set "
                   "fp16 there); on CPU bf16 with AMX, else as measured once per machine (cached). fp16 needs a GPU.")
@click.option("--head", help="Task head of a multi-task checkpoint (default: its primary task).")
@click.option("--text-column", help="The text to score (default: text).")
@click.option("--text-pair-column", help="A second text: rows are sentence pairs (classify).")
@click.option("--id-column", help="Row ids (default: id; without one, ids are <file>#<row hash>).")
@click.option("--max-length", type=int,
              help="Tokens per row before truncation (default: the model's limit, or a sentence-transformers "
                   "export's max_seq_length).")
@click.option("--pooling", type=click.Choice(list(POOLINGS)), help="embed: pooling (default: the checkpoint's).")
@click.option("--top-k", type=int, help="fill-mask: candidates per [MASK] (default 5).")
@click.option("--normalize/--no-normalize", default=None, help="embed: L2-normalize (default: the checkpoint's).")
@click.option("--overwrite/--no-overwrite", default=None,
              help="Delete this job's earlier output and checkpoint and score again (never anything else).")
@click.option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
@set_option
@print_config_option
@verbosity_options
# No GPU node in time for --device cuda; actors dead for good; a unit that can't be scored (its
# error names the input file and what failed: a corrupt or changed file, an unwritable output).
@user_errors(GpuWaitTimeout, ActorsLost, UnitFailed)
def score(input, output, model, task, config_path, max_tokens, batch_size, num_actors, device, dtype, head,
          text_column, text_pair_column, id_column, max_length, pooling, top_k, normalize, overwrite, address,
          sets, print_config):
    """Score INPUT (Parquet, CSV or JSON Lines: file, directory or glob) into Parquet OUTPUT, one row per input row.

    INPUT and OUTPUT may instead come from the --config file (as under `ray job submit ... --
    python -m jobs.score --config FILE`)."""
    from jobs.config import load_config

    cfg = load_config(ScoreConfig, config_path, {
        "input": input, "output": output, "model": model, "task": task, "max_tokens": max_tokens,
        "batch_size": batch_size, "resources.num_actors": num_actors, "resources.device": device,
        "dtype": dtype, "head": head, "text_column": text_column, "text_pair_column": text_pair_column,
        "id_column": id_column, "max_length": max_length, "pooling": pooling, "top_k": top_k, "normalize": normalize,
        "overwrite": overwrite, "address": address}, sets=sets, flags={"resources.num_actors": "--num-actors",
                                                                       "resources.device": "--device"})
    if print_config:
        return echo_config(cfg)
    with stdout_for_the_result():  # Ray forwards its workers' prints to this process's stdout
        result = main(cfg)
    click.echo(json.dumps(result.summary(), default=str))  # stdout: the result alone (`| jq`)


__all__ = ["ScoreConfig", "ResourceConfig", "main", "score"]

if __name__ == "__main__":  # `python -m jobs.score --config FILE`: the Ray Jobs entrypoint
    score()
