"""pipelines: the Ray programs behind every raybert job, on top of the pure-PyTorch `bert_core`.

The tree shows the two jobs and what they share:

- `scoring/`: the scoring job. `job` (the run as named steps: reuse or reset the output, plan,
  score, finish; `score_dataset`, a Ray Data stage over a caller's Dataset), `config` (its
  torch-free config), `unit_plan` (units planned from the footers, and what every unit is scored
  with), `units` (the actors that score units, each committed as one file), `feed` (CPU tokenizing
  actors that feed GPU actors), `output` (what an output holds, what raybert writes and may
  delete), `resume` (the run record a rerun must match), `tokenize` (the stateless CPU step),
  `predictors` (the model step, one plain class per task, usable without Ray) and `precision`
  (the dtype, and what `auto` picks on this machine).
- `training/`: pretraining and fine-tuning on Ray Train + DeepSpeed. `config` (torch-free
  configs), `pretrain_data` (text files -> packed rows, each epoch's files in its own order; the
  validation set packed once into the run dir), `finetune_data` (labeled files -> tokenized rows),
  `loop` (the per-worker MLM loop), `finetune` (the per-worker multi-task loop), `engine` (the one
  place a model meets DeepSpeed), `worker` (the worker context, collectives, seeding), `run_dir`
  (the run directory's layout: checkpoints, state file, exports, the budget rule), `run_plan`
  (time-budgeted schedules), `run_log` (metrics.jsonl, TensorBoard), `tracking` (MLflow, W&B),
  `watchdog` (heartbeat and stall detection), `trainer` (the TorchTrainer, on the driver) and
  `sweep` (fine-tuning sweeps on Ray Tune).
- Shared by every job, here at the top: `storage` (every filesystem question, local or object
  store, and the one atomic write), `inputs` (finding, checking and reading input files),
  `text_formats` (the one CSV / JSON Lines reader), `resources` (CPU/GPU reservations planned on
  the driver), `console` (what a job shows), `compat` (every workaround for a Ray or DeepSpeed
  behaviour, each tested) and `corpora` (real text from installed PyPI packages).

Imports flow jobs -> pipelines -> bert_core: nothing here imports `jobs`, and nothing here parses
command lines or YAML. Ray and DeepSpeed are imported inside the functions that use them.
"""

from contextlib import contextmanager


class UserError(ValueError):
    """An error the user must act on: a setting, a path, an input file or a run dir that can't be
    used, its message naming which and what to do. The CLI prints it as one `Error:` line (exit 1),
    with no traceback; any other exception keeps its traceback, so an internal bug never looks like
    the user's mistake. A ValueError still, for callers (and tests) that catch those."""


class MissingPath(UserError, FileNotFoundError):
    """A path the user named (a file, a directory, a checkpoint) that isn't there."""


class PathInTheWay(UserError, FileExistsError):
    """A path the job would write that holds something it must not touch or replace."""


@contextmanager
def as_user_error(what: str):
    """The boundary where a library's error about something the user gave (a checkpoint or a
    tokenizer that bert_core can't load) becomes a UserError naming `what` (the setting)."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        raise MissingPath(f"{what}: {e}") from e
    except (ValueError, OSError) as e:
        raise UserError(f"{what}: {e}") from e
