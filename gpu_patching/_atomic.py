"""Files that appear whole or not at all, even when the process is interrupted.

:func:`write_atomically` writes to a temporary file beside the destination
and renames it over the destination once complete; while it runs, SIGINT and
SIGTERM raise :class:`Interrupted` (a ``KeyboardInterrupt``), so an error or
a signal leaves the old file (or none) and no temporary file. The signal
rules and their limits: ``docs/design.md``, "Files written whole".
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

__all__ = ["Interrupted", "interruptible", "write_atomically"]

#: The signals a write turns into :class:`Interrupted`.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while :func:`interruptible` was in force.

    Parameters
    ----------
    signum : int
        The signal's number (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _SignalState:
    """The handlers in force, how deep the sections nest, a signal held back."""

    def __init__(self) -> None:
        self.depth = 0
        self.deferring = 0
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            # Raised when the section that creates or removes the temporary
            # file ends (see _Deferred.__exit__).
            self.pending = signum
            return
        raise Interrupted(signum)


_state = _SignalState()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _MainThreadSection:
    """A ``with`` block that acts in the main thread only, where Python runs handlers.

    Subclasses say what the block does on entry (:meth:`_begin`) and exit
    (:meth:`_end`); in any other thread the block does nothing.
    """

    def __enter__(self) -> Any:
        self.active = _in_main_thread()
        if self.active:
            self._begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.active:
            self._end(exc_type)

    def _begin(self) -> None:
        raise NotImplementedError

    def _end(self, exc_type: type[BaseException] | None) -> None:
        raise NotImplementedError


class interruptible(_MainThreadSection):  # noqa: N801 - used like a function: with interruptible()
    """Turn SIGINT and SIGTERM into :class:`Interrupted` inside a ``with`` block.

    Sections nest; the outermost one installs the handlers and restores the
    previous ones. Signals whose disposition is not the default (ignored, or
    a handler of the program's own) are left alone, and outside the main
    thread the block does nothing (Python delivers signals to the main thread).
    """

    def _begin(self) -> None:
        if _state.depth == 0:
            for signum in SIGNALS:
                current = signal.getsignal(signum)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    _state.previous[signum] = current
                    signal.signal(signum, _state.handle)
        _state.depth += 1

    def _end(self, exc_type: type[BaseException] | None) -> None:
        _state.depth -= 1
        if _state.depth == 0:
            for signum, previous in _state.previous.items():
                signal.signal(signum, previous)
            _state.previous.clear()
            _state.pending = None


class _Deferred(_MainThreadSection):
    """Hold SIGINT and SIGTERM back until the block ends, then raise.

    When the block ends by an exception already, that exception goes on and
    the held signal is dropped: the process is on its way out either way.
    Outside the main thread it does nothing: handlers run in the main thread,
    and a signal held back for another thread would be raised in that thread.
    """

    def _begin(self) -> None:
        _state.deferring += 1

    def _end(self, exc_type: type[BaseException] | None) -> None:
        _state.deferring -= 1
        if _state.deferring == 0 and _state.pending is not None and exc_type is None:
            signum, _state.pending = _state.pending, None
            raise Interrupted(signum)


def _file_mode() -> int:
    """Return the mode a plain ``open()`` gives a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write a file through a temporary file in its folder, then rename it over ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; its folder is created when missing.
    write : callable
        Called once with a binary stream open for writing; writes the content.

    Raises
    ------
    Interrupted
        If SIGINT or SIGTERM arrived during the write (main thread only). The
        existing file, if any, is untouched and the temporary file is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interruptible():
        temporary: str | None = None
        try:
            with _Deferred():
                # Creating the file and noting its name (and opening it) are
                # one step as far as signals go: a signal in between would
                # leave a file that nothing removes.
                handle, temporary = tempfile.mkstemp(
                    dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
                )
                stream = os.fdopen(handle, "wb")
            with stream:
                write(stream)
            # mkstemp makes the file private (0600); give it the mode a plain
            # open() would.
            os.chmod(temporary, _file_mode())
            os.replace(temporary, path)
            temporary = None
        except BaseException:
            with _Deferred():
                if temporary is not None:
                    Path(temporary).unlink(missing_ok=True)
            raise
