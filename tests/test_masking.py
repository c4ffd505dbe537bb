"""MLM masking statistics over >= 100k real tokens, special tokens, whole words, determinism."""

from __future__ import annotations

import pytest
import torch

from bert_core import Masker, MaskingConfig, load_tokenizer
from bert_core.masking import word_ids_from_segmentation


@pytest.fixture(scope="module")
def en_batch(minilm_dir):
    from pipelines.corpora import shakespeare_paragraphs

    tok = load_tokenizer(minilm_dir)
    enc = tok(shakespeare_paragraphs()[:3500], padding=True, truncation=True, max_length=256, return_tensors="pt")
    return tok, enc


@pytest.fixture(scope="module")
def zh_batch():
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences

    tok = load_tokenizer(chinese_vocab_path())
    assert len(tok) == 21128
    sents = peoples_daily_sentences()[:2500]
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return tok, enc, sents


def _stats(tok, enc, out):
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    maskable = (~special) & mask.bool()
    chosen = out.labels != -100
    n = int(maskable.sum())
    c = int(chosen.sum())
    masked_tok = int((chosen & (out.input_ids == tok.mask_token_id)).sum())
    kept = int((chosen & (out.input_ids == ids)).sum())
    return n, c, masked_tok / c, (c - masked_tok - kept) / c, kept / c, chosen, special, mask


@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_statistics_on_real_english(en_batch, whole_word):
    tok, enc = en_batch
    masker = Masker.from_tokenizer(tok, MaskingConfig(whole_word=whole_word))
    out = masker(enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(0))
    n, c, p_mask, p_rand, p_keep, chosen, special, mask = _stats(tok, enc, out)
    assert n >= 100_000
    assert abs(c / n - 0.15) < 0.005
    assert abs(p_mask - 0.8) < 0.015 and abs(p_rand - 0.1) < 0.015
    # "random" replacements that happen to draw the original token count as kept; that is ~1/V.
    assert abs(p_keep - 0.1) < 0.015
    assert not (chosen & special).any(), "a special token was masked"
    assert not (chosen & ~mask.bool()).any(), "padding was masked"
    # masked_index / masked_labels agree with labels, in row-major order
    assert torch.equal(out.masked_index, torch.nonzero(chosen.flatten()).flatten())
    assert torch.equal(out.masked_labels, enc["input_ids"].flatten()[out.masked_index])
    # replacements never introduce special tokens other than [MASK]
    introduced = out.input_ids[chosen]
    others = torch.tensor([i for i in tok.all_special_ids if i != tok.mask_token_id])
    assert not torch.isin(introduced, others).any()


def test_whole_word_masking_never_splits_a_word(en_batch):
    tok, enc = en_batch
    out = Masker.from_tokenizer(tok, MaskingConfig(whole_word=True))(
        enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(1))
    chosen = out.labels != -100
    n_words_checked = 0
    for row in range(enc["input_ids"].shape[0]):
        words: dict[int, list[bool]] = {}
        for pos, w in enumerate(enc.word_ids(row)):
            if w is not None:
                words.setdefault(w, []).append(bool(chosen[row, pos]))
        for flags in words.values():
            if len(flags) > 1:
                n_words_checked += 1
                assert all(flags) or not any(flags), "a multi-piece word was partly masked"
    assert n_words_checked > 1000  # the check is meaningful: many multi-piece words were seen


def test_chinese_characters_are_masked_as_words(zh_batch):
    tok, enc, _ = zh_batch
    masker = Masker.from_tokenizer(tok, MaskingConfig(whole_word=True))
    out = masker(enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(2))
    n, c, p_mask, p_rand, p_keep, chosen, special, mask = _stats(tok, enc, out)
    assert n >= 100_000
    assert abs(c / n - 0.15) < 0.005
    assert not (chosen & special).any()
    # BERT's tokenizer gives every CJK character its own word: each word is one token, and word
    # ids from WordPiece continuations agree with the tokenizer's own word ids.
    maskable = (~special) & mask.bool()
    wid = masker.word_ids(enc["input_ids"], maskable)
    cjk_tokens = 0
    for row in range(200):
        tokens = tok.convert_ids_to_tokens(enc["input_ids"][row])
        ref = enc.word_ids(row)
        for pos in torch.nonzero(maskable[row]).flatten().tolist():
            if "\u4e00" <= tokens[pos] <= "\u9fff":  # a CJK character piece
                cjk_tokens += 1
                same_word = [p for p in range(len(ref)) if ref[p] == ref[pos]]
                assert same_word == [pos], "a CJK character shares its word with another token"
                assert int((wid[row] == wid[row, pos]).sum()) == 1
    assert cjk_tokens > 5000


def test_chinese_segmentation_groups_characters(zh_batch):
    from pipelines.corpora import peoples_daily_sentences

    tok, _, _ = zh_batch
    segmented = peoples_daily_sentences(segmented=True)[:400]
    texts = ["".join(ws) for ws in segmented]
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_offsets_mapping=True,
              return_tensors="pt")
    word_ids = torch.tensor([word_ids_from_segmentation(enc["offset_mapping"][i].tolist(), segmented[i])
                             for i in range(len(texts))])
    masker = Masker.from_tokenizer(tok, MaskingConfig(whole_word=True))
    out = masker(enc["input_ids"], enc["attention_mask"], word_ids=word_ids,
                 generator=torch.Generator().manual_seed(3))
    chosen = out.labels != -100
    # [UNK] and the other special tokens are never masked, so a word is judged by its other pieces.
    maskable = ~torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    multi = 0
    for i in range(len(texts)):
        for w in set(word_ids[i].tolist()) - {-1}:
            flags = chosen[i][(word_ids[i] == w) & maskable[i]]
            if len(flags) > 1:
                multi += 1
                assert bool(flags.all()) or not bool(flags.any())
    assert multi > 1000


def test_masking_is_deterministic_given_a_seed(en_batch):
    tok, enc = en_batch
    masker = Masker.from_tokenizer(tok)
    a = masker(enc["input_ids"][:64], enc["attention_mask"][:64], generator=torch.Generator().manual_seed(5))
    b = masker(enc["input_ids"][:64], enc["attention_mask"][:64], generator=torch.Generator().manual_seed(5))
    c = masker(enc["input_ids"][:64], enc["attention_mask"][:64], generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_configurable_rates(en_batch):
    tok, enc = en_batch
    cfg = MaskingConfig(mlm_probability=0.3, mask_replace_prob=1.0, random_replace_prob=0.0)
    out = Masker.from_tokenizer(tok, cfg)(enc["input_ids"], enc["attention_mask"],
                                          generator=torch.Generator().manual_seed(0))
    n, c, p_mask, _, _, *_ = _stats(tok, enc, out)
    assert abs(c / n - 0.3) < 0.005 and p_mask == 1.0


def test_bad_masking_config_is_rejected():
    with pytest.raises(ValueError):
        MaskingConfig(mlm_probability=0.0)
    with pytest.raises(ValueError):
        MaskingConfig(mask_replace_prob=0.9, random_replace_prob=0.2)
