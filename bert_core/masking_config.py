"""`MaskingConfig`: what MLM masking (bert_core/masking.py) chooses and how. Torch-free, so the
training configs that hold it load without torch (the CLI's `--help`, the driver's config checks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MaskingConfig:
    mlm_probability: float = 0.15  # share of maskable tokens chosen for prediction
    mask_replace_prob: float = 0.8  # of chosen tokens: replaced by [MASK]
    random_replace_prob: float = 0.1  # of chosen tokens: replaced by a random token (rest kept)
    whole_word: bool = False  # choose whole words rather than single WordPiece tokens

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0 or \
                self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError("mask_replace_prob and random_replace_prob must be >= 0 and sum to <= 1")
