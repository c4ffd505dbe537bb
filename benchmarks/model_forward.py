"""Encoder forward throughput: our bert_core encoder vs `transformers.BertModel`, same weights.

Both run all-MiniLM-L6-v2 on the same length-sorted, token-budgeted batches of real English
paragraphs (shakespeare package), in fp32 and under bf16 autocast on CPU. Rounds alternate
between the two models so machine noise hits both alike; we report the median round.

    .venv/bin/python benchmarks/model_forward.py [--paragraphs 3000] [--rounds 5] [--max-tokens 4096]

Prints a markdown table of tokens/s and the ratio ours / transformers (target >= 1.0).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

from bert_core import load_pretrained, load_tokenizer
from bert_core.padding import pad_batch, token_budget_batches
from pipelines.corpora import minilm_path, shakespeare_paragraphs


def make_batches(n_paragraphs: int, max_tokens: int, max_length: int = 256):
    tok = load_tokenizer(minilm_path())
    paras = shakespeare_paragraphs()[:n_paragraphs]
    ids = tok(paras, truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(x) for x in ids]
    batches = []
    for rows in token_budget_batches(lengths, max_tokens):
        b_ids, b_mask = pad_batch([ids[i] for i in rows])
        batches.append((torch.from_numpy(b_ids), torch.from_numpy(b_mask)))
    return batches, sum(lengths)


def run(fn, batches, dtype) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        for ids, mask in batches:
            fn(ids, mask)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paragraphs", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()

    path = minilm_path()
    ours = load_pretrained(path, head="encoder")
    hf = transformers.BertModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
    batches, n_tokens = make_batches(args.paragraphs, args.max_tokens)

    def f_ours(ids, mask):
        return ours(ids, mask)

    def f_hf(ids, mask):
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state

    # Same numbers first: the comparison is only meaningful if both compute the same thing.
    with torch.inference_mode():
        ids, mask = batches[len(batches) // 2]
        diff = (f_ours(ids, mask) - f_hf(ids, mask))[mask.bool()].abs().max().item()
    assert diff < 1e-4, f"outputs differ by {diff}"

    rows = []
    for dtype in ("fp32", "bf16"):
        run(f_ours, batches[:3], dtype), run(f_hf, batches[:3], dtype)  # warm-up
        t_ours, t_hf = [], []
        for _ in range(args.rounds):
            t_ours.append(run(f_ours, batches, dtype))
            t_hf.append(run(f_hf, batches, dtype))
        tps_ours = n_tokens / statistics.median(t_ours)
        tps_hf = n_tokens / statistics.median(t_hf)
        rows.append((dtype, tps_hf, tps_ours, tps_ours / tps_hf))

    print(f"# model_forward: {args.paragraphs} paragraphs, {n_tokens} tokens, {len(batches)} batches, "
          f"budget {args.max_tokens}, median of {args.rounds} rounds; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# max abs diff ours vs transformers (fp32): {diff:.2e}")
    print("| dtype | transformers BertModel tok/s | bert_core tok/s | ratio |")
    print("|---|---|---|---|")
    for dtype, a, b, r in rows:
        print(f"| {dtype} | {a:,.0f} | {b:,.0f} | {r:.2f} |")


if __name__ == "__main__":
    main()
