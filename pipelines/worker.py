"""The worker toolkit shared by the pretraining loop (pipelines/train.py) and the fine-tuning loop
(pipelines/finetune.py), and the driver-side pieces that run them.

Contract:
- Configs every training job shares: `ModelConfig` (which encoder), `TrainConfig` (optimizer,
  schedule, precision, ZeRO, logging and checkpoint cadence, the stall timeout), and `FaultDrill`
  (fault injection for tests and chaos runs only: set through RAYBERT_FAULT_DRILL, never by users).
- In a worker: `worker_session` opens what every loop starts with: `worker_context` (rank, world,
  device; torch's CPU threads set from the CPUs the worker holds), rank 0's `Heartbeat` (its
  {step, phase} written to `<run_dir>/heartbeat.json` every few seconds by a thread; the loop only
  assigns fields) and `MetricsWriter` (`metrics.jsonl` lines appended by a background thread, so
  a log step never waits on the file system). `build_bert_config` resolves the encoder config;
  `build_engine` is the one place a model meets DeepSpeed; `all_reduce_sum` sums metrics over
  ranks (one host sync); `peak_flops` measures (and caches in the run dir) the dense matmul peak
  MFU is quoted against.
- On the driver: `torch_trainer` builds the TorchTrainer every job runs under; `fit_with_watchdog`
  runs `trainer.fit()` and ends it with `TrainingStalled` (naming the starved stage) when the
  heartbeat stops moving; `publish_export` copies a checkpoint's HF export to `<run_dir>/export`.
- Phases in the heartbeat: "starting" (model and engine set-up), "data" (waiting for the next
  micro-batch), "step" (forward/backward/optimizer), "eval", "checkpoint".
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bert_core.masking import Masker
from bert_core.model import BertConfig, preset
from pipelines import storage
from pipelines.storage import Mirror

DTYPES = ("fp32", "bf16", "fp16")
FAULT_DRILL_ENV = "RAYBERT_FAULT_DRILL"


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
    log_every: int = 10  # steps between metrics lines (the budget/deadline is checked then too)
    eval_every: int = 500
    save_every: int = 1000
    keep_last: int = 2  # checkpoints kept in the run dir
    # Dense matmul FLOP/s of one worker for MFU; None = measured by a short matmul probe on the
    # worker's device, dtype and threads (cached in <run_dir>/peak_flops.json).
    peak_flops_per_worker: Optional[float] = None
    # Stop the job with TrainingStalled when no micro-batch, step or eval batch completes for this
    # many seconds (start-up, before the first step, gets max(2x, 120 s)); None or 0 = never.
    stall_timeout_s: Optional[float] = 300.0
    # Extra DeepSpeed config merged over the one built from these fields (as HF's --deepspeed):
    # ZeRO tuning (overlap_comm, bucket sizes, offload_optimizer/offload_param), communication
    # and activation settings. The keys raybert derives from this config (batch sizes, clipping,
    # ZeRO stage, precision) may repeat our values but not contradict them, and `optimizer` /
    # `scheduler` are refused: raybert brings its own (see `ds_config`).
    deepspeed: Optional[dict] = None
    # Opt-in experiment trackers (pipelines/tracking.py), rank 0 only: settings for Ray's
    # setup_mlflow (tracking_uri, experiment_name, ...) / for wandb.init (project, entity, mode,
    # ...); {} = defaults, None = off. metrics.jsonl and TensorBoard events are always written.
    mlflow: Optional[dict] = None
    wandb: Optional[dict] = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"decay must be linear, cosine or constant, got {self.decay!r}")
        if self.max_steps < 1 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, micro_batch_size and grad_accum must be >= 1")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")


@dataclass
class FaultDrill:
    """Faults a test or chaos run injects into the pretraining loop; never set by users.

    The driver reads it from the RAYBERT_FAULT_DRILL environment variable (JSON with these keys)
    when it builds the loop config, so the jobs' user-facing configs carry no fault fields.
    """

    kill_rank: Optional[int] = None  # this rank SIGKILLs itself right after step `kill_at_step`,
    kill_at_step: Optional[int] = None  # once per run dir (a marker file records that it happened)
    stall_at_step: Optional[int] = None  # rank 0 hangs forever after this step (and its checkpoint)

    @classmethod
    def from_env(cls) -> "FaultDrill":
        raw = os.environ.get(FAULT_DRILL_ENV)
        return cls(**json.loads(raw)) if raw else cls()


# --------------------------------------------------------------------------------------------
# Model config, schedule and the one DeepSpeed wrap
# --------------------------------------------------------------------------------------------


def build_bert_config(model: ModelConfig, vocab_size: int) -> BertConfig:
    """The encoder config: `init_from`'s or the preset's, plus overrides, covering the tokenizer."""
    if model.init_from:
        cfg = BertConfig.from_json(Path(storage.cached_copy(model.init_from)) / "config.json")
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


def import_deepspeed():
    """`import deepspeed`, without the MLflow import that DeepSpeed's autotuner makes on the way.

    DeepSpeed 0.19's `deepspeed.autotuning.autotuner` (loaded by `import deepspeed` itself, through
    `runtime.config`) tries `import mlflow` to log autotuning experiments, which raybert never
    runs. Where MLflow is installed, that import is most of `import deepspeed`: 2.8 of 3.5 s of CPU
    on a 2-core EPYC, paid by every training worker and by the driver. While DeepSpeed loads,
    `mlflow` is hidden (None in sys.modules makes `import mlflow` raise ImportError, which the
    autotuner catches); afterwards it imports as usual, for raybert's own MLflow tracker.
    """
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def disable_deepspeed_jit() -> None:
    """Keep DeepSpeed from JIT-compiling its shm/ccl comm ops on init (~30 s, 1.5 GB on CPU).

    `deepspeed.ops.__compatible_ops__` is a lazily probed dict (probing spawns compilers); setting
    it before first access skips the probe too. Only deepspeed/comm reads it (0.19.8), and gloo /
    nccl collectives work without those ops.
    """
    import_deepspeed()
    import deepspeed.ops as ops

    compat = ops.__dict__.setdefault("__compatible_ops__", {})
    compat["deepspeed_shm_comm"] = False
    compat["deepspeed_ccl_comm"] = False


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
            raise ValueError(f"deepspeed config: {key!r} is not accepted: {_DS_REFUSED[key]}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_deepspeed(out[k], v, key + ".")
            continue
        if key in _DS_OWNED:
            mine = out.get(k, False if key.endswith(".enabled") else None)
            if v != mine:
                raise ValueError(f"deepspeed config: {key} = {v!r} contradicts raybert's {mine!r}, which comes "
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
    optimizer = torch.optim.AdamW(param_groups or _param_groups(model, train.weight_decay), lr=train.lr,
                                  betas=tuple(train.betas), eps=train.eps)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, train.warmup_steps, train.max_steps, train.decay, train.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config(train, world_size))
    return engine


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


# --------------------------------------------------------------------------------------------
# Seeding: every draw is a function of the data position
# --------------------------------------------------------------------------------------------


def derive_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1, np.uint64)[0] >> 1)


def mlm_step_inputs(masker: Masker, input_ids: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    return masker(input_ids.cpu(), generator=g)


# --------------------------------------------------------------------------------------------
# Worker context, collectives, metrics and the heartbeat
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device
    threads: int  # torch CPU threads this worker computes with


def held_cpus() -> float:
    """CPUs Ray assigned to this worker (0 outside a Ray task/actor)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # not in a Ray worker
        return 0.0


def torch_threads_for(cpus: float, override: Optional[int] = None) -> int:
    """Threads to compute with: the override, else the CPUs held rounded up, at least 1. Ray sets
    OMP_NUM_THREADS=1 for a fractional CPU reservation, so a worker holding 1.5 of 2 CPUs would
    otherwise train on one thread while the other core idles."""
    if override is not None:
        if override < 1:
            raise ValueError(f"torch_threads must be >= 1, got {override}")
        return int(override)
    return max(1, math.ceil(cpus - 1e-9))


def worker_context(use_gpu: bool, torch_threads: Optional[int] = None) -> WorkerContext:
    """Rank, world size and device of this Ray Train worker; sets torch's CPU thread count."""
    import ray.train

    ctx = ray.train.get_context()
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    threads = torch_threads_for(held_cpus(), torch_threads)
    torch.set_num_threads(threads)
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device, threads)


def all_reduce_sum(values, device) -> list[float]:
    """Sum numbers (a list, or a tensor already on `device`) over every rank; one host sync."""
    import torch.distributed as dist

    # On the worker's device: NCCL (GPU workers) reduces CUDA tensors only.
    t = values.to(device, torch.float64) if torch.is_tensor(values) else torch.tensor(
        values, dtype=torch.float64, device=device)
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


_SYNC = object()  # MetricsWriter.sync's request to the metrics thread


class MetricsWriter:
    """Appends JSON lines to `path`, and the numeric fields of each record with a `step` as
    TensorBoard scalars under `tensorboard_dir`, from a background thread (path None: a no-op,
    for ranks > 0).

    `write` only enqueues, so a log step never waits on storage (a network file system can take
    seconds); `close` drains the queue. Records are written in order.
    """

    # Not curves: the step is the x axis, the rest are wall-clock and bookkeeping.
    _NOT_SCALARS = frozenset({"step", "time", "epoch", "world_size", "threads"})

    def __init__(self, path: Optional[Path], tensorboard_dir: Optional[Path] = None,
                 mirror: Optional[Mirror] = None, mirror_every_s: float = 30.0, trackers=None):
        self.path, self.tensorboard_dir = path, tensorboard_dir
        # Opt-in MLflow / W&B (pipelines/tracking.py): a factory, called in the metrics thread so
        # the trackers are opened, fed and closed by one thread and never by the step.
        self.trackers = trackers
        # A remote run dir: the files are written to a local staging dir, and `mirror` uploads
        # what changed every `mirror_every_s` and at close (object stores can't append).
        self.mirror, self.mirror_every_s = mirror, mirror_every_s
        self._q: queue.Queue = queue.Queue()
        self._thread = None
        if path is not None:
            self._thread = threading.Thread(target=self._drain, name="raybert-metrics", daemon=True)
            self._thread.start()

    def write(self, record: dict) -> None:
        if self._thread is not None:
            self._q.put(record)

    def sync(self) -> None:
        """Flush what was written so far and, for a remote run dir, upload it now rather than at the
        next `mirror_every_s`: called before each checkpoint, so a killed run's store holds the
        metrics of every step its checkpoints cover. Returns at once (the metrics thread does it)."""
        if self._thread is not None:
            self._q.put(_SYNC)

    def _scalars(self, tb, trackers, record: dict) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        scalars = {k: float(v) for k, v in record.items()
                   if k not in self._NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        if tb is not None:
            for k, v in scalars.items():
                tb.add_scalar(k, v, global_step=step, walltime=record.get("time"))
        if trackers is not None:
            trackers.log(scalars, step)

    def _drain(self) -> None:
        tb = None
        if self.tensorboard_dir is not None:
            from tensorboardX import SummaryWriter  # a ray[train] dependency

            tb = SummaryWriter(logdir=str(self.tensorboard_dir), flush_secs=30)
        trackers = self.trackers() if self.trackers is not None else None
        synced = time.monotonic()
        try:
            with open(self.path, "a") as f:
                while True:
                    try:
                        record = self._q.get(timeout=self.mirror_every_s if self.mirror else None)
                    except queue.Empty:
                        record = ...  # time to mirror, nothing to write
                    if record is None:
                        return
                    if record is not ... and record is not _SYNC:
                        f.write(json.dumps(record) + "\n")
                        self._scalars(tb, trackers, record)
                    if self._q.empty() or record is _SYNC:
                        f.flush()
                        if self.mirror and (record is _SYNC or time.monotonic() - synced >= self.mirror_every_s):
                            if tb is not None:
                                tb.flush()
                            self._sync()
                            synced = time.monotonic()
        finally:
            if tb is not None:
                tb.close()
            if trackers is not None:
                trackers.close()
            self._sync()

    def _sync(self) -> None:
        if self.mirror is None:
            return
        try:
            self.mirror.sync()
        except (OSError, ValueError) as e:  # an unreachable store must not kill training; retried next time
            print(f"raybert: could not upload metrics to {self.mirror.loc}: {e}", flush=True)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None


PHASES = ("starting", "data", "step", "eval", "checkpoint")


class Heartbeat:
    """Rank 0's liveness for the driver's watchdog: {step, phase, ticks}, written atomically to
    `<run_dir>/heartbeat.json` every `interval_s` by a background thread. The loop only assigns
    attributes (`ticks` counts micro-batches and eval batches), so beating costs the step nothing.
    """

    def __init__(self, path: Optional[str], interval_s: float):
        self.path, self.interval_s = path, interval_s  # a local path or a URI (pipelines/storage.py)
        self.step, self.phase, self.ticks = 0, "starting", 0
        self.stepped = False  # a step completed in this invocation: start-up is over
        self._stop = threading.Event()
        self._thread = None
        if path is not None:
            self._write()
            self._thread = threading.Thread(target=self._run, name="raybert-heartbeat", daemon=True)
            self._thread.start()

    def beat(self, phase: str, step: Optional[int] = None) -> None:
        """Enter `phase`; `step` when a step has just completed."""
        self.phase = phase
        self.ticks += 1
        if step is not None:
            self.step, self.stepped = step, True

    def _write(self) -> None:
        record = {"step": self.step, "phase": self.phase, "ticks": self.ticks, "stepped": self.stepped,
                  "time": time.time(),
                  "pid": os.getpid(), "host": socket.gethostname()}
        storage.write_text(self.path, json.dumps(record) + "\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._write()
            except (OSError, ValueError):  # a full disk or flaky store must not kill training; the watchdog will tell
                pass

    def close(self) -> None:
        """Stop the thread and leave the last state on disk."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self._write()
            except (OSError, ValueError):
                pass


def heartbeat_interval(stall_timeout_s: Optional[float]) -> float:
    return min(5.0, max(0.5, (stall_timeout_s or 60.0) / 6))


@contextmanager
def worker_session(run_dir: str, use_gpu: bool, torch_threads: Optional[int], stall_timeout_s: Optional[float],
                   train: Optional[TrainConfig] = None, params: Optional[dict] = None):
    """What every training loop opens first: (WorkerContext, Heartbeat, MetricsWriter); rank 0's
    heartbeat (when the watchdog is on), metrics file and TensorBoard events (`run_dir/tensorboard`)
    live in `run_dir`, and are closed (the metrics queue drained) however the loop ends.

    `run_dir` may be a URI (s3://...): the heartbeat is then written to the store directly (one
    small PUT every few seconds), while metrics and TensorBoard events are written to a local
    staging dir (seeded with the run's metrics so far) and mirrored to the store. `train.mlflow` /
    `train.wandb` open those trackers on rank 0 (pipelines/tracking.py), with `params` as the run's
    logged config."""
    wc = worker_context(use_gpu, torch_threads)
    lead = wc.rank == 0
    beat = Heartbeat(storage.join(run_dir, "heartbeat.json") if lead and stall_timeout_s else None,
                     heartbeat_interval(stall_timeout_s))
    trackers = None
    if lead and train is not None and (train.mlflow is not None or train.wandb is not None):
        from functools import partial

        from pipelines.tracking import Trackers

        trackers = partial(Trackers, train.mlflow, train.wandb, str(run_dir), params or {})
    staging = None
    if lead and storage.is_uri(run_dir):
        staging = tempfile.mkdtemp(prefix="raybert-run-")
        previous = storage.read_text(storage.join(run_dir, "metrics.jsonl"))
        if previous:
            Path(staging, "metrics.jsonl").write_text(previous)
        local = Path(staging)
        log = MetricsWriter(local / "metrics.jsonl", local / "tensorboard", mirror=storage.Mirror(staging, run_dir),
                            trackers=trackers)
    else:
        log = MetricsWriter(Path(run_dir, "metrics.jsonl") if lead else None, Path(run_dir, "tensorboard"),
                            trackers=trackers)
    try:
        yield wc, beat, log
    finally:
        log.close()
        beat.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU: measured, never assumed
# --------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure_peak_flops(device: torch.device, dtype: str, budget_s: float = 1.0) -> float:
    """Best FLOP/s of square matmuls on `device` in `dtype` at torch's current thread count.

    The size doubles (CPU 256 -> 2048, GPU 1024 -> 8192) while one matmul takes under a tenth of
    the budget, so a fast device is measured at a size that approaches its peak and a slow path
    (bf16 on a CPU without bf16 instructions runs ~1000x slower than fp32) still returns quickly.
    """
    n, n_max = (1024, 8192) if device.type == "cuda" else (256, 2048)
    dt = _TORCH_DTYPES[dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(a, b) -> float:
        t = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t

    t_end = time.perf_counter() + budget_s
    while True:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        timed(a, b)  # warm-up: kernel selection, allocations
        first = timed(a, b)
        if n >= n_max or first > budget_s / 10:
            break
        n *= 2
    best = first
    while time.perf_counter() + best < t_end:
        best = min(best, timed(a, b))
    return 2 * n ** 3 / best


def peak_flops(run_dir: Optional[str | Path], device: torch.device, dtype: str, threads: int) -> float:
    """This worker's measured peak, cached in `<run_dir>/peak_flops.json` (a local path or a URI)
    by (host, device, dtype, threads) so resumes and restarts don't re-measure."""
    key = f"{socket.gethostname()}|{device_name(device)}|{dtype}|{threads if device.type == 'cpu' else 'gpu'}"
    path = storage.join(str(run_dir), "peak_flops.json") if run_dir is not None else None
    cache = {}
    if path is not None:
        try:
            cache = json.loads(storage.read_text(path) or "{}")
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return float(cache[key])
    peak = measure_peak_flops(device, dtype)
    if path is not None:  # a lost race between ranks loses an entry, never the file
        storage.write_text(path, json.dumps({**cache, key: peak}, indent=1) + "\n")
    return peak


# --------------------------------------------------------------------------------------------
# Driver side: the trainer, the stall watchdog, the export
# --------------------------------------------------------------------------------------------


def torch_trainer(loop_fn, loop_config: dict, *, run_dir: str | Path, num_workers: int, use_gpu: bool,
                  cpus_per_worker: float, max_failures: int, keep_last: int, datasets: dict,
                  dataset_config=None):
    """The TorchTrainer every training job runs under: one rank per worker (a GPU each with
    `use_gpu`, NCCL; else gloo on CPU), checkpoints in `run_dir` (a local path or a URI: Ray
    Train writes through pyarrow.fs), worker-group restarts on failure."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=storage.basename(str(run_dir)), storage_path=storage.parent(str(run_dir)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_last),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            worker_runtime_env=cpu_worker_runtime_env() if not use_gpu else {}),
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    return _without_placement_group_cleaner(trainer)


def cpu_worker_runtime_env() -> dict:
    """Environment for CPU training workers: OpenMP threads sleep when idle instead of spinning.

    A CPU worker shares its node's cores with Ray Data's read/tokenize/mask tasks. With OpenMP's
    default (active) waiting, the worker's idle threads spin between parallel regions and take
    those cores from the data tasks, which the step then waits on: passive waiting made the whole
    `raybert pretrain` job 1.3x faster on 2 cores (BENCHMARKS.md). libgomp reads the variable once,
    when torch loads, so it must be in the worker's environment from process start, not set by the
    loop. A value the user exported on the driver wins.
    """
    return {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}


def _without_placement_group_cleaner(trainer):
    """Drop Ray Train 2.60's PlacementGroupCleaner from `trainer.fit()`.

    The cleaner polls the state API for the controller actor and removes the run's placement group
    when the lookup comes back empty, which a loaded head node's state API does now and then: the
    live run's workers are then destroyed ("Destroying worker since its placement group was
    removed") and the run fails. Our CI saw it twice in one run under load; later Ray treats an
    empty lookup as transient (ray-project/ray#65447). What the cleaner guards against, a
    controller that dies while its job driver lives on, ends with the driver here: Ray frees a
    job's placement groups when its driver exits.
    """
    make_callbacks = getattr(trainer, "_create_default_callbacks", None)
    if make_callbacks is None:  # a Ray without the hook: nothing to drop
        return trainer

    def callbacks():
        return [c for c in make_callbacks() if type(c).__name__ != "PlacementGroupCleanerCallback"]

    trainer._create_default_callbacks = callbacks
    return trainer


class TrainingStalled(RuntimeError):
    """No training progress for the stall timeout; `stage` names where it stopped: "workers" (never
    started: the cluster lacks the resources requested), "starting", "data", "step", "eval" or
    "checkpoint"."""

    def __init__(self, message: str, stage: str, step: Optional[int], waited_s: float):
        super().__init__(message)
        self.stage, self.step, self.waited_s = stage, step, waited_s


_ADVICE = {
    "workers": "the cluster lacks the resources the workers request (CPUs/GPUs per worker x "
               "num_workers); use fewer workers or fewer CPUs per worker, or add nodes",
    "starting": "the workers started but never became ready (model, DeepSpeed or process-group "
                "set-up); check the worker logs and that every worker can reach the others",
    "data": "the data pipeline delivered no batch: it is likely starved of CPUs; leave CPUs "
            "for Ray Data (fewer workers or fewer CPUs per worker) or check the input files",
    "step": "a training step never finished: a worker is hung or the step is slower than the "
            "timeout; check the worker logs, or raise train.stall_timeout_s",
    "eval": "evaluation stopped making progress; check the worker logs or the validation data",
    "checkpoint": "writing a checkpoint never finished; check that the run dir's storage is "
                  "reachable and has space, or raise train.stall_timeout_s",
}


def _read_heartbeat(path: str, since: float) -> Optional[dict]:
    try:
        hb = json.loads(storage.read_text(path) or "null")
    except (OSError, ValueError):  # caught mid-replace on a non-POSIX store, or the store unreachable
        return None
    if not isinstance(hb, dict):
        return None
    return hb if hb.get("time", 0) >= since else None  # ignore a previous invocation's


def stall_error(hb: Optional[dict], waited_s: float) -> TrainingStalled:
    stage = "workers" if hb is None else hb.get("phase", "step")
    step = None if hb is None else hb.get("step")
    where = "no worker ever started" if hb is None else f"stuck in '{stage}' after step {step}"
    return TrainingStalled(f"training stalled: {where}, no progress for {waited_s:.0f} s; "
                           f"{_ADVICE.get(stage, _ADVICE['step'])}", stage, step, waited_s)


def fit_with_watchdog(trainer, run_dir: str | Path, stall_timeout_s: Optional[float],
                      startup_s: Optional[float] = None):
    """`trainer.fit()`, ended with `TrainingStalled` when rank 0's heartbeat shows no progress
    (step, phase or tick unchanged) for `stall_timeout_s`; before the first step of this
    invocation, the allowance is `startup_s`, by default max(2 x timeout, 120 s) (Ray Train
    start-up, engine set-up, the data pipeline's first blocks).

    Stopping: a watchdog thread interrupts the main thread as Ctrl-C would; Ray Train's own SIGINT
    handler (installed by `fit` on the main thread) aborts the controller, which kills the worker
    group and its actors, and this function raises `TrainingStalled` in place of what `fit` raised.
    Checkpoints already written stay in the run dir. Off the main thread, or with a timeout of
    None/0, this is plain `trainer.fit()`.
    """
    import _thread
    import signal

    if not stall_timeout_s or threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    path = storage.join(str(run_dir), "heartbeat.json")
    t0 = time.time()
    stop, lock = threading.Event(), threading.Lock()
    stalled: list[TrainingStalled] = []
    startup_s = max(2 * stall_timeout_s, 120.0) if startup_s is None else startup_s

    def watch():
        seen, changed = None, time.monotonic()
        while not stop.wait(min(1.0, stall_timeout_s / 4)):
            hb = _read_heartbeat(path, t0)
            state = None if hb is None else (hb.get("step"), hb.get("phase"), hb.get("ticks"))
            now = time.monotonic()
            if state != seen:
                seen, changed = state, now
            allowed = stall_timeout_s if hb is not None and hb.get("stepped") else startup_s
            if now - changed > allowed:
                with lock:
                    if stop.is_set():
                        return
                    stalled.append(stall_error(hb, now - changed))
                    _thread.interrupt_main()
                return

    previous = signal.getsignal(signal.SIGINT)
    watchdog = threading.Thread(target=watch, name="raybert-watchdog", daemon=True)
    watchdog.start()
    try:
        result = trainer.fit()
    except BaseException as e:
        if stalled:
            raise stalled[0] from None
        raise e
    finally:
        with lock:
            stop.set()
        watchdog.join()
        signal.signal(signal.SIGINT, previous)  # fit leaves Ray's abort-this-run handler installed
    if stalled:  # fit returned as the interrupt landed: the run did stall
        raise stalled[0]
    return result


def publish_export(checkpoint: Optional[str], run_dir: str | Path) -> Optional[str]:
    """Copy a checkpoint's `hf/` export to `run_dir/export`, replacing the previous one whole
    (either may be a URI). Returns the export's location."""
    if checkpoint is None or not storage.is_dir(storage.join(str(checkpoint), "hf")):
        return None
    export = storage.join(str(run_dir), "export")
    storage.replace_tree(storage.join(str(checkpoint), "hf"), export)
    return export
