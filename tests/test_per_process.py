"""PerProcess: one value per process, built once, rebuilt in a forked child."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpu_patching._per_process import PerProcess

needs_fork = pytest.mark.skipif(
    sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs the fork start method",
)


class _Made:
    """A value that remembers the process that built it."""

    def __init__(self) -> None:
        self.pid = os.getpid()


#: Module level: the fork hook keeps it alive, as the library's own instances.
_VALUE: PerProcess[_Made] = PerProcess(_Made)
_HELD: PerProcess[threading.Lock] = PerProcess(threading.Lock)


def test_the_value_is_built_at_the_first_get_and_then_kept() -> None:
    calls: list[int] = []

    def make() -> list[int]:
        calls.append(1)
        return calls

    value = PerProcess(make)
    assert calls == []
    assert value.get() is value.get() is calls
    assert calls == [1]


def test_threads_asking_at_once_share_one_value() -> None:
    built = threading.Barrier(8)
    values = PerProcess(lambda: object())

    def ask(_: int) -> object:
        built.wait()
        return values.get()

    with ThreadPoolExecutor(8) as pool:
        seen = set(map(id, pool.map(ask, range(8))))
    assert len(seen) == 1


def _child_report(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    made = _VALUE.get()
    # The parent held this lock when it forked: the child's must be free.
    acquired = _HELD.get().acquire(timeout=5)
    queue.put((made.pid, os.getpid(), acquired))


@needs_fork
def test_a_forked_child_builds_its_own_value_and_lock() -> None:
    parent = _VALUE.get()
    assert parent.pid == os.getpid()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with _HELD.get():
        child = context.Process(target=_child_report, args=(queue,))
        child.start()
        made_in, child_pid, acquired = queue.get(timeout=30)
        child.join(timeout=30)
    assert child.exitcode == 0
    assert made_in == child_pid != parent.pid
    assert acquired
    assert _VALUE.get() is parent  # the parent keeps its own
