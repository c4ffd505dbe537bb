"""CSV and JSON Lines read exactly (issue #34): ids and text as their source text, never through a
float; rows longer than the reader's block; a header that names a column twice; a text column
that holds no text; and the fine-tuning label cases CSV brought (space-joined tags, empty labels).
The driver's checks and Ray Data's read tasks use one reader (pipelines/text_formats.py); the last
test reads through Ray, the rest need none."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import text_formats
from pipelines.inputs import TableFile, find_inputs, plan_inputs

BIG_IDS = ['{"id": 12345678901234567890, "text": "a"}', '{"id": 9007199254740993, "text": "b"}',
           '{"id": 2.5, "text": 5}', '{"id": "x7", "text": "d"}', '{"id": 1e3, "text": "c"}']
BIG_IDS_TEXT = ["12345678901234567890", "9007199254740993", "2.5", "x7", "1e3"]


def _column(path, column: str, text_columns=("text", "id")) -> list:
    (f,) = find_inputs([str(path)])
    return [v for b in TableFile(f, text_columns).iter_batches(columns=[column]) for v in b.column(0).to_pylist()]


def test_json_lines_ids_and_text_keep_their_source_text(tmp_path):
    """Before: 12345678901234567890 came out as "1.2345678901234567e+19", and 9007199254740993 beside
    a 2.5 as "9.007199254740992e+15" (both through a float)."""
    (tmp_path / "ids.jsonl").write_text("\n".join(BIG_IDS) + "\n\n")  # a blank last line too
    assert _column(tmp_path / "ids.jsonl", "id") == BIG_IDS_TEXT
    assert _column(tmp_path / "ids.jsonl", "text") == ["a", "b", "5", "d", "c"]
    # A boolean, object or list is no text (scored, it would be its JSON): refused, naming the line.
    (tmp_path / "kinds.jsonl").write_text('{"id": 1, "text": "a"}\n\n{"id": 2, "text": {"x": "y"}}\n')
    with pytest.raises(ValueError, match=r"kinds\.jsonl: line 3: column 'text' holds a JSON object, not text"):
        plan_inputs([str(tmp_path / "kinds.jsonl")])
    # Integer ids alone take pyarrow's fast path, and keep every digit there too.
    (tmp_path / "ints.jsonl").write_text('{"id": 9007199254740993, "text": "a"}\n{"id": -7, "text": "b"}\n')
    assert _column(tmp_path / "ints.jsonl", "id") == ["9007199254740993", "-7"]
    # A column no job reads can't make the file unreadable: mixed kinds there are left alone.
    (tmp_path / "meta.jsonl").write_text('{"id": 1, "text": 12.5, "meta": 1}\n{"id": 2, "text": "b", "meta": "x"}\n')
    assert plan_inputs([str(tmp_path / "meta.jsonl")]).rows == 2
    from pipelines.training.finetune_data import TaskData, discover_labels

    (tmp_path / "lab.jsonl").write_text('{"text": 12.5, "label": 1, "meta": 1}\n{"text": "b", "label": 0, "meta": "x"}\n')
    assert discover_labels(TaskData(name="t", paths=[str(tmp_path / "lab.jsonl")])) == [0, 1]
    # Columns that aren't text keep their JSON types (a label of ints stays ints).
    (tmp_path / "labels.jsonl").write_text('{"text": 1, "label": 3}\n{"text": "x", "label": 4}\n')
    (f,) = find_inputs([str(tmp_path / "labels.jsonl")])
    assert TableFile(f, ("text",), ("label",)).schema.field("label").type == pa.int64()


def _long_rows(tmp_path, fmt: str, long_at: int, big: int) -> list[str]:
    texts = [f"short {i}" for i in range(long_at)] + ["x" * big] + ["after 1", "after 2"]
    if fmt == "csv":
        (tmp_path / "long.csv").write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    else:
        (tmp_path / "long.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return texts


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_longer_than_the_reader_block_are_read_once_each(tmp_path, fmt):
    """Before: a 10 MB text between two short rows was "not a readable CSV / JSON Lines file"
    (straddling object straddles two block boundaries). The long row also comes after a first
    block's worth of short rows, so the CSV read restarts with a larger block mid-file."""
    texts = _long_rows(tmp_path, fmt, long_at=400_000, big=10 << 20)  # 400k short rows: past the first 4 MiB
    path = tmp_path / f"long.{fmt}"
    got = _column(path, "text")
    assert len(got) == len(texts) and got == texts
    assert plan_inputs([str(path)]).rows == len(texts)


def test_csv_values_holding_newlines_read_at_any_file_size(tmp_path):
    """A quoted paragraph with a line break read in small files only: past the reader's first block,
    pyarrow's chunker "got out of sync" (the file was unreadable)."""
    rows = 400_000  # ~12 MB: several blocks
    (tmp_path / "nl.csv").write_text("id,text\n" + "".join(f'{i},"first line {i}\nsecond line"\n' for i in range(rows)))
    got = _column(tmp_path / "nl.csv", "text")
    assert len(got) == rows and got[-1] == f"first line {rows - 1}\nsecond line"


def test_a_row_past_the_limit_is_one_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(text_formats, "MAX_ROW_BYTES", 8 << 20)
    for fmt in ("csv", "jsonl"):
        _long_rows(tmp_path, fmt, long_at=3, big=20 << 20)
        with pytest.raises(ValueError, match=rf"long\.{fmt}: a row is longer than 8 MiB, the longest CSV record or "
                                             rf"JSON line raybert reads; split that text, or write the file as Parquet"):
            plan_inputs([str(tmp_path / f"long.{fmt}")])


def test_a_repeated_column_or_a_text_column_without_text_is_refused_before_work(tmp_path):
    """Before: a CSV header `id,text,text` scored the first `text` column without a word (a Parquet
    one gave a 38-line KeyError), `--text-column label` on an int64 column wrote an error row for
    every row, and `--id-column doc_id` that isn't there fell back to hash ids."""
    (tmp_path / "dup.csv").write_text("id,text,text\n1,a,b\n")
    with pytest.raises(ValueError, match=r"dup\.csv: the header names column\(s\) \['text'\] more than once"):
        plan_inputs([str(tmp_path / "dup.csv")])
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"], "label": [0, 1]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match=r"l\.parquet: column 'label' holds int64, not text; choose the text column "
                                         r"with --text-column"):
        plan_inputs([str(tmp_path / "l.parquet")], text_column="label")
    # The same in Parquet, where a schema may name a column twice (pyarrow writes what it is given).
    t = pa.Table.from_arrays([pa.array([1]), pa.array(["a"]), pa.array(["b"])], names=["id", "text", "text"])
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match=r"dup\.parquet: column\(s\) \['text'\] appear more than once"):
        plan_inputs([str(tmp_path / "dup.parquet")])
    # An all-null column (Parquet type null) holds no text either; an empty CSV or JSON Lines file says so.
    pq.write_table(pa.table({"id": [1, 2], "text": pa.nulls(2)}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"nulls\.parquet: column 'text' holds null, not text"):
        plan_inputs([str(tmp_path / "nulls.parquet")])
    for empty in ("e.csv", "e.jsonl"):
        (tmp_path / empty).write_text("")
        with pytest.raises(ValueError, match=rf"{empty}: the file is empty \(no header, no rows\)"):
            plan_inputs([str(tmp_path / empty)])
    # An id column named by the user (--id-column) must be there: no silent fallback to hash ids.
    with pytest.raises(ValueError, match=r"l\.parquet: no id column 'doc_id' \(--id-column\); columns present"):
        plan_inputs([str(tmp_path / "l.parquet")], id_column="doc_id")
    assert plan_inputs([str(tmp_path / "l.parquet")], id_column="id").has_ids
    # A CSV column of digits is text as written (CSV has no types): scored, not refused.
    (tmp_path / "digits.csv").write_text("id,label\n1,007\n")
    assert plan_inputs([str(tmp_path / "digits.csv")], text_column="label").rows == 1


def test_tag_data_in_csv_and_empty_labels(tmp_path, minilm_dir):
    """Before: a tag fine-tune on CSV (space-joined tokens and tags) crashed with a 53-line
    traceback (`list_flatten` on strings), and an empty CSV label became a third class ""."""
    from pipelines.training.finetune_data import TaskData, discover_labels, tokenize_labeled
    from pipelines.inputs import input_files

    (tmp_path / "tag.csv").write_text("tokens,tags\nJohn lives in Paris,B-PER O O B-LOC\nMary  sleeps,B-PER O\n")
    task = TaskData(name="ner", kind="tag", paths=[str(tmp_path / "tag.csv")])
    assert discover_labels(task) == ["B-LOC", "B-PER", "O"]
    batch = pa.table({"tokens": ["John lives in Paris"], "tags": ["B-PER O O B-LOC"], "path": ["tag.csv"]})
    out = tokenize_labeled(batch, task=task, tokenizer_path=str(minilm_dir), max_length=16,
                           label2id={"B-LOC": 0, "B-PER": 1, "O": 2}, val_fraction=0.0, split_seed=0, split=None)
    assert sorted(v for v in out["labels"][0].tolist() if v != -100) == [0, 1, 2, 2]  # one label per word
    (tmp_path / "gap.csv").write_text("tokens,tags\nJohn lives,B-PER O\nParis,\n")
    gap = TaskData(name="ner", kind="tag", paths=[str(tmp_path / "gap.csv")])
    with pytest.raises(ValueError, match=r"gap\.csv: row 2 has no tags, or a blank tag \(column 'tags' is null or empty "):
        discover_labels(gap)
    # Spaces at either end of a CSV's tags make no empty tag (as the training path splits them);
    # another number of tags than words is refused on the driver, naming the row.
    (tmp_path / "ends.csv").write_text("tokens,tags\nJohn lives, B-PER O \nParis,B-LOC\n")
    assert discover_labels(TaskData(name="ner", kind="tag", paths=[str(tmp_path / "ends.csv")])) == ["B-LOC", "B-PER", "O"]
    (tmp_path / "count.csv").write_text("tokens,tags\nJohn lives,B-PER O\nParis,B-LOC O\n")
    with pytest.raises(ValueError, match=r"count\.csv: row 2 has 2 tags for 1 words \(column 'tags'\)"):
        discover_labels(TaskData(name="ner", kind="tag", paths=[str(tmp_path / "count.csv")]))

    (tmp_path / "cls.csv").write_text("text,label\na,pos\nb,neg\nc,\nd,pos\n")
    cls = TaskData(name="s", paths=[str(tmp_path / "cls.csv")])
    with pytest.raises(ValueError, match=r"cls\.csv: row 3 has no label \(column 'label' is null or empty there\); "
                                         r"every row needs a label"):
        discover_labels(cls)
    # A label with spaces around it would be a class of its own beside the bare one.
    (tmp_path / "spaced.csv").write_text("text,label\na,pos\nb,neg\nc,pos \n")
    with pytest.raises(ValueError, match=r"spaced\.csv: row 3 has the label 'pos ' \(column 'label'\), with spaces "
                                         r"around it: a label of its own beside 'pos'"):
        discover_labels(TaskData(name="s", paths=[str(tmp_path / "spaced.csv")]))
    (tmp_path / "ints.csv").write_text("text,label\na,0\nb,1\nc,\n")  # an int column: the empty field is null
    with pytest.raises(ValueError, match=r"ints\.csv: row 3 has no label"):
        discover_labels(TaskData(name="s", paths=[str(tmp_path / "ints.csv")]))
    assert input_files([str(tmp_path / "cls.csv")])  # the file itself is fine: only its row 3 is refused


def test_ray_reads_through_the_same_reader(tmp_path):
    """Training reads CSV and JSON Lines in Ray tasks through the driver's reader: the same ids and
    long rows, only the needed columns, one task per read (no projection stage asking for a CPU:
    that is what kept a JSON Lines corpus from ever reaching step 0 beside CPU training workers)."""
    from conftest import local_ray
    from pipelines.inputs import input_files, read_dataset

    (tmp_path / "ids.jsonl").write_text("\n".join(BIG_IDS) + "\n")
    texts = _long_rows(tmp_path, "csv", long_at=3, big=6 << 20)
    with local_ray():
        ds = read_dataset(input_files([str(tmp_path / "ids.jsonl"), str(tmp_path / "long.csv")]), ["id", "text"],
                          text_columns=("text", "id"), num_cpus=0.25)
        rows = ds.take_all()
        assert "ReadTextFiles" in ds.stats() and "Project" not in ds.stats()  # the columns are chosen inside the read
    assert [r["id"] for r in rows] == BIG_IDS_TEXT + [str(i) for i in range(len(texts))]
    assert [r["text"] for r in rows[len(BIG_IDS):]] == texts
    assert set(rows[0]) == {"id", "text"}
