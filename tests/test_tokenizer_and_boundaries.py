"""Tokenizer loading/training, config and presets, padding helpers, and the import boundaries."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bert_core import BertConfig, load_tokenizer, preset, train_tokenizer
from bert_core.padding import SequencePacker, pad_batch, repad, token_budget_batches, unpad_tokens

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def _generated_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    en_words = ("the model reads every token of a long document and writes one embedding per row "
                "while ray streams parquet blocks through tokenization into actors on many machines").split()
    zh_chars = "我们今天在北京学习中文机器模型训练数据科学研究人民日报新闻经济发展国家社会文化"
    out = []
    for i in range(n):
        if i % 2:
            out.append(" ".join(rng.choice(en_words) for _ in range(rng.randint(4, 14))).capitalize() + ".")
        else:
            out.append("".join(rng.choice(zh_chars) for _ in range(rng.randint(5, 20))) + "。")
    return out


def test_trained_tokenizer_round_trips_english_and_chinese(tmp_path):
    texts = _generated_sentences(4000)
    tok = train_tokenizer(texts, vocab_size=600, out_dir=tmp_path / "tok")
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for text in texts[:200]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        decoded = tok.decode(ids, skip_special_tokens=True)
        # BERT decoding puts spaces around CJK characters and punctuation; compare without spaces.
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    # Chinese text becomes one piece per character
    zh = texts[0]
    pieces = tok.tokenize(zh)
    assert pieces == list(zh)
    # it reloads from disk, from the directory and from the bare vocab
    again = load_tokenizer(tmp_path / "tok")
    bare = load_tokenizer(tmp_path / "tok" / "vocab.txt")
    assert again(texts[1])["input_ids"] == tok(texts[1])["input_ids"] == bare(texts[1])["input_ids"]


def test_chinese_vocab_from_a_bare_file_has_all_tokens():
    from pipelines.corpora import chinese_vocab_path

    tok = load_tokenizer(chinese_vocab_path())  # the BertTokenizerFast(vocab_file=) trap gives 5
    assert len(tok) == 21128
    assert tok.tokenize("人民日报新闻") == list("人民日报新闻")


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def test_presets_have_the_documented_sizes():
    sizes = {n: (preset(n).num_hidden_layers, preset(n).hidden_size) for n in
             ["debug", "mini", "small", "base", "large"]}
    assert sizes == {"debug": (2, 64), "mini": (4, 256), "small": (4, 512), "base": (12, 768), "large": (24, 1024)}
    assert preset("mini", vocab_size=21128).vocab_size == 21128
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_config_json_round_trip_keeps_unknown_keys(tmp_path, minilm_dir):
    cfg = BertConfig.from_json(minilm_dir / "config.json")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (384, 6, 30522)
    cfg.to_json(tmp_path / "c.json")
    import json

    a = json.loads((minilm_dir / "config.json").read_text())
    b = json.loads((tmp_path / "c.json").read_text())
    assert {k: v for k, v in a.items() if k in b} == {k: b[k] for k in a if k in b}
    assert set(a) <= set(b)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})


# --------------------------------------------------------------------------------------------
# Padding and packing
# --------------------------------------------------------------------------------------------

def test_token_budget_batches_respect_budget_and_cover_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=1000)
    lengths[7] = 5000  # longer than the budget: gets its own batch, is never dropped
    batches = token_budget_batches(lengths, max_tokens=4096, max_batch_size=64)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or len(b) * lengths[b].max() <= 4096
    assert any(len(b) == 1 and b[0] == 7 for b in batches)


def test_pad_unpad_repad_round_trip():
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    ids, mask = pad_batch(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]]
    h = torch.randn(3, 4, 2)
    packed, idx = unpad_tokens(h, torch.from_numpy(mask), int(mask.sum()))
    assert packed.shape == (8, 2) and idx.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    back = repad(packed, idx, 3, 4)
    m = torch.from_numpy(mask).bool()
    assert torch.equal(back[m], h[m]) and (back[~m] == 0).all()


def test_packer_has_no_padding_and_loses_no_token():
    packer = SequencePacker(seq_len=8, cls_id=2, sep_id=3)
    docs = [[10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [21], []]
    rows = packer.add(docs[:2])
    rows2 = packer.add(docs[2:])
    rest = packer.flush()
    allrows = np.concatenate([rows, rows2]) if len(rows2) else rows
    assert allrows.shape[1] == 8 and (allrows[:, 0] == 2).all()
    stream = [t for r in allrows for t in r[1:]] + rest
    assert stream == [10, 11, 12, 3, 13, 14, 15, 16, 17, 18, 19, 20, 3, 21, 3]


# --------------------------------------------------------------------------------------------
# Import boundaries: bert_core is pure torch; imports flow jobs -> pipelines -> bert_core
# --------------------------------------------------------------------------------------------

def test_bert_core_imports_no_ray_deepspeed_or_click():
    code = ("import sys, bert_core, bert_core.model, bert_core.checkpoint, bert_core.masking, "
            "bert_core.padding, bert_core.tokenizer\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'deepspeed', 'click', 'yaml'})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def _imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("package,forbidden", [
    ("bert_core", {"pipelines", "jobs", "ray", "deepspeed", "click", "yaml"}),
    ("pipelines", {"jobs", "click"}),
])
def test_imports_flow_one_way(package, forbidden):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & forbidden) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_help_imports_neither_torch_nor_ray():
    """`raybert --help` (and each command's --help) loads only torch-free configs: it used to
    import torch through configs kept beside torch code (1.25 s). The wall time is printed; the
    figure on a quiet 2-core machine is in the closing note of the issue that set the 0.5 s target."""
    import time

    code = ("import sys\nfrom jobs.cli import cli\n"
            "for args in (['--help'], ['score', '--help'], ['pretrain', '--help'], ['finetune', '--help'], "
            "['vocab', '--help'], ['submit', '--help']):\n"
            "    try:\n        cli(args)\n    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'deepspeed', 'transformers'})\n"
            "print('HEAVY', heavy)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    print(f"six --help screens in one process: {time.perf_counter() - t0:.2f} s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "HEAVY []" in r.stdout and "Usage: " in r.stdout, r.stdout[-2000:]


def test_modules_and_functions_stay_readable():
    """pipelines/ and jobs/: no module over 500 lines, no function over 60, and no `_private` name
    imported from another module (what a module keeps private stays in it)."""
    import ast

    too_long, private = [], []
    for f in sorted([*(ROOT / "pipelines").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]):
        src = f.read_text()
        name = str(f.relative_to(ROOT))
        if len(src.splitlines()) > 500:
            too_long.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in {"pipelines", "jobs", "bert_core"}:
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert too_long == [] and private == []


def test_pipelines_top_level_shows_the_rooms():
    """pipelines/ is grouped so the tree shows the two jobs and what they share: at most 10
    modules at its top level, the scoring and training rooms as packages."""
    top = sorted(f.name for f in (ROOT / "pipelines").glob("*.py"))
    assert len(top) <= 10, top
    for room in ("scoring", "training"):
        assert (ROOT / "pipelines" / room / "__init__.py").is_file()
        assert len(list((ROOT / "pipelines" / room).glob("*.py"))) >= 5


def test_the_repo_carries_its_license_and_a_config_that_works_from_anywhere():
    """pyproject declares Apache-2.0 and LICENSE holds its text; configs/score.yaml names no path
    relative to the repo (it was only usable from the repo root), and loads as a ScoreConfig."""
    import tomllib

    from jobs.config import load_config
    from pipelines.scoring.config import ScoreConfig

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    cfg = load_config(ScoreConfig, ROOT / "configs" / "score.yaml")
    for key in ("model", "tokenizer", "input", "output", "checkpoint_dir"):
        value = getattr(cfg, key)
        assert not value or Path(str(value)).is_absolute() or "://" in str(value), (key, value)
