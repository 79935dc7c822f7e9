"""Where the snapshot consumer builds and writes its Parquet files: a child process, or a thread.

A flush builds Arrow columns from the buffered events, groups them by user and writes zstd
Parquet: ~80 ms of CPU per 46,000 events. On a thread of the worker's, that work took the GIL in
many short turns; beside a busy thread that thread lost ~60 ms a flush, and at half load, where
the event loop was ~90% busy, the latency of `recur bench e2e` rose to 103 - 384 ms at each flush
(every 50,000 events or a minute). A child process has a GIL of its own: the worker only pickles
the buffer for it (11 - 17 ms per 46,000 events). The child runs at a lower priority (the worker
and the broker come first), ignores the terminal's signals (the worker stops it after its last
flush) and, on Linux, dies with the worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)

NICE = 10  # the child's priority below the worker's
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _child_start(worker: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # worker's last flush still needs this child
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # gone with the worker
    except (OSError, AttributeError):  # not Linux: it exits at its next read of the worker's pipe
        pass
    if os.getppid() != worker:  # the worker died before the line above
        os._exit(0)
    try:
        os.nice(NICE)
    except OSError:
        pass


class SnapshotWriter:
    """Runs the snapshot files' functions in one child process ("process") or in a thread of
    the worker's ("thread"). One call at a time (the snapshot consumer's flush lock)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._pool: ProcessPoolExecutor | None = None

    def pid(self) -> int | None:
        """The child's pid once it runs (None with "thread", or before the first write)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` off the event loop. A child that died raises BrokenProcessPool once; the
        next call starts a new one."""
        if self.kind == "thread":
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        if self._pool is None:
            # spawned, not forked: a fork would copy the worker's threads' locks mid-use
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_child_start, initargs=(os.getpid(),))
        try:
            return await asyncio.wrap_future(self._pool.submit(fn, *args))
        except BrokenProcessPool:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False)
            log.error("snapshot: the writer process died; a new one takes the next write")
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
