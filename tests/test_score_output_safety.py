"""A scoring output holds only what raybert writes (issue 34): a directory of someone else's files,
or an output of ours with someone else's files in it, is refused on the driver, naming them,
overwrite or not; overwrite deletes only raybert's files and never follows a symlink (a symlinked
output is scored into and kept; a symlink inside the output is refused, never followed); a resume
or a finished output's report on a rewritten input is refused, naming it, and a stale staged copy
of a CSV input is staged again; a glob over the output's parent reruns and resumes with its own
command. Most checks run on the driver without Ray; four small scoring runs share the tests' Ray."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.score import ResourceConfig, ScoreConfig, main
from pipelines.scoring.output import (MANIFEST, RUN_RECORD, UNITS_RECORD, default_checkpoint_dir, read_json,
                                    read_output)
from pipelines.scoring.job import preflight
from tests.test_remote_storage import BUCKET, s3  # noqa: F401 (the loopback S3 server, a module fixture)


def _data(d, files=2, rows=20):
    d.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        pq.write_table(pa.table({"id": [f"f{f}-{i}" for i in range(rows)],
                                 "text": [f"row {i} of file {f} " * (1 + i % 5) for i in range(rows)]}),
                       d / f"part-{f}.parquet")
    return d


def _tree(d) -> dict[str, bytes]:
    """Every file under `d` (not through symlinks) with its bytes, and every symlink with its target."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, d)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif name in files:
                out[rel] = open(p, "rb").read()
    return out


def _cfg(data, out, tiny, **kw) -> ScoreConfig:
    return ScoreConfig(input=str(data), output=str(out), model=tiny, task="embed", batch_size=10, dtype="fp32",
                       resources=ResourceConfig(num_actors=1), **kw)


def _ours(out, recipe: dict, finished: bool = True) -> None:
    """The files a run of ours leaves (a unit file of no unit the inputs plan, so a new run never writes it)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_RECORD).write_text(json.dumps({"recipe": recipe, "scorer": "actors", "unit_rows": 10}))
    pq.write_table(pa.table({"x": [1]}), out / "part-00099-00000-000000000.parquet")
    if finished:
        (out / MANIFEST).write_text(json.dumps({"recipe": recipe, "inputs": recipe["inputs"], "result": {}}))


# ---- 1: never write beside files raybert did not write ----------------------------------------


def test_a_directory_of_other_files_is_refused_before_anything_is_written(tmp_path, tiny):
    data = _data(tmp_path / "in")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "keep.txt").write_text("keep")
    before = _tree(out)
    with pytest.raises(ValueError) as e:
        main(_cfg(data, out, tiny))
    msg = str(e.value)
    assert f"output {out} is not an output of raybert score" in msg and "notes.txt, sub/keep.txt;" in msg, msg
    assert "choose another output, or remove them" in msg
    for i in range(4):
        (out / f"x{i}.csv").write_text("")
    with pytest.raises(FileExistsError, match=r"holds notes.txt, sub/keep.txt, x0.csv and 3 more; "):
        preflight(_cfg(data, out, tiny, overwrite=True))
    for i in range(4):
        os.remove(out / f"x{i}.csv")
    assert _tree(out) == before
    assert not os.path.exists(default_checkpoint_dir(str(out))) and not os.path.exists(f"{out}.lock")


def test_an_output_of_ours_holding_other_files_is_refused_with_or_without_overwrite(tmp_path, tiny):
    data = _data(tmp_path / "in")
    out = tmp_path / "out"
    cfg = _cfg(data, out, tiny)
    _ours(out, preflight(cfg).recipe)
    (out / "notes.txt").write_text("mine")
    (out / "_staged").mkdir()
    (out / "_staged" / "mine.parquet").write_text("not a staged copy")
    before = _tree(out)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match=r"is an output of raybert score but also holds files raybert did not "
                                             r"write: _staged/mine.parquet, notes.txt; .*move them out"):
            main(_cfg(data, out, tiny, overwrite=overwrite))
        assert _tree(out) == before
    # The checkpoint dir likewise, overwrite or not (a run deletes its checkpoint files when it ends).
    os.remove(out / "notes.txt")
    os.remove(out / "_staged" / "mine.parquet")
    ckpt = tmp_path / "out.checkpoint"
    ckpt.mkdir()
    (ckpt / UNITS_RECORD).write_text("{}")
    (ckpt / "todo.txt").write_text("keep me")
    for overwrite in (True, False):
        with pytest.raises(ValueError, match=r"checkpoint dir .* holds files that are not scoring .*: todo.txt;"):
            preflight(_cfg(data, out, tiny, overwrite=overwrite))
    assert (ckpt / "todo.txt").read_text() == "keep me"


# ---- 2: overwrite deletes only what raybert writes --------------------------------------------


def test_what_raybert_writes_is_one_rule_for_the_check_and_the_delete(tmp_path):
    from pipelines.scoring.output import CHECKPOINT, foreign, layout, remove_ours
    from pipelines.scoring.units import plan_units

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x"] * 30}), f, row_group_size=20)
    unit = plan_units([str(f)], [str(f)], 10)[-1]  # a real unit's name: the rule follows Unit.name
    out = tmp_path / "out"
    ours = [RUN_RECORD, MANIFEST, f"{RUN_RECORD}.123.tmp", unit.name, f".{unit.name}.4567.tmp", f".{unit.name}.tmp",
            "_staged/00000.parquet", "_staged/.00001.parquet.tmp"]
    (out / "_staged").mkdir(parents=True)
    for name in ours:
        (out / name).write_bytes(b"{}" if name == RUN_RECORD else b"x")
    assert layout(str(out)) == "ray-data"  # a run record without `scorer`: an earlier raybert's Ray Data output
    ray_data_file = out / "3f2a9c_000000_000000-0.parquet"
    ray_data_file.write_bytes(b"x")
    assert foreign(str(out), layout(str(out))) == []
    (out / RUN_RECORD).write_text(json.dumps({"scorer": "actors"}))  # our actors name every file they write
    assert layout(str(out)) == "actors" and foreign(str(out), "actors") == [ray_data_file.name]
    assert foreign(str(out), None) == sorted(ours + [ray_data_file.name])  # no record, no manifest: none is ours
    os.remove(ray_data_file)
    remove_ours(str(out), layout(str(out)))
    assert os.listdir(out) == []  # every file of ours gone, the directory kept
    # The checkpoint dir: our units record (and its temp), Ray Data's row checkpoints; nothing else.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in (UNITS_RECORD, f"{UNITS_RECORD}.99.tmp", "1.parquet", "2.pending.parquet"):
        (ckpt / name).write_text("x")
    assert foreign(str(ckpt), CHECKPOINT) == []
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "3.parquet").write_text("x")
    assert foreign(str(ckpt), CHECKPOINT) == ["sub/3.parquet"]
    os.remove(ckpt / "sub" / "3.parquet")
    assert foreign(str(ckpt), CHECKPOINT) == ["sub/"]  # an empty directory is named itself
    os.rmdir(ckpt / "sub")
    remove_ours(str(ckpt), CHECKPOINT, drop_dir=True)
    assert not ckpt.exists()


# ---- 3: never follow a symlink out of the output ----------------------------------------------


def test_overwrite_through_a_symlinked_output_keeps_the_link_and_scores_into_its_target(ray_local, tmp_path, tiny):
    data = _data(tmp_path / "in")
    disk = tmp_path / "disk"
    target = disk / "scores"
    target.mkdir(parents=True)
    (disk / "other.txt").write_text("beside the target: kept")
    link = tmp_path / "out"
    os.symlink(target, link)
    cfg = _cfg(data, link, tiny, overwrite=True)
    _ours(target, preflight(cfg).recipe)  # a finished earlier run, scored through the link
    result = main(cfg)
    assert result.rows == 40 and not result.already_complete
    assert os.path.islink(link) and os.readlink(link) == str(target)  # the link kept, pointing where it did
    assert (target / MANIFEST).exists() and not (target / "part-00099-00000-000000000.parquet").exists()
    ids = read_output(str(target), ["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(f"f{f}-{i}" for f in range(2) for i in range(20))
    assert (disk / "other.txt").read_text() == "beside the target: kept"
    assert sorted(os.listdir(disk)) == ["other.txt", "scores"]


def test_a_symlink_inside_the_output_is_refused_and_never_followed(tmp_path, tiny):
    data = _data(tmp_path / "in")
    home = tmp_path / "home" / "data"
    (home / "deep").mkdir(parents=True)
    (home / "a.txt").write_text("a")
    (home / "deep" / "b.parquet").write_text("b")
    out = tmp_path / "out"
    cfg = _cfg(data, out, tiny)
    _ours(out, preflight(cfg).recipe)
    os.symlink(home, out / "sub")
    before, theirs = _tree(out), _tree(home)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match=r"also holds files raybert did not write: sub \(a symlink\);") as e:
            main(_cfg(data, out, tiny, overwrite=overwrite))
        assert "a.txt" not in str(e.value) and "b.parquet" not in str(e.value)  # not listed through the link
    assert _tree(out) == before and _tree(home) == theirs
    os.symlink(tmp_path / "gone", tmp_path / "dangling")  # an output linked to nothing: not made a directory
    with pytest.raises(ValueError, match=r"output .*dangling is a symlink to .*gone, which does not exist"):
        preflight(_cfg(data, tmp_path / "dangling", tiny))
    assert not (tmp_path / "gone").exists()


# ---- 4: a resume identifies its inputs by content ---------------------------------------------


def test_a_resume_or_report_on_a_rewritten_input_is_refused_naming_it(tmp_path, tiny):
    data = _data(tmp_path / "in")
    out = tmp_path / "out"
    cfg = _cfg(data, out, tiny)
    recipe = preflight(cfg).recipe
    _ours(out, recipe, finished=False)  # what a run killed after some units leaves: record, units, checkpoint
    ckpt = tmp_path / "out.checkpoint"
    ckpt.mkdir()
    (ckpt / UNITS_RECORD).write_text("{}")
    changed = data / "part-1.parquet"
    sound, stat = changed.read_bytes(), os.stat(changed)
    pq.write_table(pa.table({"id": [f"f1-{i}" for i in range(20)], "text": [f"other text {i}" for i in range(20)]}),
                   changed)  # same ids and row groups, other text
    with pytest.raises(FileExistsError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert f"{changed} (size {stat.st_size:,} -> {os.path.getsize(changed):,} bytes)" in msg, msg
    assert "part-0.parquet" not in msg and "restore the file(s)" in msg and "--overwrite" in msg
    # The same bytes written again (a `touch`, a copy that didn't keep the time): the content is the
    # run's, so the same command goes on.
    changed.write_bytes(sound)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert preflight(cfg).recipe == recipe
    # A finished output is reported only for the inputs it was scored from.
    pq.write_table(pa.table({"id": [f"f1-{i}" for i in range(20)], "text": [f"other text {i}" for i in range(20)]}),
                   changed)
    (out / MANIFEST).write_text(json.dumps({"recipe": recipe, "inputs": recipe["inputs"], "result": {}}))
    with pytest.raises(FileExistsError, match=r"finished run of input\(s\) that changed since: .*part-1.parquet"):
        preflight(cfg)
    # With another setting too, both are named.
    with pytest.raises(FileExistsError, match=r"max_length 512 -> 64; input .*part-1.parquet \(size"):
        preflight(_cfg(data, out, tiny, max_length=64))
    changed.write_bytes(sound)
    assert preflight(cfg).recipe == recipe  # restored: the same command goes on
    # A run record of an older raybert (no fingerprints) still resumes.
    os.remove(out / MANIFEST)
    old = {k: v for k, v in recipe.items() if k != "input_fingerprints"}
    (out / RUN_RECORD).write_text(json.dumps({"recipe": old, "scorer": "actors", "unit_rows": 10}))
    preflight(cfg)


def test_a_same_size_rewrite_with_its_time_restored_is_refused(tmp_path, tiny):
    """Content, not the clock: a CSV rewritten to the same size with its modification time put back
    (what a size + mtime check passes) is refused; the Parquet footer's digest covers its row
    groups' sizes and statistics."""
    d = tmp_path / "in"
    d.mkdir()
    f = d / "a.csv"
    f.write_text("id,text\n1,first row\n2,second row\n")
    out = tmp_path / "out"
    cfg = _cfg(d, out, tiny)
    recipe = preflight(cfg).recipe
    _ours(out, recipe, finished=False)
    (tmp_path / "out.checkpoint").mkdir()
    (tmp_path / "out.checkpoint" / UNITS_RECORD).write_text("{}")
    stat = os.stat(f)
    f.write_text("id,text\n1,FIRST ROW\n2,SECOND ROW\n")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(f).st_size == stat.st_size and os.stat(f).st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(FileExistsError, match=rf"{f} \(other content, the same {stat.st_size} bytes\)"):
        preflight(cfg)


def test_a_staged_copy_is_reused_only_while_it_matches_its_record(tmp_path):
    from pipelines.inputs import plan_inputs
    from pipelines.scoring.output import STAGED, stage_inputs

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("text\nfirst\nsecond\n")
    out = tmp_path / "out"
    record: dict = {}
    staged = stage_inputs(str(out), plan_inputs(str(d)), ("text",), record)
    [copy] = [k for k, v in staged.items() if v != k]
    entry = record["staged"]["00000.parquet"]
    assert entry["source"] == str(d / "a.csv") and entry["size"] == os.path.getsize(copy)
    made = os.stat(copy).st_mtime_ns
    stage_inputs(str(out), plan_inputs(str(d)), ("text",), record)
    assert os.stat(copy).st_mtime_ns == made  # matches its record: reused
    pq.write_table(pa.table({"text": ["stale", "copy!"]}), copy)  # not what the record says (size)
    stage_inputs(str(out), plan_inputs(str(d)), ("text",), record)
    assert pq.read_table(copy)["text"].to_pylist() == ["first", "second"]
    assert sorted(os.listdir(out / STAGED)) == ["00000.parquet"]


def test_a_resume_restages_a_csv_copy_without_a_matching_record(ray_local, tmp_path, tiny):
    """A run killed after staging a CSV and before saving its record (or an older raybert's run)
    left a staged copy that holds other text than the input now: the resume stages it again, so
    every row comes from the input as it is, and records the copy."""
    from bert_core.tokenizer import load_tokenizer

    d = tmp_path / "in"
    d.mkdir()
    texts = [f"the current text of row {i} " * (1 + i % 3) for i in range(12)]
    (d / "a.csv").write_text("text\n" + "".join(f"{t}\n" for t in texts))
    out = tmp_path / "out"
    cfg = _cfg(d, out, tiny)
    out.mkdir()
    (out / RUN_RECORD).write_text(json.dumps({"recipe": preflight(cfg).recipe, "scorer": "actors", "unit_rows": 10}))
    (out / "_staged").mkdir()
    pq.write_table(pa.table({"text": ["old"] * 12}), out / "_staged" / "00000.parquet")
    os.makedirs(default_checkpoint_dir(str(out)))
    result = main(cfg)
    assert result.resumed and result.rows == 12
    tok = load_tokenizer(tiny)
    got = sorted(read_output(str(out), ["n_tokens"])["n_tokens"].to_pylist())
    assert got == sorted(len(tok(t)["input_ids"]) for t in texts)
    assert read_json(str(out / RUN_RECORD))["staged"]["00000.parquet"]["source"] == str(d / "a.csv")


# ---- 5: a glob over the output's parent ------------------------------------------------------


def test_a_glob_over_the_outputs_parent_reruns_and_resumes_with_its_own_command(ray_local, tmp_path, tiny):
    d = _data(tmp_path / "d", files=2, rows=30)
    out = d / "out"
    cfg = _cfg(f"{d}/**/*.parquet", out, tiny)
    first = main(cfg)
    assert first.rows == 60 and preflight(cfg).plan.files == [str(d / "part-0.parquet"), str(d / "part-1.parquet")]
    again = main(cfg)
    assert again.already_complete and again.rows == 60
    # What a kill leaves: some units, no manifest, the checkpoint dir.
    units = sorted(p for p in os.listdir(out) if p.startswith("part-"))
    assert len(units) > 1
    for p in units[: len(units) // 2]:
        os.remove(out / p)
    os.remove(out / MANIFEST)
    os.makedirs(default_checkpoint_dir(str(out)))
    resumed = main(cfg)
    ids = read_output(str(out), ["id"])["id"].to_pylist()
    assert resumed.resumed and resumed.rows == len(ids) == len(set(ids)) == 60


def test_a_max_length_past_the_models_positions_is_refused(tmp_path, tiny):
    """Held out from issue #34: `--max-length 100000` was cut to the position table's 512 without a
    word (pretraining refuses its seq_len past the positions)."""
    from bert_core.checkpoint import check_checkpoint

    limit = check_checkpoint(tiny).max_position_embeddings
    data = _data(tmp_path / "in")
    with pytest.raises(ValueError, match=rf"max_length {limit + 1} \(--max-length\) is longer than the model's "
                                         rf"max_position_embeddings {limit}"):
        preflight(_cfg(data, tmp_path / "out", tiny, max_length=limit + 1))
    assert preflight(_cfg(data, tmp_path / "out", tiny, max_length=limit)).max_length == limit


def test_a_finished_output_whose_files_changed_is_not_reported_complete(ray_local, tmp_path, tiny):
    """Held out from issue #34: a unit file copied into a finished output (600 rows, 300 distinct
    ids) was reported "already complete"; the manifest now lists the data files it finished with."""
    import shutil

    data = _data(tmp_path / "in")
    out = tmp_path / "out"
    first = main(_cfg(data, out, tiny))
    assert first.rows == 40
    again = main(_cfg(data, out, tiny))
    assert again.already_complete and again.rows == 40 and again.output == str(out)
    unit = sorted(out.glob("part-*.parquet"))[0]
    stray = out / "part-00007-00000-000000000.parquet"
    shutil.copy(unit, stray)
    with pytest.raises(FileExistsError, match=r"holds a finished run whose data files changed \(added since: "
                                              r"part-00007-00000-000000000\.parquet\)"):
        preflight(_cfg(data, out, tiny))
    stray.unlink()
    unit.unlink()
    with pytest.raises(FileExistsError, match=rf"gone since: {unit.name}"):
        preflight(_cfg(data, out, tiny))


def test_the_one_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    """#37: every writer goes through storage.replacing: a hidden `.<name>.<pid>.tmp` renamed over
    the file; a write that raises leaves the old content and no temp file behind."""
    import os

    import pytest

    from pipelines import storage

    target = tmp_path / "d" / "record.json"
    storage.write_text(str(target), "old")
    with pytest.raises(RuntimeError):
        with storage.replacing(str(target)) as (fs, path):
            assert os.path.basename(path) == f".record.json.{os.getpid()}.tmp"
            with fs.open_output_stream(path) as f:
                f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and os.listdir(target.parent) == ["record.json"]
    storage.write_bytes(str(target), b"new")
    assert target.read_text() == "new" and os.listdir(target.parent) == ["record.json"]


# ---- #37 item 2: a writer killed inside the one atomic write ----------------------------------

# What a scoring actor does for a unit's file (units.write_unit), held mid-write: a row group of
# 24 MB through the stream (on an object store, past pyarrow's first multipart part), no footer yet.
_KILLED_WRITER = """
import os, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from pipelines import storage

table = pa.table({"blob": [os.urandom(1 << 20) for _ in range(24)]})
with storage.replacing(sys.argv[1]) as (fs, path):
    writer = pq.ParquetWriter(path, table.schema, filesystem=fs)
    writer.write_table(table)
    print("inside", flush=True)
    time.sleep(600)  # SIGKILLed here
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_writer_killed_mid_write_leaves_no_partial_file_and_a_resume_no_temp_file(where, request, tmp_path, tiny):
    """Every writer goes through storage.replacing. A process SIGKILLed inside it, writing a unit's
    file, leaves no file of that name (locally only its hidden temp file; on the loopback S3 server
    nothing, the object appears only when its upload completes); the rerun of the same command
    resumes: it scores that unit again, every row comes out once, and no temp file is left."""
    import signal
    import subprocess
    import sys

    from pipelines import storage

    if where == "s3":  # the loopback S3 server of tests/test_remote_storage.py, before Ray starts
        request.getfixturevalue("s3")
        out = f"s3://{BUCKET}/killed-writer"
    else:
        out = str(tmp_path / "out")
    request.getfixturevalue("ray_local")
    data = _data(tmp_path / "in", files=2, rows=20)
    cfg = _cfg(data, out, tiny)
    assert main(cfg).rows == 40
    units = sorted(rel for rel, _ in storage.entries(out) if rel.startswith("part-"))
    victim, left = units[0], [rel for rel, _ in storage.entries(out) if rel != units[0]]
    # A killed run's state (no manifest, the checkpoint dir there), the victim's unit not yet written.
    storage.remove_file(storage.join(out, MANIFEST))
    storage.write_text(storage.join(default_checkpoint_dir(out), UNITS_RECORD), "{}")
    storage.remove_file(storage.join(out, victim))
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, storage.join(out, victim)],
                              cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "inside"  # in the with-block, its row group written
        temp = [f".{victim}.{writer.pid}.tmp"] if where == "local" else []  # an object store holds no temp object
        assert sorted(rel for rel, _ in storage.entries(out)) == sorted([r for r in left if r != MANIFEST] + temp)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert victim not in [rel for rel, _ in storage.entries(out)]  # no partial output file
    resumed = main(cfg)
    ids = read_output(out, ["id"])["id"].to_pylist()
    assert resumed.resumed and resumed.rows == len(ids) == len(set(ids)) == 40
    final = [rel for rel, _ in storage.entries(out)]
    assert victim in final and not [rel for rel in final if rel.endswith(".tmp")], final
    assert not storage.exists(default_checkpoint_dir(out))
