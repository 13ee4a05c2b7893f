"""The event loop every store read of this process runs on.

Chunk reads are coroutines of zarr's public asynchronous API; so are the
metadata reads and selections of :class:`~gpu_patching.stores.ChunkedStack`.
They all run here, on one asyncio loop of our own on a daemon thread, because
an fsspec file system of a remote store (s3fs, gcsfs, HTTP) binds its
connections to the loop of its first request: a store opened and read on this
one loop works from any thread (``docs/design.md``, "Chunked stores").
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["DECODE_THREADS", "run"]

#: Threads that decode chunks (and read local files): one per core, at most 32.
DECODE_THREADS = max(1, min(32, os.cpu_count() or 1))


class _EventLoop:
    """An asyncio event loop on a daemon thread, started at the first read.

    A forked process starts its own at its first read (a thread does not
    survive a fork).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, coroutine: Any) -> Any:
        """Run ``coroutine`` on the loop and return its result (or raise its error)."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                # zarr decodes (and reads local files) in the loop's default
                # executor. asyncio's has cpu_count + 4 threads; each thread
                # that frees decoded chunks keeps its own malloc arena of them
                # (glibc), which is most of a pass's memory beyond its budget
                # (docs/design.md, "Chunked stores"). Decoding is CPU-bound:
                # threads beyond the cores only add arenas.
                loop.set_default_executor(
                    ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="gpu_patching_decode")
                )
                threading.Thread(
                    target=loop.run_forever, name="gpu_patching_reads", daemon=True
                ).start()
                self._loop = loop
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def forget(self) -> None:
        """Drop the parent's loop in a forked child (its thread did not come along)."""
        self._lock = threading.Lock()
        self._loop = None


_LOOP = _EventLoop()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LOOP.forget)


def run(coroutine: Any) -> Any:
    """Run a coroutine on this process's read loop (from any thread but the loop's own)."""
    return _LOOP.run(coroutine)
