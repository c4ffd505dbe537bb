"""The sentiment benchmark's held-out split (benchmarks/chinese_sentiment.py, #22): no training,
early stopping, sweep or TF-IDF choice can read it. Driver-side only (no Ray, no training)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("chinese_sentiment", REPO / "benchmarks" / "chinese_sentiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_held_out_reviews_never_reach_training_sweeps_or_early_stopping(tmp_path):
    from jobs.finetune import validate
    from pipelines.training.finetune_data import is_val

    bench = _bench()
    splits = bench.write_splits(tmp_path)
    held_out = {t for t, _ in splits.test}
    # Until every model is trained, the only reviews on disk are the training pool's.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]
    pool = pq.read_table(splits.train_path).column("text").to_pylist()
    assert len(pool) + len(held_out) == 17_410 and 1_500 < len(held_out) < 2_000
    assert not held_out & set(pool)
    # What early stopping, the best evaluation, a sweep's selection and TF-IDF's C read: the
    # validation rows fine-tuning cuts from the pool (the same hash, seed and share as its config).
    train, val = bench.validation_split(splits.train_path)
    assert {t for t, _ in val} == {t for t in pool if is_val(t, 0.1, 0)} and not held_out & {t for t, _ in val}
    assert len(train) + len(val) == len(pool)

    args = argparse.Namespace(max_length=128, lr=2e-4, dtype="fp32", eval_every=150, epochs=2.0)
    finetunes = [bench.finetune_config(tmp_path, arm, seed, None, "vocab.txt", splits.train_path, args)
                 for arm in ("random", "pretrained", "tapt") for seed in (0, 1, 2)]
    for cfg in finetunes:
        (task,) = cfg.tasks
        assert task.paths == [splits.train_path] and not task.val_paths
        assert (cfg.data.val_fraction, cfg.data.split_seed) == (0.1, 0)
    sweep = finetunes[0]
    sweep.sweep = {"lr": [1e-4, 2e-4]}
    sweep.model.init_from, sweep.tokenizer = None, str(REPO / "configs")  # validate() checks settings only
    assert validate(sweep)[0].paths == [splits.train_path]  # a sweep's trials train and choose on the same split
    tapt = bench.tapt_config(tmp_path, str(tmp_path / "init"), splits.train_path, 60.0)
    assert tapt.data.paths == [splits.train_path] and tapt.train.dtype == "bf16"  # the arms' precision
    pretrain = bench.pretrain_config(tmp_path, 60.0)
    assert pretrain.data.paths == [str(tmp_path / "peoples_daily")]
    text = json.dumps([c.__dict__ for c in finetunes + [tapt, pretrain]], default=str)
    assert "test.parquet" not in text and not any(t in text for t in list(held_out)[:200])
