"""The BERT encoder and its heads, in one file, in pure PyTorch.

Contract:
- Numerically this is Hugging Face `modeling_bert` (post-LayerNorm BERT): same embeddings, same
  attention, same FFN, same pooler and heads. Parity with `transformers` is asserted in
  tests/test_parity.py to 1e-5 in fp32.
- Parameter names follow the HF checkpoint keys one to one (`embeddings.word_embeddings.weight`,
  `encoder.layer.0.attention.self.query.weight`, `bert.` / `cls.` / `classifier.` prefixes on the
  heads), so HF checkpoints load with no key surgery beyond prefixes (checkpoint.HFAdapter).
- Heads are modules (BertOnlyMLMHead, BertClassifierHead, BertPoolingHead) run by one container,
  BertWithHeads: each single-head model holds one, BertMultiTask one per task (`heads.<task>.`
  keys), so a task's head computes the same thing in either.
- Single-device code: no distribution, no Ray, no DeepSpeed. Those are applied in `pipelines/`.

What differs from stock HF BERT, and why:
- Attention always goes through `F.scaled_dot_product_attention` with a boolean key-padding mask,
  and no mask at all when a batch has no padding, which lets torch pick its fastest kernel.
- The MLM head can take `masked_index`, flat positions into the (B*T) tokens, and then projects
  only those rows onto the vocabulary. With 15% masking that skips ~85% of the largest matmul in
  pretraining (the (H x V) decoder).
- The pooler is computed only by heads that use it (classification), not on every forward.
- On padded batches the encoder runs its per-token layers on the real tokens only (see
  BertEncoder); hidden states at padding positions come out as zeros instead of HF's values,
  which no head reads.

Shapes: B batch, T sequence length, H hidden size, nh heads, hd head dim (H // nh),
I intermediate size, V vocab size, M number of masked tokens, L number of labels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .padding import Unpadded, repad, unpad_tokens


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    """BERT hyper-parameters, under the field names of a Hugging Face BERT `config.json`.

    Unknown keys of a loaded config.json are kept in `extra` and written back, so a
    checkpoint's config round-trips through us unchanged.
    """

    vocab_size: int = 30522  # rows of the word-embedding table (and of the tied MLM decoder)
    hidden_size: int = 768  # H, width of the residual stream
    num_hidden_layers: int = 12  # number of transformer blocks
    num_attention_heads: int = 12  # nh; H must divide by it
    intermediate_size: int = 3072  # I, width of the FFN
    hidden_act: str = "gelu"  # FFN and MLM-transform activation: gelu | gelu_new | relu | silu
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and on every residual branch
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # segment ids (sentence A / B)
    initializer_range: float = 0.02  # std of the normal init for fresh weights
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon, as in Google's BERT
    pad_token_id: int = 0  # padding id in the vocab
    classifier_dropout: Optional[float] = None  # head dropout; None means hidden_dropout_prob
    id2label: Optional[dict[int, str]] = None  # label names of classify/tag heads
    label2id: Optional[dict[str, int]] = None  # inverse of id2label
    architectures: Optional[list[str]] = None  # HF class that wrote the checkpoint
    model_type: str = "bert"
    extra: dict = field(default_factory=dict)  # any other config.json keys, kept verbatim

    def __post_init__(self):
        self.check()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        if self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
            if self.id2label is None:
                self.id2label = {v: k for k, v in self.label2id.items()}

    def check(self) -> None:
        """Refuse values no model can be built from (a 0-wide layer, a dropout of 1.5, an activation
        we don't have), naming the field: said when the config is made, not by every worker that
        builds the model. A 0-layer encoder is allowed (embeddings and pooling only)."""
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"BertConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.num_hidden_layers, int) and self.num_hidden_layers >= 0):
            raise ValueError(f"BertConfig.num_hidden_layers must be an integer >= 0, got {self.num_hidden_layers!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not (isinstance(self.initializer_range, (int, float)) and self.initializer_range >= 0):
            raise ValueError(f"BertConfig.initializer_range must be >= 0, got {self.initializer_range!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; choose one of {sorted(ACT2FN)}")

    def set_labels(self, id2label: dict) -> None:
        """Replace the label names (id2label and its inverse label2id)."""
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        if d["id2label"] is not None:  # JSON keys are strings, as in HF configs
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        d = {k: v for k, v in d.items() if v is not None}
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type {d['model_type']!r} is not a BERT config")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        return cls(**kwargs, extra=extra)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# Named sizes. `debug` runs in seconds on a laptop; the others follow the BERT paper's family
# (mini/small from Turc et al. 2019, base/large from Devlin et al. 2019).
PRESETS: dict[str, dict] = {
    "debug": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256,
                  max_position_embeddings=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}


def preset(name: str, **overrides) -> BertConfig:
    """A named model size, e.g. `preset("mini", vocab_size=21128)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return BertConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

ACT2FN = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _activation(name: str):
    if name not in ACT2FN:
        raise ValueError(f"hidden_act {name!r} is not supported; choose one of {sorted(ACT2FN)}")
    return ACT2FN[name]


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate the input")
        x = self.word_embeddings(input_ids)  # (B, T, H)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # (B, T, H): segment 0 everywhere
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        x = x + self.position_embeddings.weight[:T]  # (B, T, H), broadcast over B
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Q, K, V projections; named `attention.self.{query,key,value}` as in HF checkpoints."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = H // self.num_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                unpadded: Optional[Unpadded] = None) -> torch.Tensor:
        """x: (B, T, H), or (nnz, H) real tokens only when `unpadded` says where they sit."""
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, H) or (nnz, H)
        if unpadded is not None:  # attention needs the (B, T) grid back
            q, k, v = (repad(t, unpadded.indices, unpadded.B, unpadded.T) for t in (q, k, v))
        B, T, H = q.shape
        # (B, T, H) -> (B, nh, T, hd)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        # attn_mask: (B, 1, 1, T) bool, True = attend; None when there is no padding
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
        if unpadded is not None:
            y = y.reshape(B * T, H).index_select(0, unpadded.indices)  # (nnz, H)
        return y


class BertSelfOutput(nn.Module):
    """Output projection of attention, residual add, post-LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)  # (B, T, H)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                unpadded: Optional[Unpadded] = None) -> torch.Tensor:
        return self.output(self.self(x, attn_mask, unpadded), x)  # (B, T, H) or (nnz, H)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, T, I)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, T, H)


class BertLayer(nn.Module):
    """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                unpadded: Optional[Unpadded] = None) -> torch.Tensor:
        # Everything but attention is per token, so it runs on (nnz, H) as well as (B, T, H).
        x = self.attention(x, attn_mask, unpadded)  # (B, T, H) or (nnz, H)
        return self.output(self.intermediate(x), x)  # (B, T, H) or (nnz, H)


class BertEncoder(nn.Module):
    """The layer stack. On padded batches it drops the padding rows before the first layer and
    runs every per-token matmul (projections, FFN, LayerNorm) on the real tokens only, restoring
    the (B, T) grid just for attention (MosaicBERT's trick). Padding positions of the output are
    zeros; every real position is what the padded computation gives."""

    # Unpad only when it pays: each layer then spends two gathers/scatters of (nnz, H) tensors,
    # which costs more than it saves on nearly full batches.
    unpad_min_padding: float = 0.1

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        # Set by the training layer to trade compute for activation memory.
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        attn_mask = None  # None when nothing is padded: SDPA then runs its mask-free kernel
        unpadded = None
        if attention_mask is not None:
            B, T, _ = x.shape
            # The one device-to-host sync per forward: the token count picks the mask-free
            # kernel, decides unpadding and sizes it (see unpad_tokens), so a GPU step waits on
            # the host once, not once per decision.
            n_real = int(attention_mask.sum())
            if n_real < B * T:
                attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) key padding
                if 1.0 - n_real / (B * T) >= self.unpad_min_padding:
                    x, indices = unpad_tokens(x, attention_mask, n_real)  # (nnz, H)
                    unpadded = Unpadded(indices, B, T)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, attn_mask, unpadded, use_reentrant=False)
            else:
                x = layer(x, attn_mask, unpadded)
        if unpadded is not None:
            x = repad(x, unpadded.indices, unpadded.B, unpadded.T)
        return x  # (B, T, H)


class BertPooler(nn.Module):
    """tanh(dense(hidden of the first token)): the [CLS] summary used by classification."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H)


class BertModel(nn.Module):
    """Embeddings + encoder (+ optional pooler). Keys match HF `BertModel` exactly."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: Optional[torch.Tensor] = None,  # (B, T) 1 = token, 0 = padding
        token_type_ids: Optional[torch.Tensor] = None,  # (B, T) segment ids
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        return self.encoder(x, attention_mask)  # (B, T, H)


def init_weights(module: nn.Module, config: BertConfig) -> None:
    """HF's BERT init: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Heads, and the one container that runs them. A head module reads the encoder's output; the
# attribute that holds it (`cls`, `classifier`, or `heads.<task>` in BertMultiTask) gives its
# key prefix, and checkpoint.HFAdapter maps those prefixes to and from HF files.
# --------------------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))  # (..., H)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder weight is tied to the word embeddings by BertWithHeads.tie_weights.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), self.decoder.weight, self.bias)  # (..., V)


class BertOnlyMLMHead(nn.Module):
    """The MLM head (HF's `cls`): every token, or only the rows at `masked_index`, onto the vocab."""

    kind = "mlm"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.apply(lambda m: init_weights(m, config))

    def forward(self, h: torch.Tensor, masked_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if masked_index is not None:  # (M,) flat positions into B*T
            h = h.reshape(-1, h.shape[-1]).index_select(0, masked_index)  # (M, H)
        return self.predictions(h)  # (B, T, V) or (M, V)


class BertClassifierHead(nn.Linear):
    """Dropout, then a linear map to L labels (HF's `classifier`): on the pooled [CLS] for
    `kind="classify"`, on every token for `kind="tag"`. It is the Linear itself, so its weights
    are `<attribute>.weight` / `.bias`, as in HF files."""

    def __init__(self, config: BertConfig, kind: str, num_labels: int):
        super().__init__(config.hidden_size, num_labels)
        self.kind = kind
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        init_weights(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))  # (B, L) or (B, T, L)


POOLINGS = ("mean", "cls", "max")


class BertPoolingHead(nn.Module):
    """Sentence embeddings: mean or max over real tokens (attention_mask == 1, as
    sentence-transformers does) or the [CLS] state, optionally L2-normalized. No parameters."""

    kind = "embed"

    def __init__(self, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, h: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.pooling == "cls":
            e = h[:, 0]  # (B, H)
        elif self.pooling == "max":
            if attention_mask is not None:  # padding must never win the max
                h = h.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(h.dtype).min)  # (B, T, H)
            e = h.amax(dim=1)  # (B, H)
        elif attention_mask is None:
            e = h.mean(dim=1)  # (B, H)
        else:
            m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
            e = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)  # (B, H)
        return F.normalize(e, p=2, dim=-1) if self.normalize else e  # (B, H)


class BertWithHeads(nn.Module):
    """The head container: the encoder `bert` and head modules (subclasses add them as
    attributes), run by one `run_head`. The single-head models hold one head, BertMultiTask one
    per task; either way an MLM decoder is tied to the word embeddings."""

    head: str  # encoder | mlm | classify | tag | embed | multi: what checkpoint.py saves it as

    def __init__(self, config: BertConfig, add_pooling_layer: bool):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)

    def tie_weights(self) -> None:
        """Share the word-embedding matrix with every MLM decoder (again after loading weights)."""
        for m in self.modules():
            if isinstance(m, BertLMPredictionHead):
                m.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def run_head(
        self,
        head: nn.Module,  # one of this model's head modules
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: Optional[torch.Tensor],  # (B, T) 1 = token, 0 = padding
        token_type_ids: Optional[torch.Tensor],  # (B, T) segment ids
        masked_index: Optional[torch.Tensor] = None,  # (M,) mlm only: flat positions into B*T
    ) -> torch.Tensor:
        h = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        if head.kind == "classify":
            return head(self.bert.pooler(h))  # (B, L), as HF's BertForSequenceClassification
        if head.kind == "tag":
            return head(h)  # (B, T, L), as HF's BertForTokenClassification
        if head.kind == "mlm":
            return head(h, masked_index)  # (B, T, V) or (M, V)
        return head(h, attention_mask)  # embed: (B, H)


class BertForMaskedLM(BertWithHeads):
    """Encoder + MLM head with the decoder tied to `bert.embeddings.word_embeddings`."""

    head = "mlm"

    def __init__(self, config: BertConfig):
        super().__init__(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, masked_index=None) -> torch.Tensor:
        """Logits (B, T, V), or (M, V) at `masked_index` only (see masking.MaskedBatch)."""
        return self.run_head(self.cls, input_ids, attention_mask, token_type_ids, masked_index)


class _BertForLabels(BertWithHeads):
    """Encoder + BertClassifierHead: classify (pooled [CLS]) or tag (every token), by `head`."""

    def __init__(self, config: BertConfig):
        super().__init__(config, add_pooling_layer=self.head == "classify")
        self.num_labels = config.num_labels
        self.classifier = BertClassifierHead(config, self.head, self.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        # (B, L) for classify, (B, T, L) for tag
        return self.run_head(self.classifier, input_ids, attention_mask, token_type_ids)


class BertForSequenceClassification(_BertForLabels):
    """Encoder + pooler + dropout + linear, as HF. Returns logits (B, L)."""

    head = "classify"


class BertForTokenClassification(_BertForLabels):
    """Encoder + dropout + linear per token, as HF (no pooler). Returns logits (B, T, L)."""

    head = "tag"


class BertForEmbedding(BertWithHeads):
    """Sentence embeddings (B, H): encoder + BertPoolingHead. It has no parameters beyond the
    encoder; it saves as a plain HF `BertModel`."""

    head = "embed"

    def __init__(self, config: BertConfig, pooling: str = "mean", normalize: bool = True):
        super().__init__(config, add_pooling_layer=False)
        self.pool = BertPoolingHead(pooling, normalize)

    pooling = property(lambda self: self.pool.pooling)  # mean | cls
    normalize = property(lambda self: self.pool.normalize)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.run_head(self.pool, input_ids, attention_mask, token_type_ids)  # (B, H)


@dataclass
class TaskHead:
    """One named head of a `BertMultiTask` model."""

    name: str  # task name, e.g. "sentiment"; a Python identifier (it names the module)
    kind: str  # classify (pooled [CLS] -> L) | tag (every token -> L) | mlm (tied vocab projection)
    id2label: Optional[dict[int, str]] = None  # classify / tag label names, ids 0..L-1

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"task name {self.name!r} must be an identifier (letters, digits, _)")
        if self.kind not in ("classify", "tag", "mlm"):
            raise ValueError(f"task {self.name}: kind must be classify, tag or mlm, got {self.kind!r}")
        if self.kind != "mlm":
            if not self.id2label:
                raise ValueError(f"task {self.name}: a {self.kind} head needs id2label")
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if sorted(self.id2label) != list(range(len(self.id2label))):
                raise ValueError(f"task {self.name}: label ids must be 0..{len(self.id2label) - 1}")


class BertMultiTask(BertWithHeads):
    """One shared encoder and several named heads: fine-tuning (one task) and multi-task learning.

    The heads are the single-head models' own modules, in `heads[<task name>]`, so
    `forward(task, ...)` gives exactly what that task's single-head model gives: classify (B, L),
    tag (B, T, L), mlm (B, T, V) or (M, V) at `masked_index`. checkpoint.save_pretrained writes
    the first classify/tag task under HF's own keys, so `transformers` loads it as that task's
    model, and keeps every other head beside it (see checkpoint.py).
    """

    head = "multi"

    def __init__(self, config: BertConfig, tasks: list[TaskHead]):
        if not tasks:
            raise ValueError("BertMultiTask needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        super().__init__(config, add_pooling_layer=any(t.kind == "classify" for t in tasks))
        self.tasks = {t.name: t for t in tasks}
        self.heads = nn.ModuleDict({t.name: BertOnlyMLMHead(config) if t.kind == "mlm" else
                                    BertClassifierHead(config, t.kind, len(t.id2label)) for t in tasks})
        self.tie_weights()

    @property
    def primary(self) -> Optional[str]:
        """The task HF sees: the first classify/tag task."""
        return next((n for n, t in self.tasks.items() if t.kind != "mlm"), None)

    def forward(self, task: str, input_ids, attention_mask=None, token_type_ids=None,
                masked_index=None) -> torch.Tensor:
        """Logits of head `task`; `masked_index` (M,) applies to an mlm task only."""
        return self.run_head(self.heads[task], input_ids, attention_mask, token_type_ids, masked_index)


class BertEncoderOnly(BertModel):
    """`head="encoder"`: the bare encoder returning hidden states (B, T, H); has a pooler."""

    head = "encoder"


HEADS: dict[str, type[nn.Module]] = {
    "encoder": BertEncoderOnly,
    "mlm": BertForMaskedLM,
    "classify": BertForSequenceClassification,
    "tag": BertForTokenClassification,
    "embed": BertForEmbedding,
}


def build_model(config: BertConfig, head: str = "encoder", **head_kwargs) -> nn.Module:
    """A freshly initialized model of `head` (one of HEADS)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    return HEADS[head](config, **head_kwargs)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout of `model` (hidden, attention probabilities, heads) to `p` in place, the
    config unchanged: pretraining recipes train without dropout (Cramming, Geiping & Goldstein
    2022), while the saved config keeps the usual value for fine-tuning."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, BertSelfAttention):
            module.dropout_p = p


def mlm_flops_per_token(config: BertConfig, seq_len: int, mask_rate: float = 0.15) -> float:
    """Training FLOPs per input token (forward + backward = 3x forward) of BertForMaskedLM with the
    masked-only head: 6 * (encoder matmul params) + attention scores, + the head on masked tokens."""
    H, I, nl, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * H * H + 2 * H * I  # QKV + out proj + FFN weights
    attn = 2 * seq_len * H  # QK^T and AV per token per layer (multiply-adds)
    enc = 6 * nl * (per_layer + attn)
    head = 6 * mask_rate * (H * H + H * V)
    return float(enc + head)

