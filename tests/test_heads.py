"""The head container and the HF state-dict adapter, without Ray: a multi-task head computes
exactly what its single-head model computes, the classifier dropout has one source, the on-disk
key layout of every head kind is pinned (files written before must keep loading), and older HF
key spellings load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bert_core.checkpoint import load_multitask, load_pretrained, save_pretrained
from bert_core.model import (BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification,
                             BertMultiTask, TaskHead, build_model, preset)

SENT = {0: "neg", 1: "pos"}
NER = {0: "O", 1: "B-PER", 2: "I-PER"}
MLM_KEYS = ["predictions.bias", "predictions.transform.LayerNorm.bias", "predictions.transform.LayerNorm.weight",
            "predictions.transform.dense.bias", "predictions.transform.dense.weight"]
LINEAR_KEYS = ["bias", "weight"]


def _cfg(**kw):
    return preset("debug", vocab_size=120, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 9), generator=g)  # (B, T)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_multitask_heads_compute_what_single_head_models_compute():
    torch.manual_seed(0)
    multi = BertMultiTask(_cfg(), [TaskHead("sentiment", "classify", SENT), TaskHead("ner", "tag", NER),
                                   TaskHead("mlm", "mlm")]).eval()
    ids, mask = _batch()
    singles = {"sentiment": (BertForSequenceClassification, "classifier", SENT),
               "ner": (BertForTokenClassification, "classifier", NER), "mlm": (BertForMaskedLM, "cls", None)}
    for task, (cls, attr, labels) in singles.items():
        single = cls(_cfg(id2label=labels)).eval()
        head = getattr(single, attr)
        assert type(head) is type(multi.heads[task])
        single.bert.load_state_dict(multi.bert.state_dict(), strict=single.bert.pooler is not None)
        head.load_state_dict(multi.heads[task].state_dict())
        single.tie_weights()
        with torch.no_grad():
            torch.testing.assert_close(single(ids, mask), multi(task, ids, mask), rtol=0, atol=0)
    masked_index = torch.nonzero(mask.flatten()).flatten()[::2]  # (M,)
    with torch.no_grad():
        full = multi("mlm", ids, mask).reshape(-1, 120)  # (B*T, V)
        torch.testing.assert_close(multi("mlm", ids, mask, masked_index=masked_index), full[masked_index])
    assert multi.heads["mlm"].predictions.decoder.weight is multi.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("classifier_dropout,want", [(None, 0.2), (0.4, 0.4)])
def test_classifier_dropout_follows_hf_in_every_model(classifier_dropout, want):
    cfg = preset("debug", vocab_size=50, hidden_dropout_prob=0.2, classifier_dropout=classifier_dropout,
                 id2label=SENT)
    multi = BertMultiTask(cfg, [TaskHead("a", "classify", SENT), TaskHead("b", "tag", NER)])
    got = [build_model(cfg, "classify").classifier.dropout.p, build_model(cfg, "tag").classifier.dropout.p,
           multi.heads["a"].dropout.p, multi.heads["b"].dropout.p]
    assert got == [want] * 4


def _file_heads(path) -> tuple[str, list[str]]:
    """(encoder spelling, sorted head keys) of a saved checkpoint."""
    keys = list(load_file(str(path / "model.safetensors")))
    encoder = [k for k in keys if k.startswith(("bert.", "embeddings.", "encoder.", "pooler."))]
    spelling = {k.startswith("bert.") for k in encoder}
    assert len(spelling) == 1 and any(k.endswith("word_embeddings.weight") for k in encoder)
    return ("bert." if spelling.pop() else ""), sorted(set(keys) - set(encoder))


def test_file_layout_of_every_head_kind_is_pinned(tmp_path):
    torch.manual_seed(0)
    multi = BertMultiTask(_cfg(), [TaskHead("mlm", "mlm"), TaskHead("sentiment", "classify", SENT),
                                   TaskHead("ner", "tag", NER), TaskHead("aux", "mlm")])
    cases = {
        "encoder": (build_model(_cfg(), "encoder"), "", []),
        "embed": (build_model(_cfg(), "embed"), "", []),
        "mlm": (build_model(_cfg(), "mlm"), "bert.", ["cls." + k for k in MLM_KEYS]),
        "tag": (build_model(_cfg(id2label=NER), "tag"), "bert.", ["classifier." + k for k in LINEAR_KEYS]),
        "multi": (multi, "bert.", sorted(["cls." + k for k in MLM_KEYS] + ["classifier." + k for k in LINEAR_KEYS]
                                         + ["raybert_heads.ner." + k for k in LINEAR_KEYS]
                                         + ["raybert_heads.aux." + k for k in MLM_KEYS])),
    }
    for name, (model, encoder, heads) in cases.items():
        save_pretrained(model, tmp_path / name)
        assert _file_heads(tmp_path / name) == (encoder, heads), name
    cfg = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["id2label"] == {"0": "neg", "1": "pos"}
    assert cfg["raybert"] == {"head": "classify", "primary": "sentiment", "tasks": [
        {"name": "mlm", "kind": "mlm", "prefix": "cls.", "id2label": None},
        {"name": "sentiment", "kind": "classify", "prefix": "classifier.", "id2label": {"0": "neg", "1": "pos"}},
        {"name": "ner", "kind": "tag", "prefix": "raybert_heads.ner.", "id2label": {"0": "O", "1": "B-PER", "2": "I-PER"}},
        {"name": "aux", "kind": "mlm", "prefix": "raybert_heads.aux.", "id2label": None}]}
    back = load_multitask(tmp_path / "multi")
    want = multi.state_dict()
    assert back.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    assert back.heads["aux"].predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight


def test_older_hf_spellings_load_and_unmodelled_keys_are_skipped(tmp_path):
    torch.manual_seed(0)
    ref = build_model(_cfg(), "mlm").eval()
    save_pretrained(ref, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in sd.items()}
    old["cls.predictions.decoder.bias"] = old.pop("cls.predictions.bias")  # the alias older files carry
    old["cls.predictions.decoder.weight"] = torch.zeros(120, 64)  # tied: must not overwrite the embeddings
    old["cls.seq_relationship.weight"] = torch.zeros(2, 64)  # BertForPreTraining's NSP head
    old["bert.embeddings.position_ids"] = torch.arange(512)[None]  # a buffer
    save_file(old, str(tmp_path / "model.safetensors"))
    back = load_pretrained(tmp_path)
    assert type(back) is BertForMaskedLM
    want = ref.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), ref(ids, mask), rtol=0, atol=0)
