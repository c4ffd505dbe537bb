"""`raybert score` guards (issue 10): overwrite never deletes an input or a foreign directory; a
run locks its output, so an overlapping run is refused (exit 75) instead of duplicating rows; a
rerun repairs an output left with duplicate rows; a bad model, output path, config key, store or
--num-actors is refused up front: one `Error:` line, no traceback, quickly, nothing created."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert_core.checkpoint import save_pretrained
from bert_core.model import build_model, preset
from bert_core.tokenizer import load_tokenizer
from jobs.score import ResourceConfig, ScoreConfig, main
from pipelines.scoring import MANIFEST, default_checkpoint_dir, read_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    """A small random BERT with the MiniLM tokenizer (fast to load and to score)."""
    tok = load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok)), "embed"), path, tokenizer=tok)
    return str(path)


def _data(d, files=2, rows=30):
    d.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        pq.write_table(pa.table({"id": [f"f{f}-{i}" for i in range(rows)],
                                 "text": [f"row {i} of file {f} " * (1 + i % 5) for i in range(rows)]}),
                       d / f"part-{f}.parquet")
    return d


def _tree(d) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def _cli(*args, timeout=120):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.score", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _refused(r, *names, code=1, elapsed=None):
    """Exit `code`, exactly one `Error:` line naming each of `names`, no traceback."""
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert r.returncode == code, out
    assert len(errors) == 1 and "Traceback" not in out, out
    for name in names:
        assert str(name) in errors[0], errors[0]
    if elapsed is not None:
        assert elapsed < 20, f"refused after {elapsed:.1f} s"
    return errors[0]


def _nothing_created(out):
    for p in (out, default_checkpoint_dir(str(out)), f"{out}.lock"):
        assert not os.path.exists(p), p


# ---- 1: overwrite never deletes an input, nor a directory that isn't ours ---------------------


def test_overwrite_with_output_equal_to_input_deletes_nothing(tmp_path, tiny):
    data = _data(tmp_path / "data" / "en")
    before = _tree(data)
    (tmp_path / "ow.yaml").write_text("overwrite: true\n")
    t0 = time.perf_counter()
    r = _cli(data, data, "--model", tiny, "--task", "embed", "--config", tmp_path / "ow.yaml")
    _refused(r, data, "overlaps input", elapsed=time.perf_counter() - t0)
    assert _tree(data) == before  # not one input file lost or changed


def test_overwrite_refuses_overlaps_and_foreign_dirs(tmp_path, tiny):
    data = _data(tmp_path / "data")
    before = _tree(data)
    # Output inside an input dir, or an input dir inside the output: both overlap.
    for out in (data / "scored", tmp_path):
        with pytest.raises(ValueError, match="overlaps input"):
            main(ScoreConfig(input=str(data), output=str(out), model=tiny, overwrite=True))
    # A checkpoint dir on an input file.
    with pytest.raises(ValueError, match="checkpoint dir .* overlaps input"):
        main(ScoreConfig(input=str(data / "part-0.parquet"), output=str(tmp_path / "o"), model=tiny,
                         checkpoint_dir=str(data / "part-0.parquet"), overwrite=True))
    assert _tree(data) == before
    # A directory of someone else's files is not a previous output: overwrite leaves it alone.
    foreign = tmp_path / "reports"
    foreign.mkdir()
    (foreign / "q3.parquet").write_bytes(b"not ours")
    with pytest.raises(ValueError, match=f"{foreign} is not an output of raybert score"):
        main(ScoreConfig(input=str(data), output=str(foreign), model=tiny, overwrite=True))
    assert (foreign / "q3.parquet").read_bytes() == b"not ours"
    # Nor is a checkpoint dir holding anything but Ray Data's checkpoint files.
    ours, ckpt = tmp_path / "ours", tmp_path / "notes"
    ckpt.mkdir()
    (ckpt / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not Ray Data checkpoint files"):
        main(ScoreConfig(input=str(data), output=str(ours), model=tiny, checkpoint_dir=str(ckpt), overwrite=True))
    assert (ckpt / "todo.txt").read_text() == "keep me" and not ours.exists()


# ---- 6, 8, 9: bad inputs refused up front, one line, nothing created --------------------------


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_model(tmp_path, tiny, kind):
    bad = tmp_path / f"model-{kind}"
    shutil.copytree(tiny, bad)
    if kind == "no-weights":
        os.remove(bad / "model.safetensors")
        return bad, bad
    if kind == "roberta":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
        return bad, "roberta"
    if kind == "bad-safetensors":
        (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
        return bad, bad / "model.safetensors"
    if kind == "pickle-bin":  # a .bin that runs code when fully unpickled
        os.remove(bad / "model.safetensors")
        torch.save({"w": _RunsCode(str(tmp_path / "PWNED"))}, bad / "pytorch_model.bin")
        return bad, bad / "pytorch_model.bin"
    if kind == "no-tokenizer":
        for f in os.listdir(bad):
            if f.startswith(("tokenizer", "vocab", "special_tokens")):
                os.remove(bad / f)
        return bad, bad
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no-weights", "roberta", "bad-safetensors", "pickle-bin", "no-tokenizer"])
def test_bad_model_is_refused_on_the_driver(tmp_path, tiny, kind):
    data = _data(tmp_path / "in", files=1, rows=5)
    model, name = _bad_model(tmp_path, tiny, kind)
    t0 = time.perf_counter()
    r = _cli(data, tmp_path / "out", "--model", model, "--task", "embed")
    line = _refused(r, name, elapsed=time.perf_counter() - t0)
    assert "weights_only" not in line and not (tmp_path / "PWNED").exists()
    _nothing_created(tmp_path / "out")


def test_bad_output_path_is_refused_before_scoring(tmp_path, tiny):
    data = _data(tmp_path / "in", files=1, rows=5)
    (tmp_path / "taken.parquet").write_bytes(b"a file")
    t0 = time.perf_counter()
    r = _cli(data, tmp_path / "taken.parquet", "--model", tiny, "--task", "embed")
    _refused(r, tmp_path / "taken.parquet", "is an existing file", elapsed=time.perf_counter() - t0)
    assert (tmp_path / "taken.parquet").read_bytes() == b"a file"
    assert not os.path.exists(default_checkpoint_dir(str(tmp_path / "taken.parquet")))
    # Its parent is a file: the output can't be created.
    with pytest.raises(ValueError, match=f"{tmp_path / 'taken.parquet'} is a file"):
        main(ScoreConfig(input=str(data), output=str(tmp_path / "taken.parquet" / "out"), model=tiny))


def test_unknown_config_key_and_unreachable_store_are_one_line(tmp_path, tiny):
    data = _data(tmp_path / "in", files=1, rows=5)
    (tmp_path / "typo.yaml").write_text("max_lenght: 64\n")
    r = _cli(data, tmp_path / "out", "--model", tiny, "--config", tmp_path / "typo.yaml")
    _refused(r, "max_lenght", tmp_path / "typo.yaml")
    uri = "s3://raybert-test-no-such-bucket/in/data.parquet"
    t0 = time.perf_counter()
    r = _cli(uri, tmp_path / "out", "--model", tiny, "--task", "embed")
    _refused(r, uri, "could not be reached", elapsed=time.perf_counter() - t0)
    _nothing_created(tmp_path / "out")


def test_num_actors_below_one_is_a_usage_error(tmp_path, tiny):
    from click.testing import CliRunner

    from jobs.score import score

    data = _data(tmp_path / "in", files=1, rows=5)
    for n in ("-1", "0"):
        r = CliRunner().invoke(score, [str(data), str(tmp_path / "out"), "--model", tiny, "--num-actors", n])
        assert r.exit_code == 2 and "--num-actors" in r.output and f"{n} is not in the range x>=1" in r.output, r.output
    (tmp_path / "zero.yaml").write_text("resources:\n  num_actors: 0\n")
    r = CliRunner().invoke(score, [str(data), str(tmp_path / "out"), "--model", tiny, "--config",
                                   str(tmp_path / "zero.yaml")])
    assert r.exit_code == 1 and "Error: score: resources.num_actors must be >= 1" in r.output, r.output
    _nothing_created(tmp_path / "out")


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path, tiny):
    import yaml
    from click.testing import CliRunner

    from jobs.score import score

    (tmp_path / "base.yaml").write_text("max_tokens: 1024\nresources:\n  gpu_wait_s: 60\n")
    args = ["in.parquet", str(tmp_path / "out"), "--model", tiny, "--config", str(tmp_path / "base.yaml"),
            "--batch-size", "64", "--device", "cpu", "--print-config"]
    r = CliRunner().invoke(score, args)
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)
    assert (shown["max_tokens"], shown["batch_size"], shown["resources"]["device"],
            shown["resources"]["gpu_wait_s"], shown["dtype"]) == (1024, 64, "cpu", 60, "auto")
    (tmp_path / "shown.yaml").write_text(r.output)
    again = CliRunner().invoke(score, ["--config", str(tmp_path / "shown.yaml"), "--print-config"])
    assert again.exit_code == 0 and again.output == r.output
    _nothing_created(tmp_path / "out")


# ---- 2: one run per output; duplicates left by overlapping writers are repaired ---------------


def test_concurrent_run_on_one_output_is_refused(tmp_path, tiny):
    data = _data(tmp_path / "in", files=2, rows=200)
    out = tmp_path / "out"
    args = [data, out, "--model", tiny, "--task", "embed", "--num-actors", "1", "--batch-size", "50"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen([sys.executable, "-m", "jobs.score", *map(str, args)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = tmp_path / "out.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[0]
        second = _cli(*args)
        assert first.poll() is None, "the first run ended before the second tried the lock"
        _refused(second, out, "in use by another invocation", f"pid {first.pid}", code=75)
        log, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log
    ids = read_output(str(out))["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 400 and set(ids) == {f"f{f}-{i}" for f in range(2) for i in range(200)}


def test_rerun_repairs_duplicate_rows(ray_local, tmp_path, tiny):
    data = _data(tmp_path / "in", files=2, rows=40)
    out = tmp_path / "out"
    cfg = ScoreConfig(input=str(data), output=str(out), model=tiny, batch_size=10,
                      resources=ResourceConfig(num_actors=1))
    main(cfg)
    expected = {f"f{f}-{i}" for f in range(2) for i in range(40)}
    # The state two overlapping runs left: every row committed in the checkpoint, some written
    # twice, no manifest. Before the repair each rerun failed its row count forever.
    files = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    ckpt = default_checkpoint_dir(str(out))
    os.makedirs(ckpt)
    for f in files:
        pq.write_table(pq.read_table(out / f, columns=["row_hash"]), os.path.join(ckpt, f))
    for f in files[:3]:
        shutil.copy(out / f, out / f"dup-{f}")
    os.remove(out / MANIFEST)
    assert read_output(str(out)).num_rows > len(expected)
    result = main(cfg)
    ids = read_output(str(out))["id"].to_pylist()
    assert result.rows == len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert (out / MANIFEST).exists() and not os.path.exists(ckpt)
