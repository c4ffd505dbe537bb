"""Labeled data for fine-tuning: Parquet, CSV or JSON Lines -> tokenized, label-encoded rows, on Ray Data.

Contract:
- A task reads its own files (`TaskData.paths`: Parquet, CSV or JSON Lines). By kind:
    classify  `text` (+ optional `text_pair`) and `label`: a label name (string) or an int;
    tag       `tokens` (list of words) and `tags` (list of BIO labels, one per word), CoNLL style;
              in CSV, which has no lists, both are space-joined strings ("EU rejects German"),
              split on whitespace (`word_lists`);
    mlm       `text` only: an auxiliary masked-LM task, packed as in pretraining.
- Labels: `TaskData.labels` fixes the names in id order; otherwise they are discovered on the
  driver from the files' label column alone (pyarrow, a batch at a time, no Ray work) and sorted
  (ints numerically, and then an int label `k` keeps id `k` when the labels are exactly 0..K-1).
  A row whose label is null or blank (a CSV's empty field) or not in the list fails the job with
  an error that names the file, the row or label and the fix: nothing is silently dropped.
- A head must be trainable: its training rows need at least 2 classes (one class "trains" a head
  whose validation F1 reads 1.0), and a discovered label that only validation rows have (an
  untrained class) is an error; list `labels` explicitly to allow it. Files whose label columns
  differ in type (ints in one, strings in another) are refused, since 1 and "1" are different
  labels. These checks run before training: per file at discovery, and on the split rows (the
  hashed split, listed labels) once tokenized.
- Files: what Ray Data reads (`inputs.input_files`): directories recursively, Parquet, CSV and
  JSON Lines files only (by extension), names starting with '.' or '_' skipped; a listed file with
  another suffix is an error, not skipped.
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

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from pipelines import UserError
from pipelines.inputs import (FORMATS, TableFile, input_files, names_list, read_dataset,
                              refuse_repeated_columns)
from pipelines.training.pretrain_data import cached_tokenizer

KINDS = ("classify", "tag", "mlm")
IGNORE = -100  # label of positions that carry no loss


@dataclass
class TaskData:
    name: str = "task"  # head name; the export serves it as `raybert score --head NAME`
    kind: str = "classify"  # classify | tag | mlm
    paths: list = field(default_factory=list)  # Parquet/CSV/JSON Lines files, directories or globs
    val_paths: list = field(default_factory=list)  # explicit validation set; else a hashed split
    text_column: str = "text"  # classify / mlm: the text
    text_pair_column: Optional[str] = None  # classify: optional second text (sentence pairs)
    label_column: Optional[str] = None  # default "label" (classify) or "tags" (tag)
    tokens_column: str = "tokens"  # tag: the words of each row
    labels: Optional[list] = None  # label names in id order; None = discovered from the data
    weight: float = 1.0  # mixing weight (see FinetuneOptions.mixing) and loss weight

    def __post_init__(self):
        # Defaults that depend on the kind; the fields' rules are pipelines/settings.py's.
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if isinstance(self.val_paths, str):
            self.val_paths = [self.val_paths]
        if self.label_column is None:
            self.label_column = {"classify": "label", "tag": "tags", "mlm": ""}.get(self.kind)


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


def label_key(value):
    """Label values as they are keyed: ints stay ints (numpy ints included), the rest are str."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value


class LabelMaps(NamedTuple):
    id2label: dict  # id -> label name
    label2id: dict  # label value (and its string) -> id


def encode_labels(values: list) -> LabelMaps:
    """Sorted distinct label values -> (id2label, value -> id)."""
    if any(v is None for v in values):
        raise UserError("labels contain null")
    values = sorted({label_key(v) for v in values}, key=lambda v: (isinstance(v, str), v))
    if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
        return LabelMaps({v: str(v) for v in values}, {v: v for v in values})
    id2label = {i: str(v) for i, v in enumerate(values)}
    return LabelMaps(id2label, {v: i for i, v in enumerate(values)} | {str(v): i for i, v in enumerate(values)})


def _read_schemas(files: list, columns: list, text_columns: tuple = ()) -> dict:
    """{file name: schema} of input_files' files (Parquet: footers only); a file that can't be read
    or lacks a column fails, naming the file, the column and what it has."""
    schemas = {}
    for f in files:
        name, schema = f.name, TableFile(f, text_columns, tuple(columns)).schema
        refuse_repeated_columns(name, schema.names, columns)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise UserError(f"{name}: no column(s) {missing}; it has {schema.names}. Set the task's "
                             f"text_column / tokens_column / label_column to match")
        schemas[name] = schema
    return schemas


def _value_kind(t) -> str:
    """What a label column holds, as far as mixing files goes: int32 and int64 files mix, an int
    file and a string file don't (1 and "1" would be two labels)."""
    import pyarrow as pa

    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_dictionary(t):
        t = t.value_type  # tags: the tag type; pandas categoricals: the category type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _check_label_types(task: TaskData, schemas: dict) -> None:
    """Refuse files whose label columns hold different kinds of value (see _value_kind): an int 1
    and a string "1" are two labels, and Ray Data can't put such files in one dataset."""
    col = task.label_column
    by_kind: dict[str, list] = {}
    for name, schema in schemas.items():
        kind = _value_kind(schema.field(col).type)
        if kind != "null":  # an all-null column: the null-label check names its file
            by_kind.setdefault(kind, []).append(name)
    if len(by_kind) > 1:
        listed = "; ".join(f"{kind} in {names_list(files, 3)}" for kind, files in by_kind.items())
        csv = any(n.lower().endswith(FORMATS["csv"]) for files in by_kind.values() for n in files)
        fix = (f"a CSV has no types: its {col!r} column of digits reads as ints, so write the other files' labels "
               f"as ints too (or the CSV's as words)" if csv else f"e.g. write every {col!r} as a string")
        raise UserError(f"task {task.name!r}: the {col!r} column has different types across files ({listed}); "
                         f"an int label and a string label are different labels, so use one type in "
                         f"every file ({fix})")


def label_values_by_file(task: TaskData, files: list) -> dict[str, set]:
    """{file name: its distinct label values} of a classify / tag task's `files` (input_files'
    entries), read on the driver from the label column (and a tag task's words) alone, a batch at a
    time (no Ray work, no text read).

    Raises ValueError, naming the files, if the files disagree on the label type (an int column in
    one, strings in another), and naming the row if a row has a null or blank label, a label with
    spaces around it (it would be a class of its own beside the bare one), or (tag) no tags, a
    blank tag, or another number of tags than words.
    """
    col = task.label_column
    columns = [col] + ([task.tokens_column] if task.kind == "tag" else [])
    texts = (task.text_column, task.text_pair_column) if task.kind == "classify" else ()
    _check_label_types(task, _read_schemas(files, columns, texts))
    out = {}
    for f in files:
        name, values, row = f.name, set(), 0
        for batch in TableFile(f, texts, tuple(columns)).iter_batches(batch_size=65_536, columns=columns):
            labels = word_lists(batch.column(0)) if task.kind == "tag" else batch.column(0)
            words = word_lists(batch.column(1)).to_pylist() if task.kind == "tag" else None
            for i, value in enumerate(labels.to_pylist()):
                problem = _label_problem(value, task.kind, words[i] if words is not None else None, col)
                if problem:
                    raise UserError(f"{name}: row {row + i + 1} {problem}: fix the row or drop it from the data")
                values.update(value if task.kind == "tag" else [value])
            row += batch.num_rows
        fractional = sorted(v for v in values if isinstance(v, float) and not v.is_integer())
        if fractional:  # a score or a probability, not a class: 0.5 would become a class of its own
            raise UserError(f"{name}: {col!r} holds {fractional[0]!r}, which is not a class label: the {task.kind} "
                             f"task {task.name!r} needs class labels (strings or whole numbers), not "
                             f"fractional values; map the values to classes first")
        out[name] = values
    return out


def _label_problem(value, kind: str, words: Optional[list], col: str) -> Optional[str]:
    """What is wrong with one row's label (a tag task: its tags, beside its words), or None."""
    what = "tag" if kind == "tag" else "label"
    items = value if kind == "tag" else [value]
    # A CSV's empty field reads as "": it would be a class of its own.
    if not items or any(v is None or (isinstance(v, str) and not v.strip()) for v in items):
        none = "no tags, or a blank tag" if kind == "tag" else "no label"
        return f"has {none} (column {col!r} is null or empty there); every row needs a {what}"
    spaced = next((v for v in items if isinstance(v, str) and v != v.strip()), None)
    if spaced is not None:  # "pos " beside "pos": two classes
        return (f"has the {what} {spaced!r} (column {col!r}), with spaces around it: a {what} of its own beside "
                f"{spaced.strip()!r}; write it without them")
    if kind == "tag" and isinstance(words, list) and len(words) != len(value):
        return f"has {len(value)} tags for {len(words)} words (column {col!r}); give one tag per word"
    return None


def word_lists(arr):
    """A tag task's words or tags as lists: a list column as it is; a string column (CSV, which has
    no lists) split on whitespace, CoNLL-style ("B-PER I-PER O"), as `str.split()` splits (spaces
    at either end make no empty tag)."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.array([v.split() if isinstance(v, str) else v for v in arr.to_pylist()], pa.list_(pa.string()))
    return arr


def _check_classes(task: TaskData, labels: set, files: list, where: str = "training rows") -> None:
    """A head needs at least two classes in its training rows; with one it learns nothing and its
    validation F1 reads 1.0."""
    if len(labels) >= 2:
        return
    found = f"only the label {next(iter(labels))!r}" if labels else "no label"
    what = "a tagger needs at least 2 tags" if task.kind == "tag" else "a classifier needs at least 2 classes"
    raise UserError(f"task {task.name!r}: the {where} in {names_list(files)} have {found}; {what} in its "
                     f"training rows: add training rows of the other class(es)")


def _val_only_error(task: TaskData, only: dict, where: str) -> UserError:
    """only: {label: files it occurs in}."""
    listed = "; ".join(f"{label!r} (in {names_list(files, 3)})" for label, files in sorted(only.items(), key=str))
    return UserError(f"task {task.name!r}: label(s) {listed} occur only in {where}, never in the training "
                      f"rows, so the head would have classes it never trained; add training rows for "
                      f"them, or list the task's `labels` explicitly in the config if that is intended")


def discover_labels(task: TaskData) -> list:
    """The distinct label values of a task's training (and validation) files, sorted (ints before
    strings), read on the driver before any Ray work. Raises ValueError (see label_values_by_file)
    if the training files hold fewer than 2 labels, or the validation files hold a label that the
    training files lack."""
    train_files = input_files(task.paths)
    val_files = input_files(task.val_paths) if task.val_paths else []
    by_file = label_values_by_file(task, train_files + val_files)
    train, val = [f.name for f in train_files], [f.name for f in val_files]
    values = set().union(*by_file.values())
    if not values:
        raise UserError(f"task {task.name}: no labels found in {task.paths}")
    train_values = set().union(*(by_file[f] for f in train))
    # The hashed split trains on a subset of these rows: this check is necessary there, and
    # build_task_datasets repeats it on the split itself.
    _check_classes(task, train_values, train, "training files")
    only = {}
    for f in val:
        for v in by_file[f] - train_values:
            only.setdefault(v, []).append(f)
    if only:
        raise _val_only_error(task, only, "the validation data")
    return sorted(values, key=lambda v: (isinstance(v, str), v))


def _lookup(label2id: dict, value, path: str, task: TaskData) -> int:
    key = label_key(value)
    if key not in label2id:
        raise UserError(f"{path}: label {value!r} of task {task.name!r} is not one of "
                         f"{sorted(map(str, label2id))[:20]}; fix the row or add the label to the "
                         f"task's `labels`")
    return label2id[key]


def _split(values: list) -> list:
    """Space-joined words or tags (a CSV's) as lists; lists as they are."""
    return [v.split() if isinstance(v, str) else v for v in values]


def tokenize_labeled(batch, *, task: TaskData, tokenizer_path: str, label2id: dict, max_length: int,
                     val_fraction: float, split_seed: int, split: Optional[str]) -> dict:
    """A block of labeled rows -> model inputs and labels (see the module docstring).

    batch: a pyarrow.Table with the task's columns and `path`. `split` is "train" / "val" for the
    hashed split, or None to keep every row (an explicit validation file).
    Returns {"input_ids", "attention_mask", "token_type_ids": (N, T) int64, "labels": (N,) or (N, T)}.
    """
    tok = cached_tokenizer(tokenizer_path)
    cols = {name: batch.column(name).to_pylist() for name in batch.column_names}
    paths = cols["path"]
    if task.kind == "classify":
        texts, pairs = cols[task.text_column], cols.get(task.text_pair_column) if task.text_pair_column else None
        keys = [t if pairs is None else f"{t}\t{p}" for t, p in zip(texts, pairs or texts)]
    else:  # words and tags as lists (a CSV's space-joined strings split, as `word_lists` does)
        texts = cols[task.tokens_column] = _split(cols[task.tokens_column])
        cols[task.label_column] = _split(cols[task.label_column])
        keys = [" ".join(w) if isinstance(w, list) else None for w in texts]
    keep = []
    for i, (key, path) in enumerate(zip(keys, paths)):
        text = texts[i]
        bad_text = (not isinstance(text, str)) if task.kind == "classify" else (
            not isinstance(text, list) or not all(isinstance(w, str) for w in text))
        if bad_text:
            what = "a string" if task.kind == "classify" else "a list of strings"
            raise UserError(f"{path}: a row of task {task.name!r} has {task.text_column if task.kind == 'classify' else task.tokens_column!r} "
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
                raise UserError(f"{paths[i]}: a row of task {task.name!r} has {len(texts[i])} words but "
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
        raise UserError(errors[0] + more)


def _block_label_ids(batch: dict) -> dict:
    labels = batch["labels"]  # (N,) or (N, T)
    return {"id": np.unique(labels[labels != IGNORE])}


def _label_ids(ds, num_cpus: float) -> set:
    """The label ids that occur in tokenized rows (one small Ray task per materialized block)."""
    ids = ds.select_columns(["labels"]).map_batches(_block_label_ids, batch_format="numpy", batch_size=None,
                                                    num_cpus=num_cpus)
    return {int(i) for b in ids.iter_batches(batch_format="numpy") for i in b["id"]}


def _check_split_labels(task: TaskData, cfg: FinetuneData, splits: dict, label2id: dict) -> None:
    """On the rows that will train: at least 2 classes, and (labels discovered, not listed) no class
    that only validation rows have. discover_labels checks this per file; this also covers the
    hashed split and a task that lists its labels."""
    name_of = {i: str(k) for k, i in label2id.items()}
    train_ids = _label_ids(splits["train"], cfg.num_cpus)
    train_files = [f.name for f in input_files(task.paths)]
    where = "training rows" if task.val_paths or "val" not in splits else (
        f"training rows of the hashed split (val_fraction {cfg.val_fraction}, split_seed {cfg.split_seed})")
    _check_classes(task, {name_of[i] for i in train_ids}, train_files, where)
    if "val" not in splits or task.labels is not None:
        return
    only_val = {name_of[i] for i in _label_ids(splits["val"], cfg.num_cpus) - train_ids}
    if only_val:
        only = {}
        for f, values in label_values_by_file(task, input_files(task.val_paths or task.paths)).items():
            for v in {str(v) for v in values} & only_val:
                only.setdefault(v, []).append(f)
        where = "the validation data" if task.val_paths else (
            f"the hashed validation split (val_fraction {cfg.val_fraction}, split_seed {cfg.split_seed}; "
            f"the label's rows all hash there)")
        raise _val_only_error(task, only, where)


def build_task_datasets(task: TaskData, cfg: FinetuneData, tokenizer_path: str, label2id: dict) -> dict:
    """{"train": ds, "val": ds} of one task, materialized (see the module docstring).

    Raises ValueError before any training if a row is bad or the split leaves the head with fewer
    than 2 trained classes or a class only validation rows have (see _check_split_labels)."""
    from pipelines.compat import pace_idle_data_scheduler

    pace_idle_data_scheduler()
    if task.kind == "mlm":
        from pipelines.training.pretrain_data import DataConfig, build_datasets

        data = DataConfig(paths=task.paths, text_column=task.text_column, seq_len=cfg.mlm_seq_len,
                          val_fraction=0.0, num_cpus=cfg.num_cpus, tokenize_batch_rows=cfg.tokenize_batch_rows)
        return {"train": build_datasets(data, tokenizer_path)["train"].materialize()}
    columns = ([task.text_column] + ([task.text_pair_column] if task.text_pair_column else [])
               if task.kind == "classify" else [task.tokens_column])
    columns.append(task.label_column)
    # Also when the task lists its labels (discovery, which checks the types too, is skipped then).
    texts = (task.text_column, task.text_pair_column) if task.kind == "classify" else ()
    _check_label_types(task, _read_schemas(input_files(task.paths + task.val_paths), columns, texts))
    sources = {"train": (task.paths, "train" if not task.val_paths else None)}
    if task.val_paths:
        sources["val"] = (task.val_paths, None)
    elif cfg.val_fraction > 0:
        sources["val"] = (task.paths, "val")
    splits = {}
    for name, (paths, split) in sources.items():
        ds = read_dataset(input_files(paths), columns, text_columns=texts, include_paths=True, num_cpus=cfg.num_cpus)
        ds = ds.map_batches(tokenize_or_error, batch_format="pyarrow", batch_size=cfg.tokenize_batch_rows,
                            num_cpus=cfg.num_cpus,
                            fn_kwargs=dict(task=task, tokenizer_path=tokenizer_path, label2id=label2id,
                                           max_length=cfg.max_length, val_fraction=cfg.val_fraction,
                                           split_seed=cfg.split_seed, split=split))
        ds = ds.materialize()
        _raise_errors(ds, task)  # before any training: a bad row fails the job, never dropped
        splits[name] = ds.drop_columns(["error"])
    _check_split_labels(task, cfg, splits, label2id)
    # One global shuffle: labeled files are often sorted by label (all negatives, then all
    # positives), and the workers' local shuffle buffers alone can't undo that.
    out = {"train": splits["train"].random_shuffle(seed=cfg.split_seed).materialize()}
    if "val" in splits:
        out["val"] = splits["val"].materialize()
    return out
