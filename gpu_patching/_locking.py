"""A sampler's lock, which the thread that built the sampler skips until a second thread arrives.

Concurrent calls on one sampler act in some serial order (one re-entrant
lock), while the common case, one thread calling ``get_patch_spec`` a million
times, pays no lock at all. After ``fork`` every lock is renewed in the child.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from threading import get_ident
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["OwnerLock", "locked"]

#: Whether the interpreter runs without its global lock (free-threaded
#: builds): the owner's lock-free calls rely on it to order attribute reads
#: and writes between threads, so there every call takes the lock.
NO_GIL = hasattr(sys, "_is_gil_enabled") and not sys._is_gil_enabled()

#: Every live lock, so that a forked child can renew them.
_LOCKS: weakref.WeakSet[OwnerLock] = weakref.WeakSet()


class OwnerLock:
    """A re-entrant lock that its owner thread may skip while it is the only user.

    Attributes
    ----------
    owner : int or None
        The thread that may call without the lock (the one that built the
        lock), or None once another thread has used it.
    busy : bool
        Set by the owner for the duration of a lock-free call.
    """

    def __init__(self) -> None:
        self.renew()
        _LOCKS.add(self)

    def renew(self) -> None:
        """Unlock, owned by the calling thread (after ``fork``: the child's one thread)."""
        self.lock = threading.RLock()
        self.owner: int | None = None if NO_GIL else get_ident()
        self.busy = False

    @contextmanager
    def exclusive(self, ident: int | None = None) -> Iterator[None]:
        """Hold the lock; from another thread than the owner, end the lock-free mode.

        The owner announces a lock-free call (``busy``) before it checks
        ``owner``, and another thread clears ``owner`` before it checks
        ``busy``, so one of the two always sees the other (the interpreter's
        lock orders the reads and writes of attributes). From then on every
        call takes the lock.

        Parameters
        ----------
        ident : int, optional
            The calling thread's ``threading.get_ident()``, if known.

        Yields
        ------
        None
            With the lock held.
        """
        if ident is None:
            ident = get_ident()
        if self.owner is not None and self.owner != ident:
            self.owner = None
            while self.busy:
                time.sleep(0)
        with self.lock:
            yield


_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def locked(
    method: Callable[Concatenate[Any, _Params], _Result],
) -> Callable[Concatenate[Any, _Params], _Result]:
    """Run a method under its object's :class:`OwnerLock` (the attribute ``_guard``).

    Concurrent calls of such methods on one object act in some serial order.

    Parameters
    ----------
    method : callable
        A method of a class whose instances hold an :class:`OwnerLock` as ``_guard``.

    Returns
    -------
    callable
        The method, holding the lock while it runs.
    """

    @functools.wraps(method)
    def run_locked(self: Any, *args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with self._guard.exclusive():
            return method(self, *args, **kwargs)

    return run_locked


def _renew_locks() -> None:
    # A thread of the parent may have held a lock (or been inside a lock-free
    # call) when the process forked; that thread does not exist in the child,
    # so the copies would stay locked (or busy) forever.
    for guard in list(_LOCKS):
        guard.renew()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks)
