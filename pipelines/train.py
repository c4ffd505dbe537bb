"""The per-worker MLM pretraining loop: Ray Train + DeepSpeed around single-device bert_core code.

Contract:
- `train_loop_per_worker(config)` reads only its argument, a plain dict
  (`LoopConfig(...).to_dict()`), so it pickles to any worker and never captures driver state.
  It runs under `ray.train.torch.TorchTrainer` with `datasets={"train": ..., "val": ...}` from
  pipelines/pretrain_data.py and `TorchConfig(backend="gloo"|"nccl")`.
- Distribution is applied here and only here: `build_engine` calls `deepspeed.initialize` once
  (ZeRO stage 0-3, fp32 / bf16 / fp16, torch AdamW with a warmup + linear/cosine decay schedule,
  gradient accumulation, clipping). The model is plain `bert_core.BertForMaskedLM`.
- Loss: cross-entropy at masked positions only. The model gathers the masked rows before the
  (H x V) vocab projection (`masked_index`), so the largest matmul runs on ~15% of tokens.
- A "step" is one optimizer step (`grad_accum` micro-batches on every worker).
- Metrics (every `log_every` steps): loss, MLM accuracy, lr, tokens/s, MFU; validation loss and
  accuracy every `eval_every` steps and at the end. They go to `ray.train.report` and, from rank
  0, to `<run_dir>/metrics.jsonl` (one JSON object a line; `"event"` lines mark starts/resumes).
  Ray Train 2.60 accepts one report per controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s)
  and blocks the next until then, so keep `log_every` at 2 s of training or more.
- Checkpoints (every `save_every` steps and at the end; Ray keeps the last `keep_last`), one Ray
  checkpoint directory holding:
    deepspeed/   the engine state: module, optimizer (ZeRO partitions of every rank), LR
                 scheduler, global step (DeepSpeed's own format, `engine.load_checkpoint`);
    hf/          an HF export (config.json, model.safetensors, tokenizer files) for
                 `transformers.BertForMaskedLM.from_pretrained` and `raybert score`;
    raybert_state.json   the step and the data position: epoch, and micro-batches of that
                 epoch already consumed by each worker.
- An invocation may end before `max_steps` (always with a checkpoint): at `stop_at`, after
  `steps_per_run` steps past where it resumed, after `time_budget_s` of training, or early enough
  before `deadline` to write its checkpoint in time. The next invocation resumes from there.
- Resume is exact. On start (a new `fit` on the same run dir, or a Ray Train restart after a
  worker failure) the loop loads `ray.train.get_checkpoint()`, re-opens the data stream of the
  saved epoch and skips the micro-batches already consumed. The data order is deterministic
  (`preserve_order`, a local shuffle seeded by (seed, epoch)), and every random draw (masking,
  dropout) is seeded from (seed, rank, epoch, micro-batch index): a function of the data
  position, so no RNG state needs saving and a resumed run draws what the straight run drew.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from bert_core.masking import Masker, MaskingConfig
from bert_core.model import BertConfig, BertForMaskedLM, mlm_flops_per_token, preset
from pipelines.pretrain_data import DataConfig

DTYPES = ("fp32", "bf16", "fp16")
# Peak dense matmul FLOP/s of one worker, used for MFU when `peak_flops_per_worker` is unset.
# CPU figures are this project's 2-core reference machine split over its 2 cores (STACK_NOTES:
# 186 GFLOP/s fp32, 418 GFLOP/s bf16 with 2 threads); GPU figures are H100 SXM dense tensor-core
# peaks. Set the field for other hardware; `benchmarks/pretrain.py` measures it.
DEFAULT_PEAK_FLOPS = {("cpu", "fp32"): 93e9, ("cpu", "bf16"): 209e9,
                      ("gpu", "fp32"): 67e12, ("gpu", "bf16"): 989e12, ("gpu", "fp16"): 989e12}


@dataclass
class ModelConfig:
    preset: str = "mini"  # bert_core preset: debug | mini | small | base | large
    init_from: Optional[str] = None  # HF checkpoint dir to start from instead of fresh weights
    overrides: dict = field(default_factory=dict)  # BertConfig fields on top of the preset
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30% more compute


@dataclass
class TrainConfig:
    max_steps: int = 10_000  # optimizer steps of the whole run; the LR schedule spans them
    stop_at: Optional[int] = None  # end this invocation at this step (checkpointing), e.g. a scheduled slice
    time_budget_s: Optional[float] = None  # end this invocation after this long (checkpointing)
    steps_per_run: Optional[int] = None  # end this invocation this many steps after where it resumed
    # Wall-clock deadline (Unix seconds) of this invocation: training stops early enough to write
    # its checkpoint before it (set by `raybert pretrain --time-budget`).
    deadline: Optional[float] = None
    micro_batch_size: int = 32  # packed rows per worker per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to `lr`
    decay: str = "linear"  # after warmup: linear | cosine | constant, down to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01  # AdamW decay; never on biases and LayerNorm weights
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on GPU only)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    save_every: int = 1000
    keep_last: int = 2  # checkpoints kept in the run dir
    peak_flops_per_worker: Optional[float] = None  # for MFU; default from DEFAULT_PEAK_FLOPS
    # Fault drill (tests, chaos runs): rank `kill_rank` SIGKILLs itself right after step
    # `kill_at_step`, once per run dir (a marker file records that it happened).
    kill_rank: Optional[int] = None
    kill_at_step: Optional[int] = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"decay must be linear, cosine or constant, got {self.decay!r}")
        if self.max_steps < 1 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, micro_batch_size and grad_accum must be >= 1")


@dataclass
class LoopConfig:
    """Everything a worker needs; built by jobs/pretrain.py, passed as a dict."""

    run_dir: str
    tokenizer: str  # resolved tokenizer path (checkpoint dir or vocab.txt)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    use_gpu: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopConfig":
        data = dict(d["data"])
        data["masking"] = MaskingConfig(**data["masking"])
        return cls(run_dir=d["run_dir"], tokenizer=d["tokenizer"], use_gpu=d.get("use_gpu", False),
                   model=ModelConfig(**d["model"]), data=DataConfig(**data), train=TrainConfig(**d["train"]))


# --------------------------------------------------------------------------------------------
# Model, schedule and the one DeepSpeed wrap
# --------------------------------------------------------------------------------------------


def build_bert_config(model: ModelConfig, vocab_size: int) -> BertConfig:
    if model.init_from:
        cfg = BertConfig.from_json(Path(model.init_from) / "config.json")
        for k, v in model.overrides.items():
            setattr(cfg, k, v)
    else:
        cfg = preset(model.preset, **model.overrides)
    if cfg.vocab_size < vocab_size:  # the embedding must cover every tokenizer id
        if model.init_from:
            raise ValueError(f"{model.init_from} has vocab_size {cfg.vocab_size} < tokenizer's {vocab_size}")
        cfg.vocab_size = vocab_size
    if not model.init_from and "vocab_size" not in model.overrides:
        cfg.vocab_size = vocab_size
    return cfg


def build_model(model: ModelConfig, bert_config: BertConfig) -> BertForMaskedLM:
    if model.init_from:
        from bert_core.checkpoint import load_pretrained

        m = load_pretrained(model.init_from, head="mlm")
        m.train()
    else:
        m = BertForMaskedLM(bert_config)
    m.bert.encoder.gradient_checkpointing = model.activation_checkpointing
    return m


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def disable_deepspeed_jit() -> None:
    """Keep DeepSpeed from JIT-compiling its shm/ccl comm ops on init (~30 s, 1.5 GB on CPU).

    `deepspeed.ops.__compatible_ops__` is a lazily probed dict (probing spawns compilers); setting
    it before first access skips the probe too. Only deepspeed/comm reads it (0.19.8), and gloo /
    nccl collectives work without those ops.
    """
    import deepspeed.ops as ops

    compat = ops.__dict__.setdefault("__compatible_ops__", {})
    compat["deepspeed_shm_comm"] = False
    compat["deepspeed_ccl_comm"] = False


def ds_config(train: TrainConfig, world_size: int) -> dict:
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
    return cfg


def build_engine(model: torch.nn.Module, train: TrainConfig, world_size: int,
                 param_groups: Optional[list[dict]] = None):
    """The one place a model meets DeepSpeed (pretraining and fine-tuning alike). Returns the
    engine (engine.module is the model). `param_groups` may carry per-group `lr` (layer-wise
    decay); the schedule scales each group's own lr."""
    import deepspeed

    from bert_core.model import BertLMPredictionHead

    disable_deepspeed_jit()
    if train.zero_stage == 3:
        # A tied MLM decoder reads the word-embedding weight outside the embedding module's
        # forward; ZeRO-3 must know to gather it for the head too.
        for head in model.modules():
            if isinstance(head, BertLMPredictionHead):
                deepspeed.zero.register_external_parameter(head, model.bert.embeddings.word_embeddings.weight)
    optimizer = torch.optim.AdamW(param_groups or _param_groups(model, train.weight_decay), lr=train.lr,
                                  betas=tuple(train.betas), eps=train.eps)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, train.warmup_steps, train.max_steps, train.decay, train.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config(train, world_size))
    return engine


# --------------------------------------------------------------------------------------------
# Seeding: every draw is a function of the data position
# --------------------------------------------------------------------------------------------


def derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1, np.uint64)[0] >> 1)


def mlm_step_inputs(masker: Masker, input_ids: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    return masker(input_ids.cpu(), generator=g)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def export_hf(engine, bert_config: BertConfig, path: str, tokenizer, rank: int, zero_stage: int) -> None:
    """Write an HF BertForMaskedLM directory from the engine's weights (rank 0 writes).

    Under ZeRO-3 the weights are partitioned, so every rank must enter the gather.
    """
    import deepspeed

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
            from bert_core.checkpoint import save_pretrained

            out = BertForMaskedLM(bert_config)
            out.load_state_dict(sd)
            save_pretrained(out, path, tokenizer=tokenizer)


def save_checkpoint(engine, state: dict, metrics: dict, bert_config: BertConfig, tokenizer, rank: int,
                    zero_stage: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raybert-ckpt-") as tmp:
        engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state", client_state={"raybert": state})
        export_hf(engine, bert_config, os.path.join(tmp, "hf"), tokenizer, rank, zero_stage)
        if rank == 0:
            Path(tmp, "raybert_state.json").write_text(json.dumps(state, indent=1) + "\n")
        # Ray merges every rank's files (each holds its own ZeRO partition) into one directory.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state['step']:08d}")


def load_checkpoint(engine, ckpt_dir: str) -> dict:
    state = json.loads(Path(ckpt_dir, "raybert_state.json").read_text())
    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="state")
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt_dir}/deepspeed")
    if engine.global_steps != state["step"]:
        raise RuntimeError(f"checkpoint step mismatch: engine {engine.global_steps}, state {state['step']}")
    return state


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _MetricsFile:
    def __init__(self, path: Optional[Path]):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    # On the worker's device: NCCL (GPU workers) reduces CUDA tensors only.
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank must call it)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _forward_mlm(engine, masker: Masker, input_ids: torch.Tensor, seed: int, device) -> tuple:
    """Loss (mean over masked tokens), number correct, number masked."""
    mb = mlm_step_inputs(masker, input_ids, seed)
    logits = engine(mb.input_ids.to(device), masked_index=mb.masked_index.to(device))  # (M, V)
    labels = mb.masked_labels.to(device)  # (M,)
    loss = F.cross_entropy(logits.float(), labels)
    correct = (logits.argmax(-1) == labels).sum()
    return loss, correct, labels.numel()


def evaluate(engine, shard, masker: Masker, cfg: LoopConfig, rank: int, device) -> dict:
    """Validation loss / accuracy over this worker's whole val shard, summed over workers.

    Masking is seeded by (seed, rank, batch index), identical at every evaluation, so successive
    val numbers differ only by the weights.
    """
    engine.eval()
    loss_sum = correct = n = 0.0
    with torch.no_grad():
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size,
                                                           dtypes=torch.int64, device="cpu")):
            loss, c, m = _forward_mlm(engine, masker, batch["input_ids"],
                                      derive_seed(cfg.train.seed, 7, rank, i), device)
            loss_sum += float(loss) * m
            correct += float(c)
            n += m
    engine.train()
    loss_sum, correct, n = _all_reduce_sum([loss_sum, correct, n], device)
    return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1), "val_tokens": int(n)}


def worker_context(use_gpu: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    return ctx.get_world_rank(), ctx.get_world_size(), device


def torch_trainer(loop_fn, loop_config: dict, *, run_dir: Path, num_workers: int, use_gpu: bool,
                  cpus_per_worker: float, max_failures: int, keep_last: int, datasets: dict,
                  dataset_config=None):
    """The TorchTrainer every training job runs under: one rank per worker (a GPU each with
    `use_gpu`, NCCL; else gloo on CPU), checkpoints in `run_dir`, worker-group restarts on failure."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_last),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )


def publish_export(checkpoint: Optional[str], run_dir: Path) -> Optional[Path]:
    """Copy a checkpoint's `hf/` export to `run_dir/export`, replacing the previous one whole."""
    import shutil

    if checkpoint is None or not Path(checkpoint, "hf").is_dir():
        return None
    export, tmp = run_dir / "export", run_dir / "export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(checkpoint, "hf"), tmp)
    shutil.rmtree(export, ignore_errors=True)
    tmp.rename(export)
    return export


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = LoopConfig.from_dict(config)
    tc = cfg.train
    rank, world, device = worker_context(cfg.use_gpu)
    run_dir = Path(cfg.run_dir)

    from bert_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    masker = Masker.from_tokenizer(tokenizer, cfg.data.masking)
    bert_config = build_bert_config(cfg.model, len(tokenizer))
    torch.manual_seed(tc.seed)  # identical fresh weights on every rank
    model = build_model(cfg.model, bert_config)
    engine = build_engine(model, tc, world)

    state = {"step": 0, "epoch": 0, "consumed": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(engine, d)
    log = _MetricsFile(run_dir / "metrics.jsonl" if rank == 0 else None)
    log.write({"event": "resume" if ckpt is not None else "start", "step": state["step"],
               "epoch": state["epoch"], "consumed": state["consumed"], "world_size": world,
               "nodes": worker_nodes(), "time": time.time()})

    seq_len = cfg.data.seq_len
    end = min(tc.max_steps, tc.stop_at) if tc.stop_at is not None else tc.max_steps
    if tc.steps_per_run is not None:
        end = min(end, state["step"] + tc.steps_per_run)
    peak = tc.peak_flops_per_worker or DEFAULT_PEAK_FLOPS.get(("gpu" if cfg.use_gpu else "cpu", tc.dtype), 0.0)
    flops_per_token = mlm_flops_per_token(bert_config, seq_len, cfg.data.masking.mlm_probability)
    tokens_per_step = tc.micro_batch_size * seq_len * tc.grad_accum * world
    train_shard = ray.train.get_dataset_shard("train")
    try:
        val_shard = ray.train.get_dataset_shard("val")
    except KeyError:
        val_shard = None

    t_start = time.time()
    t_log, steps_since_log = time.time(), 0
    step_s, save_s = 0.0, 10.0  # slowest step / checkpoint write so far (a first guess for the write)
    t_step = time.time()
    acc_loss = acc_correct = acc_n = 0.0
    last_saved = state["step"] if ckpt is not None else -1
    step = state["step"]
    engine.train()
    done = step >= end
    while not done:
        epoch, skip = state["epoch"], state["consumed"]
        batches = train_shard.iter_torch_batches(
            batch_size=tc.micro_batch_size, drop_last=True, dtypes=torch.int64, device="cpu",
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None,
            local_shuffle_seed=derive_seed(tc.seed, 11, epoch) if cfg.data.shuffle_buffer_rows else None)
        seen = 0
        for i, batch in enumerate(batches):
            seen += 1
            if i < skip:  # consumed before the checkpoint we resumed from
                continue
            seed = derive_seed(tc.seed, rank, epoch, i)
            torch.manual_seed(derive_seed(seed, 1))  # dropout
            loss, correct, m = _forward_mlm(engine, masker, batch["input_ids"], seed, device)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            engine.step()
            state["consumed"] = i + 1
            acc_loss += float(loss.detach()) * m
            acc_correct += float(correct)
            acc_n += m
            if not boundary:
                continue
            step += 1
            steps_since_log += 1
            state["step"] = step
            metrics = {}
            if step % tc.log_every == 0 or step == end:
                s, c, n = _all_reduce_sum([acc_loss, acc_correct, acc_n], device)
                dt = time.time() - t_log
                tps = tokens_per_step * steps_since_log / max(dt, 1e-9)
                metrics = {"step": step, "epoch": epoch, "loss": s / max(n, 1), "mlm_acc": c / max(n, 1),
                           "lr": engine.get_lr()[0], "tokens_per_s": tps,
                           "mfu": tps * flops_per_token / (peak * world) if peak else None,
                           "tokens": step * tokens_per_step, "time": time.time()}
                acc_loss = acc_correct = acc_n = 0.0
                t_log, steps_since_log = time.time(), 0
            if val_shard is not None and (step % tc.eval_every == 0 or step == end):
                metrics.update(step=step, **evaluate(engine, val_shard, masker, cfg, rank, device))
            out_of_time = False
            step_s = max(step_s, time.time() - t_step)
            if tc.time_budget_s is not None or tc.deadline is not None:
                late = tc.time_budget_s is not None and time.time() - t_start > tc.time_budget_s
                # Stop while there is still time for another step and two checkpoint writes.
                late |= tc.deadline is not None and time.time() + 2 * (step_s + save_s) > tc.deadline
                out_of_time = _all_reduce_sum([float(late)], device)[0] > 0
            stop = step >= end or out_of_time
            if metrics:
                log.write(metrics)
            if step % tc.save_every == 0 or stop:
                t_save = time.time()
                save_checkpoint(engine, dict(state), metrics or {"step": step}, bert_config, tokenizer,
                                rank, tc.zero_stage)
                save_s = max(save_s, time.time() - t_save)
                last_saved = step
            elif metrics:
                ray.train.report(metrics)
            _maybe_kill(tc, rank, step, run_dir)
            t_step = time.time()
            if stop:
                done = True
                break
        else:
            if seen == 0:
                raise RuntimeError("the train dataset gave this worker no full micro-batch; "
                                   "use more data, a smaller micro_batch_size or fewer workers")
            state["epoch"], state["consumed"] = state["epoch"] + 1, 0
            log.write({"event": "epoch_end", "epoch": epoch, "step": step})
    if last_saved != step:  # nothing to run (already at the end): still leave a checkpoint
        save_checkpoint(engine, dict(state), {"step": step}, bert_config, tokenizer, rank, tc.zero_stage)
    log.write({"event": "end", "step": step, "time": time.time()})
    # ZeRO-3 with gloo can abort in destroy_process_group at exit unless the engine lets go first.
    engine.destroy()
    del engine
    gc.collect()


def _maybe_kill(tc: TrainConfig, rank: int, step: int, run_dir: Path) -> None:
    if tc.kill_at_step is None or step != tc.kill_at_step or rank != (tc.kill_rank or 0):
        return
    marker = run_dir / f"fault_drill_rank{rank}_step{step}.done"
    if marker.exists():
        return
    marker.write_text(f"killed at step {step}, pid {os.getpid()}, time {time.time()}\n")
    # Ray Train registers a checkpoint only once the controller has polled every rank's report of
    # it (one poll per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A rank that dies before that poll takes
    # the other ranks' unpolled reports with it, and the restart falls back to the checkpoint
    # before. The drill waits out two polls so that "latest checkpoint" is well defined.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1)
    os.kill(os.getpid(), signal.SIGKILL)
