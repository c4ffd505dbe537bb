"""Finding and checking input files, on the driver, before any work: one rule for every job.

Contract:
- `find_parquet(inputs)`: the Parquet files to read. An input is a file, a directory (searched
  recursively) or a local glob (`**` included), local or on an object store (`file://` is a local
  path). Under a directory or a glob, only `*.parquet` files are read, and nothing whose path below
  it has a part starting with `_` or `.` (`_SUCCESS`, `_temporary/`, `.crc`). A file given by name
  must be `*.parquet` (Ray Data's reader would skip it without a word). A missing input, a glob or
  directory without Parquet files, and a file given twice in any spelling are errors naming it.
  Every job hands Ray Data the files found here, never a directory to list by its own rules, so
  every check runs on exactly what is read.
- `plan_inputs(inputs, text_column, text_pair_column, id_column)` (scoring): `find_parquet`, then
  every file's footer: an error names the file that is unreadable or lacks a needed column
  (listing the columns present). It returns the file list, each file's root (what a fallback id is
  relative to), the expected row count and whether ids come from the data.
- `resolve_paths` / `parquet_files` (training data): `find_parquet`'s names, or (name, filesystem,
  path) for the footer and label checks.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Optional

import pyarrow.parquet as pq

from pipelines import storage


@dataclass
class InputPlan:
    files: list[str]  # absolute paths, sorted
    roots: dict[str, str]  # file -> the input root its fallback id is relative to
    rows: int  # total rows in the footers: the output must have exactly this many
    has_ids: bool  # True: ids come from the id column; False: "<file>#<row_hash hex>"
    columns: list[str]  # columns to read


@dataclass(frozen=True)
class InputFile:
    name: str  # a local absolute path or a URI (scheme kept): what is read, recorded and named in errors
    root: Optional[str]  # the directory or glob base it was found under; None for a file named itself
    fs: object  # its pyarrow FileSystem
    path: str  # its path within fs


def find_parquet(inputs: str | list[str], what: str = "input") -> list[InputFile]:
    """The Parquet files to read for `inputs`: the one rule every job reads by (see the module
    docstring). `what` names the inputs in errors ("input", "data")."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    found: list[InputFile] = []
    for raw in inputs:
        raw = storage.normalize(raw) if str(raw).startswith("file://") else str(raw)
        if not storage.is_uri(raw) and any(c in raw for c in "*?["):
            found += _glob(raw, what)
        else:
            found += _expand(raw if storage.is_uri(raw) else os.path.abspath(raw), what)
    if not found:
        raise ValueError(f"no {what} paths given" + (" (--data)" if what == "data" else ""))
    _refuse_repeats([f.name for f in found])
    return found


def _refuse_repeats(files: list[str]) -> None:
    # The same file twice (listed twice, or reached again through a symlink or file://) would be
    # read twice: refused, naming both spellings.
    seen: dict[str, str] = {}
    for f in files:
        key = storage.canonical(f)
        if key in seen:
            also = f" (also as {seen[key]})" if seen[key] != f else ""
            raise ValueError(f"input file {f} is given more than once{also}; list each file once")
        seen[key] = f


def _is_read(relative: str) -> bool:
    """Found under a directory or by a glob: `*.parquet`, no part of its path (below the directory)
    starting with `_` or `.` (_SUCCESS, _temporary/, .crc files)."""
    parts = relative.replace(os.sep, "/").split("/")
    return relative.lower().endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


def _glob(pattern: str, what: str) -> list[InputFile]:
    hits = sorted(os.path.abspath(h) for h in glob.glob(pattern, recursive=True))
    if not hits:
        raise FileNotFoundError(f"{what} glob {pattern} matches no files")
    root = os.path.commonpath([os.path.dirname(h) for h in hits])
    found = [f for h in hits if os.path.isdir(h) or _is_read(os.path.relpath(h, root))
             for f in _expand(h, what, root)]
    if not found:
        raise FileNotFoundError(f"{what} glob {pattern} matches no *.parquet files")
    return found


def _expand(name: str, what: str, root: Optional[str] = None) -> list[InputFile]:
    """A file given by name (it must be `*.parquet`: Ray Data would skip it without a word), or
    every file read under a directory, sorted."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(name)
    with storage.reachable(name):
        info = fs.get_file_info(path)
        listing = (fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if info.type == pafs.FileType.Directory else [])
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {name} does not exist")
    if info.type != pafs.FileType.Directory:
        if not name.lower().endswith(".parquet"):
            raise ValueError(f"{name}: Ray Data reads only files named *.parquet and would skip this one; "
                             f"rename it")
        return [InputFile(name, root, fs, path)]
    base = info.path.rstrip("/")
    prefix = name.split("://", 1)[0] + "://" if storage.is_uri(name) else ""
    found = sorted(i.path for i in listing if i.is_file and _is_read(i.path[len(base):].lstrip("/")))
    if not found:
        raise FileNotFoundError(f"{what} directory {name} has no *.parquet files")
    return [InputFile(prefix + f, root or name, fs, f) for f in found]


def parquet_footer(path: str) -> pq.FileMetaData:
    try:
        if storage.is_uri(path):
            fs, p = storage.filesystem(path)
            with fs.open_input_file(p) as f:
                return pq.ParquetFile(f).metadata
        return pq.ParquetFile(path).metadata
    except Exception as e:  # ArrowInvalid, OSError, ...: say which file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e


def plan_inputs(inputs: str | list[str], text_column: str = "text", text_pair_column: Optional[str] = None,
                id_column: str = "id") -> InputPlan:
    """Expand and validate the inputs; raise before any work if one can't be scored."""
    found = find_parquet(inputs)
    files = [f.name for f in found]
    roots = {f.name: f.root for f in found if f.root is not None}
    rows = 0
    with_id: list[str] = []
    without_id: list[str] = []
    for f in files:
        meta = parquet_footer(f)
        present = meta.schema.to_arrow_schema().names
        for col in [text_column] + ([text_pair_column] if text_pair_column else []):
            if col not in present:
                raise ValueError(f"{f}: no column {col!r} (the text to score); columns present: {present}")
        (with_id if id_column in present else without_id).append(f)
        rows += meta.num_rows
    if with_id and without_id:
        raise ValueError(f"{without_id[0]}: no id column {id_column!r}, but other inputs (e.g. {with_id[0]}) "
                         f"have one; columns present: {parquet_footer(without_id[0]).schema.to_arrow_schema().names}")
    has_ids = bool(with_id)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + ([id_column] if has_ids else [])
    return InputPlan(files=files, roots=roots, rows=rows, has_ids=has_ids, columns=columns)


def resolve_paths(paths: list[str]) -> list[str]:
    """The names of the Parquet files to read for training data `paths` (`find_parquet`): Ray Data
    is given these files, never a directory to list by its own rules."""
    return [f.name for f in find_parquet(paths, "data")]


def parquet_files(paths: list) -> list[tuple[str, object, str]]:
    """`find_parquet(paths)` as (name, filesystem, path in it), for the footer and label checks."""
    return [(f.name, f.fs, f.path) for f in find_parquet(paths, "data")]


def names_list(names: list, limit: int = 3) -> str:
    """`a, b, c and 4 more`: file names for an error message, each once, in order."""
    names = list(dict.fromkeys(names))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
