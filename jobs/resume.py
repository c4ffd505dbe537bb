"""A pretraining run's recipe across its invocations: `check_resume` refuses, on the driver before
anything in the run dir changes, to resume a run under settings its checkpoint can't continue
with, or that would change its recipe, naming every difference.

Contract:
- Compared with the checkpoint Ray Train would resume from (its HF export): the model shape
  (`MODEL_SHAPE`) and the tokenizer's vocabulary. With the run dir's config.json: the corpus
  fingerprint, and every field of the saved `pretrain` config except the per-invocation ones in
  `MAY_CHANGE` (where and how long this invocation runs, what it logs, on which machines). The
  rule is that list, not a list of what may not change: a field added to the configs later is
  part of the recipe unless it is added to `MAY_CHANGE`. Values are compared as config.json holds
  them (JSON: a tuple and a list, 1e-3 and 0.001, are equal).
- `train.total_time_budget_s` may change (a raised budget extends the LR plan), but a budgeted
  run can't go on without one: its LR plan needs it.
- A run dir of another job (a fine-tune's), or checkpoints without pretraining's config.json, are
  refused outright.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipelines import UserError, as_user_error
from jobs.training import TOKENIZER_FILES

MODEL_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size")

# Settings one invocation of a run may set differently from the last; every other field of the
# saved config is the run's recipe (its LR schedule, masking, data order and position, model).
MAY_CHANGE = frozenset({
    "run_dir", "resume", "time_budget", "address",
    "data.paths",  # the corpus fingerprint covers its content
    "data.tokenizer",  # the vocabulary is compared
    "data.num_cpus", "model.init_from", "model.activation_checkpointing",
    "train.max_steps",  # extending a run
    "train.stop_at", "train.time_budget_s", "train.steps_per_run", "train.deadline",
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.peak_flops_per_worker",
    "train.stall_timeout_s", "train.deepspeed", "train.mlflow", "train.wandb",
    "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.torch_threads", "scaling.max_failures",
    "train.total_time_budget_s",  # its own rule: see recipe_changes
})

_MISSING = object()


def _dig(d, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return d


def _leaves(cfg, prefix: str = ""):
    """The dotted keys of `cfg`'s settings (fields that are not themselves config sections)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def _same(a, b) -> bool:
    """Equal as JSON values: 1 == 1.0 and lists element by element, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def recipe_changes(saved: dict, cfg) -> list[str]:
    """`key saved -> now` for each setting of `cfg` (a PretrainConfig) outside `MAY_CHANGE` that
    differs from `saved` (config.json's "pretrain"); a key `saved` lacks (a run dir older than the
    field) is not compared."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as config.json holds it
    diffs = []
    for key in _leaves(cfg):
        was = _dig(saved, key)
        if key in MAY_CHANGE or was is _MISSING:
            continue
        if not _same(was, _dig(now, key)):
            diffs.append(f"{key} {json.dumps(was)} -> {json.dumps(_dig(now, key))}")
    budget = _dig(saved, "train.total_time_budget_s")
    if budget not in (None, _MISSING) and cfg.train.total_time_budget_s is None:  # its LR plan needs the budget
        diffs.append(f"train.total_time_budget_s {budget:g} -> none (pass --total-time-budget {budget:g})")
    return diffs


def check_resume(cfg, run_dir: str, tok, bert_config, corpus) -> None:
    """Refuse (see the module doc) to resume `run_dir` under `cfg` (a PretrainConfig), `tok`, the
    encoder config `bert_config` and `corpus` (pipelines.training.pretrain_data.CorpusCheck)."""
    from bert_core.model import BertConfig
    from bert_core.tokenizer import load_tokenizer
    from pipelines import storage
    from pipelines.training.run_dir import export_dir, has_checkpoints, hf_dir, registered_checkpoint

    saved_file = storage.join(run_dir, "config.json")
    saved_all = json.loads(storage.read_text(saved_file) or "{}")
    others = bool(saved_all) and "pretrain" not in saved_all
    if others or (not saved_all and has_checkpoints(run_dir)):
        kind = f"a {next(iter(saved_all))} run" if saved_all else "checkpoints raybert pretraining didn't write"
        raise UserError(f"{run_dir} holds {kind} (its config.json has no pretraining settings); "
                         f"pretraining never writes into another job's run dir. Choose a new --run-dir "
                         f"(to start from that run's weights, add --init-from {export_dir(run_dir)})")
    ckpt = registered_checkpoint(run_dir)
    if ckpt is None:
        return
    diffs = []
    # Only the export's config and tokenizer: the checkpoint's optimizer state may be gigabytes.
    with storage.local_copy(hf_dir(ckpt), files=("config.json",) + TOKENIZER_FILES) as hf:
        saved_model = BertConfig.from_json(Path(hf, "config.json"))
        with as_user_error("the run's saved tokenizer"):
            saved_tok = load_tokenizer(hf)
    for k in MODEL_SHAPE:
        if getattr(saved_model, k) != getattr(bert_config, k):
            diffs.append(f"model {k} {getattr(saved_model, k)} -> {getattr(bert_config, k)}")
    if saved_tok.get_vocab() != tok.get_vocab():
        diffs.append(f"tokenizer vocabulary ({len(saved_tok):,} tokens -> {len(tok):,}"
                     f"{', other tokens' if len(saved_tok) == len(tok) else ''})")
    diffs += recipe_changes(saved_all.get("pretrain", {}), cfg)
    hint = ""
    was_corpus = saved_all.get("corpus")
    if was_corpus is not None and was_corpus["fingerprint"] != corpus.fingerprint:
        from pipelines.training.pretrain_data import CorpusCheck

        before = CorpusCheck(files=[], rows=0, packed_rows=0, fingerprint=was_corpus["fingerprint"]).describe()
        diffs.append(f"corpus {before} -> {corpus.describe()}"
                     f"{', other content' if before == corpus.describe() else ''} (the run's data position "
                     f"counts batches of the corpus it started on)")
        hint = (f"; to go on training its weights on this corpus, start a new --run-dir with --init-from "
                f"{export_dir(run_dir)}")
    if diffs:
        raise UserError(f"{run_dir} holds a run (checkpoint {storage.basename(ckpt)}) that these settings can't resume: "
                         f"{'; '.join(diffs)} (saved -> now). Resume it with its own settings (see "
                         f"{saved_file}), or start a new --run-dir{hint}")
