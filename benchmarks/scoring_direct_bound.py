"""Issue #21, the bound of the design the profile points to, measured before it is built.

`raybert score` on CPU today: Ray Data reads, repartitions, feeds a predictor actor pool and writes
(with its checkpointing), and spends most of the job around a free model (BENCHMARKS.md, issue 21).
The design the profile points to: predictor actors that each take a unit of rows (a file's row
group), read it, tokenize, predict and write their own output file with an atomic rename
(exactly-once by unit; a resume skips the units already committed), started before the input is
planned. This script runs that design's data path with plain Ray actors (no checkpoint ledger, no
error handling: a bound, not the job) on the same free model, corpus and cores as
`benchmarks/scoring.py --skip a,b,c,d,mem` (e), and reports the same ratios:

- pipeline tokens/s (from the actors' creation to the last file committed) and wall of the whole
  command (Ray start included), against the bare tokenizer on both cores;
- the marginal rate (a 2x corpus) and the fixed start-up apart.

    .venv/bin/python benchmarks/scoring_direct_bound.py --rows 35000

If this bound misses the issue's targets (pipeline >= 50%, marginal >= 60% of the bare tokenizer),
the design can't meet them either; if it meets them, building it is worth it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scoring import bare_tokenizer, corpus, cpu_model, minilm, write_corpus  # noqa: E402


def free_model(work: str) -> str:
    import torch

    from bert_core.checkpoint import save_pretrained
    from bert_core.model import build_model, preset
    from bert_core.tokenizer import load_tokenizer

    tok = load_tokenizer(minilm())
    torch.manual_seed(0)
    config = preset("debug", vocab_size=len(tok))
    config.num_hidden_layers = 0  # embeddings and pooling only: what is left is the pipeline
    path = os.path.join(work, "free-model")
    save_pretrained(build_model(config, "embed"), path, tokenizer=tok)
    return path


def free_model_and_corpus(work: str, rows: int) -> tuple[str, list, str, str]:
    """(free model dir, the paragraphs, one Parquet file of them, the model's tokenizer.json)."""
    model = free_model(work)
    texts = corpus(rows)
    every = os.path.join(work, "all.parquet")
    pq.write_table(pa.table({"text": texts}), every)
    return model, texts, every, os.path.join(model, "tokenizer.json")


class UnitScorer:
    """One actor per core: reads a unit (file, row group), tokenizes and predicts in 1,024-row
    blocks, writes one Parquet file and renames it into place."""

    def __init__(self, model: str, max_length: int):
        os.environ["RAYON_NUM_THREADS"] = "1"
        from pipelines.scoring.predictors import Predictor

        tok = dict(tokenizer_path=model, text_column="text", text_pair_column=None, id_column="id",
                   max_length=max_length, with_offsets=False, fallback_ids=None)
        self.predictor = Predictor(model, "embed", dtype="fp32", device="cpu", num_threads=1, tokenize=tok)

    def ready(self) -> float:
        return time.time()

    def score(self, path: str, row_group: int, out_dir: str, unit: int) -> int:
        table = pq.ParquetFile(path).read_row_group(row_group, columns=["id", "text"])
        parts = [self.predictor(table.slice(i, 1024)) for i in range(0, table.num_rows, 1024)]
        out = pa.concat_tables(parts)
        tmp = os.path.join(out_dir, f".part-{unit:06d}.tmp")
        pq.write_table(out, tmp)
        os.replace(tmp, os.path.join(out_dir, f"part-{unit:06d}.parquet"))  # committed whole, once
        return int(pc.sum(out["n_tokens"]).as_py())


def job(model: str, inp: str, out: str, max_length: int, actors: int) -> dict:
    """The whole command's data path: Ray start, actors started before planning, units by row
    group, one file each. Returns tokens and the phases' seconds."""
    import ray
    from ray.util import ActorPool

    t_wall = time.perf_counter()
    ray.init(address="local", num_cpus=actors, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        cls = ray.remote(num_cpus=1, max_restarts=4, max_task_retries=4)(UnitScorer)
        pool_actors = [cls.options(runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}).remote(model, max_length)
                       for _ in range(actors)]
        files = sorted(os.path.join(inp, f) for f in os.listdir(inp) if f.endswith(".parquet"))
        units = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
        os.makedirs(out, exist_ok=True)
        ray.get([a.ready.remote() for a in pool_actors])
        t_ready = time.perf_counter()
        pool = ActorPool(pool_actors)
        tokens = sum(pool.map_unordered(lambda a, u: a.score.remote(u[1][0], u[1][1], out, u[0]),
                                        list(enumerate(units))))
        t_end = time.perf_counter()
    finally:
        ray.shutdown()
    return {"tokens": tokens, "pipeline_s": t_end - t0, "startup_s": t_ready - t0, "work_s": t_end - t_ready,
            "wall_s": time.perf_counter() - t_wall, "units": len(units)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=35_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="raybert-bound-") as work:
        model, texts, every, tj = free_model_and_corpus(work, args.rows)
        n0, s0 = bare_tokenizer(tj, every, args.max_length)
        one, two = os.path.join(work, "in-1x"), os.path.join(work, "in-2x")
        write_corpus(one, texts)
        write_corpus(two, texts, copies=2)
        r1 = job(model, one, os.path.join(work, "out-1x"), args.max_length, args.actors)
        r2 = job(model, two, os.path.join(work, "out-2x"), args.max_length, args.actors)
        n1, s1 = bare_tokenizer(tj, every, args.max_length)
    assert n0 == n1 == r1["tokens"] and r2["tokens"] == 2 * r1["tokens"], (n0, n1, r1, r2)
    bare = (n0 / s0 + n1 / s1) / 2
    marginal = (r2["tokens"] - r1["tokens"]) / (r2["pipeline_s"] - r1["pipeline_s"])
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {args.rows:,} paragraphs, {r1['tokens']:,} tokens, "
          f"{r1['units']} units (row groups)")
    print(f"bare tokenizer, both cores: {bare:,.0f} tokens/s (runs {n0 / s0:,.0f} / {n1 / s1:,.0f})")
    for name, r in (("1x", r1), ("2x", r2)):
        print(f"{name}: pipeline {r['tokens'] / r['pipeline_s']:,.0f} tokens/s = {r['tokens'] / r['pipeline_s'] / bare:.1%} "
              f"of bare; wall {r['tokens'] / r['wall_s'] / bare:.1%}; start-up (actors ready) {r['startup_s']:.1f} s, "
              f"work {r['work_s']:.1f} s (work rate {r['tokens'] / r['work_s'] / bare:.1%} of bare), wall {r['wall_s']:.1f} s")
    print(f"marginal (2x - 1x): {marginal:,.0f} tokens/s = {marginal / bare:.1%} of bare")


if __name__ == "__main__":
    main()
