"""The scoring steps as plain Python, without Ray: tokenize_batch and Predictor on hand-built
batches. Covers bad rows, truncation, the token-budget batcher (no batch over budget, input order
restored), every task against a direct bert_core forward, dtype rules and stable ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from bert_core.checkpoint import load_pretrained, save_pretrained
from bert_core.model import build_model, preset
from bert_core.tokenizer import load_tokenizer
from pipelines.scoring.predictors import Predictor
from pipelines.scoring.tokenize import tokenize_batch

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world", "A", "",
         "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune", "Paris is the [MASK] of France.",
         "short one", "Another somewhat longer sentence about Ray Data and token budgets, " * 3]


def _tiny_ckpt(tmp_path, minilm_dir, head, id2label=None):
    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    cfg = preset("debug", vocab_size=len(tok), id2label=id2label)
    path = tmp_path / f"tiny-{head}"
    save_pretrained(build_model(cfg, head), path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, minilm_dir):
    tmp = tmp_path_factory.mktemp("ckpt")
    return {
        "classify": _tiny_ckpt(tmp, minilm_dir, "classify", {0: "neg", 1: "neutral", 2: "pos"}),
        "tag": _tiny_ckpt(tmp, minilm_dir, "tag", {0: "O", 1: "B-X", 2: "I-X"}),
        "fill-mask": _tiny_ckpt(tmp, minilm_dir, "mlm"),
    }


def _tok(model, texts, **kw):
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    return tokenize_batch(table, tokenizer_path=model,
                          max_length=kw.pop("max_length", 128), **kw)


def test_tokenize_keeps_every_row_and_flags_bad_ones(minilm_dir):
    big = "word " * 200_000  # 1 MB
    t = tokenize_batch(pa.table({"id": ["a", "b", "c", "d", "a"], "text": ["hi there", None, "", big, "x"]}),
                       tokenizer_path=str(minilm_dir), max_length=64)
    rows = t.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "a"]  # order and duplicates kept
    assert rows[0]["error"] is None and rows[0]["n_tokens"] == 4 and not rows[0]["truncated"]
    assert rows[1]["error"] == "text is null" and rows[1]["n_tokens"] == 0 and rows[1]["input_ids"] == []
    assert rows[2]["error"] is None and rows[2]["n_tokens"] == 2  # "" -> [CLS] [SEP]
    assert rows[3]["truncated"] and rows[3]["n_tokens"] == 64 and rows[3]["error"] is None
    tok = load_tokenizer(minilm_dir)
    assert rows[3]["input_ids"][0] == tok.cls_token_id and rows[3]["input_ids"][-1] == tok.sep_token_id


def test_tokenize_non_string_and_pairs(minilm_dir):
    t = tokenize_batch(pa.table({"id": [1, 2], "text": [12, 7]}), tokenizer_path=str(minilm_dir))
    assert t["error"].to_pylist() == ["text is int, not a string"] * 2
    p = tokenize_batch(pa.table({"id": [1, 2], "text": ["a cat", "b"], "text2": ["the dog", None]}),
                       tokenizer_path=str(minilm_dir), text_pair_column="text2")
    r = p.to_pylist()
    assert r[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1] and r[1]["error"] == "text2 is null"


def test_token_budget_batches_stay_under_budget_and_restore_order(minilm_dir):
    model = str(minilm_dir)
    texts = [TEXTS[i % len(TEXTS)] * (1 + i % 3) for i in range(24)]
    batch = _tok(model, texts)
    p = Predictor(model, "embed", max_tokens=200)
    seen = []
    real = p._forward

    def spy(seqs, types):
        seen.append((len(seqs), max(len(s) for s in seqs)))
        return real(seqs, types)

    p._forward = spy
    out = p(batch)
    assert sum(b for b, _ in seen) == 24 and len(seen) > 1
    assert all(b * t <= 200 for b, t in seen)  # no batch over budget (no row is longer than 200)
    emb = np.array(out["embedding"].to_pylist(), dtype=np.float32)
    # Order restored: each row equals its own, unbatched forward.
    single = Predictor(model, "embed", max_tokens=10_000, max_batch_rows=1)
    ref = np.array(single(batch)["embedding"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(emb, ref, atol=2e-5)
    assert out["id"].to_pylist() == list(range(24))


def test_over_budget_row_gets_its_own_batch(minilm_dir):
    model = str(minilm_dir)
    batch = _tok(model, ["word " * 100, "hi", "there you"], max_length=128)
    p = Predictor(model, "embed", max_tokens=16)
    seen = []
    real = p._forward
    p._forward = lambda s, t: (seen.append([len(x) for x in s]), real(s, t))[1]
    out = p(batch)
    assert seen[0] == [102] and all(len(b) * max(b) <= 16 for b in seen[1:])
    assert out["embedding"].null_count == 0


def test_embed_matches_bert_core_reference(minilm_dir):
    model = str(minilm_dir)
    out = Predictor(model, "embed", max_tokens=512)(_tok(model, TEXTS + [None]))
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    emb = out["embedding"].to_pylist()
    assert emb[-1] is None and out["error"].to_pylist()[-1] == "text is null"
    ref_model = load_pretrained(model, "embed")
    tok = load_tokenizer(model)
    with torch.inference_mode():
        for text, e in zip(TEXTS, emb):
            enc = tok(text, truncation=True, max_length=128, return_tensors="pt")
            r = ref_model(enc["input_ids"], enc["attention_mask"])[0].numpy()  # (H,)
            cos = float(np.dot(r, e) / np.linalg.norm(r) / np.linalg.norm(e))
            assert cos > 1 - 1e-4


def test_classify_matches_direct_forward(ckpts):
    model = ckpts["classify"]
    out = Predictor(model, "classify")(_tok(model, TEXTS))
    ref = load_pretrained(model, "classify")
    tok = load_tokenizer(model)
    for text, row in zip(TEXTS, out.to_pylist()):
        enc = tok(text, return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(ref(enc["input_ids"], enc["attention_mask"]), -1)[0].numpy()
        np.testing.assert_allclose(row["probs"], probs, atol=1e-5)
        assert row["label"] == ["neg", "neutral", "pos"][int(probs.argmax())]
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_tag_gives_per_word_labels_with_char_offsets(ckpts):
    model = ckpts["tag"]
    texts = ["Ray Data scores Parquet quickly", "unbelievably tokenized words"]
    out = Predictor(model, "tag")(_tok(model, texts, with_offsets=True))
    ref = load_pretrained(model, "tag")
    tok = load_tokenizer(model)
    n_entities = 0
    for text, row in zip(texts, out.to_pylist()):
        enc = tok(text, return_tensors="pt")
        with torch.inference_mode():
            labels = ref(enc["input_ids"]).argmax(-1)[0].tolist()  # (T,)
        words = enc.word_ids(0)
        first = {}
        for t, w in enumerate(words):
            if w is not None and w not in first:
                first[w] = t
        expected = []
        for w, t in first.items():
            lab = ["O", "B-X", "I-X"][labels[t]]
            s, e = enc.word_to_chars(0, w)
            if lab != "O":
                expected.append((text[s:e], lab, s, e))
        got = [(x["word"], x["label"], x["start"], x["end"]) for x in row["entities"]]
        assert got == expected
        for word, _, s, e in got:
            assert text[s:e] == word and " " not in word
        n_entities += len(got)
    assert n_entities > 0  # the random tiny head does emit non-O labels, so this is a real check


def test_fill_mask_top_k_per_mask(ckpts):
    model = ckpts["fill-mask"]
    texts = ["Paris is the [MASK] of [MASK].", "no mask here"]
    out = Predictor(model, "fill-mask", top_k=3)(_tok(model, texts)).to_pylist()
    ref = load_pretrained(model, "mlm")
    tok = load_tokenizer(model)
    enc = tok(texts[0], return_tensors="pt")
    with torch.inference_mode():
        probs = torch.softmax(ref(enc["input_ids"]), -1)[0]  # (T, V)
    positions = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
    assert [m["position"] for m in out[0]["fill_mask"]] == positions and len(positions) == 2
    for m, pos in zip(out[0]["fill_mask"], positions):
        top = torch.topk(probs[pos], 3)
        assert m["token_ids"] == top.indices.tolist()
        np.testing.assert_allclose(m["scores"], top.values.numpy(), atol=1e-5)
        assert m["tokens"] == tok.convert_ids_to_tokens(top.indices.tolist())
    assert out[1]["fill_mask"] == [] and out[1]["error"] is None


def test_all_error_and_empty_blocks_keep_the_schema(minilm_dir, ckpts):
    model = ckpts["classify"]
    p = Predictor(model, "classify")
    bad = p(_tok(model, [None, None]))
    empty = p(_tok(model, []))
    good = p(_tok(model, ["fine"]))
    assert bad.schema == good.schema == empty.schema and empty.num_rows == 0
    assert bad["label"].null_count == 2


def test_dtypes(minilm_dir):
    model = str(minilm_dir)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Predictor(model, "embed", dtype="fp16")
    batch = _tok(model, TEXTS)
    a = np.array(Predictor(model, "embed")(batch)["embedding"].to_pylist())
    b = np.array(Predictor(model, "embed", dtype="bf16")(batch)["embedding"].to_pylist())
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_fallback_ids_are_file_and_row_hash():
    t = tokenize_batch(pa.table({"text": ["a", "b", "c"],
                                 "path": ["/d/sub/f.parquet", "/d/sub/f.parquet", "/e/g.parquet"],
                                 "row_hash": pa.array([7, 2**64 - 1, 7], pa.uint64())}),
                       tokenizer_path=str(_minilm()), fallback_ids={"roots": {"/d/sub/f.parquet": "/d"}})
    assert t["id"].to_pylist() == ["sub/f.parquet#0000000000000007", "sub/f.parquet#ffffffffffffffff",
                                   "g.parquet#0000000000000007"]
    assert t["row_hash"].to_pylist() == [7, 2**64 - 1, 7]


def _minilm():
    from pipelines.corpora import minilm_path

    return minilm_path()


@pytest.mark.parametrize("task", ["embed", "tag"])
def test_predictor_that_tokenizes_equals_the_two_steps(minilm_dir, ckpts, task):
    # On CPU the pipeline hands predictor actors untokenized blocks (Predictor(tokenize=...)). The
    # output must be the same table as tokenize_batch followed by a Predictor, bad rows included.
    model = str(minilm_dir) if task == "embed" else ckpts["tag"]
    table = pa.table({"id": pa.array(range(len(TEXTS) + 1), pa.int64()), "text": pa.array(TEXTS + [None], pa.string())})
    kwargs = dict(tokenizer_path=model, max_length=32, with_offsets=task == "tag")
    two_steps = Predictor(model, task)(tokenize_batch(table, **kwargs))
    fused = Predictor(model, task, tokenize=kwargs)(table)
    assert fused.schema == two_steps.schema and fused.num_rows == len(TEXTS) + 1
    assert fused.column("error").to_pylist()[-1] == "text is null"
    for name in fused.column_names:
        if name == "embedding":  # null for the error row
            a, b = fused[name].to_pylist(), two_steps[name].to_pylist()
            assert a[-1] is None and b[-1] is None
            np.testing.assert_allclose(np.array(a[:-1]), np.array(b[:-1]), atol=1e-6)
        else:
            assert fused[name].to_pylist() == two_steps[name].to_pylist(), name
