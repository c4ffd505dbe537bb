"""Reading CSV and JSON Lines as Arrow: one reader for the driver's checks (`inputs.TableFile`) and
for Ray Data's read tasks (`compat.read_text_files`), so what the driver checked is what trains.

Contract:
- Text columns (the text, a text pair, ids) come out as strings of the source text, never through a
  number: a CSV field as written; a JSON string as it is, a JSON number by its own digits
  (`12345678901234567890` stays that, where a float would give `1.2345678901234567e+19`). Any
  other JSON value in a text column (true, an object, a list) is an error naming the line: scored,
  it would be its JSON text. The one spelling not kept is a JSON integer written `-0` (read `0`).
- Other columns keep their JSON / CSV types (a label of ints is an int column). A JSON Lines column
  that mixes numbers and strings, or a line that is not a JSON object, is an error naming the file
  and the line.
- CSV values may hold newlines (quoted), at any size of file.
- Rows longer than the reader's block are read: the block grows (x4 from 4 MiB) up to
  `MAX_ROW_BYTES` (256 MiB); a row past it is an error naming the file and the limit.
- JSON Lines: pyarrow's reader when its types keep the text exact (text columns it reads as strings
  or int64), else a line-by-line reader that keeps each number's source text (slower, the same
  rows). A JSON Lines file is read whole, as Ray Data's own reader does; CSV is streamed.
- `codec(name)`: the compression of a CSV / JSON Lines file, by its lowercased extension.

Imports no Ray at module level (the driver's checks use it before Ray starts).
"""

from __future__ import annotations

import io
import json
from typing import Callable, Iterator, Optional

import pyarrow as pa

from pipelines import UserError

FIRST_BLOCK_BYTES = 4 << 20  # pyarrow's default is 1 MiB; a 4 MiB block reads most corpora in one try
MAX_ROW_BYTES = 256 << 20  # the longest row (CSV record, JSON line) raybert reads; documented in the README
JSON_CHUNK_LINES = 65_536  # lines per table the line-by-line reader builds before joining them
_COMPRESSION = {".gz": "gzip", ".br": "brotli", ".zst": "zstd", ".lz4": "lz4"}
_STRADDLE = "straddling object straddles two block boundaries"


class RowTooLong(UserError):
    """A CSV record or JSON line longer than MAX_ROW_BYTES."""


def codec(name: str) -> Optional[str]:
    """pyarrow's compression name for a file, by its lowercased extension (pyarrow's own detection
    is case-sensitive)."""
    low = name.lower()
    return next((c for ext, c in _COMPRESSION.items() if low.endswith(ext)), None)


def too_long(name: str) -> RowTooLong:
    return RowTooLong(f"{name}: a row is longer than {MAX_ROW_BYTES >> 20} MiB, the longest CSV record or JSON "
                      f"line raybert reads; split that text, or write the file as Parquet")


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def _parse_options():
    import pyarrow.csv as pacsv

    # A quoted value may hold newlines (a paragraph of text): without this, a block boundary that
    # falls inside one fails the read ("parser got out of sync with chunker") on large files only.
    return pacsv.ParseOptions(newlines_in_values=True)


def csv_batches(open_stream: Callable, name: str, text_columns: tuple = (),
                columns: Optional[list] = None) -> Iterator[pa.RecordBatch]:
    """The file's rows (`columns` of them; None: all) as RecordBatches, streamed. `open_stream()`
    opens the file from its start (decompressing); a row longer than the block restarts the read
    with a larger block, skipping the rows already given, so every row comes once."""
    import pyarrow.csv as pacsv

    parse = _parse_options()
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns if c},
                                   include_columns=columns)
    block, given = FIRST_BLOCK_BYTES, 0
    while True:
        skip = given
        try:
            reader = pacsv.open_csv(open_stream(), read_options=pacsv.ReadOptions(block_size=block),
                                    parse_options=parse, convert_options=convert)
            for batch in reader:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
                given += batch.num_rows
                yield batch
            return
        except pa.ArrowInvalid as e:
            if _STRADDLE not in str(e):
                raise
            if block >= MAX_ROW_BYTES:
                raise too_long(name) from None
            block = min(block * 4, MAX_ROW_BYTES)


def csv_schema(open_stream: Callable, text_columns: tuple = ()) -> pa.Schema:
    """A CSV file's schema as `csv_batches` reads it (text columns as strings, the rest typed from
    the first block), its header's names as written (a name may repeat)."""
    import pyarrow.csv as pacsv

    parse, block = _parse_options(), FIRST_BLOCK_BYTES
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns if c})
    while True:
        try:
            return pacsv.open_csv(open_stream(), read_options=pacsv.ReadOptions(block_size=block),
                                  parse_options=parse, convert_options=convert).schema
        except pa.ArrowInvalid as e:
            if _STRADDLE not in str(e) or block >= MAX_ROW_BYTES:
                raise
            block = min(block * 4, MAX_ROW_BYTES)


# --------------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------------


def json_table(data, name: str, text_columns: tuple = (), keep: Optional[tuple] = None) -> pa.Table:
    """The whole JSON Lines file `data` (bytes or a pyarrow Buffer, decompressed) as one table, its
    text columns as source-text strings (see the module docstring). `keep`: the columns a job reads
    (None: all); where the line reader is needed, the others are kept by name only (all null), so a
    column no job reads can't make the file unreadable."""
    text_columns = tuple(c for c in text_columns if c)
    fast = _pyarrow_json(data, name, text_columns)
    if fast is not None:
        return fast
    return _python_json(data, name, text_columns, None if keep is None else set(keep) | set(text_columns))


def _pyarrow_json(data, name: str, text_columns: tuple) -> Optional[pa.Table]:
    """pyarrow's reader, if it keeps every text column's source text (strings, or int64 whose digits
    print back the same); None where it can't (a number that became a float, mixed types, a line it
    refuses: the line reader then reads or names it)."""
    import pyarrow.json as pajson

    block = FIRST_BLOCK_BYTES
    while True:
        try:
            table = pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(block_size=block))
            break
        except pa.ArrowInvalid as e:
            if _STRADDLE in str(e) and block < MAX_ROW_BYTES:
                block = min(block * 4, MAX_ROW_BYTES)
                continue
            if _STRADDLE in str(e):
                raise too_long(name) from None
            return None
    for c in text_columns:
        if c not in table.column_names:
            continue
        kind = table.schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
                or pa.types.is_int64(kind)):
            return None
        table = table.set_column(table.column_names.index(c), c, table[c].cast(pa.string()))
    return table


class _Number(str):
    """A JSON number's source text, as the line reader's parser hands it over."""


_JSON_KINDS = {bool: "boolean", dict: "object", list: "list"}


def _as_text(value, name: str, column: str, line: int):
    """A text column's value: a string as it is, a number by its source text; a boolean, object or
    list is no text (it would be scored as its JSON): an error naming the line."""
    if value is None or isinstance(value, str):  # a _Number is its digits
        return None if value is None else str(value)
    raise UserError(f"{name}: line {line}: column {column!r} holds a JSON {_JSON_KINDS.get(type(value), type(value).__name__)}, "
                     f"not text; give it a string (or a number), or null")


def _as_plain(value):
    if isinstance(value, _Number):
        return int(value) if value.lstrip("-").isdigit() else float(value)
    if isinstance(value, list):
        return [_as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


def _python_json(data, name: str, text_columns: tuple, keep: Optional[set] = None) -> pa.Table:
    """The line-by-line reader: json.loads keeps each number's text (`_Number`) until the column says
    what it is. Blank lines are skipped."""
    chunks, rows = [], []
    for i, line in enumerate(io.BytesIO(memoryview(data)), 1):
        if not line.strip():
            continue
        if len(line) > MAX_ROW_BYTES:
            raise too_long(name)
        try:
            row = json.loads(line, parse_int=_Number, parse_float=_Number)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise UserError(f"{name}: line {i} is not valid JSON ({e}); JSON Lines holds one object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{name}: line {i} is a JSON {type(row).__name__}, not an object; JSON Lines holds one "
                             f"object per line")
        rows.append((i, row))
        if len(rows) == JSON_CHUNK_LINES:
            chunks.append(_rows_table(rows, name, text_columns, keep))
            rows = []
    if rows or not chunks:
        chunks.append(_rows_table(rows, name, text_columns, keep))
    try:
        return pa.concat_tables(chunks, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise UserError(f"{name}: a column holds values of different types in different lines ({e}); use one "
                         f"type per column (e.g. every label a string)") from None


def _kind(value) -> str:
    return "number" if isinstance(value, (_Number, int, float)) and not isinstance(value, bool) else \
        _JSON_KINDS.get(type(value), "string" if isinstance(value, str) else type(value).__name__)


def _rows_table(rows: list[tuple[int, dict]], name: str, text_columns: tuple, keep: Optional[set]) -> pa.Table:
    """(line, object) pairs as one table; a column whose values can't be one Arrow type is an error
    naming the first line whose value's kind differs from the column's first. Columns not in
    `keep` (when given) are nulls, there for their names."""
    keys = list(dict.fromkeys(k for _, row in rows for k in row))  # every field, in order of first appearance
    arrays = {}
    for k in keys:
        values = [(line, row.get(k)) for line, row in rows]
        if keep is not None and k not in keep:
            arrays[k] = pa.nulls(len(rows))
            continue
        if k in text_columns:
            arrays[k] = pa.array([_as_text(v, name, k, line) for line, v in values], pa.string())
            continue
        try:
            arrays[k] = pa.array([_as_plain(v) for _, v in values])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            present = [(line, v) for line, v in values if v is not None]
            first = _kind(present[0][1]) if present else "null"
            line, v = next(((line, v) for line, v in present if _kind(v) != first), present[-1] if present else (0, None))
            raise UserError(f"{name}: line {line}: column {k!r} holds a {_kind(v)} where earlier lines hold "
                             f"{first}s ({type(e).__name__}: {e}); use one type per column (e.g. every label a "
                             f"string)") from None
    return pa.table(arrays)
