"""The host crop's rows split over a small shared thread pool, where that pays.

:func:`copy_threads` decides how many threads copy a batch (the rule and the
measurements behind it are beside its constants); :func:`run_split` runs
contiguous runs of rows on them. NumPy releases the GIL while it copies, so
large patches copy on several cores at once. ``docs/design.md``, section 7.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import _validation as check
from ._per_process import PerProcess

__all__ = [
    "MAX_THREADS",
    "MIN_BATCH_BYTES",
    "MIN_ROW_BYTES",
    "THREAD_LIMIT",
    "check_threads",
    "copy_threads",
    "in_dataloader_worker",
    "run_split",
    "usable_cores",
]

#: Threads at most when ``threads`` is automatic: beyond a few, the copies
#: share one memory bus and more threads only contend for the GIL.
MAX_THREADS = 4

#: Threads at most for any given count: a pool thread lives as long as the
#: process, and a count per row (``threads=2**62``) started thousands until the
#: OS refused one, while the runs already queued went on writing.
THREAD_LIMIT = 64

# The automatic rule: split only batches whose rows (C * prod(patch_size)
# elements) are at least MIN_ROW_BYTES and whose output is at least
# MIN_BATCH_BYTES. Measured with benchmarks/crop_threads.py (2-core EPYC VM,
# float32 into a reused buffer, 1 thread against 2, serial/threaded time):
# rows of 8 KiB lose at every batch (x0.47 at 64 rows .. x0.99 at 4096), 16
# and 32 KiB win only from 32 MiB batches (x1.10-x1.17) and lose below them
# (x0.46-x0.94); 64 KiB rows lose at 64 rows, 4 MiB (x0.84), and win from
# 256 rows, 16 MiB (x1.26-x1.46); 128-512 KiB rows win from 64 rows, 8 MiB
# (x1.11-x1.80). Small copies lose because the threads take turns at the GIL
# between them and the hand-off to the pool costs about 0.1 ms.
MIN_ROW_BYTES = 64 << 10
MIN_BATCH_BYTES = 8 << 20


def check_threads(threads: Any) -> int | None:
    """Return ``threads`` checked: ``None`` (automatic) or a positive ``int``.

    Raises
    ------
    TypeError
        If ``threads`` is neither ``None`` nor an integer.
    ValueError
        If it is below 1.
    """
    if threads is None:
        return None
    count = check.as_int(threads, "threads")
    if count < 1:
        raise ValueError(f"threads must be at least 1 (or None for automatic), got {count}")
    return count


def usable_cores() -> int:
    """Return the cores this process may run on (its affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def in_dataloader_worker() -> bool:
    """Whether this process is a PyTorch DataLoader worker (without importing PyTorch).

    A worker was started by a process that imported ``torch.utils.data``, so
    the module is already loaded wherever the answer can be yes.
    """
    data = sys.modules.get("torch.utils.data")
    get_worker_info = getattr(data, "get_worker_info", None)
    return get_worker_info is not None and get_worker_info() is not None


def copy_threads(threads: int | None, n_rows: int, row_bytes: int) -> int:
    """Return how many threads copy ``n_rows`` rows of ``row_bytes`` bytes each.

    Parameters
    ----------
    threads : int or None
        Checked by :func:`check_threads`. An int is taken as given (at most
        one thread per row and :data:`THREAD_LIMIT` in all). ``None``: one
        thread inside a DataLoader worker (the workers already use the cores)
        and for batches below the rule's sizes (:data:`MIN_ROW_BYTES`,
        :data:`MIN_BATCH_BYTES`), else one per usable core, at most
        :data:`MAX_THREADS`.
    n_rows, row_bytes : int
        The batch.

    Returns
    -------
    int
        At least 1 (the calling thread), at most ``max(n_rows, 1)`` and
        :data:`THREAD_LIMIT`.
    """
    if threads is not None:
        return max(1, min(threads, n_rows, THREAD_LIMIT))
    if row_bytes < MIN_ROW_BYTES or n_rows * row_bytes < MIN_BATCH_BYTES:
        return 1
    if in_dataloader_worker():
        return 1
    return max(1, min(usable_cores(), MAX_THREADS, n_rows))


#: ``running`` is set on a pool thread while it runs a task.
_TASK = threading.local()


class _Pool:
    """Named daemon threads that run submitted calls; grown on demand, never shrunk."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple[Future[None], Callable[[], None]]] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def grow(self, helpers: int) -> int:
        """Start threads until there are ``helpers``; return how many there are.

        Fewer when the operating system refuses a thread (``RuntimeError``):
        the split then uses the threads it has, down to none.
        """
        with self._lock:
            while len(self._threads) < helpers:
                thread = threading.Thread(
                    target=self._work,
                    name=f"gpu_patching_copy_{len(self._threads)}",
                    daemon=True,
                )
                try:
                    thread.start()
                except RuntimeError:  # "can't start new thread": a limit was reached
                    break
                self._threads.append(thread)
            return len(self._threads)

    def submit(self, call: Callable[[], None]) -> Future[None]:
        """Queue ``call`` for the pool's threads (see :meth:`grow`); return its future."""
        future: Future[None] = Future()
        self._tasks.put((future, call))
        return future

    def _work(self) -> None:
        while True:
            future, call = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            _TASK.running = True
            try:
                call()
            except BaseException as error:  # handed to the caller, who re-raises it
                future.set_exception(error)
            else:
                future.set_result(None)
            finally:
                _TASK.running = False


#: The process's pool, made on first use; a forked child makes its own.
_SHARED: PerProcess[_Pool] = PerProcess(_Pool)


def run_split(copy_run: Callable[[int, int], None], n_rows: int, n_threads: int) -> None:
    """Run ``copy_run(start, stop)`` over ``n_threads`` contiguous runs of ``range(n_rows)``.

    The calling thread takes the first run, the pool the others. Every run
    has finished when this returns, also when one raised: then the first
    exception (in row order) is raised here.

    Parameters
    ----------
    copy_run : callable
        Copies rows ``start .. stop - 1``; runs must be independent.
    n_rows : int
        Rows in all.
    n_threads : int
        Runs, at least 1 (1: the calling thread does all, no pool; so does
        a pool thread, whose nested split could wait on itself).
    """
    # On a pool thread, a split would wait for tasks queued behind the ones
    # that wait, so a run asked for from inside a task is copied in place.
    if n_threads <= 1 or n_rows <= 1 or getattr(_TASK, "running", False):
        copy_run(0, n_rows)
        return
    pool = _SHARED.get()
    # Every thread is started before any run is queued, so a refused thread
    # leaves nothing behind: the split just uses the threads there are.
    n_threads = min(n_threads, pool.grow(n_threads - 1) + 1)
    if n_threads <= 1:
        copy_run(0, n_rows)
        return
    bounds = [n_rows * k // n_threads for k in range(n_threads + 1)]
    futures = [
        pool.submit(functools.partial(copy_run, bounds[k], bounds[k + 1]))
        for k in range(1, n_threads)
    ]
    own_error: BaseException | None = None
    try:
        copy_run(bounds[0], bounds[1])
    except BaseException as error:  # wait for the other runs first: none may still write
        own_error = error
    errors = [future.exception() for future in futures]
    first = next((e for e in [own_error, *errors] if e is not None), None)
    if first is not None:
        raise first
