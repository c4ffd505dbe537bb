"""The precision scoring runs in: `dtype` as given, or what `auto` chooses.

Contract:
- `resolve_dtype(dtype, device, hidden)`: one predictor's own precision (outside a job: a job
  passes its `job_dtype`). fp16 needs a GPU. `auto` on a GPU is bf16 where the GPU has it, else
  fp16; on a CPU, `cpu_choice(hidden)`.
- `job_dtype(setting, device, record, hidden) -> DtypeChoice`: the one precision every row of a
  job is scored in, decided on the driver, for `raybert score` (pipelines/scoring/job.py: `score`)
  and from Python (`score_dataset`) alike. Explicit settings as given; a resume keeps its run
  record's choice (`dtype_used`); `auto` is bf16 on any GPU (native since Ampere, emulated before:
  one precision per output whatever GPUs its actors get) and `cpu_choice` on a CPU.
- `cpu_choice(hidden)`: the same answer on one machine every time. A timing probe alone did not
  give it: on one machine it chose fp32 from Python and bf16 from the CLI minutes apart (a loaded
  machine slows one dtype's timed run more than the other's). So:
  - a CPU with AMX (`amx_bf16` among its flags) runs bf16, unmeasured: MiniLM forwards ran 2.6-2.9x
    fp32's speed on a 2-core Xeon with AMX (one and two threads), and AMX exists for it;
  - any other CPU is measured once (`cpu_bf16_speedup`, on one thread: bf16 must reach
    CPU_BF16_MIN_SPEEDUP) and the decision kept in `<cache>/cpu_dtype.json` (`cache_file`:
    `$RAYBERT_CACHE`, default `~/.cache/raybert`, storage.cache_root), keyed by the CPU (`Cpu.key`:
    its model name and a digest of its flags), torch's version and the model's hidden size. Every
    later decision on that machine reads it (bf16's speed across the team's machines ranged from
    0.55x to 2.2x fp32's, so no flag rule fits them all). Delete the file to measure again. If it
    can't be written, the decision is kept for the process and the reason says so.
- `DtypeChoice.why` says how it was decided; `score_dataset` prints it, `raybert score` reports the
  dtype in its summary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from typing import Optional

from pipelines import UserError
from pipelines.scoring.config import DTYPE_CHOICES, DTYPES

# bf16 on a CPU must beat fp32 by this much on the probe to be chosen by `auto`: the matmuls
# are only part of a forward, and a CPU without native bf16 runs it several times slower.
CPU_BF16_MIN_SPEEDUP = 1.25
CACHE_NAME = "cpu_dtype.json"
FP16_NEEDS_GPU = "dtype fp16 needs a GPU (CPU autocast supports bf16); use bf16 or fp32 on CPU"


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # fp32 | bf16 | fp16
    why: str  # how it was decided, for the console


@dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset

    @property
    def key(self) -> str:
        digest = hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()[:12]
        return f"{self.model} (flags {digest})"

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags


def this_cpu() -> Cpu:
    """This machine's CPU: its model name and flags from /proc/cpuinfo (Linux; "Features" on Arm),
    else the platform's processor name without flags."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu part") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = frozenset(value.split())
                elif not line.strip() and model and flags:
                    break  # the first processor's block says it for all
    except OSError:
        pass
    return Cpu(model or platform.processor() or platform.machine() or "unknown CPU", flags)


@functools.lru_cache(maxsize=8)
def cpu_bf16_speedup(hidden: int = 384, tokens: int = 2048) -> float:
    """fp32 time / bf16 time of a (tokens x H) @ (H x 4H) matmul, the FFN's shape, on this CPU
    at the current torch thread count (best of 3 after a warm-up).

    A CPU without bf16 instructions emulates bf16 matmuls about 50x slower than fp32 (a 2-core
    Zen 3, one thread: 1.8 s against 0.04 s at 2048 tokens), so timing the full shape there cost
    8 s. A screen at an eighth of the tokens (one timed bf16 run after a warm-up of that shape, so
    no kernel-compile time is counted) returns at once when bf16 is under half fp32's speed: about
    0.5 s there. Otherwise the full shape decides."""
    import time

    import torch

    def best(dtype, rows: int, runs: int) -> float:
        a = torch.randn(rows, hidden).to(dtype)
        b = torch.randn(hidden, 4 * hidden).to(dtype)
        torch.mm(a, b)  # warm-up: oneDNN picks and caches its kernel for this shape
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    small = max(1, tokens // 8)
    screen = best(torch.float32, small, 3) / best(torch.bfloat16, small, 1)
    if screen < 0.5:  # far below CPU_BF16_MIN_SPEEDUP: bf16 is emulated here
        return screen
    return best(torch.float32, tokens, 3) / best(torch.bfloat16, tokens, 3)


def cache_file() -> str:
    from pipelines.storage import cache_root

    return os.path.join(cache_root(), CACHE_NAME)


_DECIDED: dict = {}  # (cache file, key) -> DtypeChoice: this process's decisions


def cpu_choice(hidden: int) -> DtypeChoice:
    """`auto` on this CPU for a model of `hidden` (see the module docstring)."""
    cpu = this_cpu()
    if cpu.has_amx:
        return DtypeChoice("bf16", "auto: this CPU has AMX bf16 units")
    import torch

    path = cache_file()
    key = f"{cpu.key} | torch {'.'.join(torch.__version__.split('.')[:2])} | hidden {hidden}"
    if (path, key) in _DECIDED:
        return _DECIDED[path, key]
    saved = _read_cache(path).get(key)
    if saved and saved.get("dtype") in ("bf16", "fp32"):
        choice = DtypeChoice(saved["dtype"], f"auto: bf16 ran {saved.get('bf16_speedup')}x fp32 on this CPU when "
                                             f"measured (kept in {path})")
    else:
        choice = _measure(path, key, hidden)
    _DECIDED[path, key] = choice
    return choice


def _measure(path: str, key: str, hidden: int) -> DtypeChoice:
    """Time bf16 against fp32 once, on one thread, and keep the decision in the cache file."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one answer whatever the caller's threads (the CLI's and Python's differ)
    try:
        speedup = round(float(cpu_bf16_speedup(hidden)), 2)
    finally:
        torch.set_num_threads(before)
    dtype = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "fp32"
    try:
        from pipelines import storage

        entries = _read_cache(path)
        entries[key] = {"dtype": dtype, "bf16_speedup": speedup}
        storage.write_text(path, json.dumps(entries, indent=2, sort_keys=True))
        where = f"kept in {path}"
    except OSError as e:
        where = f"kept for this process: {path} could not be written ({e})"
    return DtypeChoice(dtype, f"auto: bf16 ran {speedup}x fp32 on this CPU, measured once ({where})")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            body = json.load(f)
    except (OSError, ValueError):  # none yet, or not ours to trust: measure again
        return {}
    return body if isinstance(body, dict) else {}


def resolve_dtype(dtype: str, device: str, hidden: int = 384) -> str:
    """The precision a predictor runs in: `auto` is bf16 on a GPU that supports it, else fp16;
    on CPU `cpu_choice`'s."""
    import torch

    if dtype not in DTYPE_CHOICES:
        raise UserError(f"dtype must be auto or one of {DTYPES}, got {dtype!r}")
    on_gpu = torch.device(device).type == "cuda"
    if dtype == "fp16" and not on_gpu:
        raise UserError(FP16_NEEDS_GPU)
    if dtype != "auto":
        return dtype
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cpu_choice(hidden).dtype


def job_dtype(setting: str, device: str, record: Optional[dict], hidden: int) -> DtypeChoice:
    """The one precision every row of a job is scored in (see the module docstring): actors that
    resolved `auto` for themselves, started at once on shared cores, disagreed (an output held bf16
    and fp32 rows), and GPUs of two generations could too."""
    if setting == "fp16" and device != "cuda":
        raise UserError(FP16_NEEDS_GPU)
    if setting != "auto":
        return DtypeChoice(setting, "as set")
    if (record or {}).get("dtype_used"):
        return DtypeChoice(record["dtype_used"], "auto: the run record's choice (a resume keeps it)")
    if device == "cpu":
        return cpu_choice(hidden)
    return DtypeChoice("bf16", "auto: bf16 on any GPU (one precision per output)")
