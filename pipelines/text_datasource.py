"""Ray Data's read of CSV and JSON Lines files through raybert's own reader (pipelines/text_formats.py).

Contract: `read_text_files(names, fmt, columns, text_columns, include_paths, num_cpus)` is a Ray
Dataset of those files, read in Ray tasks of `num_cpus` CPUs with Ray Data's file datasource (file
order, compression by extension, the `path` column, retried I/O) and `text_formats`' parsing (text
columns as source text, long rows), only `columns` of each. The projection happens inside the read
task: a separate projection stage (`select_columns`) asks for a whole CPU, which training workers
leave no room for, and a JSON Lines corpus then never reached its first step (issue #34).
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa
import ray.data
from ray.data.datasource import FileBasedDatasource

from pipelines.text_formats import csv_batches, json_table


class TextFilesDatasource(FileBasedDatasource):
    """CSV (`fmt` "csv") or JSON Lines ("json") files, read by `csv_batches` / `json_table`."""

    def __init__(self, paths, *, fmt: str, columns: Optional[list], text_columns: tuple, **kwargs):
        super().__init__(paths, **kwargs)
        self._fmt, self._columns = fmt, columns
        self._text_columns = tuple(c for c in text_columns if c)

    def _read_stream(self, f, path: str):
        if self._fmt == "json":
            table = json_table(f.read_buffer(), path, self._text_columns)
            yield table.select(self._columns) if self._columns else table
            return
        given = [f]

        def open_stream():  # first the stream Ray opened; a row longer than the block re-opens the file
            return given.pop() if given else self._open_input_source(self._filesystem, path)

        for batch in csv_batches(open_stream, path, self._text_columns, self._columns):
            yield pa.Table.from_batches([batch])  # Ray Data's blocks are tables


def read_text_files(names: list[str], fmt: str, columns: Optional[list], text_columns: tuple,
                    include_paths: bool, num_cpus: Optional[float]):
    """See the module docstring."""
    return ray.data.read_datasource(
        TextFilesDatasource(names, fmt=fmt, columns=columns, text_columns=text_columns, include_paths=include_paths),
        num_cpus=num_cpus)
