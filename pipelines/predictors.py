"""The two per-block steps of batch scoring, as plain Python that runs with or without Ray.

Contract:
- `tokenize_batch(batch, ...)` is the stateless CPU step. It takes a block of input rows
  (`pyarrow.Table` or a dict of columns) and returns a `pyarrow.Table` with, per input row and in
  input order: the id, the internal `row_hash`, `n_tokens`, `truncated`, `error`, and `input_ids`
  (plus `token_type_ids` for sentence pairs, and `text`/`offsets`/`word_ids` for tagging). It never
  drops a row: null or non-string text gives a row with `error` set and no tokens. An empty string
  is valid text: it scores as `[CLS] [SEP]` (n_tokens 2), since a user who sends "" expects a row
  back, and a score is more useful than an error. Text longer than `max_length` tokens is truncated
  and flagged.
- `Predictor` is the stateful model step (one per Ray actor): `__init__` loads the model once,
  `__call__(batch) -> pyarrow.Table` runs it under `torch.inference_mode()`. Inside each block
  it sorts rows by length and cuts batches with `bert_core.padding.token_budget_batches`, so
  rows x longest stays under `max_tokens`; results are scattered back to input order. Rows
  with an error pass through with null outputs.
- Output columns: `id, row_hash, n_tokens, truncated, error` and, by task,
  `embed`: `embedding` fixed_size_list<float32>[H];
  `classify`: `label` (name from id2label), `score`, `probs` list<float32>;
  `tag`: `entities` list<struct<word, label, score, start, end>>, one per word whose label is
  not "O" (the word's label is its first sub-token's, as HF's "first" aggregation; offsets are
  character offsets into the text);
  `fill-mask`: `fill_mask` list<struct<position, tokens, token_ids, scores>>, top-k per [MASK]
  (position is the token index of the [MASK]).
  Every block has the same schema, also when all its rows are errors or it has no rows.
"""

from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

TASKS = ("embed", "classify", "tag", "fill-mask")
HEAD_OF_TASK = {"embed": "embed", "classify": "classify", "tag": "tag", "fill-mask": "mlm"}
DTYPES = ("fp32", "bf16", "fp16")
# Characters kept before tokenizing. Longer text is certainly over any BERT length limit, and
# clipping it first keeps a 1 MB row from costing a full tokenization (offsets are unaffected:
# we clip the tail). A clipped row is flagged truncated.
CHARS_PER_TOKEN_LIMIT = 64

BASE_FIELDS = [
    pa.field("n_tokens", pa.int32()),
    pa.field("truncated", pa.bool_()),
    pa.field("error", pa.string()),
]
ENTITY_TYPE = pa.struct([("word", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                         ("start", pa.int32()), ("end", pa.int32())])
FILL_TYPE = pa.struct([("position", pa.int32()), ("tokens", pa.list_(pa.string())),
                       ("token_ids", pa.list_(pa.int32())), ("scores", pa.list_(pa.float32()))])


def _as_table(batch: Any) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table({k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(list(v)))
                         for k, v in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)  # a pandas batch


# --------------------------------------------------------------------------------------------
# Tokenize (stateless CPU step)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer_path: str, max_length: int):
    """A `tokenizers.Tokenizer` copy of the checkpoint's fast tokenizer, truncating to
    `max_length` (special tokens included) and never padding. Cached per process, so each Ray
    worker loads it once. (A copy, because tokenizer.json may carry its own padding/truncation.)"""
    from tokenizers import Tokenizer

    from bert_core.tokenizer import load_tokenizer

    hf = load_tokenizer(tokenizer_path)
    enc = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    enc.no_padding()
    enc.enable_truncation(max_length=max_length)
    return enc


def tokenize_batch(batch: Any, *, tokenizer_path: str, text_column: str = "text",
                   text_pair_column: Optional[str] = None, id_column: str = "id",
                   max_length: int = 512, with_offsets: bool = False,
                   fallback_ids: Optional[dict] = None) -> pa.Table:
    """Tokenize one block of rows; see the module docstring for the output columns.

    `fallback_ids`: when the input has no id column, `{"path_column": ..., "roots": ...}` makes
    ids `"<file relative to its input root>:<row index>"` from the reader's `path` and `row_hash`
    columns (see `row_index_from_hash`).
    """
    table = _as_table(batch)
    n = table.num_rows
    enc = _encoder(str(tokenizer_path), int(max_length))
    texts = table.column(text_column).to_pylist() if n else []
    pairs = table.column(text_pair_column).to_pylist() if (text_pair_column and n) else None

    errors: list[Optional[str]] = [None] * n
    clipped = np.zeros(n, dtype=bool)
    max_chars = max_length * CHARS_PER_TOKEN_LIMIT
    todo: list[int] = []
    inputs: list = []
    for i, t in enumerate(texts):
        p = pairs[i] if pairs is not None else None
        if t is None:
            errors[i] = f"{text_column} is null"
        elif not isinstance(t, str):
            errors[i] = f"{text_column} is {type(t).__name__}, not a string"
        elif pairs is not None and p is None:
            errors[i] = f"{text_pair_column} is null"
        elif pairs is not None and not isinstance(p, str):
            errors[i] = f"{text_pair_column} is {type(p).__name__}, not a string"
        else:
            if len(t) > max_chars:
                t, clipped[i] = t[:max_chars], True
            if p is not None and len(p) > max_chars:
                p, clipped[i] = p[:max_chars], True
            todo.append(i)
            inputs.append((t, p) if pairs is not None else t)
    encodings = enc.encode_batch(inputs) if inputs else []

    ids: list = [[] for _ in range(n)]
    n_tokens = np.zeros(n, dtype=np.int32)
    truncated = clipped.copy()
    types = [[] for _ in range(n)] if pairs is not None else None
    offsets = [[] for _ in range(n)] if with_offsets else None
    word_ids = [[] for _ in range(n)] if with_offsets else None
    for i, e in zip(todo, encodings):
        ids[i] = e.ids
        n_tokens[i] = len(e.ids)
        truncated[i] |= bool(e.overflowing)
        if types is not None:
            types[i] = e.type_ids
        if with_offsets:
            offsets[i] = [x for pair in e.offsets for x in pair]  # flat (start, end) pairs
            word_ids[i] = [-1 if w is None else w for w in e.word_ids]  # -1 = special token

    cols: dict[str, pa.Array] = {}
    if id_column in table.column_names:
        cols["id"] = table.column(id_column).combine_chunks()
    elif fallback_ids is not None:
        cols["id"] = pa.array(_fallback_ids(table, fallback_ids), pa.string())
    else:
        raise KeyError(f"no id column {id_column!r} in the batch and no fallback configured")
    if "row_hash" in table.column_names:
        cols["row_hash"] = table.column("row_hash").combine_chunks()
    cols["n_tokens"] = pa.array(n_tokens, pa.int32())
    cols["truncated"] = pa.array(truncated, pa.bool_())
    cols["error"] = pa.array(errors, pa.string())
    cols["input_ids"] = pa.array(ids, pa.list_(pa.int32()))
    if types is not None:
        cols["token_type_ids"] = pa.array(types, pa.list_(pa.int8()))
    if with_offsets:
        cols["text"] = pa.array([t if isinstance(t, str) else None for t in texts], pa.string())
        cols["offsets"] = pa.array(offsets, pa.list_(pa.int32()))
        cols["word_ids"] = pa.array(word_ids, pa.list_(pa.int32()))
    return pa.table(cols)


# --- stable ids from file + row index -------------------------------------------------------
# Ray Data's `include_row_hash` column is splitmix64(md5(path)[:8] + row index in the file). The
# finalizer is a bijection, so the row index can be recovered exactly; we then re-hash with Ray's
# own function to check, and fall back to the hash itself if Ray ever changes its scheme.

_M64 = (1 << 64) - 1
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_C1_INV, _C2_INV = pow(_C1, -1, 1 << 64), pow(_C2, -1, 1 << 64)


def _unxorshift(x: np.ndarray, s: int) -> np.ndarray:
    y = x.copy()
    shift = s
    while shift < 64:  # x = y ^ (y >> s) ^ (y >> 2s) ^ ...
        y ^= x >> np.uint64(shift)
        shift += s
    return y


def row_index_from_hash(path: str, hashes: np.ndarray) -> np.ndarray:
    """Invert Ray's row hash to the row's index in `path` (uint64 arrays, wrapping arithmetic)."""
    import hashlib

    x = np.asarray(hashes, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x = _unxorshift(x, 31)
        x *= np.uint64(_C2_INV)
        x = _unxorshift(x, 27)
        x *= np.uint64(_C1_INV)
        x = _unxorshift(x, 30)
        seed = np.uint64(int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], "little"))
        return x - seed


def _fallback_ids(table: pa.Table, spec: dict) -> list[str]:
    import os

    paths = table.column(spec.get("path_column", "path")).to_pylist()
    hashes = table.column("row_hash").to_numpy(zero_copy_only=False).astype(np.uint64)
    roots = spec.get("roots", {})
    out: list[str] = [""] * len(paths)
    by_path: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_path.setdefault(p, []).append(i)
    for p, idx in by_path.items():
        idx_arr = np.asarray(idx)
        rows = row_index_from_hash(p, hashes[idx_arr])
        name = os.path.relpath(p, roots[p]) if p in roots else os.path.basename(p)
        if _hash_check(p, rows, hashes[idx_arr]):
            for j, r in zip(idx, rows.tolist()):
                out[j] = f"{name}:{r}"
        else:  # Ray's hash scheme changed: the hash is still a stable per-(file, row) key
            for j, h in zip(idx, hashes[idx_arr].tolist()):
                out[j] = f"{name}#{h:016x}"
    return out


def _hash_check(path: str, rows: np.ndarray, hashes: np.ndarray) -> bool:
    try:
        from ray.data._internal.datasource_v2.common.synthesized_columns import _compute_row_hashes
    except ImportError:
        return False
    if rows.size == 0:
        return True
    lo, hi = int(rows.min()), int(rows.max())
    if hi - lo > 10_000_000:  # not a plausible block of one file: the inversion is off
        return False
    ref = _compute_row_hashes(path, lo, hi - lo + 1)
    return bool(np.array_equal(ref[(rows - lo).astype(np.int64)], hashes))


# --------------------------------------------------------------------------------------------
# Predict (stateful model step)
# --------------------------------------------------------------------------------------------


def _lists(col: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A list<int> column as one numpy array per row (views into the flat values)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return []
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


class Predictor:
    """One loaded model; `__call__` scores a tokenized block (see the module docstring)."""

    def __init__(self, model: str, task: str, *, max_tokens: int = 4096,
                 max_batch_rows: Optional[int] = None, dtype: str = "fp32", device: str = "cpu",
                 pooling: Optional[str] = None, normalize: Optional[bool] = None, top_k: int = 5,
                 num_threads: Optional[int] = None, tokenizer: Optional[str] = None,
                 head: Optional[str] = None):
        import torch

        from bert_core.checkpoint import load_pretrained
        from bert_core.tokenizer import load_tokenizer

        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == "fp16" and not str(device).startswith("cuda"):
            raise ValueError("dtype fp16 needs a GPU (CPU autocast supports bf16); use bf16 or fp32 on CPU")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.task = task
        self.max_tokens = int(max_tokens)
        self.max_batch_rows = max_batch_rows
        self.top_k = int(top_k)
        self.device = torch.device(device)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        kwargs = {"pooling": pooling, "normalize": normalize} if task == "embed" else {}
        # `head` picks one task head of a multi-task checkpoint (default: its primary task).
        self.model = load_pretrained(model, HEAD_OF_TASK[task], task=head, **kwargs).to(self.device).eval()
        self.config = self.model.config
        tok = load_tokenizer(tokenizer or model)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.config.pad_token_id
        self.mask_id = tok.mask_token_id
        self.vocab = tok.convert_ids_to_tokens(list(range(len(tok)))) if task == "fill-mask" else None
        if task == "fill-mask" and self.mask_id is None:
            raise ValueError(f"{model}: the tokenizer has no mask token; fill-mask needs one")
        self.id2label = self.config.id2label or {i: f"LABEL_{i}" for i in range(self.config.num_labels)}
        self.hidden = self.config.hidden_size

    # -- helpers ---------------------------------------------------------------------------

    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, seqs: list[np.ndarray], types: Optional[list[np.ndarray]]):
        """Run one padded batch; returns the task's raw outputs for these rows (numpy)."""
        import torch

        from bert_core.padding import pad_batch

        ids, mask = pad_batch(seqs, pad_id=self.pad_id)  # (B, T) each
        ids_t = torch.from_numpy(ids).to(self.device)  # (B, T)
        mask_t = torch.from_numpy(mask).to(self.device)  # (B, T)
        tt = None
        if types is not None:
            tt = torch.from_numpy(pad_batch(types, pad_id=0)[0]).to(self.device)  # (B, T)
        with self._autocast():
            if self.task == "fill-mask":
                hit = (ids_t == self.mask_id) & mask_t.bool()  # (B, T)
                flat = torch.nonzero(hit.flatten()).flatten()  # (M,)
                if flat.numel() == 0:
                    return flat.cpu().numpy(), None, None
                logits = self.model(ids_t, mask_t, tt, masked_index=flat)  # (M, V)
                probs = torch.softmax(logits.float(), dim=-1)  # (M, V)
                k = min(self.top_k, probs.shape[-1])
                top = torch.topk(probs, k, dim=-1)  # (M, k)
                return flat.cpu().numpy(), top.values.cpu().numpy(), top.indices.cpu().numpy()
            out = self.model(ids_t, mask_t, tt)
        if self.task == "embed":
            return out.float().cpu().numpy()  # (B, H)
        probs = torch.softmax(out.float(), dim=-1)  # (B, L) or (B, T, L)
        return probs.cpu().numpy()

    # -- the UDF ---------------------------------------------------------------------------

    def __call__(self, batch: Any) -> pa.Table:
        import torch

        from bert_core.padding import token_budget_batches

        table = _as_table(batch)
        n = table.num_rows
        errors = table.column("error").to_pylist() if n else []
        seqs = _lists(table.column("input_ids"))
        types = _lists(table.column("token_type_ids")) if "token_type_ids" in table.column_names else None
        ok = np.array([e is None for e in errors], dtype=bool)
        rows = np.nonzero(ok)[0]
        results: list[Any] = [None] * n  # per input row, in input order

        with torch.inference_mode():
            lengths = np.array([len(seqs[i]) for i in rows], dtype=np.int64)
            for b in token_budget_batches(lengths, self.max_tokens, self.max_batch_rows):
                idx = rows[b]  # input rows of this batch, longest first
                try:
                    self._score(idx, seqs, types, results)
                except Exception as e:  # a batch that fails is retried row by row
                    log.warning("batch of %d rows failed (%s); scoring rows one by one", len(idx), e)
                    for i in idx:
                        try:
                            self._score(np.array([i]), seqs, types, results)
                        except Exception as e1:  # noqa: BLE001 - the row gets the error instead
                            errors[i] = f"model error: {type(e1).__name__}: {e1}"
                            results[i] = None
        return self._table(table, errors, results)

    def _score(self, idx: np.ndarray, seqs, types, results: list) -> None:
        bseqs = [seqs[i] for i in idx]
        btypes = [types[i] for i in idx] if types is not None else None
        out = self._forward(bseqs, btypes)
        if self.task == "fill-mask":
            flat, vals, toks = out
            T = max(len(s) for s in bseqs)
            per_row: dict[int, list] = {int(i): [] for i in idx}
            for m, pos in enumerate(flat.tolist()):
                r, t = divmod(pos, T)
                per_row[int(idx[r])].append((t, vals[m], toks[m]))
            for i, items in per_row.items():
                results[i] = items
            return
        for r, i in enumerate(idx):
            results[i] = out[r][: len(seqs[i])] if self.task == "tag" else out[r]  # drop padding

    def _table(self, table: pa.Table, errors: list, results: list) -> pa.Table:
        n = table.num_rows
        cols: dict[str, pa.Array] = {"id": table.column("id").combine_chunks()}
        if "row_hash" in table.column_names:
            cols["row_hash"] = table.column("row_hash").combine_chunks()
        cols["n_tokens"] = table.column("n_tokens").combine_chunks().cast(pa.int32())
        cols["truncated"] = table.column("truncated").combine_chunks().cast(pa.bool_())
        cols["error"] = pa.array(errors, pa.string())
        missing = np.array([r is None for r in results], dtype=bool)
        if self.task == "embed":
            H = self.hidden
            flat = np.zeros((n, H), dtype=np.float32)
            for i, r in enumerate(results):
                if r is not None:
                    flat[i] = r
            values = pa.array(flat.reshape(-1), pa.float32())
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(values, H, mask=pa.array(missing))
        elif self.task == "classify":
            labels, scores, probs = [], [], []
            for r in results:
                if r is None:
                    labels.append(None), scores.append(None), probs.append(None)
                else:
                    k = int(np.argmax(r))
                    labels.append(self.id2label.get(k, str(k)))
                    scores.append(float(r[k]))
                    probs.append(r.astype(np.float32))
            cols["label"] = pa.array(labels, pa.string())
            cols["score"] = pa.array(scores, pa.float32())
            cols["probs"] = pa.array(probs, pa.list_(pa.float32()))
        elif self.task == "tag":
            texts = table.column("text").to_pylist() if n else []
            offsets = _lists(table.column("offsets"))
            word_ids = _lists(table.column("word_ids"))
            cols["entities"] = pa.array(
                [None if r is None else self._entities(r, texts[i], offsets[i], word_ids[i])
                 for i, r in enumerate(results)], pa.list_(ENTITY_TYPE))
        else:
            vocab = self.vocab
            cols["fill_mask"] = pa.array(
                [None if r is None else [
                    {"position": int(t), "tokens": [vocab[j] for j in ids.tolist()],
                     "token_ids": ids.astype(np.int32).tolist(), "scores": vals.astype(np.float32).tolist()}
                    for t, vals, ids in sorted(r, key=lambda x: x[0])] for r in results],
                pa.list_(FILL_TYPE))
        return pa.table(cols)

    def _entities(self, probs: np.ndarray, text: str, offsets: np.ndarray, word_ids: np.ndarray) -> list[dict]:
        """Per word: the first sub-token's label and score; offsets span all its sub-tokens."""
        spans = offsets.reshape(-1, 2)  # (T, 2) char offsets of each token
        words: dict[int, list[int]] = {}
        for t, w in enumerate(word_ids.tolist()):
            if w >= 0:
                words.setdefault(w, []).append(t)
        out = []
        for w, toks in words.items():
            first = toks[0]
            k = int(np.argmax(probs[first]))
            label = self.id2label.get(k, str(k))
            if label == "O":
                continue
            start, end = int(spans[first][0]), int(spans[toks[-1]][1])
            out.append({"word": text[start:end], "label": label, "score": float(probs[first][k]),
                        "start": start, "end": end})
        return out


def output_schema_fields(task: str) -> list[str]:
    """Names of the task's output columns (after id, row_hash, n_tokens, truncated, error)."""
    return {"embed": ["embedding"], "classify": ["label", "score", "probs"], "tag": ["entities"],
            "fill-mask": ["fill_mask"]}[task]

