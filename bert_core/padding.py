"""Padding, unpadding, packing and token-budget batching.

These helpers decide how many padded tokens the model computes, which is most of the speed
story on CPU: a batch in input order padded to its longest row wastes more compute than the
model itself spends on real tokens.

Shapes: B rows, T padded length, nnz real tokens in the batch (sum of lengths), S packed
sequence length.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (1: unchanged)."""
    return -(-n // multiple) * multiple if multiple > 1 else n


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, pad_to: Optional[int] = None,
              dtype=np.int64, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists, without a Python loop over rows.

    Returns (ids, attention_mask), both (B, T) with T = max(len) rounded up to `multiple` (or
    `pad_to`); mask 1 = token. A GPU wants T a multiple of 8: fewer distinct shapes to plan
    kernels for, and aligned tensor-core tiles.
    """
    B = len(seqs)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=B)  # (B,)
    T = round_up(int(lengths.max(initial=0)), multiple) if pad_to is None else pad_to
    lengths = np.minimum(lengths, T)
    mask = np.arange(T)[None, :] < lengths[:, None]  # (B, T) bool
    ids = np.full((B, T), pad_id, dtype=dtype)  # (B, T)
    if B and T:
        # Row-major order of the True cells is row by row, left to right: the concatenation.
        ids[mask] = np.concatenate([np.asarray(s[:n]) for s, n in zip(seqs, lengths.tolist())])
    return ids, mask.astype(dtype)


def token_budget_batches(lengths: Sequence[int] | np.ndarray, max_tokens: int,
                         max_batch_size: Optional[int] = None, multiple: int = 1) -> list[np.ndarray]:
    """Cut rows into batches whose padded size (rows x longest row) is at most `max_tokens`.

    Rows are sorted by length (longest first, a stable sort) so each batch pads little. Returns
    a list of index arrays into `lengths`; every index appears in exactly one batch. A single row
    longer than `max_tokens` gets a batch of its own (it can't be split, and must not be dropped).
    `multiple`: the padded length is the longest row rounded up to it (as `pad_batch` pads), and
    the budget counts that. Callers restore input order by scattering results back through
    these indices.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = round_up(max(int(lengths[order[start]]), 1), multiple)  # sorted: the first is longest
        rows = max(1, max_tokens // longest)
        if max_batch_size is not None:
            rows = min(rows, max_batch_size)
        batches.append(order[start:start + rows])
        start += rows
    return batches


class Unpadded(NamedTuple):
    """Where the nnz real tokens of an unpadded batch sit in its (B, T) grid."""

    indices: torch.Tensor  # (nnz,) flat positions into B*T
    B: int
    T: int


def unpad_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, nnz: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding positions when the caller already knows nnz (the model's fast path).

    hidden: (B, T, ...), attention_mask: (B, T) 1/0, nnz = attention_mask.sum().
    Returns (packed (nnz, ...), indices (nnz,) into B*T). Knowing nnz lets `nonzero_static` size
    its output without another device-to-host sync (plain `nonzero` must wait for the count).
    """
    indices = torch.nonzero_static(attention_mask.flatten(), size=nnz).flatten()  # (nnz,)
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)  # (nnz, ...)
    return packed, indices


def repad(packed: torch.Tensor, indices: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Inverse of `unpad_tokens`: (nnz, ...) -> (B, T, ...) with zeros at padding."""
    out = packed.new_zeros(B * T, *packed.shape[1:])  # (B*T, ...)
    out.index_copy_(0, indices, packed)
    return out.view(B, T, *packed.shape[1:])  # (B, T, ...)


class SequencePacker:
    """Concatenate documents into fixed-length rows with no padding (for MLM pretraining).

    Each row is `[CLS] tokens... ` of exactly `seq_len` tokens; documents are separated by [SEP]
    (each document ends with one), and a document that does not fit continues on the next row.
    The packer is stateful so a stream of batches packs without loss: only the final partial row,
    under `seq_len` tokens, is left in `pending` when the stream ends (`flush` pads nothing and
    returns it for the caller to count or drop).
    """

    def __init__(self, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 3:
            raise ValueError("seq_len must be at least 3 ([CLS], a token, [SEP])")
        self.seq_len = seq_len
        self.cls_id = cls_id
        self.sep_id = sep_id
        self.pending: list[int] = []

    def add(self, docs: Iterable[Sequence[int]]) -> np.ndarray:
        """Add token lists (without special tokens); return the full rows, (N, seq_len) int64."""
        body = self.seq_len - 1  # room after [CLS]
        stream = self.pending
        for doc in docs:
            if len(doc):
                stream.extend(doc)
                stream.append(self.sep_id)
        n_rows = len(stream) // body
        if n_rows == 0:
            return np.zeros((0, self.seq_len), dtype=np.int64)
        flat = np.asarray(stream[: n_rows * body], dtype=np.int64).reshape(n_rows, body)  # (N, S-1)
        self.pending = stream[n_rows * body:]
        cls = np.full((n_rows, 1), self.cls_id, dtype=np.int64)  # (N, 1)
        return np.concatenate([cls, flat], axis=1)  # (N, S)

    def flush(self) -> list[int]:
        rest, self.pending = self.pending, []
        return rest
