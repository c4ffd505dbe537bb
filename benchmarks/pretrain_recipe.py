"""Pretraining recipes for small budgets, compared at an equal training-time budget (#22 item 1).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/pretrain_recipe.py --budget 420 \
        [--variants bert,cram,cram_lr2,cram_b16] [--work runs/recipe] [--out recipe.json]

Every variant pretrains BERT-mini (post-LN, HF-compatible) on People's Daily with Google's Chinese
vocab, from configs/pretrain_mini_zh.yaml plus its own overrides, with `train.total_time_budget_s =
--budget`: each one's LR schedule decays fully within the same training time, so the comparison is
what a user with that budget gets. Validation MLM loss and accuracy (the same held-out sentences,
the same masks at every evaluation) are logged every `--eval-every` steps (scaled to equal tokens
for a smaller batch) and at the end.

Prints a Markdown table (steps, tokens/s, final validation loss and MLM accuracy) and the curves
(validation accuracy against training time); --out writes JSON. The unigram plateau is the loss of
predicting character frequencies (about 6.6 nats here, accuracy ~5-14%): a recipe "passes" it when
its validation loss falls clearly below and its accuracy climbs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The recipes: overrides of configs/pretrain_mini_zh.yaml (BERT's own: lr 1e-3, 15% masking,
# dropout 0.1, 2 workers x 32 rows of 128 tokens, linear decay).
VARIANTS = {
    "bert": {},
    # Cramming (Geiping & Goldstein 2022): no dropout while pretraining; Wettig et al. 2022: mask more.
    "cram": {"model.train_dropout": 0.0, "data.masking.mlm_probability": 0.3},
    "cram_lr2": {"model.train_dropout": 0.0, "data.masking.mlm_probability": 0.3, "train.lr": 2e-3},
    "cram_b16": {"model.train_dropout": 0.0, "data.masking.mlm_probability": 0.3, "train.micro_batch_size": 16},
    "cram_m40": {"model.train_dropout": 0.0, "data.masking.mlm_probability": 0.4},
}


def corpus(work: Path) -> str:
    from pipelines.corpora import peoples_daily_sentences
    from pipelines.pretrain_data import write_corpus

    path = work / "peoples_daily"
    if not path.is_dir():
        write_corpus(peoples_daily_sentences(), str(path), rows_per_file=5_000)
    return str(path)


def run_variant(name: str, work: Path, data: str, budget: float, eval_every: int) -> dict:
    import shutil

    from jobs.pretrain import build_config, main, read_metrics
    from pipelines.corpora import chinese_vocab_path

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {"run_dir": str(run_dir), "data.paths": [data], "data.tokenizer": str(chinese_vocab_path()),
                 "train.total_time_budget_s": budget, "train.max_steps": 10 ** 6, "train.time_budget_s": None,
                 "train.save_every": 10 ** 6, "train.warmup_steps": 60, **VARIANTS[name]}
    # Evaluations at equal tokens (each restarts the validation pipeline: seconds of the budget).
    overrides["train.eval_every"] = eval_every * 32 // overrides.get("train.micro_batch_size", 32)
    cfg = build_config(None, str(ROOT / "configs" / "pretrain_mini_zh.yaml"), overrides)
    t0 = time.time()
    main(cfg)
    records = read_metrics(run_dir)
    start = next(r["time"] for r in records if r.get("event") == "start")
    evals = [{"s": round(r["time"] - start, 1), "step": r["step"], "val_loss": r["val_loss"], "val_acc": r["val_acc"]}
             for r in records if "val_loss" in r]
    train = [r for r in records if "loss" in r]
    return {"variant": name, "overrides": VARIANTS[name], "steps": train[-1]["step"], "tokens": train[-1]["tokens"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in train[1:]) / max(1, len(train) - 1),
            "final_lr": train[-1]["lr"], "budget_used_s": train[-1].get("budget_used_s"),
            "val_loss": evals[-1]["val_loss"], "val_acc": evals[-1]["val_acc"], "curve": evals,
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=420.0, help="training seconds per variant")
    ap.add_argument("--variants", default="bert,cram,cram_lr2,cram_b16")
    ap.add_argument("--eval-every", type=int, default=60, help="steps between evaluations (at 32 rows a step)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "recipe"))
    ap.add_argument("--out")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = corpus(work)
    rows = []
    for name in names:
        rows.append(run_variant(name, work, data, args.budget, args.eval_every))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nBERT-mini on People's Daily, {args.budget:.0f} s of training each; {cpu}, {os.cpu_count()} CPUs, "
          f"{platform.node()}, {time.strftime('%Y-%m-%d')}\n")
    print("| recipe | overrides | steps | tokens/s | final LR | val loss | val MLM acc |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['overrides'] or 'BERT'} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
              f"{r['final_lr']:.1e} | {r['val_loss']:.3f} | {r['val_acc']:.1%} |")
    print("\nvalidation MLM accuracy against training seconds:")
    for r in rows:
        print(f"  {r['variant']:>9}: " + "  ".join(f"{e['s']:.0f}s {e['val_acc']:.1%}" for e in r["curve"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"budget_s": args.budget, "cpu": cpu, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
