"""The CPU scoring path's parts (pipelines/scoring/units.py): units cover every row once and never
span a row group; a unit's file is written whole, and rewriting it is idempotent; a unit that
can't be scored names its input rows, output file or model; a corrupt row group stops the run
naming it, keeping what was committed, and a rerun on a repaired file completes the output
exactly once; actors that can't be placed stop the run instead of waiting. (Kill -9 of the
driver and of an actor: tests/test_scoring_faults.py; row_hash against Ray's: test_compat.py.)"""

from __future__ import annotations

import os
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.compat import row_hashes
from pipelines.scoring.unit_plan import UnitSpec, choose_unit_rows, pending_units, plan_units
from pipelines.scoring.units import ScoringActor


def _file(path, rows: int, row_group_size: int, start: int = 0) -> None:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(start, start + rows)],
                             "text": [f"row {i} " * (1 + i % 7) for i in range(start, start + rows)]}),
                   path, row_group_size=row_group_size)


def _spec(tmp_path, model) -> UnitSpec:
    from pipelines.scoring.config import ScoreConfig
    from pipelines.scoring.job import tokenize_settings

    cfg = ScoreConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=model, task="embed")
    tokenize = tokenize_settings(cfg, 32, id_column="id", fallback_ids=None)
    return UnitSpec(output=str(tmp_path / "out"), columns=["text", "id"], batch_size=16, with_path=False,
                    predictor_args=(model, "embed"), tokenize=tokenize,
                    predictor_kwargs=dict(dtype="fp32", num_threads=1, tokenize=tokenize))


def test_units_cover_every_row_once_within_row_groups(tmp_path):
    _file(tmp_path / "a.parquet", 250, 60)  # row groups of 60, 60, 60, 60, 10
    _file(tmp_path / "b.parquet", 7, 100)
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    files = [str(tmp_path / f) for f in ("a.parquet", "b.parquet", "e.parquet")]
    units = plan_units(files, files, unit_rows=25)
    assert plan_units(files, files, unit_rows=25) == units  # deterministic: a resume plans the same units
    # From the row-group sizes the input plan read (its footers, read once), the same units.
    from pipelines.inputs import plan_inputs

    known = plan_inputs(files).row_groups
    assert known[files[0]] == [60, 60, 60, 60, 10] and sum(known[files[2]]) == 0
    assert plan_units(files, files, unit_rows=25, row_groups=known) == units
    for name, rows in ((files[0], 250), (files[1], 7), (files[2], 0)):
        mine = [u for u in units if u.file == name]
        covered = sorted(r for u in mine for r in range(u.first_row + u.start, u.first_row + u.stop))
        assert covered == list(range(rows))  # every row once
        assert all(0 < u.rows <= 25 for u in mine)
    md = pq.ParquetFile(files[0]).metadata
    assert all(u.stop <= md.row_group(u.row_group).num_rows for u in units if u.file == files[0])  # within its group
    assert len({u.name for u in units}) == len(units)
    committed = [str(tmp_path / "out" / units[0].name), str(tmp_path / "out" / units[3].name)]
    assert pending_units(units, committed) == [u for i, u in enumerate(units) if i not in (0, 3)]


def test_unit_rows_are_whole_blocks_about_four_units_per_actor():
    assert choose_unit_rows(35_000, 2, 1024) == 5 * 1024  # 35,000 / 8 units -> 4,375 rows -> 5 blocks
    assert choose_unit_rows(10, 2, 1024) == 1024  # at least one block
    assert choose_unit_rows(10_000_000, 2, 1024) == 16 * 1024  # at most 16 blocks: files of a sane size


def test_actor_writes_a_unit_whole_and_a_retry_rewrites_the_same_file(tmp_path, tiny):
    _file(tmp_path / "a.parquet", 90, 40)
    out = tmp_path / "out"
    out.mkdir()
    spec = _spec(tmp_path, tiny)
    actor = ScoringActor(1)
    f = str(tmp_path / "a.parquet")
    [u0, u1] = [u for u in plan_units([f], [f], 25) if u.row_group == 1]  # rows 40..79: units of 25 and 15 rows
    assert actor.score(u1, spec).rows == 15
    rows, errors, tokens = actor.score(u0, spec)
    first = pq.read_table(out / u0.name)
    assert (rows, errors) == (25, 0) and tokens == sum(first["n_tokens"].to_pylist())
    assert first["id"].to_pylist() == [f"r{i}" for i in range(40, 65)]  # input order, its own rows
    assert first["row_hash"].to_pylist() == row_hashes(f, 40, 25).tolist()
    actor.score(u0, spec)  # a retry of a committed unit: the same name, the same rows
    assert pq.read_table(out / u0.name).equals(first)
    assert sorted(os.listdir(out)) == sorted([u0.name, u1.name])  # no temp file left
    # What kills leave, now and from earlier raybert versions, goes on resume; a user's own hidden
    # temp file, and a temp of a file we don't write, stay (#37: one atomic write, one temp scheme).
    from pipelines.scoring.output import RUN_RECORD, remove_temp_files

    ours = [f".{u0.name}.123.tmp", f".{u1.name}.tmp", f".{RUN_RECORD}.77.tmp", f"{RUN_RECORD}.77.tmp"]
    theirs = [".notes.txt.5.tmp", ".mine.tmp"]
    for name in ours + theirs:
        (out / name).write_bytes(b"cut short by a kill")
    assert sorted(remove_temp_files(str(out), "actors")) == sorted(ours)
    assert sorted(os.listdir(out)) == sorted([u0.name, u1.name] + theirs)


def test_a_corrupt_row_group_stops_the_run_naming_it_and_a_rerun_completes(tmp_path, tiny):
    """A row group whose pages can't be read (the footer is sound, so the driver's checks pass):
    one Error line naming the file and rows, exit 1, the other units committed and kept; once the
    file is replaced, the same command finishes with every row once."""
    import subprocess
    import sys

    from pipelines.scoring.output import MANIFEST, default_checkpoint_dir, read_output

    d = tmp_path / "in"
    d.mkdir()
    _file(d / "good.parquet", 200, 100)
    _file(d / "bad.parquet", 300, 100, start=200)
    sound = (d / "bad.parquet").read_bytes()
    col = pq.ParquetFile(d / "bad.parquet").metadata.row_group(1).column(1)
    broken = bytearray(sound)
    broken[col.data_page_offset:col.data_page_offset + 16] = b"\xff" * 16  # its first page header
    (d / "bad.parquet").write_bytes(bytes(broken))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.score", str(d), str(out), "--model", tiny, "--batch-size", "50"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    text = r.stdout + r.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "bad.parquet: rows 100-" in errors[0] and "row group 1" in errors[0], errors[0]
    kept = read_output(str(out), ["id"])["id"].to_pylist()
    assert 0 < len(kept) < 500 and len(set(kept)) == len(kept)
    assert not any(f"r{i}" in kept for i in range(300, 400))  # nothing of the unreadable rows
    assert not (out / MANIFEST).exists() and os.path.isdir(default_checkpoint_dir(str(out)))
    (d / "bad.parquet").write_bytes(sound)
    # The same command again, on the tests' shared Ray (what resumes is the output, not that Ray).
    from click.testing import CliRunner

    from conftest import local_ray
    from jobs.cli import cli

    with local_ray():
        rerun = CliRunner().invoke(cli, ["score", *cmd[3:]])
    assert rerun.exit_code == 0 and "(resumed)" in rerun.output, rerun.output[-3000:]
    ids = read_output(str(out), ["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(500))  # every row once
    assert (out / MANIFEST).exists() and not os.path.exists(default_checkpoint_dir(str(out)))


def test_actors_that_cannot_be_placed_stop_the_run_instead_of_waiting(ray_local):
    """Actors are sized to the cluster; when its CPUs are held by other work, the run says so
    within the timeout instead of waiting forever."""
    import ray

    from pipelines.scoring.config import ActorsLost
    from pipelines.scoring.units import ScoringActor, stop_actors, wait_for_an_actor

    unplaceable = [ray.remote(ScoringActor).options(num_cpus=64).remote(1)]
    try:
        with pytest.raises(ActorsLost, match=r"no predictor actor started within 2 s: the cluster has 2 of 2 CPUs"):
            wait_for_an_actor([a.ready.remote() for a in unplaceable], timeout_s=2)
    finally:
        stop_actors(unplaceable)


def test_units_go_only_to_actors_that_started(ray_local, tmp_path, tiny):
    """An actor the cluster can't place holds no units: the ones that started score them all (it
    used to be given its share up front, and the run then waited for it forever)."""
    import ray

    from pipelines.scoring.units import ScoringActor, run_units, stop_actors

    f = str(tmp_path / "a.parquet")
    _file(f, 120, 120)
    units = plan_units([f], [f], 20)
    (tmp_path / "out").mkdir()
    spec = _spec(tmp_path, tiny)
    actors = [ray.remote(ScoringActor).options(num_cpus=1).remote(1),
              ray.remote(ScoringActor).options(num_cpus=64).remote(1)]  # never placed on 2 CPUs
    done = []
    try:
        run_units(actors, units, spec, lambda rows, errors, tokens: done.append(rows))
    finally:
        stop_actors(actors)
    assert sum(done) == 120 and sorted(os.listdir(tmp_path / "out")) == sorted(u.name for u in units)


def test_actors_keep_to_their_row_group_and_spread_over_others():
    """An actor reads and keeps one row group: it gets that group's next unit, and another actor a
    group no one holds, so a big row group is read about once, not once per unit."""
    from pipelines.scoring.units import Unit, UnitQueue

    units = [Unit("f", "f", 0, g, s, s + 10, g * 100) for g in range(3) for s in range(0, 40, 10)]
    q = UnitQueue(units)
    taken = {0: [q.take(0), q.take(0)], 1: [q.take(1), q.take(1)]}
    assert {u.row_group for u in taken[0]} == {0} and {u.row_group for u in taken[1]} == {1}
    rest = [q.take(i % 2) for i in range(8)]
    assert q.take(0) is None and not q
    assert sorted((u.row_group, u.start) for u in taken[0] + taken[1] + rest) == \
        sorted((u.row_group, u.start) for u in units)  # every unit once


def test_an_unfinished_ray_data_output_is_refused_with_the_fix():
    """Unit files and Ray Data's row checkpoints (an earlier raybert's GPU path) can't finish each
    other's half-written state; runs of the CPU actors before GPUs used units are the same scheme."""
    from pipelines.scoring.units import same_scorer

    record = {}
    same_scorer(record, output="out", resumed=False)
    assert record["scorer"] == "actors"
    same_scorer(record, output="out", resumed=True)  # resumes
    cpu_actors = {"scorer": "cpu-actors"}
    same_scorer(cpu_actors, output="out", resumed=True)
    assert cpu_actors["scorer"] == "actors"
    for old in ({"recipe": {}, "scorer": "ray-data"}, {"recipe": {}}):  # written by Ray Data's path
        with pytest.raises(FileExistsError, match="scored by Ray Data.*can't resume.*--overwrite"):
            same_scorer(old, output="out", resumed=True)


def test_a_store_hiccup_is_retried_and_a_bad_file_is_not_retried_forever():
    from pipelines.scoring.units import with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("503 SlowDown")
        return "read"

    assert with_retries(flaky) == "read" and len(calls) == 2
    calls.clear()

    def broken():
        calls.append(1)
        raise OSError("Couldn't deserialize thrift")

    with pytest.raises(OSError, match="thrift"):
        with_retries(broken)
    assert len(calls) == 3


def test_an_actor_names_what_failed_input_output_or_model(tmp_path, tiny):
    """What a unit can fail on, each named for the driver's one-line error (run_units): the input
    (a missing file), the output (a directory that can't be written), the model (gone from the node)."""
    from pipelines.scoring.units import NotLoaded, NotRead, NotWritten

    f = str(tmp_path / "a.parquet")
    _file(f, 30, 30)
    [unit] = plan_units([f], [f], 64)
    spec = _spec(tmp_path, tiny)
    (tmp_path / "out").write_text("a file where the output directory should be")
    with pytest.raises(NotWritten, match=r"out/part-00000-00000-000000000\.parquet could not be written"):
        ScoringActor(1).score(unit, spec)
    os.remove(tmp_path / "out")
    (tmp_path / "out").mkdir()
    os.remove(f)
    with pytest.raises(NotRead, match=r"a\.parquet: rows 0-29 \(row group 0\) could not be read"):
        ScoringActor(1).score(unit, spec)
    with pytest.raises(NotLoaded, match="the model did not load on a predictor actor"):
        ScoringActor(1).score(unit, replace(spec, predictor_args=(str(tmp_path / "gone"), "embed")))


def test_an_actor_larger_than_the_cluster_is_refused_before_anything_starts():
    """resources.actor_num_cpus above the cluster's CPUs could never be placed: refused in the
    plan, naming the setting, instead of a five-minute wait for actors that can't start."""
    from pipelines.resources import cpu_plan

    with pytest.raises(ValueError, match=r"resources.actor_num_cpus 64 is more than the Ray cluster's 2 CPUs"):
        cpu_plan({"CPU": 2.0}, num_actors=1, actor_num_cpus=64, device="cpu", ray_data=False)
    assert cpu_plan({"CPU": 2.0}, num_actors=1, actor_num_cpus=2, device="cpu", ray_data=False).actor_num_cpus == 2
