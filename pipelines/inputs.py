"""Finding, checking and reading input files, on the driver, before any work: one rule for every job.

Contract:
- Formats, by extension: Parquet (`*.parquet`), CSV (`*.csv`) and JSON Lines (`*.jsonl`, `*.json`:
  one object per line), CSV and JSON Lines also compressed (`.gz`, `.br`, `.zst`, `.lz4`): the
  extensions Ray Data's readers take (`FORMATS`, `file_format`).
- `find_inputs(inputs)`: the files to read. An input is a file, a directory (searched
  recursively) or a local glob (`**` included), local or on an object store (`file://` is a local
  path). Under a directory or a glob, only files of those formats are read, and nothing whose path
  below it has a part starting with `_` or `.` (`_SUCCESS`, `_temporary/`, `.crc`). A file given by
  name must have one of those extensions (a reader would otherwise skip or misread it). A missing
  input, a glob or directory without input files, and a file given twice in any spelling are
  errors naming it. Every job hands Ray Data the files found here, never a directory to list by
  its own rules, so every check runs on exactly what is read.
- `TableFile`: one found file as the driver's checks read it (schema, rows, bytes, batches of
  chosen columns), whatever its format; an unreadable file is an error naming it. Parquet answers
  from its footer; CSV and JSON Lines have no footer, so their rows are counted by parsing them
  once on the driver (prefer Parquet for large corpora). Text columns of CSV and JSON Lines are
  read as strings (a column of digits stays text).
- `read_dataset(files, columns, ...)`: the Ray Dataset of those files (`read_parquet`, `read_csv`,
  `read_json`, unioned), only the needed columns, text columns as strings.
- `plan_inputs(inputs, text_column, text_pair_column, id_column)` (scoring): `find_inputs`, then
  every file's schema and rows: an error names the file that is unreadable or lacks a needed
  column (listing the columns present). It returns the file list, each file's root (what a
  fallback id is relative to), the expected row count and whether ids come from the data.
- `resolve_paths` / `input_files` (training data): `find_inputs`' names, or its InputFiles for the
  schema and label checks.
- A Hugging Face `datasets` dataset is read through its files: `ds.to_parquet("x.parquet")` (or
  `to_json`, `to_csv`), or the Arrow files `save_to_disk` writes converted the same way.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
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
    formats: dict = field(default_factory=dict)  # file -> "parquet" | "csv" | "json"


# Ray Data's readers' own extensions (csv_datasource, json_datasource in Ray 2.60).
_COMPRESSED = ("", ".gz", ".br", ".zst", ".lz4")
FORMATS = {"parquet": (".parquet",), "csv": tuple(".csv" + c for c in _COMPRESSED),
           "json": tuple(e + c for e in (".jsonl", ".json") for c in _COMPRESSED)}
FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "json": "JSON Lines"}
SUPPORTED = ("Parquet (*.parquet), CSV (*.csv) and JSON Lines (*.jsonl, *.json), CSV and JSON Lines "
             "optionally compressed (.gz, .br, .zst, .lz4)")


def file_format(name: str) -> Optional[str]:
    """"parquet", "csv" or "json" by extension (case-insensitive); None for another file."""
    low = name.lower()
    for fmt, exts in FORMATS.items():
        if low.endswith(exts):
            return fmt
    return None


@dataclass(frozen=True)
class InputFile:
    name: str  # a local absolute path or a URI (scheme kept): what is read, recorded and named in errors
    root: Optional[str]  # the directory or glob base it was found under; None for a file named itself
    fs: object  # its pyarrow FileSystem
    path: str  # its path within fs

    @property
    def format(self) -> str:
        return file_format(self.name)


def find_inputs(inputs: str | list[str], what: str = "input") -> list[InputFile]:
    """The files to read for `inputs`: the one rule every job reads by (see the module
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
    """Found under a directory or by a glob: a file of a read format, no part of its path (below
    the directory) starting with `_` or `.` (_SUCCESS, _temporary/, .crc files)."""
    parts = relative.replace(os.sep, "/").split("/")
    return file_format(relative) is not None and not any(p.startswith(("_", ".")) for p in parts)


def _glob(pattern: str, what: str) -> list[InputFile]:
    hits = sorted(os.path.abspath(h) for h in glob.glob(pattern, recursive=True))
    if not hits:
        raise FileNotFoundError(f"{what} glob {pattern} matches no files")
    root = os.path.commonpath([os.path.dirname(h) for h in hits])
    found = [f for h in hits if os.path.isdir(h) or _is_read(os.path.relpath(h, root))
             for f in _expand(h, what, root)]
    if not found:
        raise FileNotFoundError(f"{what} glob {pattern} matches no input files; raybert reads {SUPPORTED}")
    return found


def _expand(name: str, what: str, root: Optional[str] = None) -> list[InputFile]:
    """A file given by name (it must have a read format's extension: Ray Data would skip it without
    a word), or every file read under a directory, sorted."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(name)
    with storage.reachable(name):
        info = fs.get_file_info(path)
        listing = (fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if info.type == pafs.FileType.Directory else [])
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {name} does not exist")
    if info.type != pafs.FileType.Directory:
        if file_format(name) is None:
            raise ValueError(f"{name}: raybert reads {SUPPORTED}, by extension; give the file its format's "
                             f"extension (or convert it)")
        return [InputFile(name, root, fs, path)]
    base = info.path.rstrip("/")
    prefix = name.split("://", 1)[0] + "://" if storage.is_uri(name) else ""
    found = sorted(i.path for i in listing if i.is_file and _is_read(i.path[len(base):].lstrip("/")))
    if not found:
        raise FileNotFoundError(f"{what} directory {name} has no input files; raybert reads {SUPPORTED}")
    return [InputFile(prefix + f, root or name, fs, f) for f in found]


class TableFile:
    """One input file as the driver's checks read it, whatever its format (see the module
    docstring). `text_columns` are read as strings from CSV and JSON Lines."""

    def __init__(self, f: InputFile, text_columns: tuple = ()):
        self.file, self.name, self.format = f, f.name, f.format
        self.text_columns = tuple(c for c in text_columns if c)
        self._parquet = self._rows = None

    def _fail(self, e: Exception) -> ValueError:
        return ValueError(f"{self.name}: not a readable {FORMAT_NAMES[self.format]} file ({type(e).__name__}: {e})")

    def _parquet_file(self) -> pq.ParquetFile:
        if self._parquet is None:
            try:
                self._parquet = pq.ParquetFile(self.file.fs.open_input_file(self.file.path))
            except Exception as e:  # ArrowInvalid, OSError, ...: say which file
                raise self._fail(e) from None
        return self._parquet

    def _reader(self, columns: Optional[list]):
        """A streaming CSV / JSON Lines reader of `columns` (None: all)."""
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.json as pajson

        stream = self.file.fs.open_input_stream(self.file.path, compression="detect")
        strings = {c: pa.string() for c in self.text_columns}
        if self.format == "csv":
            return pacsv.open_csv(stream, convert_options=pacsv.ConvertOptions(
                column_types=strings, include_columns=columns))
        return pajson.open_json(stream, parse_options=pajson.ParseOptions(
            explicit_schema=pa.schema(strings) if strings else None, unexpected_field_behavior="infer"))

    @property
    def schema(self):
        if self.format == "parquet":
            return self._parquet_file().schema_arrow
        try:
            return self._reader(None).schema
        except Exception as e:
            raise self._fail(e) from None

    @property
    def num_rows(self) -> int:
        if self.format == "parquet":
            return self._parquet_file().metadata.num_rows
        if self._rows is None:  # no footer: parse it once
            self._rows = sum(b.num_rows for b in self.iter_batches())
        return self._rows

    @property
    def byte_size(self) -> int:
        """Uncompressed data bytes for Parquet (its row groups), the file's size otherwise."""
        if self.format == "parquet":
            meta = self._parquet_file().metadata
            return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return self.file.fs.get_file_info(self.file.path).size

    def iter_batches(self, batch_size: int = 65_536, columns: Optional[list] = None):
        """RecordBatches of `columns` (None: all), in file order, nothing held whole."""
        if self.format == "parquet":
            yield from self._parquet_file().iter_batches(batch_size=batch_size, columns=columns)
            return
        try:
            reader = self._reader(columns)
            for batch in reader:
                yield batch.select(columns) if columns and self.format == "json" else batch
        except ValueError:
            raise
        except Exception as e:
            raise self._fail(e) from None


def read_dataset(files: list[InputFile], columns: Optional[list] = None, text_columns: tuple = (),
                 include_paths: bool = False, num_cpus: Optional[float] = None):
    """The Ray Dataset of `files` (see the module docstring): Parquet through the V1 reader
    (compat.read_parquet_v1), CSV and JSON Lines through Ray Data's own readers."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import ray.data

    from pipelines.compat import read_parquet_v1

    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(f.format, []).append(f.name)
    strings = {c: pa.string() for c in text_columns if c}
    keep = (list(columns) + (["path"] if include_paths else [])) if columns else None
    parts = []
    if "parquet" in by_format:
        parts.append(read_parquet_v1(by_format["parquet"], columns=columns, include_paths=include_paths,
                                     num_cpus=num_cpus))
    if "csv" in by_format:
        parts.append(ray.data.read_csv(by_format["csv"], include_paths=include_paths, num_cpus=num_cpus,
                                       convert_options=pacsv.ConvertOptions(column_types=strings,
                                                                            include_columns=columns)))
    if "json" in by_format:
        ds = ray.data.read_json(by_format["json"], include_paths=include_paths, num_cpus=num_cpus,
                                parse_options=pajson.ParseOptions(explicit_schema=pa.schema(strings) if strings else None,
                                                                  unexpected_field_behavior="infer"))
        parts.append(ds.select_columns(keep) if keep else ds)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def plan_inputs(inputs: str | list[str], text_column: str = "text", text_pair_column: Optional[str] = None,
                id_column: str = "id") -> InputPlan:
    """Expand and validate the inputs; raise before any work if one can't be scored."""
    found = find_inputs(inputs)
    files = [f.name for f in found]
    roots = {f.name: f.root for f in found if f.root is not None}
    texts = (text_column, text_pair_column)
    rows = 0
    with_id: list[str] = []
    without_id: list[tuple[str, list]] = []
    for f in found:
        table = TableFile(f, texts)
        present = table.schema.names
        for col in [text_column] + ([text_pair_column] if text_pair_column else []):
            if col not in present:
                raise ValueError(f"{f.name}: no column {col!r} (the text to score); columns present: {present}")
        if id_column in present:
            with_id.append(f.name)
        else:
            without_id.append((f.name, present))
        rows += table.num_rows
    if with_id and without_id:
        raise ValueError(f"{without_id[0][0]}: no id column {id_column!r}, but other inputs (e.g. {with_id[0]}) "
                         f"have one; columns present: {without_id[0][1]}")
    has_ids = bool(with_id)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + ([id_column] if has_ids else [])
    return InputPlan(files=files, roots=roots, rows=rows, has_ids=has_ids, columns=columns,
                     formats={f.name: f.format for f in found})


def resolve_paths(paths: list[str]) -> list[str]:
    """The names of the files to read for training data `paths` (`find_inputs`): Ray Data is
    given these files, never a directory to list by its own rules."""
    return [f.name for f in find_inputs(paths, "data")]


def input_files(paths: list) -> list[InputFile]:
    """`find_inputs(paths)` for training data, for the schema and label checks."""
    return find_inputs(paths, "data")


def names_list(names: list, limit: int = 3) -> str:
    """`a, b, c and 4 more`: file names for an error message, each once, in order."""
    names = list(dict.fromkeys(names))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
