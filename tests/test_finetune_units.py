"""Fine-tuning pieces without Ray: the multi-task model and its HF export, label encoding and
tokenization, the metrics, layer-wise LR decay, task mixing and step planning."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from bert_core.checkpoint import load_multitask, load_pretrained, save_pretrained, task_names
from bert_core.model import BertMultiTask, TaskHead, preset
from pipelines.training.finetune import (TaskSpec, bio_spans, classify_metrics, layerwise_param_groups,
                                mixing_probabilities, task_of_step)
from pipelines.training.finetune_data import IGNORE, TaskData, encode_labels, tokenize_labeled

SENT = {0: "neg", 1: "pos"}
NER = {0: "O", 1: "B-PER", 2: "I-PER"}


def _multitask(seed: int = 0) -> BertMultiTask:
    torch.manual_seed(seed)
    cfg = preset("debug", vocab_size=120, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertMultiTask(cfg, [TaskHead("sentiment", "classify", SENT), TaskHead("ner", "tag", NER),
                               TaskHead("mlm", "mlm")]).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_multitask_export_round_trips_and_serves_each_head(tmp_path):
    from transformers import BertForMaskedLM, BertForSequenceClassification

    model = _multitask()
    save_pretrained(model, tmp_path)
    assert task_names(tmp_path) == ["sentiment", "ner", "mlm"]
    ids, mask = _batch()
    with torch.no_grad():
        want = {t: model(t, ids, mask) for t in ("sentiment", "ner", "mlm")}
        back = load_multitask(tmp_path)
        for t in want:
            torch.testing.assert_close(back(t, ids, mask), want[t])
        # One head at a time, as `raybert score --head` loads it.
        sent = load_pretrained(tmp_path, task="sentiment")
        ner = load_pretrained(tmp_path, task="ner")
        mlm = load_pretrained(tmp_path, task="mlm")
        assert sent.head == "classify" and ner.head == "tag" and mlm.head == "mlm"
        assert ner.config.id2label == NER and sent.config.id2label == SENT
        torch.testing.assert_close(sent(ids, mask), want["sentiment"])
        torch.testing.assert_close(ner(ids, mask), want["ner"])
        torch.testing.assert_close(mlm(ids, mask), want["mlm"])
        torch.testing.assert_close(load_pretrained(tmp_path)(ids, mask), want["sentiment"])  # primary
        # transformers sees the primary head (and the MLM head) under its own keys.
        hf = BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
        assert hf.config.id2label == SENT
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, want["sentiment"],
                                   rtol=1e-5, atol=1e-5)
        hf_mlm = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
        m = mask.bool()
        torch.testing.assert_close(hf_mlm(input_ids=ids, attention_mask=mask).logits[m], want["mlm"][m],
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no task head 'pos'"):
        load_pretrained(tmp_path, task="pos")
    with pytest.raises(ValueError, match="is a tag head, not classify"):
        load_pretrained(tmp_path, head="classify", task="ner")


def test_multitask_rejects_bad_specs():
    cfg = preset("debug", vocab_size=50)
    with pytest.raises(ValueError, match="unique"):
        BertMultiTask(cfg, [TaskHead("a", "mlm"), TaskHead("a", "mlm")])
    with pytest.raises(ValueError, match="identifier"):
        TaskHead("my-task", "classify", SENT)
    with pytest.raises(ValueError, match="needs id2label"):
        TaskHead("a", "tag")


def test_bio_spans_follow_seqeval_default_reading():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 2, "PER"), (3, 4, "LOC")}
    assert bio_spans(["I-PER", "I-PER", "O"]) == {(0, 2, "PER")}  # I- after O opens a span
    assert bio_spans(["B-PER", "I-LOC"]) == {(0, 1, "PER"), (1, 2, "LOC")}  # type change splits
    assert bio_spans(["B-PER", "B-PER"]) == {(0, 1, "PER"), (1, 2, "PER")}
    assert bio_spans(["O", "O"]) == set()


def test_classify_metrics():
    # gold rows, predicted columns: 3 labels, label 2 never occurs nor is predicted.
    confusion = torch.tensor([[8, 2, 0], [4, 6, 0], [0, 0, 0]]).numpy()
    m = classify_metrics(confusion)
    assert m["accuracy"] == pytest.approx(14 / 20)
    f1_0, f1_1 = 2 * 8 / (10 + 12), 2 * 6 / (10 + 8)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)


def test_layerwise_lr_decay_scales_each_depth():
    model = _multitask()
    groups = layerwise_param_groups(model, lr=1.0, weight_decay=0.01, decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    L = model.config.num_hidden_layers  # 2
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == 0.5 ** (L + 1)
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 0.5 ** L
    assert lr_of[id(named["bert.encoder.layer.1.output.dense.weight"])] == 0.5
    assert lr_of[id(named["heads.sentiment.weight"])] == 1.0 == lr_of[id(named["bert.pooler.dense.weight"])]
    assert wd_of[id(named["bert.encoder.layer.1.output.LayerNorm.weight"])] == 0.0
    assert wd_of[id(named["heads.ner.weight"])] == 0.01
    assert sum(len(g["params"]) for g in groups) == len(named)  # tied decoder counted once


def test_label_encoding():
    assert encode_labels([1, 0, 1]) == ({0: "0", 1: "1"}, {0: 0, 1: 1})
    id2label, label2id = encode_labels(["pos", "neg", "pos"])
    assert id2label == {0: "neg", 1: "pos"} and label2id["pos"] == 1
    id2label, label2id = encode_labels([3, 7])  # not 0..K-1: ids by sorted order
    assert id2label == {0: "3", 1: "7"} and label2id[7] == 1


def _tok_path():
    from pipelines.corpora import minilm_path

    return str(minilm_path())


def test_tokenize_labeled_puts_tags_on_first_subtokens():
    task = TaskData(name="ner", kind="tag")
    batch = pa.table({"tokens": [["johnathon", "visited", "paris"]], "tags": [["B-PER", "O", "B-LOC"]],
                      "path": ["f.parquet"]})
    label2id = {"O": 0, "B-PER": 1, "B-LOC": 2}
    out = tokenize_labeled(batch, task=task, tokenizer_path=_tok_path(), label2id=label2id, max_length=16,
                           val_fraction=0.0, split_seed=0, split=None)
    labels = out["labels"][0]
    real = out["attention_mask"][0].sum()
    assert labels[0] == IGNORE and labels[real - 1] == IGNORE  # [CLS], [SEP]
    assert [int(x) for x in labels if x != IGNORE] == [1, 0, 2]  # one label per word
    assert (labels != IGNORE).sum() == 3 and real > 5  # "johnathon" is several pieces


def test_tokenize_labeled_errors_name_the_file_and_the_fix():
    task = TaskData(name="sentiment", kind="classify")
    batch = pa.table({"text": ["good", "bad"], "label": ["pos", "meh"], "path": ["a.parquet", "b.parquet"]})
    with pytest.raises(ValueError, match=r"b\.parquet: label 'meh' of task 'sentiment' is not one of"):
        tokenize_labeled(batch, task=task, tokenizer_path=_tok_path(), label2id={"pos": 1, "neg": 0},
                         max_length=8, val_fraction=0.0, split_seed=0, split=None)
    batch = pa.table({"text": [None], "label": ["pos"], "path": ["c.parquet"]})
    with pytest.raises(ValueError, match=r"c\.parquet: .* not a string"):
        tokenize_labeled(batch, task=task, tokenizer_path=_tok_path(), label2id={"pos": 1}, max_length=8,
                         val_fraction=0.0, split_seed=0, split=None)
    tag = TaskData(name="ner", kind="tag")
    batch = pa.table({"tokens": [["a", "b"]], "tags": [["O"]], "path": ["d.parquet"]})
    with pytest.raises(ValueError, match=r"d\.parquet: .* 2 words but 1 tags"):
        tokenize_labeled(batch, task=tag, tokenizer_path=_tok_path(), label2id={"O": 0}, max_length=8,
                         val_fraction=0.0, split_seed=0, split=None)


def test_task_mixing_is_seeded_and_follows_the_schedule():
    tasks = [TaskSpec("a", "classify", SENT, weight=1.0, train_rows=300),
             TaskSpec("b", "classify", SENT, weight=1.0, train_rows=100), TaskSpec("m", "mlm", weight=2.0)]
    draws = [task_of_step(s, tasks, "weights", seed=7).name for s in range(1, 4001)]
    assert draws == [task_of_step(s, tasks, "weights", seed=7).name for s in range(1, 4001)]  # same on every rank
    assert draws.count("m") / len(draws) == pytest.approx(0.5, abs=0.03)
    p = mixing_probabilities(tasks[:2], "proportional")
    assert p.tolist() == pytest.approx([0.75, 0.25])
    assert [task_of_step(s, tasks, "round_robin", 0).name for s in range(3)] == ["a", "b", "m"]


@pytest.mark.parametrize("zero_stage", [3])
def test_multitask_engine_steps_one_head_at_a_time_under_zero(zero_stage):
    """build_engine without Ray (world size 1, gloo): each step trains one head (the others get no
    gradient at all), the tied MLM decoder included, under ZeRO-3's partitioned parameters."""
    from bert_core.masking import Masker
    from pipelines.training.finetune import task_loss
    from pipelines.training.engine import build_engine
    from pipelines.training.config import TrainConfig

    from conftest import one_process_group

    with one_process_group(29562):
        model = _multitask().train()
        groups = layerwise_param_groups(model, lr=1e-3, weight_decay=0.0, decay=0.8)
        engine = build_engine(model, TrainConfig(max_steps=6, micro_batch_size=3, zero_stage=zero_stage,
                                                 lr=1e-3, warmup_steps=0), 1, param_groups=groups)
        masker = Masker(120, 4, [0, 1, 2, 3, 4])
        ids, mask = _batch()
        batches = {"sentiment": {"labels": torch.tensor([0, 1, 1])},
                   "ner": {"labels": torch.randint(0, 3, (3, 9), generator=torch.Generator().manual_seed(2))},
                   "mlm": {}}
        specs = {"sentiment": TaskSpec("sentiment", "classify", SENT), "ner": TaskSpec("ner", "tag", NER),
                 "mlm": TaskSpec("mlm", "mlm")}
        losses = []
        for step in range(6):
            name = ["sentiment", "ner", "mlm"][step % 3]
            batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                     **batches[name]}
            loss = task_loss(engine, specs[name], batch, masker, step, torch.device("cpu"))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        assert engine.global_steps == 6 and all(torch.isfinite(torch.tensor(losses)))
        assert losses[3] < losses[0] and losses[4] < losses[1]  # each head learned from its own steps
        engine.destroy()


def test_cli_finetune_flags_and_clean_errors(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import jobs.finetune as jf
    from jobs.cli import cli

    seen = {}
    monkeypatch.setattr(jf, "main", lambda cfg: seen.setdefault("cfg", cfg) and jf.FinetuneResult(
        run_dir=cfg.run_dir, export="", metrics={}, labels={}, max_steps=1))
    res = CliRunner().invoke(cli, ["finetune", "--data", "a.parquet", "--val-data", "v.parquet", "--task", "tag",
                                   "--name", "ner", "--run-dir", str(tmp_path / "r"), "--preset", "debug",
                                   "--init-from", "ckpt", "--epochs", "2", "--lr", "3e-4", "--num-workers", "2",
                                   "--dtype", "bf16", "--zero-stage", "3"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    (task,) = cfg.tasks
    assert (task.name, task.kind, task.paths, task.val_paths) == ("ner", "tag", ["a.parquet"], ["v.parquet"])
    assert cfg.options.epochs == 2 and cfg.train.lr == 3e-4 and cfg.train.zero_stage == 3
    assert cfg.model.preset == "debug" and cfg.model.init_from == "ckpt" and cfg.scaling.num_workers == 2
    monkeypatch.undo()
    res = CliRunner().invoke(cli, ["finetune", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 1 and "no task" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["finetune", "--data", "a.parquet", "--run-dir", str(tmp_path / "r"),
                                   "--init-from", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "not a checkpoint directory" in res.output


def test_cli_finetune_takes_the_columns_of_a_glue_style_file(tmp_path):
    """`--text-column sentence --label-column y` without a YAML file; without --data they are refused
    (a --config's tasks name their own columns)."""
    import yaml
    from click.testing import CliRunner

    from jobs.cli import cli

    res = CliRunner().invoke(cli, ["finetune", "--data", "glue.parquet", "--text-column", "sentence",
                                   "--label-column", "y", "--print-config"])
    assert res.exit_code == 0, res.output
    (task,) = yaml.safe_load(res.output)["tasks"]
    assert (task["text_column"], task["label_column"]) == ("sentence", "y")
    tag = yaml.safe_load(CliRunner().invoke(cli, ["finetune", "--data", "t.parquet", "--task", "tag",
                                                  "--print-config"]).output)["tasks"][0]
    assert (tag["text_column"], tag["label_column"]) == ("text", "tags")  # unset: the task kind's defaults
    res = CliRunner().invoke(cli, ["finetune", "--text-column", "sentence", "--print-config"])
    assert res.exit_code == 2 and "--text-column and --label-column go with --data" in res.output
