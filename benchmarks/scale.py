"""Cost that grows with the work and no faster (#36): the whole jobs users run, at 1x, 4x and 16x.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/scale.py [--quick] [--skip free,minilm,files,pretrain]
        [--out scale.json]

Each figure is a `raybert` CLI run in its own process (Parquet in, Parquet out), as a user runs it:
- wall: the CLI process from start to exit;
- tokens/s: the job's own figure (tokens scored / its pipeline seconds);
- driver RSS: the peak resident memory of the CLI process itself (sampled every 0.1 s; Ray's
  processes are not the driver);
- planning: wall time before the first row could be scored (imports, listing and footers, Ray
  and actor start-up): wall - pipeline seconds + the pipeline's own start-up.
Every scoring run checks that each input id comes out exactly once.

Runs (the English paragraphs of the `shakespeare` package, repeated with fresh ids):
- free: a 0-layer model (embeddings and pooling only: what is left is the pipeline) at 1x, 4x and
  16x of 70,000 rows, in files of 5,000 rows;
- minilm: all-MiniLM-L6-v2 at 1x and 4x of 17,500 rows, files of 5,000 rows;
- files: 10,000 files of 100 rows (1M rows), free model;
- pretrain: `raybert pretrain --preset debug` on People's Daily sentences repeated 5x (97,320
  documents, the corpus of the issue's 10.6 s evaluations), 4x and 16x that, 20 steps with an
  evaluation every 10: seconds per evaluation (`val_seconds` in metrics.jsonl).
The ratios the issue asks for are printed under the table. `--quick`: a smoke run at 1/20 the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scoring import corpus, cpu_model, minilm  # noqa: E402  (benchmarks/scoring.py)

RAYBERT = os.path.join(os.path.dirname(sys.executable), "raybert")


def run_cli(args: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """(the finished CLI process, wall seconds, its peak RSS in bytes)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([RAYBERT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if proc.returncode:
        raise RuntimeError(f"raybert {' '.join(args)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return done, wall, peak[0]


def write_inputs(d: str, rows: int, rows_per_file: int) -> None:
    """`rows` paragraphs as Parquet files of `rows_per_file` rows, ids unique across the corpus."""
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    texts = corpus(min(rows, 34_976))
    for f, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        chunk = [texts[(start + i) % len(texts)] for i in range(n)]
        pq.write_table(pa.table({"id": [f"r{start + i}" for i in range(n)], "text": chunk}),
                       os.path.join(d, f"part-{f:05d}.parquet"))


def free_model(work: str) -> str:
    """A 0-layer BERT with MiniLM's tokenizer: the model costs nothing, the pipeline is what's left."""
    import torch

    from bert_core.checkpoint import save_pretrained
    from bert_core.model import build_model, preset
    from bert_core.tokenizer import load_tokenizer

    path = os.path.join(work, "free-model")
    if not os.path.isdir(path):
        tok = load_tokenizer(minilm())
        torch.manual_seed(0)
        config = preset("debug", vocab_size=len(tok))
        config.num_hidden_layers = 0
        save_pretrained(build_model(config, "embed"), path, tokenizer=tok)
    return path


def score(work: str, name: str, model: str, rows: int, rows_per_file: int) -> dict:
    """One `raybert score` of `rows` rows; checks every id comes out once."""
    from pipelines.scoring.output import read_output

    inp, out = os.path.join(work, f"{name}-in"), os.path.join(work, f"{name}-out")
    write_inputs(inp, rows, rows_per_file)
    shutil.rmtree(out, ignore_errors=True)
    done, wall, rss = run_cli(["score", inp, out, "--model", model, "--task", "embed", "--max-length", "128"])
    r = json.loads(done.stdout)
    ids = read_output(out, columns=["id"])["id"].to_pylist()
    assert r["rows"] == r["input_rows"] == rows == len(ids) == len(set(ids)) and r["error_rows"] == 0, (r, len(ids))
    out_files = sum(len(f) for _, _, f in os.walk(out))
    shutil.rmtree(inp)
    shutil.rmtree(out)
    return {"run": name, "rows": rows, "files": -(-rows // rows_per_file), "output_files": out_files, "wall_s": wall,
            "tokens_per_s": r["tokens_per_s"], "driver_rss_mb": rss / 2**20,
            "planning_s": wall - r["seconds"] + r["startup_s"]}


def pretrain_eval(work: str, name: str, copies: int) -> dict:
    """`raybert pretrain --preset debug` on People's Daily x 5 x `copies`: seconds per evaluation."""
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    data, run = os.path.join(work, f"{name}-corpus"), os.path.join(work, f"{name}-run")
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    docs = peoples_daily_sentences() * 5 * copies
    write_corpus(docs, data, rows_per_file=5_000)
    cfg = os.path.join(work, "pretrain.yaml")
    with open(cfg, "w") as f:
        f.write("train:\n  eval_every: 10\n  save_every: 1000\n  log_every: 10\n")
    _, wall, rss = run_cli(["pretrain", "--preset", "debug", "--data", data, "--run-dir", run, "--tokenizer",
                            str(chinese_vocab_path()), "--max-steps", "20", "--config", cfg, "--quiet"])
    evals = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if '"val_seconds"' in x]
    val_rows = pq.ParquetFile(os.path.join(run, "val.parquet")).metadata.num_rows
    shutil.rmtree(data)
    shutil.rmtree(run)
    return {"run": name, "rows": len(docs), "files": -(-len(docs) // 5_000), "wall_s": wall, "driver_rss_mb": rss / 2**20,
            "eval_s": sum(e["val_seconds"] for e in evals) / len(evals), "evals": len(evals), "val_rows": val_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="")
    ap.add_argument("--work")
    ap.add_argument("--out")
    args = ap.parse_args()
    skip, k = set(args.skip.split(",")), 20 if args.quick else 1
    work = args.work or tempfile.mkdtemp(prefix="raybert-scale-")
    os.makedirs(work, exist_ok=True)
    rows = []
    if "free" not in skip:
        model = free_model(work)
        rows += [score(work, f"free-{m}x", model, 70_000 * m // k, 5_000 // k) for m in (1, 4, 16)]
    if "minilm" not in skip:
        rows += [score(work, f"minilm-{m}x", minilm(), 17_500 * m // k, 5_000 // k) for m in (1, 4)]
    if "files" not in skip:
        rows.append(score(work, "files-10000x100", free_model(work), 1_000_000 // k, 100))
    if "pretrain" not in skip:
        rows += [pretrain_eval(work, f"pretrain-{m}x", m) for m in ((1, 4, 16) if not args.quick else (1, 2))]
    report(rows, args)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[dict], args) -> None:
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}\n")
    print("| run | rows | files | wall s | tokens/s | driver peak RSS MB | planning s | eval s (val rows) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        plan = f"{r['planning_s']:.1f}" if "planning_s" in r else "-"
        ev = f"{r['eval_s']:.2f} ({r['val_rows']:,})" if "eval_s" in r else "-"
        print(f"| {r['run']} | {r['rows']:,} | {r['files']:,} | {r['wall_s']:.1f} | {tps} | {r['driver_rss_mb']:.0f} "
              f"| {plan} | {ev} |")
    by = {r["run"]: r for r in rows}

    def ratio(a, b, key):
        if a in by and b in by:
            print(f"- {a} / {b} {key}: {by[a][key] / by[b][key]:.2f}")

    print()
    ratio("free-16x", "free-4x", "tokens_per_s")
    ratio("minilm-4x", "minilm-1x", "tokens_per_s")
    ratio("pretrain-16x", "pretrain-1x", "eval_s")
    if "free-16x" in by and "free-4x" in by:
        print(f"- driver RSS free-16x - free-4x: {by['free-16x']['driver_rss_mb'] - by['free-4x']['driver_rss_mb']:+.0f} MB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
