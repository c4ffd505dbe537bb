"""pipelines/inputs.py: one rule for which input files every job reads (scoring, pretraining,
fine-tuning), checked on the driver without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.inputs import find_parquet, parquet_files, plan_inputs, resolve_paths


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
    assert [name for name, _, _ in parquet_files([str(d)])] == expected  # what their checks read
    assert [f.name for f in find_parquet([f"file://{d}"])] == expected
    # A glob: the same rule below its base (here `in/`), `**` included.
    assert [f.name for f in find_parquet([str(d / "**" / "*.parquet")])] == expected[1:]
    assert {f.root for f in find_parquet([str(d / "**" / "*.parquet")])} == {str(d)}


def test_what_would_be_skipped_or_read_twice_is_an_error_naming_it(tmp_path):
    d = _write(tmp_path / "in" / "part-0.parquet").parent
    other = _write(tmp_path / "extra.pq")  # Ray Data's reader skips it without a word
    for read in (plan_inputs, resolve_paths):
        with pytest.raises(ValueError, match=r"extra\.pq: Ray Data reads only files named \*\.parquet.*rename it"):
            read([str(d), str(other)])
        with pytest.raises(ValueError, match="is given more than once"):
            read([str(d), f"file://{d}/part-0.parquet"])
    (tmp_path / "empty" / "_tmp").mkdir(parents=True)
    _write(tmp_path / "empty" / "_tmp" / "x.parquet")
    with pytest.raises(FileNotFoundError, match=r"empty has no \*\.parquet files"):
        resolve_paths([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        plan_inputs([str(tmp_path / "nope*.parquet")])
    with pytest.raises(FileNotFoundError, match=r"input .*missing\.parquet does not exist"):
        plan_inputs([str(tmp_path / "missing.parquet")])
    with pytest.raises(ValueError, match=r"no data paths given \(--data\)"):
        resolve_paths([])
