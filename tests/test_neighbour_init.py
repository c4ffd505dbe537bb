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
    assert len(shares) == 4 and min(shares) > 0.5, shares  # a uniform head gives each token 1/128
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
    from pipelines.training.loop import build_mlm_model
    from pipelines.training.config import ModelConfig

    torch.manual_seed(0)
    config = preset("debug", vocab_size=500)
    ids = torch.randint(5, 500, (2, 64))
    with torch.no_grad():
        fresh = build_mlm_model(ModelConfig(preset="debug", init="neighbour"), config).eval()
        assert min(share_at_offsets(fresh, ids)) > 0.2
        plain = BertForMaskedLM(config)
        save_pretrained(plain, tmp_path / "ckpt")
        loaded = build_mlm_model(ModelConfig(preset="debug", init="neighbour", init_from=str(tmp_path / "ckpt")), config)
        for k, v in plain.state_dict().items():  # init_from's weights, untouched
            assert torch.equal(loaded.state_dict()[k], v), k


def test_an_unknown_init_is_refused_naming_the_key():
    from pipelines.settings import check
    from pipelines.training.config import ModelConfig

    with pytest.raises(ValueError, match="model: init must be one of bert, neighbour, got 'sinusoid'"):
        check(ModelConfig(init="sinusoid"), "model")


def test_on_text_where_each_token_follows_from_its_neighbour_neighbour_init_learns_it_and_bert_init_has_not_yet():
    """The behaviour the init is for, in seconds: a corpus where every token is a fixed function of
    the one before it. With the same seed, steps and LR, the neighbour-init model predicts most
    masked tokens while BERT's init still guesses (its heads haven't found the neighbours yet)."""
    from bert_core.masking import Masker
    from bert_core.masking_config import MaskingConfig

    def train(init: str) -> float:
        torch.manual_seed(0)
        config = preset("debug", vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForMaskedLM(config)
        if init == "neighbour":
            neighbour_init(model)
        following = torch.randperm(30) + 20  # token t is followed by following[t - 20]
        masker = Masker(50, mask_token_id=4, special_ids=range(5), config=MaskingConfig(mlm_probability=0.15))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, eps=1e-6)
        gen = torch.Generator().manual_seed(0)

        def rows(n: int) -> torch.Tensor:
            ids = torch.empty(n, 64, dtype=torch.long)
            ids[:, 0] = torch.randint(20, 50, (n,), generator=gen)
            for i in range(1, 64):
                ids[:, i] = following[ids[:, i - 1] - 20]
            return ids

        for _ in range(100):
            mb = masker(rows(32), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(mb.input_ids, masked_index=mb.masked_index),
                                                     mb.masked_labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mb = masker(rows(64), generator=gen)
            guess = model.eval()(mb.input_ids, masked_index=mb.masked_index).argmax(-1)
            return (guess == mb.masked_labels).float().mean().item()

    neighbour, bert = train("neighbour"), train("bert")
    assert neighbour > 0.8 and bert < 0.3, (neighbour, bert)  # measured: 0.9 and 0.11


def test_a_model_neighbour_init_cannot_apply_to_is_refused_on_the_driver():
    """An odd head size or a 0-layer encoder: said before Ray starts, naming model.init, instead of
    every worker failing as it builds the model. With init_from the init doesn't apply: accepted."""
    from jobs.checks import model_config
    from pipelines.training.config import ModelConfig

    for overrides, why in (({"hidden_size": 258, "num_attention_heads": 2}, "even head size"),
                           ({"num_hidden_layers": 0}, "layer 0 is not in this 0-layer model")):
        with pytest.raises(ValueError, match=f"model.init 'neighbour': .*{why}"):
            model_config(ModelConfig(preset="mini", init="neighbour", overrides=overrides), 100)
        assert model_config(ModelConfig(preset="mini", init="bert", overrides=overrides), 100).vocab_size == 100
