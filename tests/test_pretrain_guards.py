"""Pretraining and fine-tuning refuse what can't work before any work, and never hang.

Driver-side refusals (bad corpora, an `--init-from` checkpoint of another vocabulary, `raybert
vocab` on a corpus without text) need no Ray: each is one `Error:` line, exit status 1, no
traceback, within 20 s, and leaves nothing on disk. The resource plan (pipelines/resources.py)
is checked on its numbers without Ray, then on the CI machine's 2 CPUs: the two settings that
used to wait forever (`mini` x 2 workers here, `debug` x 4 workers in test_console.py) now train, and an explicit
`cpus_per_worker` that leaves the data pipeline no CPU is refused before any worker starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
from pipelines.resources import plan_training

VOCAB = str(chinese_vocab_path())


def _refused(args: list[str], *needles: str, within: float = 20.0) -> str:
    """Run the CLI; assert one `Error:` line containing every needle, exit 1, no traceback."""
    t0 = time.time()
    res = CliRunner().invoke(cli, args)
    elapsed = time.time() - t0
    out = res.output
    assert res.exit_code == 1, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert elapsed < within, elapsed
    return errors[0]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("corpora")
    texts = peoples_daily_sentences()[:400]
    tables = {
        "no_text_column": pa.table({"body": texts}),
        "all_null": pa.table({"text": pa.array([None] * 50, pa.string())}),
        "all_empty": pa.table({"text": [""] * 50}),
        "zero_rows": pa.table({"text": pa.array([], pa.string())}),
        "too_little": pa.table({"text": texts[:3]}),
        "int_text": pa.table({"text": list(range(50))}),
        "ok": pa.table({"text": texts}),
    }
    out = {}
    for name, table in tables.items():
        out[name] = str(d / f"{name}.parquet")
        pq.write_table(table, out[name])
    return out


@pytest.mark.parametrize("case,needles", [
    ("no_text_column", ["no_text_column.parquet", "no column 'text'", "['body']"]),
    ("all_null", ["all_null.parquet", "no text", "50 rows"]),
    ("all_empty", ["all_empty.parquet", "no text"]),
    ("zero_rows", ["zero_rows.parquet", "no rows"]),
    ("too_little", ["too_little.parquet", "too little text", "tokens of training text",
                    "one step needs 16 rows (1,024 tokens"]),
    ("int_text", ["int_text.parquet", "holds int64, not text"]),
])
def test_pretrain_refuses_a_corpus_that_cannot_train(corpora, case, needles, tmp_path):
    run_dir = tmp_path / "run"
    _refused(["pretrain", "--preset", "debug", "--data", corpora[case], "--tokenizer", VOCAB,
              "--run-dir", str(run_dir)], *needles)
    assert not run_dir.exists()  # nothing created


@pytest.fixture(scope="module")
def small_vocab_ckpt(tmp_path_factory) -> str:
    """A debug-size BERT with a 100-token vocab and no tokenizer files."""
    import torch

    from bert_core.checkpoint import save_pretrained
    from bert_core.model import BertForMaskedLM, preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "small_vocab"
    save_pretrained(BertForMaskedLM(preset("debug", vocab_size=100)), path)
    return str(path)


def test_pretrain_refuses_init_from_with_a_smaller_vocab(corpora, small_vocab_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    _refused(["pretrain", "--preset", "debug", "--data", corpora["ok"], "--tokenizer", VOCAB,
              "--init-from", small_vocab_ckpt, "--run-dir", str(run_dir)],
             small_vocab_ckpt, "vocab_size 100", "21,128 tokens")
    assert not run_dir.exists()


def test_pretrain_and_finetune_refuse_init_from_of_another_vocabulary(corpora, minilm_dir, tmp_path):
    """MiniLM ships its English 30,522-token vocab; training it with the Chinese 21,128-token one
    would read its embeddings as other tokens."""
    run_dir = tmp_path / "run"
    _refused(["pretrain", "--preset", "debug", "--data", corpora["ok"], "--tokenizer", VOCAB,
              "--init-from", str(minilm_dir), "--run-dir", str(run_dir)],
             str(minilm_dir), "30,522 tokens", "21,128 tokens", "Drop --tokenizer")
    assert not run_dir.exists()
    labeled = tmp_path / "labeled.parquet"
    pq.write_table(pa.table({"text": ["好", "坏"] * 20, "label": [1, 0] * 20}), labeled)
    _refused(["finetune", "--preset", "debug", "--data", str(labeled), "--tokenizer", VOCAB,
              "--init-from", str(minilm_dir), "--run-dir", str(run_dir)],
             str(minilm_dir), "30,522 tokens", "21,128 tokens")
    assert not run_dir.exists()


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_unusable_run_dir_or_model_uri_is_refused_up_front_and_nothing_is_made_locally(corpora, tmp_path, monkeypatch, job):
    """A run dir or model URI pyarrow can't open is refused, naming it; `file://` URIs are plain
    local paths. (Run dirs, models and tokenizers on a real S3 server: tests/test_remote_storage.py.)"""
    monkeypatch.chdir(tmp_path)
    data = ["--data", corpora["ok"]]
    if job == "finetune":
        labeled = tmp_path / "labeled.parquet"
        pq.write_table(pa.table({"text": ["好", "坏"] * 20, "label": [1, 0] * 20}), labeled)
        data = ["--data", str(labeled)]
    base = [job, "--preset", "debug", *data, "--tokenizer", VOCAB]
    _refused([*base, "--run-dir", "nosuchscheme://bucket/run"], "run_dir nosuchscheme://bucket/run",
             "not a storage URI")
    _refused([*base, "--run-dir", "run", "--init-from", "nosuchscheme://bucket/ckpt"],
             "init_from nosuchscheme://bucket/ckpt", "not a storage URI")
    assert list(tmp_path.iterdir()) == ([tmp_path / "labeled.parquet"] if job == "finetune" else [])
    res = CliRunner().invoke(cli, [*base, "--run-dir", f"file://{tmp_path}/run", "--print-config"])
    assert res.exit_code == 0 and f"run_dir: file://{tmp_path}/run" in res.output


def test_contradicting_or_missing_deepspeed_json_is_refused_up_front(corpora, tmp_path):
    import json

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    base = ["pretrain", "--preset", "debug", "--data", corpora["ok"], "--tokenizer", VOCAB, "--zero-stage", "2",
            "--run-dir", str(tmp_path / "run")]
    _refused([*base, "--deepspeed", str(bad)], "zero_optimization.stage = 3", "train.zero_stage")
    _refused([*base, "--deepspeed", str(tmp_path / "nope.json")], "nope.json does not exist")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_print_config_shows_the_resolved_config_and_reads_back(corpora, tmp_path, job):
    import yaml

    args = [job, "--preset", "debug", "--data", corpora["ok"], "--run-dir", str(tmp_path / "run"), "--lr" if
            job == "finetune" else "--max-steps", "7", "--print-config"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown["model"]["preset"] == "debug" and shown["run_dir"] == str(tmp_path / "run")
    assert (shown["train"]["lr"] if job == "finetune" else shown["train"]["max_steps"]) == 7
    (tmp_path / "c.yaml").write_text(res.output)  # what it prints is a --config that gives the same config
    again = CliRunner().invoke(cli, [job, "--config", str(tmp_path / "c.yaml"), "--print-config"])
    assert again.exit_code == 0 and again.output == res.output
    assert not (tmp_path / "run").exists()  # nothing ran


@pytest.mark.parametrize("case", ["all_null", "zero_rows", "no_text_column"])
def test_vocab_refuses_a_corpus_without_text(corpora, case, tmp_path):
    out = tmp_path / "tok"
    _refused(["vocab", "--data", corpora[case], "--out", str(out), "--vocab-size", "500"], f"{case}.parquet")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The resource plan
# --------------------------------------------------------------------------------------------


def test_plan_leaves_the_data_a_budget_and_uses_gpus_by_default():
    two = [{"CPU": 2.0}]
    one = plan_training(two, 1)
    assert (one.cpus_per_worker, one.data_cpus, one.use_gpu) == (1.5, 0.5, False)
    assert plan_training(two, 2).cpus_per_worker == 0.75  # mini x 2: was 2 x 1.0, no CPU left
    assert plan_training(two, 4).cpus_per_worker == 0.375  # debug x 4: was 4 x 0.5
    gpu = plan_training([{"CPU": 16.0, "GPU": 1.0}], 1)
    assert gpu.use_gpu and gpu.cpus_per_worker == 4.0 and gpu.data_cpus == 12.0
    assert not plan_training([{"CPU": 16.0, "GPU": 1.0}], 1, use_gpu=False).use_gpu
    eight = plan_training([{"CPU": 8.0, "GPU": 8.0}], 8)  # every CPU would go to workers at 1 each
    assert eight.cpus_per_worker == 0.75 and eight.data_cpus == 2.0
    # A worker can't span nodes: two 2-CPU nodes hold one 2-CPU worker, the data gets the other.
    assert plan_training([{"CPU": 2.0}, {"CPU": 2.0}], 1).cpus_per_worker == 2.0


def test_plan_refuses_settings_that_leave_no_data_budget_naming_the_numbers():
    with pytest.raises(ValueError) as e:
        plan_training([{"CPU": 2.0}], 2, cpus_per_worker=1.0)
    msg = str(e.value)
    for part in ("2 workers x 1 CPU each", "cluster's 2 CPUs leave 0", "needs at least 0.5",
                 "at most 0.75", "leave cpus_per_worker unset"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="don't fit"):
        plan_training([{"CPU": 2.0}], 1, cpus_per_worker=3.0)
    with pytest.raises(ValueError, match="has none; drop --use-gpu"):
        plan_training([{"CPU": 2.0}], 1, use_gpu=True)
    with pytest.raises(ValueError, match="2 workers need one GPU each, but the Ray cluster has 1"):
        plan_training([{"CPU": 8.0, "GPU": 1.0}], 2)


# --------------------------------------------------------------------------------------------
# On the CI machine's 2 CPUs (each test its own private Ray)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fast_ray(fast_train):
    """A private 2-CPU Ray (the CI machine) with fast_train's settings."""
    from conftest import local_ray

    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("big") / "zh.parquet"
    pq.write_table(pa.table({"text": peoples_daily_sentences()[:1500]}), path)
    return str(path)


def _tiny_steps(tmp_path: Path) -> str:
    import yaml

    cfg = {"train": {"max_steps": 2, "log_every": 1, "eval_every": 1000, "save_every": 1000},
           "data": {"val_fraction": 0.0}, "scaling": {"max_failures": 0}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# Over 30 s: a real Ray Train fit (a hang shows only in one). mini at its own micro-batch (32 rows
# of 128 tokens) x 2 workers used to wait forever before step 1 (2 x 1.0 CPUs left the data none);
# the other such setting, debug x 4 workers, is test_console.py's small pretrain.
@pytest.mark.timeout(400)
@pytest.mark.parametrize("preset,workers", [("mini", 2)])
def test_settings_that_used_to_hang_now_train(fast_ray, big_corpus, tmp_path, preset, workers):
    import json

    from jobs.pretrain import read_metrics
    from jobs.schedule import read_ledger

    assert fast_ray.cluster_resources()["CPU"] == 2
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(cli, ["pretrain", "--preset", preset, "--num-workers", str(workers), "--cpu",
                                   "--data", big_corpus, "--tokenizer", VOCAB, "--run-dir", str(run_dir),
                                   "--config", _tiny_steps(tmp_path)])
    assert res.exit_code == 0, res.output[-3000:]
    summary = json.loads(res.stdout)  # stdout is the JSON result alone
    assert summary["metrics"]["step"] == 2
    plan = json.loads((run_dir / "config.json").read_text())["plan"]
    assert plan["num_workers"] == workers and plan["data_cpus"] >= 0.5
    assert plan["cpus_per_worker"] * workers <= 1.5
    start = [r for r in read_metrics(run_dir) if r.get("event") == "start"]
    assert start and start[0]["world_size"] == workers
    (record,) = read_ledger(run_dir)
    assert (record["status"], record["start_step"], record["end_step"]) == ("ok", 0, 2)


@pytest.mark.timeout(120)
def test_explicit_cpus_per_worker_without_data_budget_is_refused_up_front(fast_ray, big_corpus, tmp_path):
    import yaml

    from jobs.schedule import read_ledger

    config = tmp_path / "greedy.yaml"
    config.write_text(yaml.safe_dump({"scaling": {"num_workers": 2, "cpus_per_worker": 1.0}}))
    run_dir = tmp_path / "run"
    _refused(["pretrain", "--preset", "debug", "--data", big_corpus, "--tokenizer", VOCAB,
              "--run-dir", str(run_dir), "--config", str(config)],
             "2 workers x 1 CPU each", "2 CPUs leave 0", "at most 0.75", within=60)
    assert not run_dir.exists()  # it held a lock file and a `failed` ledger line
    # An existing run dir keeps one `refused` line (a scheduler's record), and nothing else changes.
    run_dir.mkdir()
    _refused(["pretrain", "--preset", "debug", "--data", big_corpus, "--tokenizer", VOCAB,
              "--run-dir", str(run_dir), "--config", str(config)], "2 CPUs leave 0", within=60)
    (record,) = read_ledger(run_dir)
    assert record["status"] == "refused" and "2 CPUs leave 0" in record["error"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".raybert.lock", "runs.jsonl"]


@pytest.mark.parametrize("size", ["0", "5", "-3", "40"])
def test_vocab_too_small_for_the_corpus_is_refused(corpora, size, tmp_path):
    """A vocab that can't hold the special tokens plus the corpus's characters (0 and 5 wrote 5 and
    15 tokens, -3 overflowed, and pretraining failed 80 s later) is one Error line; nothing written."""
    out = tmp_path / "tok"
    line = _refused(["vocab", "--data", corpora["ok"], "--out", str(out), "--vocab-size", size],
                    f"vocab_size {int(size):,} is too small")
    assert ("special tokens alone" if int(size) <= 5 else "would have no token and read as [UNK]") in line
    assert not out.exists()


def test_settings_that_cannot_train_are_refused_before_anything_is_made(corpora, tmp_path):
    """--max-steps 0 or negative was refused only after 29 s of Ray start-up, leaving a run dir
    (--time-budget 1 trained a step at 30x its budget and recorded `ok`);
    YAML of the wrong type was a traceback (or, `lr: 1e-4` read as a string by YAML 1.1, failed
    in every worker after a minute). Now: one Error line, nothing made; `1e-4` is a number."""
    import yaml

    run_dir = tmp_path / "run"
    base = ["pretrain", "--data", corpora["ok"], "--tokenizer", VOCAB, "--preset", "debug", "--run-dir", str(run_dir)]
    for steps in ("0", "-5"):
        _refused(base + ["--max-steps", steps], f"train.max_steps must be >= 1, got {steps}")
    # A budget that can't fit start-up and one step trained one step and recorded `ok`.
    _refused(base + ["--time-budget", "1"], "--time-budget: time_budget must be >= 30", "starts Ray Train",
             "--max-steps-per-run", "got 1.0")
    for text, needles in [("train:\n  micro_batch_size: [8]\n", ["train.micro_batch_size", "an integer"]),
                          ("train: 5\n", ["train", "a mapping of TrainConfig keys"]),
                          ("train:\n  lr: -1e-4\n", ["train.lr must be > 0"]),
                          ("scaling:\n  num_workers: two\n", ["scaling.num_workers", "'two'", "an integer"])]:
        (tmp_path / "c.yaml").write_text(text)
        _refused(base + ["--config", str(tmp_path / "c.yaml")], *needles)
    assert not run_dir.exists()
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n  save_every: '50'\n")
    shown = CliRunner().invoke(cli, base + ["--config", str(tmp_path / "c.yaml"), "--print-config"])
    assert shown.exit_code == 0, shown.output
    train = yaml.safe_load(shown.output)["train"]
    assert train["lr"] == 1e-4 and train["save_every"] == 50
