"""Parity with `transformers`: same weights, same outputs (fp32, 1e-5 max abs), every head."""

from __future__ import annotations

import pytest
import torch
import transformers

from bert_core import BertConfig, load_pretrained, save_pretrained
from bert_core.model import (BertForEmbedding, BertForMaskedLM, BertForSequenceClassification,
                             BertForTokenClassification, BertModel)

TOL = 1e-5

# Random tiny configs: different widths, depths, activations, label counts.
CONFIGS = [
    dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
         max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu"),
    dict(vocab_size=211, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
         max_position_embeddings=40, type_vocab_size=3, hidden_act="gelu_new", layer_norm_eps=1e-5),
    dict(vocab_size=57, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
         max_position_embeddings=32, type_vocab_size=2, hidden_act="relu"),
]


def _hf_config(d: dict, num_labels: int = 3) -> transformers.BertConfig:
    return transformers.BertConfig(**d, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                   num_labels=num_labels)


def _inputs(cfg: dict, padded: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 17
    ids = torch.randint(1, cfg["vocab_size"], (B, T), generator=g)
    tt = torch.randint(0, cfg["type_vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        for i, n in enumerate([17, 9, 3, 12]):
            mask[i, n:] = 0
            ids[i, n:] = 0
    return ids, mask, tt


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None and a.dim() >= 3:  # compare real tokens only: padded rows are undefined
        keep = mask.bool()
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


def _copy_hf_weights(hf: torch.nn.Module, ours: torch.nn.Module) -> None:
    sd = hf.state_dict()
    result = ours.load_state_dict({k: v for k, v in sd.items() if k in ours.state_dict()}, strict=False)
    assert [k for k in result.missing_keys if k != "cls.predictions.decoder.weight"] == []


def _twins(hf_cls, our_cls, hf_config: transformers.BertConfig, seed: int):
    """An HF model with random weights and our model of the same class holding those weights."""
    torch.manual_seed(seed)
    hf = hf_cls(hf_config).eval()
    ours = our_cls(BertConfig.from_dict(hf.config.to_dict())).eval()
    _copy_hf_weights(hf, ours)
    return hf, ours


PAIRS = [
    ("encoder", transformers.BertModel, BertModel),
    ("mlm", transformers.BertForMaskedLM, BertForMaskedLM),
    ("classify", transformers.BertForSequenceClassification, BertForSequenceClassification),
    ("tag", transformers.BertForTokenClassification, BertForTokenClassification),
]


@pytest.mark.parametrize("cfg_i", range(len(CONFIGS)))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("head,hf_cls,our_cls", PAIRS, ids=[p[0] for p in PAIRS])
def test_head_matches_transformers(cfg_i, padded, head, hf_cls, our_cls):
    d = CONFIGS[cfg_i]
    hf, ours = _twins(hf_cls, our_cls, _hf_config(d), seed=cfg_i)
    ids, mask, tt = _inputs(d, padded, seed=cfg_i)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        if head == "encoder":
            ref = out.last_hidden_state
            got = ours(ids, mask, tt)
            assert _max_diff(ours.pooler(got), out.pooler_output) < TOL
        else:
            ref = out.logits
            got = ours(ids, mask, tt)
    assert got.shape == ref.shape
    assert _max_diff(got, ref, mask) < TOL


def test_mlm_masked_positions_equal_full_logits():
    d = CONFIGS[0]
    hf, ours = _twins(transformers.BertForMaskedLM, BertForMaskedLM, _hf_config(d), seed=0)
    ids, mask, tt = _inputs(d, padded=True, seed=3)
    masked_index = torch.nonzero(mask.flatten()).flatten()[::7]  # real tokens, flat into B*T
    assert len(masked_index) >= 5
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits  # (B, T, V)
        got = ours(ids, mask, tt, masked_index=masked_index)  # (M, V)
    assert got.shape == (len(masked_index), d["vocab_size"])
    assert _max_diff(got, ref.reshape(-1, d["vocab_size"])[masked_index]) < TOL


def test_mlm_decoder_is_tied():
    m = BertForMaskedLM(BertConfig(**CONFIGS[0]))
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight


def test_without_token_type_ids_equals_segment_zero():
    d = CONFIGS[0]
    hf, ours = _twins(transformers.BertModel, BertModel, _hf_config(d), seed=1)
    ids, mask, _ = _inputs(d, padded=True, seed=4)
    with torch.no_grad():
        assert _max_diff(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask) < TOL


def test_real_minilm_embeddings_match_transformers(minilm_dir):
    """all-MiniLM-L6-v2, mean-pooled + normalized, 24 real sentences of mixed length, padded batch."""
    from pipelines.corpora import shakespeare_paragraphs
    from bert_core import load_tokenizer

    paras = shakespeare_paragraphs()
    sentences = [p[: 20 + 37 * i] for i, p in enumerate(paras[100:124])]  # 20 .. ~900 chars
    assert len(sentences) >= 20 and len({len(s) for s in sentences}) > 10
    tok = load_tokenizer(minilm_dir)
    batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must actually contain padding"

    ours = load_pretrained(minilm_dir, head="embed")
    hf = transformers.AutoModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        h = hf(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (24, 384)
    assert _max_diff(got, ref) < TOL


def test_embedding_head_cls_pooling_unnormalized():
    d = CONFIGS[1]
    torch.manual_seed(2)
    hf = transformers.BertModel(_hf_config(d)).eval()
    ours = BertForEmbedding(BertConfig.from_dict(hf.config.to_dict()), pooling="cls", normalize=False).eval()
    ours.bert.load_state_dict(hf.state_dict(), strict=False)
    ids, mask, tt = _inputs(d, padded=True, seed=5)
    with torch.no_grad():
        assert _max_diff(ours(ids, mask, tt), hf(input_ids=ids, attention_mask=mask,
                                                 token_type_ids=tt).last_hidden_state[:, 0]) < TOL


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

ROUND_TRIP = [
    ("encoder", transformers.AutoModel, "last_hidden_state"),
    ("mlm", transformers.BertForMaskedLM, "logits"),
    ("classify", transformers.BertForSequenceClassification, "logits"),
    ("tag", transformers.BertForTokenClassification, "logits"),
]


@pytest.mark.parametrize("head,hf_cls,field", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_our_checkpoint_loads_in_transformers(tmp_path, head, hf_cls, field):
    from bert_core.model import build_model

    cfg = BertConfig(**CONFIGS[0], id2label={0: "neg", 1: "neu", 2: "pos"})
    torch.manual_seed(7)
    ours = build_model(cfg, head).eval()
    save_pretrained(ours, tmp_path)
    hf = hf_cls.from_pretrained(str(tmp_path)).eval()
    ids, mask, tt = _inputs(CONFIGS[0], padded=True, seed=6)
    with torch.no_grad():
        ref = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=tt), field)
        got = ours(ids, mask, tt)
    assert _max_diff(got, ref, mask) < TOL
    if head in ("classify", "tag"):
        assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
        assert hf.config.label2id == {"neg": 0, "neu": 1, "pos": 2}


@pytest.mark.parametrize("head,hf_cls,field", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_transformers_checkpoint_loads_in_ours(tmp_path, head, hf_cls, field, safe):
    torch.manual_seed(8)
    hf_model_cls = transformers.BertModel if hf_cls is transformers.AutoModel else hf_cls
    hf = hf_model_cls(_hf_config(CONFIGS[1])).eval()
    hf.save_pretrained(str(tmp_path))
    if not safe:  # transformers 5 always writes safetensors; make an old-style .bin checkpoint
        from safetensors.torch import load_file

        sd = load_file(str(tmp_path / "model.safetensors"))
        (tmp_path / "model.safetensors").unlink()
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = load_pretrained(tmp_path, head=head)
    ids, mask, tt = _inputs(CONFIGS[1], padded=True, seed=9)
    with torch.no_grad():
        ref = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=tt), field)
        got = ours(ids, mask, tt)
    assert _max_diff(got, ref, mask) < TOL


def test_id2label_round_trip(tmp_path):
    from bert_core.model import build_model

    labels = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    cfg = BertConfig(**CONFIGS[0], id2label=labels)
    save_pretrained(build_model(cfg, "tag"), tmp_path)
    back = load_pretrained(tmp_path)  # head from config.json
    assert type(back).__name__ == "BertForTokenClassification"
    assert back.config.id2label == labels
    assert back.config.label2id == {v: k for k, v in labels.items()}
    assert back.classifier.out_features == 5


def test_encoder_checkpoint_into_classifier_gets_fresh_head(tmp_path, caplog):
    from bert_core.model import build_model

    cfg = BertConfig(**CONFIGS[0])
    enc = build_model(cfg, "mlm")
    save_pretrained(enc, tmp_path)
    clf = load_pretrained(tmp_path, head="classify", id2label={0: "a", 1: "b"})
    assert clf.classifier.out_features == 2
    assert "newly initialized" in caplog.text
    # the encoder weights did load
    assert torch.equal(clf.bert.embeddings.word_embeddings.weight, enc.bert.embeddings.word_embeddings.weight)


def test_missing_encoder_weights_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from bert_core.model import build_model

    save_pretrained(build_model(BertConfig(**CONFIGS[0]), "encoder"), tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["encoder.layer.0.attention.self.query.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks encoder weights"):
        load_pretrained(tmp_path, head="encoder")


def test_embed_checkpoint_keeps_pooling_choice(tmp_path):
    cfg = BertConfig(**CONFIGS[0])
    save_pretrained(BertForEmbedding(cfg, pooling="cls", normalize=False), tmp_path)
    back = load_pretrained(tmp_path, head="embed")
    assert (back.pooling, back.normalize) == ("cls", False)
    assert transformers.AutoModel.from_pretrained(str(tmp_path)) is not None


def test_gradients_match_transformers_on_padded_batch():
    """Training path (unpadded encoder, masked-only head) gives HF's gradients (dropout off)."""
    d = dict(CONFIGS[0])
    cfg = transformers.BertConfig(**d, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf, ours = _twins(transformers.BertForMaskedLM, BertForMaskedLM, cfg, seed=11)
    hf.train(), ours.train()
    ids, mask, tt = _inputs(d, padded=True, seed=12)
    labels = torch.full_like(ids, -100)
    masked_index = torch.nonzero(mask.flatten()).flatten()[::3]
    labels.view(-1)[masked_index] = ids.view(-1)[masked_index]
    hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss.backward()
    logits = ours(ids, mask, tt, masked_index=masked_index)
    torch.nn.functional.cross_entropy(logits, ids.view(-1)[masked_index]).backward()
    hf_grads = dict(hf.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        if name == "cls.predictions.decoder.weight" or "pooler" in name:
            continue
        ref = hf_grads[name].grad
        assert ref is not None and (p.grad - ref).abs().max().item() < 1e-5, name
        n += 1
    assert n > 20


def test_export_tokenizer_truncates_at_the_models_position_limit(tmp_path):
    """A tokenizer from a bare vocab.txt says model_max_length ~1e30; the export must say the
    model's limit, so `AutoTokenizer(...)(long_text, truncation=True)` + `AutoModel` just work."""
    from bert_core import load_tokenizer
    from bert_core.model import build_model
    from pipelines.corpora import chinese_vocab_path

    tok = load_tokenizer(chinese_vocab_path())
    assert tok.model_max_length > 1e20  # the trap
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    save_pretrained(build_model(cfg, "mlm").eval(), tmp_path, tokenizer=tok)
    assert tok.model_max_length > 1e20  # the caller's tokenizer is left as it was
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    batch = hf_tok("人民日报" * 500, truncation=True, return_tensors="pt")  # 2,000 characters
    assert hf_tok.model_max_length == 64 and batch["input_ids"].shape == (1, 64)
    with torch.no_grad():
        out = transformers.AutoModel.from_pretrained(str(tmp_path))(**batch).last_hidden_state
    assert out.shape == (1, 64, 32)
