"""Embeddings as sentence-transformers makes them: its export files set the max length, pooling and
normalization, and `raybert score --task embed` with no settings gives `SentenceTransformer.encode`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert_core.checkpoint import load_pretrained, sentence_transformers_settings
from bert_core.tokenizer import load_tokenizer
from jobs.score import ResourceConfig, ScoreConfig, main
from pipelines.corpora import shakespeare_paragraphs
from pipelines.scoring.output import read_output

st = pytest.importorskip("sentence_transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local directories only: nothing from a hub


def _texts(minilm_dir) -> list[str]:
    """Real prose, short and long: some rows under 256 tokens, some well over (up to ~600)."""
    paras = shakespeare_paragraphs()[:400]
    long = [" ".join(paras[i:i + 12]) for i in range(0, 120, 12)]
    texts = paras[:30] + long
    tok = load_tokenizer(minilm_dir)
    n = [len(tok(t)["input_ids"]) for t in texts]
    assert min(n) < 64 and sum(x > 256 for x in n) >= 5 and max(n) > 400  # both sides of the limit
    return texts


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _variant(minilm_dir, tmp_path, modes: dict, normalize: bool):
    """A copy of MiniLM whose sentence-transformers files ask for other pooling/normalization."""
    d = tmp_path / "variant"
    shutil.copytree(minilm_dir, d)
    cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    cfg.update({k: False for k in cfg if k.startswith("pooling_mode_")} | modes)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    modules = json.loads((d / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith(".Normalize")]
    (d / "modules.json").write_text(json.dumps(modules))
    return d


def test_settings_read_from_minilm_files(minilm_dir):
    s = sentence_transformers_settings(minilm_dir)
    assert (s.max_length, s.pooling, s.normalize, s.pooling_error) == (256, "mean", True, None)


@pytest.mark.parametrize("modes,normalize,pooling", [
    ({"pooling_mode_cls_token": True}, False, "cls"),
    ({"pooling_mode_max_tokens": True}, True, "max"),
])
def test_model_follows_other_pooling_files(minilm_dir, tmp_path, modes, normalize, pooling):
    import torch

    d = _variant(minilm_dir, tmp_path, modes, normalize)
    texts = _texts(minilm_dir)[:30]
    model = load_pretrained(d, "embed")
    assert (model.pooling, model.normalize) == (pooling, normalize)
    batch = load_tokenizer(d)(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        ours = model(batch["input_ids"], batch["attention_mask"]).numpy()
    ref = st.SentenceTransformer(str(d), device="cpu").encode(texts, batch_size=8)
    assert np.abs(np.linalg.norm(ours, axis=1) - np.linalg.norm(ref, axis=1)).max() < 1e-3  # same normalization
    assert _cos(ours, ref).min() > 0.9999


def test_unreproducible_pooling_refused_up_front(minilm_dir, tmp_path):
    d = _variant(minilm_dir, tmp_path, {"pooling_mode_mean_sqrt_len_tokens": True}, True)
    assert "pooling_mode_mean_sqrt_len_tokens" in sentence_transformers_settings(d).pooling_error
    with pytest.raises(ValueError, match="1_Pooling/config.json asks for pooling"):
        load_pretrained(d, "embed")
    assert load_pretrained(d, "embed", pooling="mean").pooling == "mean"  # the caller's choice wins
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["one row"]}), inp)
    with pytest.raises(ValueError, match="Pass pooling"):  # preflight: before Ray or any output
        main(ScoreConfig(input=str(inp), output=str(tmp_path / "out"), model=str(d), task="embed"))
    assert not (tmp_path / "out").exists()


def test_score_embed_matches_sentence_transformers(ray_module, minilm_dir, tmp_path):
    texts = _texts(minilm_dir)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), inp)
    # No max_length, pooling or normalize: the model's files decide. fp32 pinned: dtype is not an
    # embedding setting, and `auto` may pick bf16 (its own 0.999 bound is tested elsewhere).
    res = main(ScoreConfig(input=str(inp), output=str(tmp_path / "out"), model=str(minilm_dir), task="embed",
                           dtype="fp32", resources=ResourceConfig(num_actors=1)))
    assert res.rows == len(texts)
    out = read_output(str(tmp_path / "out")).sort_by("id")
    ours = np.array(out["embedding"].to_pylist())
    truncated = out["truncated"].to_pylist()
    assert sum(truncated) >= 5 and not all(truncated)  # rows past the 256-token limit were cut to it
    ref = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, batch_size=8)
    cos = _cos(ours, ref)
    assert cos.min() > 0.9999, f"worst row {int(cos.argmin())}: cosine {cos.min():.6f}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)  # MiniLM's Normalize module


# The format the installed sentence-transformers writes (6.x): `1_Pooling/config.json` holds
# {"pooling_mode": "mean"}, and max_seq_length lives in tokenizer_config.json's model_max_length.

@pytest.fixture(scope="module")
def saved_by_st(minilm_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("st") / "minilm"
    st.SentenceTransformer(str(minilm_dir), device="cpu").save(str(d))
    return d


def test_settings_read_from_the_installed_sentence_transformers_format(saved_by_st):
    pooling = json.loads((saved_by_st / "1_Pooling" / "config.json").read_text())
    if "pooling_mode" not in pooling or "max_seq_length" in json.loads(
            (saved_by_st / "sentence_bert_config.json").read_text()):
        pytest.fail("the installed sentence-transformers writes the older format; this test checks the newer one")
    s = sentence_transformers_settings(saved_by_st)
    assert (s.max_length, s.pooling, s.normalize, s.pooling_error, s.unsupported) == (256, "mean", True, None, None)
    # Both spellings of a multi-mode pooling are refused, naming what the file asks for.
    (saved_by_st.parent / "multi").mkdir()
    (saved_by_st.parent / "multi" / "config.json").write_text(json.dumps({"pooling_mode": ["mean", "max"]}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "../multi", "type": "sentence_transformers.models.Pooling"}]
    (saved_by_st.parent / "probe").mkdir()
    (saved_by_st.parent / "probe" / "modules.json").write_text(json.dumps(modules))
    assert "['mean', 'max']" in sentence_transformers_settings(saved_by_st.parent / "probe").pooling_error


def test_score_embed_matches_a_model_saved_by_the_installed_sentence_transformers(ray_module, saved_by_st,
                                                                                     minilm_dir, tmp_path):
    texts = _texts(minilm_dir)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), inp)
    main(ScoreConfig(input=str(inp), output=str(tmp_path / "out"), model=str(saved_by_st), task="embed",
                     dtype="fp32", resources=ResourceConfig(num_actors=1)))
    out = read_output(str(tmp_path / "out")).sort_by("id")
    ours = np.array(out["embedding"].to_pylist())
    assert sum(out["truncated"].to_pylist()) >= 5  # cut at 256, as encode does, not at 512
    ref = st.SentenceTransformer(str(saved_by_st), device="cpu").encode(texts, batch_size=8)
    cos = _cos(ours, ref)
    assert cos.min() > 0.9999, f"worst row {int(cos.argmin())}: cosine {cos.min():.6f}"


def test_a_dense_module_is_refused_up_front(minilm_dir, tmp_path):
    d = _variant(minilm_dir, tmp_path, {"pooling_mode_mean_tokens": True}, True)
    modules = json.loads((d / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"Dense module \(2_Dense\)"):
        load_pretrained(d, "embed")
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["one row"]}), inp)
    with pytest.raises(ValueError, match="Dense module"):  # preflight: before Ray or any output
        main(ScoreConfig(input=str(inp), output=str(tmp_path / "out"), model=str(d), task="embed"))
    assert not (tmp_path / "out").exists()
