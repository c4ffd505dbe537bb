"""Integration tests of `raybert score` on a local Ray with 2 CPUs: every task on generated and
real text, row conservation, ids, embeddings vs a single-process bert_core reference, bad inputs,
stable ids, the finished-run manifest, and the CLI. One Ray per module (start-up costs seconds)."""

from __future__ import annotations

import dataclasses

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert_core.checkpoint import load_pretrained, save_pretrained
from bert_core.model import build_model, preset
from bert_core.tokenizer import load_tokenizer
from jobs.score import ResourceConfig, ScoreConfig, main
from pipelines.corpora import shakespeare_paragraphs
from pipelines.scoring.predictors import Predictor
from pipelines.scoring.tokenize import tokenize_batch
from pipelines.scoring.output import MANIFEST, read_output


def _tiny_ckpt(tmp, minilm_dir, head, id2label=None):
    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    path = tmp / f"tiny-{head}"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok), id2label=id2label), head), path, tokenizer=tok)
    return str(path)


def _generated(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "ray data parquet bert scoring token budget actor pool cluster [MASK] shard fast".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text (Shakespeare) in two files and generated text in a third; string ids."""
    d = tmp_path_factory.mktemp("corpus")
    real = shakespeare_paragraphs()[:600]
    gen = _generated(300)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(300)], "text": real[:300]}), d / "real-0.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(300, 600)], "text": real[300:]}), d / "real-1.parquet")
    pq.write_table(pa.table({"id": [f"g{i}" for i in range(300)], "text": gen}), d / "gen.parquet")
    texts = dict(zip([f"r{i}" for i in range(600)], real)) | dict(zip([f"g{i}" for i in range(300)], gen))
    return d, texts


def _cfg(inp, out, model, task, **kw):
    # fp32 pinned: the parity tolerances below are fp32's, and `auto` picks bf16 where the CPU runs it faster.
    kw.setdefault("dtype", "fp32")
    return ScoreConfig(input=str(inp), output=str(out), model=str(model), task=task, max_length=128,
                       batch_size=kw.pop("batch_size", 200), max_tokens=kw.pop("max_tokens", 2048),
                       resources=kw.pop("resources", ResourceConfig(num_actors=1)), **kw)


def test_embed_real_and_generated_matches_reference(ray_module, corpus, minilm_dir, tmp_path, capsys):
    d, texts = corpus
    result = main(_cfg(d, tmp_path / "out", minilm_dir, "embed"))
    out = read_output(str(tmp_path / "out"))
    assert out.num_rows == len(texts) == result.rows == result.input_rows
    assert sorted(out["id"].to_pylist()) == sorted(texts)
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert result.error_rows == 0 and result.tokens == sum(out["n_tokens"].to_pylist()) > 0
    assert "rows=900 error_rows=0" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "out" / MANIFEST) and not os.path.exists(f"{tmp_path / 'out'}.checkpoint")
    # Reference: single-process bert_core, one row at a time, HF tokenizer.
    ref = load_pretrained(minilm_dir, "embed")
    tok = load_tokenizer(minilm_dir)
    rows = out.to_pylist()
    sample = rows[::15]
    with torch.inference_mode():
        for row in sample:
            enc = tok(texts[row["id"]], truncation=True, max_length=128, return_tensors="pt")
            r = ref(enc["input_ids"], enc["attention_mask"])[0].numpy()
            e = np.asarray(row["embedding"])
            assert 1 - float(r @ e / np.linalg.norm(r) / np.linalg.norm(e)) < 1e-4
            assert row["n_tokens"] == enc["input_ids"].shape[1]
    # A rerun of the finished job is a no-op that reports the manifest.
    again = main(_cfg(d, tmp_path / "out", minilm_dir, "embed"))
    assert again.already_complete and again.rows == 900
    assert read_output(str(tmp_path / "out")).num_rows == 900
    # Another task on it is refused: MiniLM has no classify head, and (allowed an untrained one on
    # purpose) the output holds a finished run of another recipe.
    with pytest.raises(ValueError, match="task classify needs a classify head"):
        main(_cfg(d, tmp_path / "out", minilm_dir, "classify"))
    with pytest.raises(FileExistsError, match="finished run of another recipe: task embed -> classify"):
        main(dataclasses.replace(_cfg(d, tmp_path / "out", minilm_dir, "classify"), allow_untrained_head=True))


@pytest.mark.parametrize("task,head,labels", [
    ("classify", "classify", {0: "neg", 1: "pos"}),
    ("tag", "tag", {0: "O", 1: "B-X", 2: "I-X"}),
    ("fill-mask", "mlm", None),
])
def test_tasks_match_in_process_predictor(ray_module, corpus, minilm_dir, tmp_path, task, head, labels):
    d, texts = corpus
    model = _tiny_ckpt(tmp_path, minilm_dir, head, labels)
    result = main(_cfg(d, tmp_path / "out", model, task, top_k=3))
    out = read_output(str(tmp_path / "out"))
    assert out.num_rows == len(texts) == result.rows
    assert sorted(out["id"].to_pylist()) == sorted(texts)
    # The same rows through the plain Predictor, in this process, give the same answers.
    ids = sorted(texts)[::40]
    batch = tokenize_batch(pa.table({"id": ids, "text": [texts[i] for i in ids]}), tokenizer_path=model,
                           max_length=128, with_offsets=task == "tag")
    expected = {r["id"]: r for r in Predictor(model, task, top_k=3)(batch).to_pylist()}
    got = {r["id"]: r for r in out.to_pylist() if r["id"] in expected}
    col = {"classify": "probs", "tag": "entities", "fill-mask": "fill_mask"}[task]
    for i in ids:
        if task == "classify":
            assert got[i]["label"] == expected[i]["label"] and got[i]["label"] in ("neg", "pos")
            np.testing.assert_allclose(got[i]["probs"], expected[i]["probs"], atol=1e-5)
        elif task == "tag":
            assert [(e["word"], e["label"], e["start"], e["end"]) for e in got[i][col]] == \
                   [(e["word"], e["label"], e["start"], e["end"]) for e in expected[i][col]]
            for e in got[i][col]:
                assert texts[i][e["start"]:e["end"]] == e["word"]
        else:
            assert [(m["position"], m["token_ids"]) for m in got[i][col]] == \
                   [(m["position"], m["token_ids"]) for m in expected[i][col]]
    if task == "fill-mask":  # the generated text has [MASK]s: each gets top-3
        masks = [m for r in out.to_pylist() for m in r["fill_mask"]]
        assert masks and all(len(m["tokens"]) == 3 for m in masks)


def test_bad_inputs_keep_every_row(ray_module, minilm_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    big = "all the world's a stage " * 45_000  # ~1 MB
    pq.write_table(pa.table({"id": ["n", "e", "big", "dup", "dup", "ok"],
                             "text": [None, "", big, "same id one", "same id two", "fine text"]}), d / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), d / "empty.parquet")
    result = main(_cfg(d, tmp_path / "out", minilm_dir, "embed"))
    rows = {}
    out = read_output(str(tmp_path / "out")).to_pylist()
    assert len(out) == 6 == result.rows and result.error_rows == 1
    for r in out:
        rows.setdefault(r["id"], []).append(r)
    assert len(rows["dup"]) == 2  # duplicate ids kept, one output row per input row
    assert rows["n"][0]["error"] == "text is null" and rows["n"][0]["embedding"] is None
    assert rows["e"][0]["error"] is None and rows["e"][0]["n_tokens"] == 2 and rows["e"][0]["embedding"]
    assert rows["big"][0]["truncated"] and rows["big"][0]["n_tokens"] == 128 and rows["big"][0]["error"] is None
    assert not rows["ok"][0]["truncated"]


def test_a_text_column_without_text_is_refused_and_null_rows_get_errors(ray_module, minilm_dir, tmp_path):
    """An int column as the text (`--text-column label`) is refused before any work, naming the file
    (issue #34: it used to score every row into an error row); a null text in a text column is one
    error row, the rest are scored."""
    f = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": [10, None, 30]}), f)
    with pytest.raises(ValueError, match=r"ints\.parquet: column 'text' holds int64, not text"):
        main(_cfg(f, tmp_path / "out", minilm_dir, "embed"))
    assert not (tmp_path / "out").exists()
    g = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["ten", None, "thirty"]}), g)
    result = main(_cfg(g, tmp_path / "out", minilm_dir, "embed"))
    out = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    assert result.rows == 3 and result.error_rows == 1
    assert [r["error"] for r in out] == [None, "text is null", None]


def test_missing_column_and_corrupt_file_fail_before_work(ray_module, minilm_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["fine"]}), d / "good.parquet")
    pq.write_table(pa.table({"id": [2], "body": ["wrong column"]}), d / "bad.parquet")
    with pytest.raises(ValueError) as e:
        main(_cfg(d, tmp_path / "out", minilm_dir, "embed"))
    msg = str(e.value)
    assert "bad.parquet" in msg and "'text'" in msg and "'body'" in msg and "'id'" in msg
    assert not (tmp_path / "out").exists()  # nothing was started
    os.remove(d / "bad.parquet")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ValueError, match="corrupt.parquet: not a readable Parquet file"):
        main(_cfg(d, tmp_path / "out", minilm_dir, "embed"))
    assert not (tmp_path / "out").exists()
    os.remove(d / "corrupt.parquet")
    (tmp_path / "foreign").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign" / "data.parquet")
    with pytest.raises(FileExistsError, match="not a run of this job to resume"):
        main(_cfg(d, tmp_path / "foreign", minilm_dir, "embed"))


def test_ids_from_file_and_row_hash_when_absent(ray_module, minilm_dir, tmp_path):
    import ray.data

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": _generated(250, 1)}), d / "x.parquet", row_group_size=60)
    pq.write_table(pa.table({"text": _generated(40, 2)}), d / "sub" / "y.parquet")
    main(_cfg(d, tmp_path / "out", minilm_dir, "embed", batch_size=64))
    ids = read_output(str(tmp_path / "out"))["id"].to_pylist()
    # "<file relative to the input root>#<Ray's public row_hash>": one distinct id per row, and
    # the same ids a plain Ray read of the input gives (so a rerun or resume keys the same rows)
    plain = ray.data.read_parquet(str(d), include_paths=True, include_row_hash=True).to_pandas()
    expected = [f"{os.path.relpath(p, d)}#{h:016x}" for p, h in zip(plain["path"], plain["row_hash"])]
    assert len(set(ids)) == len(ids) == 290
    assert sorted(ids) == sorted(expected)
    assert sum(i.startswith("x.parquet#") for i in ids) == 250
    assert sum(i.startswith("sub/y.parquet#") for i in ids) == 40


def test_cli_score_refuses_fp16_on_cpu(ray_module, minilm_dir, tmp_path):
    """(A CLI run's summary, JSON stdout and line count: tests/test_console.py.)"""
    from click.testing import CliRunner

    from jobs.cli import cli

    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(5)), "text": _generated(5, 3)}), f)
    bad = CliRunner().invoke(cli, ["score", str(f), str(tmp_path / "o2"), "--model", str(minilm_dir),
                                   "--task", "embed", "--dtype", "fp16"])
    assert bad.exit_code == 1 and "fp16 needs a GPU" in bad.output


def test_demo_prints_its_summary_once(ray_module, tmp_path, capsys):
    """`make demo`'s run: the corpus, progress, one summary line, the output's schema and a peek at it."""
    from jobs.demo import run

    run(40, str(tmp_path))
    out, err = capsys.readouterr()
    assert err.count("raybert score: rows=40 error_rows=0") == 1, err
    assert "[raybert] score: 40/40 rows (100%)" in err  # the progress line, at its end
    assert "corpus: 40 Shakespeare paragraphs" in out and "output schema: fixed_size_list<element: float>[384] embedding, 40 rows" in out


def test_score_dataset_keeps_the_callers_columns_and_needs_no_id(ray_module, minilm_dir, tmp_path):
    """The Python API: a Ray Dataset (or a pandas DataFrame) with a GLUE-style `sentence` column, no
    id and columns of its own comes back with every column kept and the embeddings the CLI would
    write (the in-process Predictor's, row for row); bad settings fail before any work."""
    import pandas as pd
    import ray

    from pipelines.scoring.job import score_dataset

    texts = shakespeare_paragraphs()[:60] + [""]
    frame = pd.DataFrame({"sentence": texts, "doc": list(range(len(texts))), "lang": ["en"] * len(texts)})
    scored = score_dataset(frame, str(minilm_dir), text_column="sentence", dtype="fp32", batch_size=16)
    assert isinstance(scored, ray.data.Dataset)  # a DataFrame in, a lazy Dataset out
    out = scored.to_pandas().sort_values("doc")
    assert list(out.columns[:3]) == ["sentence", "doc", "lang"] and len(out) == len(texts)
    assert out["doc"].tolist() == list(range(len(texts))) and set(out["lang"]) == {"en"}
    assert out["error"].isna().all() and "id" not in out.columns
    ref = Predictor(str(minilm_dir), "embed", dtype="fp32")(
        tokenize_batch(pa.table({"text": texts}), tokenizer_path=str(minilm_dir), id_column=None, max_length=256))
    ours, want = np.stack(out["embedding"].to_numpy()), np.stack(ref["embedding"].to_numpy(zero_copy_only=False))
    assert np.abs(ours - want).max() < 1e-5
    # A Dataset is taken as it is (lazily: nothing runs until it is consumed).
    assert isinstance(score_dataset(ray.data.from_pandas(frame), str(minilm_dir), text_column="sentence"),
                      ray.data.Dataset)
    with pytest.raises(ValueError, match=r"no column 'text' .*'sentence', 'doc', 'lang'"):
        score_dataset(frame, str(minilm_dir))
    with pytest.raises(ValueError, match=r"columns \['error'\] would be replaced"):
        score_dataset(frame.assign(error=1), str(minilm_dir), text_column="sentence")
    with pytest.raises(ValueError, match="needs a classify head"):
        score_dataset(frame, str(minilm_dir), task="classify", text_column="sentence")


# A fresh Python with a local Ray of its own (~20 s): the console a notebook user sees.
@pytest.mark.timeout(300)
def test_score_dataset_from_a_fresh_process_prints_at_most_five_lines(minilm_dir):
    """#37: score_dataset on 300 rows printed Ray Data's INFO and progress lines and a UserWarning
    (a fixed pool of 2 actors fed one block): ~37 lines at the default level, against the CLI's
    quiet console. Now: its dtype line, Ray's own start line and the core worker's once-per-process
    note about actor restarts (ray-project/ray#53727, printed by Ray's C++ logger in the driver);
    no Ray Data line, no warning; and the caller's settings for its own datasets are untouched."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import logging
        import pandas as pd
        import ray
        from pipelines.scoring.job import score_dataset

        ray.init(num_cpus=2, include_dashboard=False)
        frame = pd.DataFrame({{"text": [f"line {{i}}: the quick brown fox " * (1 + i % 7) for i in range(300)],
                               "doc": range(300)}})
        out = score_dataset(frame, {str(minilm_dir)!r}).to_pandas()
        assert len(out) == 300 and sorted(out["doc"]) == list(range(300)) and out["error"].isna().all()
        assert ray.data.DataContext.get_current().enable_progress_bars  # the caller's own datasets: as they were
        assert logging.getLogger("ray.data").getEffectiveLevel() <= logging.INFO
        ray.shutdown()
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYBERT_VERBOSITY", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                         capture_output=True, text=True, timeout=280)
    lines = res.stdout.splitlines() + res.stderr.splitlines()
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(lines) <= 5, "\n".join(lines)
    assert sum(line.startswith("[raybert] score_dataset: embed with ") for line in lines) == 1, lines
    assert not any(w in res.stderr for w in ("Warning", "streaming_executor", "Running Dataset", "ray.data")), lines


def test_csv_and_json_lines_inputs_score_with_ids_naming_them(ray_module, minilm_dir, tmp_path):
    """Issue #23, item 2: a CSV and a gzipped JSON Lines file (no id column) score like Parquet: one
    row per input row, fallback ids naming the input file (not the Parquet copy scoring reads:
    resume keys on Ray's row hash, which only its Parquet reader gives), text of digits scored as
    text; the staged copies are gone after. The training jobs' Ray read of the same files too."""
    import gzip
    import json

    from pipelines.inputs import input_files, read_dataset

    d = tmp_path / "in"
    d.mkdir()
    csv_texts = ['say "hi", then go', "12345", "plain text"]
    json_texts = ["line one", "x", "another, longer line of text"]
    (d / "a.csv").write_text("text,label\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",pos\n' for t in csv_texts))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t, "label": "neg"}) + "\n" for t in json_texts))
    result = main(_cfg(d, tmp_path / "out", minilm_dir, "embed"))
    out = read_output(str(tmp_path / "out"), ["id", "n_tokens", "error"])
    assert result.rows == out.num_rows == 6 and out["error"].null_count == 6
    tok = load_tokenizer(minilm_dir)
    for name, texts in (("a.csv", csv_texts), ("b.jsonl.gz", json_texts)):
        got = [n for i, n in zip(out["id"].to_pylist(), out["n_tokens"].to_pylist()) if i.startswith(name + "#")]
        assert sorted(got) == sorted(len(tok(t)["input_ids"]) for t in texts)
    assert not (tmp_path / "out" / "_staged").exists()

    rows = read_dataset(input_files([str(d)]), ["text", "label"], text_columns=("text",), include_paths=True).take_all()
    assert sorted(r["text"] for r in rows) == sorted(csv_texts + json_texts)
    assert {os.path.basename(r["path"]) for r in rows} == {"a.csv", "b.jsonl.gz"}
