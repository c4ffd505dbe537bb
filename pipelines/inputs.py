"""Finding and checking input files, on the driver, before any work.

Contract:
- `plan_inputs(inputs, text_column, text_pair_column, id_column)` (scoring): expands files,
  directories (recursively; names starting with `_` or `.` skipped) and globs, local or on an
  object store (`file://` is a local path), refuses a file given twice in any spelling, reads every
  file's Parquet footer and fails with an error naming the file when one is unreadable or lacks a
  needed column (listing the columns present). It returns the file list, each file's root (what a
  fallback id is relative to), the expected row count and whether ids come from the data.
- `resolve_paths` / `parquet_files` (training data): the Parquet files Ray Data reads for the
  given paths, by Ray's rules, so every check runs on exactly what is read.
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


def expand_inputs(inputs: list[str]) -> tuple[list[str], dict[str, str]]:
    files: list[str] = []
    roots: dict[str, str] = {}
    for raw in inputs:
        if raw.startswith("file://"):  # a local path, spelled as a URI
            raw = storage.normalize(raw)
        if storage.is_uri(raw):
            found = _expand_uri(raw)
            files += found
            if found != [raw]:  # a directory: ids relative to it (a lone file's: its name)
                roots.update(dict.fromkeys(found, raw))
            continue
        p = os.path.abspath(raw)
        if any(c in raw for c in "*?["):
            matches = sorted(os.path.abspath(m) for m in glob.glob(raw, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"input glob {raw} matches no files")
            root = os.path.commonpath([os.path.dirname(m) for m in matches])
            for m in matches:
                files.append(m)
                roots[m] = root
        elif os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
                found += [os.path.join(dirpath, f) for f in filenames
                          if f.endswith(".parquet") and not f.startswith(("_", "."))]
            if not found:
                raise FileNotFoundError(f"input directory {p} has no .parquet files")
            for f in sorted(found):
                files.append(f)
                roots[f] = p
        elif os.path.isfile(p):
            files.append(p)
            roots[p] = os.path.dirname(p)
        else:
            raise FileNotFoundError(f"input {raw} does not exist")
    _refuse_repeats(files)
    return files, roots


def _expand_uri(raw: str) -> list[str]:
    """The Parquet files of an object-store input: itself, or (a directory) every `*.parquet`
    under it, names starting with `_` or `.` skipped, sorted."""
    import pyarrow.fs as pafs

    with storage.reachable(raw):
        fs, path = pafs.FileSystem.from_uri(raw)
        info = fs.get_file_info(path)
        listing = (fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if info.type == pafs.FileType.Directory else [])
    if info.type == pafs.FileType.File:
        return [raw]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input {raw} does not exist")
    scheme = raw.split("://", 1)[0]
    return [f"{scheme}://{f}" for f in sorted(
        f.path for f in listing
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in os.path.relpath(f.path, path).split("/")))]


def _refuse_repeats(files: list[str]) -> None:
    # The same file twice (listed twice, or reached again through a symlink or file://) would be
    # scored twice: refused, naming both spellings.
    seen: dict[str, str] = {}
    for f in files:
        key = storage.canonical(f)
        if key in seen:
            also = f" (also as {seen[key]})" if seen[key] != f else ""
            raise ValueError(f"input file {f} is given more than once{also}; list each file once")
        seen[key] = f


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
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files, roots = expand_inputs(inputs)
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
    """Expand local globs; pass directories, files and URIs (s3://, gs://) through unchanged."""
    if isinstance(paths, str):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        if "://" not in p and any(c in p for c in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise FileNotFoundError(f"data glob {p!r} matches no files")
            out.extend(os.path.abspath(h) for h in hits)
        elif "://" not in p:
            if not os.path.exists(p):
                raise FileNotFoundError(f"data path {p!r} does not exist")
            out.append(os.path.abspath(p))
        else:
            out.append(p)
    if not out:
        raise ValueError("no data paths given (--data)")
    return out


def parquet_files(paths: list) -> list[tuple[str, object, str]]:
    """The Parquet files Ray Data reads for `paths`, as (name, filesystem, path in it), listed on
    the driver so every label and column check runs on exactly what is read.

    Ray's rules: a directory is searched recursively, skipping names that start with '.' or '_',
    and only `*.parquet` files are read. Ray would skip a listed file with another suffix without a
    word, so that is an error here, as is a directory without Parquet files.
    """
    import pyarrow.fs as pafs

    out = []
    for path in resolve_paths(paths):
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        scheme = path.split("://")[0] + "://" if "://" in path and not isinstance(fs, pafs.LocalFileSystem) else ""
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data path {path!r} does not exist")
        if info.type != pafs.FileType.Directory:
            if not inner.lower().endswith(".parquet"):
                raise ValueError(f"{path}: Ray Data reads only files named *.parquet and would skip this "
                                 f"one; rename it")
            out.append((path, fs, inner))
            continue
        base = info.path.rstrip("/")
        found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                       if i.is_file and i.path.lower().endswith(".parquet")
                       and not i.path[len(base):].lstrip("/").startswith((".", "_")))
        if not found:
            raise ValueError(f"{path}: no *.parquet files in this directory")
        out.extend((scheme + f, fs, f) for f in found)
    return out


def names_list(names: list, limit: int = 3) -> str:
    """`a, b, c and 4 more`: file names for an error message, each once, in order."""
    names = list(dict.fromkeys(names))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
