"""Scoring without Ray Data: predictor actors that score a unit of rows at a time and write the
unit's own output file. On CPUs each actor also reads and tokenizes its units (`run_units`); on
GPUs tokenizing actors do that for them (pipelines/scoring/feed.py).

Why: with a model that costs nothing, Ray Data spent about 90% of a CPU scoring job around the
predictor (BENCHMARKS.md, issue 21): worker processes started mid-run for the 0.25-CPU read and
write tasks (each importing Ray Data and pyarrow), an object-store round trip of every block to a
separate write task, a checkpoint-filter actor holding a CPU, and predictor actors started only
once the read was planned. On CPUs the reading, tokenizing, model and writing compete for the same
cores anyway, so here one process does all of a unit, and the only traffic is a unit's
description out and three numbers back.

Contract:
- A *unit* is rows [start, stop) of one row group of one (staged) Parquet input, at most
  `unit_rows` rows (pipelines/scoring/unit_plan.py: `plan_units`, deterministic from the files'
  footers, in file order, and `unit_rows`, which the run record keeps so a resume plans the same
  units; every unit of a job is scored with its one `UnitSpec`). Its output is one file,
  `<output>/part-<file>-<row group>-<start>.parquet` (`Unit.name`), written whole or not at all
  (`write_unit`: a hidden temp file renamed into place locally, a single upload on an
  object store). A unit is committed when its file exists: a rerun scores only the units
  without one (`pending_units`), so after any number of kills every input row comes out once,
  and a unit done twice (a retry, an orphaned actor) writes the same name with the same rows.
- `row_hash` is Ray Data's `include_row_hash` of (file as Ray Data spells it, row position in
  the file) (`compat.row_hashes`), so the ids of inputs without an id column, and
  `repair_duplicates`, are those of a plain Ray read (tests/test_scoring_pipeline.py compares them).
- `start_actors` starts one `ScoringActor` per planned actor before the driver stages and plans
  the input, so the actors' start-up (a fresh process importing torch) overlaps it. An actor
  loads its `Predictor` on its first unit, and again after a restart.
- `run_units` keeps two units in flight per actor, and gives units only to actors that have
  started (one the cluster can't place holds none). An actor keeps the row group it read, and gets
  that row group's next unit (`UnitQueue`): each actor holds at most one row group in memory, and a
  big row group is read about once. An actor that dies is restarted and its units retried
  (`max_restarts`, `max_task_retries`); a read or write that raises OSError is tried three times
  (`with_retries`: an object store's hiccup). A unit that fails where no retry would help stops
  the run with one error (`UnitFailed`) naming what: its input rows (`NotRead`: a corrupt or
  vanished file), its output file (`NotWritten`), or the model (`NotLoaded`), raised on the
  driver as that kind with the unit's `file`. Any other exception is a bug and keeps its
  traceback. The committed units stay for the rerun; `stop_actors` kills the actors.
- An unfinished output of an earlier raybert's Ray Data path (row checkpoints, not unit files) is
  refused with the fix (`same_scorer`, kept in the run record): they can't finish each other.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import PathInTheWay, storage
from pipelines.compat import row_hashes
from pipelines.scoring.config import ActorsLost, NotLoaded, NotRead, NotWritten, UnitFailed  # noqa: F401
from pipelines.scoring.output import RowCounts
# Planned on the driver (pipelines/scoring/unit_plan.py); imported from here too, as before.
from pipelines.scoring.unit_plan import Unit, UnitSpec, pending_units, plan_units  # noqa: F401

IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: an actor never waits on the driver between units
ACTOR_START_TIMEOUT_S = 300.0  # actors are sized to the cluster: if none starts by then, its CPUs are taken
UNIT_RETRIES = 3  # times one unit may be given to another actor after its actor was lost mid-unit


def write_unit(table: pa.Table, loc: str) -> None:
    """Write a unit's file whole: readers (and a resume) see all of it or nothing."""
    with storage.replacing(loc) as (fs, path):
        pq.write_table(table, path, filesystem=fs)


def with_retries(action: Callable, attempts: int = 3):
    """`action()`, tried again after 1 s and 2 s if it raises OSError: an object store's hiccup (a
    503, a dropped connection) passes; a corrupt or missing file fails all three."""
    for attempt in range(attempts):
        try:
            return action()
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)


class ScoringActor:
    """One predictor process: scores whole units and writes their files. On CPU it reads and
    tokenizes its units too; a GPU actor is given them tokenized (`TokenizingActor`,
    pipelines/scoring/feed.py)."""

    def __init__(self, threads: int, load_torch: bool = True):
        # Before torch and `tokenizers` load in this fresh process: OpenMP threads that sleep at
        # barriers instead of spinning (spinning stole the cores another actor needed: 10-20x slower
        # forwards under contention), and a `tokenizers` pool of this actor's share of the cores.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        if load_torch:
            import torch  # the bulk of the start-up, paid while the driver plans the input

            torch.set_num_threads(threads)
        self.predictor = None
        self.row_group: tuple = (None, None)  # ((file, row group), its table): a row group's units come in order

    def ready(self) -> bool:
        return True

    def score(self, unit: Unit, spec: UnitSpec, tokenized: Optional[pa.Table] = None) -> RowCounts:
        """Score `unit` into `spec.output` (its rows as `tokenize` made them, when given);
        returns the counts of its file."""
        if self.predictor is None:
            from pipelines.scoring.predictors import Predictor

            try:
                self.predictor = Predictor(*spec.predictor_args, **spec.predictor_kwargs)
            except Exception as e:  # checked on the driver, so: this node's copy, memory, a library
                raise NotLoaded(f"{spec.model}: the model did not load on a predictor actor "
                                f"({type(e).__name__}: {e})") from e
        table = self.unit_rows(unit, spec) if tokenized is None else tokenized
        batch = spec.batch_size
        parts = [self.predictor(table.slice(i, batch)) for i in range(0, unit.rows, batch)]
        meta = parts[0].schema.metadata  # the precision the rows were scored in
        out = pa.concat_tables([p.replace_schema_metadata(None) for p in parts]).replace_schema_metadata(meta)
        target = storage.join(spec.output, unit.name)
        try:
            with_retries(lambda: write_unit(out, target))
        except (OSError, pa.ArrowException) as e:
            raise NotWritten(f"{target} could not be written ({type(e).__name__}: {e}); check the space and "
                             f"permissions there") from e
        return RowCounts.of(out)

    def tokenize(self, unit: Unit, spec: UnitSpec) -> pa.Table:
        """`unit`'s rows tokenized (`tokenize_batch` with `spec.tokenize`), for a GPU actor's `score`."""
        from pipelines.scoring.tokenize import encoder, tokenize_batch

        settings = spec.tokenize
        try:
            encoder(settings["tokenizer_path"], settings["max_length"])  # loaded once per process
        except Exception as e:  # checked on the driver, so: this node's copy, a library
            raise NotLoaded(f"{settings['tokenizer_path']}: the tokenizer did not load on a tokenizing actor "
                            f"({type(e).__name__}: {e})") from e
        return tokenize_batch(self.unit_rows(unit, spec), **settings)

    def unit_rows(self, unit: Unit, spec: UnitSpec) -> pa.Table:
        """`unit`'s input rows, with `row_hash` (and `path`, for fallback ids)."""
        table = self._read(unit, spec.columns).slice(unit.start, unit.rows)
        table = table.append_column("row_hash", pa.array(row_hashes(unit.path, unit.first_row + unit.start,
                                                                    unit.rows), pa.uint64()))
        if spec.with_path:  # fallback ids name the file (pipelines/scoring/tokenize.py)
            table = table.append_column("path", pa.array([unit.path] * unit.rows, pa.string()))
        return table

    def _read(self, unit: Unit, columns: list[str]) -> pa.Table:
        key = (unit.file, unit.row_group)
        if self.row_group[0] != key:
            fs, path = storage.filesystem(unit.file)
            def read() -> pa.Table:
                with fs.open_input_file(path) as f:
                    return pq.ParquetFile(f).read_row_group(unit.row_group, columns=columns)

            try:
                self.row_group = (key, with_retries(read))
            except (OSError, pa.ArrowException, ValueError) as e:
                raise NotRead(f"{unit.file}: rows {unit.first_row + unit.start}-{unit.first_row + unit.stop - 1} "
                              f"(row group {unit.row_group}) could not be read ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}); replace the file with a sound copy") from e
        return self.row_group[1]


def start_actors(into: list, n: int, num_cpus: float, threads: int, max_restarts: int, max_task_retries: int,
                 num_gpus: float = 0, cls=ScoringActor, load_torch: bool = True) -> None:
    """Add `n` actors of `cls` to `into`, starting now (creation returns at once); one by one, so
    the caller's `stop_actors(into)` reaches those made before a failure."""
    import ray

    remote = ray.remote(cls)
    for _ in range(n):
        into.append(remote.options(num_cpus=num_cpus, num_gpus=num_gpus or None, max_restarts=max_restarts,
                                   max_task_retries=max_task_retries).remote(threads, load_torch))


def same_scorer(record: dict, output: str, resumed: bool) -> None:
    """Keep an unfinished output on the path that started it: our actors commit whole files per
    unit (on CPUs and GPUs alike), Ray Data (raybert's GPU path before it used them) committed row
    checkpoints, and neither can finish the other's half-written state. Records the path in the run
    record (`record["scorer"]`)."""
    was = record.get("scorer", "ray-data") if resumed else "actors"
    if was == "ray-data":
        raise PathInTheWay(f"{output} is an unfinished run scored by Ray Data (an earlier raybert's GPU path), "
                              f"which this raybert can't resume; pass --overwrite (YAML: overwrite: true) to "
                              f"score it again from the start")
    record["scorer"] = "actors"  # "cpu-actors" (the CPU path before GPUs used units) is the same scheme


def stop_actors(actors: list) -> None:
    import ray

    for a in actors:
        ray.kill(a, no_restart=True)


def wait_for_an_actor(ready: list, timeout_s: float = ACTOR_START_TIMEOUT_S,
                      lost: Optional[Callable[[], Exception]] = None) -> list:
    """The `ready()` refs of the actors that have started once one has; if none can be placed
    within `timeout_s`, raise `lost()` (default: ActorsLost, the cluster's CPUs held by other
    work) rather than wait forever."""
    import ray

    done, _ = ray.wait(ready, num_returns=1, timeout=timeout_s)
    if not done:
        raise lost() if lost is not None else not_started("predictor", timeout_s)
    return done


def not_started(kind: str, timeout_s: float, resource: str = "CPU",
                settings: str = "--num-actors / resources.actor_num_cpus") -> ActorsLost:
    """Why no `kind` actor started within `timeout_s`: the cluster's `resource`s held by other work."""
    import ray

    free, total = ray.available_resources().get(resource, 0), ray.cluster_resources().get(resource, 0)
    return ActorsLost(f"no {kind} actor started within {timeout_s:g} s: the cluster has {free:g} of {total:g} "
                      f"{resource}s free (other jobs or actors hold the rest); free them, or set {settings} lower")


class UnitQueue:
    """The units left, handed out by row group: an actor reads and keeps one row group at a time, so
    it gets the next unit of the row group it holds, and a fresh actor a row group no other holds
    (a 1M-row row group is read once or a few times, not once per unit)."""

    def __init__(self, units: list[Unit]):
        self.groups: dict[tuple, deque] = {}
        for u in units:
            self.groups.setdefault((u.file, u.row_group), deque()).append(u)
        self.held: dict[int, tuple] = {}  # actor index -> the row group it last read

    def __bool__(self) -> bool:
        return bool(self.groups)

    def put_back(self, unit: Unit) -> None:
        """A unit whose actor was lost: first in line for the next actor that asks."""
        key = (unit.file, unit.row_group)
        group = self.groups.pop(key, deque())
        group.appendleft(unit)
        self.groups = {key: group, **self.groups}

    def take(self, actor: int) -> Optional[Unit]:
        key = self.held.get(actor)
        if key not in self.groups:
            others = set(self.held.values())  # held groups sit at the front: the scan is short
            key = next((k for k in self.groups if k not in others), next(iter(self.groups), None))
            if key is None:
                return None
            self.held[actor] = key
        group = self.groups[key]
        unit = group.popleft()
        if not group:
            del self.groups[key]
        return unit


def started_actor(index: int, ready_ref, kind: str = "predictor", restarting: bool = False) -> Optional[int]:
    """`index`, once its actor's `ready()` came back; ActorsLost if the actor could not start. With
    `restarting` (an actor whose node was lost), None while it is still unreachable."""
    import ray

    try:
        ray.get(ready_ref)
    except ray.exceptions.ActorUnavailableError:
        if restarting:
            return None
        raise ActorsLost(f"a {kind} actor could not start: it is unreachable") from None
    except ray.exceptions.RayActorError as e:
        raise ActorsLost(f"a {kind} actor could not start: {str(e).strip().splitlines()[0]}") from None
    return index


def collect(ref, unit: Unit, on_done: Callable[[int, int, int], None], retry_unavailable: bool = False) -> bool:
    """`on_done(rows, errors, tokens)` of a unit's finished `score` task (True), or the one error
    that stops the run: an actor dead for good, or a unit that can't be scored (`UnitFailed`). Any
    other exception is a bug and keeps its traceback. With `retry_unavailable`, an actor that went
    away mid-unit and is restarting (its node lost: `ActorUnavailableError`) returns False: the
    caller gives the unit to another actor (a unit's file is written whole, so scoring it again
    writes the same rows once)."""
    import ray

    try:
        on_done(*ray.get(ref))
        return True
    except ray.exceptions.ActorUnavailableError:
        if retry_unavailable:
            return False
        raise
    except ray.exceptions.RayActorError as e:
        raise ActorsLost(f"a predictor or tokenizing actor died more often than resources.max_restarts allows, scoring "
                         f"{unit.file} (row group {unit.row_group}): {str(e).strip().splitlines()[0]}; if it "
                         f"ran out of memory, use fewer actors (--num-actors) or a smaller --max-length; the "
                         f"rows scored so far are kept: rerun the same command to finish") from None
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if not isinstance(cause, UnitFailed):
            raise  # not the input's, the output's or the model's: a bug, with its traceback
        err = type(cause)(f"{cause}; the rows scored so far are kept: rerun the same command to finish")
        err.file = unit.file  # of its kind (NotRead...), so the driver can tell an input to be replaced
        raise err from None


def run_units(actors: list, units: list[Unit], spec: UnitSpec,
              on_done: Callable[[int, int, int], None]) -> float:
    """Score `units` on `actors`, IN_FLIGHT_PER_ACTOR each, calling `on_done(rows, errors, tokens)`
    as each unit commits. Units go only to actors that have started, so actors the cluster can't
    place (CPUs held by other work) hold none; a unit whose actor is lost mid-unit (its node gone)
    goes to another, and the actor gets units again once Ray has restarted it elsewhere. Returns
    when (`time.perf_counter()`) the first actor was ready."""
    return _UnitRunner(actors, units, spec, on_done).run()


class _UnitRunner:
    def __init__(self, actors: list, units: list[Unit], spec: UnitSpec,
                 on_done: Callable[[int, int, int], None]):
        self.actors, self.queue, self.spec, self.on_done = actors, UnitQueue(units), spec, on_done
        self.in_flight: dict = {}  # score ref -> (actor index, unit)
        self.starting: dict = {}  # ready ref -> actor index
        self.up: set = set()  # actors taking units
        self.down: dict = {}  # actor index -> when it was lost (monotonic)
        self.retries: dict = {}  # unit name -> times handed out again

    def run(self) -> float:
        import ray

        if not self.queue:
            return time.perf_counter()
        self.starting = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        first = wait_for_an_actor(list(self.starting))
        ready_at = time.perf_counter()
        self.spec_ref = ray.put(self.spec)  # sent to each actor once, not with every unit
        for ref in first:
            self.started(ref)
        while self.in_flight or (self.queue and self.starting):  # nothing in flight: wait for a restart as for a start
            ready, _ = ray.wait(list(self.in_flight) + list(self.starting), num_returns=1,
                                timeout=None if self.in_flight else ACTOR_START_TIMEOUT_S)
            if not ready:
                raise not_started("predictor", ACTOR_START_TIMEOUT_S)
            if ready[0] in self.starting:
                self.started(ready[0])
                continue
            i, unit = self.in_flight.pop(ready[0])
            if collect(ready[0], unit, self.on_done, retry_unavailable=True):
                if i in self.up:
                    self.submit(i)
            else:
                self.lost(i, unit)
        if self.queue:
            raise ActorsLost("scoring stopped with units left and no predictor actor to score them; the rows "
                             "scored so far are kept: rerun the same command to finish")
        return ready_at

    def submit(self, i: int) -> None:
        unit = self.queue.take(i)
        if unit is not None:
            self.in_flight[self.actors[i].score.remote(unit, self.spec_ref)] = (i, unit)

    def load(self, i: int) -> int:
        return sum(j == i for j, _ in self.in_flight.values())

    def started(self, ref) -> None:
        i = self.starting.pop(ref)
        if started_actor(i, ref, restarting=i in self.down) is None:  # its node is gone; Ray is restarting it
            if time.monotonic() - self.down[i] > ACTOR_START_TIMEOUT_S:
                raise not_started("predictor", ACTOR_START_TIMEOUT_S)
            self.starting[self.actors[i].ready.remote()] = i
            return
        self.down.pop(i, None)
        self.up.add(i)
        for _ in range(IN_FLIGHT_PER_ACTOR - self.load(i)):
            self.submit(i)

    def lost(self, i: int, unit: Unit) -> None:
        """Actor `i` went away mid-unit: the unit goes back to the queue, first in line, and to a
        working actor with room; `i` is asked for `ready()` until Ray has restarted it."""
        n = self.retries[unit.name] = self.retries.get(unit.name, 0) + 1
        if n > UNIT_RETRIES:
            raise ActorsLost(f"{unit.file} (row group {unit.row_group}): its actor was lost {n} times while scoring "
                             f"it; check the cluster's nodes; the rows scored so far are kept: rerun the same "
                             f"command to finish")
        self.queue.put_back(unit)
        self.up.discard(i)
        self.down.setdefault(i, time.monotonic())
        if i not in self.starting.values():
            self.starting[self.actors[i].ready.remote()] = i
        for j in self.up:
            if self.load(j) < IN_FLIGHT_PER_ACTOR:
                self.submit(j)


def score_on_actors(run: Callable[[list[Unit], Callable], float], output: str, files: list[str], unit_rows: int,
                    checkpoint_dir: str, total: int, rows_before: int, tokens_before: int,
                    row_groups: Optional[dict] = None) -> float:
    """The scoring step of `pipelines.scoring.job.score`: plan the units of `files` (staged Parquet),
    skip those `output` already holds, score the rest with `run(units, on_done)` (`run_units`, or
    `feed.run_fed_units`); one progress line. Returns when (`time.perf_counter()`) the first
    predictor actor was ready: the start-up ends there. `row_groups`: see `plan_units`."""
    from pipelines.console import Progress
    from pipelines.scoring.output import UNITS_RECORD, data_files, ray_path, write_json

    units = plan_units(files, [ray_path(f) for f in files], unit_rows, row_groups)
    todo = pending_units(units, data_files(output))
    # Marks the run unfinished until `finish` deletes the checkpoint dir (an object store has no empty dirs).
    write_json(storage.join(checkpoint_dir, UNITS_RECORD), {"unit_rows": unit_rows, "units": len(units),
                                                             "pending": len(todo)})
    progress = Progress("score", total, start=rows_before)
    counts = [rows_before, tokens_before]

    def done(rows: int, errors: int, tokens: int) -> None:
        counts[0] += rows
        counts[1] += tokens
        progress.update(counts[0], counts[1] - tokens_before)

    try:
        return run(todo, done)
    finally:
        progress.close()
