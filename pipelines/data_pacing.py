"""A workaround for a busy loop in Ray Data 2.60's scheduler, for the datasets that feed training.

Contract: `pace_idle_data_scheduler()` registers `IdleSchedulerBackoff` in this process's
`DataContext.custom_execution_callback_classes`; the datasets built after it carry it to their
executor (for training, Ray Train's SplitCoordinator actor). It sleeps 50 ms in a scheduling step
when no task of the dataset is running, and does nothing otherwise.

Why: the streaming executor waits for task completions with `ray.wait(timeout=0.1)` but skips that
wait when no task is active, which is a training dataset's steady state (the pipeline runs ahead
until backpressure pauses it, then waits for the trainer to take rows). The scheduling loop then
spins: the SplitCoordinator took 80% of a core on a 2-core node (py-spy: budget arithmetic in
`_scheduling_loop_step`), cores the training worker computes on. 50 ms is far below what a
trainer takes to consume a block of packed rows, so noticing that 50 ms late costs nothing. It
uses Ray Data's callback hook (`ray.data._internal.execution.execution_callback`), so it is best
effort: on a Ray without the hook nothing is registered, and an executor it doesn't understand is
left alone.
"""

from __future__ import annotations

import time

try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # a Ray without the hook
    ExecutionCallback = None

IDLE_SLEEP_S = 0.05  # Ray waits up to 0.1 s per step when tasks run; a trainer takes a block in far longer


def executor_is_idle(executor) -> bool:
    """No operator of the executor's topology has a running task (False when that can't be told)."""
    try:
        return not any(op.num_active_tasks() for op in executor._topology)
    except Exception:
        return False


if ExecutionCallback is not None:
    class IdleSchedulerBackoff(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            if executor_is_idle(executor):
                time.sleep(IDLE_SLEEP_S)
else:  # pragma: no cover
    IdleSchedulerBackoff = None


def pace_idle_data_scheduler() -> bool:
    """Register the backoff in this process's DataContext (once). Returns whether it is registered."""
    import ray.data

    if IdleSchedulerBackoff is None:
        return False
    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    if IdleSchedulerBackoff not in classes:
        classes.append(IdleSchedulerBackoff)
    return True
