"""Labeled data for fine-tuning: Parquet -> tokenized, label-encoded rows, on Ray Data.

Contract:
- A task reads its own Parquet files (`TaskData.paths`). By kind:
    classify  `text` (+ optional `text_pair`) and `label`: a label name (string) or an int;
    tag       `tokens` (list of words) and `tags` (list of BIO labels, one per word), CoNLL style;
    mlm       `text` only: an auxiliary masked-LM task, packed as in pretraining.
- Labels: `TaskData.labels` fixes the names in id order; otherwise they are discovered with Ray
  Data (`unique`) and sorted (ints numerically, and then an int label `k` keeps id `k` when the
  labels are exactly 0..K-1). A row whose label is null or not in the list fails the job with an
  error that names the file, the label and the fix: nothing is silently dropped.
- Validation: `val_paths` if given, else a split by a seeded hash of the row's text
  (`crc32(f"{split_seed}:{text}") % 10_000 < val_fraction * 10_000`): deterministic, stateless,
  the same on every run and worker, and a text never lands on both sides.
- Rows come out as fixed-length int64 arrays (`input_ids`, `attention_mask`, `token_type_ids`,
  `labels`: (T,) for classify a scalar), padded to `max_length`. The model's encoder skips the
  padding in its per-token layers (bert_core.model.BertEncoder), so little compute goes to it.
  Tag labels sit on each word's first sub-token; other positions are -100 (ignored), as HF does.
- Labeled sets are small next to pretraining corpora, so the tokenized rows are materialized in
  Ray's object store (never in the driver) and reused by every epoch. The training rows are
  globally shuffled once (seeded) before that, since labeled files are often sorted by label; the
  workers add a per-epoch local shuffle on top.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipelines.pretrain_data import _tokenizer, read_parquet_v1, resolve_paths

KINDS = ("classify", "tag", "mlm")
IGNORE = -100  # label of positions that carry no loss


@dataclass
class TaskData:
    name: str = "task"  # head name; the export serves it as `raybert score --head NAME`
    kind: str = "classify"  # classify | tag | mlm
    paths: list = field(default_factory=list)  # Parquet files, directories or globs
    val_paths: list = field(default_factory=list)  # explicit validation set; else a hashed split
    text_column: str = "text"  # classify / mlm: the text
    text_pair_column: Optional[str] = None  # classify: optional second text (sentence pairs)
    label_column: Optional[str] = None  # default "label" (classify) or "tags" (tag)
    tokens_column: str = "tokens"  # tag: the words of each row
    labels: Optional[list] = None  # label names in id order; None = discovered from the data
    weight: float = 1.0  # mixing weight (see FinetuneOptions.mixing) and loss weight

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if isinstance(self.val_paths, str):
            self.val_paths = [self.val_paths]
        if self.label_column is None:
            self.label_column = {"classify": "label", "tag": "tags", "mlm": ""}[self.kind]
        if self.weight <= 0:
            raise ValueError(f"task {self.name}: weight must be > 0")


@dataclass
class FinetuneData:
    max_length: int = 128  # tokens per row (longer rows are truncated); classify / tag
    mlm_seq_len: int = 128  # packed row length of mlm tasks
    val_fraction: float = 0.1  # hashed validation share when a task has no val_paths
    split_seed: int = 0  # seed of the hashed split
    num_cpus: float = 0.25  # CPUs per read / tokenize task (fractional: Train workers never starve them)
    tokenize_batch_rows: int = 512


def is_val(text: str, val_fraction: float, split_seed: int) -> bool:
    return zlib.crc32(f"{split_seed}:{text}".encode("utf-8")) % 10_000 < val_fraction * 10_000


def _label_key(value):
    """Label values as they are keyed: ints stay ints (numpy ints included), the rest are str."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value


def encode_labels(values: list) -> tuple[dict[int, str], dict]:
    """Sorted distinct label values -> (id2label, value -> id)."""
    if any(v is None for v in values):
        raise ValueError("labels contain null")
    values = sorted({_label_key(v) for v in values}, key=lambda v: (isinstance(v, str), v))
    if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
        return {v: str(v) for v in values}, {v: v for v in values}
    id2label = {i: str(v) for i, v in enumerate(values)}
    return id2label, {v: i for i, v in enumerate(values)} | {str(v): i for i, v in enumerate(values)}


def check_columns(paths: list, columns: list) -> None:
    """Fail before any work if a file lacks a column, naming the file, the column and what it has."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    for path in resolve_paths(paths):
        files = [path] if "://" in path or not os.path.isdir(path) else pads.dataset(path, format="parquet").files
        for f in files:
            try:
                have = pq.read_schema(f).names
            except Exception as e:
                raise ValueError(f"{f}: not a readable Parquet file ({e})") from e
            missing = [c for c in columns if c not in have]
            if missing:
                raise ValueError(f"{f}: no column(s) {missing}; it has {have}. Set the task's "
                                 f"text_column / tokens_column / label_column to match")


def discover_labels(task: TaskData) -> list:
    """The distinct label values of a task's training (and validation) files, via Ray Data."""
    import pyarrow.compute as pc

    paths = resolve_paths(task.paths) + (resolve_paths(task.val_paths) if task.val_paths else [])
    check_columns(paths, [task.label_column])
    ds = read_parquet_v1(paths, columns=[task.label_column], include_paths=True)
    col = task.label_column

    def distinct(batch):
        # Errors travel as data: an exception raised in a Ray task reaches the driver as a
        # UserCodeException that has lost its type, so the driver raises it instead.
        import pyarrow as pa

        arr = batch.column(col)
        nulls = pc.is_null(arr)
        if task.kind == "tag":  # a null list, or a null tag inside one
            nulls = pa.array([v is None or None in v for v in arr.to_pylist()])
            arr = pc.list_flatten(arr.filter(pc.invert(pc.is_null(arr))))
        if pc.any(nulls).as_py():
            return pa.table({"v": pa.nulls(1, arr.type), "bad": [batch.filter(nulls).column("path")[0].as_py()]})
        uniq = pc.unique(arr)
        return pa.table({"v": uniq, "bad": pa.nulls(len(uniq), pa.string())})

    values = []
    for batch in ds.map_batches(distinct, batch_format="pyarrow", batch_size=None).iter_batches(
            batch_format="pyarrow"):
        for bad in batch.column("bad").drop_null().to_pylist():
            raise ValueError(f"{bad}: a row has a null {col!r}; every row needs a label "
                             f"(fix the row or drop it from the data)")
        values.extend(batch.column("v").to_pylist())
    if not values:
        raise ValueError(f"task {task.name}: no labels found in {task.paths}")
    return sorted(set(values), key=lambda v: (isinstance(v, str), v))


def _lookup(label2id: dict, value, path: str, task: TaskData) -> int:
    key = _label_key(value)
    if key not in label2id:
        raise ValueError(f"{path}: label {value!r} of task {task.name!r} is not one of "
                         f"{sorted(map(str, label2id))[:20]}; fix the row or add the label to the "
                         f"task's `labels`")
    return label2id[key]


def tokenize_labeled(batch, *, task: TaskData, tokenizer_path: str, label2id: dict, max_length: int,
                     val_fraction: float, split_seed: int, split: Optional[str]) -> dict:
    """A block of labeled rows -> model inputs and labels (see the module docstring).

    batch: a pyarrow.Table with the task's columns and `path`. `split` is "train" / "val" for the
    hashed split, or None to keep every row (an explicit validation file).
    Returns {"input_ids", "attention_mask", "token_type_ids": (N, T) int64, "labels": (N,) or (N, T)}.
    """
    tok = _tokenizer(tokenizer_path)
    cols = {name: batch.column(name).to_pylist() for name in batch.column_names}
    paths = cols["path"]
    if task.kind == "classify":
        texts, pairs = cols[task.text_column], cols.get(task.text_pair_column) if task.text_pair_column else None
        keys = [t if pairs is None else f"{t}\t{p}" for t, p in zip(texts, pairs or texts)]
    else:
        texts = cols[task.tokens_column]
        keys = [" ".join(w) if isinstance(w, list) else None for w in texts]
    keep = []
    for i, (key, path) in enumerate(zip(keys, paths)):
        text = texts[i]
        bad_text = (not isinstance(text, str)) if task.kind == "classify" else (
            not isinstance(text, list) or not all(isinstance(w, str) for w in text))
        if bad_text:
            what = "a string" if task.kind == "classify" else "a list of strings"
            raise ValueError(f"{path}: a row of task {task.name!r} has {task.text_column if task.kind == 'classify' else task.tokens_column!r} "
                             f"= {text!r}, not {what}; fix or drop the row")
        if split is None or is_val(key, val_fraction, split_seed) == (split == "val"):
            keep.append(i)
    T = max_length
    out = {k: np.zeros((len(keep), T), dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    if task.kind == "classify":
        out["labels"] = np.zeros((len(keep),), dtype=np.int64)
    else:
        out["labels"] = np.full((len(keep), T), IGNORE, dtype=np.int64)
    if not keep:
        return out
    sel_texts = [texts[i] for i in keep]
    if task.kind == "classify":
        sel_pairs = [pairs[i] for i in keep] if pairs is not None else None
        enc = tok(sel_texts, sel_pairs, truncation=True, max_length=T, padding="max_length")
        labels = [_lookup(label2id, cols[task.label_column][i], paths[i], task) for i in keep]
        out["labels"][:] = labels
    else:
        enc = tok(sel_texts, is_split_into_words=True, truncation=True, max_length=T, padding="max_length")
        for r, i in enumerate(keep):
            tags = cols[task.label_column][i]
            if not isinstance(tags, list) or len(tags) != len(texts[i]):
                raise ValueError(f"{paths[i]}: a row of task {task.name!r} has {len(texts[i])} words but "
                                 f"{'no' if not isinstance(tags, list) else len(tags)} tags; "
                                 f"give one tag per word")
            prev = None
            for t, w in enumerate(enc.word_ids(r)):
                if w is not None and w != prev:  # a word's first sub-token carries its label
                    out["labels"][r, t] = _lookup(label2id, tags[w], paths[i], task)
                prev = w
    out["input_ids"][:] = enc["input_ids"]
    out["attention_mask"][:] = enc["attention_mask"]
    out["token_type_ids"][:] = enc["token_type_ids"]
    return out


def tokenize_or_error(batch, **kwargs) -> dict:
    """tokenize_labeled for a Ray Data task: a data error comes back as the block's `error`
    (Ray would deliver a raised exception to the driver without its type), for the driver to raise."""
    try:
        out = tokenize_labeled(batch, **kwargs)
        out["error"] = np.array([""] * len(out["input_ids"]), dtype=object)
        return out
    except ValueError as e:
        T = kwargs["max_length"]
        label_shape = (1,) if kwargs["task"].kind == "classify" else (1, T)
        return {"input_ids": np.zeros((1, T), np.int64), "attention_mask": np.zeros((1, T), np.int64),
                "token_type_ids": np.zeros((1, T), np.int64), "labels": np.zeros(label_shape, np.int64),
                "error": np.array([str(e)], dtype=object)}


def _raise_errors(ds, task: TaskData) -> None:
    errors = [e for b in ds.select_columns(["error"]).iter_batches(batch_format="numpy") for e in b["error"] if e]
    if errors:
        more = f" (and {len(errors) - 1} more bad blocks)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)


def build_task_datasets(task: TaskData, cfg: FinetuneData, tokenizer_path: str, label2id: dict) -> dict:
    """{"train": ds, "val": ds} of one task, materialized (see the module docstring)."""
    if task.kind == "mlm":
        from pipelines.pretrain_data import DataConfig, build_datasets

        data = DataConfig(paths=task.paths, text_column=task.text_column, seq_len=cfg.mlm_seq_len,
                          val_fraction=0.0, num_cpus=cfg.num_cpus, tokenize_batch_rows=cfg.tokenize_batch_rows)
        return {"train": build_datasets(data, tokenizer_path)["train"].materialize()}
    columns = ([task.text_column] + ([task.text_pair_column] if task.text_pair_column else [])
               if task.kind == "classify" else [task.tokens_column])
    columns.append(task.label_column)
    check_columns(task.paths + task.val_paths, columns)
    out = {}
    sources = {"train": (task.paths, "train" if not task.val_paths else None)}
    if task.val_paths:
        sources["val"] = (task.val_paths, None)
    elif cfg.val_fraction > 0:
        sources["val"] = (task.paths, "val")
    for name, (paths, split) in sources.items():
        ds = read_parquet_v1(resolve_paths(paths), columns=columns, include_paths=True, num_cpus=cfg.num_cpus)
        ds = ds.map_batches(tokenize_or_error, batch_format="pyarrow", batch_size=cfg.tokenize_batch_rows,
                            num_cpus=cfg.num_cpus,
                            fn_kwargs=dict(task=task, tokenizer_path=tokenizer_path, label2id=label2id,
                                           max_length=cfg.max_length, val_fraction=cfg.val_fraction,
                                           split_seed=cfg.split_seed, split=split))
        ds = ds.materialize()
        _raise_errors(ds, task)  # before any training: a bad row fails the job, never dropped
        ds = ds.drop_columns(["error"])
        if name == "train":
            # One global shuffle: labeled files are often sorted by label (all negatives, then all
            # positives), and the workers' local shuffle buffers alone can't undo that.
            ds = ds.random_shuffle(seed=cfg.split_seed)
        out[name] = ds.materialize()
    return out


