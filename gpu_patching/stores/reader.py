"""Reading the patches of batches from chunked stacks: each chunk once, cached.

:class:`ChunkReader` plans a batch (:func:`~gpu_patching.stores.plan_chunks`),
reads each chunk it touches once, concurrently, through a byte-limited cache,
and reads the next batches on a thread while these train, within its budget
(:mod:`.budget`), cutting patches out of chunks with :mod:`.cut`. Memory and
faults: ``docs/design.md``, "Chunked stores".
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import _validation as check
from ..specs import PatchBatch
from ._loop import DECODE_THREADS
from ._loop import run as _run
from .budget import (
    CHUNK_SIZES_PER_READ,
    DEFAULT_CACHE_BYTES,
    DEFAULT_WORKERS,
    MAX_READ_AHEAD,
    MEMORY_MODES,
    check_reader_options,
    default_cache_bytes,
    pass_reserved_bytes,
    pass_rows_bytes,
    reserved_batches,
)
from .cut import WindowBuffers, cut_pieces
from .plan import ChunkPlan, plan_chunks
from .stack import ChunkedStack, StoreError, as_chunked_stack

__all__ = [
    "DECODE_THREADS",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_WORKERS",
    "MAX_READ_AHEAD",
    "MEMORY_MODES",
    "THREAD_CUT_BYTES",
    "ChunkReader",
    "check_reader_options",
    "default_cache_bytes",
]


#: Patches of at least this many bytes are cut out of their chunks on the
#: decoding threads, the smaller ones on the event loop's thread. A large
#: patch's copy holds NumPy without the GIL for long, so the cut-out runs
#: beside the loop and the decodes: a chunk-order epoch of the bench's 3D
#: store (patches 16x64x64 uint16, 128 KiB) took 0.82-0.86x the time. A small
#: patch's copy is short beside the Python around it, and the threads then
#: wait on each other for the GIL: the 2D store's (64x64, 8 KiB) took 1.1-1.3x
#: the time on the threads; with 128x128 patches (32 KiB) both took the same,
#: with 64x128 (16 KiB) either was ahead in turn (``benchmarks/bench_stores.py``'s
#: stores, 2 cores).
THREAD_CUT_BYTES = 32 << 10


class ChunkReader:
    """Read batches of patches from chunked stacks: each chunk once, concurrently, cached.

    Parameters
    ----------
    stacks : sequence of ChunkedStack or zarr.Array
        The stacks, axes ``SC(Z)YX`` (zarr arrays are wrapped as they are;
        use :func:`open_stack` for other axes, OME-Zarr and TIFF).
    cache_bytes : int, optional
        With ``memory="budget"``: the budget of everything the reader holds,
        the chunk cache, the reads in flight (:attr:`read_bytes` each) and,
        during a :meth:`batches` pass, the batches read ahead and the rows.
        Reads wait for room in it and a pass reads fewer batches ahead to fit
        it; the cache takes what the others leave (:attr:`cache_limit`),
        least recently used chunks leaving first. One read always proceeds,
        so a budget below :meth:`pass_floor_bytes` works too, holding that
        floor. With ``memory="call"``: the cache's bytes alone. 0 keeps no
        chunk between reads. Default: :func:`default_cache_bytes` of the
        stacks and ``workers``, room for every chunk beside the reads in
        flight and the batches read ahead, at most
        :data:`DEFAULT_CACHE_BYTES`.
    workers : int, default DEFAULT_WORKERS
        The most chunk reads in flight at once (zarr decodes them in its
        thread pool).
    memory : {"budget", "call"}, default "budget"
        What ``cache_bytes`` bounds. ``"budget"`` for passes over an epoch
        (:class:`~gpu_patching.PatchLoader`): the reader's memory stays
        within ``cache_bytes``. ``"call"`` for one-shot reads
        (:func:`~gpu_patching.extract_patches`): every chunk of a call is
        read at once (up to ``workers``), so a call holds the chunks it
        reads, whatever ``cache_bytes`` is.

    Attributes
    ----------
    cache_bytes : int
        The budget (the default made concrete).
    chunks_read : int
        Chunks read from the stores so far.
    cache_hits : int
        Chunks taken from the cache instead.
    peak_cached_bytes : int
        The most bytes of chunks the cache has held at once (at most
        ``cache_bytes``).
    read_bytes : int
        The bytes a read in flight is counted for: three chunk sizes of the
        stacks' largest chunk (the stored bytes, zarr's decoded chunk and
        its copy).

    Raises
    ------
    TypeError
        If a stack is not a chunked stack, or the stacks' dtypes differ
        (compared in native byte order).
    ValueError
        If the stacks mix 2D and 3D, or their channel counts differ, or
        ``memory`` is not one of :data:`MEMORY_MODES`.

    Notes
    -----
    :meth:`read` and :meth:`batches` may be called from any thread; reads
    from several threads take turns (the cache has one owner at a time).
    """

    def __init__(
        self,
        stacks: Sequence[Any],
        *,
        cache_bytes: int | None = None,
        workers: int = DEFAULT_WORKERS,
        memory: str = "budget",
    ) -> None:
        if isinstance(stacks, (str, bytes)) or not isinstance(stacks, Sequence):
            raise TypeError(f"stacks must be a sequence of stacks, got {type(stacks).__name__}")
        if len(stacks) == 0:
            raise ValueError("stacks is empty: give one chunked stack per data_idx")
        limit, n_workers = check_reader_options(cache_bytes, workers)
        if not isinstance(memory, str):
            raise TypeError(f"memory must be one of {MEMORY_MODES}, got {type(memory).__name__}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        self.stacks = [as_chunked_stack(s, f"stacks[{k}]") for k, s in enumerate(stacks)]
        ranks = {s.ndim for s in self.stacks}
        if len(ranks) > 1:
            raise ValueError(f"the stacks mix 2D and 3D shapes: {[s.shape for s in self.stacks]}")
        # A batch is one array of the first stack's dtype and channels: another
        # dtype would be cast into it (1e9 into uint16 is 51712) and fewer
        # channels would leave elements unwritten. No promotion is made: a
        # batch's dtype would then depend on which stacks were opened.
        first = self.stacks[0]
        for k, stack in enumerate(self.stacks[1:], start=1):
            if stack.dtype != first.dtype:
                raise TypeError(
                    f"every stack must have the same dtype: stacks[0] ({first.name}) is "
                    f"{first.dtype}, stacks[{k}] ({stack.name}) is {stack.dtype}"
                )
            if stack.shape[1] != first.shape[1]:
                raise ValueError(
                    f"every stack must have the same number of channels: stacks[0] "
                    f"({first.name}) has {first.shape[1]}, stacks[{k}] ({stack.name}) "
                    f"has {stack.shape[1]}"
                )
        self.cache_bytes = default_cache_bytes(self.stacks, n_workers) if limit is None else limit
        self.workers = n_workers
        self.memory = memory
        self.read_bytes = CHUNK_SIZES_PER_READ * max(s.chunk_bytes for s in self.stacks)
        # A pass's batches read ahead, rows and bookkeeping (see batches).
        self._reserved_bytes = 0
        self.chunks_read = 0
        self.cache_hits = 0
        self._cache: OrderedDict[tuple[int, tuple[int, ...]], NDArray[Any]] = OrderedDict()
        # Cached chunks whose cut-out runs on a decoding thread now: not evicted
        # until it ends (its bytes stay counted while they are in use).
        self._cutting: dict[tuple[int, tuple[int, ...]], int] = {}
        self._cached_bytes = 0
        self.peak_cached_bytes = 0
        self._reads_in_flight = 0
        self._peak_reads_in_flight = 0
        self._peak_held_bytes = 0
        self._lock = threading.Lock()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """``SC(Z)YX`` shape of every stack."""
        return [s.shape for s in self.stacks]

    @property
    def cached_bytes(self) -> int:
        """Bytes of the chunks in the cache now."""
        return self._cached_bytes

    @property
    def reads_in_flight(self) -> int:
        """Chunk reads started and not yet copied out, now."""
        return self._reads_in_flight

    @property
    def peak_reads_in_flight(self) -> int:
        """The most chunk reads in flight at once so far."""
        return self._peak_reads_in_flight

    @property
    def held_bytes(self) -> int:
        """Bytes the reader holds now, as ``cache_bytes`` counts them.

        The cached chunks, :attr:`read_bytes` per read in flight and a
        :meth:`batches` pass's batches read ahead (beyond the two it hands
        over), rows and bookkeeping.
        """
        return self._cached_bytes + self._reads_in_flight * self.read_bytes + self._reserved_bytes

    @property
    def peak_held_bytes(self) -> int:
        """The most :attr:`held_bytes` at once so far.

        Within ``cache_bytes`` with ``memory="budget"``, or within a pass's
        :meth:`pass_floor_bytes` when the budget is below that floor.
        """
        return self._peak_held_bytes

    def _note_held(self) -> None:
        """Update the peaks (called wherever the held bytes or the reads grow)."""
        self._peak_held_bytes = max(self._peak_held_bytes, self.held_bytes)
        self._peak_reads_in_flight = max(self._peak_reads_in_flight, self._reads_in_flight)

    def clear_cache(self) -> None:
        """Drop every cached chunk."""
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    def read(
        self,
        rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
        patch_size: tuple[int, ...],
    ) -> NDArray[Any]:
        """Read the patches of in-range rows into a new array.

        The caller checks the rows (:func:`~gpu_patching.extract_patches`
        does; a sampler's epoch built with these shapes is in range by
        construction).

        Parameters
        ----------
        rows : tuple of numpy.ndarray of int64
            ``data_idx`` (n,), ``sample_idx`` (n,) and ``coords`` (n, ndim).
        patch_size : tuple of int
            The patch size.

        Returns
        -------
        numpy.ndarray
            Shape ``(n, C, *patch_size)``, the stacks' dtype; row ``k`` is
            the patch of row ``k``.

        Raises
        ------
        StoreError
            If a chunk cannot be read or a store disappeared or changed.
        """
        return self._read(rows, patch_size, None)

    def _read(
        self,
        rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
        patch_size: tuple[int, ...],
        stop: threading.Event | None,
        out: NDArray[Any] | None = None,
        check_first: bool = True,
    ) -> NDArray[Any]:
        """:meth:`read` (into ``out``, if given); once ``stop`` is set, skip the rest.

        Chunks not yet read when ``stop`` is set are skipped (_StoppedError).
        ``check_first=False`` skips the check of the stores before the reads
        (the check after them stays): a pass's later reads, which the
        previous read's check after it has just covered.
        """
        n_rows = len(rows[0])
        n_channels = self.stacks[0].shape[1]
        if out is None:
            out = np.empty((n_rows, n_channels, *patch_size), dtype=self.stacks[0].dtype)
        if n_rows == 0:
            return out
        plan = plan_chunks(self.shapes, [s.chunks for s in self.stacks], rows, patch_size)
        touched = sorted({int(k) for k in plan.stack})
        with self._lock:
            # A remote store is not checked first: its chunk reads report it
            # unreachable, naming the chunk, and the check would cost a request.
            for k in touched if check_first else ():
                if not self.stacks[k].remote:
                    self.stacks[k].check_unchanged()
            _run(self._read_plan(plan, out, stop))
            # A store deleted during the reads gave fill values for the chunks
            # it no longer had: its metadata is gone now.
            for k in touched:
                self.stacks[k].check_unchanged()
        return out

    async def _read_plan(
        self,
        plan: ChunkPlan,
        out: NDArray[Any],
        stop: threading.Event | None,
    ) -> None:
        # Pieces of each chunk: [bounds[j], bounds[j + 1]) (pieces are grouped by chunk).
        bounds = np.searchsorted(plan.piece_chunk, np.arange(len(plan.chunk) + 1)).tolist()
        patch_size = out.shape[2:]
        gate = asyncio.Semaphore(self._read_slots())
        threaded = out[0].nbytes >= THREAD_CUT_BYTES if len(out) else False
        loop = asyncio.get_running_loop()
        # Once a chunk has failed, the batch is lost: the chunks still waiting
        # are not read (over a network each would wait out its own retries).
        failed = False

        async def cut(j: int, key: tuple[int, tuple[int, ...]], block: NDArray[Any]) -> None:
            if not threaded:
                cut_pieces(plan, bounds[j], bounds[j + 1], block, out, patch_size)
                return
            self._cutting[key] = self._cutting.get(key, 0) + 1
            try:
                # None: the loop's default executor, the decoding threads.
                await loop.run_in_executor(
                    None, cut_pieces, plan, bounds[j], bounds[j + 1], block, out, patch_size
                )
            finally:
                self._cutting[key] -= 1
                if not self._cutting[key]:
                    del self._cutting[key]

        async def one(j: int) -> None:
            nonlocal failed
            stack = int(plan.stack[j])
            index = tuple(int(i) for i in plan.chunk[j])
            key = (stack, index)
            block = self._cache.get(key)
            if block is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                await cut(j, key, block)
                self._evict()  # what its cut-out held back, if anything
                return
            # At most _read_slots() chunks are outside the cache at once, from
            # the start of their read to the end of their copy (see cache_limit).
            async with gate:
                if failed or (stop is not None and stop.is_set()):
                    raise _StoppedError  # the pass was closed, or the batch failed
                self._reads_in_flight += 1
                self._note_held()
                try:
                    fault = None
                    try:
                        block = await self.stacks[stack].read_chunk_async(index)
                    except Exception as error:
                        failed = True
                        fault = _chunk_error(self.stacks[stack], index, error)
                        if not self.stacks[stack].remote:
                            raise fault from error
                    if fault is not None:
                        # Raised outside the handler: a remote error's causes and context
                        # may hold a request's text (a signed URL), so none is attached.
                        raise fault
                    assert block is not None  # the read returned: no fault
                    self.chunks_read += 1
                    await cut(j, key, block)
                finally:
                    self._reads_in_flight -= 1
                # Cached after the read's count is released: the block is one of
                # the bytes the read was counted for.
                self._keep(key, block)

        results = await asyncio.gather(
            *(one(j) for j in range(len(plan.chunk))), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        # The chunk that failed, not one that was skipped after it.
        errors.sort(key=lambda error: isinstance(error, _StoppedError))
        if errors:
            raise errors[0]

    @property
    def cache_limit(self) -> int:
        """Bytes the cached chunks may take now.

        With ``memory="budget"``, ``cache_bytes`` less the batches a
        :meth:`batches` pass reads ahead, its rows and bookkeeping, and less
        :attr:`read_bytes` for each read that may be in flight (as many as
        fit in what is left, at least one, at most ``workers``). With
        ``memory="call"``, ``cache_bytes``.
        """
        if self.memory == "call":
            return self.cache_bytes
        room = self.cache_bytes - self._reserved_bytes - self._read_slots() * self.read_bytes
        return max(0, room)

    def _read_slots(self) -> int:
        """Return the most reads in flight at once now (see :attr:`cache_limit`)."""
        if self.memory == "call":
            return self.workers
        room = self.cache_bytes - self._reserved_bytes
        # One read always proceeds, even in a budget smaller than one read.
        return max(1, min(self.workers, room // self.read_bytes))

    def _keep(self, key: tuple[int, tuple[int, ...]], block: NDArray[Any]) -> None:
        """Put a chunk in the cache (if it fits), then evict down to the limit."""
        if key not in self._cache and block.nbytes <= self.cache_limit:
            self._cache[key] = block
            self._cached_bytes += block.nbytes
            # Counted before the eviction: the bytes did sit in the cache together.
            self.peak_cached_bytes = max(self.peak_cached_bytes, self._cached_bytes)
        self._evict()
        self._note_held()

    def _evict(self) -> None:
        """Drop the least recently used chunks until the cache is within its limit."""
        limit = self.cache_limit
        if self._cached_bytes <= limit:
            return
        if not self._cutting:
            while self._cached_bytes > limit:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= dropped.nbytes
            return
        # Least recently used first, passing over the chunks being cut.
        for key in [k for k in self._cache if k not in self._cutting]:
            if self._cached_bytes <= limit:
                break
            self._cached_bytes -= self._cache.pop(key).nbytes

    def read_ahead(self, batch_bytes: int) -> int:
        """Return the batches :meth:`batches` reads at once by default.

        The largest ``W`` up to :data:`MAX_READ_AHEAD` whose buffers (see
        :meth:`batches`) take at most half of ``cache_bytes``; 1 when even
        that of ``W = 2`` does not fit. Half, because on a shuffled epoch a
        batch read ahead saves more decoding than the same bytes of cached
        chunks (``benchmarks/bench_stores.py``: the chunk reads per patch).

        Parameters
        ----------
        batch_bytes : int
            Bytes of one batch of patches.

        Returns
        -------
        int
            ``W >= 1``.
        """
        best = 1
        for window in range(2, MAX_READ_AHEAD + 1):
            if reserved_batches(window) * batch_bytes <= self.cache_bytes // 2:
                best = window
        return best

    def pass_floor_bytes(self, rows: PatchBatch, batch_size: int) -> int:
        """Return the least a :meth:`batches` pass over ``rows`` holds.

        One read in flight (:attr:`read_bytes`), the pass's rows and the
        bookkeeping of one batch's read (about 1 KiB a row): with
        ``memory="budget"`` and a ``cache_bytes`` below this, a pass reads
        one chunk at a time and no batch ahead, and holds this much.

        Parameters
        ----------
        rows : PatchBatch
            The pass's rows.
        batch_size : int
            Rows per batch, at least 1.

        Returns
        -------
        int
            Bytes.
        """
        size = check.as_int(batch_size, "batch_size")
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        return self.read_bytes + pass_reserved_bytes(0, 1, size, 0, pass_rows_bytes(rows))

    def batches(
        self, rows: PatchBatch, batch_size: int, *, read_ahead: int | None = None
    ) -> Iterator[tuple[Any, PatchBatch]]:
        """Yield ``(patches, batch)`` for consecutive slices of ``rows``, read ahead.

        The rows are read ``W`` batches at a time (``read_ahead``): each chunk
        the ``W`` batches touch is read once for all of them. This is what
        makes shuffled epochs cheap: the patches of a shuffled epoch are
        spread over the whole stack, so consecutive batches touch mostly the
        same chunks. The first batch is read alone (it comes sooner). The
        next ``W`` batches are read on a background thread while these are
        used. A fault raises :class:`StoreError` here, in the
        consumer's thread, in place of the batches it spoiled. Every batch
        holds exactly the rows it would hold with ``W = 1``, in order.

        Memory: while the consumer uses a batch, the reader holds the batches
        of the current window and of the next one (``2W`` batches; with
        ``W = 1``, three while the consumer still holds the previous batch
        during ``next()``) and ``rows``; all but two of those batches, the
        rows and the reads' bookkeeping are counted in :attr:`held_bytes`
        for the pass. With ``memory="budget"``, ``W`` is lowered until they
        and one read fit in ``cache_bytes``; when even ``W = 1`` does not
        fit, nothing is read ahead: each batch is read in the consumer's
        thread when it is asked for, and the pass holds the two batches
        handed over and :meth:`pass_floor_bytes` at most.

        Parameters
        ----------
        rows : PatchBatch
            In-range rows with NumPy arrays (e.g. ``sample_epoch(e).to_numpy()``).
        batch_size : int
            Rows per batch (the last may be smaller).
        read_ahead : int, optional
            Batches read at once, ``W >= 1`` (with ``memory="budget"``, at
            most: fewer when the budget cannot hold them); default
            :meth:`read_ahead` of the batch's size in bytes.

        Returns
        -------
        iterator of (numpy.ndarray, PatchBatch)
            ``(patches, batch)`` pairs: patches of shape
            ``(len(batch), C, *patch_size)`` (a view of the window's array)
            and the rows of these patches.
        """
        size = check.as_int(batch_size, "batch_size")
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        patch_size = tuple(int(p) for p in rows.patch_size)
        first = self.stacks[0]
        batch_bytes = size * first.shape[1] * math.prod(patch_size) * first.dtype.itemsize
        if read_ahead is None:
            window = self.read_ahead(batch_bytes)
        else:
            window = check.as_int(read_ahead, "read_ahead")
            if window < 1:
                raise ValueError(f"read_ahead must be at least 1, got {window}")
        rows_bytes = pass_rows_bytes(rows)
        ahead = True
        if self.memory == "budget":

            def fits(w: int) -> bool:
                reserved = pass_reserved_bytes(
                    reserved_batches(w), w, size, batch_bytes, rows_bytes
                )
                return reserved + self.read_bytes <= self.cache_bytes

            while window > 1 and not fits(window):
                window -= 1
            ahead = fits(window)
        batches_held = reserved_batches(window) if ahead else 0
        reserved = pass_reserved_bytes(batches_held, window, size, batch_bytes, rows_bytes)
        return self._batches(rows, size, window if ahead else 0, patch_size, reserved)

    def _batches(
        self,
        rows: PatchBatch,
        size: int,
        window: int,
        patch_size: tuple[int, ...],
        reserved: int,
    ) -> Iterator[tuple[Any, PatchBatch]]:
        """Yield the pass of :meth:`batches`: ``window`` batches read ahead, or none when 0."""
        starts = list(range(0, len(rows), size))
        if not starts:
            return
        with self._lock:
            self._reserved_bytes += reserved
            self._evict()
            self._note_held()
        try:
            if window == 0:
                # Nothing read ahead: each batch is read when it is asked for,
                # while the consumer holds the previous one (two batches).
                for start in starts:
                    part = rows[start : start + size]
                    yield self._read(_host_rows(part), patch_size, None, None, start == 0), part
            else:
                yield from self._batches_ahead(rows, size, window, patch_size, starts)
        finally:
            with self._lock:
                self._reserved_bytes -= reserved

    def _batches_ahead(
        self,
        rows: PatchBatch,
        size: int,
        window: int,
        patch_size: tuple[int, ...],
        starts: list[int],
    ) -> Iterator[tuple[Any, PatchBatch]]:
        """Yield the batches of ``starts``, ``window`` at a time, the next read on a thread."""
        # The first batch is read on its own, so that it comes as soon as its
        # chunks are read; the rest W at a time.
        windows = [starts[:1]] + [starts[k : k + window] for k in range(1, len(starts), window)]
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu_patching_prefetch")
        stop = threading.Event()

        first = self.stacks[0]
        buffers = WindowBuffers((first.shape[1], *patch_size), first.dtype)

        def submit(batch_starts: list[int]) -> Future[NDArray[Any]]:
            part = rows[batch_starts[0] : batch_starts[-1] + size]
            out = buffers.take(len(part))
            # The stores are checked before the pass's first read and after
            # every read: a store changed between two reads is found after
            # the next one, before any of its batches is handed over, with one
            # metadata read per window instead of two (about 1.3 ms each, on
            # the prefetch thread between one window's reads and the next's).
            first_read = batch_starts[0] == 0
            return prefetch.submit(self._read, _host_rows(part), patch_size, stop, out, first_read)

        pending: Future[NDArray[Any]] | None = submit(windows[0])
        try:
            for w, batch_starts in enumerate(windows):
                assert pending is not None
                patches = pending.result()  # raises the reader's error here
                pending = None
                for j, start in enumerate(batch_starts):
                    # Read the next window once the consumer has let go of the
                    # previous one: when it asks for this window's second
                    # batch (at once when a window has one batch).
                    if w + 1 < len(windows) and j == min(1, len(batch_starts) - 1):
                        pending = submit(windows[w + 1])
                    offset = start - batch_starts[0]
                    yield patches[offset : offset + size], rows[start : start + size]
        finally:
            # A pass closed early (the consumer stopped): a window being read
            # stops at its next chunk instead of being read to the end.
            stop.set()
            if pending is not None:
                pending.cancel()
            prefetch.shutdown(wait=True)

    def close(self) -> None:
        """Drop the cache (the stacks stay open)."""
        self.clear_cache()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_rows(
    part: PatchBatch,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Return the rows of ``part`` as the int64 arrays :meth:`ChunkReader.read` takes."""
    return (
        np.asarray(part.data_idx, dtype=np.int64),
        np.asarray(part.sample_idx, dtype=np.int64),
        np.asarray(part.coords, dtype=np.int64),
    )


class _StoppedError(Exception):
    """A read abandoned because its pass was closed."""


def _chunk_error(stack: ChunkedStack, index: tuple[int, ...], error: Exception) -> StoreError:
    stored = stack.stored_index(index)
    key = stack.chunk_key(index)
    where = f"chunk {stored}" + (f" (key {key!r})" if key else "")
    return StoreError(
        f"reading {where} of {stack.name} failed: "
        + stack.redact(f"{type(error).__name__}: {error}"),
        stack.name,
        stored,
    )
