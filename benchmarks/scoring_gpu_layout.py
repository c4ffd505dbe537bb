"""Issue #21, item 3: the GPU layout's data path measured on CPU, with the free model.

On GPUs, `raybert score` keeps tokenizing off the GPU actor, so the GPU never waits on it; what
matters there is how fast the CPUs can feed that actor. This runs, in one process and on the same
texts, with the free (0-layer) model on `device=cpu` standing in for the GPU:

- the job: `raybert score` (the CLI, Parquet in and out) in the GPU layout, `resources:
  {num_actors: 1, actor_num_cpus: 1, tokenizer_actors: 1}`: one tokenizing actor (what a node of 2
  CPUs and 1 GPU gets by default: the CPUs the GPU actor leaves) feeding one predictor actor
  (pipelines/scoring/feed.py);
- the baseline: the Ray Data program the GPU path ran before (read -> 1,024-row blocks -> tokenize
  tasks -> one `Predictor` actor -> write Parquet), as `gpu_layout` below;

and reports the tokens/s each moves per CPU core of the node, against the bare tokenizer on one
thread (one core). The issue's target: at least 40% per core.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/scoring_gpu_layout.py --rows 35000   # and 140000

The job's pipeline time excludes Ray's start, and its start-up (until the predictor is ready) is
reported apart; the baseline is timed from its read on an already started Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow.compute as pc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scoring import bare_tokenizer, cpu_model, write_corpus  # noqa: E402
from scoring_direct_bound import free_model_and_corpus  # noqa: E402


def gpu_layout(model: str, inp: str, out: str, max_length: int, task_cpus: float,
               repartition: bool = True) -> tuple[int, float]:
    """(tokens, seconds) of Ray Data's GPU layout (the path before score_feed.py) on the connected
    Ray, device cpu. Without `repartition`, the tokenize tasks cut the read blocks into 1,024-row
    batches themselves (and Ray Data may fuse them with the read)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.scoring.predictors import Predictor
    from pipelines.scoring.output import read_output
    from pipelines.scoring.tokenize import tokenize_batch

    files = sorted(os.path.join(inp, f) for f in os.listdir(inp) if f.endswith(".parquet"))
    tokenize = dict(tokenizer_path=model, text_column="text", text_pair_column=None, id_column="id",
                    max_length=max_length, with_offsets=False)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(files, columns=["id", "text"], num_cpus=task_cpus)
    if repartition:
        ds = ds.repartition(target_num_rows_per_block=1024)
    ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", num_cpus=task_cpus, fn_kwargs=tokenize,
                        batch_size=None if repartition else 1024,
                        runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})
    ds = ds.map_batches(Predictor, batch_format="pyarrow", batch_size=1024, fn_constructor_args=(model, "embed"),
                        fn_constructor_kwargs=dict(max_tokens=16384, dtype="fp32", device="cpu", num_threads=1),
                        compute=ActorPoolStrategy(size=1), num_cpus=task_cpus)
    ds.write_parquet(out, ray_remote_args={"num_cpus": task_cpus})
    seconds = time.perf_counter() - t0
    return int(pc.sum(read_output(out, ["n_tokens"])["n_tokens"]).as_py()), seconds


def job(model: str, inp: str, out: str, max_length: int, tokenizers: int, actor_cpus: float) -> dict:
    """`raybert score` in the GPU layout on CPU (see the module docstring): its JSON result."""
    cfg = out + ".yaml"
    with open(cfg, "w") as f:
        f.write(f"max_length: {max_length}\nresources:\n  device: cpu\n  num_actors: 1\n  actor_num_cpus: {actor_cpus}\n"
                f"  tokenizer_actors: {tokenizers}\n")
    raybert = os.path.join(os.path.dirname(sys.executable), "raybert")
    run = subprocess.run([raybert, "score", inp, out, "--model", model, "--task", "embed", "--config", cfg],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"raybert score failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(run.stdout)


def main() -> None:
    import ray
    import ray.data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=35_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--tokenizers", type=int, default=1, help="tokenizing actors (1 CPU each)")
    ap.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs the predictor actor reserves")
    args = ap.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="raybert-gpu-layout-") as work:
        model, texts, every, tj = free_model_and_corpus(work, args.rows)
        n0, s0 = bare_tokenizer(tj, every, args.max_length, threads=1)
        inp = os.path.join(work, "in")
        write_corpus(inp, texts)
        result = job(model, inp, os.path.join(work, "out-job"), args.max_length, args.tokenizers, args.actor_cpus)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            # Fractional CPUs, as the plan gave tasks beside GPU actors: every core can tokenize.
            tokens, seconds = gpu_layout(model, inp, os.path.join(work, "out-ray-data"), args.max_length, task_cpus=0.5)
        finally:
            ray.shutdown()
        n1, s1 = bare_tokenizer(tj, every, args.max_length, threads=1)
    assert n0 == n1 == tokens == result["tokens"], (n0, n1, tokens, result["tokens"])
    bare = (n0 / s0 + n1 / s1) / 2
    print(f"machine: {cpu_model()}, {cores} cores; {args.rows:,} paragraphs, {tokens:,} tokens")
    print(f"bare tokenizer, one thread: {bare:,.0f} tokens/s (runs {n0 / s0:,.0f} / {n1 / s1:,.0f})")
    secs, startup = result["seconds"], result["startup_s"]
    for what, rate in ((f"raybert score, GPU layout ({args.tokenizers} tokenizing actor(s) -> 1 predictor of "
                        f"{args.actor_cpus:g} CPU), pipeline {secs:.1f} s",
                        tokens / secs),
                       (f"the same once running (less its {startup:.1f} s start-up)", tokens / (secs - startup)),
                       (f"Ray Data's layout (before), pipeline {seconds:.1f} s", tokens / seconds)):
        print(f"{what}: {rate:,.0f} tokens/s = {rate / cores:,.0f} per core = {rate / cores / bare:.1%} of the "
              f"bare tokenizer per core (target >= 40%)")


if __name__ == "__main__":
    main()
