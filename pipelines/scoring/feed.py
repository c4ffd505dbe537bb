"""Scoring with the tokenizing apart: CPU actors (`TokenizingActor`) read and tokenize units, and
the predictor actors (`ScoringActor`; on GPUs, one GPU each) score them and write their files.

Why: a GPU actor must not spend its host thread tokenizing, and one GPU consumes text faster than
several cores tokenize it, so the tokenizing runs on every CPU the GPU actors leave, wherever it is
in the cluster. Ray Data's program for this (read -> repartition -> tokenize tasks -> GPU actor ->
write tasks) fed 8.9-16% of the bare tokenizer per core on 2 cores; the same units as CPU scoring
(pipelines/scoring/units.py), with the tokenizing moved to actors of its own, is measured in
BENCHMARKS.md (issue 21).

Contract:
- `PredictorPool`: the predictor actors of a plan. A fixed pool starts all of them; an autoscaling
  one (`CpuPlan.min_actors`: device cuda) starts `min_actors`, and once one has started asks for
  the rest (up to `num_actors`, at most one per `UNITS_PER_ACTOR` units). Actors not yet placed
  hold their `GPU: 1` demand, which is what an autoscaler turns into GPU nodes. If none starts
  within `CpuPlan.gpu_wait_s` (or ACTOR_START_TIMEOUT_S), the run stops with GpuWaitTimeout (GPU
  plans) or ActorsLost, before any row is read.
- Tokenizing actors: `tokenizer_actors` of them (`default_tokenizers`: one per free CPU the GPU
  actors leave when the job starts), each holding 1 CPU and one `tokenizers` thread, without torch.
  They start with the predictors, before the input is staged. (CPUs that GPU nodes bring later are
  not used for tokenizing.)
- `run_fed_units`: each unit is tokenized on the started tokenizing actor with the fewest units
  in flight (at most IN_FLIGHT_PER_ACTOR; it keeps the row group it read, as in `UnitQueue`), and
  the table goes by reference to the started predictor actor with the fewest in flight, which
  scores it once it arrives: the driver never holds rows. A predictor has up to
  `ceil(tokenizers / predictors) + 1` units in flight, so every tokenizer can work for it.
- Failures as in `run_units`: a unit that can't be read (`NotRead`, raised by the tokenizing actor)
  fails the predictor task that needed its table, and stops the run naming the rows; actors that
  die are restarted and their units retried; the committed units stay for the rerun.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from pipelines.resources import CpuPlan, gpu_wait_message
from pipelines.scoring.config import GpuWaitTimeout
from pipelines.scoring.unit_plan import Unit, UnitSpec
from pipelines.scoring.units import (ACTOR_START_TIMEOUT_S, IN_FLIGHT_PER_ACTOR, ScoringActor, UnitQueue,
                                   collect, not_started, started_actor, start_actors, wait_for_an_actor)

UNITS_PER_ACTOR = 4  # an autoscaling pool asks for no more actors than the units keep busy


class TokenizingActor(ScoringActor):
    """A CPU actor that reads and tokenizes units for the predictor actors (`tokenize`); no torch."""


def default_tokenizers(plan: CpuPlan, free_cpus: float, free_gpus: int) -> int:
    """Tokenizing actors for `plan`, from the cluster's free resources before any actor starts: GPU
    plans get one per free CPU the GPU actors that the free GPUs can place leave (at least one;
    only what is free, so no tokenizer waits, asking an autoscaler for a node); CPU plans none
    (each actor tokenizes its own units)."""
    if plan.device != "cuda":
        return 0
    placed_now = min(plan.num_actors, free_gpus)
    return max(1, int(free_cpus - placed_now * plan.actor_num_cpus))


@dataclass
class PredictorPool:
    plan: CpuPlan
    max_restarts: int
    max_task_retries: int
    actors: list = field(default_factory=list)

    def start(self) -> None:
        p = self.plan
        self._start(p.min_actors or p.num_actors)

    def grow(self, units: int) -> None:
        """An autoscaling pool asks for its other actors (see the module docstring)."""
        p = self.plan
        if p.min_actors is not None:
            self._start(min(p.num_actors, max(1, math.ceil(units / UNITS_PER_ACTOR))) - len(self.actors))

    def _start(self, n: int) -> None:
        p = self.plan
        start_actors(self.actors, max(0, n), p.actor_num_cpus, p.torch_threads, self.max_restarts,
                     self.max_task_retries, num_gpus=p.actor_num_gpus)

    def lost(self) -> Exception:
        """What stops a run none of whose predictors started in time: GpuWaitTimeout for a pool
        that asked for GPUs before any joined (an autoscaler's wait), else ActorsLost (the
        cluster's GPUs or CPUs held by other work)."""
        import ray

        if self.plan.actor_num_gpus and self.plan.gpu_wait_s is not None:
            return GpuWaitTimeout(gpu_wait_message(self.plan, int(ray.cluster_resources().get("GPU", 0))))
        if self.plan.actor_num_gpus:
            return not_started("predictor", self.wait_s, "GPU", "--num-actors")
        return not_started("predictor", self.wait_s)

    @property
    def wait_s(self) -> float:
        return self.plan.gpu_wait_s or ACTOR_START_TIMEOUT_S


def _no_tokenizer() -> Exception:
    return not_started("tokenizing", ACTOR_START_TIMEOUT_S, settings="resources.tokenizer_actors")


def start_tokenizers(into: list, n: int, max_restarts: int, max_task_retries: int) -> None:
    start_actors(into, n, 1.0, 1, max_restarts, max_task_retries, cls=TokenizingActor, load_torch=False)


class _Loads:
    """Units in flight per started actor of one kind."""

    def __init__(self):
        self.n: dict[int, int] = {}

    def least(self):
        return min(self.n, key=self.n.get, default=None)


def run_fed_units(pool: PredictorPool, tokenizers: list, units: list[Unit], spec: UnitSpec,
                  on_done: Callable[[int, int, int], None]) -> float:
    """Score `units`: tokenized on `tokenizers`, scored on `pool`'s actors (see the module
    docstring); `on_done(rows, errors, tokens)` as each unit commits. Returns when
    (`time.perf_counter()`) the first predictor was ready."""
    import ray

    queue = UnitQueue(units)
    if not queue:
        return time.perf_counter()
    scorers = {a.ready.remote(): i for i, a in enumerate(pool.actors)}
    first = wait_for_an_actor(list(scorers), pool.wait_s, pool.lost)
    ready_at = time.perf_counter()
    asked = len(pool.actors)
    pool.grow(len(units))
    scorers.update({pool.actors[i].ready.remote(): i for i in range(asked, len(pool.actors))})
    readers = {t.ready.remote(): j for j, t in enumerate(tokenizers)}
    spec_ref = ray.put(spec)  # sent to each actor once, not with every unit
    busy_s, busy_t, tokenizing, scoring = _Loads(), _Loads(), {}, {}

    def fill() -> None:
        while queue and busy_s.n and busy_t.n:
            i, j = busy_s.least(), busy_t.least()
            depth = math.ceil(len(busy_t.n) / len(busy_s.n)) + 1
            if busy_s.n[i] >= depth or busy_t.n[j] >= IN_FLIGHT_PER_ACTOR:
                return
            unit = queue.take(j)
            table = tokenizers[j].tokenize.remote(unit, spec_ref)
            tokenizing[table] = j
            scoring[pool.actors[i].score.remote(unit, spec_ref, table)] = (i, unit, table)
            busy_s.n[i] += 1
            busy_t.n[j] += 1

    for ref in first:
        busy_s.n[started_actor(scorers.pop(ref), ref)] = 0
    for ref in wait_for_an_actor(list(readers), lost=_no_tokenizer):
        busy_t.n[started_actor(readers.pop(ref), ref, "tokenizing")] = 0
    fill()
    while scoring:
        # fetch_local=False: a tokenized table goes from its tokenizer to its predictor, never here.
        [ref], _ = ray.wait(list(tokenizing) + list(scoring) + list(scorers) + list(readers), num_returns=1,
                            fetch_local=False)
        if ref in tokenizing:
            busy_t.n[tokenizing.pop(ref)] -= 1
        elif ref in scorers:
            busy_s.n[started_actor(scorers.pop(ref), ref)] = 0
        elif ref in readers:
            busy_t.n[started_actor(readers.pop(ref), ref, "tokenizing")] = 0
        else:
            i, unit, table = scoring.pop(ref)
            busy_s.n[i] -= 1
            if table in tokenizing:  # scored before its table's own completion was seen here
                busy_t.n[tokenizing.pop(table)] -= 1
            collect(ref, unit, on_done)
        fill()
    if queue:  # cannot happen: every unit left is submitted while any actor has room
        raise RuntimeError("run_fed_units stopped with units left unscored")
    return ready_at
