"""Fine-tuning sweeps on Ray Tune: the learning rate (and regularization, and seeds) chosen on the
validation split, as Hugging Face's `Trainer.hyperparameter_search` does with Ray Tune.

Contract:
- `parse_sweep(spec)` reads a sweep: the CLI's `--sweep KEY=V1,V2,...` flags (a tuple of strings)
  or a config's `sweep:` mapping (KEY: [values] or "V1,V2"). Keys are `SWEEP_KEYS`; values must
  parse as their type and lie in range, without repeats; the grid (every combination) must hold
  at least two trials. Anything else is a ValueError naming the key and what to write, raised on
  the driver before Ray starts.
- `run_sweep(...)` runs one Ray Tune trial per combination. Each trial is a whole fine-tune (its
  own TorchTrainer, fed the same materialized datasets) in `<run_dir>/trials/<trial>/`, reporting
  every evaluation's `val_score` through Ray Train's `TuneReportCallback`. As many trials run at
  once as the cluster's CPUs (or GPUs) fit their workers; a trial's own driver holds no CPU.
  ASHA (asynchronous successive halving; time is counted in evaluations, rungs at the 1st, 2nd,
  4th, 8th ...) stops trials whose validation score trails at a rung. Trials run off the main
  thread, so the stall watchdog of single fine-tunes (`train.stall_timeout_s`) doesn't watch
  them. Ctrl-C ends the sweep with an error, exporting nothing.
- Selection reads the validation split only: the trial whose best `val_score` (the weights its
  export holds) is highest among the trials that finished. Its export is copied to
  `<run_dir>/export`, and `<run_dir>/sweep.json` records every trial: params, status (finished,
  stopped early, failed with its error), best score and step, steps run, trial dir.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
from typing import Any, Mapping, NamedTuple

from pipelines import UserError
from pipelines import storage
from pipelines.training.run_dir import checkpoint_location, export_dir, hf_dir

# key -> (section of the loop config, field, type, check, what the check asks)
SWEEP_KEYS = {
    "lr": ("train", "lr", float, lambda v: v > 0, "> 0"),
    "weight_decay": ("train", "weight_decay", float, lambda v: v >= 0, ">= 0"),
    "seed": ("train", "seed", int, lambda v: v >= 0, ">= 0"),
    "dropout": ("options", "dropout", float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_ratio": ("options", "warmup_ratio", float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "layer_lr_decay": ("options", "layer_lr_decay", float, lambda v: 0 < v <= 1, "in (0, 1]"),
}
_FORM = "--sweep KEY=V1,V2,... (e.g. --sweep lr=2e-5,5e-5,1e-4 --sweep seed=0,1)"


def parse_sweep(spec: Any) -> dict[str, list]:
    """{key: [values]} from `--sweep` flags or a `sweep:` mapping (see the module doc); {} for none."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        pairs = []
        for s in spec:
            key, eq, values = s.partition("=")
            if not eq or not key.strip() or not values.strip():
                raise UserError(f"sweep: {s!r} is not KEY=V1,V2,...; write {_FORM}")
            pairs.append((key.strip(), values))
    else:
        raise UserError(f"sweep: expected {_FORM}, or a mapping of KEY: [values] in the config, got {spec!r}")
    grid: dict[str, list] = {}
    for key, values in pairs:
        if key not in SWEEP_KEYS:
            raise UserError(f"sweep: unknown key {key!r}; a sweep varies {', '.join(SWEEP_KEYS)}")
        if key in grid:
            raise UserError(f"sweep: {key} is given twice; list all its values once: --sweep {key}=V1,V2,...")
        grid[key] = _values(key, values)
    if math.prod(len(v) for v in grid.values()) < 2:
        raise UserError(f"sweep: {grid} is a single trial; give a key two or more values, or set it without "
                         f"--sweep (e.g. --lr)")
    return grid


def _values(key: str, values: Any) -> list:
    kind, check, wants = SWEEP_KEYS[key][2:]
    items = values.split(",") if isinstance(values, str) else values if isinstance(values, (list, tuple)) else [values]
    out = []
    for raw in items:
        try:
            v = kind(raw.strip() if isinstance(raw, str) else raw)
            if (isinstance(raw, float) and kind is int and raw != int(raw)) or not math.isfinite(v):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            what = "an integer" if kind is int else "a finite number"
            raise UserError(f"sweep: {key} value {raw!r} is not {what}") from None
        if not check(v):
            raise UserError(f"sweep: {key} value {raw!r} must be {wants}")
        out.append(v)
    if not out:
        raise UserError(f"sweep: {key} has no values; write {_FORM}")
    if len(set(out)) != len(out):
        raise UserError(f"sweep: {key} repeats a value ({values!r}); each trial must differ")
    return out


def trials(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid, in order (the first key varies slowest)."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def trial_name(params: dict) -> str:
    """A trial's directory name under `<run_dir>/trials/`: its params, e.g. `lr=5e-05,seed=1`
    (repr: distinct values give distinct names)."""
    return ",".join(f"{k}={v!r}" for k, v in params.items())


def trial_loop_config(loop, params: dict, trial_dir: str):
    """The fine-tune loop config (pipelines.training.finetune.FinetuneLoopConfig) of one trial:
    `params` over the sweep's base (a warmup ratio sets the warmup steps of the planned step
    count), its own run dir, evaluations reported."""
    cfg = copy.deepcopy(loop)
    for key, value in params.items():
        section, name = SWEEP_KEYS[key][:2]
        setattr(getattr(cfg, section), name, value)
    if "warmup_ratio" in params:
        cfg.train.warmup_steps = int(params["warmup_ratio"] * cfg.train.max_steps)
    cfg.run_dir, cfg.report_evals = trial_dir, True
    return cfg


def _run_trial(params: dict, *, loop, datasets: dict, plan: dict, run_dir: str) -> None:
    """One trial, in its Tune trial actor: a whole fine-tune. Its final report (through
    TuneReportCallback) carries `checkpoint_path`, the checkpoint whose HF export the sweep exports;
    the trial's placement group id goes to `<trial dir>/placement_group` (`_placement_group_releaser`)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.compat import placement_group_recorder
    from pipelines.training.finetune import finetune_loop_per_worker
    from pipelines.training.loop import as_loop_config
    from pipelines.training.trainer import torch_trainer

    trial_dir = storage.join(run_dir, "trials", trial_name(params))
    # max_failures 0: a worker failure fails the trial (recorded), and a trial Tune stops can't
    # start a new worker group while it goes.
    trainer = torch_trainer(finetune_loop_per_worker, as_loop_config(trial_loop_config(loop, params, trial_dir)),
                            run_dir=trial_dir,
                            num_workers=plan["num_workers"], use_gpu=plan["use_gpu"],
                            cpus_per_worker=plan["cpus_per_worker"], max_failures=0, keep_last=1,
                            datasets=datasets, callbacks=[TuneReportCallback(), placement_group_recorder(
                                storage.join(trial_dir, "placement_group"))])
    trainer.fit()


def _release_placement_group(run_dir: str, params: dict) -> None:
    from pipelines.compat import remove_placement_group_by_id

    hex_id = storage.read_text(storage.join(run_dir, "trials", trial_name(params), "placement_group"))
    if hex_id:
        remove_placement_group_by_id(hex_id)


def _placement_group_releaser(run_dir: str):
    """A Tune callback (on the sweep's driver) that removes a trial's placement group when the
    trial ends: one Tune stopped (ASHA) died with its Train controller and left it reserved."""
    from ray import tune

    class ReleasePlacementGroups(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _release_placement_group(run_dir, trial.config)

        def on_trial_error(self, iteration, trials, trial, **info):
            _release_placement_group(run_dir, trial.config)

    return ReleasePlacementGroups()


def concurrent_trials(plan: dict, cluster: Mapping[str, float], n_trials: int) -> int:
    """How many trials the cluster holds at once (at least one, at most every trial): each needs
    its workers' CPUs plus the data share the plan kept free, and a GPU per worker on GPU."""
    per_trial = plan["num_workers"] * plan["cpus_per_worker"] + plan.get("data_cpus", 0)
    fits = cluster.get("CPU", 0) // per_trial if per_trial > 0 else n_trials
    if plan["use_gpu"]:
        fits = min(fits, cluster.get("GPU", 0) // plan["num_workers"])
    return int(min(max(1, fits), n_trials))


class SweepResult(NamedTuple):
    export: str  # <run_dir>/export: the best trial's HF export
    metrics: dict  # its metrics, with a `sweep` summary


def run_sweep(loop, datasets: dict, plan: dict, run_dir: str, grid: dict[str, list]) -> SweepResult:
    """Run the sweep (see the module doc) in a Ray session; returns (the best trial's export
    copied to `<run_dir>/export`, its metrics with a `sweep` summary). `loop` is the sweep's base
    FinetuneLoopConfig."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # One report per evaluation, the last one with the result. ASHA stops a trial at max_t, which
    # would race the final report's checkpoint: one more than a trial reports never comes.
    evaluations = math.ceil(loop.train.max_steps / loop.train.eval_every) + 1
    fn = tune.with_parameters(_run_trial, loop=loop, datasets=datasets, plan=plan, run_dir=run_dir)
    combos = trials(grid)
    tuner = tune.Tuner(
        # The trial's own process only drives its TorchTrainer: it takes no CPU from the workers (Tune
        # wants a non-empty request, so it asks for a byte of memory).
        tune.with_resources(fn, {"cpu": 0, "memory": 1}),
        param_space={k: tune.grid_search(v) for k, v in grid.items()},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(time_attr="training_iteration", metric="val_score", mode="max",
                                    max_t=evaluations + 1, grace_period=1, reduction_factor=2),
            max_concurrent_trials=concurrent_trials(plan, ray.cluster_resources(), len(combos))),
        run_config=tune.RunConfig(name="tune", storage_path=run_dir, verbose=0,
                                  callbacks=[_placement_group_releaser(run_dir)]))
    with _env("TUNE_DISABLE_SIGINT_HANDLER", "1"):  # Ctrl-C raises: an interrupted sweep exports nothing
        results = tuner.fit()
    for params in combos:  # whatever a callback missed (a trial that never started has none)
        _release_placement_group(run_dir, params)
    records = [_record(r, run_dir) for r in results]
    finished = [r for r in records if r["status"] == "finished"]
    best = max(finished, key=lambda r: r["best_score"], default=None)
    summary = {"metric": "val_score (validation split)", "scheduler": "ASHA", "grid": grid,
               "best_trial": best and best["trial"], "trials": records}
    storage.write_text(storage.join(run_dir, "sweep.json"), json.dumps(summary, indent=1, default=str) + "\n")
    if best is None:  # a ValueError: the CLI prints one line pointing at the record
        raise UserError(f"no sweep trial finished (see {storage.join(run_dir, 'sweep.json')}): "
                           + "; ".join(f"{r['trial']}: {r['status']} {r.get('error') or ''}" for r in records))
    export = export_dir(run_dir)
    storage.replace_tree(best["export"], export)  # the best trial's checkpoint's HF export
    return SweepResult(export, {**best["metrics"], "sweep": {k: summary[k] for k in ("best_trial", "grid")}
                                | {"params": best["params"], "record": storage.join(run_dir, "sweep.json")}})


def _record(result, run_dir: str) -> dict:
    """One trial's line in sweep.json, from Tune's result: finished when its last report is the
    fine-tune's result (it carries the checkpoint), stopped early or failed otherwise."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    params = {k: result.config[k] for k in result.config}
    m = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, dict)}
    record = {"trial": trial_name(params), "params": params,
              "trial_dir": storage.join(run_dir, "trials", trial_name(params)),
              "steps": m.get("step"), "best_score": m.get("best_score"), "best_step": m.get("best_step")}
    if m.get(CHECKPOINT_PATH_KEY):
        export = hf_dir(checkpoint_location(record["trial_dir"], m[CHECKPOINT_PATH_KEY]))
        return record | {"status": "finished", "export": export, "metrics": m}
    if result.error is not None:
        return record | {"status": "failed", "error": f"{type(result.error).__name__}: {result.error}"}
    return record | {"status": "stopped early"}


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
