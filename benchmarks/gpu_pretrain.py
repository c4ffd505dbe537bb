"""Pretraining on one GPU, prepared as one script: the real job vs the HF loop, ZeRO-3, the export.

    python benchmarks/gpu_pretrain.py            # one GPU: `base`, bf16, seq 128 (~4-5 min on an H200)
    python benchmarks/gpu_pretrain.py --tiny     # the same code path on CPU, `debug`, fp32 (~1 min)

What it does, in order, and what it prints (one JSON summary on the last line):
1. `jobs.pretrain.main` (what `raybert pretrain` runs): 1 worker, 1 GPU, `base`, bf16, ZeRO-2,
   sequence length 128, `--steps` optimizer steps, People's Daily text with Google's Chinese
   vocab (both from installed packages: no network). Steady-state tokens/s and MFU come from the
   job's own metrics.jsonl (windows after the first two); MFU is against the peak the worker
   measured, and is also given against the GPU's dense bf16 datasheet peak when known.
   The loss must fall (first window vs last).
2. The HF loop on the same GPU and config: `transformers.BertForMaskedLM` +
   `DataCollatorForLanguageModeling` + torch AdamW under `torch.autocast(bfloat16)`.
3. ZeRO-3 for a few steps (a fresh run dir): trains, checkpoints, loss finite.
4. The ZeRO-2 run's HF export loads in `transformers.BertForMaskedLM` and predicts finite logits.
`--tiny` runs all four on CPU with the `debug` model in fp32 (bf16 matmuls are ~1000x slower than
fp32 on CPUs without AVX-512 bf16), so the script is debugged before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s.
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def datasheet_peak(name: str):
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def run_job(args, work: str, corpus: str, name: str, zero_stage: int, steps: int) -> dict:
    from jobs.pretrain import main, preset_config, read_metrics
    from pipelines.corpora import chinese_vocab_path

    cfg = preset_config(args.preset)
    cfg.run_dir = os.path.join(work, name)
    cfg.data.paths, cfg.data.tokenizer, cfg.data.seq_len = [corpus], str(chinese_vocab_path()), args.seq_len
    cfg.data.val_fraction = 0.0
    cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.max_failures = 1, not args.tiny, 0
    cfg.scaling.cpus_per_worker = args.cpus_per_worker
    t = cfg.train
    t.dtype, t.zero_stage, t.micro_batch_size, t.max_steps = args.dtype, zero_stage, args.batch, steps
    t.lr, t.warmup_steps = args.lr, max(1, steps // 10)
    t.log_every, t.eval_every, t.save_every = max(1, min(args.log_every, steps // 4)), 10 ** 9, 10 ** 9
    t0 = time.perf_counter()
    result = main(cfg)
    records = read_metrics(cfg.run_dir)
    windows = [r for r in records if "tokens_per_s" in r]
    start = next(r for r in records if r.get("event") == "start")
    steady = windows[2:] or windows[-1:]
    return {"zero_stage": zero_stage, "steps": result.metrics.get("step"), "wall_s": time.perf_counter() - t0,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady), "peak_flops": start["peak_flops"],
            "device": start.get("device"), "threads": start.get("threads"),
            "first_loss": windows[0]["loss"], "last_loss": windows[-1]["loss"],
            "losses": [round(r["loss"], 3) for r in windows], "export": result.export}


def hf_loop(args, device: torch.device) -> float:
    """Tokens/s of the plain HF loop on `device` at the job's config (same packed rows)."""
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM as HFBertForMaskedLM
    from transformers import DataCollatorForLanguageModeling

    from bert_core.model import preset
    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import chinese_vocab_path

    # benchmarks/pretrain.py, importable because Python puts this script's directory on the path.
    from pretrain import packed_rows

    tok = load_tokenizer(chinese_vocab_path())
    config = preset(args.preset, vocab_size=len(tok))
    torch.manual_seed(0)
    model = HFBertForMaskedLM(HFConfig(**{k: v for k, v in config.to_dict().items() if k != "raybert"}))
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    rows = packed_rows(tok, args.seq_len, args.batch * (args.hf_steps + 3))
    batches = list(rows.split(args.batch))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(r):
        b = collator([{"input_ids": x} for x in r.tolist()])
        with amp:
            loss = model(input_ids=b["input_ids"].to(device), labels=b["labels"].to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:3]:
        step(b)
    sync()
    t = time.perf_counter()
    for b in batches[3:]:
        step(b)
    sync()
    return args.batch * args.seq_len * args.hf_steps / (time.perf_counter() - t)


def export_loads(export: str, device: torch.device) -> dict:
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import peoples_daily_sentences

    tok = load_tokenizer(export)
    hf = HFBertForMaskedLM.from_pretrained(export).to(device).eval()
    enc = tok(peoples_daily_sentences()[-4:], padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        logits = hf(**enc).logits
    return {"loads": True, "vocab": len(tok), "logits_shape": list(logits.shape),
            "finite": bool(torch.isfinite(logits).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, debug model, fp32, few steps: debug the script")
    ap.add_argument("--steps", type=int, default=300, help="ZeRO-2 job steps")
    ap.add_argument("--zero3-steps", type=int, default=10)
    ap.add_argument("--hf-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128, help="rows per step (x seq-len tokens)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cpus-per-worker", type=float, default=8.0, help="CPUs the GPU worker holds")
    ap.add_argument("--out", help="also write the JSON summary here")
    args = ap.parse_args()
    args.preset, args.dtype = "base", "bf16"
    if args.tiny:
        args.preset, args.dtype, args.batch = "debug", "fp32", 8
        args.steps, args.zero3_steps, args.hf_steps, args.log_every = 16, 3, 5, 4
        args.cpus_per_worker, args.lr = 1.0, 2e-3
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run with --tiny to check the script on CPU")
    device = torch.device("cpu" if args.tiny else "cuda")

    from pipelines.corpora import peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="raybert-gpu-pretrain-")
    corpus = write_corpus(peoples_daily_sentences(), os.path.join(work, "corpus"), rows_per_file=50_000)
    summary: dict = {"preset": args.preset, "dtype": args.dtype, "seq_len": args.seq_len, "batch": args.batch,
                     "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    z2 = run_job(args, work, corpus, "zero2", 2, args.steps)
    summary["zero2"] = z2
    summary["loss_falls"] = z2["last_loss"] < z2["first_loss"]
    hf = hf_loop(args, device)
    summary["hf_tokens_per_s"] = hf
    summary["ratio_job_vs_hf"] = z2["tokens_per_s"] / hf
    sheet = datasheet_peak(summary["device"])
    if sheet:
        from bert_core.model import mlm_flops_per_token, preset

        fpt = mlm_flops_per_token(preset(args.preset, vocab_size=21128), args.seq_len, 0.15)
        summary["mfu_vs_datasheet"] = z2["tokens_per_s"] * fpt / sheet
        summary["datasheet_peak_flops"] = sheet
    summary["zero3"] = run_job(args, work, corpus, "zero3", 3, args.zero3_steps)
    summary["zero3_ok"] = summary["zero3"]["steps"] == args.zero3_steps and all(
        x == x and abs(x) < 1e9 for x in summary["zero3"]["losses"])
    summary["export"] = export_loads(z2["export"], device)
    summary["targets"] = {"ratio>=1.5": summary["ratio_job_vs_hf"] >= 1.5, "mfu>=0.35": z2["mfu"] >= 0.35,
                          "loss_falls": summary["loss_falls"], "export_loads": summary["export"]["finite"]}
    summary["wall_s"] = time.perf_counter() - t0
    text = json.dumps(summary, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
