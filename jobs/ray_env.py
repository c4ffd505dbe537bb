"""Connecting a job to Ray: the embedded default versus a cluster.

Contract: `ray_session(address)` yields with Ray initialized. With no `address` and no
`RAY_ADDRESS` in the environment it starts a local Ray (the embedded default) and shuts it down on
exit, even on error; given an address (or RAY_ADDRESS, as under `ray job submit`), it connects and
leaves the cluster running. A Ray that is already initialized in this process is reused as is.
Either way, the libraries' console output is first set to the run's verbosity (pipelines/console.py),
and below `--verbose` the forwarded lines of Ray's own processes that are not errors of the job are
dropped (`compat.drop_forwarded_lines`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

import ray


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None,
                object_store_memory: Optional[int] = None) -> Iterator[None]:
    from pipelines.console import quiet_libraries

    # Before Ray starts: the embedded Ray's processes inherit its environment.
    with quiet_libraries():
        yield from _session(address, num_cpus, object_store_memory)


def _session(address: Optional[str], num_cpus: Optional[int], object_store_memory: Optional[int]):
    from pipelines.console import ray_init_kwargs

    if ray.is_initialized():
        yield
        return
    if not sys.stderr.isatty():  # a log file: Ray's colour codes around forwarded lines' prefixes are noise there
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **ray_init_kwargs())
    else:
        # Embedded default: a private local Ray. Token auth is off because the cluster lives and
        # dies with this process and listens on loopback only.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # address="local": always a new private cluster. A bare ray.init() would join any cluster
        # that `ray start` recorded on this machine (/tmp/ray/ray_current_cluster).
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False, **ray_init_kwargs())
    from pipelines.compat import drop_forwarded_lines
    from pipelines.console import VERBOSE, verbosity

    if verbosity() != VERBOSE:
        drop_forwarded_lines()  # Ray's own warnings that aren't errors of this job
    try:
        yield
    finally:
        ray.shutdown()
