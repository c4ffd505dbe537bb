"""pipelines: the Ray programs behind every raybert job, on top of the pure-PyTorch `bert_core`.

The tree shows the two jobs and what they share:

- `scoring/`: the scoring job. `job` (the run as named steps: reuse or reset the output, plan,
  score, finish; `score_dataset` for a caller's Ray Dataset), `config` (its torch-free config),
  `units` (units planned from the footers, scored on actors, each committed as one file), `feed`
  (CPU tokenizing actors that feed GPU actors), `output` (what an output holds, what raybert
  writes and may delete), `resume` (the run record a rerun must match), `tokenize` (the stateless
  CPU step) and `predictors` (the model step, one plain class per task, usable without Ray).
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
