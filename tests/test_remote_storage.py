"""Run dirs and scoring on an object store: a real S3-protocol server (moto's ThreadedMotoServer)
on loopback, reached as AWS is reached (AWS_ENDPOINT_URL and credentials in the environment,
pyarrow.fs underneath, Ray Train's storage for checkpoints).

- `raybert pretrain --run-dir s3://...` writes checkpoints, metrics, TensorBoard events, the
  ledger and the export into the bucket, resumes from them on a second invocation, and leaves no
  `s3:` directory in the working dir.
- `raybert score` reads Parquet from the bucket and writes its output there, every row once.
- Models and tokenizers may be URIs too: each process that loads one takes a node-local copy
  (`$RAYBERT_CACHE`), fetched once.
- The run lock on an object store is a lease object: held, refused, released, taken over when stale.
- A run dir URI that can't work (no bucket, an unknown scheme) is refused up front, naming it.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.conftest import fast_train_settings, free_port

BUCKET = "raybert-it"


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A loopback S3 server with one bucket; the AWS settings point at it for this module (set
    before any Ray starts here, so Ray's workers inherit them as they would on a cluster node)."""
    import ray
    from moto.server import ThreadedMotoServer

    if ray.is_initialized():
        ray.shutdown()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per HTTP request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with _env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                  RAYBERT_CACHE=str(tmp_path_factory.mktemp("cache"))):
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                                   secret_key="testing", region="us-east-1", allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            yield fs
    finally:
        server.stop()


def _keys(fs, prefix: str) -> list[str]:
    return sorted(i.path[len(prefix) + 1:] for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
                  if i.type == pafs.FileType.File)


# Over 60 s: two Ray Train fits (a run and its resume), both writing through the loopback S3 server.
@pytest.mark.timeout(600)
def test_pretrain_run_dir_on_s3_checkpoints_resumes_and_exports(s3, tmp_path, monkeypatch):
    from jobs.pretrain import main, preset_config, read_metrics
    from jobs.schedule import read_ledger
    from pipelines.training.run_dir import latest_step
    from pipelines import storage
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    corpus = write_corpus(peoples_daily_sentences()[:1500], str(tmp_path / "corpus"), rows_per_file=1000)
    vocab = f"s3://{BUCKET}/vocab/vocab.txt"  # the tokenizer is in the bucket too
    pafs.copy_files(str(chinese_vocab_path()), f"{BUCKET}/vocab/vocab.txt", destination_filesystem=s3)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where a pathlib mistake would create `s3:/...`
    run = f"s3://{BUCKET}/runs/zh"

    def cfg(max_steps):
        c = preset_config("debug")
        c.run_dir = run
        c.data.paths, c.data.tokenizer = [corpus], vocab
        c.scaling.num_workers = 1
        c.train.max_steps, c.train.save_every, c.train.log_every, c.train.eval_every = max_steps, 3, 2, 10 ** 6
        c.data.val_fraction = 0.0  # no val metrics are read: one Ray Data pipeline fewer per fit
        return c

    with fast_train_settings():
        first = main(cfg(6))
    assert first.run_dir == run and first.checkpoint == f"{run}/checkpoint_00000006"
    assert first.export == f"{run}/export"
    keys = _keys(s3, f"{BUCKET}/runs/zh")
    for k in ("checkpoint_00000003/raybert_state.json", "checkpoint_00000006/raybert_state.json",
              "checkpoint_00000006/hf/model.safetensors", "export/config.json", "export/model.safetensors",
              "export/tokenizer.json", "metrics.jsonl", "runs.jsonl", "config.json"):
        assert k in keys, (k, keys)
    assert any(k.startswith("checkpoint_00000006/deepspeed/") for k in keys)
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in keys)
    assert ".raybert.lock" not in keys  # the lease is deleted when the invocation ends
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(losses) == [2, 4, 6]

    with fast_train_settings():
        second = main(cfg(9))
    assert second.checkpoint == f"{run}/checkpoint_00000009" and second.metrics["step"] == 9
    assert latest_step(run) == 9
    assert [(r["status"], r["start_step"], r["end_step"]) for r in read_ledger(run)] == [("ok", 0, 6), ("ok", 6, 9)]
    records = read_metrics(run)
    assert [(r["event"], r["step"]) for r in records if r.get("event") in ("start", "resume")] == \
        [("start", 0), ("resume", 6)]
    assert sorted(r["step"] for r in records if "loss" in r) == [2, 4, 6, 8, 9]  # one file, both invocations (9: the last step)
    assert list(work.iterdir()) == []  # nothing local: no `s3:` directory, no staging left behind
    cached = list((Path(os.environ["RAYBERT_CACHE"]) / "remote").glob("*/vocab.txt"))
    assert len(cached) == 1 and cached[0].read_bytes() == chinese_vocab_path().read_bytes()  # one copy per node

    # The export in the bucket is a Hugging Face checkpoint that transformers loads.
    import transformers

    with storage.local_copy(second.export) as local:
        model = transformers.BertForMaskedLM.from_pretrained(local)
        saved = json.loads(open(os.path.join(local, "config.json")).read())
    assert model.config.num_hidden_layers == saved["num_hidden_layers"]


def test_scoring_reads_and_writes_the_bucket_with_every_row_once(s3, tmp_path, minilm_dir, monkeypatch):
    import torch

    from bert_core.checkpoint import save_pretrained
    from bert_core.model import build_model, preset
    from bert_core.tokenizer import load_tokenizer
    from jobs.score import ResourceConfig, ScoreConfig, main
    from pipelines.scoring.output import MANIFEST

    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    local_model = tmp_path / "tiny"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok)), "embed"), local_model, tokenizer=tok)
    pafs.copy_files(str(local_model), f"{BUCKET}/models/tiny", destination_filesystem=s3)
    model = f"s3://{BUCKET}/models/tiny"  # the model is in the bucket too
    ids = []
    for f in range(3):
        rows = [f"f{f}-{i}" for i in range(40)]
        ids += rows
        pq.write_table(pa.table({"id": rows, "text": [f"row {i} of file {f} " * (1 + i % 7) for i in range(40)]}),
                       f"{BUCKET}/in/part-{f}.parquet", filesystem=s3)
    monkeypatch.chdir(tmp_path)
    out = f"s3://{BUCKET}/scored"
    result = main(ScoreConfig(input=f"s3://{BUCKET}/in", output=out, model=model, task="embed",
                              dtype="fp32", resources=ResourceConfig(num_actors=1)))
    assert result.rows == 120 and result.error_rows == 0
    keys = _keys(s3, f"{BUCKET}/scored")
    assert MANIFEST in keys
    files = [f"{BUCKET}/scored/{k}" for k in keys if k.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(f, filesystem=s3) for f in files])
    assert sorted(table["id"].to_pylist()) == sorted(ids)  # every row once
    assert table["embedding"].type.list_size == 64
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
    assert not s3.get_file_info(f"{BUCKET}/scored.lock").type == pafs.FileType.File  # lease released


def test_object_store_lock_is_a_lease(s3):
    from jobs.schedule import LeaseLock, RunLock, RunLocked

    run = f"s3://{BUCKET}/locked-run"
    with RunLock(run):
        with pytest.raises(RunLocked, match="in use by another invocation"):
            with RunLock(run):
                pass
    with RunLock(run):  # released on exit
        pass
    stale = LeaseLock(f"{run}/.raybert.lock", run, ttl_s=0.5)
    stale._write()  # a killed holder's lease, never renewed
    import time

    time.sleep(0.6)
    with LeaseLock(f"{run}/.raybert.lock", run, ttl_s=0.5):  # taken over
        pass


@pytest.mark.parametrize("run_dir,needles", [
    ("s3://no-such-bucket-raybert/run", ["no-such-bucket-raybert", "does not exist"]),
    (f"s3://{BUCKET}", ["inside the bucket"]),
    ("nosuchscheme://b/run", ["nosuchscheme://b/run", "not a storage URI"]),
])
def test_run_dir_uris_that_cannot_work_are_refused_up_front(s3, tmp_path, monkeypatch, run_dir, needles):
    from jobs.cli import cli
    from pipelines.corpora import chinese_vocab_path

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["一二三四五六七八九十"] * 64}), data)
    res = CliRunner().invoke(cli, ["pretrain", "--preset", "debug", "--data", str(data), "--tokenizer",
                                   str(chinese_vocab_path()), "--run-dir", run_dir])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output[-2000:]
    (error,) = [line for line in res.output.splitlines() if line.startswith("Error:")]
    for n in needles:
        assert n in error, (n, error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]


def test_model_uris_that_cannot_work_are_refused_up_front(s3, tmp_path, monkeypatch):
    from jobs.cli import cli

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), data)
    for model, needle in ((f"s3://{BUCKET}/models/none", "does not exist"),
                          ("nosuchscheme://b/model", "not a storage URI")):
        res = CliRunner().invoke(cli, ["score", str(data), str(tmp_path / "out"), "--model", model])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output[-2000:]
        (error,) = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert model in error and needle in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_cached_copy_fetches_once_per_version(s3):
    import time

    from pipelines.storage import cached_copy

    with s3.open_output_stream(f"{BUCKET}/m/cfg/config.json") as f:
        f.write(b'{"v": 1}')
    uri = f"s3://{BUCKET}/m/cfg"
    first = cached_copy(uri)
    assert Path(first, "config.json").read_text() == '{"v": 1}'
    stamp = Path(first, "config.json").stat().st_mtime_ns
    assert cached_copy(uri) == first and Path(first, "config.json").stat().st_mtime_ns == stamp  # not fetched again
    time.sleep(1.1)  # S3 modification times have 1 s resolution
    with s3.open_output_stream(f"{BUCKET}/m/cfg/config.json") as f:
        f.write(b'{"v": 22}')  # overwritten in place: a new version, a new copy
    second = cached_copy(uri)
    assert second != first and Path(second, "config.json").read_text() == '{"v": 22}'
    assert cached_copy("relative/dir") == os.path.abspath("relative/dir") and cached_copy(None) is None


def _two_files_repeating_a_key(write, prefix: str) -> None:
    write(f"{prefix}/part-00000-00000-000000000.parquet", pa.table({"row_hash": [1, 2, 3], "id": ["a", "b", "c"]}))
    write(f"{prefix}/part-00001-00000-000000000.parquet", pa.table({"row_hash": [3, 4], "id": ["c", "d"]}))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_duplicate_repair_rewrites_in_place_through_the_one_atomic_write(s3, tmp_path, where):
    """#37: `repair_duplicates` writes each repaired file through storage.replacing: on an object
    store the object itself (no temp object moved by copy and delete), locally a renamed temp file;
    either way each key is kept once, the files keep their names and no temp file is left."""
    from pipelines.scoring.output import data_files, read_output, repair_duplicates

    if where == "s3":
        output, prefix = f"s3://{BUCKET}/repair", f"{BUCKET}/repair"
        _two_files_repeating_a_key(lambda p, t: pq.write_table(t, p, filesystem=s3), prefix)
        listed = lambda: _keys(s3, prefix)  # noqa: E731
    else:
        output = prefix = str(tmp_path / "repair")
        os.makedirs(output)
        _two_files_repeating_a_key(lambda p, t: pq.write_table(t, p), prefix)
        listed = lambda: sorted(os.listdir(output))  # noqa: E731
    before = listed()
    assert repair_duplicates(output) == 1
    assert listed() == before and len(data_files(output)) == 2
    assert sorted(read_output(output, columns=["row_hash"])["row_hash"].to_pylist()) == [1, 2, 3, 4]
