"""Pretraining throughput: raybert vs the Hugging Face baseline, the step and the whole job.

    .venv/bin/python benchmarks/pretrain.py            # the step: mini, seq 128, batch 32, fp32 + bf16
    .venv/bin/python benchmarks/pretrain.py --quick    # smoke: tiny batch, few steps
    .venv/bin/python benchmarks/pretrain.py --job      # the whole `raybert pretrain` job vs the HF loop
    .venv/bin/python benchmarks/pretrain.py --job --quick   # smoke of the job comparison (debug preset)

The job comparison (`--job`) runs `jobs.pretrain.main` (what `raybert pretrain` calls) on a
Parquet corpus of People's Daily text: 1 worker holding 1.5 of the machine's CPUs (the rest left to
Ray Data), fp32, sequence length 128, batch 32. Its tokens/s is the median of metrics.jsonl's
log windows after the first two (start-up and warm-up excluded). The HF loop below runs in this
process on all cores (torch's default threads) at the same config, once before and once after the
job; the ratio is against their mean, so load drift on a shared machine hits both sides.

What is compared (same `mini` config with Google's Chinese vocab, same packed rows of real
People's Daily text, same batch, sequence length and dtype, torch AdamW in every case):
- `hf`: `transformers.BertForMaskedLM` + `DataCollatorForLanguageModeling` (15% masking) + a plain
  AdamW loop. Its MLM head projects every position onto the 21,128-token vocabulary.
- `raybert`: our training step as pipelines/training/loop.py runs it: `bert_core.Masker`,
  `BertForMaskedLM(masked_index=...)` (the vocab projection on masked rows only), loss at masked
  positions, wrapped by `pipelines.training.loop.build_engine` (DeepSpeed, ZeRO-1, one process, gloo).
- `raybert-bare`: the same step without DeepSpeed (model + masker + AdamW), to show the engine cost.
bf16 means what each stack does for it: autocast for `hf` and `raybert-bare`, DeepSpeed's bf16
mode (bf16 weights, fp32 master copy) for `raybert`.

MFU = tokens/s x training FLOPs per token / peak, with the peak measured here: the best of
repeated square matmuls (fp32 and bf16) at the thread count torch uses. Each stack is credited
with the FLOPs it actually performs (the HF head runs on all tokens), so MFU compares hardware use
while tokens/s compares speed. Prints a Markdown table and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best observed FLOP/s of an (n x n) @ (n x n) matmul."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def packed_rows(tok, seq_len: int, n_rows: int) -> torch.Tensor:
    from bert_core.padding import SequencePacker
    from pipelines.corpora import peoples_daily_sentences

    packer = SequencePacker(seq_len, tok.cls_token_id, tok.sep_token_id)
    texts = peoples_daily_sentences()
    rows, i = [], 0
    while sum(len(r) for r in rows) < n_rows:
        ids = tok(texts[i:i + 256], add_special_tokens=False)["input_ids"]
        rows.append(packer.add(ids))
        i += 256
    return torch.from_numpy(__import__("numpy").concatenate(rows)[:n_rows])  # (N, T)


def timed(step, batches, warmup: int) -> float:
    for b in batches[:warmup]:
        step(b)
    t = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return time.perf_counter() - t


def bench_hf(config, tok, batches, dtype, warmup):
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM as HFBertForMaskedLM
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = HFBertForMaskedLM(HFConfig(**{k: v for k, v in config.to_dict().items() if k != "raybert"})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step(rows):
        b = collator([{"input_ids": r} for r in rows.tolist()])
        with amp:
            loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, batches, warmup)


def bench_ours(config, tok, batches, dtype, warmup, deepspeed_engine: bool):
    from bert_core.masking import Masker
    from bert_core.model import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(config).train()
    masker = Masker.from_tokenizer(tok)
    g = torch.Generator().manual_seed(0)
    if deepspeed_engine:
        from pipelines.training.engine import build_engine
        from pipelines.training.config import TrainConfig

        engine = build_engine(model, TrainConfig(micro_batch_size=batches[0].shape[0], zero_stage=1, dtype=dtype,
                                                 warmup_steps=0, grad_clip=1.0, max_steps=10 ** 6), 1)

        def step(rows):
            mb = masker(rows, generator=g)
            logits = engine(mb.input_ids, masked_index=mb.masked_index)  # (M, V)
            loss = F.cross_entropy(logits.float(), mb.masked_labels)
            engine.backward(loss)
            engine.step()

        try:
            return timed(step, batches, warmup)
        finally:
            engine.destroy()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step(rows):
        mb = masker(rows, generator=g)
        with amp:
            logits = model(mb.input_ids, masked_index=mb.masked_index)  # (M, V)
        loss = F.cross_entropy(logits.float(), mb.masked_labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, batches, warmup)


def bench_job(args, tok, config) -> dict:
    """The whole job, steady state, from its own metrics.jsonl."""
    import statistics
    import tempfile

    from jobs.pretrain import main as pretrain_main
    from jobs.pretrain import preset_config, read_metrics
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    work = tempfile.mkdtemp(prefix="raybert-bench-job-")
    corpus = write_corpus(peoples_daily_sentences(), os.path.join(work, "corpus"), rows_per_file=20_000)
    cfg = preset_config(args.preset)
    cfg.run_dir = os.path.join(work, "run")
    cfg.data.paths, cfg.data.tokenizer, cfg.data.seq_len = [corpus], str(chinese_vocab_path()), args.seq_len
    cfg.data.val_fraction = 0.0
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = 1, args.cpus_per_worker
    t = cfg.train
    t.dtype, t.zero_stage, t.micro_batch_size, t.max_steps = "fp32", 1, args.batch, args.job_steps
    t.log_every, t.eval_every, t.save_every = args.log_every, 10 ** 9, 10 ** 9
    t0 = time.perf_counter()
    pretrain_main(cfg)
    wall = time.perf_counter() - t0
    records = read_metrics(cfg.run_dir)
    windows = [r for r in records if "tokens_per_s" in r]
    start = next(r for r in records if r.get("event") == "start")
    steady = windows[2:] or windows[-1:]
    last = steady[-1]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "windows": [round(r["tokens_per_s"]) for r in windows], "mfu": statistics.median(r["mfu"] for r in steady),
            "peak_flops": last["peak_flops"], "threads": start["threads"], "steps": t.max_steps,
            "wall_s": wall, "final_loss": last["loss"], "run_dir": cfg.run_dir}


def job_main(args) -> None:
    from bert_core.model import mlm_flops_per_token, preset
    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import chinese_vocab_path

    tok = load_tokenizer(chinese_vocab_path())
    config = preset(args.preset, vocab_size=len(tok))
    rows = packed_rows(tok, args.seq_len, args.batch * (args.steps + args.warmup))
    batches = list(rows.split(args.batch))
    tokens = args.batch * args.seq_len * args.steps
    hf = [tokens / bench_hf(config, tok, batches, "fp32", args.warmup)]
    print(f"  hf (before job): {hf[0]:.0f} tok/s, {torch.get_num_threads()} threads", flush=True)
    job = bench_job(args, tok, config)
    print(f"  job: {job['tokens_per_s']:.0f} tok/s (windows {job['windows']}), {job['threads']} threads",
          flush=True)
    hf.append(tokens / bench_hf(config, tok, batches, "fp32", args.warmup))
    print(f"  hf (after job): {hf[1]:.0f} tok/s", flush=True)
    hf_tps = sum(hf) / len(hf)
    fpt_hf = mlm_flops_per_token(config, args.seq_len, mask_rate=1.0)
    summary = {"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "dtype": "fp32",
               "cpus": os.cpu_count(), "cpus_per_worker": args.cpus_per_worker, "job": job,
               "hf_tokens_per_s": hf, "hf_threads": torch.get_num_threads(),
               "hf_mfu": hf_tps * fpt_hf / job["peak_flops"], "ratio_job_vs_hf": job["tokens_per_s"] / hf_tps}
    print(f"\n`raybert pretrain` job vs HF loop, {args.preset}, seq {args.seq_len}, batch {args.batch}, fp32: "
          f"{job['tokens_per_s']:.0f} vs {hf_tps:.0f} tokens/s = {summary['ratio_job_vs_hf']:.2f}x; "
          f"job MFU {job['mfu']:.1%} of a measured {job['peak_flops'] / 1e9:.0f} GFLOP/s")
    print(json.dumps(summary, indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)


def init_single_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 4, 2 timed steps")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--job", action="store_true", help="the whole `raybert pretrain` job vs the HF loop")
    ap.add_argument("--job-steps", type=int, default=60, help="--job: optimizer steps of the job")
    ap.add_argument("--log-every", type=int, default=5, help="--job: steps per metrics window")
    ap.add_argument("--cpus-per-worker", type=float, default=1.5, help="--job: CPUs the one worker holds")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup = 4, 2, 1
        args.preset, args.job_steps, args.log_every = ("debug", 12, 3) if args.job else (args.preset, 0, 0)
    if args.job:
        return job_main(args)

    from bert_core.model import mlm_flops_per_token, preset
    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import chinese_vocab_path

    tok = load_tokenizer(chinese_vocab_path())
    config = preset(args.preset, vocab_size=len(tok))
    n = 512 if args.quick else 2048
    peaks = {"fp32": matmul_peak(torch.float32, n, 3 if args.quick else 10),
             "bf16": matmul_peak(torch.bfloat16, n, 3 if args.quick else 10)}
    rows = packed_rows(tok, args.seq_len, args.batch * (args.steps + args.warmup))
    batches = list(rows.split(args.batch))
    tokens = args.batch * args.seq_len * args.steps
    init_single_process_group()

    results = []
    for dtype in args.dtypes.split(","):
        for name in ("hf", "raybert-bare", "raybert"):
            if name == "hf":
                secs = bench_hf(config, tok, batches, dtype, args.warmup)
                fpt = mlm_flops_per_token(config, args.seq_len, mask_rate=1.0)  # head on every token
            else:
                secs = bench_ours(config, tok, batches, dtype, args.warmup, deepspeed_engine=name == "raybert")
                fpt = mlm_flops_per_token(config, args.seq_len, mask_rate=0.15)
            tps = tokens / secs
            results.append({"stack": name, "dtype": dtype, "tokens_per_s": tps, "flops_per_token": fpt,
                            "mfu": tps * fpt / peaks[dtype], "peak_flops": peaks[dtype]})
            print(f"  {name:13s} {dtype}: {tps:9.0f} tok/s", flush=True)

    print(f"\nPretraining step, {args.preset} (vocab {len(tok)}), seq {args.seq_len}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"Measured matmul peak ({n}x{n}): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| stack | dtype | tokens/s | vs hf | MFU (of measured peak) |")
    print("|---|---|---|---|---|")
    for r in results:
        base = next(x for x in results if x["stack"] == "hf" and x["dtype"] == r["dtype"])
        r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"| {r['stack']} | {r['dtype']} | {r['tokens_per_s']:.0f} | {r['speedup_vs_hf']:.2f}x | "
              f"{100 * r['mfu']:.1f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "peaks": peaks, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
