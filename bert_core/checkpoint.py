"""Hugging Face checkpoint I/O for our BERT.

Contract:
- `load_pretrained(path, head)` reads an HF BERT directory: `config.json` plus `model.safetensors`
  (also sharded, with `model.safetensors.index.json`), or `pytorch_model.bin` loaded with
  `torch.load(weights_only=True)` (never a full unpickle). Key prefixes are normalized whatever HF
  class wrote the file (`bert.` on task models, none on `BertModel`; `cls.` MLM head;
  `classifier.` task heads), so e.g. a `BertModel` checkpoint loads into a classifier (fresh head,
  reported) and an MLM checkpoint loads as an encoder (head ignored). `HFAdapter` is the one map
  between our keys and a file's, for saving and loading alike.
  A missing encoder weight is an error; a missing head weight is initialized fresh and reported.
- `save_pretrained(model, path, tokenizer=None)` writes `config.json` + `model.safetensors` that
  `transformers` loads into the matching class (`BertModel` for encoder/embed heads,
  `BertForMaskedLM`, `BertForSequenceClassification`, `BertForTokenClassification`), plus the
  tokenizer files if given. `id2label`/`label2id` travel in config.json.
- raybert-only settings (the embedding pooling) go under the `raybert` key of config.json, which
  transformers ignores.
- sentence-transformers exports (`modules.json`, `1_Pooling/config.json`,
  `sentence_bert_config.json`, and `tokenizer_config.json` where newer versions keep the max length)
  are honoured, old and current formats: `sentence_transformers_settings(path)` reads their
  pooling, normalization and max length, and the embed head defaults to them, so an embedding
  equals `SentenceTransformer(path).encode(text)` unless the caller overrides a setting.
- Multi-task checkpoints (`BertMultiTask`): the first classify/tag task is written under HF's own
  keys (`bert.`, `classifier.`), an mlm task under `cls.`, so `transformers` loads the primary
  task's model as usual (and reports the other heads' weights as unused). Every other head is kept
  under `raybert_heads.<task>.`, and `raybert.tasks` in config.json lists each task's kind, labels
  and key prefix. `load_pretrained(path, task=name)` serves any one head as a plain single-head
  model; `load_multitask(path)` restores them all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .model import HEADS, BertConfig, BertMultiTask, TaskHead, build_model

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "encoder": "BertModel",
    "embed": "BertModel",
    "mlm": "BertForMaskedLM",
    "classify": "BertForSequenceClassification",
    "tag": "BertForTokenClassification",
}
# HF class in config.json -> our head, used when `head` is not given.
HEAD_OF_ARCHITECTURE = {
    "BertModel": "encoder",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",
    "BertForSequenceClassification": "classify",
    "BertForTokenClassification": "tag",
}
# Keys in HF files that carry no weights of ours: buffers, the tied decoder, the NSP head.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "predictions.decoder.weight")
_IGNORED_PREFIXES = ("cls.seq_relationship.",)
_EXTRA_HEADS = "raybert_heads."  # non-primary heads of a multi-task checkpoint
_HEAD_PREFIXES = ("cls.", "classifier.", _EXTRA_HEADS)
_KIND_PREFIX = {"classify": "classifier.", "tag": "classifier.", "mlm": "cls."}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of an HF checkpoint directory, without unpickling anything."""
    path = Path(path)
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
        return sd
    if (path / "pytorch_model.bin").is_file():
        return _load_bin(path / "pytorch_model.bin")
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _load_bin(file: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` loaded weights-only. Anything else in it (code, custom classes) is
    refused with a message that names the file; we never fall back to a full unpickle."""
    try:
        import zipfile

        # mmap needs the zip format (torch >= 1.6); a legacy file is read whole.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except Exception as e:  # UnpicklingError (objects beyond tensors), RuntimeError/EOFError (not a torch file)
        import pickle

        # torch's own message advises weights_only=False (run arbitrary code): never pass that on.
        why = ("it holds Python objects other than tensors, and raybert loads weights only, never code"
               if isinstance(e, pickle.UnpicklingError) else f"not a readable PyTorch file ({type(e).__name__})")
        raise ValueError(f"{file}: {why}; re-save the weights as model.safetensors (transformers' "
                         f"save_pretrained does) in an environment you trust") from None


def check_checkpoint(path: str | Path) -> BertConfig:
    """Validate an HF BERT checkpoint directory cheaply, before any job work: config.json is a BERT
    config, and its weights file(s) exist and open (safetensors headers only; a .bin is loaded
    weights-only with mmap, so no tensor data is read). Returns the config. Raises
    FileNotFoundError or ValueError naming the path and what to do."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (it does not exist or is a file)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object")
    if raw.get("model_type", "bert") != "bert":
        raise ValueError(f"{path} is a {raw['model_type']!r} checkpoint; raybert runs BERT "
                         f"(model_type 'bert') checkpoints only")
    config = BertConfig.from_dict(raw)
    from safetensors import safe_open

    files = []
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {missing[:3]}")
    elif (path / "pytorch_model.bin").is_file():
        _load_bin(path / "pytorch_model.bin", mmap=True)
        return config
    else:
        raise FileNotFoundError(f"{path}: no weights (model.safetensors, model.safetensors.index.json or "
                                f"pytorch_model.bin); is it a complete checkpoint directory?")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if not keys:
                    raise ValueError("it holds no tensors")
                table = next((k for k in keys if k.endswith("embeddings.word_embeddings.weight")), None)
                rows = st.get_slice(table).get_shape()[0] if table else None
        except Exception as e:  # SafetensorError, OSError, ValueError
            raise ValueError(f"{f}: not a readable safetensors file ({e}); re-export the checkpoint") from None
        if rows is not None and rows != config.vocab_size:
            raise ValueError(f"{path}: config.json says vocab_size {config.vocab_size:,} but the weights' "
                             f"embedding table has {rows:,} rows; fix config.json or re-export the checkpoint")
    return config


@dataclass
class HFAdapter:
    """Our state-dict keys <-> the keys of an HF checkpoint file, for one model (torchtitan's
    `StateDictAdapter`). save_pretrained writes through `to_hf`, both loaders read through `from_hf`.

    HF files spell the encoder `bert.…` (task models) or bare (`BertModel`), the MLM head `cls.…`
    and a classifier `classifier.…`; our multi-task files keep further heads under
    `raybert_heads.<task>.`. `from_hf` accepts either encoder spelling and HF's older ones
    (LayerNorm gamma/beta, `cls.predictions.decoder.bias`), and drops buffers, the NSP head and the
    file's heads this model has no place for. The tied MLM decoder weight is never written: HF
    re-ties it on load, as `tie_weights` does here.
    """

    routes: dict[str, str]  # our key prefix -> its prefix in the file, the encoder spelled `bert.`
    bare: bool = False  # the file spells the encoder without `bert.`, as HF's BertModel does

    @classmethod
    def of(cls, model: nn.Module, tasks: Optional[list[dict]] = None) -> "HFAdapter":
        """The adapter of `model`. `tasks` (raybert.tasks entries) place a multi-task model's heads
        in the file; for a single-head model, one entry names the file head it reads (default: the
        HF place of its kind)."""
        head = _head_of(model)
        routes = {"": "bert."} if head == "encoder" else {"bert.": "bert."}
        if head == "multi":
            routes.update({f"heads.{t['name']}.": t["prefix"] for t in tasks})
        elif head in _KIND_PREFIX:  # our attribute is HF's (`cls`, `classifier`)
            routes[_KIND_PREFIX[head]] = tasks[0]["prefix"] if tasks else _KIND_PREFIX[head]
        return cls(routes, bare=head in ("encoder", "embed"))

    def to_hf(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = _move({k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}, self.routes)
        return {k.removeprefix("bert.") if self.bare else k: v for k, v in out.items()}

    def from_hf(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        canon = {}
        for k, v in sd.items():
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if not (k.endswith(_IGNORED_SUFFIXES) or k.startswith(_IGNORED_PREFIXES)):
                canon[k if k.startswith(("bert.", *_HEAD_PREFIXES)) else "bert." + k] = v
        for k in [k for k in canon if k.endswith("predictions.decoder.bias")]:  # alias of predictions.bias
            canon.setdefault(k.replace("decoder.bias", "bias"), canon.pop(k))
        return _move(canon, {hf: ours for ours, hf in self.routes.items()})


def _move(sd: dict[str, torch.Tensor], routes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Re-prefix each key by the route its prefix matches (routes don't overlap); drop the rest."""
    out = {}
    for k, v in sd.items():
        src = next((p for p in routes if k.startswith(p)), None)
        if src is not None:
            out[routes[src] + k[len(src):]] = v
    return out


def task_names(path: str | Path) -> list[str]:
    """The task heads of a multi-task checkpoint (empty for a single-head one)."""
    config = BertConfig.from_json(Path(path) / "config.json")
    return [t["name"] for t in config.extra.get("raybert", {}).get("tasks", [])]


def _load_weights(model: nn.Module, adapter: HFAdapter, path: Path, dtype: Optional[torch.dtype],
                  fresh_heads: bool) -> nn.Module:
    """`path`'s weights into `model`, in eval mode. A missing encoder weight is an error. A head
    (or pooler) weight the file lacks, or a classifier of another label count, is initialized fresh
    and reported if `fresh_heads`, else an error too. Encoder-side weights the model has no place
    for are an error, except a pooler the head doesn't use."""
    sd = adapter.from_hf(read_state_dict(path))
    own = model.state_dict()
    fresh = []
    for k in [k for k in sd if k in own and own[k].shape != sd[k].shape]:
        if not (fresh_heads and k.startswith("classifier.")):
            raise ValueError(f"{path}: weight {k} has shape {tuple(sd[k].shape)}, "
                             f"model expects {tuple(own[k].shape)}")
        fresh.append(k)
        del sd[k]
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_IGNORED_SUFFIXES)]  # never in a file: tied
    lacking = [k for k in missing if k.removeprefix("bert.").startswith(("embeddings.", "encoder."))]
    if lacking:
        raise ValueError(f"{path}: checkpoint lacks encoder weights {lacking[:5]}"
                         f"{' ...' if len(lacking) > 5 else ''}")
    if missing and not fresh_heads:
        raise ValueError(f"{path}: checkpoint lacks head weights {missing[:5]}")
    if missing or fresh:
        log.warning("%s: newly initialized (train before use): %s", path, sorted(set(missing + fresh)))
    unexpected = [k for k in result.unexpected_keys if not k.removeprefix("bert.").startswith("pooler.")]
    if unexpected:
        raise ValueError(f"{path}: unexpected weights {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# sentence-transformers' Pooling config keys -> our pooling names; the other modes are refused
# sentence-transformers' pooling names, in its current `pooling_mode` form and the legacy
# `pooling_mode_*` booleans; None: a pooling we don't reproduce.
_ST_POOLING = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": None, "weightedmean": None,
               "lasttoken": None}
_ST_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                      "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_NO_LIMIT = 1_000_000  # a tokenizer's model_max_length at or above this means "not set" (HF writes ~1e30)


@dataclass
class SentenceTransformerSettings:
    """What a sentence-transformers export says about its embeddings; None where it says nothing."""

    # sentence_bert_config.json's max_seq_length, else (sentence-transformers >= 5 writes it there)
    # the export's tokenizer_config.json model_max_length
    max_length: Optional[int] = None
    pooling: Optional[str] = None  # mean | cls | max, from the Pooling module's config.json
    normalize: Optional[bool] = None  # True iff modules.json lists a Normalize module
    pooling_error: Optional[str] = None  # a Pooling config we can't reproduce, and why
    unsupported: Optional[str] = None  # a module we don't reproduce at all (Dense), and why


def _st_pooling_modes(config: dict) -> tuple[list[str], list[str]]:
    """(the pooling modes a Pooling config.json asks for, as written; their current names), in
    either format."""
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        return modes, modes
    keys = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    return keys, [_ST_LEGACY_POOLING.get(k, k) for k in keys]


def sentence_transformers_settings(path: str | Path) -> SentenceTransformerSettings:
    """Read a sentence-transformers export in `path` (all fields None for a plain HF checkpoint):
    the formats of sentence-transformers 2.x to 6.x."""
    path = Path(path)
    out = SentenceTransformerSettings()
    pooling_dir = path / "1_Pooling"
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        types = [str(m.get("type", "")) for m in modules]
        out.normalize = any(t.endswith(".Normalize") for t in types)
        pooling_dir = next((path / m.get("path", "") for m in modules
                            if str(m.get("type", "")).endswith(".Pooling")), None)
        dense = [m.get("path") or m.get("name") for m in modules if str(m.get("type", "")).endswith(".Dense")]
        if dense:
            out.unsupported = (f"{path} is a sentence-transformers model with a Dense module ({', '.join(dense)}) after "
                               f"pooling; raybert does not reproduce it, so its embeddings would differ from "
                               f"SentenceTransformer.encode: use a model without Dense layers")
    if pooling_dir is not None and (pooling_dir / "config.json").is_file():
        pooling_file = pooling_dir / "config.json"
        modes, names = _st_pooling_modes(json.loads(pooling_file.read_text()))
        ours = [_ST_POOLING.get(m) for m in names]
        if len(modes) == 1 and ours[0] is not None:
            out.pooling = ours[0]
        else:
            out.pooling_error = (f"{pooling_file} asks for pooling {modes or 'none'}; raybert reproduces one of "
                                 f"cls, mean or max tokens. Pass pooling (mean, cls or max) to choose one")
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        n = json.loads(st_config.read_text()).get("max_seq_length")
        out.max_length = int(n) if n else None
    tok_config = path / "tokenizer_config.json"
    if out.max_length is None and modules_file.is_file() and tok_config.is_file():
        n = json.loads(tok_config.read_text()).get("model_max_length")
        out.max_length = int(n) if isinstance(n, (int, float)) and 0 < n < _NO_LIMIT else None
    return out


def load_pretrained(path: str | Path, head: Optional[str] = None, *,
                    id2label: Optional[dict[int, str]] = None, pooling: Optional[str] = None,
                    normalize: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                    task: Optional[str] = None) -> nn.Module:
    """Load an HF BERT directory into our model with `head` (encoder|mlm|classify|tag|embed).

    `head=None` picks the head from config.json's `architectures`. `id2label` sets the labels of a
    fresh classify/tag head (ignored names in the file are replaced). `pooling`/`normalize` set the
    embed head (default: the checkpoint's saved choice, else its sentence-transformers files',
    else mean + normalize). `task` picks one
    head of a multi-task checkpoint (default: its primary task, the one HF sees). The model is
    returned in eval mode.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    config = BertConfig.from_json(path / "config.json")
    meta = config.extra.get("raybert", {})
    spec = None
    if task is not None:
        tasks = {t["name"]: t for t in meta.get("tasks", [])}
        if task not in tasks:
            raise ValueError(f"{path} has no task head {task!r}; its tasks: {sorted(tasks) or 'none (single head)'}")
        spec = tasks[task]
        if head in _KIND_PREFIX and head != spec["kind"]:
            raise ValueError(f"{path}: task {task!r} is a {spec['kind']} head, not {head}")
        head = head or spec["kind"]
        if spec["kind"] != "mlm":
            config.set_labels(spec["id2label"])
    if head is None:
        arch = (config.architectures or ["BertModel"])[0]
        head = meta.get("head") or HEAD_OF_ARCHITECTURE.get(arch, "encoder")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    if id2label is not None:
        config.set_labels(id2label)
    kwargs = {}
    if head == "embed":  # the caller's choice, else ours saved in config.json, else the ST export's
        st = sentence_transformers_settings(path)
        if st.unsupported:
            raise ValueError(st.unsupported)
        pooling = pooling or meta.get("pooling")
        if pooling is None and st.pooling_error:
            raise ValueError(st.pooling_error)
        kwargs = dict(pooling=pooling or st.pooling or "mean",
                      normalize=next(v for v in (normalize, meta.get("normalize"), st.normalize, True) if v is not None))
    model = build_model(config, head, **kwargs)
    return _load_weights(model, HFAdapter.of(model, spec and [spec]), path, dtype, fresh_heads=True)


def load_multitask(path: str | Path, dtype: Optional[torch.dtype] = None) -> BertMultiTask:
    """Every head of a multi-task checkpoint written by save_pretrained, in one BertMultiTask."""
    path = Path(path)
    config = BertConfig.from_json(path / "config.json")
    specs = config.extra.get("raybert", {}).get("tasks")
    if not specs:
        raise ValueError(f"{path} is not a multi-task checkpoint (no raybert.tasks in config.json)")
    model = BertMultiTask(config, [TaskHead(t["name"], t["kind"], t.get("id2label")) for t in specs])
    return _load_weights(model, HFAdapter.of(model, specs), path, dtype, fresh_heads=False)


def _task_specs(model: BertMultiTask) -> list[dict]:
    """raybert.tasks of a multi-task checkpoint: each task's kind, labels and key prefix in the
    file. The primary task sits under HF's `classifier.`, the first mlm task under `cls.`, every
    other head under `raybert_heads.<task>.`."""
    specs, used, primary = [], set(), model.primary
    for name, t in model.tasks.items():
        prefix = _KIND_PREFIX[t.kind]
        if (t.kind != "mlm" and name != primary) or prefix in used:
            prefix = f"{_EXTRA_HEADS}{name}."
        used.add(prefix)
        specs.append({"name": name, "kind": t.kind, "prefix": prefix,
                      "id2label": {str(i): n for i, n in (t.id2label or {}).items()} or None})
    return specs


def _head_of(model: nn.Module) -> str:
    head = getattr(model, "head", None)
    if head not in ARCHITECTURES and head != "multi":
        raise TypeError(f"{type(model).__name__} is not a raybert BERT model")
    return head


def save_pretrained(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write `model` as an HF checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    head = _head_of(model)
    config = BertConfig.from_dict(model.config.to_dict())
    tasks = None
    if head == "multi":
        tasks, primary = _task_specs(model), model.primary
        head = model.tasks[primary].kind if primary else "mlm"
        if primary:
            config.set_labels(model.tasks[primary].id2label)
        meta = {"head": head, "primary": primary, "tasks": tasks}
    else:
        meta = {"head": head}
        if head == "embed":
            meta.update(pooling=model.pooling, normalize=model.normalize)
    config.architectures = [ARCHITECTURES[head]]
    config.extra["raybert"] = meta
    sd = HFAdapter.of(model, tasks).to_hf(model.state_dict())
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        config.vocab_size = max(config.vocab_size, len(tokenizer))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.to_json(path / "config.json")
    if tokenizer is not None:
        # A tokenizer built from a bare vocab.txt has model_max_length ~1e30 ("no limit"), and
        # `truncation=True` then passes texts longer than the position table, which AutoModel
        # fails on: the export says the model's limit.
        own_limit = tokenizer.model_max_length
        tokenizer.model_max_length = min(own_limit or config.max_position_embeddings, config.max_position_embeddings)
        try:
            tokenizer.save_pretrained(str(path))
        finally:
            tokenizer.model_max_length = own_limit
    return path
