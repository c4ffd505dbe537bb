"""Issue 34: every setting of `raybert pretrain | finetune | vocab` is checked on the driver before
Ray starts, by flag and by YAML alike, and a pretraining resume refuses any change of its recipe.

Each refusal is one `Error:` line (exit status 1, no traceback) naming the setting, its value and
what it must be, within seconds, with nothing written and no Ray session opened. Before: `finetune
--lr 0` trained 35 steps at LR 0 and exported, `--lr -1` ended a minute later in a worker's
traceback leaving a config.json, `--epochs 0` trained a step, `data.seq_len: 1024` on a 512-position
model failed in every worker after 93 s, a resume with another `train.lr` was accepted silently,
and `raybert vocab --max-docs 0` trained on one document.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from jobs.cli import cli
from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences

VOCAB = str(chinese_vocab_path())


def _refused(args: list[str], *needles: str, within: float = 20.0) -> str:
    """Run the CLI; assert exit 1 and one `Error:` line holding every needle, no traceback, in time."""
    t0 = time.time()
    res = CliRunner().invoke(cli, args)
    elapsed = time.time() - t0
    out = res.output
    assert res.exit_code == 1, (repr(res.exception), out[-3000:])
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert elapsed < within, elapsed
    return errors[0]


@pytest.fixture
def no_ray(monkeypatch):
    """A refused config never opens a Ray session (an initialized one, or a new one)."""
    import jobs.ray_env

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray session was opened for a config that should have been refused")

    monkeypatch.setattr(jobs.ray_env, "ray_session", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    labeled, corpus = d / "labeled.parquet", d / "corpus.parquet"
    pq.write_table(pa.table({"text": ["好", "坏"] * 20, "label": [1, 0] * 20}), labeled)
    pq.write_table(pa.table({"text": peoples_daily_sentences()[:400]}), corpus)
    return {"labeled": str(labeled), "corpus": str(corpus), "dir": str(d)}


def _yaml(tmp_path: Path, data: dict) -> str:
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _base(job: str, files: dict, run_dir: Path) -> list[str]:
    data = files["corpus"] if job == "pretrain" else files["labeled"]
    return [job, "--preset", "debug", "--data", data, "--tokenizer", VOCAB, "--run-dir", str(run_dir)]


# --------------------------------------------------------------------------------------------
# 1. Ranges, by flag and by YAML
# --------------------------------------------------------------------------------------------

# (job, extra arguments or a YAML mapping, what the Error line says)
CASES = [
    ("finetune", ["--lr", "0"], ["train.lr must be > 0, got 0.0", "--lr"]),
    ("finetune", ["--lr", "-1"], ["train.lr must be > 0, got -1.0", "--lr"]),
    ("finetune", {"train": {"lr": 0}}, ["train.lr must be > 0, got 0"]),
    ("finetune", {"train": {"lr": -0.001}}, ["train.lr must be > 0, got -0.001"]),
    ("finetune", ["--epochs", "0"], ["options.epochs must be > 0 (or unset), got 0.0", "--epochs"]),
    ("finetune", {"options": {"epochs": -3}}, ["options.epochs must be > 0 (or unset), got -3"]),
    ("finetune", {"options": {"warmup_ratio": 1.0}}, ["options.warmup_ratio must be in [0, 1) (or unset), got 1.0"]),
    ("finetune", {"options": {"layer_lr_decay": 0}}, ["options.layer_lr_decay must be in (0, 1]", "got 0"]),
    ("finetune", {"options": {"dropout": 1.0}}, ["options.dropout must be in [0, 1)"]),
    ("finetune", {"options": {"classifier_dropout": -0.1}}, ["options.classifier_dropout must be in [0, 1)"]),
    ("finetune", {"options": {"patience": -1}}, ["options.patience must be >= 0", "got -1"]),
    ("finetune", {"options": {"min_delta": -0.01}}, ["options.min_delta must be >= 0, got -0.01"]),
    ("finetune", {"data": {"max_length": 2}}, ["data.max_length must be >= 3", "got 2"]),
    ("finetune", {"data": {"mlm_seq_len": 0}}, ["data.mlm_seq_len must be >= 3", "got 0"]),
    ("finetune", {"data": {"val_fraction": 1.0}}, ["data.val_fraction must be in [0, 1), got 1.0"]),
    ("finetune", {"data": {"tokenize_batch_rows": 0}}, ["data.tokenize_batch_rows must be >= 1, got 0"]),
    ("finetune", {"data": {"num_cpus": 0}}, ["data.num_cpus must be > 0, got 0"]),
    ("finetune", {"masking": {"mlm_probability": 1.0}}, ["masking.mlm_probability must be in (0, 1), got 1.0"]),
    ("finetune", ["--num-workers", "0"], ["scaling.num_workers must be >= 1, got 0", "--num-workers"]),
    ("finetune", {"scaling": {"cpus_per_worker": 0}}, ["scaling.cpus_per_worker must be > 0 (or unset), got 0"]),
    ("finetune", {"scaling": {"max_failures": -1}}, ["scaling.max_failures must be >= 0, got -1"]),
    ("finetune", {"tasks": [{"name": "t", "paths": ["x.parquet"], "weight": 0}]}, ["tasks[0].weight must be > 0, got 0"]),
    ("pretrain", {"train": {"warmup_steps": -1}}, ["train.warmup_steps must be >= 0, got -1"]),
    ("pretrain", {"train": {"weight_decay": -0.1}}, ["train.weight_decay must be >= 0, got -0.1"]),
    ("pretrain", {"train": {"betas": [0.9, 1.0]}}, ["train.betas must be 2 numbers, each in [0, 1), got [0.9, 1.0]"]),
    ("pretrain", {"train": {"eps": 0}}, ["train.eps must be > 0, got 0"]),
    ("pretrain", {"train": {"grad_clip": -1}}, ["train.grad_clip must be >= 0", "got -1"]),
    ("pretrain", {"train": {"min_lr_ratio": 1.5}}, ["train.min_lr_ratio must be in [0, 1], got 1.5"]),
    ("pretrain", {"train": {"lr": float("nan")}}, ["train.lr must be a finite number > 0, got nan"]),
    ("pretrain", {"train": {"stall_timeout_s": -5}}, ["train.stall_timeout_s must be >= 0", "got -5"]),
    ("pretrain", {"train": {"eval_every": 0}}, ["train.eval_every must be >= 1, got 0"]),
    ("pretrain", {"train": {"keep_last": 0}}, ["train.keep_last must be >= 1, got 0"]),
    ("pretrain", {"model": {"train_dropout": 1.0}}, ["model.train_dropout must be in [0, 1) (or unset), got 1.0"]),
    ("pretrain", {"data": {"seq_len": 2}}, ["data.seq_len must be >= 3 ([CLS], one token and [SEP]), got 2"]),
    ("pretrain", {"data": {"shuffle_buffer_rows": -1}}, ["data.shuffle_buffer_rows must be >= 0", "got -1"]),
    ("pretrain", {"data": {"val_max_rows": 0}}, ["data.val_max_rows must be >= 1, got 0"]),
    ("pretrain", {"data": {"num_cpus": -0.25}}, ["data.num_cpus must be > 0, got -0.25"]),
    ("pretrain", {"data": {"masking": {"random_replace_prob": 0.3}}},
     ["data.masking.mask_replace_prob + data.masking.random_replace_prob must be <= 1", "0.8 + 0.3"]),
    ("pretrain", {"scaling": {"torch_threads": 0}}, ["scaling.torch_threads must be >= 1 (or unset), got 0"]),
    ("pretrain", ["--max-steps-per-run", "0"], ["train.steps_per_run must be >= 1 (or unset), got 0",
                                                "--max-steps-per-run"]),
]


@pytest.mark.parametrize("job,given,needles", CASES, ids=[f"{j}-{i}" for i, (j, _, _) in enumerate(CASES)])
def test_a_setting_out_of_range_is_one_error_before_ray(files, tmp_path, no_ray, job, given, needles):
    run_dir = tmp_path / "run"
    base = _base(job, files, run_dir)
    if isinstance(given, dict) and "tasks" in given:  # --data would replace the file's tasks
        base = [a for a in base if a not in ("--data", files["labeled"])]
    extra = given if isinstance(given, list) else ["--config", _yaml(tmp_path, given)]
    line = _refused(base + extra, *needles)
    if isinstance(given, dict) and "tasks" not in given:  # (a task's keys are read after the file)
        assert "c0.yaml: " in line  # a value from a file names the file
    assert not run_dir.exists()


def test_main_checks_fields_set_in_code_as_flags_set_them(files, tmp_path, no_ray):
    """A caller of main(cfg) sets fields in code: validate runs the same walker over the final config."""
    from jobs import finetune, pretrain
    from pipelines.training.finetune_data import TaskData

    cfg = pretrain.preset_config("debug")
    cfg.run_dir, cfg.data.paths, cfg.data.tokenizer = str(tmp_path / "p"), [files["corpus"]], VOCAB
    cfg.train.micro_batch_size = 0
    with pytest.raises(ValueError, match=r"train.micro_batch_size must be >= 1, got 0"):
        pretrain.main(cfg)
    ft = finetune.preset_config("debug")
    ft.run_dir, ft.tokenizer = str(tmp_path / "f"), VOCAB
    ft.tasks = [TaskData(paths=[files["labeled"]])]
    ft.tasks[0].weight = -1.0
    with pytest.raises(ValueError, match=r"tasks\[0\].weight must be > 0, got -1.0"):
        finetune.main(ft)
    ft.tasks[0].weight, ft.train.decay = 1.0, "step"
    with pytest.raises(ValueError, match=r"train.decay must be one of linear, cosine, constant, got 'step'"):
        finetune.main(ft)
    assert not any(tmp_path.iterdir())


def test_plan_steps_never_turns_a_non_positive_epoch_count_into_a_step():
    from jobs.finetune import plan_steps, preset_config
    from pipelines.training.finetune import TaskSpec

    cfg = preset_config("debug")
    specs = [TaskSpec("t", "classify", {0: "a", 1: "b"}, 1.0, 320, False)]
    cfg.options.epochs = 1.0
    assert plan_steps(cfg, specs)[0] == 20  # 320 rows / 16 a step
    for epochs in (0.0, -3.0):
        cfg.options.epochs = epochs
        with pytest.raises(ValueError, match="options.epochs must be > 0"):
            plan_steps(cfg, specs)


def _numeric_fields(cls):
    numeric = {int, float}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        kinds = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
        if kinds & numeric:
            yield f.name


def test_every_numeric_setting_has_a_rule():
    """A numeric field added to a job's config later gets a rule in pipelines.settings (or its
    class's RULES), or this fails."""
    from jobs.finetune import FinetuneConfig
    from jobs.pretrain import PretrainConfig
    from pipelines.settings import RULES, rules_of

    missing = [f"{cls.__name__}.{name}" for cls in [*RULES, PretrainConfig, FinetuneConfig]
               for name in _numeric_fields(cls) if name not in rules_of(cls)]
    assert not missing


# --------------------------------------------------------------------------------------------
# 2. Sequence lengths within the model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory) -> str:
    """A debug-size BERT of the Chinese vocab with 128 positions, no tokenizer files."""
    import torch

    from bert_core.checkpoint import save_pretrained
    from bert_core.model import BertForMaskedLM, preset

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "short"
    save_pretrained(BertForMaskedLM(preset("debug", vocab_size=21_128, max_position_embeddings=128)), path)
    return str(path)


def test_sequence_lengths_past_the_position_table_are_refused(files, tmp_path, no_ray, short_ckpt):
    run_dir = tmp_path / "run"
    pre, fine = _base("pretrain", files, run_dir), _base("finetune", files, run_dir)
    _refused(pre + ["--config", _yaml(tmp_path, {"data": {"seq_len": 1024}})],
             "data.seq_len 1024", "max_position_embeddings 512", "preset 'debug'", "data.seq_len <= 512")
    _refused(pre + ["--config", _yaml(tmp_path, {"model": {"overrides": {"max_position_embeddings": 32}}})],
             "data.seq_len 64", "max_position_embeddings 32", "model.overrides.max_position_embeddings")
    _refused(pre + ["--init-from", short_ckpt, "--config", _yaml(tmp_path, {"data": {"seq_len": 256}})],
             "data.seq_len 256", "max_position_embeddings 128", f"--init-from checkpoint {short_ckpt}")
    _refused(fine + ["--config", _yaml(tmp_path, {"data": {"max_length": 1024}})],
             "data.max_length 1024", "max_position_embeddings 512")
    _refused(fine + ["--init-from", short_ckpt, "--config", _yaml(tmp_path, {"data": {"max_length": 256}})],
             "data.max_length 256", "max_position_embeddings 128")
    tasks = [{"name": "sentiment", "paths": [files["labeled"]]},
             {"name": "lm", "kind": "mlm", "paths": [files["corpus"]]}]
    _refused(["finetune", "--preset", "debug", "--tokenizer", VOCAB, "--run-dir", str(run_dir),
              "--config", _yaml(tmp_path, {"tasks": tasks, "data": {"mlm_seq_len": 600}})],
             "data.mlm_seq_len 600", "max_position_embeddings 512")
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------
# 4. raybert vocab
# --------------------------------------------------------------------------------------------


def test_vocab_refuses_bad_settings_and_outputs_before_reading(files, tmp_path):
    """A --data that doesn't exist: each refusal comes before the corpus is opened."""
    nowhere = str(tmp_path / "no-such-corpus.parquet")
    out = tmp_path / "tok"
    for n in ("0", "-2"):
        _refused(["vocab", "--data", files["corpus"], "--out", str(out), "--max-docs", n],
                 "--max-docs must be >= 1", f"got {n}")
    _refused(["vocab", "--data", nowhere, "--out", str(out), "--vocab-size", "3"], "vocab_size 3 is too small",
             "special tokens alone")
    assert not out.exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    _refused(["vocab", "--data", nowhere, "--out", str(a_file)], f"--out {a_file} is a file")
    full = tmp_path / "full"
    full.mkdir()
    (full / "vocab.txt").write_text("[PAD]\n")
    (full / "notes.txt").write_text("mine")
    _refused(["vocab", "--data", nowhere, "--out", str(full)], f"--out {full} already holds files",
             "notes.txt, vocab.txt")
    assert a_file.read_text() == "mine" and sorted(p.name for p in full.iterdir()) == ["notes.txt", "vocab.txt"]


# --------------------------------------------------------------------------------------------
# 5. A run dir of other files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_a_run_dir_of_other_files_is_refused_naming_them(files, tmp_path, no_ray, job):
    foreign = tmp_path / "mine"
    (foreign / "photos").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "config.json").write_text(json.dumps({"learning_rate": 1}))  # not ours: a job would overwrite it
    before = sorted(p.relative_to(foreign) for p in foreign.rglob("*"))
    _refused(_base(job, files, foreign), f"--run-dir {foreign} already holds files that no raybert run wrote",
             "config.json, notes.txt, photos", "new or empty --run-dir")
    assert sorted(p.relative_to(foreign) for p in foreign.rglob("*")) == before
    a_file = tmp_path / "run.txt"
    a_file.write_text("mine")
    _refused(_base(job, files, a_file), f"--run-dir {a_file} is a file")
    # What raybert leaves passes this check (the jobs' own rules decide): a refused invocation's
    # lock and ledger, a job's config.json, a checkpoint with our state; and an empty directory.
    from jobs.training import check_run_dir

    for name, content in ((".raybert.lock", ""), ("runs.jsonl", "{}\n"), ("config.json", '{"finetune": {}}')):
        ours = tmp_path / f"ours-{name}"
        ours.mkdir()
        (ours / name).write_text(content)
        check_run_dir(str(ours))
    (tmp_path / "ckpt" / "checkpoint_00000002" / "hf").mkdir(parents=True)
    check_run_dir(str(tmp_path / "ckpt"))
    (tmp_path / "empty").mkdir()
    check_run_dir(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# 3. A resume keeps its recipe
# --------------------------------------------------------------------------------------------


def test_recipe_changes_compare_json_values_and_skip_per_invocation_settings():
    from jobs.pretrain import preset_config
    from jobs.resume import recipe_changes

    cfg = preset_config("debug")
    cfg.train.lr, cfg.train.betas, cfg.train.grad_clip = 1e-3, (0.9, 0.999), 1.0
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    now = preset_config("debug")
    now.train.lr, now.train.betas, now.train.grad_clip = 0.001, [0.9, 0.999], 1  # the same, written otherwise
    now.train.max_steps, now.train.log_every, now.scaling.max_failures, now.time_budget = 500, 1, 0, 60.0
    now.data.paths, now.model.activation_checkpointing, now.train.stall_timeout_s = ["other"], True, None
    assert recipe_changes(saved, now) == []
    now.train.lr, now.train.seed, now.data.masking.mlm_probability = 2e-3, 1, 0.3
    now.model.overrides = {"hidden_dropout_prob": 0.0}
    assert recipe_changes(saved, now) == ["model.overrides {} -> {\"hidden_dropout_prob\": 0.0}",
                                          "data.masking.mlm_probability 0.15 -> 0.3",
                                          "train.lr 0.001 -> 0.002", "train.seed 0 -> 1"]
    del saved["train"]["seed"]  # a run dir older than a field: nothing to compare it with
    assert "train.seed 0 -> 1" not in recipe_changes(saved, now)
    saved["model"]["activation_checkpointing"], saved["data"]["text_column"] = True, "body"
    assert "data.text_column \"body\" -> \"text\"" in recipe_changes(saved, now)
    # What shapes the run's val.parquet (built once, #36) and its files' order: a resume keeps them.
    now.data.val_max_rows, now.data.shuffle_files = 512, False
    assert {"data.val_max_rows 2048 -> 512", "data.shuffle_files true -> false"} <= set(recipe_changes(saved, now))


RECIPE = {"data": {"val_fraction": 0.0}, "scaling": {"max_failures": 0},
          "train": {"log_every": 1, "eval_every": 1000, "save_every": 1000}}


@pytest.fixture(scope="module")
def two_step_run(files, tmp_path_factory):
    """One real fit: debug preset, 2 steps, 1 worker, CPU."""
    from conftest import fast_train_settings, local_ray

    d = tmp_path_factory.mktemp("resume")
    run_dir = d / "run"
    recipe = d / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    args = ["pretrain", "--preset", "debug", "--data", files["corpus"], "--tokenizer", VOCAB, "--run-dir", str(run_dir),
            "--max-steps", "2", "--num-workers", "1", "--cpu"]
    with fast_train_settings(), local_ray():
        res = CliRunner().invoke(cli, args + ["--config", str(recipe)])
    assert res.exit_code == 0, res.output[-3000:]
    return args, run_dir


def _with(**sections) -> dict:
    out = json.loads(json.dumps(RECIPE))
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.mark.timeout(300)
def test_a_resume_refuses_any_change_of_its_recipe(two_step_run, tmp_path):
    from jobs.schedule import read_ledger

    args, run_dir = two_step_run

    def snapshot() -> dict:
        return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
                for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    line = _refused(args + ["--config", _yaml(tmp_path, _with(train={"lr": 1e-3}))],
                    "can't resume", "train.lr 0.002 -> 0.001", "(saved -> now)", "new --run-dir")
    assert line.count(" -> ") == 2  # the LR alone (and the "saved -> now" legend)
    _refused(args + ["--config", _yaml(tmp_path, _with(train={"seed": 7}, data={"masking": {"mlm_probability": 0.3}}))],
             "data.masking.mlm_probability 0.15 -> 0.3", "train.seed 0 -> 7")
    assert snapshot() == before
    # Per-invocation settings may change, and the recipe may be written otherwise (1 for 1.0, the
    # default betas spelled out): the run is at its max_steps, so this resume trains nothing.
    same = _with(train={"log_every": 5, "keep_last": 3, "grad_clip": 1, "betas": [0.9, 0.999], "lr": 2.0e-3},
                 scaling={"max_failures": 1})
    res = CliRunner().invoke(cli, args + ["--config", _yaml(tmp_path, same), "--time-budget", "60"])
    assert res.exit_code == 0, res.output[-3000:]
    assert [r["status"] for r in read_ledger(run_dir)] == ["ok", "complete"]


@pytest.mark.parametrize("override, said", [("hidden_act: foo", "hidden_act 'foo' is not supported"),
                                            ("hidden_size: 0", "hidden_size must be an integer >= 1"),
                                            ("hidden_dropout_prob: 1.5", "hidden_dropout_prob must be in \\[0, 1\\)")])
def test_model_overrides_no_model_can_be_built_from_are_refused_before_ray(tmp_path, override, said):
    """Held out from issue #34: `model.overrides: {hidden_act: foo}` took 30-40 s, ~200 lines, four
    worker attempts and a raw WorkerGroupError, and left config.json and a `failed` ledger line."""
    from click.testing import CliRunner

    from jobs.cli import cli
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    corpus = write_corpus(peoples_daily_sentences()[:200], str(tmp_path / "zh.parquet"))
    (tmp_path / "ov.yaml").write_text(f"model:\n  overrides: {{{override}}}\n")
    t = time.monotonic()
    res = CliRunner().invoke(cli, ["pretrain", "--preset", "debug", "--config", str(tmp_path / "ov.yaml"), "--data",
                                   corpus, "--tokenizer", str(chinese_vocab_path()), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 1 and time.monotonic() - t < 20
    assert re.search(rf"^Error: model\.overrides: BertConfig\.{said}", res.output), res.output
    assert not (tmp_path / "run").exists()


def test_a_run_dir_or_vocab_out_inside_the_data_is_refused(tmp_path):
    """Held out from issue #34: `pretrain --data D --run-dir D/run` (and finetune's, and `vocab --out
    D/tok`) worked once; then every job reading D (the run's own resume included) found the run's
    config.json, metrics.jsonl and tokenizer.json as JSON Lines data, and failed."""
    from click.testing import CliRunner

    from jobs.cli import cli
    from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
    from pipelines.training.pretrain_data import write_corpus

    d = tmp_path / "D"
    write_corpus(peoples_daily_sentences()[:200], str(d / "zh.parquet"))
    (tmp_path / "cls.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    vocab = str(chinese_vocab_path())
    for args, where in (
            (["pretrain", "--preset", "debug", "--data", str(d), "--tokenizer", vocab, "--run-dir", str(d / "run")], d / "run"),
            (["pretrain", "--preset", "debug", "--data", f"{d}/*.parquet", "--tokenizer", vocab, "--run-dir", str(d / "r2")],
             d / "r2"),
            (["finetune", "--preset", "debug", "--data", str(tmp_path / "cls.csv"), "--val-data", str(d), "--tokenizer",
              vocab, "--run-dir", str(d / "ft")], d / "ft"),
            (["vocab", "--data", str(d), "--out", str(d / "tok")], d / "tok")):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1, res.output
        assert re.search(rf"^Error: --(run-dir|out) {where} lies inside the data {d}", res.output), res.output
        assert not where.exists()


def test_a_home_path_in_a_config_file_is_the_home_directory(tmp_path, monkeypatch):
    """Held out from issue #34: `output: ~/emb` in a YAML config scored into a directory literally
    named `~` under the working dir (a later `rm -rf ~` of it is a hazard)."""
    from jobs.config import load_config
    from jobs.pretrain import PretrainConfig
    from pipelines.scoring.config import ScoreConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "s.yaml").write_text("input: ~/in.parquet\noutput: ~/emb\nmodel: '~/m'\ntext_column: '~x'\n")
    cfg = load_config(ScoreConfig, tmp_path / "s.yaml")
    assert (cfg.input, cfg.output, cfg.model, cfg.text_column) == (
        str(tmp_path / "home" / "in.parquet"), str(tmp_path / "home" / "emb"), str(tmp_path / "home" / "m"), "~x")
    (tmp_path / "p.yaml").write_text("data:\n  paths: [~/corpus, /abs]\nrun_dir: ~/runs/zh\n")
    p = load_config(PretrainConfig, tmp_path / "p.yaml")
    assert p.data.paths == [str(tmp_path / "home" / "corpus"), "/abs"] and p.run_dir == str(tmp_path / "home" / "runs" / "zh")


# --------------------------------------------------------------------------------------------
# One config system: a flag, --set and the YAML key are refused (and accepted) alike
# --------------------------------------------------------------------------------------------

def _sections(job: str) -> dict:
    from bert_core.masking_config import MaskingConfig
    from pipelines.training.config import FinetuneOptions, ModelConfig, ScalingConfig, TrainConfig
    from pipelines.training.finetune_data import FinetuneData
    from pipelines.training.pretrain_data import DataConfig

    if job == "pretrain":
        return {"train": TrainConfig, "model": ModelConfig, "scaling": ScalingConfig, "data": DataConfig,
                "data.masking": MaskingConfig}
    return {"train": TrainConfig, "model": ModelConfig, "scaling": ScalingConfig, "data": FinetuneData,
            "options": FinetuneOptions, "masking": MaskingConfig}


# The settings each command has a flag for (a flag of its own, or a shared training flag).
SETTING_FLAGS = {
    "pretrain": {"train.max_steps": "--max-steps", "train.steps_per_run": "--max-steps-per-run",
                 "train.total_time_budget_s": "--total-time-budget", "time_budget": "--time-budget",
                 "data.seq_len": "--seq-len"},
    "finetune": {"options.epochs": "--epochs", "data.max_length": "--max-length", "options.patience": "--patience"},
}
for _job in SETTING_FLAGS:
    SETTING_FLAGS[_job].update({"scaling.num_workers": "--num-workers", "train.zero_stage": "--zero-stage",
                                "train.lr": "--lr", "train.warmup_steps": "--warmup-steps",
                                "train.micro_batch_size": "--micro-batch-size", "train.seed": "--seed"})


def _bad_value(rule):
    """A value the rule refuses, written the same by YAML, --set and a flag (-1, not -1.0)."""
    from pipelines.settings import Choice, Range

    if isinstance(rule, Choice):
        return max(o for o in rule.options if isinstance(o, int)) + 1
    assert isinstance(rule, Range)
    if rule.lo is None:
        return 1.5 if rule.integer else float("nan")
    return int(rule.lo) - 1 if rule.integer else rule.lo - 1.5


def _numeric_settings():
    from jobs.finetune import FinetuneConfig
    from jobs.pretrain import PretrainConfig
    from pipelines.settings import rules_of

    out = []
    for job, top in (("pretrain", PretrainConfig), ("finetune", FinetuneConfig)):
        for prefix, cls in [("", top), *_sections(job).items()]:
            for name in _numeric_fields(cls):
                out.append((job, f"{prefix}.{name}" if prefix else name, rules_of(cls)[name]))
    return out


NUMERIC = _numeric_settings()


@pytest.mark.parametrize("job,key,rule", NUMERIC, ids=[f"{j}-{k}" for j, k, _ in NUMERIC])
def test_every_numeric_training_setting_is_refused_alike_by_flag_set_and_yaml(files, tmp_path, no_ray, job, key, rule):
    """The same `Error:` line, but for the source it names, before Ray starts, nothing written."""
    run_dir = tmp_path / "run"
    base = _base(job, files, run_dir)
    from jobs.config import nested

    bad = _bad_value(rule)
    text = "nan" if bad != bad else str(bad)
    lines = {"yaml": _refused(base + ["--config", _yaml(tmp_path, nested({key: bad}))], f"{key} must be "),
             "set": _refused(base + ["--set", f"{key}={text}"], f"{key} must be ")}
    flag = SETTING_FLAGS[job].get(key)
    if flag:
        lines["flag"] = _refused(base + [flag, text], f"{key} must be ")
    sources = {"yaml": r"Error: \S+\.yaml: ", "set": re.escape(f"Error: --set {key}={text}: "),
               "flag": re.escape(f"Error: {flag}: ")}
    said = {how: re.sub("^" + sources[how], "", line) for how, line in lines.items()}
    assert all(re.match(sources[how], line) for how, line in lines.items()), lines
    assert len(set(said.values())) == 1, said
    assert not run_dir.exists()


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_a_flag_set_and_yaml_give_the_same_config(tmp_path, job):
    """Accepted alike too: every flagged setting, given a valid value by flag, by --set or by the
    file, builds the same config."""
    from jobs import finetune, pretrain
    from jobs.config import nested

    module = pretrain if job == "pretrain" else finetune
    values = {"train.lr": 0.003, "train.warmup_steps": 7, "train.micro_batch_size": 4, "train.seed": 11,
              "scaling.num_workers": 1, "train.zero_stage": 2}
    values.update({"train.max_steps": 50, "data.seq_len": 96, "time_budget": 120.0}
                  if job == "pretrain" else {"options.epochs": 1.5, "data.max_length": 48, "options.patience": 3})
    by_flag = module.build_config("debug", None, values)
    by_set = module.build_config("debug", None, {}, sets=[f"{k}={v}" for k, v in values.items()])
    by_yaml = module.build_config("debug", _yaml(tmp_path, nested(values)), {})
    assert dataclasses.asdict(by_flag) == dataclasses.asdict(by_set) == dataclasses.asdict(by_yaml)
    assert by_flag.train.lr == 0.003 and by_flag.train.warmup_steps == 7


def test_set_reaches_any_key_and_is_refused_when_malformed(files, tmp_path, no_ray):
    from jobs.pretrain import build_config

    cfg = build_config("debug", None, {"train.lr": 0.5}, sets=["train.lr=0.25", "data.masking.mlm_probability=0.2",
                                                                "train.betas=[0.9, 0.98]", "model.overrides.hidden_size=32"])
    assert cfg.train.lr == 0.25 and cfg.data.masking.mlm_probability == 0.2 and cfg.train.betas == [0.9, 0.98]
    assert cfg.model.overrides == {"hidden_size": 32}
    base = _base("pretrain", files, tmp_path / "run")
    _refused(base + ["--set", "train.lr"], "--set 'train.lr': write --set section.key=value")
    _refused(base + ["--set", "train.lrr=1"], "--set train.lrr=1: unknown key(s) ['train.lrr']")


# --------------------------------------------------------------------------------------------
# User errors are their own type
# --------------------------------------------------------------------------------------------

def test_only_user_errors_are_one_line_a_library_or_internal_error_keeps_its_traceback(files, tmp_path, no_ray,
                                                                                        monkeypatch):
    """`pipelines.UserError` is the one channel for one-line errors: an ArrowInvalid or a bare
    ValueError from inside the job (a bug, or a library's error no boundary translated) is not
    dressed up as the user's mistake."""
    import pyarrow

    import jobs.pretrain
    from pipelines import MissingPath, PathInTheWay, UserError

    base = _base("pretrain", files, tmp_path / "run")
    for internal in (pyarrow.ArrowInvalid("bad cast in our own code"), ValueError("an internal invariant")):
        def boom(*args, error=internal, **kwargs):
            raise error
        monkeypatch.setattr(jobs.pretrain, "check_inputs", boom)
        res = CliRunner().invoke(cli, base)
        assert res.exception is internal and not any(line.startswith("Error:") for line in res.output.splitlines())

    def refuse(*args, **kwargs):
        raise UserError("data.paths: something the user must fix")
    monkeypatch.setattr(jobs.pretrain, "check_inputs", refuse)
    assert _refused(base, "something the user must fix") == "Error: data.paths: something the user must fix"
    assert issubclass(MissingPath, FileNotFoundError) and issubclass(PathInTheWay, FileExistsError)
    assert issubclass(UserError, ValueError)  # callers catching ValueError still do


def test_bert_cores_words_about_a_bad_checkpoint_become_a_user_error_naming_the_setting(files, tmp_path, no_ray):
    """The known boundary: bert_core can't load `--init-from` (no config.json) -> one line naming init_from."""
    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    (bad / "weights.txt").write_text("x")
    line = _refused(_base("finetune", files, tmp_path / "run") + ["--init-from", str(bad)], "init_from: ",
                    "not a checkpoint directory")
    assert str(bad) in line


def test_a_config_built_in_code_runs_as_it_was_checked(tmp_path):
    """settings.check writes what it read back into the config: a "1e-4" is the number, a
    pathlib.Path a string, a tuple of inputs a list, numpy's integers ints; and -1 (Ray's "without
    limit") stays a valid retry count."""
    import numpy as np

    from jobs.pretrain import preset_config
    from pipelines.scoring.config import ResourceConfig, ScoreConfig
    from pipelines.settings import check

    cfg = preset_config("debug")
    cfg.train.lr, cfg.train.zero_stage, cfg.scaling.use_gpu = "1e-4", "2", "false"
    check(cfg)
    assert (cfg.train.lr, cfg.train.zero_stage, cfg.scaling.use_gpu) == (1e-4, 2, False)
    score = ScoreConfig(input=(tmp_path / "a.parquet", str(tmp_path / "b.parquet")), output=tmp_path / "o",
                        model=tmp_path / "m", max_length=np.int64(128), resources=ResourceConfig(max_restarts=-1))
    score.check()
    assert score.input == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert score.output == str(tmp_path / "o") and score.max_length == 128 and type(score.max_length) is int


def test_sources_are_applied_in_order_and_named_right(files, tmp_path, no_ray):
    from jobs.finetune import build_config as finetune_config
    from jobs.pretrain import build_config

    # --set model.preset chooses the whole preset, as --preset and the file's model.preset do.
    cfg = build_config(None, None, {}, sets=["model.preset=debug"])
    assert (cfg.model.preset, cfg.train.max_steps, cfg.train.lr) == ("debug", 20, 2e-3)
    # A flag's mapping replaces the file's (a sweep of lr, not lr x seed); --set merges into it.
    path = _yaml(tmp_path, {"sweep": {"seed": [0, 1]}})
    assert finetune_config(None, path, {"sweep": {"lr": [1e-5, 2e-5]}}).sweep == {"lr": [1e-5, 2e-5]}
    assert set(finetune_config(None, path, {}, sets=["sweep.lr=[1e-5, 2e-5]"]).sweep) == {"seed", "lr"}
    # A dotted key in a file is a key of its own: refused, never silently dropped.
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['train.lr'\]"):
        build_config("debug", _yaml(tmp_path, {"train.lr": 0.1}), {})
    # A rule over two fields names where each was set.
    masking = _yaml(tmp_path, {"data": {"masking": {"mask_replace_prob": 0.95}}})
    with pytest.raises(ValueError, match=re.escape(f"{masking} and --set data.masking.random_replace_prob=0.1: ")):
        build_config("debug", masking, {}, sets=["data.masking.whole_word=true", "data.masking.random_replace_prob=0.1"])
    res = CliRunner().invoke(cli, ["score", "in.parquet", str(tmp_path / "o"), "--model", "m", "--task", "tag",
                                   "--text-pair-column", "b", "--print-config"])
    assert res.exit_code == 1 and "Error: --task and --text-pair-column: text_pair_column: task tag" in res.output
    # A config file that isn't UTF-8 is one line naming it.
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  preset: debug  # r\xe9sum\xe9\n".encode("latin-1"))
    _refused(_base("pretrain", files, tmp_path / "run") + ["--config", str(bad)], f"config file {bad} is not UTF-8")
