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
  once on the driver (JSON Lines whole, as Ray Data's reader takes it; prefer Parquet for large
  corpora), with the reader the Ray tasks use (pipelines/text_formats.py): text and id columns
  are strings of the source text (a column of digits stays text, ids keep leading zeros and every
  digit), rows up to 256 MiB are read, and a CSV header that names a column twice is refused.
- `read_dataset(files, columns, ...)`: the Ray Dataset of those files (Parquet: `read_parquet`;
  CSV and JSON Lines: `compat.read_text_files`, raybert's reader in Ray tasks; unioned), only the needed columns, text
  columns as strings, every read stage one task of the job's `num_cpus`.
- `plan_inputs(inputs, text_column, text_pair_column, id_column)` (scoring): `find_inputs`, then
  every file's schema and rows: an error names the file that is unreadable, lacks a needed
  column (listing the columns present), holds no text in a text column (an int column), or has a
  needed column twice. It returns the file list, each file's root (what a
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

from pipelines import MissingPath, UserError
from pipelines import storage


@dataclass
class InputPlan:
    files: list[str]  # absolute paths, sorted
    roots: dict[str, str]  # file -> the input root its fallback id is relative to
    rows: int  # total rows in the footers: the output must have exactly this many
    has_ids: bool  # True: ids come from the id column; False: "<file>#<row_hash hex>"
    columns: list[str]  # columns to read
    formats: dict = field(default_factory=dict)  # file -> "parquet" | "csv" | "json"
    found: list = field(default_factory=list, repr=False)  # the InputFiles, in files' order
    fingerprints: dict = field(default_factory=dict)  # file -> TableFile.fingerprint(): [bytes, content digest]
    # Parquet file -> rows of each row group, from the footer read here: the units are planned from
    # it, so no footer is read twice on the driver (10,000 files on an object store: 10,000 GETs).
    row_groups: dict = field(default_factory=dict)


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
    size: int = -1  # bytes, from the listing or stat that found it (no extra call)

    @property
    def format(self) -> str:
        return file_format(self.name)


def find_inputs(inputs: str | list[str], what: str = "input", exclude: tuple = ()) -> list[InputFile]:
    """The files to read for `inputs`: the one rule every job reads by (see the module
    docstring). `what` names the inputs in errors ("input", "data"). `exclude`: locations (a job's
    own output, checkpoint or run dir) whose files a directory or glob never yields, so a job
    rerun with its own command doesn't read what it wrote; a file named on its own is kept (the
    overlap checks refuse it)."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    skip = [storage.canonical(e) for e in exclude if e]
    found: list[InputFile] = []
    for raw in inputs:
        raw = storage.normalize(raw) if str(raw).startswith("file://") else str(raw)
        if not storage.is_uri(raw) and any(c in raw for c in "*?["):
            found += _glob(raw, what, skip)
        else:
            found += _expand(raw if storage.is_uri(raw) else os.path.abspath(raw), what, skip=skip)
    if not found:
        raise UserError(f"no {what} paths given" + (" (--data)" if what == "data" else ""))
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
            raise UserError(f"input file {f} is given more than once{also}; list each file once")
        seen[key] = f


def _is_read(relative: str) -> bool:
    """Found under a directory or by a glob: a file of a read format, no part of its path (below
    the directory) starting with `_` or `.` (_SUCCESS, _temporary/, .crc files)."""
    parts = relative.replace(os.sep, "/").split("/")
    return file_format(relative) is not None and not any(p.startswith(("_", ".")) for p in parts)


def _excluded(name: str, skip: list) -> bool:
    """`name` lies inside one of the `skip` locations (canonical spellings)."""
    return bool(skip) and any(storage.overlaps(storage.canonical(name), s) for s in skip)


def _glob(pattern: str, what: str, skip: list = ()) -> list[InputFile]:
    hits = sorted(os.path.abspath(h) for h in glob.glob(pattern, recursive=True))
    if not hits:
        raise MissingPath(f"{what} glob {pattern} matches no files")
    # The job's own files left out before the root is taken: the root (what fallback ids are
    # relative to) must not move when a rerun's glob also matches the output it wrote.
    hits = [h for h in hits if not _excluded(h, skip)]
    root = os.path.commonpath([os.path.dirname(h) for h in hits]) if hits else ""
    found = [f for h in hits if os.path.isdir(h) or _is_read(os.path.relpath(h, root))
             for f in _expand(h, what, root, skip)]
    if not found:
        raise MissingPath(f"{what} glob {pattern} matches no input files; raybert reads {SUPPORTED}")
    return found


def _expand(name: str, what: str, root: Optional[str] = None, skip: list = ()) -> list[InputFile]:
    """A file given by name (it must have a read format's extension: Ray Data would skip it without
    a word), or every file read under a directory, sorted."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(name)
    with storage.reachable(name):
        info = fs.get_file_info(path)
        listing = (fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if info.type == pafs.FileType.Directory else [])
    if info.type == pafs.FileType.NotFound:
        raise MissingPath(f"{what} {name} does not exist")
    if info.type != pafs.FileType.Directory:
        if file_format(name) is None:
            raise UserError(f"{name}: raybert reads {SUPPORTED}, by extension; give the file its format's "
                             f"extension (or convert it)")
        return [InputFile(name, root, fs, path, info.size)]
    base = info.path.rstrip("/")
    prefix = name.split("://", 1)[0] + "://" if storage.is_uri(name) else ""
    found = sorted((i for i in listing if i.is_file and _is_read(i.path[len(base):].lstrip("/"))
                    and not _excluded(prefix + i.path, skip)), key=lambda i: i.path)
    if not found:
        raise MissingPath(f"{what} directory {name} has no input files; raybert reads {SUPPORTED}")
    return [InputFile(prefix + i.path, root or name, fs, i.path, i.size) for i in found]


# CSV and JSON Lines have no footer: their row counts, parsed once, are kept for the process (the
# driver plans a run twice, before and under the output lock), keyed by what would change them.
_ROWS: dict = {}


def row_group_sizes(metadata) -> list[int]:
    """The rows of each row group of a Parquet file, from its footer (`pyarrow` FileMetaData)."""
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


class TableFile:
    """One input file as the driver's checks read it, whatever its format (see the module
    docstring). `text_columns` (text, and ids) are read as strings of the source text from CSV and
    JSON Lines (pipelines/text_formats.py): a column of digits stays text, ids keep their leading
    zeros and every digit. `columns`: the other columns the job reads (a label); with either given,
    a JSON Lines column no job reads can't make the file unreadable (text_formats.json_table's `keep`)."""

    def __init__(self, f: InputFile, text_columns: tuple = (), columns: tuple = ()):
        self.file, self.name, self.format = f, f.name, f.format
        self.text_columns = tuple(c for c in text_columns if c)
        # The columns the job reads (with the text columns); none given: every column matters.
        self.needed = (self.text_columns + tuple(c for c in columns if c)) or None
        self._parquet = self._json = None

    def _fail(self, e: Exception) -> UserError:
        if isinstance(e, UserError) and str(e).startswith(self.name):  # text_formats named the file and the line
            return e
        return UserError(f"{self.name}: not a readable {FORMAT_NAMES[self.format]} file ({type(e).__name__}: {e})")

    def _parquet_file(self) -> pq.ParquetFile:
        if self._parquet is None:
            try:
                self._parquet = pq.ParquetFile(self.file.fs.open_input_file(self.file.path))
            except Exception as e:  # ArrowInvalid, OSError, ...: say which file
                raise self._fail(e) from None
        return self._parquet

    def _stream(self):
        from pipelines.text_formats import codec

        if self.file.size == 0:  # no header, no rows: say so, not "no column 'text'; columns present: []"
            raise UserError(f"{self.name}: the file is empty (no header, no rows); remove it from the input, or "
                             f"give it rows")
        return self.file.fs.open_input_stream(self.file.path, compression=codec(self.name))

    def _json_table(self):
        """The whole JSON Lines file, as Ray Data's read takes it (a field may first appear in any
        row), text columns as source text."""
        import pyarrow as pa

        from pipelines.text_formats import json_table

        if self._json is None:
            try:
                with self._stream() as stream:
                    self._json = json_table(stream.read_buffer(), self.name, self.text_columns, self.needed)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise self._fail(e) from None
        return self._json

    @property
    def schema(self):
        import pyarrow as pa

        from pipelines.text_formats import csv_schema

        if self.format == "parquet":
            return self._parquet_file().schema_arrow
        if self.format == "json":
            return self._json_table().schema
        try:
            schema = csv_schema(self._stream, self.text_columns)
            repeated = sorted({c for c in schema.names if schema.names.count(c) > 1})
            if repeated:  # a reader would take the first of them, silently
                raise UserError(f"{self.name}: the header names column(s) {repeated} more than once; give each column "
                                 f"its own name")
            return schema
        except (pa.ArrowException, OSError, ValueError) as e:
            raise self._fail(e) from None

    @property
    def num_rows(self) -> int:
        if self.format == "parquet":
            return self._parquet_file().metadata.num_rows
        info = self.file.fs.get_file_info(self.file.path)
        key = (self.name, info.size, info.mtime_ns)
        if key not in _ROWS:  # no footer: parse it once
            _ROWS[key] = sum(b.num_rows for b in self.iter_batches())
        return _ROWS[key]

    def fingerprint(self) -> list:
        """[bytes, digest] identifying the file's content, so a resume can refuse an input rewritten
        in between (its modification time alone would refuse a `touch`, and miss a copy that kept
        it). Parquet: a digest of its footer, already read (row groups, column chunk sizes and
        offsets, statistics): no data is read again. CSV and JSON Lines: a digest of their bytes,
        read once more (the driver parses them whole anyway)."""
        import hashlib
        import json

        h = hashlib.sha256()
        if self.format == "parquet":
            h.update(json.dumps(self._parquet_file().metadata.to_dict(), sort_keys=True, default=str).encode())
        else:
            with self.file.fs.open_input_stream(self.file.path) as f:  # the raw (compressed) bytes
                while chunk := f.read(8 << 20):
                    h.update(chunk)
        return [self.file.size, h.hexdigest()[:32]]  # the size from the listing that found it: no more calls

    @property
    def byte_size(self) -> int:
        """Uncompressed data bytes for Parquet (its row groups), the file's size otherwise."""
        if self.format == "parquet":
            meta = self._parquet_file().metadata
            return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return self.file.fs.get_file_info(self.file.path).size

    def row_group_rows(self) -> list[int]:
        """Parquet: the rows of each row group (from the footer, already read); other formats: []."""
        return row_group_sizes(self._parquet_file().metadata) if self.format == "parquet" else []

    def iter_batches(self, batch_size: int = 65_536, columns: Optional[list] = None,
                     row_groups: Optional[list] = None):
        """RecordBatches of `columns` (None: all), in file order (CSV: streamed, nothing held whole);
        Parquet: of `row_groups` only, when given."""
        import pyarrow as pa

        from pipelines.text_formats import csv_batches

        if self.format == "parquet":
            yield from self._parquet_file().iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups)
            return
        if self.format == "json":
            table = self._json_table()
            yield from (table.select(columns) if columns else table).to_batches(max_chunksize=batch_size)
            return
        try:
            yield from csv_batches(self._stream, self.name, self.text_columns, columns)
        except (pa.ArrowException, OSError, ValueError) as e:  # a bad value past the first block: name the file
            raise self._fail(e) from None


def read_dataset(files: list[InputFile], columns: Optional[list] = None, text_columns: tuple = (),
                 include_paths: bool = False, num_cpus: Optional[float] = None):
    """The Ray Dataset of `files` (see the module docstring), in their order: Parquet through the V1
    reader (compat.read_parquet_v1), CSV and JSON Lines through raybert's reader
    (compat.read_text_files), one read per run of consecutive files of one format; every
    stage of a read is one task of `num_cpus`."""
    from pipelines.compat import read_parquet_v1, read_text_files

    runs: list[tuple[str, list[str]]] = []
    for f in files:
        if runs and runs[-1][0] == f.format:
            runs[-1][1].append(f.name)
        else:
            runs.append((f.format, [f.name]))
    parts = []
    for fmt, names in runs:
        if fmt == "parquet":
            parts.append(read_parquet_v1(names, columns=columns, include_paths=include_paths, num_cpus=num_cpus))
        else:
            parts.append(read_text_files(names, fmt, columns, text_columns, include_paths, num_cpus))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def plan_inputs(inputs: str | list[str], text_column: str = "text", text_pair_column: Optional[str] = None,
                id_column: str = "id", exclude: tuple = ()) -> InputPlan:
    """Expand and validate the inputs; raise before any work if one can't be scored. `exclude`: the
    job's own output and checkpoint dir (see `find_inputs`)."""
    found = find_inputs(inputs, exclude=exclude)
    files = [f.name for f in found]
    roots = {f.name: f.root for f in found if f.root is not None}
    texts = (text_column, text_pair_column, id_column)  # read as strings from CSV / JSON Lines
    rows = 0
    with_id: list[str] = []
    without_id: list[tuple[str, list]] = []
    fingerprints, row_groups = {}, {}
    for f in found:
        table = TableFile(f, texts)
        schema = table.schema
        present = schema.names
        check_columns(f.name, schema, [text_column] + ([text_pair_column] if text_pair_column else []),
                      "the text to score", "--text-column")
        refuse_repeated_columns(f.name, present, [id_column])
        if id_column in present:
            with_id.append(f.name)
        else:
            without_id.append((f.name, present))
        rows += table.num_rows
        fingerprints[f.name] = table.fingerprint()
        if f.format == "parquet":
            row_groups[f.name] = table.row_group_rows()
    if with_id and without_id:
        raise UserError(f"{without_id[0][0]}: no id column {id_column!r}, but other inputs (e.g. {with_id[0]}) "
                         f"have one; columns present: {without_id[0][1]}")
    if without_id and id_column != DEFAULT_ID_COLUMN:  # named by the user: a missing one is a mistake, not "no ids"
        raise UserError(f"{without_id[0][0]}: no id column {id_column!r} (--id-column); columns present: "
                         f"{without_id[0][1]}")
    has_ids = bool(with_id)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + ([id_column] if has_ids else [])
    return InputPlan(files=files, roots=roots, rows=rows, has_ids=has_ids, columns=columns,
                     formats={f.name: f.format for f in found}, found=found, fingerprints=fingerprints,
                     row_groups=row_groups)


DEFAULT_ID_COLUMN = "id"  # ScoreConfig's default: without that column, ids are `<file>#<row hash>`


def refuse_repeated_columns(name: str, present: list, columns: list) -> None:
    """A needed column that appears twice in a file's schema (a reader would take one of them,
    silently): refused, naming it."""
    repeated = sorted({c for c in columns if c and present.count(c) > 1})
    if repeated:
        raise UserError(f"{name}: column(s) {repeated} appear more than once; give each column its own name")


def check_columns(name: str, schema, columns: list, what: str, setting: str) -> None:
    """Each of `columns` is in the file once and holds text (a string column; an all-null or int
    column would make every row an error row): else one error naming the file, the column, what it
    holds and the columns present."""
    present = schema.names
    refuse_repeated_columns(name, present, columns)
    for col in columns:
        if col not in present:
            raise UserError(f"{name}: no column {col!r} ({what}); columns present: {present}. Set {setting} to "
                             f"match")
        if not is_text_type(schema.field(col).type):
            raise UserError(f"{name}: column {col!r} holds {schema.field(col).type}, not text; choose the text "
                             f"column with {setting} (columns present: {present})")


def is_text_type(t) -> bool:
    """A string column (plain, large, view or dictionary-encoded)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def input_root(raw: str) -> str:
    """Where an input lies: itself (a file or directory), or a glob's directory before its first
    wildcard part; canonical (symlinks resolved)."""
    parts = storage.normalize(raw).split("/")
    cut = next((n for n, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    return storage.canonical("/".join(parts[:cut]) or "/")


def inside_inputs(loc: str, inputs: list) -> Optional[str]:
    """The input (as given) that `loc` lies inside, or is: a directory or a glob's base that would
    find what a job writes at `loc` as input; None if none."""
    here = storage.canonical(loc)
    for raw in inputs:
        root = input_root(str(raw))
        if here == root or here.startswith(root.rstrip("/") + "/"):
            return str(raw)
    return None


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
