"""Pretraining and fine-tuning on Ray Train + DeepSpeed: see pipelines/__init__.py for what each module holds."""
