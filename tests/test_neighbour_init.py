"""Neighbour init (bert_core/init.py): first-layer heads that attend to fixed offsets from step 0,
on an unchanged BERT that transformers loads, applied by pretraining only to fresh weights."""

from __future__ import annotations

import math

import pytest
import torch

from bert_core.init import NEIGHBOUR_OFFSETS, neighbour_init
from bert_core.model import BertForMaskedLM, preset


def layer0_attention(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, T) attention probabilities of the first layer."""
    x = model.bert.embeddings(ids, None)  # (B, T, H)
    att = model.bert.encoder.layer[0].attention.self
    B, T, H = x.shape
    nh, hd = att.num_heads, att.head_dim
    q = att.query(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    k = att.key(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)


def share_at_offsets(model, ids: torch.Tensor) -> list[float]:
    """Per head, the mean attention on the token NEIGHBOUR_OFFSETS[h] places away."""
    a = layer0_attention(model, ids)
    T = ids.shape[1]
    shares = []
    for h in range(a.shape[1]):
        o = NEIGHBOUR_OFFSETS[h % len(NEIGHBOUR_OFFSETS)]
        i = torch.arange(max(0, -o), min(T, T - o))
        shares.append(a[:, h, i, i + o].mean().item())
    return shares


@torch.no_grad()
def test_each_first_layer_head_starts_on_its_neighbour_and_bert_init_does_not():
    torch.manual_seed(0)
    config = preset("mini", vocab_size=2000)
    ids = torch.randint(100, 2000, (4, 128))
    bert = BertForMaskedLM(config).eval()
    assert max(share_at_offsets(bert, ids)) < 0.05  # BERT's init: about uniform over 128 tokens
    neighbour_init(bert)
    shares = share_at_offsets(bert, ids)
    assert len(shares) == 4 and min(shares) > 0.8, shares
    # Only the position table and the first layer's query / key changed.
    fresh = BertForMaskedLM(config).state_dict()
    changed = {k for k, v in bert.state_dict().items() if not torch.equal(v, fresh[k])}
    assert {"bert.embeddings.position_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.self.key.weight"} <= changed


@torch.no_grad()
def test_neighbour_init_exports_a_bert_transformers_loads_with_the_same_outputs(tmp_path):
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    from bert_core.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = BertForMaskedLM(preset("debug", vocab_size=500)).eval()
    neighbour_init(model)
    save_pretrained(model, tmp_path / "export")
    hf = HFBertForMaskedLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(5, 500, (2, 40))
    torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    # The same init applies to transformers' own model (the benchmark's Hugging Face loop uses it),
    # with the same values: it draws nothing at random.
    hf_fresh = HFBertForMaskedLM(hf.config)
    neighbour_init(hf_fresh)
    for name in ("bert.embeddings.position_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                 "bert.encoder.layer.0.attention.self.key.weight"):
        assert torch.equal(hf_fresh.state_dict()[name], model.state_dict()[name]), name


def test_pretraining_applies_it_to_fresh_weights_only(tmp_path):
    from bert_core.checkpoint import save_pretrained
    from pipelines.train import build_mlm_model
    from pipelines.train_config import ModelConfig

    torch.manual_seed(0)
    config = preset("debug", vocab_size=500)
    ids = torch.randint(5, 500, (2, 64))
    with torch.no_grad():
        fresh = build_mlm_model(ModelConfig(preset="debug", init="neighbour"), config).eval()
        assert min(share_at_offsets(fresh, ids)) > 0.5
        plain = BertForMaskedLM(config)
        save_pretrained(plain, tmp_path / "ckpt")
        loaded = build_mlm_model(ModelConfig(preset="debug", init="neighbour", init_from=str(tmp_path / "ckpt")), config)
        for k, v in plain.state_dict().items():  # init_from's weights, untouched
            assert torch.equal(loaded.state_dict()[k], v), k


def test_an_unknown_init_is_refused_naming_the_key():
    from jobs.checks import check_config
    from pipelines.train_config import ModelConfig

    with pytest.raises(ValueError, match="init"):
        check_config(ModelConfig(init="sinusoid"))
