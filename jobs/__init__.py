"""jobs: raybert's entrypoints. Each job module (`score`, `pretrain`, `finetune`, `submit`) holds
a typed config dataclass, `main(cfg) -> result` and its click command; `cli` gathers the commands
into `raybert`. `config` loads a YAML file plus CLI overrides into a config, `checks` holds every
training setting's range, `training` what pretraining and fine-tuning share on the driver,
`resume` a pretraining resume's recipe check, `ray_env` connects to
a cluster or starts the embedded local Ray, `schedule` keeps budgeted pretraining invocations on
one run directory from overlapping and records each in a ledger, and `demo` runs `make demo`.

Entrypoints are thin: they validate input on the driver (a bad input is one `Error:` line, exit
status 1 or 2), then call `pipelines`; tests call `main(cfg)` directly. `raybert submit` runs
the same entrypoints on a cluster through Ray Jobs.
"""
