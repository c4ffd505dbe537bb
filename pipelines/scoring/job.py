"""The batch-scoring job: read Parquet -> tokenize -> predict -> write Parquet, on Ray actors; and
`score_dataset`, the Python API: the predictor as a Ray Data stage over a caller's Dataset.
(CSV and JSON Lines inputs are staged as Parquet first: `output.stage_inputs`.)

Contract:
- Beside it, in pipelines/scoring/: the config (`config.py`), the output, its run record and
  manifest (`output.py`), what a resume must match (`resume.py`), the units and the actors that
  score them (`unit_plan.py`, `units.py`, `feed.py`), the predictors (`predictors.py`) and their
  precision (`precision.py`); in pipelines/: finding and checking the inputs (`inputs.py`:
  `plan_inputs`), the actor pool's size (`resources.py`: `cpu_plan`).
- `preflight(cfg)` runs every check that needs no cluster, reading only, so a refused invocation
  changes nothing on disk: the model (`bert_core.check_checkpoint`: BERT config, weights open)
  and its tokenizer load; the inputs (`plan_inputs`; an object store that can't be reached is an
  error naming the URI); the output and checkpoint dir are not existing files, can be created, and
  overlap neither each other nor any input (equal, or one inside the other, however spelled:
  `file://`, relative, symlinked). The output must be empty, new, or ours and hold only what
  raybert writes (`output.LAYOUTS`: its run record, manifest, staged inputs, unit files),
  and the checkpoint dir only checkpoint files, overwrite or not: a run never writes beside the
  user's files, and overwrite (`reuse_or_reset`) deletes only raybert's files, never through a
  symlink (an output that is a symlink to a directory is scored into, and kept). The inputs are
  found without the output and checkpoint dir (`own_locations`): a glob or directory over them
  never reads the job's own files back, so the same command reruns or resumes. The task has its
  head in the checkpoint (classify on an encoder-only model is refused, naming what it has), and
  the tokenizer fits the embedding table.
- One output, one recipe: a run writes `<output>/_raybert_run.json` (RUN_RECORD) before any row,
  holding what makes its rows comparable (`run_recipe`: task, model and its fingerprint, head,
  lengths, pooling, dtype setting, columns, inputs and their fingerprints: size and a content
  digest, `TableFile.fingerprint`). A resume, or a rerun of a finished output, under another recipe or on a rewritten input
  is refused on the driver, naming each difference (`check_resume`); only an input whose rows a
  unit could not read (its error asks for a sound copy) may be replaced before the resume. Staged
  copies of CSV and JSON Lines inputs are recorded there too, and staged again if they don't match.
- `ScoreConfig` (with `ResourceConfig`) is the run's one typed config; `raybert score` flags and
  YAML keys are its fields. Its fields' rules are pipelines/settings.py's (the walker the CLI runs
  over its sources); `ScoreConfig.check()` runs the same walker on a config built in code, plus
  what a run needs (`preflight` calls it).
- `score(cfg)` runs `preflight` again, then, as named steps: `reuse_or_reset` the output, the
  actors started (`PredictorPool`, and any tokenizing actors: their start-up overlaps the rest),
  the run record, `stage_inputs`, the scoring step, and `finish` (row conservation, the manifest,
  the staged inputs deleted). Every input row gives exactly one output row (see predictors.py for
  the columns).
- The scoring step runs on plain actors, not Ray Data (`score_on_actors`, pipelines/scoring/units.py):
  the input is cut into *units* (part of a row group each), and each unit's output is one file,
  written whole or not at all. On CPUs each predictor actor reads, tokenizes and scores its
  units (`run_units`). On GPUs, CPU actors read and tokenize the units and pass each table by
  reference to a GPU actor, which scores and writes it (`run_fed_units`, pipelines/scoring/feed.py;
  `resources.tokenizer_actors`). Measured on 2 cores with a free model, Ray Data's program spent
  about 90% of the job around the predictor (worker processes for read and write tasks, an
  object-store round trip per block, a checkpoint-filter actor): see BENCHMARKS.md (issue 21).
- Device cuda: a pool autoscaling from 1 GPU actor (`cpu_plan`) that raises GpuWaitTimeout before
  any row is read if no GPU actor starts within resources.gpu_wait_s.
- Resume: a unit is committed when its file exists; a rerun scores the units without one, so
  after a kill -9 of the driver, rerunning the same command completes the output with exactly
  one row per input row. Row keys (`row_hash`) are Ray Data's hash of (file path, row index). The
  checkpoint dir lives beside the output (`<output>.checkpoint` by default, shared storage on a
  cluster) and marks an unfinished run. On success we write `<output>/_SUCCESS.json` (the
  summary; Parquet readers skip `_` files) and delete the checkpoint's files; a rerun of a
  finished job reports the manifest and does nothing. Runs must not overlap on one output (jobs.score locks
  `<output>.lock`); if writers did overlap, a rerun repairs it (`repair_duplicates`: one row per
  `row_hash`, before the row count is checked).
- Fault tolerance: actors restart (`max_restarts`) and their in-flight units are retried
  (`max_task_retries`).
- Precision: `dtype` auto is decided once per job on the driver (`precision.job_dtype`: the same
  answer for one machine every time, from the CLI and from Python), recorded in the run record
  (`dtype_used`, kept by a resume) and reported in the result (`ScoreResult.dtype`).
- `score_dataset` (your own Dataset, in a notebook) stays a Ray Data program, lazy as the caller's
  Dataset is: `map_batches(tokenize_batch)` (GPU: stateless CPU tasks) -> `map_batches(Predictor,
  compute=actor_pool(...))`, a pool autoscaling from one actor. Units are cut from Parquet footers
  and written as files; a caller's Dataset has neither, and its rows go back to the caller. Its
  checks and dtype decision are the CLI's, and so is its console (`compat.quiet_dataset`: one line
  at the default level, the dtype and why, plus what Ray itself prints).
- Ray Data on CPUs (`score_dataset`): actors hold logical CPUs for their whole life, so an actor
  pool could leave no CPU for the caller's read tasks, and Ray Data then waits forever. Tasks get
  fractional CPUs, and `cpu_plan` sizes the actors' reservation to leave room.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional

from pipelines import PathInTheWay, UserError, as_user_error
from pipelines import storage
from pipelines.inputs import InputPlan, plan_inputs
from pipelines.scoring.precision import FP16_NEEDS_GPU, job_dtype
from pipelines.scoring.predictors import STEPS, Predictor
from pipelines.scoring.tokenize import id_name, tokenize_batch
from pipelines.resources import CpuPlan, actor_pool, cpu_plan
from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.feed import PredictorPool, default_tokenizers, run_fed_units, start_tokenizers
from pipelines.scoring.output import (CHECKPOINT, MANIFEST, RUN_RECORD, STAGED, RowCounts, check_output,
                                    checkpoint_present, data_files, default_checkpoint_dir, layout, output_dtypes,
                                    output_totals, own_locations, ray_path, read_json, remove_ours, remove_temp_files,
                                    repair_duplicates, stage_inputs, write_json)
from pipelines.scoring.resume import check_resume, forget_fingerprint, output_file_names, run_recipe
from pipelines.scoring.unit_plan import UnitSpec, choose_unit_rows
from pipelines.scoring.units import NotRead, run_units, same_scorer, score_on_actors, stop_actors

log = logging.getLogger(__name__)

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
    startup_s: float = 0.0  # of `seconds`, until the first predictor actor could score
    resumed: bool = False
    already_complete: bool = False
    plan: dict = field(default_factory=dict)
    dtype: str = ""  # the precision the predictors ran in (what `auto` chose); "a,b" if they differed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """The result as `raybert score` prints it on stdout (JSON)."""
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}

    def line(self) -> str:
        return (f"raybert score: rows={self.rows} error_rows={self.error_rows} tokens={self.tokens} "
                f"tokens/s={self.tokens_per_s:,.0f} dtype={self.dtype or '-'} output={self.output}"
                + (" (resumed)" if self.resumed else "") + (" (already complete)" if self.already_complete else ""))


# --------------------------------------------------------------------------------------------
# The model and its head, the precision: checked on the driver before any work
# --------------------------------------------------------------------------------------------


class CheckedModel(NamedTuple):
    config: object  # bert_core.BertConfig of the model
    local: str  # this node's copy of the checkpoint


def check_model(model: str, tokenizer: Optional[str] = None) -> CheckedModel:
    """The model's config and this node's copy of it, once the checkpoint (config, weights) and its
    tokenizer are known to load; otherwise an error naming the path (what the actors would hit,
    minutes later)."""
    from bert_core.checkpoint import check_checkpoint
    from bert_core.tokenizer import load_tokenizer

    from pipelines.storage import cached_copy

    local = cached_copy(model)  # a URI: this node's copy, fetched once (each call lists the URI)
    with as_user_error("model"):  # bert_core's words about the checkpoint, as the user's error
        config = check_checkpoint(local)
    tok_path = tokenizer or model
    try:
        tok = load_tokenizer(cached_copy(tokenizer) if tokenizer else local)
    except Exception as e:  # transformers/tokenizers raise many kinds: say which path
        raise UserError(f"{tok_path}: the tokenizer does not load ({type(e).__name__}: {e}); give a checkpoint "
                         f"directory with its tokenizer files, or a tokenizer") from None
    if len(tok) > config.vocab_size:  # its top ids have no embedding: those rows would fail with IndexError
        raise UserError(f"{tok_path}: the tokenizer has {len(tok):,} tokens but the model {model} embeds only "
                         f"{config.vocab_size:,}; use the tokenizer the model was trained with")
    return CheckedModel(config, local)


def weight_bytes(local: str) -> int:
    """Bytes of the weight files (safetensors or torch) in a local checkpoint directory."""
    names = os.listdir(local) if os.path.isdir(local) else []
    return sum(os.path.getsize(os.path.join(local, f)) for f in names if f.endswith((".safetensors", ".bin", ".pt")))


def check_head(cfg: "ScoreConfig", model_config) -> None:
    """Refuse a task whose head the checkpoint lacks (classify on an encoder: random labels), or a
    head of another kind (tag on a classifier), naming the heads it has."""
    from bert_core.checkpoint import HEAD_OF_ARCHITECTURE

    from pipelines.scoring.config import HEAD_OF_TASK

    need = HEAD_OF_TASK[cfg.task]
    if need == "embed":
        return  # any checkpoint has the encoder
    tasks = model_config.extra.get("raybert", {}).get("tasks", [])
    if tasks:
        kinds = {t["name"]: t["kind"] for t in tasks}
        name = cfg.head or tasks[0]["name"]
        if name not in kinds:
            raise UserError(f"{cfg.model} has no task head {name!r}; its heads: "
                             f"{', '.join(f'{n} ({k})' for n, k in kinds.items())}")
        has, what = kinds[name], f"its head {name!r} is a {kinds[name]} head"
    else:
        if cfg.head is not None:
            raise UserError(f"--head {cfg.head}: {cfg.model} is not a multi-task checkpoint (it has one head); "
                             f"drop --head")
        arch = (model_config.architectures or ["BertModel"])[0]
        has = model_config.extra.get("raybert", {}).get("head") or HEAD_OF_ARCHITECTURE.get(arch, "encoder")
        what = f"it is a {arch} ({has} head)"
    if has != need and not cfg.allow_untrained_head:
        hint = {"mlm": "pretrain one (raybert pretrain)"}.get(need, "fine-tune one (raybert finetune)")
        raise UserError(f"task {cfg.task} needs a {need} head, but {what}: the task's outputs would come from an "
                         f"untrained head; {hint}, or choose the task its head serves (allow_untrained_head: true "
                         f"scores with a fresh head on purpose)")


@dataclass
class Preflight:
    plan: InputPlan
    checkpoint_dir: str
    model_config: object  # bert_core.BertConfig of the model
    max_length: int  # tokens per row this run truncates to (see ScoreConfig.max_length)
    model_bytes: int = 0  # size of the checkpoint's weight files (sizes the CPU actor pool)
    recipe: dict = field(default_factory=dict)  # run_recipe: what a resume must match


def embedding_defaults(cfg: ScoreConfig, model_config, local_model: str) -> int:
    """The run's max length (one past the model's positions is refused); for embed, also refuse a
    sentence-transformers pooling we can't reproduce (unless the run names its own), here on the
    driver rather than in every actor."""
    from bert_core.checkpoint import sentence_transformers_settings

    limit = model_config.max_position_embeddings
    if cfg.max_length is not None and cfg.max_length > limit:  # asked for, it would be cut without a word
        raise UserError(f"max_length {cfg.max_length} (--max-length) is longer than the model's "
                         f"max_position_embeddings {limit}; give at most {limit}, or leave it unset for the model's own")
    if cfg.task != "embed":
        return min(cfg.max_length or limit, limit)
    with as_user_error("model"):  # its sentence-transformers files (modules.json, 1_Pooling/...) may not parse
        st = sentence_transformers_settings(local_model)
    if st.unsupported:
        raise UserError(st.unsupported)
    if st.pooling_error and cfg.pooling is None and "pooling" not in model_config.extra.get("raybert", {}):
        raise UserError(st.pooling_error)
    return min(cfg.max_length or st.max_length or limit, limit)


def preflight(cfg: ScoreConfig) -> Preflight:
    """Every check that needs no cluster (config, model and tokenizer, inputs, output), on the
    driver, reading only: an invocation that passes it is valid, one that fails it changed nothing."""
    cfg.check()
    model_config, local_model = check_model(cfg.model, cfg.tokenizer)
    check_head(cfg, model_config)
    ckpt = cfg.checkpoint_dir or default_checkpoint_dir(cfg.output)
    inputs = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    plan = plan_inputs(cfg.input, cfg.text_column, cfg.text_pair_column, cfg.id_column,
                       exclude=own_locations(inputs, cfg.output, ckpt))  # never read back what this job writes
    check_output(cfg.output, ckpt, inputs, plan)
    max_length = embedding_defaults(cfg, model_config, local_model)
    recipe = run_recipe(cfg, plan, max_length, local_model)
    if not cfg.overwrite:
        check_resume(cfg.output, ckpt, recipe)
    return Preflight(plan, ckpt, model_config, max_length, weight_bytes(local_model), recipe)


def score(cfg: ScoreConfig) -> ScoreResult:
    """Score `inputs` into `output` on the connected Ray cluster (see the module docstring)."""
    pre = preflight(cfg)
    finished = reuse_or_reset(cfg, pre)
    if finished is not None:
        return finished
    resumed = checkpoint_present(pre.checkpoint_dir)
    if data_files(cfg.output) and not resumed:
        raise PathInTheWay(f"{cfg.output} already holds Parquet files but has no checkpoint ({pre.checkpoint_dir}) "
                              f"and no {MANIFEST}: it is not a run of this job to resume; choose another output or "
                              f"pass --overwrite (YAML: overwrite: true)")
    res = plan_actors(cfg, pre.model_bytes, ray_data=False)
    if cfg.dtype == "fp16" and res.device != "cuda":  # refused before any actor starts
        raise UserError(FP16_NEEDS_GPU)
    n_tokenizers, r = tokenizer_actors(cfg, res), cfg.resources
    t0, pool, tokenizers = time.perf_counter(), PredictorPool(res, r.max_restarts, r.max_task_retries), []
    try:
        # First: their start-up (a process importing torch) overlaps everything below.
        pool.start()
        start_tokenizers(tokenizers, n_tokenizers, r.max_restarts, r.max_task_retries)
        run_record = storage.join(cfg.output, RUN_RECORD)
        record = (read_json(run_record) or {}) if resumed else {"recipe": pre.recipe, "started": time.time()}
        same_scorer(record, cfg.output, resumed)
        dtype = job_dtype(cfg.dtype, res.device, record, pre.model_config.hidden_size).dtype
        record["dtype_used"] = dtype
        # Kept by a resume, which must plan the same units. Fed units pass two actors: enough of
        # them that the first and last (one actor busy, the other waiting) are a small share.
        record.setdefault("unit_rows", choose_unit_rows(pre.plan.rows, res.num_actors + len(tokenizers),
                                                        cfg.batch_size))
        write_json(run_record, record)  # before any row: the output is now provably ours, with its recipe
        log.info("scoring %d rows from %d file(s) with %s and %d tokenizing actors", pre.plan.rows,
                 len(pre.plan.files), res, len(tokenizers))
        before = output_totals(cfg.output) if resumed else RowCounts(0, 0, 0)
        texts = (cfg.text_column, cfg.text_pair_column, cfg.id_column)  # read as strings from CSV / JSON Lines
        staged = stage_inputs(cfg.output, pre.plan, texts, record)
        write_json(run_record, record)  # with its staged copies' entries
        tokenize = tokenize_settings(cfg, pre.max_length, id_column=cfg.id_column, fallback_ids=fallback_ids(pre, staged))
        spec = UnitSpec(output=storage.normalize(cfg.output), columns=pre.plan.columns, batch_size=cfg.batch_size,
                        with_path=not pre.plan.has_ids, predictor_args=(cfg.model, cfg.task), tokenize=tokenize,
                        predictor_kwargs=predictor_kwargs(cfg, res, dtype, None if tokenizers else tokenize))
        if tokenizers:
            def run(units, done):
                return run_fed_units(pool, tokenizers, units, spec, done)
        else:
            def run(units, done):
                return run_units(pool.actors, units, spec, done)
        try:
            ready_at = score_on_actors(run, cfg.output, list(staged), record["unit_rows"], pre.checkpoint_dir,
                                       pre.plan.rows, before.rows, before.tokens, pre.plan.row_groups)
        except NotRead as e:  # its error asks for a sound copy of the file: the resume must accept it
            forget_fingerprint(run_record, staged.get(e.file, e.file))
            raise
    finally:
        stop_actors(pool.actors + tokenizers)
    return finish(cfg, pre, res, resumed, time.perf_counter() - t0, before.tokens, ready_at - t0)


def tokenizer_actors(cfg: ScoreConfig, res: CpuPlan) -> int:
    """`resources.tokenizer_actors`, else the plan's default (`default_tokenizers`, from the free
    resources before any actor starts). Refused here: none for GPU actors, and on CPUs, tokenizing
    actors that can't be placed beside the predictors (rather than waited for)."""
    import ray

    n = cfg.resources.tokenizer_actors
    if res.device == "cuda" and n == 0:
        raise UserError("resources.tokenizer_actors 0 has each predictor actor tokenize its own units, and a GPU "
                         "actor must not (its GPU would wait on it); leave it unset, or set it to 1 or more")
    free = ray.available_resources()
    if n is None:
        return default_tokenizers(res, float(free.get("CPU", 0)), int(free.get("GPU", 0)))
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if n and res.device == "cpu" and res.num_actors * res.actor_num_cpus + n > cpus:
        raise UserError(f"resources.tokenizer_actors {n} (1 CPU each) and {res.num_actors} predictor actors of "
                         f"{res.actor_num_cpus:g} CPU need more than the Ray cluster's {cpus:g} CPUs; set --num-actors "
                         f"or resources.actor_num_cpus lower, or tokenizer_actors lower")
    return n


def reuse_or_reset(cfg: ScoreConfig, pre: Preflight) -> Optional[ScoreResult]:
    """With overwrite, delete what the previous run wrote in the output and checkpoint dir
    (`remove_ours`: preflight refused anything else there; the directories, or the symlinks to
    them, are kept). Otherwise a finished output (preflight checked its recipe and inputs) is
    reported as it is: its result, marked already complete. None: score."""
    output, ckpt = cfg.output, pre.checkpoint_dir
    manifest = storage.join(output, MANIFEST)
    if cfg.overwrite:
        remove_ours(output, layout(output))
        remove_ours(ckpt, CHECKPOINT, drop_dir=True)
        return None
    if not storage.exists(manifest):
        return None
    done = read_json(manifest)
    log.warning("%s is already complete (%s); pass --overwrite (YAML: overwrite: true) to score again", output, MANIFEST)
    remove_ours(ckpt, CHECKPOINT, drop_dir=True)  # killed after the manifest, before the checkpoint was deleted
    return ScoreResult(**{**done["result"], "output": output, "already_complete": True,
                          "plan": done["result"].get("plan", {})})


def fallback_ids(pre: Preflight, staged: dict) -> Optional[dict]:
    """`tokenize_batch`'s fallback_ids for inputs without an id column (None when they have one):
    a staged file's ids name the input it holds, as that input read directly would be named."""
    plan = pre.plan
    if plan.has_ids:
        return None
    names = {ray_path(read): id_name(source, plan.roots) for read, source in staged.items() if read != source}
    return {"path_column": "path", "roots": plan.roots, "names": names}


def plan_actors(cfg: ScoreConfig, model_bytes: int, ray_data: bool) -> CpuPlan:
    """The predictor pool for `cfg` on the connected cluster as it is now (`cpu_plan`); `ray_data`:
    CPU actors would be a Ray Data pool (`score_dataset`), not our own (`score`)."""
    import ray

    r = cfg.resources
    return cpu_plan(ray.cluster_resources(), r.num_actors, r.actor_num_cpus, r.task_num_cpus, r.torch_threads,
                    r.device, r.max_gpu_actors, r.gpu_wait_s, model_bytes=model_bytes, ray_data=ray_data)


def tokenize_settings(cfg: ScoreConfig, max_length: int, **ids) -> dict:
    """`tokenize_batch`'s keyword arguments for `cfg`; `ids`: where row ids come from (id_column,
    fallback_ids) and the caller's columns to keep (keep_columns)."""
    return dict(tokenizer_path=cfg.tokenizer or cfg.model, text_column=cfg.text_column,
                text_pair_column=cfg.text_pair_column, max_length=max_length, with_offsets=cfg.task == "tag", **ids)


def predictor_kwargs(cfg: ScoreConfig, res: CpuPlan, dtype: str, tokenize: Optional[dict]) -> dict:
    """`Predictor(cfg.model, cfg.task, **these)`; `tokenize`: the actor tokenizes its blocks (CPU)."""
    return dict(max_tokens=cfg.max_tokens, max_batch_rows=cfg.max_batch_rows, dtype=dtype, device=res.device,
                pooling=cfg.pooling, normalize=cfg.normalize, top_k=cfg.top_k, num_threads=res.torch_threads,
                tokenizer=cfg.tokenizer, head=cfg.head, tokenize=tokenize)


def predict_stage(ds, cfg: ScoreConfig, res: CpuPlan, dtype: str, tokenize: dict):
    """`ds` -> [GPU: tokenize tasks] -> the predictor actor pool (`actor_pool`), each cutting the
    caller's blocks, of any size, into `batch_size` rows on the way in."""
    r, on_cpu = cfg.resources, res.device == "cpu"
    # CPU actors share the cores with the caller's tasks and each other. OpenMP's default spin-wait
    # then burns the time slices another torch thread needs: measured 10-20x slower forwards under
    # contention; passive waiting (threads sleep at barriers) removed most of it. `tokenizers` starts
    # a thread pool of every core in each process unless told its share (RAYON_NUM_THREADS).
    actor_env = ({"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE",
                                               "RAYON_NUM_THREADS": str(res.torch_threads)}}} if on_cpu else {})
    # Ray 2.60 deprecates retry settings passed through **ray_remote_args (max_retries, max_restarts,
    # max_task_retries) but has no named parameter for them yet, and its defaults retry forever: we
    # pass ours, with that warning hidden.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        if not on_cpu:  # GPU actors get token ids from CPU tasks (see the module docstring)
            ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                                num_cpus=res.task_num_cpus, max_retries=r.task_max_retries, fn_kwargs=tokenize,
                                runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}})
        return ds.map_batches(
            Predictor, batch_format="pyarrow", batch_size=cfg.batch_size,
            fn_constructor_args=(cfg.model, cfg.task),
            fn_constructor_kwargs=predictor_kwargs(cfg, res, dtype, tokenize if on_cpu else None),
            compute=actor_pool(res),
            num_cpus=res.actor_num_cpus, num_gpus=res.actor_num_gpus or None,
            # A killed actor is restarted and its in-flight block retried, on purpose.
            max_restarts=r.max_restarts, max_task_retries=r.max_task_retries, **actor_env)


def check_columns(cfg: ScoreConfig, names: list) -> None:
    """Refuse a caller's dataset without the text column(s), or with a column the scores would replace."""
    for col in [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else []):
        if col not in names:
            raise UserError(f"the dataset has no column {col!r} (the text to score); its columns: {names}; "
                             f"set text_column")
    clash = sorted(set(names) & {"n_tokens", "truncated", "error", *STEPS[cfg.task].names})  # what we add
    if clash:
        raise UserError(f"the dataset's columns {clash} would be replaced by the scores; rename them first")


def score_dataset(ds, model: str, task: str = "embed", **settings):
    """Score a `ray.data.Dataset` (or a pandas DataFrame) in a notebook or your own Ray program:
    a lazy Dataset of the caller's rows, every column kept, plus `n_tokens`, `truncated`, `error`
    and the task's columns (as `raybert score` writes them). No id column is needed.

    `settings` are ScoreConfig fields (text_column, text_pair_column, max_length, pooling,
    normalize, dtype, max_tokens, batch_size, top_k, head, tokenizer, allow_untrained_head) and
    `resources` (a ResourceConfig). The defaults and the checks are the CLI's (dtype auto, chosen
    once for the whole dataset as for `raybert score`: `precision.job_dtype`; the model, its head
    and tokenizer; the text column; names the output would clash on), made here, before any work;
    Ray must be initialized. The console is the CLI's (pipelines/console.py): at the default level
    one line, the dtype and why, and none of Ray Data's INFO lines or bars while it runs."""
    import sys

    import ray

    from pipelines.compat import quiet_dataset
    from pipelines.console import VERBOSE, shows_progress, verbosity

    cfg = ScoreConfig(input="<dataset>", output="<dataset>", model=model, task=task, **settings)
    cfg.check()
    if not isinstance(ds, ray.data.Dataset):  # a pandas DataFrame: blocks of batch_size rows, for the pool
        n, size = len(ds), cfg.batch_size  # (from_pandas's own override_num_blocks splits into bare arrays)
        ds = ray.data.from_pandas([ds.iloc[i:i + size] for i in range(0, n, size)] if n > size else ds)
    model_config, local = check_model(cfg.model, cfg.tokenizer)
    check_head(cfg, model_config)
    max_length = embedding_defaults(cfg, model_config, local)
    names = ds.schema().names
    check_columns(cfg, names)
    res = plan_actors(cfg, weight_bytes(local), ray_data=True)
    dtype = job_dtype(cfg.dtype, res.device, None, model_config.hidden_size)
    if shows_progress():
        print(f"[raybert] score_dataset: {task} with {model} in {dtype.dtype} ({dtype.why})", file=sys.stderr,
              flush=True)
    tokenize = tokenize_settings(cfg, max_length, id_column=None, keep_columns=names)
    scored = predict_stage(ds, cfg, res, dtype.dtype, tokenize)
    return scored if verbosity() == VERBOSE else quiet_dataset(scored)


def finish(cfg: ScoreConfig, pre: Preflight, res: CpuPlan, resumed: bool, seconds: float,
           tokens_before: int, startup_s: float = 0.0) -> ScoreResult:
    """Check row conservation (after repairing duplicates left by overlapping writers), write the
    manifest, delete the checkpoint. The contract: never report success without every row."""
    output, plan = cfg.output, pre.plan
    rows, errors, tokens = output_totals(output)
    tokens_this_run = tokens - tokens_before
    if rows != plan.rows and repair_duplicates(output):  # overlapping writers (see the module docstring)
        rows, errors, tokens = output_totals(output)
    result = ScoreResult(output=output, rows=rows, error_rows=errors, tokens=tokens, seconds=seconds,
                         startup_s=round(startup_s, 3), tokens_this_run=tokens_this_run, input_rows=plan.rows, resumed=resumed,
                         plan=asdict(res), dtype=output_dtypes(output))
    if rows != plan.rows:
        raise RuntimeError(f"{output}: {rows} output rows for {plan.rows} input rows; the checkpoint "
                           f"{pre.checkpoint_dir} is kept, rerun to complete")
    write_json(storage.join(output, MANIFEST), {"result": asdict(result), "inputs": plan.files, "task": cfg.task,
                                                "model": str(cfg.model), "head": cfg.head, "recipe": pre.recipe,
                                                "files": output_file_names(output)})
    remove_ours(pre.checkpoint_dir, CHECKPOINT, drop_dir=True)
    remove_ours(output, layout(output), under=STAGED)
    remove_temp_files(output, layout(output))  # of writes a kill cut short, in this run or an earlier one
    return result
