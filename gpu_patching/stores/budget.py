"""The memory budget of a :class:`~gpu_patching.stores.ChunkReader`: defaults and sums.

What ``cache_bytes`` bounds, its default over a set of stacks, the checks of
the reader's options, and what a pass of batches counts against the budget
besides its cache and reads (batches held, rows, bookkeeping). Why each part
counts: ``docs/design.md``, "Chunked stores".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .. import _validation as check
from ..specs import PatchBatch
from .stack import ChunkedStack

__all__ = [
    "BOOKKEEPING_BYTES_PER_ROW",
    "CHUNK_SIZES_PER_READ",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_WORKERS",
    "MAX_READ_AHEAD",
    "MEMORY_MODES",
    "check_reader_options",
    "default_cache_bytes",
    "pass_reserved_bytes",
    "pass_rows_bytes",
    "reserved_batches",
]

#: The most a :class:`ChunkReader`'s default memory budget takes (512 MiB): its
#: chunk cache, reads in flight, batches read ahead and rows (see
#: ``ChunkReader.cache_limit``). The default is this or the stacks' decoded
#: bytes, whichever is smaller (:func:`default_cache_bytes`).
DEFAULT_CACHE_BYTES = 512 << 20
#: Default number of chunk reads in flight (zarr's codecs decode in threads).
DEFAULT_WORKERS = min(32, (os.cpu_count() or 1) + 4)
#: The most batches :meth:`ChunkReader.batches` reads at once by default.
MAX_READ_AHEAD = 16
#: What ``cache_bytes`` bounds (``ChunkReader(memory=...)``): ``"budget"``,
#: everything the reader holds, reads held back to fit; ``"call"``, the cache
#: alone, every read of a call at once (``workers`` at most).
MEMORY_MODES = ("budget", "call")
#: Chunk sizes a read in flight holds at most: the stored (compressed) bytes,
#: zarr's decoded chunk and the chunk copied to the stack's full extent.
CHUNK_SIZES_PER_READ = 3
#: What a read keeps besides pixels, per row: its plan (measured while planning
#: a shuffled window of 2048 rows: at most 0.54 KiB per row in 2D and 0.87 KiB
#: in 3D, 0.16-0.30 KiB kept for the cut-out) and one entry per chunk, counted
#: against cache_bytes by ChunkReader.batches.
BOOKKEEPING_BYTES_PER_ROW = 1024


def reserved_batches(window: int) -> int:
    """Batches a pass of ``window`` batches at a time holds beyond the two allowed."""
    return max(1, 2 * window - 2)


def pass_reserved_bytes(
    batches_held: int, window: int, size: int, batch_bytes: int, rows_bytes: int
) -> int:
    """Return what a pass counts against the budget besides cache and reads.

    The batches it holds beyond the two handed over, its rows (the one thing
    that grows with the store) and the bookkeeping of a window's read.
    """
    return batches_held * batch_bytes + rows_bytes + window * size * BOOKKEEPING_BYTES_PER_ROW


def pass_rows_bytes(rows: PatchBatch) -> int:
    """Bytes of a pass's rows (the whole epoch, for a loader)."""
    return sum(
        int(getattr(getattr(rows, name), "nbytes", 0))
        for name in ("data_idx", "sample_idx", "coords", "indices")
    )


def default_cache_bytes(stacks: Sequence[ChunkedStack], workers: int = DEFAULT_WORKERS) -> int:
    """Return the default ``cache_bytes`` of a :class:`ChunkReader` over ``stacks``.

    Room for every chunk of the stacks in the cache beside the reads in
    flight, twice over, at most :data:`DEFAULT_CACHE_BYTES`: twice the
    stacks' decoded bytes (every element once: a chunk at a far edge decodes
    to its part inside the stack) plus three chunk sizes (``read_bytes``)
    for each read that can be in flight (``workers``, at most one per
    chunk). Twice, because a pass may read batches ahead into up to half of
    the budget (:meth:`ChunkReader.read_ahead`); the other half then still
    caches every chunk, so each is decoded once and later epochs decode
    none. A budget of the decoded bytes alone left the reads in flight and
    the batches read ahead so little room that chunks were decoded again
    (a 32 MiB store of 16 chunks: 76 decodes a shuffled epoch, 42 in chunk
    order; 16 and 16 with this default, ``benchmarks/bench_stores.py``'s
    quick stores). More could never be used.

    Parameters
    ----------
    stacks : sequence of ChunkedStack
        The stacks (their shapes, chunks and dtypes; nothing is read).
    workers : int, default DEFAULT_WORKERS
        The reader's reads in flight at most.

    Returns
    -------
    int
        The budget in bytes.

    Raises
    ------
    TypeError
        If ``workers`` is not an integer.
    ValueError
        If ``workers`` is below 1.
    """
    n_workers = check.as_int(workers, "workers")
    if n_workers < 1:
        raise ValueError(f"workers must be at least 1, got {n_workers}")
    decoded = sum(math.prod(s.shape) * s.dtype.itemsize for s in stacks)
    chunks = sum(math.prod(s.chunk_grid) for s in stacks)
    read = CHUNK_SIZES_PER_READ * max((s.chunk_bytes for s in stacks), default=0)
    return min(DEFAULT_CACHE_BYTES, 2 * (decoded + min(n_workers, chunks) * read))


def check_reader_options(cache_bytes: Any, workers: Any) -> tuple[int | None, int]:
    """Return ``(cache_bytes, workers)`` of a :class:`ChunkReader` after checking them.

    Parameters
    ----------
    cache_bytes : int or None
        At least 0; ``None`` (the default budget, :func:`default_cache_bytes`)
        is returned as it is.
    workers : int
        At least 1.

    Returns
    -------
    tuple
        The two values.
    """
    if cache_bytes is None:
        limit = None
    else:
        limit = check.as_int(cache_bytes, "cache_bytes")
    if limit is not None and limit < 0:
        raise ValueError(f"cache_bytes must be at least 0, got {limit}")
    n_workers = check.as_int(workers, "workers")
    if n_workers < 1:
        raise ValueError(f"workers must be at least 1, got {n_workers}")
    return limit, n_workers
