"""`make demo`: score a real-text sample with all-MiniLM-L6-v2 on a local Ray, end to end.

Builds a Parquet corpus from the `shakespeare` package's plays (split into paragraphs, written
as 4 files under a temporary directory; the text is read from site-packages, never committed),
runs `raybert score ... --task embed` through `jobs.score.main`, and prints the summary line
and a peek at the output. `--rows N` changes the sample size, `--out DIR` keeps the files.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq


def build_corpus(directory: str, rows: int, files: int = 4) -> int:
    from pipelines.corpora import shakespeare_paragraphs

    paras = shakespeare_paragraphs()
    paras = (paras * (rows // len(paras) + 1))[:rows]
    os.makedirs(directory, exist_ok=True)
    per = -(-len(paras) // files)
    for f in range(files):
        chunk = paras[f * per:(f + 1) * per]
        ids = [f"para-{f * per + i:06d}" for i in range(len(chunk))]
        pq.write_table(pa.table({"id": ids, "text": chunk}), os.path.join(directory, f"part-{f}.parquet"))
    return len(paras)


def run(rows: int, out: str) -> None:
    from jobs.score import ScoreConfig, main
    from pipelines.corpora import minilm_path
    from pipelines.scoring.output import read_output

    corpus, output = os.path.join(out, "corpus"), os.path.join(out, "scores")
    n = build_corpus(corpus, rows)
    print(f"corpus: {n} Shakespeare paragraphs in {corpus}", flush=True)
    cfg = ScoreConfig(input=corpus, output=output, model=str(minilm_path()), task="embed", overwrite=True)
    main(cfg)  # prints the summary line, as `raybert score` does
    t = read_output(output, ["id", "n_tokens", "truncated", "error", "embedding"])
    print(f"\noutput schema: {t.schema.field('embedding').type} embedding, {t.num_rows} rows")
    for row in t.sort_by("id").slice(0, 3).to_pylist():
        e = row["embedding"]
        print(f"  {row['id']}  n_tokens={row['n_tokens']:3d} truncated={row['truncated']!s:5} "
              f"error={row['error']}  embedding[:4]={[round(x, 4) for x in e[:4]]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--out", default=None, help="keep corpus and output here (default: a temp dir)")
    args = ap.parse_args()
    if args.out:
        run(args.rows, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="raybert-demo-") as tmp:
            run(args.rows, tmp)


if __name__ == "__main__":
    main()
