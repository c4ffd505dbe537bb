"""`ScoreConfig` and `ResourceConfig`: what one `raybert score` run takes (flags and YAML keys are
these fields) and their own rules (`ScoreConfig.check`), with the task, precision and device names,
and `GpuWaitTimeout`, what a run that asked for GPUs raises when none came.
Torch- and Ray-free, so the CLI and the driver's checks load them at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from pipelines.training.config import DTYPES

TASKS = ("embed", "classify", "tag", "fill-mask")
HEAD_OF_TASK = {"embed": "embed", "classify": "classify", "tag": "tag", "fill-mask": "mlm"}
DTYPE_CHOICES = ("auto",) + DTYPES  # auto: chosen once per job (pipelines.scoring.job.job_dtype)
POOLINGS = ("mean", "cls", "max")  # embed pooling: bert_core.model.POOLINGS (a test keeps them equal)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ResourceConfig:
    """How the job uses the cluster. None means: size it from the cluster (see cpu_plan)."""

    num_actors: Optional[int] = None  # predictor actors; default one per GPU, else one per CPU (memory permitting)
    actor_num_cpus: Optional[float] = None  # logical CPUs each actor reserves (CPU clusters: auto)
    task_num_cpus: float = 0.25  # read/tokenize/write tasks; fractional so actors can't starve them
    torch_threads: Optional[int] = None  # intra-op threads per actor (default: its share of the CPUs; 1 on CPU)
    # auto: GPU actors if the cluster has GPUs now, else CPU | cpu | cuda: GPU actors even if no GPU node has
    # joined yet (their pending demand makes an autoscaler start GPU nodes; see cpu_plan)
    device: str = "auto"
    max_gpu_actors: int = 8  # device cuda: the pool's most GPU actors, if num_actors is unset and no GPU is there yet
    # device cuda: stop with an error if no GPU actor has started after this many seconds (a GPU node takes
    # minutes to boot; never wait forever on an autoscaler that can't deliver one)
    gpu_wait_s: float = 900.0
    # CPU actors (1 CPU each) that read and tokenize units for the predictor actors (pipelines/scoring/feed.py).
    # Default: on GPUs one per CPU the GPU actors leave, on CPUs none (each predictor actor tokenizes its own
    # units; setting it there, leave them room with --num-actors / actor_num_cpus)
    tokenizer_actors: Optional[int] = None
    max_restarts: int = 4  # restarts of a killed predictor actor
    max_task_retries: int = 4  # retries of the unit whose actor died
    task_max_retries: int = 4  # retries of a failed read/tokenize/write task


@dataclass
class ScoreConfig:
    """Everything one scoring run needs; `raybert score` flags and YAML keys are these fields."""

    input: Union[str, list] = ""  # Parquet/CSV/JSON Lines file(s), directory or glob (or a list of them)
    output: str = ""  # output directory (Parquet files + _SUCCESS.json)
    model: str = ""  # HF BERT directory or raybert checkpoint
    task: str = "embed"  # embed | classify | tag | fill-mask
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # second text for sentence pairs
    id_column: str = "id"  # if absent from the data, ids are "<file>#<row_hash hex>"
    # tokens per row (longer rows are truncated and flagged); at most the model's position table (more is refused).
    # None: the model's own, i.e. a sentence-transformers export's max_seq_length for embed (as
    # `SentenceTransformer.encode` truncates), else the position table.
    max_length: Optional[int] = None
    max_tokens: int = 4096  # token budget per forward pass: rows x longest row
    batch_size: int = 1024  # rows per block; the token-budget batcher sorts by length within it
    max_batch_rows: Optional[int] = None  # optional cap on rows per forward pass
    dtype: str = "auto"  # auto (GPU: bf16, else fp16; CPU: bf16 only where measured faster) | fp32 | bf16 | fp16 (GPU)
    # embed: mean | cls | max, and L2-normalize or not. Default: the checkpoint's saved choice, else
    # its sentence-transformers files (1_Pooling/config.json, a Normalize module), else mean + True.
    pooling: Optional[str] = None
    normalize: Optional[bool] = None
    top_k: int = 5  # fill-mask: candidates per [MASK] (>= 1)
    tokenizer: Optional[str] = None  # tokenizer dir if not the model's
    head: Optional[str] = None  # task head of a multi-task checkpoint (default: its primary task)
    address: Optional[str] = None  # Ray address; None: RAY_ADDRESS or an embedded local Ray
    checkpoint_dir: Optional[str] = None  # resume state; default "<output>.checkpoint" (shared storage on a cluster)
    overwrite: bool = False  # discard an existing output/checkpoint of this job and score again
    # classify/tag/fill-mask on a checkpoint without that head: refused, unless this is set (the head
    # is then freshly initialized: untrained, random outputs; for pipeline tests only)
    allow_untrained_head: bool = False
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def check(self) -> None:
        """The config's own rules, checked once, on the driver, before anything touches disk or Ray
        (preflight then checks the model, inputs and output against it)."""
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise ValueError(f"score: {name} is required")
        if self.task not in TASKS:
            raise ValueError(f"score: task must be one of {TASKS}, got {self.task!r}")
        if self.task == "tag" and self.text_pair_column:
            raise ValueError("task tag scores single texts; text_pair_column is not supported with it")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"score: dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.max_tokens < 1 or self.batch_size < 1 or (self.max_length is not None and self.max_length < 3):
            raise ValueError("score: max_tokens and batch_size must be >= 1, max_length >= 3")
        if self.top_k < 1:
            raise ValueError(f"score: top_k must be >= 1 (candidates per [MASK]), got {self.top_k}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"score: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.resources.num_actors is not None and self.resources.num_actors < 1:
            raise ValueError(f"score: resources.num_actors must be >= 1 (leave it unset for one per GPU, else one "
                             f"per CPU), got {self.resources.num_actors}")
        if self.resources.device not in DEVICES:
            raise ValueError(f"score: resources.device must be one of {DEVICES}, got {self.resources.device!r}")
        if self.resources.tokenizer_actors is not None and self.resources.tokenizer_actors < 0:
            raise ValueError(f"score: resources.tokenizer_actors must be >= 0 (0: each predictor actor tokenizes its "
                             f"own units; unset: the default), got {self.resources.tokenizer_actors}")
        if self.resources.max_gpu_actors < 1 or not self.resources.gpu_wait_s > 0:
            raise ValueError(f"score: resources.max_gpu_actors must be >= 1 and resources.gpu_wait_s > 0, got "
                             f"{self.resources.max_gpu_actors} and {self.resources.gpu_wait_s}")


class GpuWaitTimeout(TimeoutError):
    """GPU predictor actors were asked for, and none started within `resources.gpu_wait_s`. Raised
    before any row is read; the job kills its actors on the way out, which withdraws the GPU demand
    an autoscaler sees."""


class ActorsLost(RuntimeError):
    """Predictor or tokenizing actors could not be placed or started, or died more often than
    `resources.max_restarts` allows (often: out of memory). The units they committed stay; a
    rerun finishes the output."""
