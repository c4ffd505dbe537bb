"""What a scoring run's output must match to be resumed or reported: its recipe and its inputs'
content. Driver side, read only.

Contract:
- `run_recipe`: what makes one output's rows comparable (task, model and `model_fingerprint`,
  head, lengths, pooling, dtype setting, columns, inputs and `input_fingerprints`: each file's size
  and content digest, `inputs.TableFile.fingerprint`), written in the run record before any row
  and in the manifest at the end.
- `check_resume`: a resume, or a rerun of a finished output, under another recipe or on an input
  rewritten since is refused, naming each difference (saved -> now); a finished output whose data
  files changed since (`output_file_names`, listed in its manifest) is refused too. A checkpoint
  dir with no run record is not a run of this job to resume.
- `forget_fingerprint`: the one input a resume may take rewritten, the one a unit could not read
  (its error asks for a sound copy of the file).
"""

from __future__ import annotations

import os

from pipelines import PathInTheWay
from pipelines import storage
from pipelines.inputs import InputPlan, names_list
from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.output import MANIFEST, RUN_RECORD, checkpoint_present, data_files, read_json, write_json


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


def run_recipe(cfg: ScoreConfig, plan: InputPlan, max_length: int, local_model: str) -> dict:
    """What makes one output's rows comparable: a run resumed, or a finished output reported, under
    a different recipe, or on inputs rewritten since (`input_fingerprints`: each file's size and
    content digest, `inputs.TableFile.fingerprint`), would mix two kinds of rows in one output."""
    return {"task": cfg.task, "model": storage.canonical(str(cfg.model)), "model_fingerprint": model_fingerprint(local_model),
            "tokenizer": cfg.tokenizer and storage.canonical(str(cfg.tokenizer)), "head": cfg.head, "max_length": max_length,
            "pooling": cfg.pooling, "normalize": cfg.normalize, "top_k": cfg.top_k if cfg.task == "fill-mask" else None,
            "dtype": cfg.dtype, "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
            "id_column": cfg.id_column, "inputs": plan.files,
            "input_fingerprints": plan.fingerprints}


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """Each setting that differs, for the keys both recipes have (an older run record lacks some);
    changed input files are `input_changes`."""
    out = []
    for key, value in now.items():
        if key in saved and saved[key] != value and key != "input_fingerprints":
            was = saved[key]
            if key == "inputs":
                out.append(f"inputs ({len(was)} file(s) -> {len(value)}, other files)")
            else:
                out.append(f"{key} {was} -> {value}")
    return out


def input_changes(saved: dict, now: dict) -> list[str]:
    """Each input file (in both recipes) whose content changed: its size, or the same size with
    other content. An older run record without fingerprints has none."""
    was, out = saved.get("input_fingerprints") or {}, []
    for name, (size, digest) in (now.get("input_fingerprints") or {}).items():
        if name not in was or list(was[name]) == [size, digest]:
            continue
        old_size = was[name][0]
        out.append(f"{name} (size {old_size:,} -> {size:,} bytes)" if old_size != size else
                   f"{name} (other content, the same {size:,} bytes)")
    return out


def check_resume(output: str, checkpoint_dir: str, recipe: dict) -> None:
    """Refuse, on the driver, to resume or report an output under another recipe (task, model,
    head, lengths, pooling, dtype, inputs...), or whose input files changed since it was scored:
    its rows would be mixed with rows of another kind, or of other text. A checkpoint dir with no
    run record in the output is not a run of this job to resume."""
    done = read_json(storage.join(output, MANIFEST))
    if done is not None:
        saved = done.get("recipe") or {k: done.get(k) for k in ("task", "model", "head")} | {"inputs": done.get("inputs")}
        _refuse_changes(output, "finished", saved, recipe, "choose another output, or pass --overwrite (YAML: "
                                                             "overwrite: true) to score it again")
        _refuse_changed_files(output, done)
        return
    if not checkpoint_present(checkpoint_dir):
        return
    saved = read_json(storage.join(output, RUN_RECORD))
    if saved is None:
        raise PathInTheWay(f"checkpoint dir {checkpoint_dir} exists but {output} has no {RUN_RECORD}: it is not a "
                              f"run of this job to resume; choose another output and checkpoint dir, or pass --overwrite (YAML: overwrite: true)")
    _refuse_changes(output, "unfinished", saved.get("recipe", {}), recipe,
                    "resume it with its own settings, choose another output, or pass --overwrite (YAML: "
                    "overwrite: true) to start over")


def output_file_names(output: str) -> list[str]:
    """The output's data files, relative to it: what a finished run's manifest lists."""
    base = storage.normalize(output).split("://", 1)[-1].rstrip("/")
    return sorted(f.split("://", 1)[-1][len(base):].lstrip("/") for f in data_files(output))


def _refuse_changed_files(output: str, manifest: dict) -> None:
    """A finished output is reported only as it was finished: a data file added since (another
    run's unit, a copy) or gone would make its rows other than the summary says."""
    listed = manifest.get("files")
    if listed is None:  # a manifest of an earlier raybert
        return
    now = output_file_names(output)
    added, gone = sorted(set(now) - set(listed)), sorted(set(listed) - set(now))
    if added or gone:
        what = "; ".join(part for part in (added and f"added since: {names_list(added)}",
                                           gone and f"gone since: {names_list(gone)}") if part)
        raise PathInTheWay(f"{output} holds a finished run whose data files changed ({what}): its rows are no "
                              f"longer the ones it reported; remove the added files or restore the gone ones, or "
                              f"pass --overwrite (YAML: overwrite: true) to score it again")


def forget_fingerprint(run_record: str, name: str) -> None:
    """Let a resume take input `name` rewritten: a unit of it could not be read, and the error
    (units.NotRead) asks for a sound copy of the file (the same rows) and a rerun. The only
    input a resume accepts changed; the finished output's manifest records the copy's fingerprint."""
    record = read_json(run_record)
    if record is not None and name in record.get("recipe", {}).get("input_fingerprints", {}):
        del record["recipe"]["input_fingerprints"][name]
        write_json(run_record, record)


def _refuse_changes(output: str, state: str, saved: dict, recipe: dict, fix: str) -> None:
    """FileExistsError naming each recipe difference and each changed input (saved -> now)."""
    diffs, changed = recipe_differences(saved, recipe), input_changes(saved, recipe)
    run = f"{'an' if state == 'unfinished' else 'a'} {state} run"
    if diffs:
        raise PathInTheWay(f"{output} holds {run} of another recipe: "
                              f"{'; '.join(diffs + [f'input {c}' for c in changed])} (saved -> now); {fix}")
    if changed:
        raise PathInTheWay(f"{output} holds {run} of input(s) that changed since: {'; '.join(changed)} (saved -> "
                              f"now); its rows would mix the old and the new content: restore the file(s) as they "
                              f"were, or pass --overwrite (YAML: overwrite: true) to score again")
