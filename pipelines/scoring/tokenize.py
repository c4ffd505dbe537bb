"""Tokenizing blocks of rows for scoring: the stateless CPU step, run by the tokenizing actors that
feed GPU actors (pipelines/scoring/feed.py), inside a CPU predictor actor (pipelines/scoring/predictors.py,
`Predictor(tokenize=...)`), or as Ray Data tasks (`score_dataset`).

Contract: `tokenize_batch(batch, ...)` takes a block of input rows (`pyarrow.Table` or a dict of
columns) and returns a `pyarrow.Table` with, per input row and in input order: the id, the internal
`row_hash`, `n_tokens`, `truncated`, `error`, and `input_ids` (plus `token_type_ids` for sentence
pairs, and `text`/`offsets`/`word_ids` for tagging). It never drops a row: null or non-string text
gives a row with `error` set and no tokens. An empty string is valid text: it scores as
`[CLS] [SEP]` (n_tokens 2). Text longer than `max_length` tokens is truncated and flagged. Inputs
without an id column get `<file>#<row_hash hex>` ids, stable across runs. With `keep_columns`
(the Python API, `pipelines.scoring.job.score_dataset`), those input columns travel along unchanged as
`keep:<name>` (the predictor restores their names), and `id_column=None` means the rows need no id.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import numpy as np
import pyarrow as pa

# Characters kept before tokenizing. Longer text is certainly over any BERT length limit, and
# clipping it first keeps a 1 MB row from costing a full tokenization (offsets are unaffected:
# we clip the tail). A clipped row is flagged truncated.
CHARS_PER_TOKEN_LIMIT = 64
KEEP = "keep:"  # prefix of a caller's column carried through tokenizing (never clashes with ours)


def as_table(batch: Any) -> pa.Table:
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
def encoder(tokenizer_path: str, max_length: int):
    """A `tokenizers.Tokenizer` for the checkpoint, truncating to `max_length` (special tokens
    included) and never padding. Cached per process, so each Ray worker loads it once.

    A checkpoint's `tokenizer.json` is loaded with the `tokenizers` library alone: importing
    `transformers` costs each fresh Ray worker seconds of CPU (the profile of a near-free model
    showed tokenize workers spending most of their time in that import, not in tokenizing).
    Only a checkpoint with nothing but a `vocab.txt` goes through `load_tokenizer`."""
    import os

    from pipelines.storage import cached_copy

    tokenizer_path = cached_copy(tokenizer_path)  # a URI: this node's copy, fetched once

    from tokenizers import Tokenizer

    path = os.path.join(tokenizer_path, "tokenizer.json")
    if os.path.isfile(path):
        enc = Tokenizer.from_file(path)
    else:
        from bert_core.tokenizer import load_tokenizer

        enc = Tokenizer.from_str(load_tokenizer(tokenizer_path).backend_tokenizer.to_str())
    enc.no_padding()  # tokenizer.json may carry its own padding/truncation
    enc.enable_truncation(max_length=max_length)
    return enc


def tokenize_batch(batch: Any, *, tokenizer_path: str, text_column: str = "text",
                   text_pair_column: Optional[str] = None, id_column: str = "id",
                   max_length: int = 512, with_offsets: bool = False,
                   fallback_ids: Optional[dict] = None, keep_columns: Optional[list] = None) -> pa.Table:
    """Tokenize one block of rows; see the module docstring for the output columns.

    `fallback_ids`: when the input has no id column, `{"path_column": ..., "roots": ...}` makes
    ids `"<file relative to its input root>#<row_hash as 16 hex digits>"` from the reader's `path`
    and `row_hash` columns (see `_fallback_ids`).
    """
    table = as_table(batch)
    n = table.num_rows
    enc = encoder(str(tokenizer_path), int(max_length))
    texts = table.column(text_column).to_pylist() if n else []
    pairs = table.column(text_pair_column).to_pylist() if (text_pair_column and n) else None

    errors, clipped, todo, inputs = _screen(texts, pairs, text_column, text_pair_column,
                                            max_length * CHARS_PER_TOKEN_LIMIT)
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

    cols: dict[str, pa.Array] = {KEEP + c: table.column(c).combine_chunks() for c in keep_columns or []}
    if id_column in table.column_names:
        cols["id"] = table.column(id_column).combine_chunks()
    elif fallback_ids is not None:
        cols["id"] = pa.array(_fallback_ids(table, fallback_ids), pa.string())
    elif id_column is not None:  # None: the caller's rows need no id (keep_columns identify them)
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


class Screened(NamedTuple):
    errors: list  # per row: why it can't be tokenized, or None
    clipped: np.ndarray  # (n,) bool: the row's text was cut to max_chars
    todo: list  # the rows to tokenize
    inputs: list  # their text, or (text, pair)


def _screen(texts: list, pairs: Optional[list], text_column: str, text_pair_column: Optional[str],
            max_chars: int) -> Screened:
    """(errors, clipped, todo, inputs): an error per row that can't be tokenized (null or not a
    string), which rows were clipped to `max_chars`, and the rows to tokenize with their text (or
    (text, pair))."""
    n = len(texts)
    errors: list[Optional[str]] = [None] * n
    clipped = np.zeros(n, dtype=bool)
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
    return Screened(errors, clipped, todo, inputs)


# --- stable ids for inputs without an id column ----------------------------------------------
# The key is Ray Data's public `include_row_hash` column: a documented, deterministic uint64 of
# (file path, row position), the same one resume keys on. We don't invert it to a row index
# (that would tie ids to Ray's private hash scheme); "<file>#<hash>" is stable across reruns.


def id_name(path: str, roots: dict) -> str:
    """The file part of a fallback id: `path` relative to the input root it was found under, or its
    base name for a file named itself."""
    import os

    return os.path.relpath(path, roots[path]) if path in roots else os.path.basename(path)


def _fallback_ids(table: pa.Table, spec: dict) -> list[str]:
    roots, given = spec.get("roots", {}), spec.get("names", {})  # names: a staged file's input's name
    paths = table.column(spec.get("path_column", "path")).to_pylist()
    hashes = table.column("row_hash").to_numpy(zero_copy_only=False).astype(np.uint64).tolist()
    names = {p: given.get(p) or id_name(p, roots) for p in set(paths)}
    return [f"{names[p]}#{h:016x}" for p, h in zip(paths, hashes)]
