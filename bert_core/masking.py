"""Dynamic MLM masking, token-level or whole-word.

Contract (`Masker.__call__`):
- Each maskable token (not special, not padding) is chosen with probability `mlm_probability`
  (15%); in whole-word mode every token of a chosen word is chosen together, and a word is chosen
  with that same probability, so the expected token share is unchanged.
- A chosen token becomes [MASK] with `mask_replace_prob` (80%), a random non-special token with
  `random_replace_prob` (10%), and stays itself otherwise (10%).
- `labels` holds the original id at chosen positions and -100 elsewhere (the HF convention);
  `masked_index` (M,) lists the chosen positions as flat indices into B*T, in row-major order,
  with `masked_labels` (M,) their original ids. `BertForMaskedLM(masked_index=...)` consumes them.
- Given the same `generator` seed, the result is identical.

Words: pass `word_ids` (B, T), -1 for tokens that belong to no word. Without them, whole-word
mode groups a token with the previous one when it is a WordPiece continuation (`##...`). BERT's
tokenizer splits every CJK character into its own word, so a Chinese character is a word unless
a segmentation says otherwise (`word_ids_from_segmentation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .masking_config import MaskingConfig


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # (B, T) ids after replacement, the model's input
    labels: torch.Tensor  # (B, T) original id where chosen, -100 elsewhere
    masked_index: torch.Tensor  # (M,) flat positions into B*T of the chosen tokens
    masked_labels: torch.Tensor  # (M,) original ids at masked_index


class Masker:
    def __init__(self, vocab_size: int, mask_token_id: int, special_ids: Sequence[int],
                 config: Optional[MaskingConfig] = None, continuation_ids: Sequence[int] = ()):
        self.config = config or MaskingConfig()
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.is_special = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
        self.is_special[list(special_ids)] = True
        self.is_continuation = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
        if len(continuation_ids):
            self.is_continuation[list(continuation_ids)] = True
        # Random replacements are drawn from ordinary tokens only, never [CLS]/[SEP]/[PAD]/...
        self.random_candidates = torch.nonzero(~self.is_special).flatten()  # (V - n_special,)

    @classmethod
    def from_tokenizer(cls, tokenizer, config: Optional[MaskingConfig] = None) -> "Masker":
        vocab = tokenizer.get_vocab()
        continuation = [i for tok, i in vocab.items() if tok.startswith("##")]
        return cls(len(tokenizer), tokenizer.mask_token_id, tokenizer.all_special_ids, config, continuation)

    def word_ids(self, input_ids: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """(B, T) word index per token from WordPiece continuations; -1 where not maskable."""
        starts = maskable & ~self.is_continuation[input_ids]  # (B, T)
        # A continuation right after a special token (a packed row cut mid-word) starts a word.
        prev_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)  # (B, T)
        starts |= maskable & ~prev_maskable
        wid = torch.cumsum(starts.long(), dim=1) - 1  # (B, T)
        return torch.where(maskable, wid, torch.full_like(wid, -1))

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 word_ids: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> MaskedBatch:
        cfg = self.config
        input_ids = input_ids.long()
        B, T = input_ids.shape
        maskable = ~self.is_special[input_ids]  # (B, T)
        if attention_mask is not None:
            maskable &= attention_mask.bool()

        if cfg.whole_word or word_ids is not None:
            wid = self.word_ids(input_ids, maskable) if word_ids is None else word_ids.long()
            maskable &= wid >= 0
            # One uniform draw per (row, word); a token is chosen iff its word's draw is < p.
            draws = torch.rand(B, T, generator=generator)  # (B, T): slot w of row b is word w
            word_draw = torch.gather(draws, 1, wid.clamp(min=0, max=T - 1))  # (B, T)
            chosen = maskable & (word_draw < cfg.mlm_probability)
        else:
            chosen = maskable & (torch.rand(B, T, generator=generator) < cfg.mlm_probability)

        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))  # (B, T)
        action = torch.rand(B, T, generator=generator)  # (B, T)
        to_mask = chosen & (action < cfg.mask_replace_prob)
        to_random = chosen & (action >= cfg.mask_replace_prob) & \
            (action < cfg.mask_replace_prob + cfg.random_replace_prob)
        pick = torch.randint(len(self.random_candidates), (B, T), generator=generator)
        random_ids = self.random_candidates[pick]  # (B, T)

        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        out = torch.where(to_random, random_ids, out)  # (B, T)
        masked_index = torch.nonzero(chosen.flatten()).flatten()  # (M,)
        return MaskedBatch(out, labels, masked_index, input_ids.flatten()[masked_index])


def word_ids_from_segmentation(offsets: Sequence[tuple[int, int]], words: Sequence[str]) -> list[int]:
    """Word index per token given a segmentation of the text into `words` (concatenated, they
    are the text). `offsets` are the tokenizer's (start, end) character offsets; special tokens
    have (0, 0) and get -1. Use for Chinese whole-word masking with a word segmenter's output."""
    ends, pos = [], 0
    for w in words:
        pos += len(w)
        ends.append(pos)
    out, w = [], 0
    for start, end in offsets:
        if end <= start:
            out.append(-1)
            continue
        while w < len(ends) and ends[w] <= start:
            w += 1
        out.append(w)
    return out
