"""Scoring throughput: `raybert score` end to end vs the usual ways to embed a corpus.

Setup (issue 3): all-MiniLM-L6-v2, real English paragraphs from the shakespeare package (34,976
of them; `--rows` beyond that repeats the list), max_length 256. Tokens are real tokens after
truncation, counted once with the model's tokenizer, so every row's tokens/s uses the same
numerator.

- (a) plain transformers loop: `AutoModel`, batch 32 in input order, padded to the longest row
  of each batch, mean pooling + normalize (tokenization inside the timed loop);
- (b) sentence-transformers `encode(batch_size=32)` (it sorts by length itself);
- (c) bare bert_core forward on length-sorted, token-budgeted batches (tokenization outside the
  timer: this is the model ceiling), fp32 and bf16 autocast;
- (d) `raybert score` Parquet -> Parquet through `jobs.score.main` on an embedded local Ray, fp32
  and bf16; tokens/s over the pipeline's wall time (Ray start-up is reported apart), plus the
  cosine of bf16 vs fp32 embeddings, row by row;
- memory: peak RSS of the whole process tree (this driver + every Ray process it starts,
  sampled every 0.2 s with psutil) while scoring 1x and `--mem-scale`x the corpus (the corpus
  repeated as more files, with fresh ids). Flat means within 20%.

    .venv/bin/python benchmarks/scoring.py [--rows 20000] [--mem-scale 10] [--quick]

`--quick` is a smoke run (500 rows, 2x memory). Run the full one on a quiet machine. On a GPU
machine (torch.cuda available) (a) and (c) run on the GPU and (d) runs one actor with
num_gpus=1 in bf16 and fp16. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus(rows: int) -> list[str]:
    from pipelines.corpora import shakespeare_paragraphs

    paras = shakespeare_paragraphs()
    return (paras * (rows // len(paras) + 1))[:rows]


def count_tokens(texts: list[str], max_length: int) -> int:
    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import minilm_path

    tok = load_tokenizer(minilm_path())
    return sum(len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"])


def write_corpus(d: str, texts: list[str], copies: int = 1, files_per_copy: int = 4) -> None:
    os.makedirs(d, exist_ok=True)
    per = -(-len(texts) // files_per_copy)
    for c in range(copies):
        for f in range(files_per_copy):
            chunk = texts[f * per:(f + 1) * per]
            ids = [f"c{c}-{f * per + i}" for i in range(len(chunk))]
            pq.write_table(pa.table({"id": ids, "text": chunk}), os.path.join(d, f"c{c:03d}-{f}.parquet"))


# --------------------------------------------------------------------------------------------
# (a) (b) (c): single-process baselines
# --------------------------------------------------------------------------------------------


def plain_transformers(texts, max_length, device) -> float:
    from transformers import AutoModel, AutoTokenizer

    from pipelines.corpora import minilm_path

    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state  # (B, T, H)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (B, H)
            e.cpu()
    return time.perf_counter() - t0


def sentence_transformers_encode(texts, max_length, device) -> float | None:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    from pipelines.corpora import minilm_path

    model = SentenceTransformer(str(minilm_path()), device=device)
    model.max_seq_length = max_length
    t0 = time.perf_counter()
    model.encode(texts, batch_size=32, show_progress_bar=False)
    return time.perf_counter() - t0


def bare_bert_core(texts, max_length, device, dtype, max_tokens=4096) -> float:
    from bert_core.checkpoint import load_pretrained
    from bert_core.padding import pad_batch, token_budget_batches
    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import minilm_path

    tok = load_tokenizer(minilm_path())
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    model = load_pretrained(minilm_path(), "embed").to(device)
    batches = []
    for rows in token_budget_batches([len(x) for x in ids], max_tokens):
        b, m = pad_batch([ids[i] for i in rows])
        batches.append((torch.from_numpy(b), torch.from_numpy(m)))
    ac = torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else None
    with torch.inference_mode(), (ac or torch.autocast(device, enabled=False)):  # warm-up, untimed
        for b, m in batches[:3]:
            model(b.to(device), m.to(device)).cpu()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b, m in batches:
            if ac is None:
                model(b.to(device), m.to(device)).cpu()
            else:
                with ac:
                    model(b.to(device), m.to(device)).float().cpu()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# (d) raybert score, with the process tree's peak RSS
# --------------------------------------------------------------------------------------------


class TreeRSS:
    """Peak summed RSS of this process and all its descendants (the embedded Ray included)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.me] + self.me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def raybert(inp: str, out: str, max_length: int, dtype: str, device: str, num_actors=None):
    import ray

    from jobs.score import ResourceConfig, ScoreConfig, main
    from pipelines.corpora import minilm_path

    t0 = time.perf_counter()
    with TreeRSS() as mem:
        result = main(ScoreConfig(input=inp, output=out, model=str(minilm_path()), task="embed",
                                  max_length=max_length, dtype=dtype, overwrite=True,
                                  resources=ResourceConfig(num_actors=num_actors, device=device)))
    wall = time.perf_counter() - t0
    assert not ray.is_initialized()
    return result, wall, mem.peak


def cosines(out_a: str, out_b: str) -> np.ndarray:
    from pipelines.scoring import read_output

    a = read_output(out_a, ["id", "embedding"]).sort_by("id")
    b = read_output(out_b, ["id", "embedding"]).sort_by("id")
    assert a["id"].to_pylist() == b["id"].to_pylist()
    ea = np.asarray(a["embedding"].combine_chunks().values).reshape(a.num_rows, -1)
    eb = np.asarray(b["embedding"].combine_chunks().values).reshape(b.num_rows, -1)
    return (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--mem-scale", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 rows, 2x memory")
    ap.add_argument("--skip", default="", help="comma list of a,b,c,d,mem to skip")
    ap.add_argument("--workdir", default=None, help="keep Parquet files here (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.mem_scale = 500, 2
    skip = set(filter(None, args.skip.split(",")))
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    work = args.workdir or tempfile.mkdtemp(prefix="raybert-bench-")
    texts = corpus(args.rows)
    tokens = count_tokens(texts, args.max_length)
    rows: list[tuple[str, float | None, str]] = []  # (what, tokens/s, note)

    def add(name, seconds, note="", n=tokens):
        rows.append((name, None if seconds is None else n / seconds, note))
        print(f"  {name}: {'-' if seconds is None else f'{n / seconds:,.0f} tok/s'} {note}", flush=True)

    print(f"{len(texts)} paragraphs, {tokens:,} tokens (max_length {args.max_length}), device {device}", flush=True)
    try:
        if "a" not in skip:
            add("(a) transformers loop, batch 32, input order", plain_transformers(texts, args.max_length, device))
        if "b" not in skip:
            s = sentence_transformers_encode(texts, args.max_length, device)
            add("(b) sentence-transformers encode, batch 32", s, "" if s else "not installed")
        if "c" not in skip:
            add("(c) bert_core forward, length-sorted, 4096-token budget, fp32",
                bare_bert_core(texts, args.max_length, device, None))
            add("(c) bert_core forward, length-sorted, 4096-token budget, bf16",
                bare_bert_core(texts, args.max_length, device, torch.bfloat16))
        results = {}
        if "d" not in skip:
            inp = os.path.join(work, "in-1x")
            write_corpus(inp, texts)
            for dt in (["fp32", "bf16", "fp16"] if gpu else ["fp32", "bf16"]):
                out = os.path.join(work, f"out-{dt}")
                r, wall, peak = raybert(inp, out, args.max_length, dt, device, 1 if gpu else None)
                results[dt] = (r, wall, peak, out)
                add(f"(d) raybert score, Parquet->Parquet, {dt}", r.seconds,
                    f"(wall incl. Ray start {wall:.1f}s; peak RSS {peak / 2**30:.2f} GiB)", n=r.tokens)
            if "bf16" in results:
                c = cosines(results["fp32"][3], results["bf16"][3])
                print(f"  bf16 vs fp32 cosine: min {c.min():.6f}, mean {c.mean():.6f}", flush=True)
                rows.append(("(d) bf16 vs fp32 cosine (min / mean)", None, f"{c.min():.6f} / {c.mean():.6f}"))
        mem = None
        if "mem" not in skip and "d" not in skip:
            big = os.path.join(work, f"in-{args.mem_scale}x")
            write_corpus(big, texts, copies=args.mem_scale)
            r, wall, peak = raybert(big, os.path.join(work, "out-big"), args.max_length, "fp32", device,
                                    1 if gpu else None)
            assert r.rows == len(texts) * args.mem_scale
            mem = (results["fp32"][2], peak)
            add(f"(d) raybert score fp32, {args.mem_scale}x corpus", r.seconds,
                f"(peak RSS {peak / 2**30:.2f} GiB)", n=r.tokens)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    b = next((v for n, v, _ in rows if n.startswith("(b)")), None)
    a = next((v for n, v, _ in rows if n.startswith("(a)")), None)
    print(f"\n### Scoring throughput ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {device}; {len(texts)} paragraphs, {tokens:,} tokens)\n")
    print("| what | tokens/s | vs (a) | vs (b) | note |")
    print("|---|---:|---:|---:|---|")
    for name, v, note in rows:
        va = f"{v / a:.2f}x" if (v and a) else ""
        vb = f"{v / b:.2f}x" if (v and b) else ""
        print(f"| {name} | {'' if v is None else f'{v:,.0f}'} | {va} | {vb} | {note} |")
    if mem:
        one, big = mem
        print(f"\nPeak RSS of the process tree: 1x {one / 2**30:.2f} GiB, {args.mem_scale}x {big / 2**30:.2f} GiB "
              f"({(big / one - 1) * 100:+.0f}%; target within +-20%)")
    print("\nTargets (2-core CPU): (d) fp32 >= 1.0x (b); (d) bf16 >= 1.6x (b) with cosine >= 0.999; (d) >= 5x (a).")


if __name__ == "__main__":
    main()
