"""One value per process, made on first use: a forked child makes its own.

Threads, event loops and locks do not survive a fork intact (a thread is not
copied; a lock may be copied held), so each process builds its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerProcess"]

T = TypeVar("T")


class PerProcess(Generic[T]):
    """A value built by ``make()`` at the first :meth:`get` of each process.

    Parameters
    ----------
    make : callable
        Builds the value; called at most once per process, under a lock, so
        threads that ask at once share one value.

    Notes
    -----
    After a fork the child forgets its parent's value (and lock) and builds
    its own at its first :meth:`get`. The fork hook keeps the instance alive:
    make these at module level only.
    """

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._value: T | None = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def get(self) -> T:
        """Return this process's value, building it on first use."""
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._value = None
