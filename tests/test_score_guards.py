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
from pipelines.scoring.output import MANIFEST, default_checkpoint_dir, read_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    # Nor is a checkpoint dir holding anything but checkpoint files (ours, or Ray Data's of old).
    ours, ckpt = tmp_path / "ours", tmp_path / "notes"
    ckpt.mkdir()
    (ckpt / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not scoring \(or Ray Data\) checkpoint files"):
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


def test_num_actors_below_one_is_refused_alike_by_flag_set_and_yaml(tmp_path, tiny):
    from click.testing import CliRunner

    from jobs.score import score

    data = _data(tmp_path / "in", files=1, rows=5)
    (tmp_path / "zero.yaml").write_text("resources:\n  num_actors: 0\n")
    said = []
    for args, source in ((["--num-actors", "0"], "--num-actors"), (["--set", "resources.num_actors=0"],
                         "--set resources.num_actors=0"), (["--config", str(tmp_path / "zero.yaml")], "zero.yaml")):
        r = CliRunner().invoke(score, [str(data), str(tmp_path / "out"), "--model", tiny, *args])
        assert r.exit_code == 1 and "resources.num_actors must be >= 1" in r.output and "Traceback" not in r.output, r.output
        line = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
        assert len(line) == 1 and source in line[0], r.output
        said.append(line[0].split(": ", 2)[2])
    assert len(set(said)) == 1, said
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


def test_concurrent_run_on_one_output_is_refused(ray_local, tmp_path, minilm_dir):
    """A second `raybert score` on an output that a running job holds is refused (exit 75, naming
    the holder) and the first finishes with every row once. The first runs here, on the tests'
    shared Ray; the second, in another process, tries as soon as the first holds the lock."""
    from types import SimpleNamespace

    # The first must still hold the lock when the second, which loads the same model to check it,
    # gets to it: MiniLM on one actor scores these 400 rows in about 5 s (the debug model in under
    # 2 s since scoring on CPU dropped Ray Data: too close), and the second imports what its checks
    # need before it waits, so it tries about a second after the lock is taken.
    rows = 200  # per file
    data = _data(tmp_path / "in", files=2, rows=rows)
    out = tmp_path / "out"
    args = [str(a) for a in (data, out, "--model", minilm_dir, "--task", "embed", "--num-actors", "1",
                             "--batch-size", "50")]
    holder = f"pid {os.getpid()}"
    second = ("import pathlib, sys, time\n"
              "import torch, tokenizers, pipelines.scoring.job\n"
              "from jobs.score import score\n"
              f"lock, deadline = pathlib.Path({str(tmp_path / 'out.lock')!r}), time.time() + 120\n"
              f"while {holder!r} not in (lock.read_text() if lock.exists() else ''):\n"
              "    if time.time() > deadline:\n"
              "        sys.exit('the first run never took the lock')\n"
              "    time.sleep(0.05)\n"
              f"score({args!r})\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", second], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        result = main(ScoreConfig(input=str(data), output=str(out), model=str(minilm_dir), task="embed", batch_size=50,
                                  resources=ResourceConfig(num_actors=1)))
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Exit 75 (not 0, "already complete") also shows the second tried while the first held the lock.
    _refused(SimpleNamespace(returncode=proc.returncode, stdout=log, stderr=""), out, "in use by another invocation",
             holder, code=75)
    ids = read_output(str(out))["id"].to_pylist()
    assert result.rows == len(ids) == len(set(ids)) == 2 * rows
    assert set(ids) == {f"f{f}-{i}" for f in range(2) for i in range(rows)}


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
    for f in files[:3]:  # as unit files of other unit sizes (files not named as raybert names them are refused)
        shutil.copy(out / f, out / f"{f[:-17]}{int(f[-17:-8]) + 1:09d}.parquet")
    os.remove(out / MANIFEST)
    assert read_output(str(out)).num_rows > len(expected)
    result = main(cfg)
    ids = read_output(str(out))["id"].to_pylist()
    assert result.rows == len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert (out / MANIFEST).exists() and not os.path.exists(ckpt)


# ---- issue 19: never touch what isn't ours, never mix results, refuse what can't be right -----


def test_every_spelling_of_an_input_is_an_input(tmp_path, tiny, monkeypatch):
    """`file://` URIs, relative paths and symlinks are compared as the directory they name: an
    output or checkpoint dir inside or on an input is refused in each spelling, overwrite or not,
    and the input is left as it was."""
    data = _data(tmp_path / "data" / "in")
    before = _tree(data)
    os.symlink(data, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    cases = [dict(output=f"file://{data}/out"), dict(output="data/in/out"), dict(output=str(tmp_path / "link" / "out")),
             dict(output=str(tmp_path / "o1"), checkpoint_dir=f"file://{data}", overwrite=True),
             dict(output=str(tmp_path / "o2"), checkpoint_dir=f"file://{data}/"),
             dict(output=str(tmp_path / "o3"), checkpoint_dir="link")]
    for case in cases:
        with pytest.raises(ValueError, match="overlaps input"):
            main(ScoreConfig(input=str(data), model=tiny, **case))
    with pytest.raises(ValueError, match="overlaps input"):  # the input spelled as a URI, the output plainly
        main(ScoreConfig(input=f"file://{data}", output=str(data / "out"), model=tiny))
    assert _tree(data) == before
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "data/in/out"))


def test_an_existing_checkpoint_dir_does_not_make_a_directory_ours(tmp_path, tiny):
    """overwrite deletes only an output holding our manifest or run record: a directory of the
    user's files is kept even when the checkpoint dir exists (empty, or Ray Data-like files)."""
    data = _data(tmp_path / "in", files=1, rows=5)
    precious, ckpt = tmp_path / "precious", tmp_path / "precious.checkpoint"
    precious.mkdir()
    (precious / "thesis.parquet").write_bytes(b"years of work")
    ckpt.mkdir()
    t0 = time.perf_counter()
    r = _cli(data, precious, "--model", tiny, "--task", "embed", "--config", _yaml(tmp_path, "overwrite: true\n"))
    _refused(r, precious, "is not an output of raybert score", elapsed=time.perf_counter() - t0)
    (ckpt / "1.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="is not an output of raybert score"):
        main(ScoreConfig(input=str(data), output=str(precious), model=tiny, overwrite=True))
    assert (precious / "thesis.parquet").read_bytes() == b"years of work" and ckpt.is_dir()
    # Without overwrite, that checkpoint dir is not a run to resume either.
    other = tmp_path / "other"
    with pytest.raises(FileExistsError, match="it is not a run of this job to resume"):
        main(ScoreConfig(input=str(data), output=str(other), model=tiny, checkpoint_dir=str(ckpt)))
    assert not other.exists()


def _yaml(tmp_path, text: str):
    import hashlib

    path = tmp_path / f"cfg-{hashlib.sha1(text.encode()).hexdigest()[:8]}.yaml"
    path.write_text(text)
    return path


def test_a_resume_or_finished_output_under_another_recipe_is_refused(tmp_path, tiny, minilm_dir):
    """An output's run record holds its recipe; a run that would add rows of another task, model,
    length or inputs to it is refused on the driver, naming each difference, and changes nothing.
    (test_scoring_faults.py does this after a real kill -9.)"""
    from pipelines.scoring.output import RUN_RECORD
    from pipelines.scoring.job import preflight

    data = _data(tmp_path / "in", files=2, rows=5)
    out = tmp_path / "out"
    cfg = ScoreConfig(input=str(data), output=str(out), model=tiny, task="embed", max_length=32)
    recipe = preflight(cfg).recipe
    # The state a killed run leaves: its run record, some rows, a checkpoint.
    out.mkdir()
    (out / RUN_RECORD).write_text(json.dumps({"recipe": recipe}))
    ckpt = tmp_path / "out.checkpoint"
    ckpt.mkdir()
    before = _tree(tmp_path / "out")
    assert preflight(cfg).recipe == recipe  # the same command resumes
    other_model = tmp_path / "other"
    shutil.copytree(tiny, other_model)
    conf = json.loads((other_model / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps({**conf, "layer_norm_eps": 1e-6}))
    for change, needles in [(dict(model=minilm_dir), ["model ", "model_fingerprint"]),
                            (dict(model=str(other_model)), ["model_fingerprint"]),
                            (dict(max_length=64), ["max_length 32 -> 64"]),
                            (dict(normalize=False), ["normalize None -> False"]),
                            (dict(input=str(data / "part-0.parquet")), ["inputs (2 file(s) -> 1"])]:
        with pytest.raises(FileExistsError, match="unfinished run of another recipe") as e:
            main(ScoreConfig(**{**cfg.__dict__, **change}))
        assert all(n in str(e.value) for n in needles), (change, str(e.value))
    assert _tree(tmp_path / "out") == before and ckpt.is_dir()
    # A finished output (manifest) likewise: it is reported only for its own recipe.
    (out / MANIFEST).write_text(json.dumps({"recipe": recipe, "inputs": recipe["inputs"], "result": {}}))
    shutil.rmtree(ckpt)
    with pytest.raises(FileExistsError, match="finished run of another recipe: max_length 32 -> 64"):
        main(ScoreConfig(**{**cfg.__dict__, "max_length": 64}))


def test_a_task_the_checkpoint_has_no_head_for_is_refused(tmp_path, tiny):
    """classify / fill-mask on an encoder (all-MiniLM-L6-v2 style) and tag on a classifier would
    score with a freshly initialized head: refused, naming what the checkpoint has, unless asked
    for on purpose (allow_untrained_head)."""
    from pipelines.scoring.job import preflight

    data = _data(tmp_path / "in", files=1, rows=5)
    t0 = time.perf_counter()
    r = _cli(data, tmp_path / "out", "--model", tiny, "--task", "classify")
    _refused(r, "task classify needs a classify head", "BertModel", elapsed=time.perf_counter() - t0)
    _nothing_created(tmp_path / "out")
    with pytest.raises(ValueError, match="task fill-mask needs a mlm head, but it is a BertModel"):
        main(ScoreConfig(input=str(data), output=str(tmp_path / "out"), model=tiny, task="fill-mask"))
    tok = load_tokenizer(tiny)
    clf = tmp_path / "clf"
    save_pretrained(build_model(preset("debug", vocab_size=len(tok), id2label={0: "neg", 1: "pos"}), "classify"),
                    clf, tokenizer=tok)
    with pytest.raises(ValueError, match="task tag needs a tag head, but it is a BertForSequenceClassification"):
        main(ScoreConfig(input=str(data), output=str(tmp_path / "out"), model=str(clf), task="tag"))
    with pytest.raises(ValueError, match="--head x: .* is not a multi-task checkpoint"):
        main(ScoreConfig(input=str(data), output=str(tmp_path / "out"), model=str(clf), task="classify", head="x"))
    _nothing_created(tmp_path / "out")
    preflight(ScoreConfig(input=str(data), output=str(tmp_path / "out"), model=str(clf), task="classify"))
    preflight(ScoreConfig(input=str(data), output=str(tmp_path / "out"), model=tiny, task="classify",
                          allow_untrained_head=True))


def test_yaml_values_are_read_as_their_fields_types_or_refused(tmp_path, tiny):
    """Quoted booleans and numbers are read as the field's type ("false" is false), wrong types
    and invalid YAML are one `Error:` line naming the key, value and type, and top_k < 1 is refused."""
    import yaml
    from click.testing import CliRunner

    from jobs.score import score

    def run(text, *extra):
        return CliRunner().invoke(score, ["in.parquet", str(tmp_path / "out"), "--model", tiny, "--config",
                                          str(_yaml(tmp_path, text)), *extra])

    shown = run('overwrite: "false"\nnormalize: "False"\nmax_tokens: "4096"\nresources:\n  gpu_wait_s: "1e2"\n',
                "--print-config")
    assert shown.exit_code == 0, shown.output
    got = yaml.safe_load(shown.output)
    assert (got["overwrite"], got["normalize"], got["max_tokens"], got["resources"]["gpu_wait_s"]) == (False, False, 4096, 100.0)
    for text, needles in [("batch_size: [8]\n", ["batch_size", "[8]", "an integer"]),
                          ("resources: 4\n", ["resources", "a mapping of ResourceConfig keys"]),
                          ("overwrite: maybe\n", ["overwrite", "'maybe'", "true or false"]),
                          ("max_tokens: 40.5\n", ["max_tokens", "40.5", "an integer"]),
                          ("task: [embed\n", ["not valid YAML", "line 2"]),
                          ("task: fill-mask\ntop_k: 0\n", ["top_k must be >= 1"])]:
        r = run(text)
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
        assert all(n in errors[0] for n in needles), (text, errors[0])
    _nothing_created(tmp_path / "out")


def test_model_tokenizer_and_input_mismatches_are_refused_up_front(tmp_path, tiny):
    """What failed late or silently: a config.json whose vocab_size disagrees with the weights, a
    tokenizer larger than the embedding table (IndexError in the actors), a tokenizer dir with only
    tokenizer_config.json (5 tokens), and one input file listed again through a symlink (scored
    twice). Each is one error on the driver; nothing is created."""
    data = _data(tmp_path / "in", files=1, rows=5)
    out = tmp_path / "out"

    def refused(match, **kw):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            main(ScoreConfig(**{"input": str(data), "output": str(out), "model": tiny, **kw}))

    wrong = tmp_path / "wrong-vocab"
    shutil.copytree(tiny, wrong)
    conf = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**conf, "vocab_size": conf["vocab_size"] + 100}))
    refused(r"vocab_size 30,622 but the weights' embedding table has 30,522 rows", model=str(wrong))

    small = tmp_path / "small-vocab"
    tok = load_tokenizer(tiny)
    torch.manual_seed(0)
    save_pretrained(build_model(preset("debug", vocab_size=1000), "embed"), small)
    tok.save_pretrained(str(small))
    refused("the tokenizer has 30,522 tokens but the model .* embeds only 1,000", model=str(small))

    bare = tmp_path / "bare-tok"
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    refused("only 5 tokens", tokenizer=str(bare))

    os.symlink(data, tmp_path / "again")
    refused("is given more than once .also as", input=[str(data), str(tmp_path / "again" / "part-0.parquet")])
    _nothing_created(out)


def test_auto_precision_is_one_per_job_on_gpus_too(monkeypatch):
    """On GPUs each actor resolved `auto` itself (bf16 where supported, else fp16), so GPUs of two
    generations could mix precisions in one output; now the driver fixes it (bf16 on any GPU) and
    a resume keeps the recorded choice. CPU `auto` is the driver's one decision (`cpu_choice`)."""
    import pipelines.scoring.precision as precision
    from pipelines.scoring.precision import DtypeChoice, job_dtype

    probes = []
    monkeypatch.setattr(precision, "cpu_choice", lambda hidden: probes.append(hidden) or DtypeChoice("fp32", "stub"))
    assert job_dtype("auto", "cuda", {}, 384).dtype == "bf16" and probes == []
    assert job_dtype("auto", "cuda", {"dtype_used": "fp16"}, 384).dtype == "fp16"  # a resume keeps its precision
    assert job_dtype("auto", "cpu", None, 384).dtype == "fp32" and probes == [384]
    # explicit: as given (the recipe check refuses a change)
    assert job_dtype("fp16", "cuda", {"dtype_used": "bf16"}, 384) == DtypeChoice("fp16", "as set")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):  # score_dataset's check, as the CLI's
        job_dtype("fp16", "cpu", None, 384)


def test_auto_precision_is_chosen_once_per_output_and_kept_by_a_resume(ray_local, tmp_path, tiny, monkeypatch):
    """`--dtype auto` on CPU is decided once per job on the driver and recorded in the run record;
    a resume scores its remaining rows in that precision even where a new probe would choose
    otherwise, so one output never mixes bf16 and fp32 rows (each actor used to probe for itself)."""
    import pipelines.scoring.precision as precision
    from pipelines.scoring.output import RUN_RECORD, output_dtypes

    data = _data(tmp_path / "in", files=4, rows=20)
    out = tmp_path / "out"
    cfg = ScoreConfig(input=str(data), output=str(out), model=tiny, batch_size=10, resources=ResourceConfig(num_actors=1))
    monkeypatch.setattr(precision, "cpu_choice", lambda hidden: precision.DtypeChoice("bf16", "stub"))
    first = main(cfg)
    assert first.dtype == "bf16" and json.loads((out / RUN_RECORD).read_text())["dtype_used"] == "bf16"
    # A killed run's state: half the files written and committed, no manifest.
    files = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    ckpt = default_checkpoint_dir(str(out))
    os.makedirs(ckpt)
    for f in files[: len(files) // 2]:
        pq.write_table(pq.read_table(out / f, columns=["row_hash"]), os.path.join(ckpt, f))
    for f in files[len(files) // 2:]:
        os.remove(out / f)
    os.remove(out / MANIFEST)
    monkeypatch.setattr(precision, "cpu_choice", lambda hidden: precision.DtypeChoice("fp32", "stub"))  # now otherwise
    resumed = main(cfg)
    assert resumed.resumed and resumed.rows == 80
    assert output_dtypes(str(out)) == "bf16" and resumed.dtype == "bf16"


def test_auto_precision_is_one_decision_per_machine_from_the_cli_and_from_python(ray_local, tmp_path, tiny,
                                                                                  monkeypatch, capsys):
    """#37: `dtype auto` on a CPU chose fp32 from Python and bf16 from the CLI minutes apart (a timing
    probe each time). On a CPU without AMX it is now measured once and kept per machine and model
    shape: ten decisions, the CLI's and score_dataset's agree although every later timing would say
    otherwise; a CPU with AMX is bf16 unmeasured. The timing is a stub: no speed is measured."""
    import pandas as pd

    import pipelines.scoring.precision as precision
    from bert_core.checkpoint import check_checkpoint
    from pipelines.scoring.job import score_dataset

    monkeypatch.setenv("RAYBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_DECIDED", {})  # as in a fresh process
    monkeypatch.setattr(precision, "this_cpu", lambda: precision.Cpu("CPU without AMX", frozenset({"avx2", "avx512f"})))
    timings, calls = iter([1.9] + [0.5] * 20), []  # the first says bf16, any later one fp32
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda hidden, tokens=2048: calls.append(hidden) or next(timings))
    hidden = check_checkpoint(tiny).hidden_size
    choices = [precision.job_dtype("auto", "cpu", None, hidden) for _ in range(10)]
    assert {c.dtype for c in choices} == {"bf16"} and calls == [hidden] and "1.9x fp32" in choices[0].why
    saved = json.loads((tmp_path / "cache" / "cpu_dtype.json").read_text())
    assert list(saved.values()) == [{"dtype": "bf16", "bf16_speedup": 1.9}] and "CPU without AMX" in next(iter(saved))
    monkeypatch.setattr(precision, "_DECIDED", {})  # another process: it reads the file
    assert precision.job_dtype("auto", "cpu", None, hidden).dtype == "bf16" and calls == [hidden]
    data = _data(tmp_path / "in", files=1, rows=12)
    cli = main(ScoreConfig(input=str(data), output=str(tmp_path / "out"), model=tiny, batch_size=8,
                           resources=ResourceConfig(num_actors=1)))
    assert cli.dtype == "bf16" and "dtype=bf16" in cli.line()  # the run says which it chose
    capsys.readouterr()
    score_dataset(pd.DataFrame({"text": ["one", "two"]}), tiny, resources=ResourceConfig(num_actors=1))  # lazy
    said = capsys.readouterr().err
    assert said.count("[raybert] score_dataset:") == 1 and " in bf16 (auto: bf16 ran 1.9x fp32" in said, said
    assert calls == [hidden]  # measured once in all
    monkeypatch.setattr(precision, "this_cpu", lambda: precision.Cpu("CPU with AMX", frozenset({"amx_bf16", "avx2"})))
    assert precision.job_dtype("auto", "cpu", None, hidden) == precision.DtypeChoice(
        "bf16", "auto: this CPU has AMX bf16 units") and calls == [hidden]


def test_the_settings_everyone_sets_are_flags_and_errors_name_them_as_flags(tmp_path, tiny):
    """--text-column, --text-pair-column, --id-column, --max-length, --pooling, --normalize and
    --overwrite reach the config (no YAML needed for a GLUE-style `sentence` column), and a refusal
    that overwrite would lift names the flag and the YAML key."""
    import yaml
    from click.testing import CliRunner

    import bert_core.model
    import pipelines.scoring.config
    from jobs.score import score
    from pipelines.scoring.output import RUN_RECORD
    from pipelines.scoring.job import preflight

    assert pipelines.scoring.config.POOLINGS == bert_core.model.POOLINGS  # the CLI's choices are the model's
    args = ["in.parquet", str(tmp_path / "out"), "--model", tiny, "--text-column", "sentence", "--text-pair-column",
            "sentence2", "--id-column", "key", "--max-length", "64", "--pooling", "cls", "--no-normalize",
            "--overwrite", "--print-config"]
    r = CliRunner().invoke(score, args)
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)
    assert [shown[k] for k in ("text_column", "text_pair_column", "id_column", "max_length", "pooling",
                               "normalize", "overwrite")] == ["sentence", "sentence2", "key", 64, "cls", False, True]
    unset = yaml.safe_load(CliRunner().invoke(score, args[:4] + ["--print-config"]).output)
    assert (unset["normalize"], unset["overwrite"], unset["pooling"]) == (None, False, None)  # YAML/defaults stand
    # A refusal that --overwrite would lift says so, as the user can set it.
    data = _data(tmp_path / "in", files=1, rows=3)
    out = tmp_path / "out"
    cfg = ScoreConfig(input=str(data), output=str(out), model=tiny, task="embed", max_length=32)
    out.mkdir()
    (out / RUN_RECORD).write_text(json.dumps({"recipe": preflight(cfg).recipe}))
    (tmp_path / "out.checkpoint").mkdir()
    with pytest.raises(FileExistsError, match=r"pass --overwrite \(YAML: overwrite: true\)"):
        main(ScoreConfig(**{**cfg.__dict__, "max_length": 64}))
