"""The model step of batch scoring, as plain Python that runs with or without Ray.

Contract:
- `tokenize_batch` (pipelines/scoring/tokenize.py) is the stateless CPU step before it.
- `Predictor` is the stateful model step (one per Ray actor): `__init__` loads the model once,
  `__call__(batch) -> pyarrow.Table` runs it under `torch.inference_mode()`. It takes
  `tokenize_batch`'s output, or, built with `tokenize=` (that function's keyword arguments), the
  input rows themselves, which it tokenizes first: on CPU the scoring pipeline runs both steps in
  one actor (see pipelines/scoring/job.py for why). Inside each block it sorts rows by length and cuts
  batches with `bert_core.padding.token_budget_batches`, so rows x longest stays under
  `max_tokens`; results are scattered back to input order. Rows with an error pass through with
  null outputs. It runs in `dtype` (`resolve_dtype`, pipelines/scoring/precision.py: a job passes
  the one precision it chose; `auto` in a lone Predictor is decided there too).
- What differs between tasks is one small class each (`STEPS`: `EmbedStep`, `ClassifyStep`,
  `TagStep`, `FillMaskStep`): `forward` runs a padded batch (tag and fill-mask return a typed
  `TagBatch` / `FillMaskBatch`), `collect` brings a block's outputs home in input order,
  `columns` makes the task's output columns.
- Output columns: the caller's kept columns (`tokenize_batch(keep_columns=...)`), `id, row_hash`
  (when the rows have them), `n_tokens, truncated, error` and, by task,
  `embed`: `embedding` fixed_size_list<float32>[H];
  `classify`: `label` (name from id2label), `score`, `probs` list<float32>;
  `tag`: `entities` list<struct<word, label, score, start, end>>, one per word whose label is
  not "O" (the word's label is its first sub-token's, as HF's "first" aggregation; offsets are
  character offsets into the text);
  `fill-mask`: `fill_mask` list<struct<position, tokens, token_ids, scores>>, top-k per [MASK]
  (position is the token index of the [MASK]).
  Every block has the same schema, also when all its rows are errors or it has no rows.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipelines import UserError
from pipelines.scoring.config import HEAD_OF_TASK, TASKS
from pipelines.scoring.precision import resolve_dtype
from pipelines.scoring.tokenize import KEEP, as_table, encoder, tokenize_batch

log = logging.getLogger(__name__)

# Key of the output blocks' schema metadata that names the precision the predictor ran in.
DTYPE_METADATA = "raybert.dtype"

ENTITY_TYPE = pa.struct([("word", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                         ("start", pa.int32()), ("end", pa.int32())])
FILL_TYPE = pa.struct([("position", pa.int32()), ("tokens", pa.list_(pa.string())),
                       ("token_ids", pa.list_(pa.int32())), ("scores", pa.list_(pa.float32()))])


# --------------------------------------------------------------------------------------------
# Predict (stateful model step)
# --------------------------------------------------------------------------------------------


def _lists(col: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A list<int> column as one numpy array per row (views into the flat values)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return []
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _cast_linears(model, dtype) -> None:
    """Store every Linear weight in `dtype` once, so autocast doesn't re-cast the weights of each
    layer at every forward (a kernel per weight per batch on a GPU). LayerNorm and embeddings
    stay fp32, and autocast keeps running LayerNorm and softmax in fp32, so the numbers are
    those of plain autocast. A Linear tied to an embedding table (the MLM decoder) is skipped."""
    import torch

    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied:
            m.to(dtype)


def _sdpa_backends(device_type: str):
    """The attention kernels a predictor allows. On Hopper GPUs torch prefers cuDNN attention
    for bf16/fp16; it builds a new plan for every new (batch, length) shape, which on scoring's
    ever-changing shapes made the bf16 forward 19x slower than fp32 (fp32 never used cuDNN).
    Flash (no mask) and memory-efficient (masked) kernels need no per-shape planning."""
    from torch.nn.attention import SDPBackend

    if device_type == "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]  # the CPU kernels


class Predictor:
    """One loaded model; `__call__` scores a tokenized block, or with `tokenize` an input block that
    it tokenizes first (see the module docstring).

    Device work per block: each token-budget batch is padded on the host (to a multiple of
    `pad_multiple` tokens, 8 on a GPU), copied over from pinned memory without blocking, and run;
    its outputs stay on the device until the block is done, then come back in one copy per
    output tensor. So the host never waits on the device between batches (except where the
    model itself syncs), and the same code runs on CPU with `device="cpu"`.
    """

    def __init__(self, model: str, task: str, *, max_tokens: int = 4096,
                 max_batch_rows: Optional[int] = None, dtype: str = "fp32", device: str = "cpu",
                 pooling: Optional[str] = None, normalize: Optional[bool] = None, top_k: int = 5,
                 num_threads: Optional[int] = None, tokenizer: Optional[str] = None,
                 head: Optional[str] = None, pad_multiple: Optional[int] = None,
                 tokenize: Optional[dict] = None):
        import torch

        from pipelines.storage import cached_copy

        # A model or tokenizer URI: this node's copy, fetched once per node.
        model, tokenizer = cached_copy(model), cached_copy(tokenizer)
        from bert_core.checkpoint import load_pretrained

        if task not in TASKS:
            raise UserError(f"task must be one of {TASKS}, got {task!r}")
        if dtype != "auto":
            resolve_dtype(dtype, device)  # a bad or impossible dtype fails before the model loads
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.task = task
        self.tokenize = tokenize  # tokenize_batch's kwargs: blocks come untokenized
        self.max_tokens = int(max_tokens)
        self.max_batch_rows = max_batch_rows
        self.top_k = int(top_k)
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.pad_multiple = int(pad_multiple or (8 if on_gpu else 1))
        kwargs = {"pooling": pooling, "normalize": normalize} if task == "embed" else {}
        # `head` picks one task head of a multi-task checkpoint (default: its primary task).
        net = load_pretrained(model, HEAD_OF_TASK[task], task=head, **kwargs).eval()
        self.config = net.config
        self.hidden = self.config.hidden_size
        self.dtype = resolve_dtype(dtype, device, self.hidden)  # `auto`: pipelines/scoring/precision.py
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]
        if self.autocast_dtype is not None:
            _cast_linears(net, self.autocast_dtype)
        self.model = net.to(self.device)
        self.pin = on_gpu and torch.cuda.is_available()
        self._backends = _sdpa_backends(self.device.type)
        enc = encoder(str(tokenizer or model), 8)
        pad = enc.token_to_id("[PAD]")
        self.pad_id = pad if pad is not None else self.config.pad_token_id
        self.mask_id = enc.token_to_id("[MASK]")
        if task == "fill-mask" and self.mask_id is None:
            raise UserError(f"{model}: the tokenizer has no mask token; fill-mask needs one")
        self.vocab = (np.array([enc.id_to_token(i) for i in range(enc.get_vocab_size())], dtype=object)
                      if task == "fill-mask" else None)
        self.id2label = self.config.id2label or {i: f"LABEL_{i}" for i in range(self.config.num_labels)}
        self.step = STEPS[task](self)

    # -- helpers ---------------------------------------------------------------------------

    def _context(self):
        import torch
        from torch.nn.attention import sdpa_kernel

        if self.autocast_dtype is None:
            return sdpa_kernel(self._backends)
        ctx = ExitStack()
        ctx.enter_context(sdpa_kernel(self._backends))
        ctx.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return ctx

    def to_device(self, a: np.ndarray):
        import torch

        t = torch.from_numpy(a)
        if self.pin:  # pinned pages let the copy run asynchronously with the host's next batch
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _forward(self, seqs: list[np.ndarray], types: Optional[list[np.ndarray]]):
        """Pad and run one batch; its outputs stay on the device until the block is collected."""
        from bert_core.padding import pad_batch

        ids, mask = pad_batch(seqs, pad_id=self.pad_id, multiple=self.pad_multiple)  # (B, T) each
        # No mask for a batch without padding: the model then skips masking (and its mask checks).
        mask_t = self.to_device(mask) if not mask.all() else None  # (B, T)
        tt = self.to_device(pad_batch(types, pad_id=0, multiple=self.pad_multiple)[0]) if types is not None else None
        return self.step.forward(ids, mask, self.to_device(ids), mask_t, tt)

    # -- the UDF ---------------------------------------------------------------------------

    def __call__(self, batch: Any) -> pa.Table:
        import torch

        from bert_core.padding import token_budget_batches

        table = as_table(batch)
        if self.tokenize is not None:
            table = tokenize_batch(table, **self.tokenize)
        n = table.num_rows
        errors = table.column("error").to_pylist() if n else []
        seqs = _lists(table.column("input_ids"))
        types = _lists(table.column("token_type_ids")) if "token_type_ids" in table.column_names else None
        rows = np.flatnonzero(np.array([e is None for e in errors], dtype=bool))
        lengths = np.fromiter((len(seqs[i]) for i in rows), dtype=np.int64, count=len(rows))
        done: list[tuple[np.ndarray, Any]] = []  # (input rows, device outputs) per batch run

        with torch.inference_mode(), self._context():
            for b in token_budget_batches(lengths, self.max_tokens, self.max_batch_rows, self.pad_multiple):
                idx = rows[b]  # input rows of this batch, longest first
                try:
                    done.append((idx, self._run(idx, seqs, types)))
                except Exception as e:  # a batch that fails is retried row by row
                    log.warning("batch of %d rows failed (%s); scoring rows one by one", len(idx), e)
                    for i in idx:
                        try:
                            done.append((np.array([i]), self._run(np.array([i]), seqs, types)))
                        except Exception as e1:  # noqa: BLE001 - the row gets the error instead
                            errors[i] = f"model error: {type(e1).__name__}: {e1}"
            results = self.step.collect(done, n, seqs)
        out = self._table(table, errors, results)
        return out.replace_schema_metadata({DTYPE_METADATA: self.dtype})

    def _run(self, idx: np.ndarray, seqs, types):
        return self._forward([seqs[i] for i in idx], [types[i] for i in idx] if types is not None else None)

    def _table(self, table: pa.Table, errors: list, results: Any) -> pa.Table:
        # The caller's own columns first (the Python API), then the id and row_hash, when there.
        cols: dict[str, pa.Array] = {c[len(KEEP):]: table.column(c).combine_chunks()
                                     for c in table.column_names if c.startswith(KEEP)}
        for name in ("id", "row_hash"):
            if name in table.column_names:
                cols[name] = table.column(name).combine_chunks()
        cols["n_tokens"] = table.column("n_tokens").combine_chunks().cast(pa.int32())
        cols["truncated"] = table.column("truncated").combine_chunks().cast(pa.bool_())
        cols["error"] = pa.array(errors, pa.string())
        missing = np.array([e is not None for e in errors], dtype=bool)  # rows without outputs
        return pa.table(cols | self.step.columns(table, results, missing))


# --------------------------------------------------------------------------------------------
# One small class per task: run a padded batch, bring the block's outputs home, make the columns
# --------------------------------------------------------------------------------------------


@dataclass
class TagBatch:
    labels: Any  # (B*T,) int32 on the device: the top label of every token
    scores: Any  # (B*T,) float32 on the device: its probability
    width: int  # T, the padded length


@dataclass
class FillMaskBatch:
    positions: np.ndarray  # (M,) flat indices into B*T of the [MASK] tokens (found on the host)
    width: int  # T, the padded length
    scores: Any  # (M, k) float on the device, or None when the batch has no [MASK]
    token_ids: Any  # (M, k) on the device, or None


class TaskStep:
    """What differs between tasks. `forward` runs one padded batch and returns its outputs still
    on the device; `collect` brings a block's outputs to the host in one copy per tensor, in
    input order; `columns` turns them into the task's output columns (rows in `missing` get
    nulls). `names`: the columns it makes."""

    names: tuple = ()

    def __init__(self, predictor: "Predictor"):
        self.p = predictor

    def forward(self, ids: np.ndarray, mask: np.ndarray, ids_t, mask_t, types_t):
        raise NotImplementedError

    def collect(self, done: list, n: int, seqs: list) -> Any:
        raise NotImplementedError

    def columns(self, table: pa.Table, results: Any, missing: np.ndarray) -> dict:
        raise NotImplementedError


class _PooledStep(TaskStep):
    """embed and classify: one (width,) float32 vector per row."""

    width = 0

    def collect(self, done: list, n: int, seqs: list) -> np.ndarray:
        import torch

        full = np.zeros((n, self.width), dtype=np.float32)  # (n, H | L)
        if done:
            full[np.concatenate([i for i, _ in done])] = torch.cat([o for _, o in done]).cpu().numpy()
        return full


class EmbedStep(_PooledStep):
    names = ("embedding",)

    def __init__(self, predictor: "Predictor"):
        super().__init__(predictor)
        self.width = predictor.hidden

    def forward(self, ids, mask, ids_t, mask_t, types_t):
        return self.p.model(ids_t, mask_t, types_t).float()  # (B, H)

    def columns(self, table, results, missing):
        return {"embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(results.reshape(-1), pa.float32()), self.width, mask=pa.array(missing, pa.bool_()))}


class ClassifyStep(_PooledStep):
    names = ("label", "score", "probs")

    def __init__(self, predictor: "Predictor"):
        super().__init__(predictor)
        self.width = len(predictor.id2label)

    def forward(self, ids, mask, ids_t, mask_t, types_t):
        return self.p.model(ids_t, mask_t, types_t).float().softmax(-1)  # (B, L)

    def columns(self, table, results, missing):
        n, L = results.shape
        k = results.argmax(1) if n else np.zeros(0, dtype=np.int64)  # (n,)
        names = np.array([self.p.id2label.get(i, str(i)) for i in range(L)], dtype=object)
        return {"label": pa.array(names[k], pa.string(), mask=missing),
                "score": pa.array(results[np.arange(n), k], pa.float32(), mask=missing),
                "probs": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * L),
                                                  pa.array(results.reshape(-1), pa.float32()),
                                                  mask=pa.array(missing, pa.bool_()))}


class TagStep(TaskStep):
    names = ("entities",)

    def forward(self, ids, mask, ids_t, mask_t, types_t) -> TagBatch:
        probs = self.p.model(ids_t, mask_t, types_t).float().softmax(-1)  # (B, T, L)
        score, label = probs.max(-1)  # (B, T) each
        return TagBatch(label.int().flatten(), score.flatten(), ids.shape[1])

    def collect(self, done: list, n: int, seqs: list) -> list:
        """Per row: (labels, scores) of its tokens, padding dropped."""
        import torch

        per_row: list[Any] = [None] * n
        if not done:
            return per_row
        labels = torch.cat([o.labels for _, o in done]).cpu().numpy()
        scores = torch.cat([o.scores for _, o in done]).cpu().numpy()
        start = 0
        for idx, o in done:
            for r, i in enumerate(idx.tolist()):
                a = start + r * o.width
                per_row[i] = (labels[a:a + len(seqs[i])], scores[a:a + len(seqs[i])])
            start += len(idx) * o.width
        return per_row

    def columns(self, table, results, missing):
        texts = table.column("text").to_pylist() if table.num_rows else []
        offsets, word_ids = _lists(table.column("offsets")), _lists(table.column("word_ids"))
        return {"entities": pa.array(
            [None if (missing[i] or r is None) else self.entities(*r, texts[i], offsets[i], word_ids[i])
             for i, r in enumerate(results)], pa.list_(ENTITY_TYPE))}

    def entities(self, labels: np.ndarray, scores: np.ndarray, text: str, offsets: np.ndarray,
                 word_ids: np.ndarray) -> list[dict]:
        """Per word: the first sub-token's label and score; offsets span all its sub-tokens."""
        spans = offsets.reshape(-1, 2)  # (T, 2) char offsets of each token
        words: dict[int, list[int]] = {}
        for t, w in enumerate(word_ids.tolist()):
            if w >= 0:
                words.setdefault(w, []).append(t)
        out = []
        for w, toks in words.items():
            first = toks[0]
            k = int(labels[first])
            label = self.p.id2label.get(k, str(k))
            if label == "O":
                continue
            start, end = int(spans[first][0]), int(spans[toks[-1]][1])
            out.append({"word": text[start:end], "label": label, "score": float(scores[first]),
                        "start": start, "end": end})
        return out


class FillMaskStep(TaskStep):
    names = ("fill_mask",)

    def forward(self, ids, mask, ids_t, mask_t, types_t) -> FillMaskBatch:
        import torch

        p = self.p
        # [MASK] positions are found on the host, so the device never has to report a count.
        flat = np.flatnonzero((ids == p.mask_id) & (mask == 1))  # (M,) positions in B*T
        if flat.size == 0:
            return FillMaskBatch(flat, ids.shape[1], None, None)
        logits = p.model(ids_t, mask_t, types_t, masked_index=p.to_device(flat))  # (M, V)
        probs = torch.softmax(logits.float(), dim=-1)  # (M, V)
        top = torch.topk(probs, min(p.top_k, probs.shape[-1]), dim=-1)  # (M, k)
        return FillMaskBatch(flat, ids.shape[1], top.values, top.indices)

    def collect(self, done: list, n: int, seqs: list) -> list:
        """Per row: a list of (position, scores, token ids); rows without a [MASK] get []."""
        import torch

        per_row: list[Any] = [None] * n
        for idx, _ in done:
            for i in idx.tolist():
                per_row[i] = []
        hits = [(idx, o) for idx, o in done if o.scores is not None]
        if hits:
            vals = torch.cat([o.scores for _, o in hits]).float().cpu().numpy()  # (M, k)
            toks = torch.cat([o.token_ids for _, o in hits]).cpu().numpy()  # (M, k)
            m = 0
            for idx, o in hits:
                for pos in o.positions.tolist():
                    r, t = divmod(pos, o.width)
                    per_row[int(idx[r])].append((t, vals[m], toks[m]))
                    m += 1
        return per_row

    def columns(self, table, results, missing):
        """list<struct<position, tokens, token_ids, scores>>, built column-wise (no per-item dicts)."""
        vocab = self.p.vocab
        counts = np.array([0 if (missing[i] or r is None) else len(r) for i, r in enumerate(results)], dtype=np.int32)
        items = [x for i, r in enumerate(results) if not (missing[i] or r is None)
                 for x in sorted(r, key=lambda x: x[0])]  # by position within each row
        M = len(items)
        k = items[0][2].shape[0] if M else min(self.p.top_k, len(vocab))
        pos = np.array([t for t, _, _ in items], dtype=np.int32)
        ids = np.stack([t for _, _, t in items]).astype(np.int32) if M else np.zeros((0, k), np.int32)
        scores = np.stack([v for _, v, _ in items]).astype(np.float32) if M else np.zeros((0, k), np.float32)
        inner = pa.array(np.arange(M + 1, dtype=np.int32) * k)
        struct = pa.StructArray.from_arrays(
            [pa.array(pos, pa.int32()),
             pa.ListArray.from_arrays(inner, pa.array(vocab[ids.reshape(-1)], pa.string())),
             pa.ListArray.from_arrays(inner, pa.array(ids.reshape(-1), pa.int32())),
             pa.ListArray.from_arrays(inner, pa.array(scores.reshape(-1), pa.float32()))],
            fields=list(FILL_TYPE))
        outer = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return {"fill_mask": pa.ListArray.from_arrays(pa.array(outer), struct, mask=pa.array(missing, pa.bool_()))}


STEPS = {"embed": EmbedStep, "classify": ClassifyStep, "tag": TagStep, "fill-mask": FillMaskStep}
