"""Every job's settings, checked one way: the rules of each config field (`RULES`: a range, a
choice, a list of numbers), and `decode`, the one walker that turns a plain mapping into a job's
typed config tree.

Contract:
- `decode(cls, data, source_of)` builds dataclass `cls` from a (nested) mapping: an unknown key, a
  value of the wrong type, or one outside its rule is a `SettingError` naming the source of that
  key (`source_of(dotted_key)`: a YAML file, `--lr`, `--set train.lr=0`, a preset, `config` for a
  caller of `main(cfg)`), the dotted key, the value and what it must be. One format everywhere:
  `<source>: <key> must be <rule>, got <value>`. A quoted number or boolean ("4096", "false") and
  a YAML 1.1 float read as a string ("1e-4") are read as the field's type; nothing else is
  reinterpreted. Nested dataclasses and lists of dataclasses (`list[TaskData]`) are walked too.
- `check(cfg, source)` runs the same walker over a config built in code (fields set by hand),
  so a caller of `main(cfg)` gets the same errors as the command line.
- Every int or float field of the jobs' configs has a rule here (or in its class's `RULES`
  ClassVar, for the jobs' own top-level fields); tests/test_training_settings.py holds that.
Torch- and Ray-free: the CLI checks a config before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from bert_core.masking_config import MaskingConfig
from pipelines import UserError
from pipelines.scoring.config import DEVICES, DTYPE_CHOICES, POOLINGS, TASKS, ResourceConfig, ScoreConfig
from pipelines.training.config import (DTYPES, INITS, METRICS, MIXING, FinetuneOptions, ModelConfig, ScalingConfig,
                                       TrainConfig)
from pipelines.training.finetune_data import KINDS, FinetuneData, TaskData
from pipelines.training.pretrain_data import DataConfig


class SettingError(UserError):
    """A setting the user gave can't be used: its message names the source, the key, the value and
    what it must be."""


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
        return dataclasses.replace(self, unset=True)


@dataclass(frozen=True)
class Choice:
    options: tuple
    unset: bool = False

    def problem(self, value: Any) -> Optional[str]:
        if value is None and self.unset:
            return None
        ok = any(value == o and type(value) is type(o) for o in self.options)  # True is not 1
        return None if ok else f"one of {', '.join(map(str, self.options))}" + (" (or unset)" if self.unset else "")


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
RETRIES = Range(lo=-1, integer=True, why="-1 = without limit, as Ray's")
# [CLS], at least one token and [SEP]: a row can hold no less.
SEQ_LEN = Range(lo=3, integer=True, why="[CLS], one token and [SEP]")

RULES: dict[type, dict[str, Any]] = {
    TrainConfig: {
        "max_steps": AT_LEAST_1, "stop_at": AT_LEAST_1.or_unset(), "time_budget_s": POSITIVE.or_unset(),
        "steps_per_run": AT_LEAST_1.or_unset(), "deadline": Range(unset=True),
        "total_time_budget_s": Range(lo=0, lo_open=True, unset=True, why="seconds"),
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
                 "tokenize_batch_rows": AT_LEAST_1, "num_cpus": POSITIVE,
                 "shuffle_buffer_rows": Range(lo=0, integer=True, why="0 = off"), "eval_mlm_probability": PROBABILITY},
    MaskingConfig: {"mlm_probability": PROBABILITY, "mask_replace_prob": SHARE, "random_replace_prob": SHARE},
    FinetuneData: {"max_length": SEQ_LEN, "mlm_seq_len": SEQ_LEN, "val_fraction": FRACTION,
                   "split_seed": Range(integer=True), "num_cpus": POSITIVE, "tokenize_batch_rows": AT_LEAST_1},
    FinetuneOptions: {"epochs": POSITIVE.or_unset(), "warmup_ratio": FRACTION.or_unset(),
                      "layer_lr_decay": Range(0, 1, lo_open=True, why="1 = off"), "dropout": FRACTION.or_unset(),
                      "classifier_dropout": FRACTION.or_unset(), "mixing": Choice(MIXING),
                      "metric": Choice(METRICS), "patience": Range(lo=0, integer=True, why="0 = never stop early"),
                      "min_delta": NON_NEGATIVE},
    TaskData: {"kind": Choice(KINDS), "weight": POSITIVE},
    ScoreConfig: {"task": Choice(TASKS), "dtype": Choice(DTYPE_CHOICES), "max_tokens": AT_LEAST_1,
                  "batch_size": AT_LEAST_1, "max_batch_rows": AT_LEAST_1.or_unset(),
                  "max_length": Range(lo=3, integer=True, unset=True, why="[CLS], one token and [SEP]"),
                  "top_k": Range(lo=1, integer=True, why="candidates per [MASK]"),
                  "pooling": Choice(POOLINGS, unset=True)},
    ResourceConfig: {"num_actors": Range(lo=1, integer=True, unset=True, why="unset: one per GPU, else one per CPU"),
                     "actor_num_cpus": POSITIVE.or_unset(), "task_num_cpus": POSITIVE,
                     "torch_threads": AT_LEAST_1.or_unset(), "device": Choice(DEVICES),
                     "max_gpu_actors": AT_LEAST_1, "gpu_wait_s": POSITIVE,
                     "tokenizer_actors": Range(lo=0, integer=True, unset=True,
                                               why="0: each predictor actor tokenizes its own units"),
                     "max_restarts": RETRIES, "max_task_retries": RETRIES, "task_max_retries": RETRIES},
}


def _replace_probs(values: Mapping, prefix: str) -> Optional[str]:
    m, r = values.get("mask_replace_prob"), values.get("random_replace_prob")
    if isinstance(m, (int, float)) and isinstance(r, (int, float)) and m + r > 1:
        return (f"{prefix}mask_replace_prob + {prefix}random_replace_prob must be <= 1 (the rest of the chosen "
                f"tokens are kept as they are), got {m} + {r}")
    return None


def _pair_with_tag(values: Mapping, prefix: str) -> Optional[str]:
    if values.get("task") == "tag" and values.get("text_pair_column"):
        return f"{prefix}text_pair_column: task tag scores single texts; sentence pairs are not supported with it"
    return None


# Rules over several fields of one class: (values, key prefix) -> the error, or None; and the
# fields each reads (the error names where they were set).
ACROSS: dict[type, tuple[Callable[[Mapping, str], Optional[str]], tuple]] = {
    MaskingConfig: (_replace_probs, ("mask_replace_prob", "random_replace_prob")),
    ScoreConfig: (_pair_with_tag, ("task", "text_pair_column")),
}


def rules_of(cls: type) -> dict[str, Any]:
    """The field rules of `cls`: the table above, or the class's own `RULES` (jobs' configs)."""
    return {**RULES.get(cls, {}), **getattr(cls, "RULES", {})}


# --------------------------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------------------------

_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(typing.get_origin(hint) or hint, str(hint))


def typed_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type the field's `hint` wants, or a SettingError naming `where`, the value and
    the type. A single string is accepted where a list is wanted (one path)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)  # a pathlib.Path from a Python caller is a path setting's string
    if isinstance(value, (list, tuple)) and any(isinstance(v, os.PathLike) for v in value):
        value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    if typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:
            return typed_value(value, options[0], where)
        if isinstance(value, tuple) and list in [typing.get_origin(o) or o for o in options]:
            value = list(value)
        for option in options:  # Union[str, list]: a value of one of them, as it is
            if isinstance(value, typing.get_origin(option) or option):
                return value
        raise SettingError(f"{where} must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    text = value.strip() if isinstance(value, str) else None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOLEAN_WORDS:
            return _BOOLEAN_WORDS[text.lower()]
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # numpy's integers too
        if text is not None and re.fullmatch(r"[+-]?[0-9][0-9_]*", text):
            return int(text)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value if isinstance(value, (int, float)) else float(value)  # an int prints back as written
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [value]
        item = (typing.get_args(hint) or (Any,))[0]
        if isinstance(value, (list, tuple)) and (item is Any or all(isinstance(v, item) for v in value)):
            return list(value)
    elif hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise SettingError(f"{where} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def home_expanded(value: Any) -> Any:
    """`~/...` in a path setting is the home directory, as a shell makes it of a flag: left as it
    is, `output: ~/emb` wrote to a directory named `~` under the working dir."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [home_expanded(v) for v in value]
    return value


def _dataclass_items(hint) -> Optional[type]:
    """The item class of a `list[SomeDataclass]` hint, else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def decode(cls: type, data: Any, source_of: Callable[[str], str], prefix: str = "") -> Any:
    """Dataclass `cls` from `data` (a mapping of its fields, nested), every key's type and rule
    checked, the error naming `source_of(key)` (see the module docstring)."""
    if isinstance(data, cls):
        data = {f.name: getattr(data, f.name) for f in dataclasses.fields(cls)}
    if not isinstance(data, Mapping):
        raise SettingError(f"{source_of(prefix.rstrip('.'))}: {prefix.rstrip('.') or 'the file'}: expected a mapping "
                           f"of {cls.__name__} keys ({', '.join(f.name for f in dataclasses.fields(cls))}), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SettingError(f"{source_of(prefix + unknown[0])}: unknown key(s) {[prefix + k for k in unknown]} for "
                           f"{cls.__name__}; known keys: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        items = _dataclass_items(hint)
        if dataclasses.is_dataclass(hint):
            values[name] = decode(hint, value, source_of, key + ".")
        elif items is not None and isinstance(value, (list, tuple)):
            values[name] = [decode(items, v, source_of, f"{key}[{i}].") for i, v in enumerate(value)]
        else:
            values[name] = home_expanded(typed_value(value, hint, f"{source_of(key)}: {key}"))
    _check_rules(cls, values, prefix, source_of)
    return cls(**values)


def _check_rules(cls: type, values: Mapping, prefix: str, source_of: Callable[[str], str]) -> None:
    for name, rule in rules_of(cls).items():
        if name in values:
            want = rule.problem(values[name])
            if want is not None:
                key = prefix + name
                raise SettingError(f"{source_of(key)}: {key} must be {want}, got {values[name]!r}")
    rule, keys = ACROSS.get(cls, (None, ()))
    message = rule(values, prefix) if rule else None
    if message:
        sources = list(dict.fromkeys(source_of(prefix + k) for k in keys))
        raise SettingError(f"{' and '.join(sources)}: {message}")


def check(cfg: Any, source: str = "config") -> Any:
    """The walker over a config built (or changed) in code: the same errors, naming `source`; the
    values it reads as their fields' types (a "1e-4", a pathlib.Path, a `~/` path) are written back
    into `cfg`, so what runs is what was checked. Returns `cfg`."""
    typed = decode(type(cfg), cfg, lambda key: source)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(typed, f.name))
    return cfg
