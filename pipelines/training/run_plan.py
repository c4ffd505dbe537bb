"""A training run's plan: its LR schedule, the time budget that can move its end, and when an
invocation stops (torch-free).

Contract:
- `LRSchedule` is the multiplier `torch.optim.lr_scheduler.LambdaLR` calls with the number of
  optimizer steps taken: linear warmup over `warmup` steps, then linear, cosine or constant decay
  to `min_ratio` at step `end`. Decay is a function of progress p in [0, 1]. `replan(step, end)`
  moves the end while keeping p (so the LR) at `step`: from there p runs linearly to 1 at the new
  end. The LR is continuous across any number of re-plans, and `state()` / `load()` carry the plan
  through a checkpoint. With no re-plan it is `lr_factor` with `total = end`.
- `TimeBudget` is `train.total_time_budget_s`: training time shared by every invocation of a run.
  At each check it estimates the steps left from the measured seconds per step, and the schedule
  is re-planned to end there, so the LR reaches its floor when the budget runs out rather than
  being cut mid-schedule. Time counted: each invocation's training loop, from the model being ready
  to the state of its last checkpoint (Ray and worker start-up are not counted; the final
  validation pass and checkpoint write are reserved from the plan, as long as the last timed
  ones; time trained before a budget was set is not counted). Its state (time used, seconds per
  step, the last checkpoint write) travels in the checkpoint, so a resumed invocation plans from
  the rate the previous one measured, not from its own slow first step. A stall the plan can't
  foresee may carry a run up to `OVERRUN` x the budget before it stops (`out_of_budget`). The
  warmup must fit well inside the budget: the decay starts only after it.
- `StopPolicy` is when one invocation ends: a step limit, its time budget or deadline, or the end
  its budgeted schedule has moved to.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from pipelines.training.config import TrainConfig

DECAYS = ("linear", "cosine", "constant")
# A budgeted run ends where its plan does, which is re-aimed at the budget at every check; only a
# stall the plan couldn't foresee (an epoch's data pipeline restarting late in the run) can carry
# it past. It may then run this far over the budget to end with its LR at the floor, rather than
# be cut mid-schedule; past it, it stops.
OVERRUN = 1.05


def out_of_budget(used_s: float, total_s: float) -> bool:
    """Whether `used_s` of training has spent a budget of `total_s` (`OVERRUN` allowed): the loop
    stops on it, and a scheduled invocation finds its run complete by it (run_dir.budget_spent)."""
    return used_s >= OVERRUN * total_s


def decay_factor(decay: str, progress: float, min_ratio: float) -> float:
    """The multiplier after warmup at `progress` in [0, 1] of the decay."""
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return decay_factor(decay, min(1.0, (step - warmup) / max(1, total - warmup)), min_ratio)


class LRSchedule:
    """A LambdaLR multiplier whose end can move (`replan`) without a jump in the LR.

    A callable object, not a function, so LambdaLR's state_dict (in DeepSpeed's checkpoint) keeps
    its attributes too; the pretraining loop still builds a fresh one from the config on resume
    (pipelines.training.engine.fresh_lr_schedule) and loads only a budgeted run's plan onto it
    (the checkpoint's state file, pipelines.training.run_dir), so a changed max_steps or warmup
    reaches a run as it always has.
    """

    def __init__(self, warmup: int, end: int, decay: str, min_ratio: float):
        self.warmup, self.decay, self.min_ratio = warmup, decay, min_ratio
        self.end = max(end, warmup + 1)  # the step at which the LR reaches warmup's peak x min_ratio
        self.anchor_step, self.anchor_progress = warmup, 0.0  # progress is anchored here since the last re-plan

    def progress(self, step: int) -> float:
        if step <= self.anchor_step:
            return self.anchor_progress
        return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * (step - self.anchor_step)
                   / max(1, self.end - self.anchor_step))

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        return decay_factor(self.decay, self.progress(step), self.min_ratio)

    def replan(self, step: int, end: int) -> None:
        """End the decay at `end` instead, keeping the LR at `step` (the steps taken) as it is. A
        schedule that has ended stays ended (its run is complete)."""
        if step >= self.end:
            return
        if step > self.anchor_step:
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.end = max(end, self.anchor_step + 1)

    def state(self) -> dict:
        return {"end": self.end, "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress}

    def load(self, state: dict) -> None:
        self.end, self.anchor_step = int(state["end"]), int(state["anchor_step"])
        self.anchor_progress = float(state["anchor_progress"])


@dataclass
class TimeBudget:
    """A run's total training time and what its invocations have used of it (see the module doc)."""

    total_s: float
    used_before_s: float = 0.0  # training seconds of the invocations before this one
    step_s: Optional[float] = None  # mean seconds per step, this invocation's or carried from the last
    save_s: Optional[float] = None  # slowest checkpoint write timed so far (reserved for the last one)
    eval_s: Optional[float] = None  # the last validation pass (reserved for the one at the end)
    t_start: float = 0.0  # when this invocation's loop began (its clock)
    first_step: int = 0  # the step this invocation resumed at
    t_first: Optional[float] = None  # when this invocation's first step ended: its rate is timed from there

    @classmethod
    def resume(cls, total_s: float, saved: Optional[dict], step: int, now: float) -> "TimeBudget":
        saved = saved or {}
        return cls(total_s=total_s, used_before_s=float(saved.get("used_s", 0.0)), step_s=saved.get("step_s"),
                   save_s=saved.get("save_s"), eval_s=saved.get("eval_s"), t_start=now, first_step=step)

    def used(self, now: float) -> float:
        return self.used_before_s + (now - self.t_start)

    def observe(self, step: int, now: float) -> float:
        """Seconds per step, timed from the end of this invocation's first step once a step has
        followed it (the first carries the start-up: the data pipeline's first blocks, kernels),
        until then the previous invocation's rate; 0.0 while there is no figure (a fresh run's
        first step)."""
        if self.t_first is None:
            self.t_first = now
        elif step > self.first_step + 1:
            self.step_s = (now - self.t_first) / (step - self.first_step - 1)
        return self.step_s or 0.0

    @staticmethod
    def planned_end(total_s: float, step: int, used_s: float, step_s: float, reserve_s: float) -> int:
        """The step at which `total_s` runs out, from `used_s` so far, `step_s` per step and
        `reserve_s` kept for the last checkpoint's write (the ranks' agreed figures)."""
        left = total_s - used_s - reserve_s
        return step + max(0, int(left / max(step_s, 1e-9)))

    def state(self, now: float) -> dict:
        return {"total_s": self.total_s, "used_s": self.used(now), "step_s": self.step_s, "save_s": self.save_s,
                "eval_s": self.eval_s}

    @property
    def reserve_s(self) -> float:
        """Time kept back from the plan for what follows the last step: a validation pass and the
        checkpoint write, as long as the last ones took (0 until one is timed)."""
        return (self.save_s or 0.0) + (self.eval_s or 0.0)


@dataclass
class StopPolicy:
    """When this invocation ends: at `end` (max_steps, stop_at, steps_per_run past the resume
    step, or where a budgeted run's LR schedule now ends), or when out of time (time_budget_s
    since the loop began, or too close to `deadline` to train until the next check and still
    write two checkpoints)."""

    end: int
    limit: Optional[int] = None  # the invocation's own end (`end` before any budget moved it)
    time_budget_s: Optional[float] = None
    deadline: Optional[float] = None
    budget: Optional[TimeBudget] = None  # the run's total_time_budget_s: it moves `end` (`_follow_budget`)
    t_start: float = field(default_factory=time.time)
    step_s: float = 0.0  # slowest seconds per step seen so far
    save_s: float = 10.0  # slowest checkpoint write so far (a first guess until one is timed)

    @classmethod
    def for_invocation(cls, tc: TrainConfig, start_step: int, saved_budget: Optional[dict] = None) -> "StopPolicy":
        """This invocation's policy; `saved_budget` is the checkpoint's budget state, if any."""
        end = min(tc.max_steps, tc.stop_at) if tc.stop_at is not None else tc.max_steps
        if tc.steps_per_run is not None:
            end = min(end, start_step + tc.steps_per_run)
        policy = cls(end=end, limit=end, time_budget_s=tc.time_budget_s, deadline=tc.deadline)
        if tc.total_time_budget_s is not None:
            policy.budget = TimeBudget.resume(tc.total_time_budget_s, saved_budget, start_step, policy.t_start)
        return policy

    @property
    def timed(self) -> bool:
        return self.time_budget_s is not None or self.deadline is not None or self.budget is not None

    def reached(self, step: int) -> bool:
        return step >= self.end

    def late(self, now: float, steps_to_next_check: int) -> bool:
        """This rank's view; the loop all-reduces it so every rank stops at the same step."""
        if self.time_budget_s is not None and now - self.t_start > self.time_budget_s:
            return True
        margin = steps_to_next_check * self.step_s + 2 * self.save_s
        return self.deadline is not None and now + margin > self.deadline
