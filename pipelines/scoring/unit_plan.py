"""What a scoring job's actors are given: the input cut into *units* (`Unit`: part of one row group
of one Parquet input), and the one `UnitSpec` every unit of a job is scored with. Driver side, no
Ray; the actors that score units are in pipelines/scoring/units.py.

Contract:
- `plan_units`: every row of the (staged) Parquet inputs in units of at most `unit_rows` rows, none
  spanning two row groups, deterministic from the files' footers, in file order, and `unit_rows`
  (`choose_unit_rows`; the run record keeps it, so a resume plans the same units). A unit's output
  is one file, `<output>/<Unit.name>`; `pending_units` are those whose file is not there yet.
- `UnitSpec`: where the units' files go, what is read, and how rows are tokenized and scored: built
  once by the driver (pipelines/scoring/job.py: `score`), sent to each actor once (`ray.put`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pyarrow.parquet as pq

from pipelines import storage
from pipelines.inputs import row_group_sizes


@dataclass(frozen=True)
class UnitSpec:
    output: str  # the output directory (normalized): a unit's file is `<output>/<Unit.name>`
    columns: list  # the input columns a unit reads
    batch_size: int  # rows per predictor call (a block; the token budget cuts it into forward passes)
    with_path: bool  # add a `path` column: the inputs have no id column, fallback ids name the file
    predictor_args: tuple  # Predictor(*these, **predictor_kwargs): (model, task)
    predictor_kwargs: dict  # pipelines.scoring.job.predictor_kwargs; its `tokenize` set: the actor tokenizes
    tokenize: dict  # tokenize_batch's keyword arguments, for tokenizing actors (pipelines/scoring/feed.py)

    @property
    def model(self) -> str:
        return self.predictor_args[0]


@dataclass(frozen=True)
class Unit:
    file: str  # what is read: a local path or a URI
    path: str  # the file as Ray Data's `path` column spells it (row_hash seed, fallback ids)
    index: int  # the file's position among the inputs (names the output file)
    row_group: int
    start: int  # rows [start, stop) of the row group
    stop: int
    first_row: int  # the row group's first row in the file

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-{self.row_group:05d}-{self.start:09d}.parquet"


def choose_unit_rows(rows: int, actors: int, batch_size: int) -> int:
    """Rows per unit: about four units per actor, so the last units finish together, in whole
    blocks of `batch_size`, between 1 and 16 blocks (a unit is one output file: not too small)."""
    blocks = math.ceil(rows / max(1, 4 * actors) / batch_size)
    return batch_size * min(16, max(1, blocks))


def plan_units(files: list[str], paths: list[str], unit_rows: int, row_groups: Optional[dict] = None) -> list[Unit]:
    """Every row of `files` (read as Parquet; `paths`: each as Ray Data spells it) in units of at
    most `unit_rows` rows, none spanning two row groups. `row_groups`: file -> rows of each row
    group, where the input plan read them already; other files' footers are read here."""
    units = []
    for index, (name, path) in enumerate(zip(files, paths)):
        sizes = (row_groups or {}).get(name)
        if sizes is None:
            fs, p = storage.filesystem(name)
            with storage.reachable(name), fs.open_input_file(p) as f:
                sizes = row_group_sizes(pq.ParquetFile(f).metadata)
        first = 0
        for g, n in enumerate(sizes):
            units += [Unit(name, path, index, g, s, min(n, s + unit_rows), first) for s in range(0, n, unit_rows)]
            first += n
    return units


def pending_units(units: list[Unit], committed: list[str]) -> list[Unit]:
    """The units whose output file is not among `committed` (the output's data files)."""
    done = {storage.basename(f) for f in committed}
    return [u for u in units if u.name not in done]
