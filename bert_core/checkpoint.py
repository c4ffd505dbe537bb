"""Hugging Face checkpoint I/O for our BERT.

Contract:
- `load_pretrained(path, head)` reads an HF BERT directory: `config.json` plus `model.safetensors`
  (also sharded, with `model.safetensors.index.json`), or `pytorch_model.bin` loaded with
  `torch.load(weights_only=True)` (never a full unpickle). Key prefixes are normalized whatever HF
  class wrote the file (`bert.` on task models, none on `BertModel`; `cls.` MLM head;
  `classifier.` task heads), so e.g. a `BertModel` checkpoint loads into a classifier (fresh head,
  reported) and an MLM checkpoint loads as an encoder (head ignored).
  A missing encoder weight is an error; a missing head weight is initialized fresh and reported.
- `save_pretrained(model, path, tokenizer=None)` writes `config.json` + `model.safetensors` that
  `transformers` loads into the matching class (`BertModel` for encoder/embed heads,
  `BertForMaskedLM`, `BertForSequenceClassification`, `BertForTokenClassification`), plus the
  tokenizer files if given. `id2label`/`label2id` travel in config.json.
- raybert-only settings (the embedding pooling) go under the `raybert` key of config.json, which
  transformers ignores.
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
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .model import HEADS, BertConfig, BertForEmbedding, BertMultiTask, TaskHead, build_model

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
# Keys in HF files that carry no weights of ours: buffers, tied copies, the NSP head.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
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
                if not list(st.keys()):
                    raise ValueError("it holds no tensors")
        except Exception as e:  # SafetensorError, OSError, ValueError
            raise ValueError(f"{f}: not a readable safetensors file ({e}); re-export the checkpoint") from None
    return config


def _normalize_keys(sd: dict[str, torch.Tensor], target_prefixed: bool) -> dict[str, torch.Tensor]:
    """Map HF key spellings onto our module names (prefix, legacy gamma/beta, tied copies)."""
    out: dict[str, torch.Tensor] = {}
    decoder_bias = None
    for key, value in sd.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
            continue
        if key == "cls.predictions.decoder.weight":  # tied to the word embeddings
            continue
        if key == "cls.predictions.decoder.bias":  # an alias of cls.predictions.bias
            decoder_bias = value
            continue
        is_head = key.startswith(_HEAD_PREFIXES)
        encoder_key = key[len("bert."):] if key.startswith("bert.") else key
        if target_prefixed:
            out[key if is_head else "bert." + encoder_key] = value
        elif not is_head:
            out[encoder_key] = value
    if target_prefixed and decoder_bias is not None:
        out.setdefault("cls.predictions.bias", decoder_bias)
    return out


def task_names(path: str | Path) -> list[str]:
    """The task heads of a multi-task checkpoint (empty for a single-head one)."""
    config = BertConfig.from_json(Path(path) / "config.json")
    return [t["name"] for t in config.extra.get("raybert", {}).get("tasks", [])]


def _select_task(path: Path, config: BertConfig, meta: dict, sd: dict, task: str,
                 head: Optional[str]) -> tuple[dict, str]:
    """Re-key task `task`'s head of a multi-task checkpoint to the plain single-head keys."""
    tasks = {t["name"]: t for t in meta.get("tasks", [])}
    if task not in tasks:
        raise ValueError(f"{path} has no task head {task!r}; its tasks: {sorted(tasks) or 'none (single head)'}")
    spec = tasks[task]
    if head is None:
        head = spec["kind"]
    if head in ("classify", "tag", "mlm") and head != spec["kind"]:
        raise ValueError(f"{path}: task {task!r} is a {spec['kind']} head, not {head}")
    if spec["kind"] != "mlm":
        config.id2label = {int(k): str(v) for k, v in spec["id2label"].items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    target, prefix = _KIND_PREFIX[spec["kind"]], spec["prefix"]
    if prefix != target:  # drop the primary's head of that kind, then move ours into its place
        sd = {k: v for k, v in sd.items() if not k.startswith(target)}
        sd = {(target + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd, head


def load_pretrained(path: str | Path, head: Optional[str] = None, *,
                    id2label: Optional[dict[int, str]] = None, pooling: Optional[str] = None,
                    normalize: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                    task: Optional[str] = None) -> nn.Module:
    """Load an HF BERT directory into our model with `head` (encoder|mlm|classify|tag|embed).

    `head=None` picks the head from config.json's `architectures`. `id2label` sets the labels of a
    fresh classify/tag head (ignored names in the file are replaced). `pooling`/`normalize` set the
    embed head (default: the checkpoint's saved choice, else mean + normalize). `task` picks one
    head of a multi-task checkpoint (default: its primary task, the one HF sees). The model is
    returned in eval mode.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    config = BertConfig.from_json(path / "config.json")
    meta = config.extra.get("raybert", {})
    raw = read_state_dict(path)
    if task is not None:
        raw, head = _select_task(path, config, meta, raw, task, head)
    if head is None:
        arch = (config.architectures or ["BertModel"])[0]
        head = meta.get("head") or HEAD_OF_ARCHITECTURE.get(arch, "encoder")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    if id2label is not None:
        config.id2label = {int(k): str(v) for k, v in id2label.items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    kwargs = {}
    if head == "embed":
        kwargs = dict(pooling=pooling or meta.get("pooling", "mean"),
                      normalize=meta.get("normalize", True) if normalize is None else normalize)

    model = build_model(config, head, **kwargs)
    target_prefixed = head != "encoder"
    sd = _normalize_keys(raw, target_prefixed)
    own = model.state_dict()
    # Shapes must agree, except a classifier whose label count changed: that head is fresh.
    fresh = []
    for k in list(sd):
        if k in own and own[k].shape != sd[k].shape:
            if k.startswith("classifier."):
                fresh.append(k)
                del sd[k]
            else:
                raise ValueError(f"{path}: weight {k} has shape {tuple(sd[k].shape)}, "
                                 f"model expects {tuple(own[k].shape)}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k != "cls.predictions.decoder.weight"]
    missing_encoder = [k for k in missing if not k.startswith(_HEAD_PREFIXES) and ".pooler." not in
                       "." + k.removeprefix("bert.")]
    if missing_encoder:
        raise ValueError(f"{path}: checkpoint lacks encoder weights {missing_encoder[:5]}"
                         f"{' ...' if len(missing_encoder) > 5 else ''}")
    if missing or fresh:
        log.warning("%s: newly initialized (train before use): %s", path, sorted(set(missing + fresh)))
    # Weights of parts this head doesn't have (another head, or a pooler it doesn't use) are skipped.
    unexpected = [k for k in result.unexpected_keys
                  if not k.startswith(_HEAD_PREFIXES) and "pooler." not in k]
    if unexpected:
        raise ValueError(f"{path}: unexpected weights {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_multitask(path: str | Path, dtype: Optional[torch.dtype] = None) -> BertMultiTask:
    """Every head of a multi-task checkpoint written by save_pretrained, in one BertMultiTask."""
    path = Path(path)
    config = BertConfig.from_json(path / "config.json")
    specs = config.extra.get("raybert", {}).get("tasks")
    if not specs:
        raise ValueError(f"{path} is not a multi-task checkpoint (no raybert.tasks in config.json)")
    model = BertMultiTask(config, [TaskHead(t["name"], t["kind"], t.get("id2label")) for t in specs])
    raw = read_state_dict(path)
    sd = {}
    for k, v in raw.items():
        if k.startswith("bert."):
            sd[k] = v
            continue
        for t in specs:
            if k.startswith(t["prefix"]):
                sd[f"heads.{t['name']}." + k[len(t["prefix"]):]] = v
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("predictions.decoder.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: multi-task weights don't match: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _multitask_state(model: BertMultiTask, config: BertConfig) -> dict[str, torch.Tensor]:
    """HF keys for the primary head, `raybert_heads.<task>.` for the rest; fills config's meta."""
    sd = {"bert." + k: v for k, v in model.bert.state_dict().items()}
    primary, specs, used = model.primary, [], set()
    for name, t in model.tasks.items():
        prefix = _KIND_PREFIX[t.kind]
        if (t.kind != "mlm" and name != primary) or prefix in used:
            prefix = f"{_EXTRA_HEADS}{name}."
        used.add(prefix)
        for k, v in model.heads[name].state_dict().items():
            if not k.endswith("predictions.decoder.weight"):  # tied to the word embeddings
                sd[prefix + k] = v
        specs.append({"name": name, "kind": t.kind, "prefix": prefix,
                      "id2label": {str(i): n for i, n in (t.id2label or {}).items()} or None})
    head = model.tasks[primary].kind if primary else "mlm"
    config.architectures = [ARCHITECTURES[head]]
    if primary:
        config.id2label = dict(model.tasks[primary].id2label)
        config.label2id = {v: k for k, v in config.id2label.items()}
    config.extra["raybert"] = {"head": head, "primary": primary, "tasks": specs}
    return sd


def _head_of(model: nn.Module) -> str:
    head = getattr(model, "head", None)
    if head not in ARCHITECTURES:
        raise TypeError(f"{type(model).__name__} is not a raybert BERT model")
    return head


def save_pretrained(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write `model` as an HF checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    config = BertConfig.from_dict(model.config.to_dict())
    if isinstance(model, BertMultiTask):
        sd = _multitask_state(model, config)
    else:
        head = _head_of(model)
        config.architectures = [ARCHITECTURES[head]]
        meta = {"head": head}
        if isinstance(model, BertForEmbedding):
            meta.update(pooling=model.pooling, normalize=model.normalize)
        config.extra["raybert"] = meta
        sd = model.state_dict()
        if head == "embed":  # a plain BertModel on disk, so AutoModel and sentence-transformers load it
            sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        config.vocab_size = max(config.vocab_size, len(tokenizer))

    sd.pop("cls.predictions.decoder.weight", None)  # tied: HF re-ties it on load
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.to_json(path / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
