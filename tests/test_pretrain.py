"""Pretraining units without Ray: packing and masking on real text, the validation split, the LR
schedule, configs and presets, CLI parsing, and errors raised before any work starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bert_core.masking import Masker, MaskingConfig
from bert_core.tokenizer import load_tokenizer
from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences
from pipelines.inputs import resolve_paths
from pipelines.training.pretrain_data import is_val, tokenize_and_pack, write_corpus
from pipelines.training.loop import LoopConfig
from pipelines.training.engine import build_bert_config, ds_config
from pipelines.training.run_plan import lr_factor
from pipelines.training.config import FaultDrill, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zh_tok():
    return load_tokenizer(chinese_vocab_path())


@pytest.fixture(scope="module")
def zh_texts():
    return peoples_daily_sentences()[:400]


def test_packed_real_batch_has_no_padding_and_masking_skips_specials(zh_tok, zh_texts):
    """Acceptance 5: packing yields no padding; masking never touches [CLS]/[SEP]/[PAD]/[UNK]."""
    seq_len = 64
    out = tokenize_and_pack({"text": np.array(zh_texts, dtype=object)}, tokenizer_path=str(chinese_vocab_path()),
                            text_column="text", seq_len=seq_len, val_fraction=0.0, split="train")
    rows = torch.from_numpy(out["input_ids"])  # (R, T)
    assert rows.ndim == 2 and rows.shape[1] == seq_len and rows.shape[0] > 50
    assert not (rows == zh_tok.pad_token_id).any(), "a packed row contains [PAD]"
    assert (rows[:, 0] == zh_tok.cls_token_id).all()
    n_sep = int((rows == zh_tok.sep_token_id).sum())
    assert n_sep >= len(zh_texts) * 0.9  # documents are joined with [SEP] (the tail of the last is dropped)
    # Nothing is lost but the tail: the rows hold every document's tokens in order.
    ids = zh_tok(zh_texts, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in doc + [zh_tok.sep_token_id]]
    body = rows[:, 1:].flatten().tolist()
    assert body == stream[: len(body)]

    masker = Masker.from_tokenizer(zh_tok, MaskingConfig())
    special = torch.tensor(sorted(set(zh_tok.all_special_ids)))
    g = torch.Generator().manual_seed(0)
    total_masked = 0
    for batch in rows.split(16):
        mb = masker(batch, generator=g)
        is_special = torch.isin(batch, special)  # (B, T)
        flat_special = is_special.flatten()
        assert not flat_special[mb.masked_index].any(), "a special token was chosen for masking"
        assert (mb.labels[is_special] == -100).all()
        assert torch.equal(mb.input_ids[is_special], batch[is_special]), "a special token was replaced"
        assert torch.equal(mb.masked_labels, batch.flatten()[mb.masked_index])
        total_masked += mb.masked_index.numel()
    maskable = int((~torch.isin(rows, special)).sum())
    assert abs(total_masked / maskable - 0.15) < 0.02


def test_val_split_is_by_document_deterministic_and_disjoint(zh_texts):
    kw = dict(tokenizer_path=str(chinese_vocab_path()), text_column="text", seq_len=32, val_fraction=0.2)
    batch = {"text": np.array(zh_texts + [None, ""], dtype=object)}  # nulls and empties are skipped
    train = tokenize_and_pack(batch, split="train", **kw)["input_ids"]
    val = tokenize_and_pack(batch, split="val", **kw)["input_ids"]
    again = tokenize_and_pack(batch, split="val", **kw)["input_ids"]
    assert np.array_equal(val, again)
    n_val = sum(is_val(t, 0.2) for t in zh_texts)
    assert 0.1 * len(zh_texts) < n_val < 0.3 * len(zh_texts)
    assert train.size and val.size and train.shape[0] > val.shape[0]


def test_lr_schedule_warmup_then_linear_or_cosine():
    assert lr_factor(0, 10, 100, "linear", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "linear", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, "linear", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "linear", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine", 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(80, 10, 100, "constant", 0.0) == 1.0
    vals = [lr_factor(s, 10, 100, "cosine", 0.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_deepspeed_config_from_train_config():
    c = ds_config(TrainConfig(micro_batch_size=8, grad_accum=4, zero_stage=3, dtype="bf16", grad_clip=0.5), 2)
    assert c["train_batch_size"] == 64 and c["gradient_accumulation_steps"] == 4
    assert c["zero_optimization"]["stage"] == 3 and c["bf16"]["enabled"] and c["gradient_clipping"] == 0.5
    assert "fp16" not in c and "optimizer" not in c  # client torch AdamW: nothing to JIT-compile
    from pipelines.settings import check

    with pytest.raises(ValueError, match="train: dtype must be one of fp32, bf16, fp16, got 'fp8'"):
        check(TrainConfig(dtype="fp8"), "train")
    with pytest.raises(ValueError, match="train: zero_stage must be one of 0, 1, 2, 3, got 4"):
        check(TrainConfig(zero_stage=4), "train")


def test_deepspeed_json_merges_over_ours_and_may_not_contradict_it():
    extra = {"zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}},
             "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 8, "communication_data_type": "fp32"}
    c = ds_config(TrainConfig(micro_batch_size=8, zero_stage=2, dtype="bf16", deepspeed=extra), 2)
    assert c["zero_optimization"] == {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}}
    assert c["communication_data_type"] == "fp32" and c["bf16"] == {"enabled": True} and "fp16" not in c
    assert c["train_batch_size"] == 16 and c["gradient_clipping"] == 1.0  # ours, untouched
    fp32 = ds_config(TrainConfig(deepspeed={"bf16": {"enabled": False}}), 1)
    assert "bf16" not in fp32 and "fp16" not in fp32
    for bad, needle in [({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3 contradicts raybert's 2"),
                        ({"train_batch_size": 99}, "train.micro_batch_size x train.grad_accum"),
                        ({"bf16": {"enabled": True}}, "bf16.enabled = True contradicts raybert's False, which comes from train.dtype"),
                        ({"optimizer": {"type": "Adam"}}, "'optimizer' is not accepted"),
                        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is not accepted")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            ds_config(TrainConfig(zero_stage=2, deepspeed=bad), 2)


def test_model_config_takes_tokenizer_vocab():
    cfg = build_bert_config(ModelConfig(preset="debug", overrides={"hidden_dropout_prob": 0.0}), 21128)
    assert cfg.vocab_size == 21128 and cfg.hidden_size == 64 and cfg.hidden_dropout_prob == 0.0


def test_train_dropout_trains_without_dropout_and_exports_the_configs(tmp_path):
    """#22 item 1: `model.train_dropout` sets every dropout of the MLM model (hidden, attention
    probabilities, head) while pretraining; the config, and so an export, keeps its own value for
    fine-tuning. Out-of-range values (and a bad validation masking rate) fail the driver's checks."""
    from bert_core.model import BertSelfAttention
    from jobs.pretrain import preset_config, validate
    from pipelines.training.loop import build_mlm_model

    config = build_bert_config(ModelConfig(preset="debug"), 100)
    model = build_mlm_model(ModelConfig(preset="debug", train_dropout=0.0), config)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    attn = [m.dropout_p for m in model.modules() if isinstance(m, BertSelfAttention)]
    assert drops and attn and set(drops) == {0.0} and set(attn) == {0.0}
    assert config.hidden_dropout_prob == 0.1 and config.attention_probs_dropout_prob == 0.1
    plain = build_mlm_model(ModelConfig(preset="debug"), config)
    assert {m.p for m in plain.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    for field, value, words in (("model.train_dropout", 1.0, "train_dropout must be in [0, 1)"),
                                ("data.eval_mlm_probability", 0.0, "eval_mlm_probability must be in (0, 1)"),
                                ("train.total_time_budget_s", -5.0, "config: train.total_time_budget_s must be > 0 (seconds) (or unset), got -5"),
                                ("train.total_time_budget_s", float("inf"), "must be a finite number > 0 (seconds) (or unset), got inf")):
        cfg = preset_config("debug")
        cfg.run_dir, cfg.data.paths = str(tmp_path / "run"), [str(tmp_path)]
        section, name = field.split(".")
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ValueError, match=re.escape(words)):
            validate(cfg)


def test_a_worker_gets_the_typed_loop_config_itself():
    """Ray Train's train_loop_config holds the LoopConfig object (pickled as it is), never a dict a
    worker decodes again; its record for config.json is plain data."""
    import cloudpickle

    from pipelines.training.loop import as_loop_config
    from pipelines.training.pretrain_data import DataConfig

    cfg = LoopConfig(run_dir="/r", tokenizer="/t", data=DataConfig(paths=["/x"], masking=MaskingConfig(whole_word=True)),
                     train=TrainConfig(zero_stage=2, stall_timeout_s=30.0), torch_threads=3,
                     fault=FaultDrill(kill_rank=1, kill_at_step=5))
    again = cloudpickle.loads(cloudpickle.dumps(as_loop_config(cfg)))["loop"]
    assert again == cfg and isinstance(again.data.masking, MaskingConfig) and again.fault.kill_at_step == 5
    assert json.loads(json.dumps(cfg.to_dict()))["data"]["masking"]["whole_word"] is True


def test_presets_yaml_and_flags_layer_in_order(tmp_path):
    from jobs.pretrain import PRESETS, build_config

    for name in PRESETS:
        assert build_config(name, None, {}).model.preset == name
    cfg = build_config("debug", str(REPO / "configs" / "pretrain_debug.yaml"),
                       {"train.zero_stage": 3, "data.paths": ["a.parquet"], "train.dtype": None})
    assert cfg.model.preset == "debug" and cfg.train.zero_stage == 3 and cfg.train.dtype == "fp32"
    assert cfg.data.seq_len == 64 and cfg.data.paths == ["a.parquet"]
    mini = build_config(None, str(REPO / "configs" / "pretrain_mini_zh.yaml"), {})
    assert mini.model.preset == "mini" and mini.train.dtype == "bf16" and mini.train.time_budget_s == 1800
    # The small-budget recipe (#22, #35): in the CPU config, and in the mini/small presets; base as BERT.
    assert (mini.model.init, mini.model.train_dropout, mini.data.masking.mlm_probability,
            mini.train.micro_batch_size, mini.scaling.num_workers) == ("neighbour", 0.0, 0.3, 32, 1)
    for name, recipe in (("mini", ("neighbour", 0.0, 0.3)), ("small", ("neighbour", 0.0, 0.3)),
                         ("base", ("bert", None, 0.15)), ("debug", ("bert", None, 0.15))):
        c = build_config(name, None, {})
        assert (c.model.init, c.model.train_dropout, c.data.masking.mlm_probability) == recipe, name
        assert c.data.eval_mlm_probability == 0.15
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="max_stepz"):
        build_config(None, str(bad), {})


def test_fp16_on_cpu_fails_before_any_work(tmp_path):
    import ray

    from jobs.pretrain import main, preset_config

    cfg = preset_config("debug")
    cfg.run_dir = str(tmp_path / "run")
    cfg.data.paths = [str(tmp_path)]
    cfg.train.dtype = "fp16"
    if ray.is_initialized():  # an earlier test's shared Ray: this test checks that the job starts none
        ray.shutdown()
    with pytest.raises(ValueError, match="fp16 needs GPUs"):
        main(cfg)
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path):
    from jobs.pretrain import main, preset_config

    (tmp_path / "run" / "checkpoint_00000010").mkdir(parents=True)
    cfg = preset_config("debug")
    cfg.run_dir = str(tmp_path / "run")
    cfg.data.paths = [str(tmp_path)]
    cfg.data.tokenizer = str(chinese_vocab_path())
    cfg.resume = "never"
    with pytest.raises(FileExistsError, match="resume auto"):
        main(cfg)


def test_missing_data_and_tokenizer_are_clear_errors(tmp_path):
    from jobs.pretrain import main, preset_config

    cfg = preset_config("debug")
    cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="--data"):
        main(cfg)
    (tmp_path / "data").mkdir()
    cfg.data.paths = [str(tmp_path / "data")]
    with pytest.raises(ValueError, match="raybert vocab"):
        main(cfg)
    with pytest.raises(FileNotFoundError):
        resolve_paths([str(tmp_path / "nope*.parquet")])


def test_cli_pretrain_parses_the_issue_flags(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import jobs.pretrain as jp
    from jobs.cli import cli

    seen = {}

    def fake_main(cfg):
        seen["cfg"] = cfg
        return jp.PretrainResult(run_dir=cfg.run_dir, checkpoint=None, export=None, metrics={})

    monkeypatch.setattr(jp, "main", fake_main)
    args = ["pretrain", "--data", "a.parquet", "--data", "dir/", "--run-dir", str(tmp_path / "r"),
            "--config", str(REPO / "configs" / "pretrain_debug.yaml"), "--preset", "debug",
            "--tokenizer", "vocab.txt", "--max-steps", "7", "--zero-stage", "2", "--num-workers", "1",
            "--dtype", "bf16", "--resume", "never", "--address", "auto", "--total-time-budget", "3600"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.data.paths == ["a.parquet", "dir/"] and cfg.train.max_steps == 7 and cfg.train.zero_stage == 2
    assert cfg.scaling.num_workers == 1 and cfg.train.dtype == "bf16" and cfg.resume == "never"
    assert cfg.address == "auto" and cfg.data.tokenizer == "vocab.txt" and cfg.scaling.use_gpu is None
    assert cfg.train.total_time_budget_s == 3600
    res = CliRunner().invoke(cli, ["pretrain", "--run-dir", "x", "--use-gpu", "--data", "a"])
    assert res.exit_code == 0 and seen["cfg"].scaling.use_gpu is True
    res = CliRunner().invoke(cli, ["pretrain", "--run-dir", "x", "--cpu", "--data", "a"])
    assert res.exit_code == 0 and seen["cfg"].scaling.use_gpu is False
    monkeypatch.undo()
    res = CliRunner().invoke(cli, ["pretrain", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path),
                                   "--preset", "debug", "--dtype", "fp16"])
    assert res.exit_code == 1 and "fp16 needs GPUs" in res.output and "Traceback" not in res.output


def test_cli_vocab_trains_a_tokenizer_that_pretrain_accepts(tmp_path, zh_texts):
    from click.testing import CliRunner

    from jobs.cli import cli

    write_corpus(zh_texts, str(tmp_path / "corpus"), rows_per_file=150)
    res = CliRunner().invoke(cli, ["vocab", "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "tok"),
                                   "--vocab-size", "1500"])
    assert res.exit_code == 0, res.output
    tok = load_tokenizer(tmp_path / "tok")
    # The WordPiece trainer keeps the whole alphabet, which can overshoot vocab_size a little.
    assert 300 < len(tok) <= 1700 and tok.convert_tokens_to_ids("[MASK]") == 4
    ids = tok(zh_texts[0])["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    all_ids = [i for t in zh_texts[:100] for i in tok(t, add_special_tokens=False)["input_ids"]]
    assert all_ids.count(tok.unk_token_id) / len(all_ids) < 0.05


def test_engine_in_one_process_accumulates_clips_and_checkpoints_activations():
    """build_engine without Ray (world size 1, gloo): ZeRO-0, grad accumulation 2 (one optimizer
    step per 2 micro-batches, the LR schedule stepping with it), activation checkpointing on."""
    from bert_core.model import preset
    from pipelines.training.loop import build_mlm_model
    from pipelines.training.engine import build_engine

    from conftest import one_process_group

    with one_process_group(29561):
        torch.manual_seed(0)
        mc = ModelConfig(preset="debug", activation_checkpointing=True)
        model = build_mlm_model(mc, preset("debug", vocab_size=128))
        assert model.bert.encoder.gradient_checkpointing
        tc = TrainConfig(max_steps=10, micro_batch_size=4, grad_accum=2, zero_stage=0, lr=1e-3, warmup_steps=4)
        engine = build_engine(model, tc, 1)
        masker = Masker(128, 4, [0, 1, 2, 3, 4])
        g = torch.Generator().manual_seed(0)
        lrs = []
        for i in range(6):
            mb = masker(torch.randint(5, 128, (4, 16), generator=g), generator=g)
            logits = engine(mb.input_ids, masked_index=mb.masked_index)
            loss = torch.nn.functional.cross_entropy(logits.float(), mb.masked_labels)
            engine.backward(loss)
            engine.step()
            lrs.append(engine.get_lr()[0])
        assert engine.global_steps == 3
        assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.5e-3, 0.75e-3, 0.75e-3, 1e-3])
        engine.destroy()


def test_cli_vocab_says_when_the_corpus_gives_fewer_tokens_than_asked(tmp_path, zh_texts):
    """--vocab-size 21128 on a few hundred reviews gives far fewer tokens: said on stderr, while
    stdout stays the one JSON line."""
    import json

    from click.testing import CliRunner

    from jobs.cli import cli

    write_corpus(zh_texts[:200], str(tmp_path / "corpus"), rows_per_file=200)
    res = CliRunner().invoke(cli, ["vocab", "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "tok")])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["vocab_size"]
    assert got < 21128 and f"the vocab has {got:,} tokens, fewer than --vocab-size 21,128" in res.stderr


def test_training_commands_print_only_their_json_result_on_stdout(tmp_path, monkeypatch):
    """What a run prints (its own progress, a library's print, Ray's forwarded worker lines) goes to
    stderr; stdout parses as the JSON result (`raybert pretrain ... | jq`)."""
    import json

    from click.testing import CliRunner

    import jobs.finetune as jf
    import jobs.pretrain as jp
    from jobs.cli import cli

    def noisy(result):
        def main(cfg):
            print("Setting accelerator to CPU.")  # as a library would
            return result(cfg)
        return main

    monkeypatch.setattr(jp, "main", noisy(lambda cfg: jp.PretrainResult(run_dir=cfg.run_dir, checkpoint="c",
                                                                         export="e", metrics={"step": 2})))
    monkeypatch.setattr(jf, "main", noisy(lambda cfg: jf.FinetuneResult(run_dir=cfg.run_dir, export="e", metrics={},
                                                                         labels={}, max_steps=1)))
    for args in (["pretrain", "--data", "a.parquet", "--run-dir", str(tmp_path / "p")],
                 ["finetune", "--data", "a.parquet", "--run-dir", str(tmp_path / "f")]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["export"] == "e" and "Setting accelerator to CPU." in res.stderr


def test_a_preset_chooses_model_and_training_wherever_it_is_named(tmp_path):
    """defaults < preset < file < flags: a YAML-only `model.preset: debug` gives the debug model with
    the debug training settings, and `--preset debug` over a YAML `model.preset: mini` gives debug
    for both, while the file's other keys still apply over the preset."""
    import yaml
    from click.testing import CliRunner

    from jobs.cli import cli
    from jobs.pretrain import PRESETS

    debug, mini = PRESETS["debug"](), PRESETS["mini"]()
    assert debug.train.max_steps != mini.train.max_steps and debug.train.lr != mini.train.lr

    def shown(*args):
        res = CliRunner().invoke(cli, ["pretrain", "--data", "a.parquet", *args, "--print-config"])
        assert res.exit_code == 0, res.output
        return yaml.safe_load(res.output)

    (tmp_path / "debug.yaml").write_text("model:\n  preset: debug\ntrain:\n  lr: 0.005\n")
    got = shown("--config", str(tmp_path / "debug.yaml"))
    assert got["model"]["preset"] == "debug" and got["train"]["max_steps"] == debug.train.max_steps
    assert got["data"]["seq_len"] == debug.data.seq_len and got["train"]["lr"] == 0.005  # the file over the preset
    (tmp_path / "mini.yaml").write_text("model:\n  preset: mini\ntrain:\n  lr: 0.005\n")
    got = shown("--config", str(tmp_path / "mini.yaml"), "--preset", "debug")
    assert got["model"]["preset"] == "debug" and got["train"]["max_steps"] == debug.train.max_steps
    assert got["train"]["lr"] == 0.005
    assert shown("--config", str(tmp_path / "mini.yaml"))["train"]["max_steps"] == mini.train.max_steps


def test_the_task_adaptive_pretraining_config_resolves_as_documented():
    """Issue #22, item 3: `configs/tapt.yaml` (the README's TAPT step) is a valid pretraining config
    whose settings are the documented ones (a tenth of pretraining's peak LR, a short warmup), and
    the user's flags still override it."""
    import yaml
    from click.testing import CliRunner

    from jobs.cli import cli
    from jobs.pretrain import PRESETS

    tapt = Path(__file__).resolve().parents[1] / "configs" / "tapt.yaml"
    res = CliRunner().invoke(cli, ["pretrain", "--config", str(tapt), "--init-from", "runs/zh/export",
                                   "--data", "reviews_train.csv", "--run-dir", "runs/zh-tapt", "--print-config"])
    assert res.exit_code == 0, res.output
    got = yaml.safe_load(res.output)
    mini = PRESETS["mini"]()
    assert got["model"]["init_from"] == "runs/zh/export" and got["data"]["paths"] == ["reviews_train.csv"]
    assert got["train"]["lr"] == pytest.approx(mini.train.lr / 10) and got["train"]["warmup_steps"] == 20
    assert got["train"]["warmup_steps"] < mini.train.warmup_steps and got["train"]["max_steps"] == 300
    res = CliRunner().invoke(cli, ["pretrain", "--config", str(tapt), "--data", "x.csv", "--max-steps", "50",
                                   "--print-config"])
    assert yaml.safe_load(res.output)["train"]["max_steps"] == 50
