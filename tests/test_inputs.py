"""pipelines/inputs.py: one rule for which input files every job reads (scoring, pretraining,
fine-tuning), checked on the driver without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.inputs import TableFile, find_inputs, input_files, plan_inputs, resolve_paths


def _write(path, n=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(n)], "label": ["pos"] * n}), path)
    return path


def test_every_job_reads_the_same_files_by_one_rule(tmp_path):
    d = tmp_path / "in"
    read = [_write(d / "UPPER.PARQUET"), _write(d / "part-0.parquet", 2), _write(d / "sub" / "part-1.parquet", 3)]
    _write(d / "sub" / "_temporary" / "attempt.parquet")  # a hidden part deeper than the top level
    _write(d / "sub" / ".staging.parquet")
    _write(d / "_old" / "part-9.parquet")
    (d / "_SUCCESS").write_text("")
    (d / "README.txt").write_text("not parquet")
    expected = [str(p) for p in read]

    plan = plan_inputs([str(d)])
    assert plan.files == expected and plan.rows == 6 and plan.roots == dict.fromkeys(expected, str(d))
    assert resolve_paths([str(d)]) == expected  # what pretraining and fine-tuning hand Ray Data
    assert [f.name for f in input_files([str(d)])] == expected  # what their checks read
    assert [f.name for f in find_inputs([f"file://{d}"])] == expected
    # A glob: the same rule below its base (here `in/`), `**` included.
    assert [f.name for f in find_inputs([str(d / "**" / "*.parquet")])] == expected[1:]
    assert {f.root for f in find_inputs([str(d / "**" / "*.parquet")])} == {str(d)}


def test_what_would_be_skipped_or_read_twice_is_an_error_naming_it(tmp_path):
    d = _write(tmp_path / "in" / "part-0.parquet").parent
    other = _write(tmp_path / "extra.pq")  # Ray Data's reader skips it without a word
    for read in (plan_inputs, resolve_paths):
        with pytest.raises(ValueError, match=r"extra\.pq: raybert reads Parquet \(\*\.parquet\), CSV \(\*\.csv\) and JSON "
                                             r"Lines .* by extension; give the file its format's extension"):
            read([str(d), str(other)])
        with pytest.raises(ValueError, match="is given more than once"):
            read([str(d), f"file://{d}/part-0.parquet"])
    (tmp_path / "empty" / "_tmp").mkdir(parents=True)
    _write(tmp_path / "empty" / "_tmp" / "x.parquet")
    with pytest.raises(FileNotFoundError, match=r"empty has no input files; raybert reads Parquet"):
        resolve_paths([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        plan_inputs([str(tmp_path / "nope*.parquet")])
    with pytest.raises(FileNotFoundError, match=r"input .*missing\.parquet does not exist"):
        plan_inputs([str(tmp_path / "missing.parquet")])
    with pytest.raises(ValueError, match=r"no data paths given \(--data\)"):
        resolve_paths([])


def _csv_and_jsonl(d):
    """The same 5 rows as CSV (a comma, a quote, a text of digits) and as gzipped JSON Lines."""
    import gzip
    import json

    d.mkdir(parents=True, exist_ok=True)
    rows = [("a1", 'say "hi", then go', "pos"), ("a2", "12345", "neg"), ("a3", "plain", "pos"),
            ("a4", "line one", "neg"), ("a5", "x", "pos")]
    (d / "train.csv").write_text("id,text,label\n" + "".join(
        f'{i},"{t.replace(chr(34), chr(34) * 2)}",{lab}\n' for i, t, lab in rows))
    with gzip.open(d / "more.jsonl.gz", "wt") as f:
        for i, t, lab in rows:
            f.write(json.dumps({"id": i.replace("a", "b"), "text": t, "label": lab}) + "\n")
    return rows


def test_csv_and_json_lines_are_found_checked_and_read_like_parquet(tmp_path):
    """Issue #23, item 2: CSV and JSON Lines (compressed too) are inputs of every job, found by the
    one rule, with their rows counted and text read as text; a bad one is an error naming it."""
    rows = _csv_and_jsonl(tmp_path / "in")
    _write(tmp_path / "in" / "part.parquet", 2)
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    names = [f.name for f in find_inputs([str(tmp_path / "in")])]
    assert names == [str(tmp_path / "in" / n) for n in ("more.jsonl.gz", "part.parquet", "train.csv")]

    plan = plan_inputs([str(tmp_path / "in" / "train.csv"), str(tmp_path / "in" / "more.jsonl.gz")])
    assert plan.rows == 10 and plan.has_ids and plan.formats == {str(tmp_path / "in" / "train.csv"): "csv",
                                                                 str(tmp_path / "in" / "more.jsonl.gz"): "json"}
    for f in input_files([str(tmp_path / "in" / "train.csv"), str(tmp_path / "in" / "more.jsonl.gz")]):
        table = TableFile(f, ("text",))
        texts = [t for b in table.iter_batches(columns=["text"]) for t in b.column(0).to_pylist()]
        assert texts == [t for _, t, _ in rows] and table.num_rows == 5  # "12345" stays a string
        assert table.schema.field("text").type == pa.string()

    with pytest.raises(ValueError, match=r"train\.csv: no column 'sentence' \(the text to score\); columns present: "
                                         r"\['id', 'text', 'label'\]"):
        plan_inputs([str(tmp_path / "in" / "train.csv")], text_column="sentence")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": unquoted}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        plan_inputs([str(tmp_path / "bad.jsonl")])
    # Before: the advice was to rename a CSV to .parquet (then unreadable).
    (tmp_path / "data.tsv").write_text("text\tlabel\nx\tpos\n")
    with pytest.raises(ValueError, match=r"data\.tsv: raybert reads .*CSV \(\*\.csv\)"):
        plan_inputs([str(tmp_path / "data.tsv")])


def test_finetune_labels_and_pretrain_corpus_checks_read_csv_and_json_lines(tmp_path):
    """The training jobs' driver checks (label discovery, the corpus check, `raybert vocab`'s
    texts) read CSV and JSON Lines as they read Parquet."""
    from click.testing import CliRunner

    from jobs.cli import cli
    from pipelines.training.finetune_data import TaskData, discover_labels
    from pipelines.training.pretrain_data import open_corpus

    rows = _csv_and_jsonl(tmp_path / "in")
    task = TaskData(name="t", paths=[str(tmp_path / "in" / "train.csv")], val_paths=[str(tmp_path / "in" / "more.jsonl.gz")])
    assert discover_labels(task) == ["neg", "pos"]
    opened = open_corpus([str(tmp_path / "in")])
    assert [pf.num_rows for _, pf in opened] == [5, 5]
    res = CliRunner().invoke(cli, ["vocab", "--data", str(tmp_path / "in" / "train.csv"), "--out", str(tmp_path / "tok"),
                                   "--vocab-size", "200"])
    assert res.exit_code == 0, res.output
    vocab = set((tmp_path / "tok" / "vocab.txt").read_text().split())
    assert {c for _, t, _ in rows for c in t if c.isalnum()} <= vocab  # every row's characters, digits too


def test_what_the_review_found_in_csv_and_json_lines_reading(tmp_path):
    """A JSON Lines file without the text column is refused (not read as all-null text); ids keep
    leading zeros; a bad value past the first block names the file; a field first seen late in a
    JSON Lines file reads, and JSON numbers in a text column read as their text (also beside
    strings); mixed kinds in another column are an error naming the file and the column; an
    upper-case compressed name reads."""
    import gzip
    import json

    (tmp_path / "other.jsonl").write_text('{"id": 1, "other": "x"}\n')
    with pytest.raises(ValueError, match=r"other\.jsonl: no column 'text'"):
        plan_inputs([str(tmp_path / "other.jsonl")])
    (tmp_path / "zeros.csv").write_text("id,text\n007,a\n008,b\n")
    (found,) = find_inputs([str(tmp_path / "zeros.csv")])
    assert TableFile(found, ("text", "id")).schema.field("id").type == pa.string()
    ids = [i for b in TableFile(found, ("text", "id")).iter_batches(columns=["id"]) for i in b.column(0).to_pylist()]
    assert ids == ["007", "008"]
    # Past the reader's first block (4 MiB): the value that breaks the int column comes late.
    (tmp_path / "late.csv").write_text("n,text\n" + "".join(f"{i},t\n" for i in range(700_000)) + "abc,last\n")
    (late,) = find_inputs([str(tmp_path / "late.csv")])
    with pytest.raises(ValueError, match=r"late\.csv: not a readable CSV file"):
        TableFile(late, ("text",)).num_rows
    rows = [{"text": 11}] * 5 + [{"text": 12, "extra": "first seen late"}]
    (tmp_path / "late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (lj,) = find_inputs([str(tmp_path / "late.jsonl")])
    table = TableFile(lj, ("text",))
    assert table.num_rows == 6 and [t for b in table.iter_batches(columns=["text"]) for t in b.column(0).to_pylist()][-1] == "12"
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "n": 1}\n{"text": 12, "n": 2}\n')
    (mixed,) = find_inputs([str(tmp_path / "mixed.jsonl")])
    assert [t for b in TableFile(mixed, ("text",)).iter_batches(columns=["text"]) for t in b.column(0).to_pylist()] == ["a", "12"]
    (tmp_path / "mixed_n.jsonl").write_text('{"text": "a", "n": 1}\n{"text": "b", "n": "x"}\n')
    (mixed_n,) = find_inputs([str(tmp_path / "mixed_n.jsonl")])
    with pytest.raises(ValueError, match=r"mixed_n\.jsonl: line 2: column 'n' holds a string where earlier lines hold numbers"):
        TableFile(mixed_n, ("text",), ("n",)).schema  # a column the job reads (a column none reads is left alone)
    with gzip.open(tmp_path / "UP.JSONL.GZ", "wt") as f:
        f.write('{"text": "x"}\n')
    assert plan_inputs([str(tmp_path / "UP.JSONL.GZ")]).rows == 1


def test_a_jobs_own_output_is_never_read_back_and_keeps_the_glob_root(tmp_path):
    """`raybert score "D/**/*.parquet" D/out` globbed its own output on rerun (issue #34). Excluded
    locations yield nothing through a directory or glob, and the glob's root (what fallback ids are
    relative to) is taken without them, so it is the same before and after the output exists."""
    d = tmp_path / "D"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a"]}), d / "sub" / "a.parquet")
    before = find_inputs([str(d / "**" / "*.parquet")], exclude=(str(d / "out"),))
    (d / "out").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), d / "out" / "part-00000-00000-000000000.parquet")
    after = find_inputs([str(d / "**" / "*.parquet")], exclude=(str(d / "out"),))
    assert [(f.name, f.root) for f in after] == [(f.name, f.root) for f in before] == [(str(d / "sub" / "a.parquet"), str(d / "sub"))]
    assert [f.name for f in find_inputs([str(d)], exclude=(str(d / "out"),))] == [str(d / "sub" / "a.parquet")]
    assert len(find_inputs([str(d)])) == 2  # without the exclusion, the output is read as input
    with pytest.raises(FileNotFoundError, match="matches no input files"):
        find_inputs([str(d / "out" / "*.parquet")], exclude=(str(d / "out"),))
