"""The batch-scoring pipeline on Ray Data: read Parquet -> tokenize -> predict -> write Parquet.

Contract:
- `plan_inputs(...)` runs on the driver before any work: it expands files, directories and globs,
  reads every file's Parquet footer, and fails with an error naming the file when a file is
  unreadable/corrupt or lacks a needed column (the message lists the columns present). It
  returns the file list, the expected row count and whether ids come from the data or are made
  from file + Ray's row hash.
- `preflight(cfg)` runs every check that needs no cluster, reading only, so a refused invocation
  changes nothing on disk: the model (`bert_core.check_checkpoint`: BERT config, weights open)
  and its tokenizer load; the inputs (`plan_inputs`; an object store that can't be reached is an
  error naming the URI); the output and checkpoint dir are not existing files, can be created, and
  overlap neither each other nor any input (equal, or one inside the other, however spelled:
  `file://`, relative, symlinked). With overwrite, the output must be ours (it holds our manifest
  or run record, or it is empty) and the checkpoint dir must hold only Ray Data checkpoint files:
  overwrite never deletes anything else. The task has its head in the checkpoint (classify on an
  encoder-only model is refused, naming what it has), and the tokenizer fits the embedding table.
- One output, one recipe: a run writes `<output>/_raybert_run.json` (RUN_RECORD) before any row,
  holding what makes its rows comparable (`run_recipe`: task, model and its fingerprint, head,
  lengths, pooling, dtype setting, columns, inputs). A resume, or a rerun of a finished output,
  under another recipe is refused on the driver, naming each difference (`check_resume`).
- `ScoreConfig` (with `ResourceConfig`) is the run's one typed config; `raybert score` flags and
  YAML keys are its fields. `ScoreConfig.check()` holds its rules and is the only place they are
  checked (`preflight` calls it).
- `score(cfg)` runs `preflight` again, then builds and runs the Ray Data program:
  `read_parquet(files, only the needed columns, include_row_hash)` -> `repartition` into blocks
  of `batch_size` rows (streaming) -> [GPU only: `map_batches(tokenize_batch)`, stateless CPU
  tasks] -> `map_batches(Predictor, compute=ActorPoolStrategy(...))` (`cpu_plan`: a fixed pool,
  or with device cuda one autoscaling from 1 GPU actor, that raises GpuWaitTimeout before any row
  is read if no GPU actor starts within resources.gpu_wait_s) -> `write_parquet(output)`.
  Every input row gives exactly one output row (see predictors.py for the columns).
- Where tokenization runs: a GPU actor must never wait on the CPU work of tokenizing, so on GPUs
  it is a stage of its own, on the CPUs beside them. On CPU the model and the tokenizer compete
  for the same cores anyway, and a separate stage only adds processes, scheduling and an object
  store round trip of the token ids. Measured on 2 cores (35,000 rows): read + tokenize as
  0.25-CPU tasks took 15.5 s (each task started a `tokenizers` thread pool of every core), as
  1-CPU tasks 4.6 s, and tokenizing in one process 2.0 s. So CPU actors tokenize their own blocks
  (`Predictor(tokenize=...)`), one process per CPU by default, each on one thread (torch and
  `tokenizers`), and GPU-side tokenize tasks run one `tokenizers` thread each.
- Resume: Ray Data's job-level checkpointing (`ray.data.checkpoint.CheckpointConfig`, beta in
  Ray 2.60) keyed on `row_hash`, Ray's deterministic hash of (file path, row index). User ids may
  repeat, so they can't be the key. Each write task records its row keys as a *pending*
  checkpoint before writing its data file and commits (renames) it after; a rerun first deletes
  data files whose checkpoint is still pending (half-written or unacknowledged), then filters
  out rows whose keys are committed. So after a kill -9 of the driver, rerunning the same
  command completes the output with exactly one row per input row. The checkpoint lives beside
  the output (`<output>.checkpoint` by default, which must be shared storage on a cluster). On
  success we write `<output>/_SUCCESS.json` (the summary; Parquet readers skip `_` files) and
  delete the checkpoint; a rerun of a finished job reports the manifest and does nothing.
  Runs must not overlap on one output (jobs.score locks `<output>.lock`); if writers did overlap,
  the output holds rows twice, and a rerun repairs it (`repair_duplicates`: one row per
  `row_hash`, after Ray has dropped uncommitted files and before the row count is checked).
- Fault tolerance: predictor actors restart (`max_restarts`) and their in-flight tasks are
  retried (`max_task_retries`); tasks retry (`max_retries`).
- CPU-only clusters: actors hold logical CPUs for their whole life, so on a small machine an
  actor pool plus Ray's checkpoint-filter actor (1 CPU, fixed by Ray) can leave no CPU for the
  read/write tasks, and Ray Data then waits forever. We give tasks fractional CPUs and size the
  predictor actors' reservation to leave room (`cpu_plan`). We use the V1 Parquet reader, whose
  read tasks honour `num_cpus` (V2 adds a 1-CPU file-listing task that can deadlock there).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.predictors import DTYPE_METADATA, TASKS, Predictor, tokenize_batch

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS.json"
# Written into the output when a run starts, before any row: the proof that the output is ours
# (all that `overwrite` may delete) and the run's recipe, which a resume must match.
RUN_RECORD = "_raybert_run.json"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


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
    max_restarts: int = 4  # restarts of a killed predictor actor
    max_task_retries: int = 4  # retries of a block whose actor died
    task_max_retries: int = 4  # retries of a failed read/tokenize/write task


@dataclass
class ScoreConfig:
    """Everything one scoring run needs; `raybert score` flags and YAML keys are these fields."""

    input: Union[str, list] = ""  # Parquet file(s), directory or glob (or a list of them)
    output: str = ""  # output directory (Parquet files + _SUCCESS.json)
    model: str = ""  # HF BERT directory or raybert checkpoint
    task: str = "embed"  # embed | classify | tag | fill-mask
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # second text for sentence pairs
    id_column: str = "id"  # if absent from the data, ids are "<file>#<row_hash hex>"
    # tokens per row (longer rows are truncated and flagged); capped by the model's position table.
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
        from pipelines.predictors import DTYPE_CHOICES

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
        from bert_core.model import POOLINGS

        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"score: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.resources.num_actors is not None and self.resources.num_actors < 1:
            raise ValueError(f"score: resources.num_actors must be >= 1 (leave it unset for one per GPU, else one "
                             f"per CPU), got {self.resources.num_actors}")
        if self.resources.device not in DEVICES:
            raise ValueError(f"score: resources.device must be one of {DEVICES}, got {self.resources.device!r}")
        if self.resources.max_gpu_actors < 1 or not self.resources.gpu_wait_s > 0:
            raise ValueError(f"score: resources.max_gpu_actors must be >= 1 and resources.gpu_wait_s > 0, got "
                             f"{self.resources.max_gpu_actors} and {self.resources.gpu_wait_s}")


# --------------------------------------------------------------------------------------------
# Inputs: expand, validate, count (driver side, before any work)
# --------------------------------------------------------------------------------------------


@dataclass
class InputPlan:
    files: list[str]  # absolute paths, sorted
    roots: dict[str, str]  # file -> the input root its fallback id is relative to
    rows: int  # total rows in the footers: the output must have exactly this many
    has_ids: bool  # True: ids come from the id column; False: "<file>#<row_hash hex>"
    columns: list[str]  # columns to read


def _is_uri(p: str) -> bool:
    return "://" in p


def _store(uri: str):
    """Turn pyarrow's failure to reach an object store (no network, no credentials, a bad
    bucket) into an error that names the URI, instead of a pyarrow traceback."""
    from pipelines.storage import reachable

    return reachable(uri)


def _expand(inputs: list[str]) -> tuple[list[str], dict[str, str]]:
    files: list[str] = []
    roots: dict[str, str] = {}
    for raw in inputs:
        if _is_uri(raw):
            import pyarrow.fs as pafs

            with _store(raw):
                fs, path = pafs.FileSystem.from_uri(raw)
                info = fs.get_file_info(path)
                listing = (fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if info.type == pafs.FileType.Directory else [])
            if info.type == pafs.FileType.Directory:
                found = [f.path for f in listing
                         if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                         and not any(part.startswith(("_", ".")) for part in os.path.relpath(f.path, path).split("/"))]
                scheme = raw.split("://", 1)[0]
                for f in sorted(found):
                    files.append(f"{scheme}://{f}")
                    roots[files[-1]] = raw
            elif info.type == pafs.FileType.File:
                files.append(raw)
            else:
                raise FileNotFoundError(f"input {raw} does not exist")
            continue
        p = os.path.abspath(raw)
        if any(c in raw for c in "*?["):
            matches = sorted(os.path.abspath(m) for m in glob.glob(raw, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"input glob {raw} matches no files")
            root = os.path.commonpath([os.path.dirname(m) for m in matches])
            for m in matches:
                files.append(m)
                roots[m] = root
        elif os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
                found += [os.path.join(dirpath, f) for f in filenames
                          if f.endswith(".parquet") and not f.startswith(("_", "."))]
            if not found:
                raise FileNotFoundError(f"input directory {p} has no .parquet files")
            for f in sorted(found):
                files.append(f)
                roots[f] = p
        elif os.path.isfile(p):
            files.append(p)
            roots[p] = os.path.dirname(p)
        else:
            raise FileNotFoundError(f"input {raw} does not exist")
    # The same file twice (listed twice, or reached again through a symlink or file://) would be
    # scored twice: refused, naming both spellings.
    seen: dict[str, str] = {}
    for f in files:
        key = _norm(f)
        if key in seen:
            also = f" (also as {seen[key]})" if seen[key] != f else ""
            raise ValueError(f"input file {f} is given more than once{also}; list each file once")
        seen[key] = f
    return files, roots


def _footer(path: str) -> pq.FileMetaData:
    try:
        if _is_uri(path):
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_file(p) as f:
                return pq.ParquetFile(f).metadata
        return pq.ParquetFile(path).metadata
    except Exception as e:  # ArrowInvalid, OSError, ...: say which file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e


def plan_inputs(inputs: str | list[str], text_column: str = "text", text_pair_column: Optional[str] = None,
                id_column: str = "id") -> InputPlan:
    """Expand and validate the inputs; raise before any work if one can't be scored."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files, roots = _expand(inputs)
    rows = 0
    with_id: list[str] = []
    without_id: list[str] = []
    for f in files:
        meta = _footer(f)
        present = meta.schema.to_arrow_schema().names
        for col in [text_column] + ([text_pair_column] if text_pair_column else []):
            if col not in present:
                raise ValueError(f"{f}: no column {col!r} (the text to score); columns present: {present}")
        (with_id if id_column in present else without_id).append(f)
        rows += meta.num_rows
    if with_id and without_id:
        raise ValueError(f"{without_id[0]}: no id column {id_column!r}, but other inputs (e.g. {with_id[0]}) "
                         f"have one; columns present: {_footer(without_id[0]).schema.to_arrow_schema().names}")
    has_ids = bool(with_id)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + ([id_column] if has_ids else [])
    return InputPlan(files=files, roots=roots, rows=rows, has_ids=has_ids, columns=columns)


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


DEVICES = ("auto", "cpu", "cuda")


class GpuWaitTimeout(TimeoutError):
    """GPU predictor actors were asked for, and none started within `resources.gpu_wait_s`. Raised
    before any row is read. Ray Data doesn't shut down a pipeline whose start failed, so the pool's
    pending actors, and the GPU demand an autoscaler sees, last until this driver disconnects from
    Ray (`jobs.score.main` does so at once; a caller that keeps its Ray session should too)."""


@dataclass
class CpuPlan:
    num_actors: int  # a fixed pool's size, or an autoscaling pool's maximum
    actor_num_cpus: float  # logical CPUs each predictor actor reserves
    actor_num_gpus: float
    task_num_cpus: float  # read / tokenize / write tasks
    torch_threads: int  # intra-op threads of each actor
    device: str
    min_actors: Optional[int] = None  # an autoscaling pool's minimum; None: a fixed pool of num_actors
    gpu_wait_s: Optional[float] = None  # fail if none of the pool's GPU actors has started by then


# What one CPU predictor actor holds besides its weights: Python with torch, Ray Data and pyarrow
# loaded, plus activations (measured: 0.93 GiB of RSS for MiniLM, whose weights are 87 MB, after a
# block of 256-token rows).
ACTOR_BASE_BYTES = 1 << 30


def cpu_plan(cluster: dict, num_actors: Optional[int] = None, actor_num_cpus: Optional[float] = None,
             task_num_cpus: float = 0.25, torch_threads: Optional[int] = None, device: str = "auto",
             max_gpu_actors: int = 8, gpu_wait_s: float = 900.0, model_bytes: int = 0) -> CpuPlan:
    """Size the predictor pool from the cluster's resources now (`ray.cluster_resources()`).

    - device auto: one actor per GPU (num_gpus=1, fixed pool) when the cluster has GPUs now, else CPU.
    - device cuda: GPU actors even if no GPU node has joined yet. On an autoscaling cluster (cluster.yaml's
      GPU workers start at 0) the pending actors' `GPU: 1` demand is what makes the autoscaler start GPU
      nodes, so the pool autoscales from 1 actor up to N: num_actors, else the GPUs there now, else
      max_gpu_actors. If no actor has started after gpu_wait_s the run stops (score raises
      GpuWaitTimeout) instead of waiting forever. With GPUs present and num_actors given, the pool
      is a fixed num_actors, as with auto.
    - CPU: by default one actor per CPU, each on one torch thread (it also tokenizes its blocks; see
      the module docstring), but no more actors than half the cluster's memory holds at
      ACTOR_BASE_BYTES + 2 x `model_bytes` each. Measured on 2 cores, single runs: two 1-thread actors ran 1.06x
      (MiniLM) to 1.26x (near-free model) one 2-thread actor, whose OpenMP regions stall whenever
      either thread is preempted. The actors' logical reservations leave 1 CPU for Ray's checkpoint
      filter actor plus one task slot."""
    if num_actors is not None and num_actors < 1:
        raise ValueError(f"num_actors must be >= 1 (or unset for the default), got {num_actors}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    cpus = float(cluster.get("CPU", 1))
    gpus = int(cluster.get("GPU", 0))
    per_gpu_actor = actor_num_cpus if actor_num_cpus is not None else 1.0
    if device == "cuda" and not (gpus and num_actors):
        n = num_actors or gpus or max_gpu_actors
        return CpuPlan(n, per_gpu_actor, 1.0, task_num_cpus, torch_threads or max(1, int(cpus // n)), "cuda",
                       min_actors=1, gpu_wait_s=gpu_wait_s)
    if gpus > 0 and device in ("auto", "cuda"):
        n = num_actors or gpus
        return CpuPlan(n, per_gpu_actor, 1.0, task_num_cpus, torch_threads or max(1, int(cpus // n)), "cuda")
    if num_actors is None:
        n = max(1, int(cpus))
        memory = float(cluster.get("memory", 0))
        if memory > 0:
            n = max(1, min(n, int(memory / 2 // (ACTOR_BASE_BYTES + 2 * model_bytes))))
    else:
        n = num_actors
    room = max(cpus - 1.0 - task_num_cpus, 0.1)  # what the actors may reserve in total
    per = actor_num_cpus if actor_num_cpus is not None else min(1.0, room / n)
    threads = torch_threads or max(1, int(min(cpus, os.cpu_count() or 1) // n))
    return CpuPlan(n, per, 0.0, task_num_cpus, threads, "cpu")


def actor_pool(plan: CpuPlan):
    """The Ray Data compute strategy of `plan`: a fixed pool, or one autoscaling from min_actors."""
    import ray.data

    if plan.min_actors is None:
        return ray.data.ActorPoolStrategy(size=plan.num_actors)
    return ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.num_actors)


class _QuietGpuWait(logging.Filter):
    """Set on Ray Data's `ray.data.exceptions` logger while a GPU wait applies. When the pool's start
    times out, Ray Data logs it as an internal Ray error (a plea to file a bug and a full traceback)
    before raising; we report it as GpuWaitTimeout, one line, so we drop the records that logger
    emits while it handles a GetTimeoutError, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        import sys

        import ray.exceptions

        return not isinstance(sys.exc_info()[1], ray.exceptions.GetTimeoutError)


def gpu_wait_message(plan: CpuPlan, gpus_now: int) -> str:
    """Why a run that asked for GPU actors stopped (score raises it as GpuWaitTimeout)."""
    why = ("no GPU node joined the cluster" if not gpus_now else
           f"the cluster has {gpus_now} GPU(s) now, but none was free for a predictor actor")
    return (f"device cuda: no GPU predictor actor started within {plan.gpu_wait_s:g} s "
            f"(resources.gpu_wait_s): {why}. Ray was asked for actors of 1 GPU each (a pool of "
            f"{plan.min_actors} to {plan.num_actors}); on an autoscaling cluster check the GPU worker type in "
            f"cluster.yaml (available_node_types, max_workers) and the autoscaler (`ray status`, its "
            f"monitor log). To score on CPU instead, pass --device cpu (or --device auto).")


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    output: str
    rows: int  # output rows (the whole output, including rows written by an earlier, killed run)
    error_rows: int
    tokens: int  # sum of n_tokens over the output
    seconds: float  # wall time of this run's pipeline
    tokens_this_run: int
    input_rows: int
    resumed: bool = False
    already_complete: bool = False
    plan: dict = field(default_factory=dict)
    dtype: str = ""  # the precision the predictors ran in (what `auto` chose); "a,b" if they differed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"raybert score: rows={self.rows} error_rows={self.error_rows} tokens={self.tokens} "
                f"tokens/s={self.tokens_per_s:,.0f} dtype={self.dtype or '-'} output={self.output}"
                + (" (resumed)" if self.resumed else "") + (" (already complete)" if self.already_complete else ""))


def default_checkpoint_dir(output: str) -> str:
    out = output.rstrip("/")
    return out + ".checkpoint" if _is_uri(out) else os.path.abspath(out) + ".checkpoint"


def _fs(path: str):
    import pyarrow.fs as pafs

    if _is_uri(path):
        with _store(path):
            return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _file_type(path: str):
    fs, p = _fs(path)
    with _store(path):
        return fs.get_file_info(p).type


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    return _file_type(path) != pafs.FileType.NotFound


def _listing(path: str) -> list:
    """FileInfo of everything under directory `path` (empty if it is not a directory)."""
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    with _store(path):
        if fs.get_file_info(p).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(p, recursive=True))


def _data_files(output: str) -> list[str]:
    import pyarrow.fs as pafs

    return [f.path for f in _listing(output)
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
            and not os.path.basename(f.path).startswith(("_", "."))]


def output_dtypes(output: str) -> str:
    """The precision(s) the predictors ran in, from the output files' schema metadata (each
    block carries it; see predictors.DTYPE_METADATA), sorted and comma-joined."""
    fs, _ = _fs(output)
    found = set()
    for f in _data_files(output):
        meta = pq.read_schema(f, filesystem=fs).metadata or {}
        if DTYPE_METADATA.encode() in meta:
            found.add(meta[DTYPE_METADATA.encode()].decode())
    return ",".join(sorted(found))


def output_totals(output: str) -> tuple[int, int, int]:
    """(rows, error rows, tokens) of everything written under `output`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = _data_files(output)
    if not files:
        return 0, 0, 0
    fs, _ = _fs(output)
    t = pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=["n_tokens", "error"])
    tokens = pc.sum(t["n_tokens"]).as_py() or 0
    return t.num_rows, t.num_rows - t["error"].null_count, int(tokens)


# --------------------------------------------------------------------------------------------
# Model, output and overwrite: checked on the driver before any work, creating nothing
# --------------------------------------------------------------------------------------------


def check_model(model: str, tokenizer: Optional[str] = None):
    """(the model's BertConfig, this node's copy of the checkpoint), once the checkpoint (config,
    weights) and its tokenizer are known to load; otherwise an error naming the path (what the
    actors would hit, minutes later)."""
    from bert_core.checkpoint import check_checkpoint
    from bert_core.tokenizer import load_tokenizer

    from pipelines.storage import cached_copy

    local = cached_copy(model)  # a URI: this node's copy, fetched once (each call lists the URI)
    config = check_checkpoint(local)
    tok_path = tokenizer or model
    try:
        tok = load_tokenizer(cached_copy(tokenizer) if tokenizer else local)
    except Exception as e:  # transformers/tokenizers raise many kinds: say which path
        raise ValueError(f"{tok_path}: the tokenizer does not load ({type(e).__name__}: {e}); give a checkpoint "
                         f"directory with its tokenizer files, or a tokenizer") from None
    if len(tok) > config.vocab_size:  # its top ids have no embedding: those rows would fail with IndexError
        raise ValueError(f"{tok_path}: the tokenizer has {len(tok):,} tokens but the model {model} embeds only "
                         f"{config.vocab_size:,}; use the tokenizer the model was trained with")
    return config, local


def weight_bytes(local: str) -> int:
    """Bytes of the weight files (safetensors or torch) in a local checkpoint directory."""
    names = os.listdir(local) if os.path.isdir(local) else []
    return sum(os.path.getsize(os.path.join(local, f)) for f in names if f.endswith((".safetensors", ".bin", ".pt")))


def _norm(path: str) -> str:
    """One spelling per location, for comparing paths: a local path (plain, relative or `file://`)
    becomes absolute with symlinks resolved; another URI loses its trailing slashes."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return path.rstrip("/") if _is_uri(path) else os.path.realpath(path)


def _overlap(a: str, b: str) -> bool:
    """The same path, or one inside the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _uncreatable(path: str) -> Optional[str]:
    """Why local directory `path` can't be created, or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def check_output(output: str, checkpoint_dir: str, inputs: list[str], plan: InputPlan, overwrite: bool) -> None:
    """Refuse, before anything is created or deleted, an output or checkpoint dir that overlaps an
    input (equal, or one inside the other, in any spelling: `file://`, relative, symlinked) or each
    other, is an existing file or can't be created; and with overwrite, an output that holds
    anything but a previous output of this job (ours: it holds our manifest or run record, or it
    is empty; an existing checkpoint dir proves nothing), or a checkpoint dir holding anything but
    Ray Data checkpoint files."""
    import pyarrow.fs as pafs

    out, ckpt = _norm(output), _norm(checkpoint_dir)
    if _overlap(out, ckpt):
        raise ValueError(f"checkpoint dir {checkpoint_dir} and output {output} overlap; keep them apart "
                         f"(the default checkpoint dir is {default_checkpoint_dir(output)})")
    sources = {_norm(f) for f in plan.files} | {_norm(i) for i in inputs if not any(c in i for c in "*?[")}
    for path, what in ((out, "output"), (ckpt, "checkpoint dir")):
        for src in sorted(sources):
            if _overlap(path, src):
                raise ValueError(f"{what} {path} overlaps input {src}: scoring must never write into, or "
                                 f"overwrite delete, its inputs; choose an {what} outside the inputs")
    for path, what in ((output, "output"), (checkpoint_dir, "checkpoint dir")):
        kind = _file_type(path)
        if kind == pafs.FileType.File:
            raise ValueError(f"{what} {path} is an existing file; give a directory path (it is created)")
        if kind == pafs.FileType.NotFound and not _is_uri(path) and (why := _uncreatable(path)):
            raise ValueError(f"{what} {path} can't be created: {why}; choose another path")
    if not overwrite:
        return
    ours = (_exists(storage.join(output, MANIFEST)) or _exists(storage.join(output, RUN_RECORD)))
    if _listing(output) and not ours:
        raise ValueError(f"{output} is not an output of raybert score (no {MANIFEST} or {RUN_RECORD}, and not "
                         f"empty): overwrite deletes only a previous output of this job; choose another output, "
                         f"or remove {output} yourself")
    foreign = [f.path for f in _listing(checkpoint_dir) if f.type != pafs.FileType.File
               or not f.path.endswith(".parquet")]  # Ray Data writes only <id>[.pending].parquet files
    if foreign:
        raise ValueError(f"checkpoint dir {checkpoint_dir} holds files that are not Ray Data checkpoint files "
                         f"(e.g. {foreign[0]}); overwrite would delete them: choose another checkpoint dir, "
                         f"or remove it yourself")


def repair_duplicates(output: str) -> int:
    """Rewrite the output files that repeat a `row_hash` so each key is kept once (its first copy,
    in file order); a row that exists once is never dropped. Returns the rows dropped. Repeats
    come from writers that overlapped (two runs on one output, before the output lock) and, kept
    in the checkpoint as committed, would otherwise fail every rerun's row count."""
    import numpy as np

    files = sorted(_data_files(output))
    fs, _ = _fs(output)
    keys = []
    for f in files:
        cols = pq.read_schema(f, filesystem=fs).names
        if "row_hash" not in cols:
            return 0  # not an output of ours with keys: nothing we can tell apart
        keys.append(pq.read_table(f, columns=["row_hash"], filesystem=fs)["row_hash"].to_numpy())
    if not keys:
        return 0
    flat = np.concatenate(keys)
    keep = np.zeros(len(flat), dtype=bool)
    keep[np.unique(flat, return_index=True)[1]] = True
    if keep.all():
        return 0
    start = 0
    for f, k in zip(files, keys):
        mask = keep[start:start + len(k)]
        start += len(k)
        if mask.all():
            continue
        if not mask.any():
            fs.delete_file(f)
            continue
        table = pq.read_table(f, filesystem=fs).filter(pa.array(mask))
        tmp = os.path.join(os.path.dirname(f), "." + os.path.basename(f) + ".tmp")  # readers skip "." files
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, f)  # atomic on a filesystem: a file is old or repaired, never half
    dropped = int(len(flat) - keep.sum())
    log.warning("%s: dropped %d duplicate row(s) (repeated row_hash) left by overlapping writers", output, dropped)
    return dropped


def _read_json(path: str) -> Optional[dict]:
    text = storage.read_text(path)
    return json.loads(text) if text else None


def _write_json(path: str, body: dict) -> None:
    storage.write_text(path, json.dumps(body, indent=2, default=str))  # whole or absent


def model_fingerprint(local: str) -> str:
    """Identifies a checkpoint's contents: its config.json and the names and sizes of its weight
    files (retraining into the same directory changes it; reading gigabytes of weights is not needed)."""
    import hashlib

    h = hashlib.sha256()
    with open(os.path.join(local, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(local)):
        if name.endswith((".safetensors", ".bin", ".pt")):
            h.update(f"{name}:{os.path.getsize(os.path.join(local, name))}".encode())
    return h.hexdigest()[:16]


def run_recipe(cfg: "ScoreConfig", plan: InputPlan, max_length: int, local_model: str) -> dict:
    """What makes one output's rows comparable: a run resumed, or a finished output reported, under
    a different recipe would mix two kinds of rows in one output."""
    return {"task": cfg.task, "model": _norm(str(cfg.model)), "model_fingerprint": model_fingerprint(local_model),
            "tokenizer": cfg.tokenizer and _norm(str(cfg.tokenizer)), "head": cfg.head, "max_length": max_length,
            "pooling": cfg.pooling, "normalize": cfg.normalize, "top_k": cfg.top_k if cfg.task == "fill-mask" else None,
            "dtype": cfg.dtype, "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
            "id_column": cfg.id_column, "inputs": plan.files}


def _recipe_differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key, value in now.items():
        if key in saved and saved[key] != value:
            was = saved[key]
            if key == "inputs":
                out.append(f"inputs ({len(was)} file(s) -> {len(value)}, other files)")
            else:
                out.append(f"{key} {was} -> {value}")
    return out


def check_resume(output: str, checkpoint_dir: str, recipe: dict) -> None:
    """Refuse, on the driver, to resume or report an output under another recipe (task, model,
    head, lengths, pooling, dtype, inputs...): its rows would be mixed with rows of another kind.
    A checkpoint dir with no run record in the output is not a run of this job to resume."""
    done = _read_json(storage.join(output, MANIFEST))
    if done is not None:
        saved = done.get("recipe") or {k: done.get(k) for k in ("task", "model", "head")} | {"inputs": done.get("inputs")}
        diffs = _recipe_differences(saved, recipe)
        if diffs:
            raise FileExistsError(f"{output} holds a finished run of another recipe: {'; '.join(diffs)} (saved -> now); "
                                  f"choose another output, or pass overwrite to score it again")
        return
    if not _exists(checkpoint_dir):
        return
    saved = _read_json(storage.join(output, RUN_RECORD))
    if saved is None:
        raise FileExistsError(f"checkpoint dir {checkpoint_dir} exists but {output} has no {RUN_RECORD}: it is not a "
                              f"run of this job to resume; choose another output and checkpoint dir, or pass overwrite")
    diffs = _recipe_differences(saved.get("recipe", {}), recipe)
    if diffs:
        raise FileExistsError(f"{output} holds an unfinished run of another recipe: {'; '.join(diffs)} (saved -> now); "
                              f"resume it with its own settings, choose another output, or pass overwrite to start over")


def check_head(cfg: "ScoreConfig", model_config) -> None:
    """Refuse a task whose head the checkpoint lacks (classify on an encoder: random labels), or a
    head of another kind (tag on a classifier), naming the heads it has."""
    from bert_core.checkpoint import HEAD_OF_ARCHITECTURE

    from pipelines.predictors import HEAD_OF_TASK

    need = HEAD_OF_TASK[cfg.task]
    if need == "embed":
        return  # any checkpoint has the encoder
    tasks = model_config.extra.get("raybert", {}).get("tasks", [])
    if tasks:
        kinds = {t["name"]: t["kind"] for t in tasks}
        name = cfg.head or tasks[0]["name"]
        if name not in kinds:
            raise ValueError(f"{cfg.model} has no task head {name!r}; its heads: "
                             f"{', '.join(f'{n} ({k})' for n, k in kinds.items())}")
        has, what = kinds[name], f"its head {name!r} is a {kinds[name]} head"
    else:
        if cfg.head is not None:
            raise ValueError(f"--head {cfg.head}: {cfg.model} is not a multi-task checkpoint (it has one head); "
                             f"drop --head")
        arch = (model_config.architectures or ["BertModel"])[0]
        has = model_config.extra.get("raybert", {}).get("head") or HEAD_OF_ARCHITECTURE.get(arch, "encoder")
        what = f"it is a {arch} ({has} head)"
    if has != need and not cfg.allow_untrained_head:
        hint = {"mlm": "pretrain one (raybert pretrain)"}.get(need, "fine-tune one (raybert finetune)")
        raise ValueError(f"task {cfg.task} needs a {need} head, but {what}: the task's outputs would come from an "
                         f"untrained head; {hint}, or choose the task its head serves (allow_untrained_head: true "
                         f"scores with a fresh head on purpose)")


def job_dtype(setting: str, device: str, record: dict, threads: int, hidden: int) -> str:
    """The one precision every row of an output is scored in. Actors that resolved `auto` for
    themselves, started at once on shared cores, disagreed (an output held bf16 and fp32 rows), and
    GPUs of two generations could too. So `auto` is chosen once, here: on CPU by the predictors'
    probe at the actors' thread count; on GPU bf16 (native since Ampere, emulated before: the same
    numbers on every GPU). A resume keeps the run record's choice whatever a new probe says."""
    if setting != "auto":
        return setting
    if record.get("dtype_used"):
        return record["dtype_used"]
    return choose_cpu_dtype(threads, hidden) if device == "cpu" else "bf16"


def choose_cpu_dtype(threads: int, hidden: int) -> str:
    """`auto` on CPU for one job: the predictors' probe (`resolve_dtype`), run once here at the
    actors' thread count."""
    import torch

    from pipelines.predictors import resolve_dtype

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return resolve_dtype("auto", "cpu", hidden)
    finally:
        torch.set_num_threads(before)


@dataclass
class Preflight:
    plan: InputPlan
    checkpoint_dir: str
    model_config: object  # bert_core.BertConfig of the model
    max_length: int  # tokens per row this run truncates to (see ScoreConfig.max_length)
    model_bytes: int = 0  # size of the checkpoint's weight files (sizes the CPU actor pool)
    recipe: dict = field(default_factory=dict)  # run_recipe: what a resume must match


def embedding_defaults(cfg: ScoreConfig, model_config, local_model: str) -> int:
    """The run's max length; for embed, also refuse a sentence-transformers pooling we can't
    reproduce (unless the run names its own), here on the driver rather than in every actor."""
    from bert_core.checkpoint import sentence_transformers_settings

    limit = model_config.max_position_embeddings
    if cfg.task != "embed":
        return min(cfg.max_length or limit, limit)
    st = sentence_transformers_settings(local_model)
    if st.pooling_error and cfg.pooling is None and "pooling" not in model_config.extra.get("raybert", {}):
        raise ValueError(st.pooling_error)
    return min(cfg.max_length or st.max_length or limit, limit)


def preflight(cfg: ScoreConfig) -> Preflight:
    """Every check that needs no cluster (config, model and tokenizer, inputs, output), on the
    driver, reading only: an invocation that passes it is valid, one that fails it changed nothing."""
    cfg.check()
    model_config, local_model = check_model(cfg.model, cfg.tokenizer)
    check_head(cfg, model_config)
    plan = plan_inputs(cfg.input, cfg.text_column, cfg.text_pair_column, cfg.id_column)
    ckpt = cfg.checkpoint_dir or default_checkpoint_dir(cfg.output)
    check_output(cfg.output, ckpt, [cfg.input] if isinstance(cfg.input, str) else list(cfg.input), plan, cfg.overwrite)
    max_length = embedding_defaults(cfg, model_config, local_model)
    recipe = run_recipe(cfg, plan, max_length, local_model)
    if not cfg.overwrite:
        check_resume(cfg.output, ckpt, recipe)
    return Preflight(plan, ckpt, model_config, max_length, weight_bytes(local_model), recipe)


def score(cfg: ScoreConfig) -> ScoreResult:
    """Score `inputs` into `output` on the connected Ray cluster (see the module docstring)."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    pre = preflight(cfg)
    plan, ckpt = pre.plan, pre.checkpoint_dir
    output, model, task, head, dtype, r = cfg.output, cfg.model, cfg.task, cfg.head, cfg.dtype, cfg.resources
    max_length = pre.max_length
    manifest = storage.join(output, MANIFEST)

    if cfg.overwrite:
        for p in (output, ckpt):
            if _exists(p):
                fs, q = _fs(p)
                fs.delete_dir(q)
    elif _exists(manifest):  # preflight checked it is a finished run of this recipe
        done = _read_json(manifest)
        log.warning("%s is already complete (%s); pass overwrite to score again", output, MANIFEST)
        if _exists(ckpt):  # killed after the manifest, before the checkpoint was deleted
            cfs, cq = _fs(ckpt)
            cfs.delete_dir(cq)
        return ScoreResult(**{**done["result"], "already_complete": True, "plan": done["result"].get("plan", {})})
    resumed = _exists(ckpt)
    if _data_files(output) and not resumed:
        raise FileExistsError(f"{output} already holds Parquet files but has no checkpoint ({ckpt}) and no "
                              f"{MANIFEST}: it is not a run of this job to resume; choose another output or overwrite")
    run_record = storage.join(output, RUN_RECORD)
    record = (_read_json(run_record) or {}) if resumed else {"recipe": pre.recipe, "started": time.time()}

    res = cpu_plan(ray.cluster_resources(), r.num_actors, r.actor_num_cpus, r.task_num_cpus, r.torch_threads, r.device,
                   r.max_gpu_actors, r.gpu_wait_s, model_bytes=pre.model_bytes)
    if dtype == "fp16" and res.device != "cuda":
        raise ValueError("dtype fp16 needs a GPU (CPU autocast supports bf16); use bf16 or fp32 on CPU")
    on_cpu = res.device == "cpu"
    dtype = record["dtype_used"] = job_dtype(dtype, res.device, record, res.torch_threads, pre.model_config.hidden_size)
    _write_json(run_record, record)  # before any row: the output is now provably ours, with its recipe
    # CPU actors share the cores with the read/write tasks and each other. OpenMP's default spin-wait
    # then burns the time slices another torch thread needs: measured 10-20x slower forwards under
    # contention; passive waiting (threads sleep at barriers) removed most of it. `tokenizers` starts
    # a thread pool of every core in each process unless told its share (RAYON_NUM_THREADS).
    actor_env = ({"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE",
                                               "RAYON_NUM_THREADS": str(res.torch_threads)}}} if on_cpu else {})
    log.info("scoring %d rows from %d file(s) with %s", plan.rows, len(plan.files), res)

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.checkpoint_config, ctx.use_datasource_v2, ctx.wait_for_min_actors_s)
    cc = CheckpointConfig(id_column="row_hash", checkpoint_path=ckpt, delete_checkpoint_on_success=False)
    cc.checkpoint_actor_pool_max_size = 1  # each filter actor holds 1 CPU; one is enough
    ctx.checkpoint_config = cc
    ctx.use_datasource_v2 = False  # see the module docstring (CPU-only clusters)
    quiet, ray_data_log = _QuietGpuWait(), logging.getLogger("ray.data.exceptions")
    if res.gpu_wait_s is not None:
        # Ray Data then blocks, when the pipeline starts and before any row is read, until each actor
        # pool's minimum (ours: 1 GPU actor) has started, and raises GetTimeoutError after this long.
        # Nothing polls while we wait: the pending actors' demand is what an autoscaler acts on.
        ctx.wait_for_min_actors_s = res.gpu_wait_s
        ray_data_log.addFilter(quiet)
    tokens_before = output_totals(output)[2] if resumed else 0
    t0 = time.perf_counter()
    try:
        ds = ray.data.read_parquet(plan.files, columns=plan.columns, include_paths=not plan.has_ids,
                                   include_row_hash=True, num_cpus=res.task_num_cpus)
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
        tokenize = dict(tokenizer_path=cfg.tokenizer or model, text_column=cfg.text_column,
                        text_pair_column=cfg.text_pair_column, id_column=cfg.id_column, max_length=max_length,
                        with_offsets=task == "tag",
                        fallback_ids=None if plan.has_ids else {"path_column": "path", "roots": plan.roots})
        if not on_cpu:  # GPU actors get token ids from CPU tasks (see the module docstring)
            ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None, num_cpus=res.task_num_cpus,
                                max_retries=r.task_max_retries, fn_kwargs=tokenize,
                                runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})
        ds = ds.map_batches(
            # Blocks already hold `batch_size` rows. Ray insists on an explicit batch_size for GPU
            # actors; on CPU, None hands each block over whole, without re-batching.
            Predictor, batch_format="pyarrow", batch_size=cfg.batch_size if res.actor_num_gpus else None,
            fn_constructor_args=(model, task),
            fn_constructor_kwargs=dict(max_tokens=cfg.max_tokens, max_batch_rows=cfg.max_batch_rows, dtype=dtype,
                                       device=res.device, pooling=cfg.pooling, normalize=cfg.normalize,
                                       top_k=cfg.top_k, num_threads=res.torch_threads, tokenizer=cfg.tokenizer,
                                       head=head, tokenize=tokenize if on_cpu else None),
            compute=actor_pool(res),
            num_cpus=res.actor_num_cpus, num_gpus=res.actor_num_gpus or None,
            # A killed actor is restarted and its in-flight block retried, on purpose.
            max_restarts=r.max_restarts, max_task_retries=r.max_task_retries, **actor_env)
        ds.write_parquet(output, ray_remote_args={"num_cpus": res.task_num_cpus, "max_retries": r.task_max_retries})
    except ray.exceptions.GetTimeoutError:
        if res.gpu_wait_s is None or time.perf_counter() - t0 < res.gpu_wait_s:
            raise  # not the wait for the GPU pool to start
        raise GpuWaitTimeout(gpu_wait_message(res, int(ray.cluster_resources().get("GPU", 0)))) from None
    finally:
        ctx.checkpoint_config, ctx.use_datasource_v2, ctx.wait_for_min_actors_s = saved
        ray_data_log.removeFilter(quiet)
    seconds = time.perf_counter() - t0

    rows, errors, tokens = output_totals(output)
    tokens_this_run = tokens - tokens_before
    if rows != plan.rows and repair_duplicates(output):  # after Ray dropped uncommitted files
        rows, errors, tokens = output_totals(output)
    result = ScoreResult(output=output, rows=rows, error_rows=errors, tokens=tokens, seconds=seconds,
                         tokens_this_run=tokens_this_run, input_rows=plan.rows, resumed=resumed,
                         plan=asdict(res), dtype=output_dtypes(output))
    if rows != plan.rows:  # row conservation is the contract; never report success without it
        raise RuntimeError(f"{output}: {rows} output rows for {plan.rows} input rows; the checkpoint "
                           f"{ckpt} is kept, rerun to complete")
    _write_json(manifest, {"result": asdict(result), "inputs": plan.files, "task": task, "model": str(model),
                           "head": head, "recipe": pre.recipe})
    if _exists(ckpt):
        cfs, cq = _fs(ckpt)
        cfs.delete_dir(cq)
    return result


def read_output(output: str, columns: Optional[list[str]] = None) -> pa.Table:
    """All output rows as one table (for tests and peeks)."""
    import pyarrow.dataset as pads

    files = _data_files(output)
    if not files:
        return pa.table({})
    fs, _ = _fs(output)
    return pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)


__all__ = ["ScoreConfig", "ResourceConfig", "InputPlan", "plan_inputs", "Preflight", "preflight", "check_model", "check_output", "repair_duplicates",
           "CpuPlan", "cpu_plan", "actor_pool", "GpuWaitTimeout", "DEVICES", "ScoreResult", "score", "read_output",
           "output_totals", "default_checkpoint_dir", "Predictor", "tokenize_batch"]
