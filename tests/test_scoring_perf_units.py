"""Units behind scoring's speed work, without Ray: padding to a multiple of 8 (the GPU shape
policy, run here on CPU), the tokenizer loaded without transformers, `dtype auto`, and reduced
precision that stores Linear weights in bf16. The GPU code path is the same code with
`device="cuda"`; on CPU it runs with pinning off."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

import pipelines.scoring.tokenize as tokenize
from bert_core.padding import pad_batch, token_budget_batches
from bert_core.tokenizer import load_tokenizer
from pipelines.corpora import shakespeare_paragraphs
from pipelines.scoring.predictors import DTYPE_METADATA, Predictor, resolve_dtype
from pipelines.scoring.tokenize import tokenize_batch

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world", "A", "",
         "Héllo WORLD café naïve 中文", "Another somewhat longer sentence about token budgets, " * 5]


def _tok(model, texts):
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    return tokenize_batch(table, tokenizer_path=str(model), max_length=128)


def test_pad_batch_rounds_up_to_a_multiple_and_matches_a_loop():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, 100, size=int(n)) for n in rng.integers(0, 30, size=17)]
    ids, mask = pad_batch(seqs, pad_id=1, multiple=8)
    T = ids.shape[1]
    assert T % 8 == 0 and T - 8 < max(len(s) for s in seqs) <= T
    for row, m, s in zip(ids, mask, seqs):
        assert row[:len(s)].tolist() == s.tolist() and (row[len(s):] == 1).all()
        assert m.sum() == len(s) and m[:len(s)].all()


def test_token_budget_counts_the_rounded_length():
    lengths = np.array([9, 3, 17, 1, 30, 8, 8, 2] * 20)
    for b in token_budget_batches(lengths, max_tokens=128, multiple=8):
        T = -(-int(lengths[b].max()) // 8) * 8
        assert len(b) == 1 or len(b) * T <= 128
    assert sorted(np.concatenate(token_budget_batches(lengths, 128, multiple=8)).tolist()) == list(range(160))


def test_encoder_without_transformers_gives_the_same_ids(minilm_dir):
    from tokenizers import Tokenizer

    tokenize.encoder.cache_clear()
    enc = tokenize.encoder(str(minilm_dir), 128)
    hf = load_tokenizer(minilm_dir)
    texts = TEXTS + shakespeare_paragraphs()[:300]
    ref = hf(texts, truncation=True, max_length=128)["input_ids"]
    assert [e.ids for e in enc.encode_batch(texts)] == ref
    assert isinstance(enc, Tokenizer)


def test_gpu_shape_policy_on_cpu_gives_the_same_embeddings(minilm_dir):
    """pad_multiple=8 (the GPU default) pads every batch to a multiple of 8, keeps each batch
    within the budget counting that padding, and changes no embedding."""
    batch = _tok(minilm_dir, TEXTS * 4 + [None])
    ref = Predictor(str(minilm_dir), "embed", max_tokens=256, dtype="fp32")(batch)
    p = Predictor(str(minilm_dir), "embed", max_tokens=256, dtype="fp32", pad_multiple=8)
    shapes = []
    real = p.model.forward
    p.model.forward = lambda ids, mask=None, tt=None: (shapes.append(tuple(ids.shape)), real(ids, mask, tt))[1]
    out = p(batch)
    assert shapes and all(T % 8 == 0 and (B == 1 or B * T <= 256) for B, T in shapes)
    a = np.array(ref["embedding"].to_pylist()[:-1], dtype=np.float32)
    b = np.array(out["embedding"].to_pylist()[:-1], dtype=np.float32)
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert out["embedding"].to_pylist()[-1] is None and out.schema == ref.schema


def test_dtype_auto_follows_the_cpu_probe_once_per_model_shape(minilm_dir, monkeypatch, tmp_path):
    """On a CPU without AMX, `auto` is the probe's answer, measured once per model shape and kept
    (pipelines/scoring/precision.py); a lone Predictor decides the same way."""
    import pipelines.scoring.precision as precision

    speed = precision.cpu_bf16_speedup(64, 256)
    assert speed > 0  # the real probe runs and gives a ratio
    monkeypatch.setenv("RAYBERT_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_DECIDED", {})
    monkeypatch.setattr(precision, "this_cpu", lambda: precision.Cpu("CPU without AMX", frozenset()))
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda *a: 1.0)
    assert resolve_dtype("auto", "cpu", 384) == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda *a: 2.0)
    assert resolve_dtype("auto", "cpu", 384) == "fp32"  # decided for this shape: kept
    assert resolve_dtype("auto", "cpu", 64) == "bf16"  # another shape: measured
    p = Predictor(str(minilm_dir), "embed", dtype="auto")  # MiniLM: hidden 384
    assert p.dtype == "fp32" and p.autocast_dtype is None
    out = p(_tok(minilm_dir, TEXTS))
    assert out.schema.metadata[DTYPE_METADATA.encode()] == b"fp32"
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_dtype("fp16", "cpu")


def test_bf16_stores_linear_weights_in_bf16_with_autocast_numbers(minilm_dir):
    """Linear weights are cast once; LayerNorm and embeddings stay fp32; the embeddings equal
    those of plain bf16 autocast over the fp32 model, and stay close to fp32."""
    from bert_core.checkpoint import load_pretrained

    batch = _tok(minilm_dir, TEXTS)
    p = Predictor(str(minilm_dir), "embed", dtype="bf16")
    assert p.dtype == "bf16"
    kinds = {type(m).__name__: m.weight.dtype for m in p.model.modules() if hasattr(m, "weight")}
    assert kinds["Linear"] == torch.bfloat16
    assert kinds["LayerNorm"] == torch.float32 and kinds["Embedding"] == torch.float32
    got = np.array(p(batch)["embedding"].to_pylist(), dtype=np.float32)
    ref_model = load_pretrained(str(minilm_dir), "embed").eval()
    enc = load_tokenizer(minilm_dir)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for text, e in zip(TEXTS, got):
            x = enc(text, truncation=True, max_length=128, return_tensors="pt")
            r = ref_model(x["input_ids"], x["attention_mask"])[0].float().numpy()
            assert float(np.dot(r, e) / np.linalg.norm(r) / np.linalg.norm(e)) > 0.9999
    fp32 = np.array(Predictor(str(minilm_dir), "embed", dtype="fp32")(batch)["embedding"].to_pylist())
    cos = (got * fp32).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() >= 0.999


def test_mlm_decoder_tied_to_embeddings_stays_fp32(tmp_path, minilm_dir):
    from bert_core.checkpoint import save_pretrained
    from bert_core.model import build_model, preset

    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    path = tmp_path / "tiny-mlm"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok)), "mlm"), path, tokenizer=tok)
    p = Predictor(str(path), "fill-mask", dtype="bf16", top_k=3)
    emb = p.model.bert.embeddings.word_embeddings.weight
    assert emb.dtype == torch.float32 and p.model.cls.predictions.decoder.weight is emb
    out = p(_tok(path, ["Paris is the [MASK] of [MASK].", "none"])).to_pylist()
    assert [len(m["token_ids"]) for m in out[0]["fill_mask"]] == [3, 3] and out[1]["fill_mask"] == []
