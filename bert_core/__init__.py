"""bert_core: BERT in pure PyTorch, numerically matching Hugging Face `transformers`.

No Ray, DeepSpeed, click or YAML here: the model can be read, tested and reused alone.
"""

from .checkpoint import check_checkpoint, load_pretrained, save_pretrained
from .masking import MaskedBatch, Masker, MaskingConfig
from .model import (
    BertConfig,
    BertForEmbedding,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    build_model,
    preset,
)
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "BertConfig", "preset", "check_checkpoint", "load_pretrained", "save_pretrained", "load_tokenizer", "train_tokenizer",
    "BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertForEmbedding", "build_model", "Masker", "MaskingConfig", "MaskedBatch",
]
