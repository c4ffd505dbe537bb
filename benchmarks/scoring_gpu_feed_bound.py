"""Issue #21, item 3: the bound of feeding a GPU actor the way CPU scoring now runs, measured on CPU
before it is built.

The GPU layout today is Ray Data's program (read -> repartition -> tokenize tasks -> GPU actor ->
write tasks), which fed 8.9-16% of the bare tokenizer per core (BENCHMARKS.md, issue 21). The CPU
path no longer uses Ray Data (pipelines/scoring/units.py). This script runs the same cut for a GPU
node, with plain Ray and nothing else: the driver plans units (`plan_units`); CPU tasks
(`feed`: one per core less the actor's share, one `tokenizers` thread each) read a unit and
tokenize it; their token tables go by reference to one predictor actor (the free 0-layer model,
device cpu, standing in for the GPU), which scores them and writes each unit's file
(`write_unit`). No resume, no error paths: a bound, not the job.

    .venv/bin/python benchmarks/scoring_gpu_feed_bound.py --rows 35000 [--rows 140000]

Reports the rate per CPU core of the node against the bare tokenizer on one thread (the issue's
target: >= 40% per core), over the pipeline time and once running.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scoring import bare_tokenizer, cpu_model, write_corpus  # noqa: E402
from scoring_direct_bound import free_model_and_corpus  # noqa: E402

FEED_CPUS = 0.75  # each feed task; the actor holds the rest of a 2-core node


def feed(unit, tokenize: dict):
    """Read a unit and tokenize it: the CPU side of the GPU layout (no torch imported)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.compat import row_hashes
    from pipelines.scoring.tokenize import tokenize_batch

    table = pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=["id", "text"]).slice(unit.start, unit.rows)
    table = table.append_column("row_hash", pa.array(row_hashes(unit.path, unit.first_row + unit.start, unit.rows),
                                                     pa.uint64()))
    return tokenize_batch(table, **tokenize)


class Scorer:
    """The GPU actor's part: score token tables in blocks, write each unit's file."""

    def __init__(self, model: str):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        from pipelines.scoring.predictors import Predictor

        self.predictor = Predictor(model, "embed", dtype="fp32", device="cpu", num_threads=1)

    def ready(self) -> bool:
        return True

    def score(self, unit, table, out: str) -> int:
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipelines.scoring.units import write_unit

        parts = [self.predictor(table.slice(i, 1024)) for i in range(0, table.num_rows, 1024)]
        result = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
        write_unit(result, os.path.join(out, unit.name))
        return int(pc.sum(result["n_tokens"]).as_py())


def job(model: str, inp: str, out: str, max_length: int, unit_rows: int) -> dict:
    import ray

    from pipelines.scoring.units import plan_units

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        actor = ray.remote(num_cpus=2 - 2 * FEED_CPUS)(Scorer).remote(model)
        files = sorted(os.path.join(inp, f) for f in os.listdir(inp) if f.endswith(".parquet"))
        units = plan_units(files, files, unit_rows)
        os.makedirs(out, exist_ok=True)
        tokenize = dict(tokenizer_path=model, text_column="text", text_pair_column=None, id_column="id",
                        max_length=max_length, with_offsets=False, fallback_ids=None)
        task = ray.remote(num_cpus=FEED_CPUS, runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})(feed)
        ray.get(actor.ready.remote())
        t_ready = time.perf_counter()
        fed = [task.remote(u, tokenize) for u in units]  # Ray runs as many at once as the CPUs allow
        # Each table goes to the actor by reference as soon as its task is done; the actor's queue holds the rest.
        scored, pending = [], list(fed)
        by_ref = dict(zip(fed, units))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            scored.append(actor.score.remote(by_ref[done[0]], done[0], out))
        tokens = sum(ray.get(scored))
        t_end = time.perf_counter()
    finally:
        ray.shutdown()
    return {"tokens": tokens, "pipeline_s": t_end - t0, "startup_s": t_ready - t0, "work_s": t_end - t_ready,
            "units": len(units)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=35_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--unit-rows", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="raybert-gpu-feed-") as work:
        model, texts, every, tj = free_model_and_corpus(work, args.rows)
        n0, s0 = bare_tokenizer(tj, every, args.max_length, threads=1)
        inp = os.path.join(work, "in")
        write_corpus(inp, texts)
        r = job(model, inp, os.path.join(work, "out"), args.max_length, args.unit_rows)
        n1, s1 = bare_tokenizer(tj, every, args.max_length, threads=1)
    assert n0 == n1 == r["tokens"], (n0, n1, r)
    bare_one = (n0 / s0 + n1 / s1) / 2
    cores = 2
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {args.rows:,} paragraphs, {r['tokens']:,} tokens, "
          f"{r['units']} units of <= {args.unit_rows} rows")
    print(f"bare tokenizer, one thread: {bare_one:,.0f} tokens/s (runs {n0 / s0:,.0f} / {n1 / s1:,.0f})")
    for what, secs in (("pipeline", r["pipeline_s"]), ("once running", r["work_s"])):
        per_core = r["tokens"] / secs / cores
        print(f"{what}: {r['tokens'] / secs:,.0f} tokens/s over {secs:.1f} s = {per_core:,.0f} per core = "
              f"{per_core / bare_one:.1%} of the one-thread bare tokenizer (target >= 40%)")
    print(f"start-up (actor ready): {r['startup_s']:.1f} s")


if __name__ == "__main__":
    main()
