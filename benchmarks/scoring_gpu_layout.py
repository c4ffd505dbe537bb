"""Issue #21, item 3: the GPU layout's data path measured on CPU, with the free model.

On GPUs, `raybert score` puts tokenizing in CPU tasks (`tokenize_batch`, one `tokenizers` thread
each) in front of one predictor actor per GPU, so the GPU never waits on tokenizing. What matters
there is how fast the CPUs can feed that actor. This runs the same stages as the job's GPU layout
(`pipelines.scoring.predict_stage`'s GPU branch: read -> 1,024-row blocks -> tokenize tasks -> one
`Predictor` actor, here on `device=cpu` with the free (0-layer) model, so it costs next to nothing
-> write Parquet) and reports the tokens/s it moves, per CPU core of the node, against the bare
tokenizer on one thread (one core) in the same run. The issue's target: at least 40% per core.

    .venv/bin/python benchmarks/scoring_gpu_layout.py --rows 35000

Ray start-up is outside the timing; the pipeline's own start (actor, tasks' workers) is inside.
"""

from __future__ import annotations

import argparse
import os
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
    """(tokens, seconds) of the GPU layout's stages on the connected Ray, device cpu. Without
    `repartition`, the tokenize tasks cut the read blocks into 1,024-row batches themselves (and Ray
    Data may fuse them with the read)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.predictors import Predictor
    from pipelines.score_output import read_output
    from pipelines.tokenize import tokenize_batch

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


def main() -> None:
    import ray
    import ray.data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=35_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--no-repartition", action="store_true", help="tokenize tasks cut the read blocks themselves")
    args = ap.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="raybert-gpu-layout-") as work:
        model, texts, every, tj = free_model_and_corpus(work, args.rows)
        n0, s0 = bare_tokenizer(tj, every, args.max_length, threads=1)
        inp = os.path.join(work, "in")
        write_corpus(inp, texts)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            # Fractional CPUs, as the job's plan gives tasks beside GPU actors: every core can tokenize.
            tokens, seconds = gpu_layout(model, inp, os.path.join(work, "out"), args.max_length, task_cpus=0.5,
                                         repartition=not args.no_repartition)
        finally:
            ray.shutdown()
        n1, s1 = bare_tokenizer(tj, every, args.max_length, threads=1)
    assert n0 == n1 == tokens, (n0, n1, tokens)
    per_core_bare = (n0 / s0 + n1 / s1) / 2
    rate = tokens / seconds
    print(f"machine: {cpu_model()}, {cores} cores; {args.rows:,} paragraphs, {tokens:,} tokens")
    print(f"bare tokenizer, one thread: {per_core_bare:,.0f} tokens/s (runs {n0 / s0:,.0f} / {n1 / s1:,.0f})")
    print(f"GPU layout on CPU (tokenize tasks{'' if not args.no_repartition else ', no repartition'} -> 1 free-model actor), pipeline {seconds:.1f} s: {rate:,.0f} tokens/s "
          f"= {rate / cores:,.0f} per core = {rate / cores / per_core_bare:.1%} of the bare tokenizer per core "
          f"(target >= 40%)")


if __name__ == "__main__":
    main()
