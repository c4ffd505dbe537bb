"""The one place a model meets DeepSpeed, shared by pretraining and fine-tuning.

Contract:
- `build_bert_config` resolves the encoder config (`init_from`'s or the preset's, plus overrides,
  covering the tokenizer). The LR schedule (linear warmup, then linear, cosine or constant decay
  to a floor, re-plannable by a time budget) is pipelines/training/run_plan.py's `LRSchedule`;
  `lr_schedule(engine)` returns a built engine's, `fresh_lr_schedule` replaces it.
- `ds_config` builds a run's DeepSpeed config from `TrainConfig`, merging the user's `deepspeed`
  section over it (a contradiction of a key we derive, or an optimizer/scheduler, is refused; the
  driver calls it too, so that happens before any worker starts).
- `build_engine` wraps a model with torch AdamW (no decay on biases and LayerNorm weights, or the
  caller's parameter groups) and our schedule in `deepspeed.initialize`; `gathered_state_dict`
  collects full fp32 weights on rank 0 under any ZeRO stage; `evaluating` is eval mode without
  gradients for a block.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import torch

from pipelines import UserError
from bert_core.model import BertConfig, preset
from pipelines import storage
from pipelines.compat import disable_deepspeed_jit, import_deepspeed
from pipelines.training.run_plan import LRSchedule
from pipelines.training.config import ModelConfig, TrainConfig


def build_bert_config(model: ModelConfig, vocab_size: int) -> BertConfig:
    """The encoder config: `init_from`'s or the preset's, plus overrides, covering the tokenizer."""
    if model.init_from:
        cfg = BertConfig.from_json(Path(storage.cached_copy(model.init_from)) / "config.json")
        for k, v in model.overrides.items():
            setattr(cfg, k, v)
        cfg.__post_init__()  # the overridden values checked as a fresh config's are
    else:
        cfg = preset(model.preset, **model.overrides)
    if cfg.vocab_size < vocab_size:  # the embedding must cover every tokenizer id
        if model.init_from:
            raise ValueError(f"{model.init_from} has vocab_size {cfg.vocab_size} < tokenizer's {vocab_size}")
        cfg.vocab_size = vocab_size
    if not model.init_from and "vocab_size" not in model.overrides:
        cfg.vocab_size = vocab_size
    return cfg


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# DeepSpeed keys raybert sets from TrainConfig, and the field a user changes instead.
_DS_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x scaling.num_workers",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.dtype",
    "fp16.enabled": "train.dtype",
}
_DS_REFUSED = {
    "optimizer": "raybert passes its own torch AdamW (train.lr, betas, eps, weight_decay)",
    "scheduler": "raybert runs its own LR schedule (train.warmup_steps, decay, min_lr_ratio)",
}


def _merge_deepspeed(ours: dict, theirs: dict, where: str = "") -> dict:
    out = dict(ours)
    for k, v in theirs.items():
        key = f"{where}{k}"
        if key in _DS_REFUSED:
            raise UserError(f"deepspeed config: {key!r} is not accepted: {_DS_REFUSED[key]}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_deepspeed(out[k], v, key + ".")
            continue
        if key in _DS_OWNED:
            mine = out.get(k, False if key.endswith(".enabled") else None)
            if v != mine:
                raise UserError(f"deepspeed config: {key} = {v!r} contradicts raybert's {mine!r}, which comes "
                                 f"from {_DS_OWNED[key]}; set that instead (or drop the key)")
        out[k] = v
    return out


def ds_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of a run: ours from `train`, with `train.deepspeed` merged over it.
    Also called on the driver, so a contradicting user config is refused before any worker starts."""
    cfg = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no FusedAdam/CPUAdam JIT build
    }
    if train.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if train.deepspeed:
        for key in ("bf16", "fp16"):  # a precision section the dtype doesn't enable is ours to compare
            cfg.setdefault(key, {"enabled": False})
        cfg = _merge_deepspeed(cfg, train.deepspeed)
        cfg = {k: v for k, v in cfg.items() if not (k in ("bf16", "fp16") and v == {"enabled": False})}
    return cfg


def build_engine(model: torch.nn.Module, train: TrainConfig, world_size: int,
                 param_groups: Optional[list[dict]] = None):
    """The one place a model meets DeepSpeed (pretraining and fine-tuning alike). Returns the
    engine (engine.module is the model). `param_groups` may carry per-group `lr` (layer-wise
    decay); the schedule scales each group's own lr."""
    from bert_core.model import BertLMPredictionHead

    deepspeed = import_deepspeed()
    disable_deepspeed_jit()
    if train.zero_stage == 3:
        # A tied MLM decoder reads the word-embedding weight outside the embedding module's
        # forward; ZeRO-3 must know to gather it for the head too.
        for head in model.modules():
            if isinstance(head, BertLMPredictionHead):
                deepspeed.zero.register_external_parameter(head, model.bert.embeddings.word_embeddings.weight)
    optimizer = torch.optim.AdamW(param_groups or default_param_groups(model, train.weight_decay), lr=train.lr,
                                  betas=tuple(train.betas), eps=train.eps)

    def schedule(opt):  # one LRSchedule object for every param group: a re-plan moves them all
        return torch.optim.lr_scheduler.LambdaLR(
            opt, LRSchedule(train.warmup_steps, train.max_steps, train.decay, train.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config(train, world_size))
    return engine


def lr_schedule(engine) -> LRSchedule:
    """The engine's LR multiplier object (shared by every param group)."""
    return engine.lr_scheduler.lr_lambdas[0]


def fresh_lr_schedule(engine, train: TrainConfig) -> LRSchedule:
    """Replace the engine's LR multiplier with one planned by steps from `train` (what a checkpoint
    load restored into the old one is dropped); the current LR is untouched until the next step."""
    schedule = LRSchedule(train.warmup_steps, train.max_steps, train.decay, train.min_lr_ratio)
    engine.lr_scheduler.lr_lambdas = [schedule] * len(engine.lr_scheduler.lr_lambdas)
    return schedule


def gathered_state_dict(engine, rank: int, zero_stage: int) -> Optional[dict]:
    """A CPU fp32 copy of the full weights on rank 0, None elsewhere (under ZeRO-3 the weights
    are partitioned, so every rank must call it: they all enter the gather)."""
    deepspeed = import_deepspeed()
    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
    return None


@contextmanager
def evaluating(engine):
    """Eval mode without gradients for the block; training mode again after."""
    engine.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train()
