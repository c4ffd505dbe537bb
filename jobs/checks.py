"""The ranges of the training commands' settings, checked on the driver before Ray starts.

A setting reaches a config three ways: a YAML file (`jobs.config.from_mapping` builds the
dataclasses), a flag (`jobs.config.apply_overrides` sets the field, skipping `__post_init__`), or
a caller of `main(cfg)` setting fields by hand. So the ranges live here, once, per config class
(`RANGES`), and are applied twice: `check_fields` on a YAML mapping before its dataclass is built
(the error names the file, the key, the value and the range), and `check_config` on the final
config in `jobs.pretrain.validate` and `jobs.finetune.validate` (naming the flag where the setting
has one). A value out of range is one ValueError on the driver, never a worker's traceback, or a
fit that trains at LR 0, minutes later. `check_seq_len` refuses a sequence length the model's
position table can't hold.

Contract: every int or float field of the training configs has a rule here (or says in
`CHECKED_ELSEWHERE` where it is checked); tests/test_training_settings.py holds that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Mapping, Optional

from bert_core.masking_config import MaskingConfig
from jobs.training import ScalingConfig
from pipelines.training.finetune_data import FinetuneData, TaskData
from pipelines.training.pretrain_data import DataConfig
from pipelines.training.config import DTYPES, INITS, METRICS, MIXING, FinetuneOptions, ModelConfig, TrainConfig


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range:
    """A number between bounds (each closed unless `*_open`), an integer if `integer`, None
    allowed if `unset`; `why` says what the bound means."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    unset: bool = False
    why: str = ""

    def bounds(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = ""
        return " ".join(part for part in (text, self.why and f"({self.why})", self.unset and "(or unset)") if part)

    def problem(self, value: Any) -> Optional[str]:
        """None if `value` is in range, else what it must be."""
        if value is None and self.unset:
            return None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (self.integer and not isinstance(value, int)) or not math.isfinite(value):
            return " ".join(part for part in ("an integer" if self.integer else "a finite number", self.bounds()) if part)
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return None if low_ok and high_ok else self.bounds()

    def or_unset(self) -> "Range":
        return Range(self.lo, self.hi, self.lo_open, self.hi_open, self.integer, True, self.why)


@dataclass(frozen=True)
class Choice:
    options: tuple

    def problem(self, value: Any) -> Optional[str]:
        ok = any(value == o and type(value) is type(o) for o in self.options)  # True is not 1
        return None if ok else f"one of {', '.join(map(str, self.options))}"


@dataclass(frozen=True)
class Numbers:
    """A list of `count` numbers, each in `each`."""
    count: int
    each: Range

    def problem(self, value: Any) -> Optional[str]:
        ok = isinstance(value, (list, tuple)) and len(value) == self.count and \
            all(self.each.problem(v) is None for v in value)
        return None if ok else f"{self.count} numbers, each {self.each.bounds()}"


AT_LEAST_1 = Range(lo=1, integer=True)
COUNT = Range(lo=0, integer=True)  # 0 allowed
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)
PROBABILITY = Range(0, 1, lo_open=True, hi_open=True)  # (0, 1)
SHARE = Range(0, 1)  # [0, 1]
# [CLS], at least one token and [SEP]: a row can hold no less.
SEQ_LEN = Range(lo=3, integer=True, why="[CLS], one token and [SEP]")

RANGES: dict[type, dict[str, Any]] = {
    TrainConfig: {
        "max_steps": AT_LEAST_1, "stop_at": AT_LEAST_1.or_unset(), "time_budget_s": POSITIVE.or_unset(),
        "steps_per_run": AT_LEAST_1.or_unset(), "deadline": Range(unset=True),
        "micro_batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lr": POSITIVE, "warmup_steps": COUNT,
        "decay": Choice(("linear", "cosine", "constant")), "min_lr_ratio": SHARE, "weight_decay": NON_NEGATIVE,
        "betas": Numbers(2, FRACTION), "eps": POSITIVE, "grad_clip": Range(lo=0, why="0 = off"),
        "zero_stage": Choice((0, 1, 2, 3)), "dtype": Choice(DTYPES),
        "seed": Range(0, 2 ** 63, hi_open=True, integer=True), "log_every": AT_LEAST_1, "eval_every": AT_LEAST_1,
        "save_every": AT_LEAST_1, "keep_last": AT_LEAST_1, "peak_flops_per_worker": POSITIVE.or_unset(),
        "stall_timeout_s": Range(lo=0, unset=True, why="0 = never"),
    },
    ModelConfig: {"train_dropout": FRACTION.or_unset(), "init": Choice(INITS)},
    ScalingConfig: {"num_workers": AT_LEAST_1, "cpus_per_worker": POSITIVE.or_unset(),
                    "torch_threads": AT_LEAST_1.or_unset(), "max_failures": COUNT},
    DataConfig: {"seq_len": SEQ_LEN, "val_fraction": FRACTION, "val_max_rows": AT_LEAST_1,
                 "tokenize_batch_rows": AT_LEAST_1, "num_cpus": POSITIVE, "shuffle_buffer_rows": Range(lo=0, integer=True, why="0 = off"),
                 "eval_mlm_probability": PROBABILITY},
    MaskingConfig: {"mlm_probability": PROBABILITY, "mask_replace_prob": SHARE, "random_replace_prob": SHARE},
    FinetuneData: {"max_length": SEQ_LEN, "mlm_seq_len": SEQ_LEN, "val_fraction": FRACTION,
                   "split_seed": Range(integer=True), "num_cpus": POSITIVE, "tokenize_batch_rows": AT_LEAST_1},
    FinetuneOptions: {"epochs": POSITIVE.or_unset(), "warmup_ratio": FRACTION.or_unset(),
                      "layer_lr_decay": Range(0, 1, lo_open=True, why="1 = off"), "dropout": FRACTION.or_unset(),
                      "classifier_dropout": FRACTION.or_unset(), "mixing": Choice(MIXING),
                      "metric": Choice(METRICS), "patience": Range(lo=0, integer=True, why="0 = never stop early"),
                      "min_delta": NON_NEGATIVE},
    TaskData: {"weight": POSITIVE},
}

# Numeric fields whose checks have their own words elsewhere (a rule here would pre-empt them).
CHECKED_ELSEWHERE = {
    (TrainConfig, "total_time_budget_s"): "TrainConfig.__post_init__, jobs.pretrain.validate, jobs.finetune.validate",
}


def _replace_probs(values: Mapping, prefix: str) -> Optional[str]:
    m, r = values.get("mask_replace_prob"), values.get("random_replace_prob")
    if isinstance(m, (int, float)) and isinstance(r, (int, float)) and m + r > 1:
        return (f"{prefix}mask_replace_prob + {prefix}random_replace_prob must be <= 1 (the rest of the chosen "
                f"tokens are kept as they are), got {m} + {r}")
    return None


# Rules over several fields of one class: (values, key prefix) -> the error, or None.
ACROSS: dict[type, Callable[[Mapping, str], Optional[str]]] = {MaskingConfig: _replace_probs}


def check_fields(cls: type, values: Mapping, prefix: str = "", where: str = "",
                 flags: Optional[Mapping[str, str]] = None) -> None:
    """Refuse a value of `values` (field name -> value of a `cls`) out of its range: a ValueError
    naming `where` (a file), the setting (`prefix` + field), its flag (from `flags`, dotted key ->
    flag) if it has one, the value and the range."""
    head = f"{where}: " if where else ""
    for name, rule in RANGES.get(cls, {}).items():
        if name not in values:
            continue
        want = rule.problem(values[name])
        if want is not None:
            key = prefix + name
            flag = (flags or {}).get(key)
            raise ValueError(f"{head}{key} must be {want}, got {values[name]!r}{f' (flag {flag})' if flag else ''}")
    across = ACROSS.get(cls)
    message = across(values, prefix) if across else None
    if message:
        raise ValueError(head + message)


def check_config(cfg: Any, flags: Optional[Mapping[str, str]] = None, prefix: str = "") -> None:
    """`check_fields` on `cfg` and every dataclass inside it, as they are now (flags included)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    check_fields(type(cfg), values, prefix, flags=flags)
    for name, value in values.items():
        if is_dataclass(value) and not isinstance(value, type):
            check_config(value, flags, f"{prefix}{name}.")


def model_config(model: ModelConfig, vocab_size: int):
    """The encoder config the workers will build (pipelines.training.engine.build_bert_config), here on the
    driver; a `model.overrides` key BertConfig doesn't have, or a value it refuses (a 0-wide
    layer, a dropout of 1.5, an activation it lacks: `BertConfig.check`), or neighbour init on a
    model it can't apply to, is a ValueError naming it."""
    from bert_core.init import check_neighbour_init
    from pipelines.training.engine import build_bert_config

    try:
        config = build_bert_config(model, vocab_size)
    except TypeError as e:  # BertConfig(**overrides) with an unknown key
        raise ValueError(f"model.overrides {sorted(model.overrides)}: {e}; use BertConfig's field names "
                         f"(hidden_size, max_position_embeddings, ...)") from None
    except ValueError as e:  # a value no model can be built from (BertConfig.check): every worker would fail
        source = "model.overrides" if model.overrides else f"preset {model.preset!r}"
        raise ValueError(f"{source}: {e}") from None
    if model.init == "neighbour" and not model.init_from:  # fresh weights: every worker would fail
        try:
            check_neighbour_init(config)
        except ValueError as e:
            raise ValueError(f"model.init 'neighbour': {e}; use model.init 'bert' for this model") from None
    return config


def check_seq_len(key: str, value: int, bert_config, model: ModelConfig) -> None:
    """Refuse a sequence length (`key` = `value`) past the model's position table: its positions
    beyond would index no embedding, and every worker would fail on its first batch."""
    limit = bert_config.max_position_embeddings
    if value <= limit:
        return
    if model.init_from:
        source = f"the --init-from checkpoint {model.init_from}"
    else:
        source = f"preset {model.preset!r}"
    if "max_position_embeddings" in model.overrides:
        source += " with model.overrides.max_position_embeddings"
    fresh = "" if model.init_from else " (or, for fresh weights, set model.overrides.max_position_embeddings)"
    raise ValueError(f"{key} {value} is longer than the model's max_position_embeddings {limit} ({source}): "
                     f"a row's positions after the first {limit} have no embedding. Use {key} <= {limit}{fresh}")
