"""Fine-tuning refuses label data it can't train a sound head from, up front and by name: a label
only validation rows have, training rows with a single class, files whose label types differ.

Discovery runs on the driver without Ray; the split checks (hashed split, listed labels) run on the
tokenized rows, with Ray, before any training. The CLI shows each as one `Error:` line.
"""

from __future__ import annotations

import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.training.finetune_data as fd
from pipelines.training.finetune_data import FinetuneData, TaskData, discover_labels, encode_labels, is_val


def _write(path, **columns) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


def _classify(tmp_path, train: dict, val: dict | None = None) -> TaskData:
    """train / val: {file name: labels}; each row's text is unique."""
    paths = [_write(tmp_path / f, text=[f"{f} row {i}" for i in range(len(y))], label=y) for f, y in train.items()]
    val_paths = [_write(tmp_path / f, text=[f"{f} row {i}" for i in range(len(y))], label=y)
                 for f, y in (val or {}).items()]
    return TaskData(name="sentiment", kind="classify", paths=paths, val_paths=val_paths)


@pytest.fixture
def no_ray_data(monkeypatch):
    """Label discovery and its checks read Parquet with pyarrow on the driver: a Ray Data read
    here fails the test."""
    def read(*args, **kwargs):
        raise AssertionError("Ray Data read during label discovery")

    monkeypatch.setattr(fd, "read_dataset", read)


def test_discovery_reads_labels_per_file_and_skips_what_ray_skips(tmp_path, no_ray_data):
    task = _classify(tmp_path, {"a.parquet": ["pos", "pos"], "b.parquet": ["neg"]}, {"v.parquet": ["pos"]})
    assert discover_labels(task) == ["neg", "pos"]
    # int32 and int64 files mix: both are ints.
    ints = TaskData(name="t", paths=[_write(tmp_path / "i32.parquet", text=["x"], label=pa.array([2], pa.int32())),
                                     _write(tmp_path / "i64.parquet", text=["y", "z"], label=[0, 1])])
    assert discover_labels(ints) == [0, 1, 2]
    # A directory: recursively, input formats only, '.'/'_' names skipped, as Ray Data reads it.
    d = tmp_path / "dir"
    _write(d / "part-0.parquet", text=["x"], label=["neg"])
    _write(d / "sub" / "part-1.parquet", text=["y"], label=["pos"])
    _write(d / "_tmp.parquet", text=["z"], label=["junk"])
    (d / "_SUCCESS").write_text("")
    (d / "README.txt").write_text("not parquet")
    assert [f.name for f in fd.input_files([str(d)])] == [str(d / "part-0.parquet"), str(d / "sub" / "part-1.parquet")]
    assert discover_labels(TaskData(name="t", paths=[str(d)])) == ["neg", "pos"]
    # A listed file Ray would skip is an error, not silently left out.
    other = tmp_path / "extra.pq"
    pq.write_table(pa.table({"text": ["q"], "label": ["neutral"]}), other)
    with pytest.raises(ValueError, match=r"extra\.pq: raybert reads Parquet \(\*\.parquet\), CSV"):
        discover_labels(TaskData(name="t", paths=[str(d), str(other)]))


def test_label_only_in_validation_data_is_an_error(tmp_path, no_ray_data):
    task = _classify(tmp_path, {"train.parquet": ["neg", "pos", "pos"]},
                     {"val.parquet": ["neg", "neutral"], "val2.parquet": ["neutral", "meh"]})
    with pytest.raises(ValueError) as e:
        discover_labels(task)
    msg = str(e.value)
    assert "task 'sentiment'" in msg and "occur only in the validation data" in msg
    assert f"'meh' (in {tmp_path / 'val2.parquet'})" in msg
    assert f"'neutral' (in {tmp_path / 'val.parquet'}, {tmp_path / 'val2.parquet'})" in msg
    assert "add training rows" in msg and "`labels` explicitly" in msg and "\n" not in msg
    # A tagger: a tag only the validation sentences have.
    tag = TaskData(name="ner", kind="tag",
                   paths=[_write(tmp_path / "t.parquet", tokens=[["a", "b"]], tags=[["B-PER", "O"]])],
                   val_paths=[_write(tmp_path / "tv.parquet", tokens=[["c"]], tags=[["B-LOC"]])])
    with pytest.raises(ValueError, match=r"task 'ner': label\(s\) 'B-LOC' \(in .*tv\.parquet\) occur only in "
                                         r"the validation data"):
        discover_labels(tag)


def test_single_class_training_data_is_an_error(tmp_path, no_ray_data):
    task = _classify(tmp_path, {"a.parquet": ["pos", "pos"], "b.parquet": ["pos"]}, {"v.parquet": ["neg", "pos"]})
    with pytest.raises(ValueError) as e:
        discover_labels(task)
    msg = str(e.value)
    assert msg.startswith(f"task 'sentiment': the training files in {tmp_path / 'a.parquet'}, "
                          f"{tmp_path / 'b.parquet'} have only the label 'pos'; a classifier needs at least 2 classes")
    tag = TaskData(name="ner", kind="tag", paths=[_write(tmp_path / "o.parquet", tokens=[["a", "b"]], tags=[["O", "O"]])])
    with pytest.raises(ValueError, match=r"task 'ner': the training files in .*o\.parquet have only the label 'O'; "
                                         r"a tagger needs at least 2 tags"):
        discover_labels(tag)


def test_whole_number_float_labels_are_classes(tmp_path, no_ray_data):
    task = TaskData(name="s", paths=[_write(tmp_path / "f.parquet", text=["a", "b", "c"], label=[1.0, 0.0, 1.0])])
    assert discover_labels(task) == [0.0, 1.0]


def test_mixed_label_types_across_files_is_an_error(tmp_path, no_ray_data):
    task = TaskData(name="sentiment", paths=[_write(tmp_path / "ints.parquet", text=["a", "b"], label=[0, 1]),
                                             _write(tmp_path / "strs.parquet", text=["c", "d"], label=["0", "1"])])
    with pytest.raises(ValueError) as e:
        discover_labels(task)
    msg = str(e.value)
    assert msg.startswith(f"task 'sentiment': the 'label' column has different types across files "
                          f"(int in {tmp_path / 'ints.parquet'}; string in {tmp_path / 'strs.parquet'})")
    assert "use one type in every file" in msg and "ArrowConversionError" not in msg
    # Listed labels skip discovery; the footers are still checked before any Ray Data read (Ray
    # could not put the two files in one dataset).
    task.labels = [0, 1]
    with pytest.raises(ValueError, match=r"\(int in .*ints\.parquet; string in .*strs\.parquet\)"):
        fd.build_task_datasets(task, FinetuneData(), "unused-tokenizer", {0: 0, 1: 1, "0": 0, "1": 1})
    tag = TaskData(name="ner", kind="tag",
                   paths=[_write(tmp_path / "ti.parquet", tokens=[["a"]], tags=[[0]]),
                          _write(tmp_path / "ts.parquet", tokens=[["b"]], tags=[["O"]])])
    with pytest.raises(ValueError, match=r"\(int in .*ti\.parquet; string in .*ts\.parquet\)"):
        discover_labels(tag)


@pytest.mark.timeout(240)
def test_cli_refuses_bad_labels_with_one_error_line(tmp_path, minilm_dir, no_ray_data):
    """`raybert finetune` on each kind of bad label data: exit 1, one `Error:` line naming the file
    and the label, no traceback, no Ray Data read."""
    from click.testing import CliRunner

    from jobs.cli import cli

    ints = _write(tmp_path / "ints.parquet", text=["a", "b"], label=[0, 1])
    strs = _write(tmp_path / "strs.parquet", text=["c", "d"], label=["0", "1"])
    train = _write(tmp_path / "train.parquet", text=["e", "f"], label=["neg", "pos"])
    val = _write(tmp_path / "val.parquet", text=["g"], label=["neutral"])
    one = _write(tmp_path / "one.parquet", text=["h", "i"], label=["pos", "pos"])
    scores = _write(tmp_path / "scores.parquet", text=["j", "k", "l"], label=[0.0, 0.5, 1.0])
    cases = [(["--data", scores], [scores, "0.5", "not a class label", "not fractional values"]),
             (["--data", train, "--val-data", val], [val, "'neutral'", "only in the validation data"]),
             (["--data", one], [one, "'pos'", "at least 2 classes"]),
             (["--data", ints, "--data", strs], [ints, strs, "int in", "string in", "use one type"])]
    for i, (args, want) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        start = time.perf_counter()
        res = CliRunner().invoke(cli, ["finetune", *args, "--tokenizer", str(minilm_dir), "--preset", "debug",
                                       "--run-dir", str(run_dir)])
        took = time.perf_counter() - start
        errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert res.exit_code == 1, res.output
        assert len(errors) == 1 and all(w in errors[0] for w in want), res.output
        assert "Traceback" not in res.output
        assert not (run_dir / "metrics.jsonl").exists()
        print(f"refusal {i}: {took:.1f} s")


def _rare_text() -> str:
    """A text the seeded hash sends to the validation split."""
    return next(t for t in (f"rare review {i}" for i in range(1000)) if is_val(t, 0.1, 0))


@pytest.mark.timeout(300)
def test_split_checks_on_tokenized_rows(tmp_path, minilm_dir, ray_local):
    """The hashed split and listed labels: checked on the rows as split, before any training."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = FinetuneData(max_length=16, val_fraction=0.1, split_seed=0, num_cpus=0.5)
    texts = [f"review {i}" for i in range(60)]
    common = ["neg" if i % 2 else "pos" for i in range(60)]
    # A sound task passes, both splits non-empty, every label trained.
    ok = TaskData(name="sentiment", paths=[_write(tmp_path / "ok.parquet", text=texts, label=common)])
    id2label, label2id = encode_labels(discover_labels(ok))
    ds = fd.build_task_datasets(ok, cfg, str(minilm_dir), label2id)
    assert ds["train"].count() + ds["val"].count() == 60 and ds["val"].count() > 0
    # 'rare' has one row, and the hash sends it to validation: discovery (per file) can't see it.
    rare = _rare_text()
    f = _write(tmp_path / "rare.parquet", text=texts + [rare], label=common + ["rare"])
    task = TaskData(name="sentiment", paths=[f])
    id2label, label2id = encode_labels(discover_labels(task))
    assert "rare" in id2label.values()
    with pytest.raises(ValueError) as e:
        fd.build_task_datasets(task, cfg, str(minilm_dir), label2id)
    msg = str(e.value)
    assert f"label(s) 'rare' (in {f}) occur only in the hashed validation split (val_fraction 0.1, split_seed 0" in msg
    assert "add training rows" in msg and "`labels` explicitly" in msg
    # Through the CLI (on this Ray): one Error line, and no run dir left (it was made before the
    # checks that need the tokenized rows, and stayed behind).
    from click.testing import CliRunner

    from jobs.cli import cli

    run_dir = tmp_path / "run"
    t0 = time.time()
    res = CliRunner().invoke(cli, ["finetune", "--data", f, "--tokenizer", str(minilm_dir), "--preset", "debug",
                                   "--run-dir", str(run_dir)])
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 1 and len(errors) == 1 and "Traceback" not in res.output, res.output[-3000:]
    assert "occur only in the hashed validation split" in errors[0] and time.time() - t0 < 20
    assert not run_dir.exists()
    # Listed labels allow a validation-only class (the user said so) ...
    listed = TaskData(name="sentiment", paths=[f], labels=["neg", "pos", "rare"])
    fd.build_task_datasets(listed, cfg, str(minilm_dir), {"neg": 0, "pos": 1, "rare": 2})
    # ... but not training rows of one class.
    one = _write(tmp_path / "one.parquet", text=texts, label=["pos"] * 60)
    single = TaskData(name="sentiment", paths=[one], labels=["neg", "pos"])
    with pytest.raises(ValueError, match=rf"task 'sentiment': the training rows of the hashed split \(val_fraction "
                                         rf"0.1, split_seed 0\) in {re.escape(one)} have only the label 'pos'; a classifier "
                                         rf"needs at least 2 classes"):
        fd.build_task_datasets(single, cfg, str(minilm_dir), {"neg": 0, "pos": 1})


def test_malformed_sweeps_are_refused_with_one_error_line_before_ray(tmp_path, minilm_dir, monkeypatch):
    """Issue 22, item 4: every malformed `--sweep` (and a sweep with no validation rows to choose
    on) is exit 1 with one `Error:` line naming the problem, no traceback, no Ray started."""
    from click.testing import CliRunner

    import ray

    from jobs.cli import cli
    from pipelines.training.sweep import parse_sweep, trials

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a refused sweep")

    monkeypatch.setattr(ray, "init", no_ray)
    data = _write(tmp_path / "train.parquet", text=["e", "f"], label=["neg", "pos"])
    cases = [(["lr2e-5"], "is not KEY=V1,V2"), (["lr=abc,1e-4"], "'abc' is not a finite number"),
             (["momentum=0.9,0.99"], "unknown key 'momentum'"), (["lr=1e-4"], "single trial"),
             (["lr=-1e-4,1e-4"], "must be > 0"), (["lr=1e-4", "lr=2e-4"], "lr is given twice"),
             (["lr=1e-4,1e-4"], "repeats a value"), (["seed=0,1.5"], "'1.5' is not an integer"),
             (["dropout=0.1,1.0"], "must be in [0, 1)"), (["lr=1e-4,"], "'' is not a finite number"),
             (["lr=inf,1e-4"], "'inf' is not a finite number")]
    for i, (specs, want) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        args = ["finetune", "--data", data, "--tokenizer", str(minilm_dir), "--preset", "debug",
                "--run-dir", str(run_dir)]
        res = CliRunner().invoke(cli, args + [x for s in specs for x in ("--sweep", s)])
        errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert res.exit_code == 1 and len(errors) == 1 and want in errors[0], (specs, res.output)
        assert "Traceback" not in res.output and not run_dir.exists()
    res = CliRunner().invoke(cli, ["finetune", "--data", data, "--tokenizer", str(minilm_dir), "--preset", "debug",
                                   "--run-dir", str(tmp_path / "noval"), "--sweep", "lr=1e-4,2e-4",
                                   "--config", _write_yaml(tmp_path / "noval.yaml", "data:\n  val_fraction: 0.0\n")])
    assert res.exit_code == 1 and "chooses its trial on validation rows" in res.output, res.output
    # The config file's form, and the grid a good sweep makes.
    grid = parse_sweep({"lr": "1e-4, 2e-4", "seed": [0, 1]})
    assert grid == {"lr": [1e-4, 2e-4], "seed": [0, 1]} and len(trials(grid)) == 4
    assert trials(grid)[1] == {"lr": 1e-4, "seed": 1}


def _write_yaml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_sweep_names_exports_and_concurrency(tmp_path):
    """Trial dirs are distinct for distinct values; a finished trial's export is rebuilt under its
    trial dir from Ray's checkpoint path (which has no scheme on an object store); trials at once
    fit the cluster's CPUs with each one's data share, and its GPUs."""
    from types import SimpleNamespace

    from pipelines.training.sweep import _record, concurrent_trials, trial_name

    assert trial_name({"lr": 1.0000001e-4}) != trial_name({"lr": 1.0000004e-4})
    assert trial_name({"lr": 3e-3, "seed": 1}) == "lr=0.003,seed=1"
    done = SimpleNamespace(config={"lr": 3e-3}, error=None, metrics={
        "checkpoint_path": "bucket/runs/ft/trials/lr=0.003/checkpoint_00000068", "best_score": 0.8, "step": 68,
        "best_step": 60})
    rec = _record(done, "s3://bucket/runs/ft")
    assert rec["status"] == "finished" and rec["best_score"] == 0.8
    assert rec["export"] == "s3://bucket/runs/ft/trials/lr=0.003/checkpoint_00000068/hf"
    stopped = _record(SimpleNamespace(config={"lr": 1e-6}, error=None, metrics={"step": 60, "best_score": 0.4}),
                      str(tmp_path))
    failed = _record(SimpleNamespace(config={"lr": 1.0}, error=RuntimeError("boom"), metrics={}), str(tmp_path))
    assert stopped["status"] == "stopped early" and failed["status"] == "failed" and "boom" in failed["error"]
    cpu = {"num_workers": 1, "cpus_per_worker": 1.5, "data_cpus": 0.5, "use_gpu": False}
    assert concurrent_trials(cpu, {"CPU": 2}, 4) == 1 and concurrent_trials(cpu, {"CPU": 16}, 4) == 4
    gpu = {"num_workers": 2, "cpus_per_worker": 1, "data_cpus": 1, "use_gpu": True}
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 4}, 8) == 2 and concurrent_trials(gpu, {"CPU": 6, "GPU": 8}, 8) == 2

