"""The pretraining data pipeline: text (Parquet, CSV or JSON Lines) -> tokenized, packed rows, on Ray Data.

Contract:
- `build_datasets(cfg, tokenizer_path)` returns `{"train": ds, "val": ds}`, two lazy Ray
  Datasets of rows `{"input_ids": int64[seq_len]}`. Nothing is read in the driver: the plan is
  `inputs.read_dataset(text column only) -> map_batches(tokenize_and_pack)` (CPU tasks), executed as
  Ray Train streams it to the workers (`TorchTrainer(datasets=...)` and
  `get_dataset_shard(...).iter_torch_batches()` in pipelines/train.py).
- Packing: documents are tokenized without special tokens and concatenated into rows of exactly
  `seq_len` tokens, `[CLS] doc [SEP] doc [SEP] ...`, by `bert_core.padding.SequencePacker`. Rows
  have no padding, so no compute goes to it and there is no attention mask. The tail of each
  batch (under one row) is dropped: at most `seq_len - 1` tokens per `tokenize_batch_rows`
  documents.
- Validation split: by document, `crc32(text) % 10_000 < val_fraction * 10_000`, decided in the
  same map stage. It is deterministic (no state, no driver pass over the data), never puts one
  document in both splits, and survives a restart unchanged.
- Order: with `ExecutionOptions(preserve_order=True)` (set by pipelines/train.py through Ray
  Train's DataConfig), the same corpus yields the same rows in the same order, and Ray Data's
  OutputSplitter then deals the same rows to the same worker. Exact resume relies on this.
- Masking is not done here: it is dynamic, per batch, on the worker.
- `check_corpus(cfg, tokenizer_path, rows_needed)` runs on the driver before any Ray work and
  refuses, naming the file and what to do, a corpus that can't train: an unreadable file, a
  missing or non-string text column (the columns present are listed), no rows, no text (every
  value null or empty), or too little text for one step (the training split packs into fewer
  rows than `rows_needed`). It reads the footers (CSV / JSON Lines: counts their rows), then streams the text column through
  `tokenize_and_pack` only until `rows_needed` rows are packed, so a big corpus costs little.
"""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from bert_core.masking_config import MaskingConfig
from pipelines.inputs import TableFile, check_columns, input_files, names_list, read_dataset

VAL_BUCKETS = 10_000


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # Parquet/CSV/JSON Lines files, directories or globs (local or URIs)
    text_column: str = "text"  # the column holding one document per row
    tokenizer: Optional[str] = None  # checkpoint dir or vocab.txt (see `raybert vocab`); else init_from's
    seq_len: int = 128  # packed row length, [CLS] included
    val_fraction: float = 0.01  # share of documents held out for validation (by hash of the text)
    tokenize_batch_rows: int = 1024  # documents per tokenize+pack task batch
    num_cpus: float = 0.25  # CPUs per read / tokenize task; fractional so Train workers never starve them
    shuffle_buffer_rows: int = 0  # per-worker local shuffle buffer (rows), seeded by (seed, epoch); 0 = off
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # Validation masks this share of tokens whatever `masking.mlm_probability` trains with: the
    # validation loss and MLM accuracy of runs with different masking rates then compare.
    eval_mlm_probability: float = 0.15


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    # Cached per worker process: Ray reuses task workers, so the vocab loads once per process.
    from bert_core.tokenizer import load_tokenizer
    from pipelines.storage import cached_copy

    return load_tokenizer(cached_copy(path))  # a URI: this node's copy


def is_val(text: str, val_fraction: float) -> bool:
    return zlib.crc32(text.encode("utf-8")) % VAL_BUCKETS < val_fraction * VAL_BUCKETS


def tokenize_and_pack(batch: dict, *, tokenizer_path: str, text_column: str, seq_len: int,
                      val_fraction: float, split: str) -> dict:
    """One Ray Data batch of documents -> packed rows of this `split` ("train" or "val").

    batch: {text_column: (N,) str}. Returns {"input_ids": (R, seq_len) int64}. Null and non-string
    texts are skipped.
    """
    from bert_core.padding import SequencePacker

    tok = cached_tokenizer(tokenizer_path)
    want_val = split == "val"
    texts = [t for t in batch[text_column]
             if isinstance(t, str) and t and is_val(t, val_fraction) == want_val]
    if not texts:
        return {"input_ids": np.zeros((0, seq_len), dtype=np.int64)}
    ids = tok(texts, add_special_tokens=False, return_attention_mask=False,
              return_token_type_ids=False)["input_ids"]
    packer = SequencePacker(seq_len, tok.cls_token_id, tok.sep_token_id)
    rows = packer.add(ids)  # (R, seq_len); the tail under one row stays in the packer, dropped
    return {"input_ids": rows}


def build_datasets(cfg: DataConfig, tokenizer_path: str) -> dict:
    """Lazy train / val datasets of packed rows (see the module docstring)."""
    from pipelines.compat import pace_idle_data_scheduler

    pace_idle_data_scheduler()
    files = input_files(cfg.paths)
    # One read plan serves both splits (each split's execution reads the files itself): planning a
    # Parquet read samples its files in Ray tasks, ~2 s of a 2-core node's start-up per plan.
    # Only the text column is read (pushed down into the Parquet read).
    read = read_dataset(files, [cfg.text_column], text_columns=(cfg.text_column,), num_cpus=cfg.num_cpus)
    out = {}
    for split in ("train", "val"):
        if split == "val" and cfg.val_fraction <= 0:
            continue
        ds = read.map_batches(
            tokenize_and_pack, batch_size=cfg.tokenize_batch_rows, batch_format="numpy",
            num_cpus=cfg.num_cpus,
            fn_kwargs=dict(tokenizer_path=tokenizer_path, text_column=cfg.text_column,
                           seq_len=cfg.seq_len, val_fraction=cfg.val_fraction, split=split),
        )
        out[split] = ds
    return out


@dataclass
class CorpusCheck:
    files: list[str]  # the files Ray Data reads
    rows: int  # documents, from the footers
    packed_rows: int  # training rows of seq_len packed before counting stopped (>= rows_needed)
    # What a resume's data position means something for: (rows, bytes) of each file in read order,
    # from the footers. File names are left out, so a corpus moved to another mount still matches.
    fingerprint: list = field(default_factory=list)

    def describe(self) -> str:
        return f"{len(self.fingerprint)} file(s), {sum(r for r, _ in self.fingerprint):,} rows"


def open_corpus(paths: list[str], text_column: str = "text") -> list[tuple[str, TableFile]]:
    """The corpus files Ray Data reads, as (name, inputs.TableFile) (Parquet: footers only); raises
    naming the file when one is unreadable or lacks a string `text_column` (listing the columns present)."""
    out = []
    for f in input_files(paths):
        name, pf = f.name, TableFile(f, (text_column,))
        check_columns(name, pf.schema, [text_column], "the documents to train on",
                      "the text column (pretrain: data.text_column in --config; vocab: --text-column)")
        out.append((name, pf))
    return out


def check_corpus(cfg: DataConfig, tokenizer_path: str, rows_needed: int) -> CorpusCheck:
    """Refuse a corpus that can't give one training step (see the module docstring)."""
    col = cfg.text_column
    opened = open_corpus(cfg.paths, col)
    files = [name for name, _ in opened]
    rows = sum(pf.num_rows for _, pf in opened)
    fingerprint = [[pf.num_rows, pf.byte_size] for _, pf in opened]
    if rows == 0:
        raise ValueError(f"the corpus has no rows: {names_list(files)}; check --data")
    tok = cached_tokenizer(tokenizer_path)
    packed = texts = tokens = 0
    for _, pf in opened:
        for batch in pf.iter_batches(batch_size=cfg.tokenize_batch_rows, columns=[col]):
            docs = [t for t in batch.column(0).to_pylist() if isinstance(t, str) and t]
            texts += len(docs)
            train_docs = [t for t in docs if not is_val(t, cfg.val_fraction)]
            if train_docs:  # for the message: the text found, before packing drops partial rows
                tokens += sum(len(ids) + 1 for ids in tok(train_docs, add_special_tokens=False)["input_ids"])
            out = tokenize_and_pack({col: docs}, tokenizer_path=tokenizer_path, text_column=col,
                                    seq_len=cfg.seq_len, val_fraction=cfg.val_fraction, split="train")
            packed += len(out["input_ids"])
            if packed >= rows_needed:
                return CorpusCheck(files=files, rows=rows, packed_rows=packed, fingerprint=fingerprint)
    if texts == 0:
        raise ValueError(f"the corpus has no text: its {rows} rows in {names_list(files)} have column {col!r} "
                         f"null or empty everywhere; check --data and data.text_column")
    raise ValueError(
        f"the corpus has too little text for one training step: {names_list(files)} hold {tokens:,} tokens of "
        f"training text ({texts} documents), which pack into {packed} full rows of {cfg.seq_len} tokens; one "
        f"step needs {rows_needed} rows ({rows_needed * cfg.seq_len:,} tokens: workers x micro_batch_size x "
        f"grad_accum). Add text to --data, or lower micro_batch_size, seq_len or num_workers")


def write_corpus(texts: list[str], path: str, rows_per_file: Optional[int] = None) -> str:
    """Write texts as a Parquet corpus (`text` column) at `path` (a file, or a directory of files
    when `rows_per_file` is given). For tests, demos and benchmarks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows_per_file is None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pq.write_table(pa.table({"text": texts}), path)
        return path
    os.makedirs(path, exist_ok=True)
    for i in range(0, len(texts), rows_per_file):
        pq.write_table(pa.table({"text": texts[i:i + rows_per_file]}),
                       os.path.join(path, f"part-{i // rows_per_file:05d}.parquet"))
    return path
