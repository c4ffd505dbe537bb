"""DeepSpeed engine behaviour without Ray: ZeRO 1/2/3 x fp32/bf16 on a two-rank gloo group.

The matrix needs two ranks (ZeRO partitions the optimizer state, and under stage 3 the weights,
across them) but nothing of Ray: the ranks are two spawned processes that run exactly what a Ray
Train worker runs between `worker_context` and `ray.train.report` (`build_engine`, `forward_mlm`,
`write_checkpoint`, `load_checkpoint`). Ray's part of a checkpoint (merging the ranks' files into
one directory) is covered by the Ray Train runs in test_pretrain_ray.py, which train ZeRO-2 with
two workers, resume from such checkpoints and check both ranks' files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

MATRIX = [(stage, dtype) for dtype in ("fp32", "bf16") for stage in (1, 2, 3)]
STEPS = 3


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank: for each (stage, dtype), train STEPS steps, write a checkpoint, load it into a
    fresh engine, and record (rank 0) whether the loaded weights and step equal the trained ones."""
    import torch.distributed as dist

    from bert_core.masking import Masker, MaskingConfig
    from bert_core.tokenizer import load_tokenizer
    from pipelines.corpora import chinese_vocab_path
    from pipelines.training.loop import build_mlm_model, forward_mlm, load_checkpoint, write_checkpoint
    from pipelines.training.engine import build_bert_config, build_engine, evaluating, gathered_state_dict
    from pipelines.training.config import ModelConfig, TrainConfig
    from pipelines.training.worker import all_reduce_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = load_tokenizer(chinese_vocab_path())
    masker = Masker.from_tokenizer(tok, MaskingConfig())
    model_cfg = ModelConfig(preset="debug")
    bert_config = build_bert_config(model_cfg, len(tok))
    results = {}
    for stage, dtype in MATRIX:
        # A schedule longer than the steps taken: the LR is mid-decay, so a lost scheduler state shows.
        tc = TrainConfig(max_steps=100, micro_batch_size=4, zero_stage=stage, dtype=dtype, lr=3e-3,
                         warmup_steps=1)

        def engine():
            torch.manual_seed(0)  # identical fresh weights on every rank, as in the worker loop
            return build_engine(build_mlm_model(model_cfg, bert_config), tc, world)

        trained = engine()
        g = torch.Generator().manual_seed(rank)
        losses = []
        for i in range(STEPS):
            ids = torch.randint(1000, len(tok), (4, 32), generator=g)
            loss, _, _ = forward_mlm(trained, masker, ids, seed=i, device=torch.device("cpu"))
            trained.backward(loss)
            trained.step()
            losses.append(float(loss))
        with evaluating(trained):  # what pipelines.training.loop.evaluate runs on each validation batch
            ids = torch.randint(1000, len(tok), (4, 32), generator=g)
            val_loss, _, _ = forward_mlm(trained, masker, ids, seed=STEPS, device=torch.device("cpu"))
        val_loss = all_reduce_sum([float(val_loss)], torch.device("cpu"))[0] / world
        ckpt = os.path.join(out, f"zero{stage}_{dtype}")
        state = {"step": STEPS, "epoch": 0, "consumed": STEPS}
        write_checkpoint(trained, ckpt, state, bert_config, tok, rank, stage)
        dist.barrier()
        loaded = engine()
        loaded_state = load_checkpoint(loaded, ckpt)
        a, b = gathered_state_dict(trained, rank, stage), gathered_state_dict(loaded, rank, stage)
        if rank == 0:
            results[f"{stage}/{dtype}"] = {
                "losses": losses, "val_loss": val_loss, "global_steps": loaded.global_steps, "state": loaded_state,
                "lr": [trained.get_lr(), loaded.get_lr()],
                "weights_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}
        for e in (trained, loaded):
            e.destroy()
        dist.barrier()
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory) -> tuple[Path, dict]:
    import torch.multiprocessing as mp

    from conftest import free_port

    out = tmp_path_factory.mktemp("zero")
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage,dtype", MATRIX)
def test_zero_stage_precision_matrix(stage, dtype, matrix_run):
    """Acceptance 1: 2 ranks, debug model: ZeRO 1/2/3 x fp32/bf16 train and evaluate (finite
    losses), checkpoint (both ranks' optimizer partitions), load back exactly (weights, step, LR
    schedule), the DeepSpeed state consolidates to the exported weights, and the export loads and
    predicts."""
    from bert_core.checkpoint import load_pretrained, read_state_dict
    from conftest import assert_export_matches_zero_state

    out, results = matrix_run
    r = results[f"{stage}/{dtype}"]
    assert all(math.isfinite(x) for x in r["losses"]) and math.isfinite(r["val_loss"])
    assert r["global_steps"] == STEPS and r["state"] == {"step": STEPS, "epoch": 0, "consumed": STEPS}
    assert r["weights_equal"]
    trained_lr, loaded_lr = r["lr"]
    assert loaded_lr == trained_lr and 0 < trained_lr[0] < 3e-3  # restored mid-schedule
    ckpt = out / f"zero{stage}_{dtype}"
    assert json.loads((ckpt / "raybert_state.json").read_text())["step"] == STEPS
    names = {p.name for p in (ckpt / "deepspeed" / "state").iterdir()}
    prefix = "bf16_" if dtype == "bf16" else ""  # DeepSpeed names bf16 optimizer files differently
    assert {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names  # both ranks'
    assert_export_matches_zero_state(ckpt, read_state_dict(ckpt / "hf"),
                                      torch.float32 if dtype == "fp32" else torch.bfloat16)
    model = load_pretrained(ckpt / "hf", head="mlm")
    with torch.no_grad():
        logits = model(torch.tensor([[101, 2769, 103, 102]]))
    assert logits.shape == (1, 4, 21128) and torch.isfinite(logits).all()
