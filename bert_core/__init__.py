"""bert_core: BERT in pure PyTorch, numerically matching Hugging Face `transformers`.

No Ray, DeepSpeed, click or YAML here: the model can be read, tested and reused alone. The names
below load their module on first use, so importing one torch-free module of the package (say
`bert_core.masking_config`) doesn't import torch.
"""

import importlib

_EXPORTS = {
    "checkpoint": ("check_checkpoint", "load_pretrained", "save_pretrained"),
    "masking": ("MaskedBatch", "Masker"),
    "masking_config": ("MaskingConfig",),
    "model": ("BertConfig", "BertForEmbedding", "BertForMaskedLM", "BertForSequenceClassification",
              "BertForTokenClassification", "BertModel", "build_model", "preset"),
    "tokenizer": ("load_tokenizer", "train_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
