"""The per-worker MLM pretraining loop: Ray Train + DeepSpeed around single-device bert_core code.

Contract:
- `train_loop_per_worker(config)` reads only its argument, `{"loop": LoopConfig}` (`as_loop_config`),
  the typed config itself, so it pickles to any worker and never captures driver state.
  It runs under `ray.train.torch.TorchTrainer` with `TorchConfig(backend="gloo"|"nccl")` and no
  `datasets=`: each epoch's training stream is planned in the loop, its files in that epoch's
  order (pipelines.training.pretrain_data.epoch_split); the validation set is the run dir's `val.parquet`
  (built once by the driver), each worker evaluating its share.
- Distribution is applied in one place: `pipelines.training.engine.build_engine` calls `deepspeed.initialize` once
  (ZeRO stage 0-3, fp32 / bf16 / fp16, torch AdamW with a warmup + linear/cosine decay schedule,
  gradient accumulation, clipping). The model is plain `bert_core.BertForMaskedLM`.
- Loss: cross-entropy at masked positions only. The model gathers the masked rows before the
  (H x V) vocab projection (`masked_index`), so the largest matmul runs on ~15% of tokens.
- A "step" is one optimizer step (`grad_accum` micro-batches on every worker).
- Metrics (every `log_every` steps): loss, MLM accuracy, lr, tokens/s, MFU and the peak FLOP/s
  it is quoted against (measured on the workers, pipelines.training.worker.peak_flops, unless
  `peak_flops_per_worker` is set); validation loss, accuracy and seconds every `eval_every` steps and at
  the end (masking `data.eval_mlm_probability` of tokens, 15%, whatever rate trains). Rank 0
  appends them to `<run_dir>/metrics.jsonl` from a background thread (one JSON object a line;
  `"event"` lines mark start/resume, with the world size, nodes and torch threads) and prints a
  progress line. Between log steps the loop never waits on the host: loss and
  accuracy sums stay on the device. `ray.train.report` (which blocks until the controller's next
  poll, ~2 s) is called only with checkpoints.
- Each worker computes with as many torch threads as the CPUs it holds, rounded up
  (`LoopConfig.torch_threads` overrides). Rank 0 keeps `<run_dir>/heartbeat.json` current (step
  and phase) for the driver's stall watchdog (pipelines.training.watchdog.fit_with_watchdog).
- Checkpoints (every `save_every` steps and at the end; Ray keeps the last `keep_last`), one Ray
  checkpoint directory each, laid out as pipelines.training.run_dir says: the DeepSpeed engine
  state (module, optimizer with every rank's ZeRO partition, LR scheduler, global step; read back
  by `engine.load_checkpoint`), an HF export for `transformers.BertForMaskedLM.from_pretrained`
  and `raybert score`, and the state file: the step and the data position (epoch, and
  micro-batches of that epoch already consumed by each worker).
- An invocation may end before `max_steps` (always with a checkpoint): at `stop_at`, after
  `steps_per_run` steps past where it resumed, after `time_budget_s` of training, or early enough
  before `deadline` to write its checkpoint in time (`StopPolicy`; the clock is checked after the
  first step and on log steps, where the ranks sync anyway). The next invocation resumes there.
- Resume is exact. On start (a new `fit` on the same run dir, or a Ray Train restart after a
  worker failure) the loop loads `ray.train.get_checkpoint()`, re-opens the data stream of the
  saved epoch and skips the micro-batches already consumed. The data order is deterministic
  (files permuted and a local shuffle, both seeded by (seed, epoch); `preserve_order`), and every random draw (masking,
  dropout) is seeded from (seed, rank, epoch, micro-batch index): a function of the data
  position, so no RNG state needs saving and a resumed run draws what the straight run drew.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from bert_core.init import neighbour_init
from bert_core.masking import Masker
from bert_core.model import BertConfig, BertForMaskedLM, mlm_flops_per_token, set_dropout
from pipelines.console import shows_progress
from pipelines import storage
from pipelines.training.pretrain_data import DataConfig, epoch_split, read_val_rows
from pipelines.training.engine import (build_bert_config, build_engine, evaluating, fresh_lr_schedule, gathered_state_dict,
                              lr_schedule)
from pipelines.training.run_dir import checkpoint_name, deepspeed_dir, hf_dir, read_state, write_state
from pipelines.training.run_plan import StopPolicy, out_of_budget
from pipelines.training.run_log import MetricsWriter
from pipelines.training.config import FaultDrill, ModelConfig, TrainConfig
from pipelines.training.watchdog import Heartbeat
from pipelines.training.worker import (WorkerContext, all_reduce_sum, derive_seed, device_name, fault_drill,
                                       mlm_step_inputs, peak_flops, run_in_session, worker_nodes)


@dataclass
class LoopConfig:
    """Everything a worker needs; built by jobs/pretrain.py, passed as a dict."""

    run_dir: str
    tokenizer: str  # resolved tokenizer path (checkpoint dir or vocab.txt)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    use_gpu: bool = False
    torch_threads: Optional[int] = None  # CPU threads per worker; None = the CPUs it holds, rounded up
    fault: FaultDrill = field(default_factory=FaultDrill.from_env)  # tests and chaos runs only
    pieces: list = field(default_factory=list)  # the corpus's [file, row group, rows] (pretrain_data.corpus_pieces)

    def to_dict(self) -> dict:
        """As plain data, for the run's config.json record (workers get the object itself)."""
        return asdict(self)


def build_mlm_model(model: ModelConfig, bert_config: BertConfig) -> BertForMaskedLM:
    """`init_from`'s MLM model, or fresh weights for `bert_config`."""
    if model.init_from:
        from bert_core.checkpoint import load_pretrained

        m = load_pretrained(storage.cached_copy(model.init_from), head="mlm")
        m.train()
    else:
        m = BertForMaskedLM(bert_config)
        if model.init == "neighbour":
            neighbour_init(m)
    m.bert.encoder.gradient_checkpointing = model.activation_checkpointing
    if model.train_dropout is not None:
        set_dropout(m, model.train_dropout)
    return m


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def export_hf(engine, bert_config: BertConfig, path: str, tokenizer, rank: int, zero_stage: int) -> None:
    """Write an HF BertForMaskedLM directory from the engine's weights (rank 0 writes; under
    ZeRO-3 every rank must call it)."""
    sd = gathered_state_dict(engine, rank, zero_stage)
    if rank == 0:
        from bert_core.checkpoint import save_pretrained

        out = BertForMaskedLM(bert_config)
        out.load_state_dict(sd)
        save_pretrained(out, path, tokenizer=tokenizer)


def write_checkpoint(engine, path: str, state: dict, bert_config: BertConfig, tokenizer, rank: int,
                     zero_stage: int) -> None:
    """Write this rank's part of a checkpoint directory (every rank calls it): the engine state
    (this rank's ZeRO partition), the HF export and the state file (rank 0)."""
    engine.save_checkpoint(deepspeed_dir(path), tag="state", client_state={"raybert": state})
    export_hf(engine, bert_config, hf_dir(path), tokenizer, rank, zero_stage)
    if rank == 0:
        write_state(path, state)


def save_checkpoint(engine, state: dict, metrics: dict, bert_config: BertConfig, tokenizer, rank: int,
                    zero_stage: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raybert-ckpt-") as tmp:
        write_checkpoint(engine, tmp, state, bert_config, tokenizer, rank, zero_stage)
        # Ray merges every rank's files (each holds its own ZeRO partition) into one directory.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(state["step"]))


def load_checkpoint(engine, ckpt_dir: str) -> dict:
    state = read_state(ckpt_dir)
    path, _ = engine.load_checkpoint(deepspeed_dir(ckpt_dir), tag="state")
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {deepspeed_dir(ckpt_dir)}")
    if engine.global_steps != state["step"]:
        raise RuntimeError(f"checkpoint step mismatch: engine {engine.global_steps}, state {state['step']}")
    return state


# --------------------------------------------------------------------------------------------
# The MLM step and evaluation
# --------------------------------------------------------------------------------------------


class MLMOutput(NamedTuple):
    """One micro-batch's masked-LM figures (`forward_mlm`)."""

    loss: torch.Tensor  # mean over masked tokens, on the device
    correct: torch.Tensor  # masked tokens predicted right, on the device
    masked: int  # masked tokens: masking runs on the CPU, so reading it costs no device sync


def forward_mlm(engine, masker: Masker, input_ids: torch.Tensor, seed: int, device) -> MLMOutput:
    """One micro-batch through the MLM model, masked with `seed` (no backward)."""
    mb = mlm_step_inputs(masker, input_ids, seed)
    logits = engine(mb.input_ids.to(device), masked_index=mb.masked_index.to(device))  # (M, V)
    labels = mb.masked_labels.to(device)  # (M,)
    loss = F.cross_entropy(logits.float(), labels)
    return MLMOutput(loss=loss, correct=(logits.argmax(-1) == labels).sum(), masked=labels.numel())


def evaluate(engine, val_rows: torch.Tensor, masker: Masker, cfg: LoopConfig, rank: int, device,
             beat: Optional[Heartbeat] = None) -> dict:
    """Validation loss / accuracy over this worker's share of the run's validation set (`val_rows`,
    (N, seq_len) int64 from pipelines.training.pretrain_data.read_val_rows), summed over workers.

    Masking is seeded by (seed, rank, batch index), identical at every evaluation, so successive
    val numbers differ only by the weights.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x masked, correct, masked
    with evaluating(engine):
        for i, batch in enumerate(val_rows.split(cfg.train.micro_batch_size)):  # (<=B, T) each
            if beat is not None:
                beat.beat("eval")
            out = forward_mlm(engine, masker, batch, derive_seed(cfg.train.seed, 7, rank, i), device)
            sums[0] += out.loss.double() * out.masked
            sums[1] += out.correct
            sums[2] += out.masked
    loss_sum, correct, n = all_reduce_sum(sums, device)
    return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1), "val_tokens": int(n)}


# --------------------------------------------------------------------------------------------
# The loop's parts: when to stop, what to log, where to resume
# --------------------------------------------------------------------------------------------


class WindowStats(NamedTuple):
    """A metrics window over every rank (`MetricsWindow.reduce`)."""

    loss: float  # mean over the masked tokens
    accuracy: float  # masked tokens predicted right
    seconds: float  # wall time of the window
    steps: int  # optimizer steps in it


class MetricsWindow:
    """Loss and accuracy sums since the last log step, kept on the device: adding a micro-batch
    launches two tiny kernels and never waits for the device; `reduce` syncs once, over all ranks."""

    def __init__(self, device):
        self.device = device
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x masked, correct, masked
        self.steps, self.t0 = 0, time.time()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, masked: int) -> None:
        self.sums[0] += loss.detach().double() * masked
        self.sums[1] += correct
        self.sums[2] += masked

    def reduce(self) -> WindowStats:
        """The window over every rank; starts a new one."""
        s, c, n = all_reduce_sum(self.sums, self.device)
        seconds, steps = time.time() - self.t0, self.steps
        self.sums.zero_()
        self.steps, self.t0 = 0, time.time()
        return WindowStats(loss=s / max(n, 1), accuracy=c / max(n, 1), seconds=max(seconds, 1e-9), steps=steps)


def epoch_batches(shard, cfg: LoopConfig, epoch: int, skip: int):
    """(index, micro-batch) of `epoch` in the deterministic order, after the first `skip` (those
    consumed before the checkpoint this run resumed from)."""
    tc = cfg.train
    seen = 0
    for i, batch in enumerate(shard.iter_torch_batches(
            batch_size=tc.micro_batch_size, drop_last=True, dtypes=torch.int64, device="cpu",
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None,
            local_shuffle_seed=derive_seed(tc.seed, 11, epoch) if cfg.data.shuffle_buffer_rows else None)):
        seen += 1
        if i >= skip:
            yield i, batch
    if seen == 0:
        raise RuntimeError("the train dataset gave this worker no full micro-batch; "
                           "use more data, a smaller micro_batch_size or fewer workers")


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def as_loop_config(loop) -> dict:
    """Ray Train's `train_loop_config` for a loop config: the typed object under one key (Ray Train
    takes a dict), so no worker re-decodes it."""
    return {"loop": loop}


def train_loop_per_worker(config: dict) -> None:
    run_in_session(_train, config["loop"])


def _train(cfg: LoopConfig, wc: WorkerContext, beat: Heartbeat, log: MetricsWriter) -> None:
    tc, rank, world, device = cfg.train, wc.rank, wc.world, wc.device
    run = _open_run(cfg, wc, beat, log)
    engine, state, bert_config = run.engine, run.state, run.bert_config
    policy = StopPolicy.for_invocation(tc, state["step"], state.get("budget"))
    flops_per_token = mlm_flops_per_token(bert_config, cfg.data.seq_len, cfg.data.masking.mlm_probability)
    tokens_per_step = tc.micro_batch_size * cfg.data.seq_len * tc.grad_accum * world
    val_rows = _val_rows(cfg.run_dir, rank, world)
    val_masker = Masker.from_tokenizer(run.tokenizer, replace(cfg.data.masking,
                                                              mlm_probability=cfg.data.eval_mlm_probability))
    window = MetricsWindow(device)
    step = first_step = state["step"]
    last_saved = step if run.resumed else -1
    engine.train()
    done = policy.reached(step)
    while not done:
        epoch = state["epoch"]
        beat.beat("data")
        shard = epoch_split(cfg.data, cfg.tokenizer, cfg.pieces, tc.seed, epoch, rank, world)  # this epoch's order
        for i, batch in epoch_batches(shard, cfg, epoch, state["consumed"]):
            beat.beat("step")
            boundary = _micro_step(engine, run.masker, batch["input_ids"], derive_seed(tc.seed, rank, epoch, i),
                                   device, window)
            state["consumed"] = i + 1
            if not boundary:
                beat.beat("data")
                continue
            step += 1
            window.steps += 1
            state["step"] = step
            beat.beat("step", step)
            log_now = step % tc.log_every == 0 or policy.reached(step)
            stop = _time_to_stop(policy, step, first_step, log_now, tc, device, engine, world)
            metrics = {}
            if log_now or stop:
                metrics = _window_metrics(window, engine, policy, step, epoch, run.peak, tokens_per_step,
                                          flops_per_token, rank)
            if val_rows is not None and (step % tc.eval_every == 0 or policy.reached(step)):
                metrics.update(step=step, **_validate(engine, val_rows, val_masker, cfg, rank, device, beat, policy))
            if metrics:
                log.write(metrics)
            if step % tc.save_every == 0 or stop:
                _save(engine, state, metrics, bert_config, run.tokenizer, rank, tc, policy, beat, log)
                last_saved = step
            fault_drill(cfg.fault, rank, step, cfg.run_dir, beat)
            if stop:
                done = True
                break
            beat.beat("data")
        else:
            state["epoch"], state["consumed"] = state["epoch"] + 1, 0
            log.write({"event": "epoch_end", "epoch": epoch, "step": step})
    if last_saved != step:  # nothing to run (already at the end): still leave a checkpoint
        beat.beat("checkpoint")
        save_checkpoint(engine, dict(state), {"step": step}, bert_config, run.tokenizer, rank, tc.zero_stage)
    log.write({"event": "end", "step": step, "time": time.time()})
    # ZeRO-3 with gloo can abort in destroy_process_group at exit unless the engine lets go first.
    engine.destroy()
    del engine
    gc.collect()


def _validate(engine, val_rows: torch.Tensor, masker: Masker, cfg: LoopConfig, rank: int, device, beat: Heartbeat,
              policy: StopPolicy) -> dict:
    """`evaluate`, timed for a budgeted run's reserve (the pass at the end is planned for)."""
    t0 = time.time()
    out = evaluate(engine, val_rows, masker, cfg, rank, device, beat)
    seconds = time.time() - t0
    if policy.budget is not None:
        policy.budget.eval_s = seconds
    return out | {"val_seconds": round(seconds, 3)}


def _val_rows(run_dir: str, rank: int, world: int) -> Optional[torch.Tensor]:
    """This worker's share of the run's validation set, read once per invocation; None when the run
    has none (val_fraction 0, or no held-out document packed into a row)."""
    rows = read_val_rows(run_dir, rank, world)
    return None if rows is None or len(rows) == 0 else torch.from_numpy(rows)


def _micro_step(engine, masker: Masker, input_ids: torch.Tensor, seed: int, device, window: MetricsWindow) -> bool:
    """Forward and backward of one micro-batch, and the optimizer step at an accumulation
    boundary (DeepSpeed's `step` decides); masking and dropout seeded from the data position.
    Returns whether this was the boundary (a whole optimizer step)."""
    torch.manual_seed(derive_seed(seed, 1))  # dropout
    out = forward_mlm(engine, masker, input_ids, seed, device)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(out.loss)
    engine.step()
    window.add(out.loss, out.correct, out.masked)
    return boundary


def _save(engine, state: dict, metrics: dict, bert_config: BertConfig, tokenizer, rank: int, tc: TrainConfig,
          policy: StopPolicy, beat: Heartbeat, log: MetricsWriter) -> None:
    """Checkpoint at `state`'s step (with the LR plan and the budget's use, on budgeted runs),
    timing the write for the stop policy's deadline margin and the budget's reserve."""
    beat.beat("checkpoint")
    log.sync()  # the checkpoint's steps' metrics reach a remote run dir now, not at the next mirror
    t_save = time.time()
    if policy.budget is not None:
        state.update(lr_schedule=lr_schedule(engine).state(), budget=policy.budget.state(t_save))
    save_checkpoint(engine, dict(state), metrics or {"step": state["step"]}, bert_config, tokenizer, rank,
                    tc.zero_stage)
    policy.save_s = max(policy.save_s, time.time() - t_save)
    if policy.budget is not None:
        policy.budget.save_s = max(policy.budget.save_s or 0.0, time.time() - t_save)


@dataclass
class OpenedRun:
    """What an invocation's loop starts from (`_open_run`)."""

    tokenizer: object  # bert_core.tokenizer.load_tokenizer's
    masker: Masker  # the training masking
    bert_config: BertConfig
    engine: object  # the DeepSpeed engine
    state: dict  # where the run is: step, epoch, consumed (and a budgeted run's LR plan and budget use)
    resumed: bool  # from a checkpoint: a new fit on the run dir, or a Ray Train restart
    peak: float  # the workers' summed peak FLOP/s, which MFU is quoted against


def _open_run(cfg: LoopConfig, wc: WorkerContext, beat: Heartbeat, log: MetricsWriter) -> OpenedRun:
    """This invocation's model and engine: fresh weights (seeded alike on every rank) or the
    checkpoint Ray Train resumes from, and the summed peak FLOP/s MFU is quoted against; logs the
    start (or resume) event."""
    import ray.train

    from bert_core.tokenizer import load_tokenizer

    tc, device = cfg.train, wc.device
    tokenizer = load_tokenizer(storage.cached_copy(cfg.tokenizer))  # a URI: this node's copy
    masker = Masker.from_tokenizer(tokenizer, cfg.data.masking)
    bert_config = build_bert_config(cfg.model, len(tokenizer))
    torch.manual_seed(tc.seed)  # identical fresh weights on every rank
    engine = build_engine(build_mlm_model(cfg.model, bert_config), tc, wc.world)
    state = {"step": 0, "epoch": 0, "consumed": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(engine, d)
    schedule = fresh_lr_schedule(engine, tc)  # as configured now: max_steps, warmup may have changed
    if tc.total_time_budget_s is not None and "lr_schedule" in state:
        schedule.load(state["lr_schedule"])  # a budgeted run's plan goes on where it was: no jump
    beat.step = state["step"]
    # MFU is quoted against the sum of the workers' measured (or configured) peaks.
    peak = all_reduce_sum([tc.peak_flops_per_worker or peak_flops(cfg.run_dir, device, tc.dtype, wc.threads)],
                          device)[0]
    log.write({"event": "resume" if ckpt is not None else "start", "step": state["step"],
               "epoch": state["epoch"], "consumed": state["consumed"], "world_size": wc.world,
               "nodes": worker_nodes(), "threads": wc.threads, "device": device_name(device),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "peak_flops": peak, "time": time.time()})
    return OpenedRun(tokenizer=tokenizer, masker=masker, bert_config=bert_config, engine=engine, state=state,
                     resumed=ckpt is not None, peak=peak)


def _time_to_stop(policy: StopPolicy, step: int, first_step: int, log_now: bool, tc: TrainConfig, device,
                  engine, world: int) -> bool:
    """At the end, or (timed invocations, on log steps and the first step) out of time on any rank:
    the ranks agree through one all-reduce, so they all stop at the same step. A budgeted run
    re-plans its schedule here, from the same all-reduce."""
    stop = policy.reached(step)
    if policy.timed and (log_now or step == first_step + 1):
        now = time.time()
        if step == first_step + 1:  # first step: its wall time is the only estimate yet
            policy.step_s = max(policy.step_s, now - policy.t_start)
        b = policy.budget
        figures = [b.used(now), b.observe(step, now), b.reserve_s] if b is not None else []
        late, *agreed = all_reduce_sum([float(policy.late(now, tc.log_every))] + figures, device)
        stop |= late > 0
        if b is not None:
            stop |= _follow_budget(policy, engine, tc, step, *(x / world for x in agreed))
    return stop


def _follow_budget(policy: StopPolicy, engine, tc: TrainConfig, step: int, used_s: float, step_s: float,
                   reserve_s: float) -> bool:
    """Re-plan the LR schedule to end when the budget does (the ranks' mean figures, identical on
    every rank), and this invocation with it. Returns whether the budget is spent.

    The schedule counts its own steps (LambdaLR's `last_epoch`), which fall behind the loop's when
    fp16 skips an overflowing step: the plan is made in its units, the stop in the loop's."""
    b = policy.budget
    if step_s > 0:  # 0: no rate yet (a fresh run's first step): the plan waits for the next check
        schedule, taken = lr_schedule(engine), engine.lr_scheduler.last_epoch
        left = min(tc.max_steps, b.planned_end(b.total_s, step, used_s, step_s, reserve_s)) - step
        schedule.replan(taken, taken + left)
        policy.end = min(policy.limit, step + max(schedule.end - taken, 0))
    return out_of_budget(used_s, b.total_s) or policy.reached(step)


def _window_metrics(window: MetricsWindow, engine, policy: StopPolicy, step: int, epoch: int, peak: float,
                    tokens_per_step: int, flops_per_token: float, rank: int) -> dict:
    """The metrics line of a log step (one sync over all ranks); rank 0 prints the progress line."""
    w = window.reduce()
    policy.step_s = max(policy.step_s, w.seconds / w.steps)
    tps = tokens_per_step * w.steps / w.seconds
    metrics = {"step": step, "epoch": epoch, "loss": w.loss, "mlm_acc": w.accuracy,
               "lr": engine.get_lr()[0], "tokens_per_s": tps,
               "mfu": tps * flops_per_token / peak, "peak_flops": peak,
               "tokens": step * tokens_per_step, "time": time.time()}
    if policy.budget is not None:  # rank 0's clock
        planned = step + lr_schedule(engine).end - engine.lr_scheduler.last_epoch  # in the loop's steps
        metrics.update(budget_used_s=policy.budget.used(metrics["time"]), planned_steps=planned)
    if rank == 0 and shows_progress():
        print(f"[raybert] step {step}/{policy.end} loss {w.loss:.4f} {tps:,.0f} tokens/s "
              f"mfu {metrics['mfu']:.1%} eta {_eta((policy.end - step) * w.seconds / w.steps)}", flush=True)
    return metrics
