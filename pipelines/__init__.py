"""pipelines: the Ray programs behind every raybert job, on top of the pure-PyTorch `bert_core`.

- Scoring: `scoring` (read Parquet (CSV and JSON Lines staged as Parquet) in units, tokenize and
  predict on actors, write one output row per input row, resumable, as named steps; Ray Data
  serves `score_dataset` on a caller's Dataset), `score_config` (its torch-free config),
  `score_output` (what an output holds, what raybert writes and may delete, what a resume must match),
  `tokenize` (the stateless CPU step) and `predictors` (the model step, one class per task; plain
  classes usable without Ray).
- Pretraining: `pretrain_data` (text files -> tokenized, packed rows, each epoch's files in its own
  order; the validation set packed once into the run dir) and `train` (the per-worker MLM loop:
  Ray Train + DeepSpeed ZeRO, checkpoints with an HF-format export).
- Fine-tuning: `finetune_data` (labeled files -> tokenized, label-encoded rows) and `finetune`
  (the per-worker multi-task loop and its metrics).
- Shared by both training loops: `train_config` (torch-free configs), `engine` (the one place a
  model meets DeepSpeed), `worker` (the worker context, collectives, seeding, checkpoint/resume
  inside a worker), `run_log` (metrics.jsonl, TensorBoard), `tracking` (MLflow, W&B), `watchdog`
  (heartbeat and stall detection) and `trainer` (the TorchTrainer, on the driver).
- Shared by every job: `inputs` (finding, checking and reading input files: Parquet, CSV, JSON
  Lines), `text_formats` (the one CSV / JSON Lines reader), `console` (what a job shows: verbosity, progress), `storage` (every filesystem
  question, local or object store), `resources` (CPU/GPU reservations planned on the driver),
  `compat` (every workaround for a Ray or DeepSpeed behaviour, each tested) and `corpora` (real
  text from installed PyPI packages, for demos, tests and benchmarks).

Imports flow jobs -> pipelines -> bert_core: nothing here imports `jobs`, and nothing here parses
command lines or YAML. Ray and DeepSpeed are imported inside the functions that use them.
"""
