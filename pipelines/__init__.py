"""pipelines: the Ray programs behind every raybert job, on top of the pure-PyTorch `bert_core`.

- Scoring: `scoring` (Ray Data: read Parquet, tokenize, predict on an actor pool, write one output
  row per input row, resumable) and `predictors` (its per-block steps, plain classes usable
  without Ray).
- Pretraining: `pretrain_data` (Parquet text -> tokenized, packed rows) and `train` (the
  per-worker MLM loop: Ray Train + DeepSpeed ZeRO, checkpoints with an HF-format export).
- Fine-tuning: `finetune_data` (labeled Parquet -> tokenized, label-encoded rows) and `finetune`
  (the per-worker multi-task loop and its metrics).
- Shared by both training loops: `worker` (configs, the DeepSpeed engine, checkpoint/resume and
  the Ray Train driver side) and `resources` (CPU/GPU reservations planned on the driver).
- `corpora`: real text from installed PyPI packages, for demos, tests and benchmarks.

Imports flow jobs -> pipelines -> bert_core: nothing here imports `jobs`, and nothing here parses
command lines or YAML. Ray and DeepSpeed are imported inside the functions that use them.
"""
