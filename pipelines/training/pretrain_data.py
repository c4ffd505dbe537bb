"""The pretraining data pipeline: text (Parquet, CSV or JSON Lines) -> tokenized, packed rows, on Ray Data.

Contract:
- `build_datasets(cfg, tokenizer_path, pieces, seed, epoch)` returns `{"train": ds}`, a lazy Ray
  Dataset of one epoch's rows `{"input_ids": int64[seq_len]}`. No text is read where it is planned:
  the plan is `from_items(the corpus's pieces, in the epoch's order) -> map_batches(read_and_pack)`
  (CPU tasks reading the text column and packing it), executed as the workers iterate their split
  (`epoch_split`, one per epoch, from pipelines/training/loop.py).
- The validation set is built once per run (`ensure_val_set`, on the driver, at the run's first
  start): the held-out documents in read order, tokenized and packed, the first
  `val_max_rows` rows, written to `<run_dir>/val.parquet`. Every evaluation of every invocation
  reads that file (`read_val_rows`), never the corpus: an evaluation costs the same on a corpus of
  any size. The corpus (fingerprint) and the settings that shape the file are part of the run's
  recipe, so a resume can't pair a run with another corpus's validation set.
- Packing: documents are tokenized without special tokens and concatenated into rows of exactly
  `seq_len` tokens, `[CLS] doc [SEP] doc [SEP] ...`, by `bert_core.padding.SequencePacker`. Rows
  have no padding, so no compute goes to it and there is no attention mask. The tail of each
  batch (under one row) is dropped: at most `seq_len - 1` tokens per `tokenize_batch_rows`
  documents.
- Validation split: by document, `crc32(text) % 10_000 < val_fraction * 10_000`: the train
  stage drops those documents, the validation set is built from them (only the first
  `val_max_rows` packed rows are kept; training skips every held-out document all the same).
  It is deterministic, never puts one document in both splits, and survives a restart unchanged.
- Order: each epoch reads the corpus's files in its own permutation, drawn from (seed, epoch)
  (`epoch_order`; `shuffle_files: false` keeps the listed order), then each worker mixes rows in a
  local buffer seeded by (seed, epoch) (`shuffle_buffer_rows`). `epoch_split` plans each epoch's
  read on rank 0 with `ExecutionOptions(preserve_order=True)`, so the same corpus yields the same
  rows in the same order, and Ray Data's OutputSplitter deals the same rows to the same worker.
  Exact resume relies on this: a resumed run re-plans its epoch and skips what was consumed.
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
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipelines import UserError
from bert_core.masking_config import MaskingConfig
from pipelines.inputs import TableFile, check_columns, input_files, names_list

VAL_BUCKETS = 10_000


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # Parquet/CSV/JSON Lines files, directories or globs (local or URIs)
    text_column: str = "text"  # the column holding one document per row
    tokenizer: Optional[str] = None  # checkpoint dir or vocab.txt (see `raybert vocab`); else init_from's
    seq_len: int = 128  # packed row length, [CLS] included
    val_fraction: float = 0.01  # share of documents held out for validation (by hash of the text)
    # At most this many packed rows of held-out text are evaluated (<run_dir>/val.parquet, built
    # once at the run's start): an evaluation's cost stays fixed however large the corpus grows.
    val_max_rows: int = 2048
    tokenize_batch_rows: int = 1024  # documents per tokenize+pack task batch
    num_cpus: float = 0.25  # CPUs per read / tokenize task; fractional so Train workers never starve them
    # Each epoch reads the files in its own order, drawn from (train.seed, epoch): a corpus
    # written by date or by source doesn't train on one topic at a time. Split a corpus held in
    # one big file into many (`write_corpus(rows_per_file=...)`) for this to mix it.
    shuffle_files: bool = True
    # Then rows are mixed within a per-worker buffer, seeded by (seed, epoch); 0 = off.
    shuffle_buffer_rows: int = 2048
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
    packer = SequencePacker(seq_len, tok.cls_token_id, tok.sep_token_id)
    rows = packer.add(token_ids(tok, texts))  # (R, seq_len); the tail under one row stays in the packer, dropped
    return {"input_ids": rows}


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Each document's token ids, without special tokens (packing adds [CLS] and [SEP])."""
    # verbose=False: documents longer than the model's positions are expected (packing cuts them
    # into rows); transformers would otherwise warn once per process that they "will index errors".
    return tok(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
               verbose=False)["input_ids"]


def epoch_order(n_files: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order the corpus's files are read in during `epoch`: a permutation drawn from
    (seed, epoch), so every epoch has its own and a resumed run draws the straight run's."""
    if not shuffle:
        return list(range(n_files))
    return np.random.default_rng([seed, 13, epoch]).permutation(n_files).tolist()


def build_datasets(cfg: DataConfig, tokenizer_path: str, pieces: Optional[list] = None, seed: int = 0,
                   epoch: int = 0) -> dict:
    """The lazy train dataset of packed rows of `epoch`: the corpus's `pieces` (see `corpus_pieces`;
    None: read from the corpus's footers now) in `epoch_order`, read and packed by Ray Data tasks of
    `num_cpus` (see the module docstring)."""
    import ray.data

    from pipelines.compat import pace_idle_data_scheduler

    pace_idle_data_scheduler()
    if pieces is None:
        pieces = corpus_pieces(open_corpus(cfg.paths, cfg.text_column))
    ordered = [pieces[i] for i in epoch_order(len(pieces), seed, epoch, cfg.shuffle_files)]
    # Consecutive pieces share a task up to ~PIECE_TASK_ROWS documents: thousands of small files
    # don't cost a task each. `from_items` plans in this process, no Ray task: a read planned
    # by Ray's file readers asks for whole CPUs the training workers hold, and would wait forever.
    tasks = max(1, min(len(ordered), math.ceil(sum(p[2] for p in ordered) / PIECE_TASK_ROWS)))
    items = ray.data.from_items([{"file": p[0], "row_group": p[1]} for p in ordered], override_num_blocks=tasks)
    train = items.map_batches(
        read_and_pack, batch_size=None, batch_format="pyarrow", num_cpus=cfg.num_cpus,
        fn_kwargs=dict(tokenizer_path=tokenizer_path, text_column=cfg.text_column, seq_len=cfg.seq_len,
                       val_fraction=cfg.val_fraction, batch_rows=cfg.tokenize_batch_rows))
    return {"train": train}


PIECE_TASK_ROWS = 16_384


def corpus_pieces(opened: list) -> list[list]:
    """[file, row group, rows] for each Parquet row group and [file, -1, rows] for each CSV / JSON
    Lines file (read whole), in corpus order: the units whose order each epoch permutes."""
    out = []
    for name, pf in opened:
        if pf.format == "parquet":
            out += [[name, g, rows] for g, rows in enumerate(pf.row_group_rows())]
        else:
            out.append([name, -1, pf.num_rows])
    return out


def read_and_pack(block, *, tokenizer_path: str, text_column: str, seq_len: int, val_fraction: float,
                  batch_rows: int):
    """Ray Data task: a block of pieces ({file, row_group}) -> their training rows, packed
    (`tokenize_and_pack`, `batch_rows` documents at a time), piece by piece in the block's order."""
    for name, group in zip(block.column("file").to_pylist(), block.column("row_group").to_pylist()):
        table = TableFile(input_files([name])[0], (text_column,))
        for batch in table.iter_batches(batch_size=batch_rows, columns=[text_column],
                                        row_groups=None if group < 0 else [group]):
            out = tokenize_and_pack({text_column: batch.column(0).to_pylist()}, tokenizer_path=tokenizer_path,
                                    text_column=text_column, seq_len=seq_len, val_fraction=val_fraction, split="train")
            if len(out["input_ids"]):
                yield out


def epoch_split(cfg: DataConfig, tokenizer_path: str, pieces: list, seed: int, epoch: int, rank: int, world: int):
    """This worker's stream of `epoch`'s training rows (a Ray DataIterator). Rank 0 plans the
    epoch's read (`build_datasets`) and splits it into `world` equal streams with Ray Train's own
    `DataConfig.configure` (order preserved, locality hints from each rank's node); the other
    ranks receive theirs over the process group. A collective: every rank calls it at the start
    of every epoch. Ray Train's `datasets=` can't do this: it plans a dataset once per fit, so every
    epoch of a fit would read the files in one order."""
    import ray
    import ray.data
    import ray.train
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and world > 1
    nodes = [None] * world
    node = ray.get_runtime_context().get_node_id()
    if distributed:
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    splits = [None] * world
    if rank == 0:
        ds = build_datasets(cfg, tokenizer_path, pieces, seed, epoch)["train"]
        # Deterministic order end to end: the same rows reach the same worker in the same order on
        # every run, which is what lets a resume skip exactly the batches already trained on.
        config = ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True))
        per_rank = config.configure({"train": ds}, world_size=world, worker_handles=None, worker_node_ids=nodes)
        splits = [r["train"] for r in per_rank]
    if distributed:
        dist.broadcast_object_list(splits, src=0)
    return splits[rank]


VAL_FILE = "val.parquet"


def build_val_rows(cfg: DataConfig, tokenizer_path: str) -> np.ndarray:
    """The validation rows, (N, seq_len) int64 with N <= val_max_rows: the corpus's held-out
    documents in read order, packed as training packs. Reads the text column only, and stops at
    the cap, so on a big corpus it reads about val_max_rows * seq_len / val_fraction tokens."""
    from bert_core.padding import SequencePacker

    tok = cached_tokenizer(tokenizer_path)
    packer = SequencePacker(cfg.seq_len, tok.cls_token_id, tok.sep_token_id)
    parts, n = [], 0
    for _, pf in open_corpus(cfg.paths, cfg.text_column):
        for batch in pf.iter_batches(batch_size=cfg.tokenize_batch_rows, columns=[cfg.text_column]):
            docs = [t for t in batch.column(0).to_pylist() if isinstance(t, str) and t and is_val(t, cfg.val_fraction)]
            if not docs:
                continue
            parts.append(packer.add(token_ids(tok, docs)))
            n += len(parts[-1])
            if n >= cfg.val_max_rows:
                return np.concatenate(parts)[:cfg.val_max_rows]
    return np.concatenate(parts) if parts else np.zeros((0, cfg.seq_len), dtype=np.int64)


def ensure_val_set(cfg: DataConfig, tokenizer_path: str, run_dir: str) -> int:
    """`<run_dir>/val.parquet`, built now unless the run has it (see the module docstring); its
    row count. 0 (and no file) when the run holds out nothing (`val_fraction` 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage

    if cfg.val_fraction <= 0:
        return 0
    path = storage.join(run_dir, VAL_FILE)
    if storage.exists(path):
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path))).metadata.num_rows
    rows = build_val_rows(cfg, tokenizer_path)
    sink = pa.BufferOutputStream()
    # int32 on disk (vocabularies are far below 2**31): half the bytes of the int64 the loop feeds.
    pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(
        pa.array(rows.reshape(-1).astype(np.int32)), cfg.seq_len)}), sink)
    storage.write_bytes(path, sink.getvalue().to_pybytes())
    return len(rows)


def read_val_rows(run_dir: str, rank: int = 0, world: int = 1) -> Optional[np.ndarray]:
    """This rank's share of `<run_dir>/val.parquet` (rows rank, rank + world, ...), (N, seq_len)
    int64; None when the run has no validation file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage

    data = storage.read_bytes(storage.join(run_dir, VAL_FILE))
    if data is None:
        return None
    col = pq.read_table(pa.BufferReader(data)).column("input_ids").combine_chunks()
    rows = col.flatten().to_numpy().astype(np.int64).reshape(len(col), col.type.list_size)
    return rows[rank::world]


@dataclass
class CorpusCheck:
    files: list[str]  # the files Ray Data reads
    rows: int  # documents, from the footers
    packed_rows: int  # training rows of seq_len packed before counting stopped (>= rows_needed)
    # What a resume's data position means something for: (rows, bytes) of each file in read order,
    # from the footers. File names are left out, so a corpus moved to another mount still matches.
    fingerprint: list = field(default_factory=list)
    pieces: list = field(default_factory=list)  # corpus_pieces: what each epoch's order permutes

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
        raise UserError(f"the corpus has no rows: {names_list(files)}; check --data")
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
                return CorpusCheck(files=files, rows=rows, packed_rows=packed, fingerprint=fingerprint,
                                   pieces=corpus_pieces(opened))
    if texts == 0:
        raise UserError(f"the corpus has no text: its {rows} rows in {names_list(files)} have column {col!r} "
                         f"null or empty everywhere; check --data and data.text_column")
    raise UserError(
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
