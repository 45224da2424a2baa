"""Worker plugins the build registers on its Dask cluster, whichever way the workers started
(the runner's LocalCluster, ``dask worker`` on other machines, the Kubernetes operator).

:class:`NoTaskProfiler`: on Python 3.11, Dask's task profiler can deadlock a worker. Every
``distributed.worker.profile.interval`` the worker's event loop calls ``sys._current_frames()``,
which holds CPython's runtime lock while it makes a frame object per thread; making one may
run the garbage collector, whose callbacks (Dask installs one) run Python code and hand the GIL
to another thread. If that thread then frees a ``threading.local`` (stackstac keeps one per
opened file, and a shard task opens hundreds on its read threads), it waits for the runtime
lock while holding the GIL, and the event loop waits for the GIL: every thread of the worker
stops (python/cpython#116969, dask/distributed#8616; CPython 3.12 no longer collects inside
that allocation). Seen here as a build at 100 ms latency that stopped dead for minutes, its
read threads all waiting for the GIL, held by a thread in ``threading.local``'s dealloc (gdb).
Dask itself leaves its event-loop profiler off on 3.11 for the same reason, but not the task
profiler. The plugin stops the task profiler on 3.11 (the dashboard's Profile page stays empty
there); other versions keep it.
"""

from __future__ import annotations

import sys
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

#: the worker's periodic callbacks that call ``sys._current_frames()``
PROFILER_CALLBACKS = ("profile", "profile-cycle")


def profiler_can_deadlock(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether Dask's task profiler can deadlock a worker on this Python (3.11: see the
    module docstring)."""
    return tuple(version[:2]) == (3, 11)


class NoTaskProfiler(WorkerPlugin):
    """Stops the worker's task profiler where :func:`profiler_can_deadlock` (set-up runs on
    the worker's event loop, where the profiler runs, before the build's tasks)."""

    name = "ssl4eo-no-task-profiler"

    def setup(self, worker: Any) -> None:
        if not profiler_can_deadlock():
            return
        for key in PROFILER_CALLBACKS:
            callback = worker.periodic_callbacks.pop(key, None)
            if callback is not None:
                callback.stop()
