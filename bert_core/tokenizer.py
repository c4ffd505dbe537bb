"""Tokenizers: load a fast BERT tokenizer, or train a new WordPiece vocab.

Contract:
- `load_tokenizer(path)` accepts a checkpoint directory (tokenizer.json / tokenizer_config.json /
  vocab.txt) or a bare `vocab.txt`, and returns a Rust-backed `transformers` tokenizer whose
  vocabulary size is checked against the file (transformers 5 silently builds a 5-token vocab
  from `BertTokenizerFast(vocab_file=...)`; we pass the vocab positionally and assert).
- `train_tokenizer(texts, vocab_size)` trains BERT-style WordPiece with the `tokenizers` library.
  CJK characters are isolated by BERT's normalizer, so Chinese text becomes one piece per
  character, as in Google's Chinese BERT. Special tokens come first: [PAD]=0, [UNK], [CLS],
  [SEP], [MASK].
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _count_vocab_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n"))


def _from_vocab_file(vocab: Path, lowercase: Optional[bool]):
    from transformers import BertTokenizerFast

    # Positional, not vocab_file=: see the module docstring.
    tok = BertTokenizerFast(str(vocab), do_lower_case=True if lowercase is None else lowercase)
    expected = _count_vocab_lines(vocab)
    if len(tok) < expected:
        raise RuntimeError(f"tokenizer from {vocab} has {len(tok)} tokens but the file lists {expected}")
    return tok


def load_tokenizer(path_or_vocab: str | Path, lowercase: Optional[bool] = None):
    """A fast tokenizer from a checkpoint directory or a `vocab.txt` file. One that holds nothing but
    special tokens (a directory with only tokenizer_config.json loads so) is an error."""
    tok = _load_tokenizer(Path(path_or_vocab), lowercase)
    if len(tok) <= len(SPECIAL_TOKENS):
        raise ValueError(f"{path_or_vocab}: the tokenizer has only {len(tok)} tokens (special tokens, no "
                         f"vocabulary); give a directory with tokenizer.json or vocab.txt, or a vocab.txt")
    return tok


def _load_tokenizer(path: Path, lowercase: Optional[bool]):
    if path.is_file():
        if path.suffix != ".txt":
            raise ValueError(f"{path}: expected a WordPiece vocab.txt or a checkpoint directory")
        return _from_vocab_file(path, lowercase)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        kwargs = {} if lowercase is None else {"do_lower_case": lowercase}
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
        if not tok.is_fast:
            raise RuntimeError(f"{path} gave a slow tokenizer; raybert needs a fast (Rust) tokenizer")
        if (path / "vocab.txt").is_file() and len(tok) < _count_vocab_lines(path / "vocab.txt"):
            raise RuntimeError(f"tokenizer from {path} is smaller than its vocab.txt")
        return tok
    if (path / "vocab.txt").is_file():
        return _from_vocab_file(path / "vocab.txt", lowercase)
    raise FileNotFoundError(f"{path} has no tokenizer.json, tokenizer_config.json or vocab.txt")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Optional[str | Path] = None, *,
                    lowercase: bool = True, min_frequency: int = 2,
                    limit_alphabet: Optional[int] = None):
    """Train a BERT WordPiece vocab on `texts`; save it to `out_dir` if given; return the tokenizer.

    `limit_alphabet` caps the single characters kept; the default keeps up to `vocab_size` of them,
    since a Chinese corpus has thousands of distinct characters (the library's default of 1,000
    would turn the rarer ones into [UNK]).
    """
    import shutil
    import tempfile

    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                lowercase=lowercase)
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size:,} is too small: the {len(SPECIAL_TOKENS)} special tokens alone "
                         f"take {len(SPECIAL_TOKENS)}; BERT vocabs are ~20-30k (Google's Chinese BERT: 21,128)")
    normalize = wp.normalizer.normalize_str
    chars: Counter = Counter()

    def seen(texts: Iterable[str]) -> Iterable[str]:
        for text in texts:
            chars.update(normalize(text))
            yield text

    wp.train_from_iterator(seen(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                           limit_alphabet=limit_alphabet or vocab_size, special_tokens=SPECIAL_TOKENS,
                           show_progress=False)
    for blank in " \t\n\r":
        chars.pop(blank, None)
    # The trainer keeps the most frequent characters that fit; the rest of the corpus's characters
    # have no token and read as [UNK]. Refuse a vocab that leaves more than 2% of the text so
    # (a few rare characters as [UNK] is what BERT vocabs accept; tens of percent is a broken model).
    counts = sorted(chars.values(), reverse=True)
    total, kept = sum(counts), sum(counts[:min(limit_alphabet or vocab_size, vocab_size - len(SPECIAL_TOKENS))])
    if total and kept < 0.98 * total:
        enough = next(i for i, c in enumerate(itertools.accumulate(counts), 1) if c >= 0.99 * total)
        raise ValueError(f"vocab_size {vocab_size:,} is too small for this corpus: {1 - kept / total:.1%} of its "
                         f"characters (of {len(counts):,} distinct characters) would have no token and read as "
                         f"[UNK]; use at least {len(SPECIAL_TOKENS) + enough:,} (BERT vocabs are ~20-30k; "
                         f"Google's Chinese BERT: 21,128)")
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(wp.save_model(tmp)[0])
        tok = _from_vocab_file(vocab, lowercase)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(str(out))
            # transformers 5 writes only tokenizer.json; keep the plain vocab.txt as well, the
            # portable form other BERT tooling (and `load_tokenizer(vocab.txt)`) reads.
            shutil.copyfile(vocab, out / "vocab.txt")
    return tok
