"""The per-worker fine-tuning loop: one shared encoder, one or more task heads, on the same Ray
Train + DeepSpeed path as pretraining.

Contract:
- `finetune_loop_per_worker(config)` reads only its argument (`{"loop": FinetuneLoopConfig}`, see
  pipelines.training.loop.as_loop_config).
  It runs under `TorchTrainer` with datasets `train_<task>` (and `val_<task>` for classify/tag
  tasks that have validation rows) from pipelines/training/finetune_data.py.
- Model: `bert_core.BertMultiTask` with a head per task, the encoder (and an mlm task's head)
  loaded from `model.init_from` or fresh from `model.preset`. DeepSpeed is applied by
  pipelines.training.engine.build_engine, the one place shared with pretraining (ZeRO 0-3, fp32/bf16/fp16,
  AdamW, warmup + decay, accumulation, clipping); threads and the all-reduce come from
  pipelines.training.worker, metrics writing from pipelines.training.run_log, the heartbeat from pipelines.training.watchdog.
- Knobs (FinetuneOptions): epochs (which set the step count), warmup ratio, weight decay (in
  TrainConfig), dropout, layer-wise LR decay (layer l of L trains at lr * decay^(L + 1 - l), the
  embeddings at lr * decay^(L + 1), the pooler and heads at lr), and early stopping on the
  validation metric with a patience in evaluations.
- Multi-task mixing: each optimizer step trains one task, drawn from the same seeded stream on
  every rank (all ranks must run the same head): `proportional` to weight x training rows,
  by `weights` alone, or `round_robin`. Heads a step doesn't use get zero gradients.
- Validation (every `eval_every` steps and at the end), summed over workers: classify gives
  accuracy and macro-F1 (over the labels present in gold or predictions); tag gives token accuracy
  and seqeval-style entity F1 (BIO spans, exact type and boundaries; an I- after O or another type
  opens a span, as seqeval's default mode). The early-stopping score is the mean over tasks of
  `metric` (auto: macro-F1 for classify, entity F1 for tag).
- Output: the weights of the best evaluation (the last step's when no task has validation rows),
  reported once at the end as a Ray checkpoint holding an HF export (bert_core.save_pretrained:
  id2label per head, the primary task under HF's keys); outside a sweep that is the loop's only
  `ray.train.report` (it blocks until the controller polls). A sweep trial (`report_evals`) also
  reports each evaluation's `val_score` and `best_score`, without a checkpoint, for Tune's
  early-stopping scheduler (pipelines/training/sweep.py). Rank 0 logs to
  `<run_dir>/metrics.jsonl` from a background thread and prints a progress line; training losses
  stay on the device between log steps.
  Fine-tunes are short, so there is no mid-run checkpoint: a worker failure (FailureConfig)
  restarts the fine-tune from the start.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import UserError
from bert_core.masking import Masker
from bert_core.masking_config import MaskingConfig
from bert_core.model import BertConfig, BertMultiTask, TaskHead
from pipelines.console import shows_progress
from pipelines import storage
from pipelines.training.finetune_data import IGNORE, FinetuneData
from pipelines.training.engine import build_bert_config, build_engine, evaluating, gathered_state_dict
from pipelines.training.run_dir import checkpoint_name, hf_dir, write_result
from pipelines.training.run_log import MetricsWriter
from pipelines.training.config import FinetuneOptions, ModelConfig, TrainConfig
from pipelines.training.watchdog import Heartbeat
from pipelines.training.worker import WorkerContext, all_reduce_sum, derive_seed, mlm_step_inputs, run_in_session, worker_nodes



@dataclass
class TaskSpec:
    """What a worker needs of a task (labels resolved by the driver)."""

    name: str
    kind: str
    id2label: Optional[dict] = None
    weight: float = 1.0
    train_rows: int = 0
    has_val: bool = False

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}


@dataclass
class FinetuneLoopConfig:
    run_dir: str
    tokenizer: str
    tasks: list  # of TaskSpec
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneData = field(default_factory=FinetuneData)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: FinetuneOptions = field(default_factory=FinetuneOptions)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    use_gpu: bool = False
    torch_threads: Optional[int] = None  # CPU threads per worker; None = the CPUs it holds, rounded up
    # A sweep trial: every evaluation is reported to Ray Train (and through it to Tune's early-stopping
    # scheduler). Off otherwise: a report blocks until the controller's next poll.
    report_evals: bool = False

    def to_dict(self) -> dict:
        """As plain data, for the run's config.json record (workers get the object itself)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Model and optimizer groups
# --------------------------------------------------------------------------------------------


def finetune_bert_config(model: ModelConfig, options: FinetuneOptions, vocab_size: int) -> BertConfig:
    """The shared encoder config (init_from's or the preset's, overrides, vocab check), plus dropout."""
    cfg = build_bert_config(model, vocab_size)
    if options.dropout is not None:
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = options.dropout
    if options.classifier_dropout is not None:
        cfg.classifier_dropout = options.classifier_dropout
    cfg.id2label = cfg.label2id = None  # the heads carry their own labels
    cfg.architectures = None
    cfg.extra.pop("raybert", None)
    return cfg


def build_multitask_model(model: ModelConfig, bert_config: BertConfig, heads: list[TaskHead]) -> BertMultiTask:
    """Fresh heads on the `init_from` encoder (and MLM head, for an mlm task), or all fresh."""
    m = BertMultiTask(bert_config, heads)
    if model.init_from:
        from bert_core.checkpoint import load_pretrained

        enc = load_pretrained(storage.cached_copy(model.init_from), head="encoder")
        own = m.bert.state_dict()
        enc_sd = {k: v for k, v in enc.state_dict().items() if k in own}  # no pooler if unused
        m.bert.load_state_dict(enc_sd, strict=m.bert.pooler is None or "pooler.dense.weight" in enc_sd)
        for t in heads:
            if t.kind == "mlm":
                mlm = load_pretrained(storage.cached_copy(model.init_from), head="mlm")
                m.heads[t.name].predictions.load_state_dict(mlm.cls.predictions.state_dict())
        m.tie_weights()
    m.bert.encoder.gradient_checkpointing = model.activation_checkpointing
    return m.train()


def layerwise_param_groups(model: BertMultiTask, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with layer-wise LR decay; no weight decay on biases and LayerNorm weights."""
    L = model.config.num_hidden_layers
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("bert.embeddings."):
            depth = 0
        elif name.startswith("bert.encoder.layer."):
            depth = int(name.split(".")[3]) + 1
        else:  # pooler and heads
            depth = L + 1
        wd = 0.0 if p.ndim < 2 or "LayerNorm" in name else weight_decay
        scale = decay ** (L + 1 - depth)
        g = groups.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr": lr * scale})
        g["params"].append(p)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def bio_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entity spans (start, end, type) of one word-label sequence, seqeval's default IOB2 reading."""
    spans, start, kind = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, typ = t.partition("-") if t[:2] in ("B-", "I-") else ("", "", t)
        begins = t == "O" or prefix == "B" or (prefix == "I" and typ != kind) or (prefix == "" and typ != kind)
        if begins and start is not None:
            spans.add((start, i, kind))
            start = kind = None
        if t != "O" and start is None:
            start, kind = i, typ
    return spans


def classify_metrics(confusion: np.ndarray) -> dict:
    """Accuracy and macro-F1 from an (L, L) confusion matrix (rows gold, columns predicted)."""
    tp = np.diag(confusion)
    gold, pred = confusion.sum(1), confusion.sum(0)
    present = (gold + pred) > 0
    f1 = np.where(present, 2 * tp / np.maximum(gold + pred, 1), 0.0)
    return {"accuracy": float(tp.sum() / max(confusion.sum(), 1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


def _score(task: TaskSpec, m: dict, metric: str) -> float:
    if metric == "auto":
        metric = "macro_f1" if task.kind == "classify" else "entity_f1"
    if metric not in m:
        raise UserError(f"metric {metric} is not computed for {task.kind} task {task.name}")
    return m[metric]


def evaluate_task(engine, task: TaskSpec, shard, cfg: FinetuneLoopConfig, device, beat: Heartbeat) -> dict:
    """Validation metrics of one classify/tag task over every worker's shard."""
    L = len(task.id2label)
    names = [task.id2label[i] for i in range(L)]
    confusion = np.zeros((L, L), dtype=np.float64)
    loss_sum = n = tp = n_pred = n_gold = 0.0
    with evaluating(engine):
        for batch in shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, dtypes=torch.int64,
                                              device="cpu"):
            beat.beat("eval")
            logits = engine(task.name, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            batch["token_type_ids"].to(device)).float()
            labels = batch["labels"].to(device)
            loss_sum += float(F.cross_entropy(logits.reshape(-1, L), labels.reshape(-1), ignore_index=IGNORE,
                                              reduction="sum"))
            pred = logits.argmax(-1).cpu().numpy()
            gold = labels.cpu().numpy()
            keep = gold != IGNORE
            n += float(keep.sum())
            np.add.at(confusion, (gold[keep], pred[keep]), 1)
            if task.kind == "tag":
                for g_row, p_row, k_row in zip(gold, pred, keep):
                    g_spans = bio_spans([names[i] for i in g_row[k_row]])
                    p_spans = bio_spans([names[i] for i in p_row[k_row]])
                    tp += len(g_spans & p_spans)
                    n_pred += len(p_spans)
                    n_gold += len(g_spans)
    flat = all_reduce_sum([loss_sum, n, tp, n_pred, n_gold] + confusion.ravel().tolist(), device)
    loss_sum, n, tp, n_pred, n_gold = flat[:5]
    m = {"val_loss": loss_sum / max(n, 1), "val_count": int(n),
         **classify_metrics(np.array(flat[5:]).reshape(L, L))}
    if task.kind == "tag":
        p, r = tp / max(n_pred, 1), tp / max(n_gold, 1)
        m.update(entity_precision=p, entity_recall=r, entity_f1=2 * p * r / max(p + r, 1e-12),
                 entities=int(n_gold))
        m["token_accuracy"] = m.pop("accuracy")
        m.pop("macro_f1")
    return m


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def mixing_probabilities(tasks: list[TaskSpec], mixing: str) -> np.ndarray:
    if mixing == "weights":
        w = np.array([t.weight for t in tasks], dtype=np.float64)
    else:  # proportional (round_robin doesn't sample)
        w = np.array([t.weight * max(t.train_rows, 1) for t in tasks], dtype=np.float64)
    return w / w.sum()


def task_of_step(step: int, tasks: list[TaskSpec], mixing: str, seed: int) -> TaskSpec:
    """The task step `step` trains: a function of (seed, step) only, so every rank agrees."""
    if len(tasks) == 1:
        return tasks[0]
    if mixing == "round_robin":
        return tasks[step % len(tasks)]
    rng = np.random.default_rng(derive_seed(seed, 23, step))
    return tasks[int(rng.choice(len(tasks), p=mixing_probabilities(tasks, mixing)))]


class _Stream:
    """Endless micro-batches of one task's shard; each pass reshuffles with a seed of its epoch."""

    def __init__(self, shard, batch_size: int, seed: int):
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.epoch, self._it = 0, None

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.shard.iter_torch_batches(
                    batch_size=self.batch_size, drop_last=True, dtypes=torch.int64, device="cpu",
                    local_shuffle_buffer_size=16 * self.batch_size,
                    local_shuffle_seed=derive_seed(self.seed, self.epoch)))
            try:
                return next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
        raise RuntimeError("a task's training shard gave this worker no full micro-batch; use more data, "
                           "a smaller micro_batch_size or fewer workers")


def task_loss(engine, task: TaskSpec, batch: dict, masker: Optional[Masker], seed: int, device):
    if task.kind == "mlm":
        mb = mlm_step_inputs(masker, batch["input_ids"], seed)
        logits = engine(task.name, mb.input_ids.to(device), masked_index=mb.masked_index.to(device))  # (M, V)
        return F.cross_entropy(logits.float(), mb.masked_labels.to(device))
    logits = engine(task.name, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["token_type_ids"].to(device))  # (B, L) or (B, T, L)
    labels = batch["labels"].to(device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def finetune_loop_per_worker(config: dict) -> None:
    run_in_session(_finetune, config["loop"])


def _finetune(cfg: FinetuneLoopConfig, wc: WorkerContext, beat: Heartbeat, log: MetricsWriter) -> None:
    import ray.train

    tc, opts = cfg.train, cfg.options
    rank, world, device = wc.rank, wc.world, wc.device
    run = _open_finetune(cfg, wc)
    engine = run.engine
    log.write({"event": "start", "step": 0, "world_size": world, "nodes": worker_nodes(), "threads": wc.threads,
               "tasks": [t.name for t in cfg.tasks], "max_steps": tc.max_steps, "time": time.time()})
    streams = {t.name: _Stream(ray.train.get_dataset_shard(f"train_{t.name}"), tc.micro_batch_size,
                               derive_seed(tc.seed, 31, i)) for i, t in enumerate(cfg.tasks)}
    vals = {t.name: ray.train.get_dataset_shard(f"val_{t.name}") for t in cfg.tasks if t.has_val}
    window, best = _LossWindow(cfg.tasks, device), _BestSoFar(opts)
    last_metrics: dict = {}
    engine.train()
    for step in range(1, tc.max_steps + 1):
        task = task_of_step(step, cfg.tasks, opts.mixing, tc.seed)
        for micro in range(tc.grad_accum):
            beat.beat("data")
            batch = next(streams[task.name])
            beat.beat("step")
            seed = derive_seed(tc.seed, rank, step, micro)
            torch.manual_seed(derive_seed(seed, 1))  # dropout
            loss = task_loss(engine, task, batch, run.masker, seed, device)
            engine.backward(loss)
            engine.step()
            window.add(task, loss, batch)
        window.steps += 1
        beat.beat("step", step)
        metrics: dict = {}
        if step % tc.log_every == 0 or step == tc.max_steps:
            metrics = window.reduce(step, tc.max_steps, engine, rank)
        stop = step == tc.max_steps
        if vals and (step % tc.eval_every == 0 or stop):
            metrics["step"] = step
            stop |= best.evaluate(step, engine, vals, cfg, rank, device, beat, metrics)
            if cfg.report_evals and not stop:  # every rank: a report is collective (the last is the result's)
                ray.train.report({"step": step, "val_score": metrics["val_score"], "best_score": best.score,
                                  "best_step": best.step})
        if metrics:
            log.write(metrics)
            last_metrics.update(metrics)
        if stop:
            break
    if not vals:  # no validation: keep the last weights
        best.state_dict, best.step = gathered_state_dict(engine, rank, tc.zero_stage), step
    final = {**last_metrics, "step": step, "best_step": best.step, "best_score": best.score if vals else None}
    log.write({"event": "end", **final, "time": time.time()})
    beat.beat("checkpoint")
    _report_result(final, step, best.state_dict, run, rank)
    engine.destroy()


@dataclass
class OpenedFinetune:
    """What a fine-tune's loop starts from (`_open_finetune`)."""

    tokenizer: object  # bert_core.tokenizer.load_tokenizer's
    heads: list  # of bert_core.model.TaskHead, one per task
    bert_config: BertConfig  # the shared encoder's
    engine: object  # the DeepSpeed engine
    masker: Optional[Masker]  # only when a task is MLM


def _open_finetune(cfg: FinetuneLoopConfig, wc: WorkerContext) -> OpenedFinetune:
    """The multi-task model from `init_from` with fresh heads seeded alike on every rank,
    layer-wise LR groups, one DeepSpeed engine; a masker only when a task is MLM."""
    from bert_core.tokenizer import load_tokenizer

    tc, opts = cfg.train, cfg.options
    tokenizer = load_tokenizer(storage.cached_copy(cfg.tokenizer))  # a URI: this node's copy
    heads = [TaskHead(t.name, t.kind, t.id2label) for t in cfg.tasks]
    bert_config = finetune_bert_config(cfg.model, opts, len(tokenizer))
    torch.manual_seed(tc.seed)  # identical fresh heads on every rank
    model = build_multitask_model(cfg.model, bert_config, heads)
    groups = layerwise_param_groups(model, tc.lr, tc.weight_decay, opts.layer_lr_decay)
    engine = build_engine(model, tc, wc.world, param_groups=groups)
    masker = (Masker.from_tokenizer(tokenizer, cfg.masking) if any(t.kind == "mlm" for t in cfg.tasks) else None)
    return OpenedFinetune(tokenizer=tokenizer, heads=heads, bert_config=bert_config, engine=engine, masker=masker)


class _LossWindow:
    """Per task: loss sum and micro-batches since the last log, on the device (no per-batch sync),
    and the tokens seen (counted on the CPU batch: no device sync either)."""

    def __init__(self, tasks: list, device):
        self.tasks, self.device = tasks, device
        self.index = {t.name: i for i, t in enumerate(tasks)}
        self.sums = torch.zeros(len(tasks), 2, dtype=torch.float64, device=device)
        self.t0, self.steps, self.tokens = time.time(), 0, 0

    def add(self, task: TaskSpec, loss: torch.Tensor, batch: dict) -> None:
        self.sums[self.index[task.name], 0] += loss.detach().double()
        self.sums[self.index[task.name], 1] += 1
        self.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def reduce(self, step: int, max_steps: int, engine, rank: int) -> dict:
        """The log step's metrics over all ranks (one sync); rank 0 prints the progress line."""
        flat = all_reduce_sum(torch.cat([self.sums.flatten(), self.sums.new_tensor([self.tokens])]), self.device)
        dt = max(time.time() - self.t0, 1e-9)
        metrics = {"step": step, "lr": engine.get_lr()[-1], "tokens_per_s": flat[-1] / dt,
                   **{f"loss_{t.name}": flat[2 * i] / flat[2 * i + 1]
                      for i, t in enumerate(self.tasks) if flat[2 * i + 1] > 0}}
        if rank == 0 and shows_progress():
            losses = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
            eta = (max_steps - step) * dt / self.steps
            print(f"[raybert] step {step}/{max_steps} {losses} {metrics['tokens_per_s']:,.0f} tokens/s "
                  f"eta {eta:.0f}s", flush=True)
        self.sums.zero_()
        self.t0, self.steps, self.tokens = time.time(), 0, 0
        return metrics


class _BestSoFar:
    """Early stopping on the validation score: the best score, its step and (rank 0) its weights."""

    def __init__(self, opts: FinetuneOptions):
        self.opts = opts
        self.score, self.step, self.state_dict, self.bad_evals = -math.inf, None, None, 0

    def evaluate(self, step: int, engine, vals: dict, cfg: FinetuneLoopConfig, rank: int, device, beat,
                 metrics: dict) -> bool:
        """Evaluate every task with validation data into `metrics`; True when patience ran out."""
        by_name = {t.name: t for t in cfg.tasks}
        scores = []
        for name, shard in vals.items():
            m = evaluate_task(engine, by_name[name], shard, cfg, device, beat)
            metrics.update({f"{k}_{name}": v for k, v in m.items()})
            scores.append(_score(by_name[name], m, self.opts.metric))
        score = float(np.mean(scores))
        metrics["val_score"] = score
        stop = False
        if score > self.score + self.opts.min_delta:
            self.score, self.step, self.bad_evals = score, step, 0
            self.state_dict = gathered_state_dict(engine, rank, cfg.train.zero_stage)  # None except on rank 0
        else:
            self.bad_evals += 1
            if self.opts.patience and self.bad_evals >= self.opts.patience:
                metrics["early_stop"] = stop = True
        metrics["best_step"] = self.step
        return stop


def _report_result(final: dict, step: int, best_sd: Optional[dict], run: OpenedFinetune, rank: int) -> None:
    """Rank 0 saves the best weights as an HF checkpoint (with the result's metrics); every rank
    reports it to Ray Train."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raybert-ft-") as tmp:
        ckpt = None
        if rank == 0:
            from bert_core.checkpoint import save_pretrained

            out = BertMultiTask(run.bert_config, run.heads)
            out.load_state_dict(best_sd)
            save_pretrained(out, hf_dir(tmp), tokenizer=run.tokenizer)
            write_result(tmp, final)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(step))
