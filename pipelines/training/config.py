"""The configs every training job shares, torch-free (the CLI and the driver import them without
loading torch): `ModelConfig` (which encoder), `TrainConfig` (optimizer, schedule, precision, ZeRO,
logging and checkpoint cadence, the stall timeout), `ScalingConfig` (workers, GPUs, CPUs),
`FaultDrill` (fault injection for tests and chaos runs only: set through RAYBERT_FAULT_DRILL, never
by users), and the fine-tuning options `FinetuneOptions`. Their rules (ranges, choices) are in
pipelines/settings.py, checked with every source applied."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

DTYPES = ("fp32", "bf16", "fp16")
INITS = ("bert", "neighbour")  # ModelConfig.init
FAULT_DRILL_ENV = "RAYBERT_FAULT_DRILL"


@dataclass
class ModelConfig:
    preset: str = "mini"  # bert_core preset: debug | mini | small | base | large
    init_from: Optional[str] = None  # HF checkpoint dir to start from instead of fresh weights
    overrides: dict = field(default_factory=dict)  # BertConfig fields on top of the preset
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, ~30% more compute
    # Dropout while pretraining (hidden, attention, head); None = the encoder config's. Exports keep
    # the config's value, so a fine-tune from them starts with the usual dropout.
    train_dropout: Optional[float] = None
    # Fresh weights: "bert" (BERT's normal init) or "neighbour" (bert_core/init.py: sinusoidal
    # position starts and first-layer heads that attend to the next and previous tokens; the
    # architecture and the export are BERT's). Ignored with init_from.
    init: str = "bert"


@dataclass
class TrainConfig:
    max_steps: int = 10_000  # optimizer steps of the whole run; the LR schedule spans them
    stop_at: Optional[int] = None  # end this invocation at this step (checkpointing), e.g. a scheduled slice
    time_budget_s: Optional[float] = None  # end this invocation after this long (checkpointing)
    steps_per_run: Optional[int] = None  # end this invocation this many steps after where it resumed
    # Wall-clock deadline (Unix seconds) of this invocation: training stops early enough to write
    # its checkpoint before it (set by `raybert pretrain --time-budget`).
    deadline: Optional[float] = None
    # Training seconds of the whole run, across invocations: the LR schedule is re-planned from the
    # measured step time to reach its floor when they run out, and the run ends there (or at
    # max_steps, if sooner). pipelines/training/run_plan.py says what time counts. None = plan by steps.
    total_time_budget_s: Optional[float] = None
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
    # A mapping, or the path of a DeepSpeed JSON file (`--deepspeed FILE`), read on the driver.
    deepspeed: Union[dict, str, None] = None
    # Opt-in experiment trackers (pipelines/training/tracking.py), rank 0 only: settings for Ray's
    # setup_mlflow (tracking_uri, experiment_name, ...) / for wandb.init (project, entity, mode,
    # ...); {} = defaults, None = off. metrics.jsonl and TensorBoard events are always written.
    mlflow: Optional[dict] = None
    wandb: Optional[dict] = None


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    # GPUs: None = one per worker when the cluster has GPUs (NCCL), True = require them,
    # False = train on CPUs (gloo).
    use_gpu: Optional[bool] = None
    # CPUs each worker reserves; None = sized from the cluster, always leaving the Ray Data tasks a
    # budget (pipelines/resources.py). An explicit value that leaves them none is refused.
    cpus_per_worker: Optional[float] = None
    torch_threads: Optional[int] = None  # CPU threads per worker; None = the CPUs it holds, rounded up
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before giving up


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


MIXING = ("proportional", "weights", "round_robin")
METRICS = ("auto", "accuracy", "macro_f1", "entity_f1")


@dataclass
class FinetuneOptions:
    epochs: Optional[float] = 3.0  # passes over the labeled training rows; None = train.max_steps
    warmup_ratio: Optional[float] = 0.1  # warmup as a share of the steps; None = train.warmup_steps
    layer_lr_decay: float = 1.0  # < 1 trains lower layers slower (ELECTRA / BEiT style); 1 = off
    dropout: Optional[float] = None  # encoder hidden + attention dropout; None = the checkpoint's
    classifier_dropout: Optional[float] = None  # head dropout; None = dropout
    mixing: str = "proportional"  # multi-task: proportional | weights | round_robin
    metric: str = "auto"  # early-stopping score: auto | accuracy | macro_f1 | entity_f1
    patience: int = 0  # stop after this many evaluations without improvement; 0 = never early
    min_delta: float = 0.0  # an improvement must beat the best by more than this
