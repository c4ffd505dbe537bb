"""`ScoreConfig` and `ResourceConfig`: what one `raybert score` run takes (flags and YAML keys are
these fields) and their own rules (`ScoreConfig.check`), with the task, precision and device names,
and `GpuWaitTimeout`, what a run that asked for GPUs raises when none came.
Torch- and Ray-free, so the CLI and the driver's checks load them at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from pipelines import UserError
from pipelines.training.config import DTYPES

TASKS = ("embed", "classify", "tag", "fill-mask")
HEAD_OF_TASK = {"embed": "embed", "classify": "classify", "tag": "tag", "fill-mask": "mlm"}
DTYPE_CHOICES = ("auto",) + DTYPES  # auto: chosen once per job (pipelines.scoring.precision.job_dtype)
POOLINGS = ("mean", "cls", "max")  # embed pooling: bert_core.model.POOLINGS (a test keeps them equal)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ResourceConfig:
    """How the job uses the cluster. None means: size it from the cluster (see cpu_plan)."""

    num_actors: Optional[int] = None  # predictor actors; default one per GPU, else one per CPU (memory permitting)
    actor_num_cpus: Optional[float] = None  # logical CPUs each actor reserves (CPU clusters: auto)
    task_num_cpus: float = 0.25  # score_dataset's Ray Data tasks (tokenizing, on GPUs); fractional: never starved
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
    task_max_retries: int = 4  # retries of a failed score_dataset tokenize task (on GPUs)


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
    # auto (GPU: bf16; CPU: bf16 with AMX, else as measured once per machine) | fp32 | bf16 | fp16 (GPU)
    dtype: str = "auto"
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
        """Ready to run: every setting's type and rule (pipelines.settings, the walker the CLI ran
        over its sources), and the settings a run can't do without; on the driver, before anything
        touches disk or Ray (preflight then checks the model, inputs and output against it)."""
        from pipelines.settings import check

        check(self, "score")
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise UserError(f"score: {name} is required")


class GpuWaitTimeout(TimeoutError):
    """GPU predictor actors were asked for, and none started within `resources.gpu_wait_s`. Raised
    before any row is read; the job kills its actors on the way out, which withdraws the GPU demand
    an autoscaler sees."""


class ActorsLost(RuntimeError):
    """Predictor or tokenizing actors could not be placed or started, or died more often than
    `resources.max_restarts` allows (often: out of memory). The units they committed stay; a
    rerun finishes the output."""


class UnitFailed(RuntimeError):
    """A unit could not be scored, for a reason no retry would change: its input could not be read
    (a corrupt or changed file), its output could not be written, or the model did not load. Its
    message names the file and the cause; the CLI shows it as one line (jobs/score.py)."""

    file: Optional[str] = None  # on the driver (`collect`): the file the unit reads


class NotRead(UnitFailed):
    pass


class NotWritten(UnitFailed):
    pass


class NotLoaded(UnitFailed):
    pass
