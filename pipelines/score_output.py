"""A scoring output and its checkpoint dir: what is in them, what may be deleted, what a resume
must match. Driver side; every path question goes through pipelines/storage.py.

Contract:
- `MANIFEST` (`_SUCCESS.json`, written last: the run's summary) and `RUN_RECORD`
  (`_raybert_run.json`, written before any row: the proof that the output is ours, and its recipe).
- `check_output` refuses an output or checkpoint dir that overlaps an input or each other (in any
  spelling), is a file or can't be created; with overwrite, one that isn't provably ours.
- `run_recipe` / `check_resume`: a resume, or a rerun of a finished output, under another recipe
  is refused, naming each difference.
- `data_files`, `output_totals`, `output_dtypes`, `read_output`: what the output holds;
  `repair_duplicates` keeps one row per `row_hash` after overlapping writers.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.inputs import InputPlan
from pipelines.predictors import DTYPE_METADATA
from pipelines.score_config import ScoreConfig

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS.json"
# Written into the output when a run starts, before any row: the proof that the output is ours
# (all that `overwrite` may delete) and the run's recipe, which a resume must match.
RUN_RECORD = "_raybert_run.json"
# In the checkpoint dir of a CPU run (pipelines/score_units.py): its unit plan, and the mark of an unfinished run.
UNITS_RECORD = "_raybert_units.json"


def default_checkpoint_dir(output: str) -> str:
    return storage.normalize(output) + ".checkpoint"


# CSV and JSON Lines inputs are staged here as Parquet before scoring (see `stage_inputs`).
STAGED = "_staged"


def data_files(output: str) -> list[str]:
    """The output's Parquet data files: nothing whose path below the output has a part starting with
    `_` or `.` (the manifest, the run record, STAGED inputs)."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(output)
    base = base.rstrip("/")
    return [f.path for f in storage.listing(output)
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in f.path[len(base):].lstrip("/").split("/"))]


def stage_inputs(output: str, plan: InputPlan, text_columns: tuple) -> dict[str, str]:
    """{file the units are planned on: the input it holds}. Parquet inputs are read as they are. A
    CSV or JSON Lines input is first written as Parquet under `<output>/_staged/` (its needed
    columns, in file order, whole or absent), because units are slices of Parquet row groups and
    rows are keyed by (file, row position); a resumed run reuses the staged files (same inputs, same
    order: the run record's recipe holds them). `finish` deletes them."""
    from pipelines.inputs import TableFile

    staged, out = {}, storage.normalize(output)
    for i, f in enumerate(plan.found):
        if f.format == "parquet":
            staged[f.name] = f.name
            continue
        target = storage.join(out, STAGED, f"{i:05d}.parquet")
        if not storage.exists(target):
            _write_staged(TableFile(f, text_columns), plan.columns, target)
        staged[target] = f.name
    return staged


def ray_path(name: str) -> str:
    """A file as Ray Data's `path` column spells it: a URI without its scheme."""
    return name.split("://", 1)[1] if storage.is_uri(name) else name


def _write_staged(table, columns: list, target: str) -> None:
    import pyarrow as pa

    fs, path = storage.filesystem(target)
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")  # listings skip "." files
    writer = None
    for batch in table.iter_batches(columns=columns):
        writer = writer or pq.ParquetWriter(tmp, batch.schema, filesystem=fs)
        writer.write_batch(batch)
    if writer is None:  # no rows: an empty file of the columns
        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in columns}), tmp, filesystem=fs)
    else:
        writer.close()
    fs.move(tmp, path)  # whole or absent


def output_dtypes(output: str) -> str:
    """The precision(s) the predictors ran in, from the output files' schema metadata (each
    block carries it; see predictors.DTYPE_METADATA), sorted and comma-joined."""
    fs, _ = storage.filesystem(output)
    found = set()
    for f in data_files(output):
        meta = pq.read_schema(f, filesystem=fs).metadata or {}
        if DTYPE_METADATA.encode() in meta:
            found.add(meta[DTYPE_METADATA.encode()].decode())
    return ",".join(sorted(found))


def output_totals(output: str) -> tuple[int, int, int]:
    """(rows, error rows, tokens) of everything written under `output`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = data_files(output)
    if not files:
        return 0, 0, 0
    fs, _ = storage.filesystem(output)
    t = pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=["n_tokens", "error"])
    tokens = pc.sum(t["n_tokens"]).as_py() or 0
    return t.num_rows, t.num_rows - t["error"].null_count, int(tokens)


def uncreatable(path: str) -> Optional[str]:
    """Why local directory `path` can't be created, or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def check_output(output: str, checkpoint_dir: str, inputs: list[str], plan: InputPlan, overwrite: bool) -> None:
    """Refuse, before anything is created or deleted, an output or checkpoint dir that overlaps an
    input (equal, or one inside the other, in any spelling: `file://`, relative, symlinked) or each
    other, is an existing file or can't be created; and with overwrite, an output that holds
    anything but a previous output of this job (ours: it holds our manifest or run record, or it
    is empty; an existing checkpoint dir proves nothing), or a checkpoint dir holding anything but
    scoring checkpoint files."""
    import pyarrow.fs as pafs

    out, ckpt = storage.canonical(output), storage.canonical(checkpoint_dir)
    if storage.overlaps(out, ckpt):
        raise ValueError(f"checkpoint dir {checkpoint_dir} and output {output} overlap; keep them apart "
                         f"(the default checkpoint dir is {default_checkpoint_dir(output)})")
    sources = {storage.canonical(f) for f in plan.files} | {storage.canonical(i) for i in inputs if not any(c in i for c in "*?[")}
    for path, what in ((out, "output"), (ckpt, "checkpoint dir")):
        for src in sorted(sources):
            if storage.overlaps(path, src):
                raise ValueError(f"{what} {path} overlaps input {src}: scoring must never write into, or "
                                 f"overwrite delete, its inputs; choose an {what} outside the inputs")
    for path, what in ((output, "output"), (checkpoint_dir, "checkpoint dir")):
        kind = storage.file_type(path)
        if kind == pafs.FileType.File:
            raise ValueError(f"{what} {path} is an existing file; give a directory path (it is created)")
        if kind == pafs.FileType.NotFound and not storage.is_uri(path) and (why := uncreatable(path)):
            raise ValueError(f"{what} {path} can't be created: {why}; choose another path")
    if not overwrite:
        return
    ours = (storage.exists(storage.join(output, MANIFEST)) or storage.exists(storage.join(output, RUN_RECORD)))
    if storage.listing(output) and not ours:
        raise ValueError(f"{output} is not an output of raybert score (no {MANIFEST} or {RUN_RECORD}, and not "
                         f"empty): overwrite deletes only a previous output of this job; choose another output, "
                         f"or remove {output} yourself")
    # A run writes only its UNITS_RECORD there; Ray Data (an earlier raybert's GPU path) wrote only
    # <id>[.pending].parquet files, which overwrite may delete too.
    foreign = [f.path for f in storage.listing(checkpoint_dir) if f.type != pafs.FileType.File
               or not (f.path.endswith(".parquet") or storage.basename(f.path) == UNITS_RECORD)]
    if foreign:
        raise ValueError(f"checkpoint dir {checkpoint_dir} holds files that are not scoring (or Ray Data) checkpoint files "
                         f"(e.g. {foreign[0]}); overwrite would delete them: choose another checkpoint dir, "
                         f"or remove it yourself")


def repair_duplicates(output: str) -> int:
    """Rewrite the output files that repeat a `row_hash` so each key is kept once (its first copy,
    in file order); a row that exists once is never dropped. Returns the rows dropped. Repeats
    come from writers that overlapped (two runs on one output, before the output lock) and, kept
    in the checkpoint as committed, would otherwise fail every rerun's row count."""
    import numpy as np

    files = sorted(data_files(output))
    fs, _ = storage.filesystem(output)
    keys = []
    for f in files:
        cols = pq.read_schema(f, filesystem=fs).names
        if "row_hash" not in cols:
            return 0  # not an output of ours with keys: nothing we can tell apart
        keys.append(pq.read_table(f, columns=["row_hash"], filesystem=fs)["row_hash"].to_numpy())
    if not keys:
        return 0
    flat = np.concatenate(keys)
    keep = np.zeros(len(flat), dtype=bool)
    keep[np.unique(flat, return_index=True)[1]] = True
    if keep.all():
        return 0
    start = 0
    for f, k in zip(files, keys):
        mask = keep[start:start + len(k)]
        start += len(k)
        if mask.all():
            continue
        if not mask.any():
            fs.delete_file(f)
            continue
        table = pq.read_table(f, filesystem=fs).filter(pa.array(mask))
        tmp = os.path.join(os.path.dirname(f), "." + os.path.basename(f) + ".tmp")  # readers skip "." files
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, f)  # atomic on a filesystem: a file is old or repaired, never half
    dropped = int(len(flat) - keep.sum())
    log.warning("%s: dropped %d duplicate row(s) (repeated row_hash) left by overlapping writers", output, dropped)
    return dropped


def read_json(path: str) -> Optional[dict]:
    text = storage.read_text(path)
    return json.loads(text) if text else None


def write_json(path: str, body: dict) -> None:
    storage.write_text(path, json.dumps(body, indent=2, default=str))  # whole or absent


def model_fingerprint(local: str) -> str:
    """Identifies a checkpoint's contents: its config.json and the names and sizes of its weight
    files (retraining into the same directory changes it; reading gigabytes of weights is not needed)."""
    import hashlib

    h = hashlib.sha256()
    with open(os.path.join(local, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(local)):
        if name.endswith((".safetensors", ".bin", ".pt")):
            h.update(f"{name}:{os.path.getsize(os.path.join(local, name))}".encode())
    return h.hexdigest()[:16]


def run_recipe(cfg: ScoreConfig, plan: InputPlan, max_length: int, local_model: str) -> dict:
    """What makes one output's rows comparable: a run resumed, or a finished output reported, under
    a different recipe would mix two kinds of rows in one output."""
    return {"task": cfg.task, "model": storage.canonical(str(cfg.model)), "model_fingerprint": model_fingerprint(local_model),
            "tokenizer": cfg.tokenizer and storage.canonical(str(cfg.tokenizer)), "head": cfg.head, "max_length": max_length,
            "pooling": cfg.pooling, "normalize": cfg.normalize, "top_k": cfg.top_k if cfg.task == "fill-mask" else None,
            "dtype": cfg.dtype, "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
            "id_column": cfg.id_column, "inputs": plan.files}


def recipe_differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key, value in now.items():
        if key in saved and saved[key] != value:
            was = saved[key]
            if key == "inputs":
                out.append(f"inputs ({len(was)} file(s) -> {len(value)}, other files)")
            else:
                out.append(f"{key} {was} -> {value}")
    return out


def check_resume(output: str, checkpoint_dir: str, recipe: dict) -> None:
    """Refuse, on the driver, to resume or report an output under another recipe (task, model,
    head, lengths, pooling, dtype, inputs...): its rows would be mixed with rows of another kind.
    A checkpoint dir with no run record in the output is not a run of this job to resume."""
    done = read_json(storage.join(output, MANIFEST))
    if done is not None:
        saved = done.get("recipe") or {k: done.get(k) for k in ("task", "model", "head")} | {"inputs": done.get("inputs")}
        diffs = recipe_differences(saved, recipe)
        if diffs:
            raise FileExistsError(f"{output} holds a finished run of another recipe: {'; '.join(diffs)} (saved -> now); "
                                  f"choose another output, or pass --overwrite (YAML: overwrite: true) to score it again")
        return
    if not storage.exists(checkpoint_dir):
        return
    saved = read_json(storage.join(output, RUN_RECORD))
    if saved is None:
        raise FileExistsError(f"checkpoint dir {checkpoint_dir} exists but {output} has no {RUN_RECORD}: it is not a "
                              f"run of this job to resume; choose another output and checkpoint dir, or pass --overwrite (YAML: overwrite: true)")
    diffs = recipe_differences(saved.get("recipe", {}), recipe)
    if diffs:
        raise FileExistsError(f"{output} holds an unfinished run of another recipe: {'; '.join(diffs)} (saved -> now); "
                              f"resume it with its own settings, choose another output, or pass --overwrite (YAML: overwrite: true) to start over")


def read_output(output: str, columns: Optional[list[str]] = None) -> pa.Table:
    """All output rows as one table (for tests and peeks)."""
    import pyarrow.dataset as pads

    files = data_files(output)
    if not files:
        return pa.table({})
    fs, _ = storage.filesystem(output)
    return pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)
