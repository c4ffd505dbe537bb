"""The README's pretraining picture: MLM loss and accuracy against training time, from real runs.

    # 1. train the recipe (configs/pretrain_mini_zh.yaml, BERT-mini on People's Daily with Google's
    #    Chinese vocab) on a total time budget, exactly as arm (c) of chinese_sentiment.py does, and plot it
    .venv/bin/python benchmarks/loss_curve.py --work runs/recipe-long --budget 1500
    # 2. or only plot existing run dirs (local or s3://...), each as RUN or RUN=LABEL, with the
    #    count baseline and the Hugging Face loop of a benchmarks/pretrain_recipe.py run (the README's)
    .venv/bin/python benchmarks/loss_curve.py --plot-only --recipe runs/recipe/recipe.json \
        --run runs/recipe/recipe="raybert, recipe" --run runs/recipe-long/pretrain="BERT's init, 25 min"

Writes `docs/loss_curve.png`: two panels, MLM cross-entropy and MLM accuracy, each against seconds of
training (`budget_used_s`, or the time since the run's start), with the training log windows as thin
lines and the validation passes as markers; ln(vocab) and the unigram loss are the references, and
with --recipe the neighbour-count model's accuracy (a line) and the plain transformers loop's curve.
Prints the figures it plots. Needs matplotlib (a test dependency, so `make setup` installs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
UNIGRAM_LOSS = 6.6  # where an MLM run sits once it has learned only character frequencies (#4, #22)


def train(work: str, budget: float) -> str:
    from chinese_sentiment import pretrain_config, pretrained

    cfg = pretrain_config(Path(work), budget)
    pretrained(cfg)
    return cfg.run_dir


def curves(run: str) -> dict:
    """{"train": [(s, loss, acc)], "val": [(s, loss, acc)]} of one run dir's metrics.jsonl."""
    from jobs.pretrain import read_metrics

    records = read_metrics(run)
    start = next((r["time"] for r in records if r.get("event") == "start"), None)

    def seconds(r):
        return r["budget_used_s"] if "budget_used_s" in r else r["time"] - start

    out = {"train": [(seconds(r), r["loss"], r["mlm_acc"]) for r in records if "loss" in r],
           "val": [(seconds(r), r["val_loss"], r["val_acc"]) for r in records if "val_loss" in r]}
    if not out["train"]:
        raise SystemExit(f"{run}: metrics.jsonl has no loss records")
    return out


def plot(runs: list[tuple[str, str]], out: str, recipe: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    lowest = UNIGRAM_LOSS
    for i, (run, label) in enumerate(runs):
        c, color = curves(run), f"C{i}"
        lowest = min([lowest] + [p[1] for p in c["val"]])
        for ax, col in ((ax_loss, 1), (ax_acc, 2)):
            ax.plot([p[0] for p in c["train"]], [p[col] for p in c["train"]], color=color, lw=0.8, alpha=0.45)
            if c["val"]:
                ax.plot([p[0] for p in c["val"]], [p[col] for p in c["val"]], "o-", color=color, lw=1.5, ms=3.5,
                        label=label if ax is ax_acc else None)
        last = c["val"][-1] if c["val"] else c["train"][-1]
        print(f"{label}: {c['train'][-1][0]:.0f} s of training; validation loss {last[1]:.3f}, "
              f"MLM accuracy {last[2]:.1%}")
    if recipe:  # benchmarks/pretrain_recipe.py's --out: its reference arms, from the same run
        rows = {r["arm"]: r for r in json.loads(Path(recipe).read_text())["rows"]}
        if "counts" in rows:
            ax_acc.axhline(rows["counts"]["val_acc"], color="black", ls="--", lw=1,
                           label=f"neighbour counts ({rows['counts']['val_acc']:.1%})")
        if "hf" in rows:  # the same recipe in a plain transformers loop, against its own seconds
            hf = rows["hf"]["curve"]
            for ax, key in ((ax_loss, "val_loss"), (ax_acc, "val_acc")):
                ax.plot([e["s"] for e in hf], [e[key] for e in hf], "s--", color="grey", lw=1, ms=3,
                        label="Hugging Face loop, same recipe" if ax is ax_acc else None)
    ax_loss.axhline(math.log(21128), color="grey", ls=":", lw=1, label="ln(21,128): uniform guess")
    ax_loss.axhline(UNIGRAM_LOSS, color="grey", ls="--", lw=1, label="unigram plateau")
    ax_loss.set_ylim(min(5.0, lowest - 0.3), math.log(21128) + 0.3)
    ax_loss.set_ylabel("MLM cross-entropy (nats)")
    ax_acc.set_ylabel("MLM accuracy (masked characters)")
    ax_acc.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("seconds of training (2 CPU cores)")
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7, loc="upper right")
    ax_acc.legend(title="validation passes", fontsize=7, title_fontsize=7, loc="lower right")
    fig.suptitle("raybert pretrain: BERT-mini on People's Daily (thin lines: training log windows)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/recipe-long", help="work dir to train the recipe in (unless --plot-only)")
    p.add_argument("--budget", type=float, default=1500.0, help="seconds of training for the recipe run")
    p.add_argument("--run", action="append", default=[], help="RUN or RUN=LABEL, plotted (repeatable)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--recipe", help="pretrain_recipe.py's --out JSON: draw its count baseline and HF loop")
    p.add_argument("--out", default=str(ROOT / "docs" / "loss_curve.png"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runs = [tuple(r.split("=", 1)) if "=" in r else (r, os.path.basename(r.rstrip("/"))) for r in args.run]
    if not args.plot_only:
        runs.insert(0, (train(args.work, args.budget), f"recipe, {args.budget / 60:.0f} min"))
    if not runs:
        raise SystemExit("nothing to plot: pass --run RUN, or train one (drop --plot-only)")
    plot(runs, args.out, args.recipe)
