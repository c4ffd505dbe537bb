"""A scoring output and its checkpoint dir: what is in them, what may be deleted, what a resume
must match. Driver side; every path question goes through pipelines/storage.py.

Contract:
- `MANIFEST` (`_SUCCESS.json`, written last: the run's summary) and `RUN_RECORD`
  (`_raybert_run.json`, written before any row: the proof that the output is ours, its recipe,
  the layout that wrote it (`scorer`) and its staged copies).
- What raybert writes is one rule (`LAYOUTS`, `layout`, `is_ours`): the run record, the manifest,
  `_staged/`, unit files and their temp files (Ray Data's Parquet files for an output its run
  record says Ray Data wrote); in a checkpoint dir, UNITS_RECORD and Ray Data's row checkpoints.
  Everything else is the user's: `check_output` refuses, naming it, an output or checkpoint dir
  that holds any of it (overwrite or not: a run never writes beside it), and `remove_ours`, the
  only deleter (--overwrite, `finish`, a report), deletes nothing else. A symlink below the output
  is never ours and never followed; an output that is a symlink to a directory is used through it.
- `check_output` also refuses an output or checkpoint dir that overlaps an input or each other
  (in any spelling), is a file, a dangling symlink, or can't be created.
- What a resume must match (the recipe, the inputs' content): pipelines/scoring/resume.py.
  `stage_inputs` restages a staged copy that doesn't match the run record's entry for it (its
  source's fingerprint, its own size).
- `data_files`, `output_totals`, `output_dtypes`, `read_output`: what the output holds;
  `repair_duplicates` keeps one row per `row_hash` after overlapping writers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import PathInTheWay, UserError
from pipelines import storage
from pipelines.inputs import InputPlan, names_list
from pipelines.scoring.predictors import DTYPE_METADATA

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS.json"
# Written into the output when a run starts, before any row: the proof that the output is ours
# (all that `overwrite` may delete) and the run's recipe, which a resume must match.
RUN_RECORD = "_raybert_run.json"
# In the checkpoint dir of a CPU run (pipelines/scoring/units.py): its unit plan, and the mark of an unfinished run.
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


def stage_inputs(output: str, plan: InputPlan, text_columns: tuple, record: dict) -> dict[str, str]:
    """{file the units are planned on: the input it holds}. Parquet inputs are read as they are. A
    CSV or JSON Lines input is first written as Parquet under `<output>/_staged/` (its needed
    columns, in file order, whole or absent), because units are slices of Parquet row groups and
    rows are keyed by (file, row position). `record["staged"]` (the run record's; the caller saves
    it) holds, per staged copy, its source and the source's fingerprint, and the copy's size: a
    resume reuses a copy that matches its entry, and deletes and stages again one that doesn't (or
    has none: a kill before the record was saved, an older raybert), so its rows never come from
    a stale copy. `finish` deletes them."""
    from pipelines.inputs import TableFile

    staged, out, entries = {}, storage.normalize(output), record.setdefault("staged", {})
    for i, f in enumerate(plan.found):
        if f.format == "parquet":
            staged[f.name] = f.name
            continue
        name = f"{i:05d}.parquet"
        target, want = storage.join(out, STAGED, name), {"source": f.name, "fingerprint": plan.fingerprints[f.name]}
        if not _staged_matches(target, entries.get(name), want):
            storage.remove_file(target)
            _write_staged(TableFile(f, text_columns), plan.columns, target)
            entries[name] = {**want, "size": _size(target)}
        staged[target] = f.name
    return staged


def _size(loc: str) -> Optional[int]:
    """A file's size in bytes; None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(loc)
    with storage.reachable(loc):
        info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def _staged_matches(target: str, entry: Optional[dict], want: dict) -> bool:
    """A staged copy holds its source as it is now: the run record's entry names that source with
    its current fingerprint, and the copy is there, whole (its recorded size)."""
    return (entry is not None and {k: entry.get(k) for k in want} == want and entry.get("size") is not None
            and _size(target) == entry["size"])


def ray_path(name: str) -> str:
    """A file as Ray Data's `path` column spells it: a URI without its scheme."""
    return name.split("://", 1)[1] if storage.is_uri(name) else name


def _write_staged(table, columns: list, target: str) -> None:
    import pyarrow as pa

    with storage.replacing(target) as (fs, path):  # whole or absent
        writer = None
        for batch in table.iter_batches(columns=columns):
            writer = writer or pq.ParquetWriter(path, batch.schema, filesystem=fs)
            writer.write_batch(batch)
        if writer is None:  # no rows: an empty file of the columns
            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in columns}), path, filesystem=fs)
        else:
            writer.close()


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


class RowCounts(NamedTuple):
    """What scored rows add up to: of a whole output (`output_totals`), or of one unit's file (what
    a predictor actor's `score` returns)."""

    rows: int
    error_rows: int  # rows with an `error` value (no outputs)
    tokens: int  # sum of n_tokens

    @classmethod
    def of(cls, table: pa.Table) -> "RowCounts":
        import pyarrow.compute as pc

        return cls(table.num_rows, table.num_rows - table["error"].null_count,
                   int(pc.sum(table["n_tokens"]).as_py() or 0))


def output_totals(output: str) -> RowCounts:
    """The counts of everything written under `output`."""
    import pyarrow.dataset as pads

    files = data_files(output)
    if not files:
        return RowCounts(0, 0, 0)
    fs, _ = storage.filesystem(output)
    return RowCounts.of(pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=["n_tokens", "error"]))


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


def own_locations(inputs: list[str], output: str, checkpoint_dir: str) -> tuple[str, ...]:
    """The output and checkpoint dir, which finding the inputs skips (`plan_inputs(exclude=)`), so
    `score "DIR/**/*.parquet" DIR/out` rerun or resumed doesn't read its own files back; but not
    one that holds (or is) an input named, or a glob's base: `check_output` then refuses the
    overlap by name, rather than the inputs being found empty."""
    from pipelines.inputs import input_root

    roots = [input_root(i) for i in inputs]
    own = []
    for loc in (output, checkpoint_dir):
        c = storage.canonical(loc)
        if not any(r == c or r.startswith(c.rstrip("/") + "/") for r in roots):
            own.append(loc)
    return tuple(own)


def check_output(output: str, checkpoint_dir: str, inputs: list[str], plan: InputPlan) -> None:
    """Refuse, before anything is created or deleted, an output or checkpoint dir that overlaps an
    input (equal, or one inside the other, in any spelling: `file://`, relative, symlinked) or each
    other, is an existing file, a dangling symlink or can't be created; or that holds anything
    raybert did not write (`check_contents`), with or without overwrite: a run never writes
    beside, and overwrite never deletes, the user's files (what overwrite may delete is
    `remove_ours`' rule, the one this check enforces)."""
    import pyarrow.fs as pafs

    out, ckpt = storage.canonical(output), storage.canonical(checkpoint_dir)
    if storage.overlaps(out, ckpt):
        raise UserError(f"checkpoint dir {checkpoint_dir} and output {output} overlap; keep them apart "
                         f"(the default checkpoint dir is {default_checkpoint_dir(output)})")
    sources = {storage.canonical(f) for f in plan.files} | {storage.canonical(i) for i in inputs if not any(c in i for c in "*?[")}
    for path, what in ((out, "output"), (ckpt, "checkpoint dir")):
        for src in sorted(sources):
            if storage.overlaps(path, src):
                raise UserError(f"{what} {path} overlaps input {src}: scoring must never write into, or "
                                 f"overwrite delete, its inputs; choose an {what} outside the inputs")
    for path, what in ((output, "output"), (checkpoint_dir, "checkpoint dir")):
        kind = storage.file_type(path)
        if kind == pafs.FileType.File:
            raise UserError(f"{what} {path} is an existing file; give a directory path (it is created)")
        local = not storage.is_uri(path) and storage.normalize(path)
        if kind == pafs.FileType.NotFound and local and os.path.islink(local):
            raise UserError(f"{what} {path} is a symlink to {os.readlink(local)}, which does not exist; "
                             f"create that directory, or remove the link")
        if kind == pafs.FileType.NotFound and local and (why := uncreatable(path)):
            raise UserError(f"{what} {path} can't be created: {why}; choose another path")
    check_contents(output, checkpoint_dir)


class NotOurs(PathInTheWay):
    """An output or checkpoint dir holds files raybert did not write (the user must choose
    another path or move them)."""


def check_contents(output: str, checkpoint_dir: str) -> None:
    """Refuse an output or checkpoint dir holding anything raybert did not write (`foreign`),
    naming it: writing beside the user's files, or deleting them on overwrite or when the run
    ends, would be wrong either way."""
    rule = layout(output)
    strange = foreign(output, rule)
    if strange and rule is None:
        raise NotOurs(f"output {output} is not an output of raybert score (no {RUN_RECORD} or {MANIFEST}: not a "
                      f"run of this job to resume) and is not empty: it holds {names_list(strange)}; scoring "
                      f"writes only into an empty or new directory, or its own output: choose another output, "
                      f"or remove them")
    if strange:
        raise NotOurs(f"output {output} is an output of raybert score but also holds files raybert did not "
                      f"write: {names_list(strange)}; a run never writes beside them, and --overwrite never "
                      f"deletes them: move them out of {output}, or choose another output")
    strange = foreign(checkpoint_dir, CHECKPOINT)
    if strange:
        raise NotOurs(f"checkpoint dir {checkpoint_dir} holds files that are not scoring (or Ray Data) checkpoint "
                      f"files: {names_list(strange)}; a run deletes its checkpoint files when it ends or on "
                      f"--overwrite, and must not mix them with others: choose another checkpoint dir, or remove them")


# ---- What raybert writes --------------------------------------------------------------------
# The one rule for what in an output or checkpoint dir is raybert's, by path relative to it
# (`storage.entries`): everything else is the user's, so `check_contents` refuses a run beside it
# and `remove_ours` (--overwrite, `finish`, a finished output's report) never deletes it. An
# output's rule follows its run record's `scorer`, the layout that wrote it: our actors name every
# file they write (`unit_plan.Unit.name`), but Ray Data (an earlier raybert: "ray-data", or a
# record without `scorer`) named its Parquet files itself, so in such an output any top-level
# Parquet file is its. A symlink is never ours (never followed, never deleted); nor is a directory
# but `_staged/`. Temp files a kill can leave, ours to delete: `.<name>.<pid>.tmp` of any of
# these names (storage.replacing, every writer's one atomic write), and the spellings of earlier
# raybert versions (`<record>.<pid>.tmp`, `.<name>.tmp`).
_TMP = r"(?:\.\d+)?\.tmp"


def _names(*names: str) -> str:
    """A rule for `names` (regexes of a file name, with any directory) and their temp files."""
    out = []
    for n in names:
        head, _, base = n.rpartition("/")
        d = head + "/" if head else ""
        out += [n, rf"{d}\.{base}{_TMP}"]
    return "|".join(out)


_RECORDS = rf"{_names(re.escape(RUN_RECORD), re.escape(MANIFEST))}|(?:{re.escape(RUN_RECORD)}|{re.escape(MANIFEST)})\.\d+\.tmp"
_UNITS = _names(r"part-\d{5}-\d{5}-\d{9}\.parquet")
_STAGED = _names(rf"{STAGED}/\d{{5}}\.parquet")
CHECKPOINT = "checkpoint"  # the rule for a checkpoint dir: our UNITS_RECORD, Ray Data's <id>[.pending].parquet rows
LAYOUTS = {
    "actors": re.compile(rf"{_RECORDS}|{_UNITS}|{_STAGED}"),
    "ray-data": re.compile(rf"{_RECORDS}|{_UNITS}|{_STAGED}|[^/_.][^/]*\.parquet|\.[^/]*\.parquet{_TMP}"),
    CHECKPOINT: re.compile(rf"{_names(re.escape(UNITS_RECORD))}|{re.escape(UNITS_RECORD)}\.\d+\.tmp|[^/]+\.parquet"),
}
_DIRS = {"actors": {STAGED}, "ray-data": {STAGED}, CHECKPOINT: set()}


def layout(output: str) -> Optional[str]:
    """The rule (a LAYOUTS key) for `output`'s files, from its run record's `scorer`: "actors" for
    our unit files ("cpu-actors" too), else "ray-data" (also for a finished output of an older
    raybert with a manifest and no run record); None when the output has neither: nothing in it is ours."""
    try:
        record = read_json(storage.join(output, RUN_RECORD))
    except (OSError, ValueError):  # not a JSON file (a directory, garbage): not proof of anything
        return None
    if record is None:
        return "ray-data" if storage.exists(storage.join(output, MANIFEST)) else None
    return "actors" if record.get("scorer") in ("actors", "cpu-actors") else "ray-data"


def is_ours(relative: str, kind: str, rule: Optional[str]) -> bool:
    """Whether raybert writes the entry at `relative` (a `storage.entries` kind) under `rule`."""
    if rule is None or kind == "link":
        return False
    if kind == "dir":
        return relative in _DIRS[rule]
    return LAYOUTS[rule].fullmatch(relative) is not None


def foreign(loc: str, rule: Optional[str]) -> list[str]:
    """What under `loc` raybert did not write (`is_ours`), relative to `loc`: files, symlinks
    (marked, never followed) and empty directories (a directory with entries is named by them)."""
    found = storage.entries(loc)
    parents = {rel.rsplit("/", 1)[0] for rel, _ in found if "/" in rel}
    return [rel + {"dir": "/", "link": " (a symlink)"}.get(kind, "") for rel, kind in found
            if not is_ours(rel, kind, rule) and not (kind == "dir" and rel in parents)]


def remove_temp_files(loc: str, rule: Optional[str]) -> list[str]:
    """Delete the temp files killed writers left in `loc` (local) that `rule` says are raybert's
    (`storage.remove_temp_files`): a user's own hidden `.tmp` file is kept. Returns them."""
    return storage.remove_temp_files(loc, lambda rel: is_ours(rel, "file", rule))


def remove_ours(loc: str, rule: Optional[str], under: str = "", drop_dir: bool = False) -> None:
    """Delete what raybert wrote in `loc` under `rule` (only below `under`, when given): nothing
    else, never through a symlink, and `loc` itself is kept (a symlinked output stays a link to
    its directory). The manifest goes first and the run record last, so a kill part-way leaves an
    output that is neither reported finished nor foreign. `drop_dir`: then `loc` too, if that
    emptied it and it is not a symlink (a checkpoint dir that exists marks an unfinished run)."""
    mine = [(rel, kind) for rel, kind in storage.entries(loc) if is_ours(rel, kind, rule)
            and (not under or rel == under or rel.startswith(under + "/"))]
    order = {MANIFEST: 0, RUN_RECORD: 2}
    for rel in sorted((r for r, k in mine if k == "file"), key=lambda r: (order.get(r, 1), r)):
        storage.remove_file(storage.join(loc, rel))
    for rel in sorted((r for r, k in mine if k == "dir"), reverse=True):
        storage.remove_empty_dir(storage.join(loc, rel))
    if drop_dir:
        storage.remove_empty_dir(loc)


def checkpoint_present(checkpoint_dir: str) -> bool:
    """Whether the checkpoint dir marks an unfinished run: it exists; a symlink to a directory
    only once it holds something (finishing a run empties it of our files and keeps the link)."""
    if not storage.is_uri(checkpoint_dir) and os.path.islink(storage.normalize(checkpoint_dir)):
        return bool(storage.entries(checkpoint_dir))
    return storage.exists(checkpoint_dir)


def repair_duplicates(output: str) -> int:
    """Rewrite the output files that repeat a `row_hash` so each key is kept once (its first copy,
    in file order); a row that exists once is never dropped. Returns the rows dropped. Repeats
    come from writers that overlapped (two runs on one output, before the output lock) and, kept
    in the checkpoint as committed, would otherwise fail every rerun's row count."""
    import numpy as np

    files = sorted(data_files(output))
    fs, base = storage.filesystem(output)
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
        loc = storage.join(output, f[len(base.rstrip("/")):].lstrip("/"))  # data_files are paths within fs
        with storage.replacing(loc) as (out_fs, path):  # a file is old or repaired, never half
            pq.write_table(table, path, filesystem=out_fs)
    dropped = int(len(flat) - keep.sum())
    log.warning("%s: dropped %d duplicate row(s) (repeated row_hash) left by overlapping writers", output, dropped)
    return dropped


def read_json(path: str) -> Optional[dict]:
    text = storage.read_text(path)
    return json.loads(text) if text else None


def write_json(path: str, body: dict) -> None:
    storage.write_text(path, json.dumps(body, indent=2, default=str))  # whole or absent


def read_output(output: str, columns: Optional[list[str]] = None) -> pa.Table:
    """All output rows as one table (for tests and peeks)."""
    import pyarrow.dataset as pads

    files = data_files(output)
    if not files:
        return pa.table({})
    fs, _ = storage.filesystem(output)
    return pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)
