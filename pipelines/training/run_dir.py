"""A training run directory's layout, in one place: every other module (the loops that write it,
the jobs that read it back) names its parts through this one.

Contract:
- The layout (a local path or an object-store URI; `storage` reaches both):
    <run_dir>/checkpoint_<step:08d>/   one Ray Train checkpoint (`checkpoint_name`); Ray's checkpoint
                                       manager keeps the last `train.keep_last` and records which
                                       one is the latest (`registered_checkpoint`)
        deepspeed/                     pretraining: the engine state (DeepSpeed's own format: module,
                                       every rank's ZeRO partition, LR scheduler, global step)
        hf/                            an HF export (config.json, model.safetensors, tokenizer files)
        raybert_state.json             pretraining: the step and the data position (epoch, and
                                       micro-batches of it consumed), and a budgeted run's LR plan
                                       (`lr_schedule`) and budget use (`budget`)
        finetune_result.json           fine-tuning: the result's metrics
    <run_dir>/export/                  a copy of the latest checkpoint's hf/, replaced whole
                                       (`publish_export`): what `raybert score` and `--init-from` read
- A checkpoint directory is any entry whose name starts `checkpoint_` (`checkpoint_names`,
  `has_checkpoints`); one holding our state file or HF export is raybert's (`holds_our_checkpoint`).
- "Latest" is the checkpoint Ray Train resumes from, not the newest directory: a checkpoint a killed
  invocation wrote before Ray registered it is not one (`registered_checkpoint`, `latest_state`,
  `latest_step`).
- `budget_spent(state, total_time_budget_s)` is the rule for a budgeted run with nothing left to
  train: its LR plan reached its end, or it used `run_plan.OVERRUN` x its budget
  (`run_plan.out_of_budget`, the same test the loop stops on).
- The run dir's other files belong to their writers, e.g. `metrics.jsonl` and `tensorboard/`
  (run_log), `heartbeat.json` (watchdog), `val.parquet` (pretrain_data), `trials/` and `sweep.json`
  (sweep), `config.json` (the jobs), the lock and `runs.jsonl` (jobs.schedule).
Reading needs no Ray session: `registered_checkpoint` imports Ray Train only to read its record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from pipelines import MissingPath, UserError, storage

CHECKPOINT_PREFIX = "checkpoint_"
DEEPSPEED_DIR = "deepspeed"
HF_DIR = "hf"
STATE_FILE = "raybert_state.json"
RESULT_FILE = "finetune_result.json"
EXPORT_DIR = "export"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at `step` (Ray Train's `checkpoint_dir_name`):
    zero-padded, so names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX)


def checkpoint_names(run_dir: str | Path, names: Optional[Iterable[str]] = None) -> list[str]:
    """The checkpoint directories' names in `run_dir` (or among `names`, its listing), sorted."""
    names = storage.list_names(str(run_dir)) if names is None else names
    return sorted(n for n in names if is_checkpoint_name(n))


def has_checkpoints(run_dir: str | Path) -> bool:
    return bool(checkpoint_names(run_dir))


def holds_our_checkpoint(run_dir: str | Path, names: Optional[Iterable[str]] = None) -> bool:
    """Whether `run_dir` (listing `names`) holds a checkpoint directory with raybert's state file or
    HF export in it."""
    return any({STATE_FILE, HF_DIR} & set(storage.list_names(storage.join(str(run_dir), n)))
               for n in checkpoint_names(run_dir, names))


def checkpoint_location(run_dir: str | Path, ray_path: str) -> str:
    """Where the checkpoint Ray Train names `ray_path` lies in `run_dir`: Ray's path carries no
    scheme on an object store, so it is rebuilt from the run dir's location."""
    return storage.join(storage.normalize(str(run_dir)), storage.basename(ray_path))


def hf_dir(checkpoint: str | Path) -> str:
    """A checkpoint's HF export (a checkpoint in a run dir, or a local directory being written)."""
    return storage.join(str(checkpoint), HF_DIR)


def deepspeed_dir(checkpoint: str | Path) -> str:
    return storage.join(str(checkpoint), DEEPSPEED_DIR)


def export_dir(run_dir: str | Path) -> str:
    return storage.join(str(run_dir), EXPORT_DIR)


def write_state(checkpoint: str | Path, state: dict) -> None:
    """Write the state file into a local checkpoint directory being assembled (rank 0)."""
    Path(checkpoint, STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def write_result(checkpoint: str | Path, metrics: dict) -> None:
    """Write a fine-tune's result file into a local checkpoint directory being assembled (rank 0)."""
    Path(checkpoint, RESULT_FILE).write_text(json.dumps(metrics, indent=1, default=str) + "\n")


def read_state(checkpoint: str | Path) -> dict:
    """A checkpoint's state file (local or on an object store)."""
    loc = storage.join(str(checkpoint), STATE_FILE)
    text = storage.read_text(loc)
    if text is None:
        raise MissingPath(f"{loc}: the checkpoint has no {STATE_FILE}; restore it, or start a new --run-dir")
    return json.loads(text)


def registered_checkpoint(run_dir: str | Path) -> Optional[str]:
    """The checkpoint Ray Train resumes `run_dir` from: the latest one its checkpoint manager
    registered (None if none). A checkpoint directory that a killed invocation left on disk before
    Ray registered it is not one, whatever its step: the next invocation resumes from the one
    before, and the ledger must say so. Returns its location (a local path, or a URI for a run
    dir on an object store)."""
    from pipelines.compat import read_train_result

    try:
        result = read_train_result(storage.normalize(str(run_dir)))
    except RuntimeError:  # not a Ray Train run dir (yet): no checkpoint manager snapshot
        return None
    except Exception as e:  # the snapshot names checkpoints that are gone, or another Ray's format
        raise UserError(f"{run_dir}: Ray Train's checkpoint record can't be read ({type(e).__name__}: {e}); "
                         f"restore the run dir's checkpoints, or start a new --run-dir") from None
    return None if result.checkpoint is None else checkpoint_location(run_dir, result.checkpoint.path)


def latest_state(run_dir: str | Path) -> dict:
    """The registered latest checkpoint's state (step, data position, and a budgeted run's LR plan
    and budget use); {"step": 0} if there is none."""
    ckpt = registered_checkpoint(run_dir)
    return {"step": 0} if ckpt is None else read_state(ckpt)


def latest_step(run_dir: str | Path) -> int:
    """The step of the registered latest checkpoint (0 if none)."""
    return int(latest_state(run_dir)["step"])


def budget_spent(state: dict, total_time_budget_s: Optional[float]) -> bool:
    """Whether a budgeted run at checkpoint `state` has nothing left to train: its LR schedule
    reached its end (final: to train on, start a new run dir with --init-from), or it ran out of
    `total_time_budget_s` (a budget raised before the end extends the plan). A state without a
    plan (an unbudgeted run's) never is; jobs.resume refuses to go on with a budgeted run without
    its budget."""
    from pipelines.training.run_plan import out_of_budget

    plan, budget = state.get("lr_schedule"), state.get("budget")
    if not plan or not budget:
        return False
    return state["step"] >= plan["end"] or (total_time_budget_s is not None
                                            and out_of_budget(budget["used_s"], total_time_budget_s))


def publish_export(checkpoint: Optional[str], run_dir: str | Path) -> Optional[str]:
    """Copy a checkpoint's HF export to `<run_dir>/export`, replacing the previous one whole
    (either may be a URI). Returns the export's location; None when there is no checkpoint, or it
    holds no export."""
    if checkpoint is None or not storage.is_dir(hf_dir(checkpoint)):
        return None
    export = export_dir(run_dir)
    storage.replace_tree(hf_dir(checkpoint), export)
    return export
