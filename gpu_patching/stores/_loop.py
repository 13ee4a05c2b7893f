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

from .._per_process import PerProcess

__all__ = ["DECODE_THREADS", "run"]

#: Threads that decode chunks (and read local files): one per core, at most 32.
DECODE_THREADS = max(1, min(32, os.cpu_count() or 1))


def _start_loop() -> asyncio.AbstractEventLoop:
    """Start an asyncio event loop on a daemon thread of its own."""
    loop = asyncio.new_event_loop()
    # zarr decodes (and reads local files) in the loop's default executor.
    # asyncio's has cpu_count + 4 threads; each thread that frees decoded
    # chunks keeps its own malloc arena of them (glibc), which is most of a
    # pass's memory beyond its budget (docs/design.md, "Chunked stores").
    # Decoding is CPU-bound: threads beyond the cores only add arenas.
    loop.set_default_executor(
        ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="gpu_patching_decode")
    )
    threading.Thread(target=loop.run_forever, name="gpu_patching_reads", daemon=True).start()
    return loop


#: The loop, started at the first read; a forked process starts its own at its
#: first read (a thread does not survive a fork).
_LOOP: PerProcess[asyncio.AbstractEventLoop] = PerProcess(_start_loop)


def run(coroutine: Any) -> Any:
    """Run a coroutine on this process's read loop (from any thread but the loop's own)."""
    return asyncio.run_coroutine_threadsafe(coroutine, _LOOP.get()).result()
