"""The stacks of chunked stores: an ``SC(Z)YX`` view of a chunked array.

:class:`ChunkedStack` reads metadata when built, chunks when asked, and can be
read from any process (a TIFF is opened again by each process that reads it:
``docs/design.md``, "Chunked stores"). :class:`StoreError` is what every
read of a store raises when the store is not as it was opened.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import _validation as check
from .._per_process import PerProcess
from ..arrays import is_zarr_array
from ._loop import run
from .axes import as_sample_axes, to_scyx_axes

__all__ = [
    "ChunkedStack",
    "StoreError",
    "as_chunked_stack",
    "is_chunked_stack",
    "store_url",
]

#: Opens a stored array again in another process: returns it and what closes its file.
Reopen = Callable[[], tuple[Any, Callable[[], None]]]
# Files inherited from the process that forked this one (see ChunkedStack._reopen).
_INHERITED_FILES: list[Any] = []
# Held while a stack opens its store again: threads that find it stale at
# once open it once. A forked process gets a fresh one (another thread of the
# parent may have held it when it forked).
_REOPEN_LOCK: PerProcess[threading.Lock] = PerProcess(threading.Lock)
# Seconds before the first retry of a chunk read; each retry waits twice as long.
_FIRST_BACKOFF_SECONDS = 0.05
# Errors of a remote read that retrying cannot mend: the answer will not change.
_PERMANENT_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Packages whose errors are a request that failed on its way (retried when not permanent).
_NETWORK_PACKAGES = {"aiohttp", "botocore", "aiobotocore", "obstore", "requests", "urllib3"}


class StoreError(OSError):
    """A chunked store could not be read as it was opened.

    Raised for a chunk that fails to read or decode, a store that has
    disappeared, or a store whose shape, dtype or chunks changed since it was
    opened.

    Parameters
    ----------
    message : str
        What happened, naming the store.
    source : str, optional
        The store (empty where only the message is known: PyTorch's
        ``DataLoader`` re-raises a worker's error in the main process from
        its message alone, and keeps its type only if that works).
    chunk : tuple of int, optional
        The chunk that failed.

    Attributes
    ----------
    source : str
        The store (a path or zarr's store URL).
    chunk : tuple of int or None
        The chunk's index in the stored array's chunk grid, when one chunk
        failed.
    """

    def __init__(
        self, message: str, source: str = "", chunk: tuple[int, ...] | None = None
    ) -> None:
        super().__init__(message)
        self.source = source
        self.chunk = chunk


class ChunkedStack:
    """An ``SC(Z)YX`` view of a chunked array: shape, dtype, chunk reads.

    Nothing but metadata is read when it is built; :meth:`read_chunk` reads
    one chunk, and indexing (``stack[s, c]``, slices) reads a selection.
    Build it with :func:`open_stack` (paths, OME-Zarr groups, TIFFs) or
    directly from a zarr array. It pickles, and can be used from any
    process: a TIFF opened by :func:`open_stack` is opened again by each
    process that reads it (``docs/design.md``, "Chunked stores").

    Parameters
    ----------
    array : zarr.Array
        The stored array (zarr-python 3; a format 2 or 3 store, or tifffile's
        zarr store of a TIFF).
    axes : str, optional
        The stored array's axes, letters from ``S``, ``C``, ``Z``, ``Y``,
        ``X`` (``Y`` and ``X`` required; ``T``, time, is read as ``S``),
        e.g. ``"ZYX"`` or ``"YXC"``; missing ``S``/``C`` become axes of
        length 1. Default: ``"SCYX"`` or
        ``"SCZYX"`` for 4 or 5 axes, ``"YX"`` for 2; other ranks need it.
    name : str, optional
        How errors name the store; default: zarr's store URL.
    reopen : callable, optional
        For an array read through an open file (a TIFF): opens the same array
        again and returns it with what closes its file. Another process (a
        forked or spawned ``DataLoader`` worker) reads through its own file,
        opened by this at its first read; without it such a stack is refused
        in another process. It must pickle (e.g. a ``functools.partial``).
    close : callable, optional
        Closes the file ``array`` is read through (see :meth:`close`).
    retries : int, default 0
        Times a chunk read that failed on its way (a connection refused or
        reset, a timeout, a server error) is tried again, waiting 0.05 s, then
        twice as long each time; refusals (a wrong key, a missing object) are
        not retried. :func:`open_stack` sets 3 for remote stores.
    redact : callable, optional
        Takes the text of an error of this store and returns it without
        credentials; a stack with one is remote: its read errors carry that
        text and not their causes (whose text is a request's). It must pickle.

    Attributes
    ----------
    shape : tuple of int
        ``SC(Z)YX`` shape (what a sampler's ``data_shapes`` takes).
    chunks : tuple of int
        The chunk shape in the same axes (1 for an added axis).
    dtype : numpy.dtype
        The element type, in native byte order (what reads return).
    axes : str
        The stored array's axes.
    name : str
        The store, as errors name it.
    """

    def __init__(
        self,
        array: Any,
        axes: str | None = None,
        *,
        name: str | None = None,
        reopen: Reopen | None = None,
        close: Callable[[], None] | None = None,
        retries: int = 0,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        if not is_zarr_array(array):
            raise TypeError(f"array must be a zarr array, got {type(array).__name__}")
        retries = check.as_int(retries, "retries")
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        stored_shape = tuple(int(s) for s in array.shape)
        stored_chunks = tuple(int(c) for c in array.chunks)
        if axes is None:
            defaults = {2: "YX", 4: "SCYX", 5: "SCZYX"}
            if len(stored_shape) not in defaults:
                raise ValueError(
                    f"{name or store_url(array)} has shape {stored_shape}; give its axes, "
                    "e.g. axes='ZYX' (2, 4 and 5 axes default to YX, SCYX and SCZYX)"
                )
            axes = defaults[len(stored_shape)]
        order, present = to_scyx_axes(axes, len(stored_shape))
        letters = as_sample_axes(axes)  # a time axis T is the samples S
        full = "SC" + ("Z" if "Z" in present else "") + "YX"
        # stored axis of each SC(Z)YX axis; None for an added S or C
        self._stored_axis: tuple[int | None, ...] = tuple(
            letters.index(a) if a in letters else None for a in full
        )
        self._order = order
        # (process that opened it, the array, what closes its file). A TIFF is
        # read through an open file whose position every forked process would
        # share: a process other than the opener opens the file again
        # (_reopen_source), and so does an unpickled copy.
        self._handle: tuple[int, Any, Any] = (os.getpid(), array, close)
        self._reopen_source = reopen
        # A TIFF is read through its open file, which check_unchanged does not re-read.
        self._through_file = _tiff_backed(array)
        self.retries = retries
        self._redact = redact
        self.axes = axes.upper()
        self.name = name if name is not None else store_url(array)
        stored_dtype = np.dtype(array.dtype)
        # Chunks are handed out in native byte order (a zarr format 2 store may
        # hold big-endian elements, which PyTorch and the crop kernels refuse).
        self.dtype = _native_byte_order(stored_dtype)
        self.shape = tuple(1 if i is None else stored_shape[i] for i in self._stored_axis)
        self.chunks = tuple(1 if i is None else stored_chunks[i] for i in self._stored_axis)
        self._stored_meta = (stored_shape, stored_dtype, stored_chunks)

    @property
    def remote(self) -> bool:
        """Whether the store is remote (its errors are redacted, see ``redact``)."""
        return self._redact is not None

    def redact(self, text: str) -> str:
        """Return the text of an error of this store without its credentials.

        Parameters
        ----------
        text : str
            An error's text.

        Returns
        -------
        str
            The text, credentials replaced by ``***`` (unchanged for a local store).
        """
        return text if self._redact is None else self._redact(text)

    @property
    def ndim(self) -> int:
        """Number of axes (4 for ``SCYX``, 5 for ``SCZYX``)."""
        return len(self.shape)

    @property
    def array(self) -> Any:
        """The zarr array this stack reads (in this process: see :meth:`close`)."""
        return self._array

    @property
    def _array(self) -> Any:
        pid, array, _ = self._handle
        if pid != os.getpid():
            if self._reopen_source is not None:
                with _REOPEN_LOCK.get():
                    pid, array, _ = self._handle
                    return array if pid == os.getpid() else self._reopen()
            if _tiff_backed(array):
                # Its file position is shared with the opener: reads would
                # interleave and return wrong pixels without an error.
                raise StoreError(
                    f"{self.name} is a TIFF opened in another process and cannot be opened "
                    "again here (it was wrapped as a zarr array, without its path): open it "
                    "with gpu_patching.stores.open_stack(path) to read it in DataLoader "
                    "workers or other processes",
                    self.name,
                )
        return array

    def _reopen(self) -> Any:
        """Open this process's own handle of a TIFF (after a fork or unpickling)."""
        assert self._reopen_source is not None
        if self._handle[2] is not None:
            # The opener's file, inherited through fork, is kept open and never
            # touched here: closing it takes its buffer's lock, which a thread
            # of the opener may have held when it forked (a deadlock), and
            # letting it be collected would close it the same way.
            _INHERITED_FILES.append(self._handle)
        try:
            array, close = self._reopen_source()
        except Exception as error:
            raise StoreError(
                f"the store {self.name} cannot be opened again in process {os.getpid()} "
                f"({type(error).__name__}: {error})",
                self.name,
            ) from error
        now = (
            tuple(int(s) for s in array.shape),
            np.dtype(array.dtype),
            tuple(int(c) for c in array.chunks),
        )
        if now != self._stored_meta:
            close()
            raise StoreError(
                f"the array in {self.name} changed since it was opened: shape, dtype and "
                f"chunks were {_describe(self._stored_meta)}, now {_describe(now)}",
                self.name,
            )
        self._handle = (os.getpid(), array, close)
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._reopen_source is not None:
            # An open file does not pickle; the copy opens its own at first use.
            state["_handle"] = (-1, None, None)
        return state

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        """Chunks per ``SC(Z)YX`` axis."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True))

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one whole chunk."""
        return math.prod(self.chunks) * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"ChunkedStack({self.name!r}, shape={self.shape}, chunks={self.chunks}, "
            f"dtype={self.dtype}, axes={self.axes!r})"
        )

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        # numpy.asarray would read the whole store: the one thing a chunked
        # stack exists to avoid.
        raise TypeError(
            f"{self!r} is not read whole; crop it with extract_patches or PatchLoader, "
            "or index it (stack[s, c] reads one sample's channel)"
        )

    def __getitem__(self, key: Any) -> NDArray[Any]:
        """Read the elements of integers and slices on the ``SC(Z)YX`` axes (a zarr read).

        ``stack[s, c]`` reads one plane or volume, ``stack[s, :, 100:164]`` a
        band of every channel; only the chunks the selection touches are read.
        Steps are allowed; ``...``, ``None`` and arrays are not.
        """
        selection = key if isinstance(key, tuple) else (key,)
        if len(selection) > self.ndim:
            raise IndexError(f"{len(selection)} indices for the {self.ndim} axes of {self!r}")
        selection = selection + (slice(None),) * (self.ndim - len(selection))
        stored: list[Any] = [slice(None)] * len(self._stored_meta[0])
        kept: list[int] = []  # SC(Z)YX axes that stay in the result
        for axis, (item, where) in enumerate(zip(selection, self._stored_axis, strict=True)):
            if isinstance(item, slice):
                kept.append(axis)
                if where is not None:
                    stored[where] = item
                continue
            index = check.as_int(item, f"index on axis {'SCZYX'[5 - self.ndim :][axis]}")
            size = self.shape[axis]
            if not -size <= index < size:
                raise IndexError(f"index {index} is out of range for an axis of size {size}")
            if where is not None:
                stored[where] = index % size
        block = np.asarray(self._read_selection(tuple(stored))).astype(self.dtype, copy=False)
        # The block's axes are the kept stored axes in stored order; put them in
        # SC(Z)YX order and add the kept axes the store does not have.
        present = [axis for axis in kept if self._stored_axis[axis] is not None]
        by_stored = sorted(present, key=lambda axis: self._stored_axis[axis] or 0)
        block = np.transpose(block, [by_stored.index(axis) for axis in present])
        added = tuple(k for k, axis in enumerate(kept) if self._stored_axis[axis] is None)
        return np.expand_dims(block, added) if added else block

    def stored_index(self, index: Sequence[int]) -> tuple[int, ...]:
        """Return the stored array's chunk index of an ``SC(Z)YX`` chunk index."""
        stored = [0] * len(self._stored_meta[0])
        for value, axis in zip(index, self._stored_axis, strict=True):
            if axis is not None:
                stored[axis] = int(value)
        return tuple(stored)

    def chunk_key(self, index: Sequence[int]) -> str | None:
        """Return the store key of an ``SC(Z)YX`` chunk index (None if zarr cannot say)."""
        try:
            return str(self._array.metadata.encode_chunk_key(self.stored_index(index)))
        except Exception:  # a metadata class without chunk keys: name the index only
            return None

    def _stored_selection(self, starts: Sequence[int], stops: Sequence[int]) -> tuple[slice, ...]:
        selection = [slice(None)] * len(self._stored_meta[0])
        for start, stop, axis in zip(starts, stops, self._stored_axis, strict=True):
            if axis is not None:
                selection[axis] = slice(int(start), int(stop))
        return tuple(selection)

    def _to_full(self, block: NDArray[Any]) -> NDArray[Any]:
        """Return a stored-order block as an ``SC(Z)YX`` view (transposed, axes of 1 added).

        Big-endian blocks are copied to native byte order first.
        """
        view = np.transpose(block.astype(self.dtype, copy=False), self._order)
        missing = [a for a, axis in enumerate(self._stored_axis) if axis is None]
        return np.expand_dims(view, tuple(missing)) if missing else view

    def _chunk_bounds(self, index: Sequence[int]) -> tuple[list[int], list[int]]:
        starts = [int(i) * c for i, c in zip(index, self.chunks, strict=True)]
        stops = [min(s + c, n) for s, c, n in zip(starts, self.chunks, self.shape, strict=True)]
        return starts, stops

    def read_chunk(self, index: Sequence[int]) -> NDArray[Any]:
        """Read one chunk, as an ``SC(Z)YX`` array (clipped at the stack's far edges).

        Parameters
        ----------
        index : sequence of int
            The chunk's index in :attr:`chunk_grid`.

        Returns
        -------
        numpy.ndarray
            The chunk's elements, axes ``SC(Z)YX``.
        """
        grid = self.chunk_grid
        chunk = tuple(check.as_int(i, "chunk index") for i in index)
        if len(chunk) != len(grid) or any(not 0 <= i < g for i, g in zip(chunk, grid, strict=True)):
            raise IndexError(f"chunk index {chunk} is outside the chunk grid {grid} of {self.name}")
        starts, stops = self._chunk_bounds(chunk)
        block = self._read_selection(self._stored_selection(starts, stops))
        return self._to_full(np.asarray(block))

    def _read_selection(self, selection: tuple[Any, ...]) -> Any:
        """Read a stored selection on the read loop (where a remote store's connections live)."""
        array = self._array
        return run(array.async_array.getitem(selection))

    async def read_chunk_async(self, index: tuple[int, ...]) -> NDArray[Any]:
        """Read one chunk as :meth:`read_chunk` does, through zarr's asynchronous API.

        Parameters
        ----------
        index : tuple of int
            A chunk index, not checked: :class:`~gpu_patching.stores.ChunkReader`
            reads the chunks its plan found, in the grid by construction.

        Returns
        -------
        numpy.ndarray
            What :meth:`read_chunk` returns for that index.
        """
        starts, stops = self._chunk_bounds(index)
        selection = self._stored_selection(starts, stops)
        array = await self._array_on_loop()
        for attempt in range(self.retries + 1):
            try:
                block = await array.async_array.getitem(selection)
                break
            except Exception as error:
                if attempt == self.retries or not _is_transient(error):
                    raise
            await asyncio.sleep(_FIRST_BACKOFF_SECONDS * 2**attempt)
        return self._to_full(np.asarray(block))

    async def _array_on_loop(self) -> Any:
        """:attr:`array`, from a coroutine on the read loop.

        A remote store opens again (in a forked or spawned process, or an
        unpickled copy) through this same loop: done here, the loop would
        wait on itself for ever. It opens in a thread of its own instead.
        """
        if self._handle[0] == os.getpid() or self._reopen_source is None:
            return self._array
        return await _in_own_thread(lambda: self._array)

    def check_unchanged(self) -> None:
        """Raise :class:`StoreError` if the store is gone or its array changed.

        Re-reads the array's metadata (one small read); a TIFF is read
        through its open file, so it is not checked (a process that opens it
        again checks it then).
        """
        if self._through_file:
            return
        from zarr.api.asynchronous import open_array  # importable: this stack reads zarr

        array = self._array
        fault: StoreError | None = None
        try:
            current = run(open_array(store=array.store, path=array.path, mode="r"))
        except Exception as error:
            fault = StoreError(
                f"the store {self.name} has disappeared or cannot be opened any more "
                f"({self.redact(f'{type(error).__name__}: {error}')})",
                self.name,
            )
            if not self.remote:
                raise fault from error
        if fault is not None:
            # Outside the handler: a remote error's cause and context may hold
            # a request's text, so only its redacted text goes on.
            raise fault
        now = (
            tuple(int(s) for s in current.shape),
            np.dtype(current.dtype),
            tuple(int(c) for c in current.chunks),
        )
        if now != self._stored_meta:
            raise StoreError(
                f"the array in {self.name} changed since it was opened: shape, dtype and "
                f"chunks were {_describe(self._stored_meta)}, now {_describe(now)}",
                self.name,
            )

    def close(self) -> None:
        """Close the file a TIFF stack keeps open (nothing to do for zarr stores).

        Each process reads a TIFF through a file of its own (a forked
        process or an unpickled copy opens it again at its first read); this
        closes the calling process's file only.
        """
        pid, array, close = self._handle
        if close is not None and pid == os.getpid():
            close()
            self._handle = (pid, array, None)


async def _in_own_thread(function: Callable[[], Any]) -> Any:
    """Await ``function()``, run in a new thread.

    Not in the loop's executor: its threads may all be waiting on the loop.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        try:
            result = function()
        except BaseException as error:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="gpu_patching_reopen", daemon=True).start()
    return await done


def _is_transient(error: BaseException) -> bool:
    """Tell a read that failed on its way (worth another try) from a refusal.

    A certificate the client does not trust is a refusal, whichever library
    wraps the ``ssl`` error (aiohttp, botocore): asked again, the server shows
    the same certificate.
    """
    if isinstance(error, _PERMANENT_ERRORS) or _from_untrusted_certificate(error):
        return False
    if isinstance(error, (OSError, asyncio.TimeoutError)):
        return True
    return (type(error).__module__ or "").split(".")[0] in _NETWORK_PACKAGES


def _from_untrusted_certificate(error: BaseException) -> bool:
    """Tell whether ``error`` or an error it was raised from failed a certificate check."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _tiff_backed(array: Any) -> bool:
    """Tell an array read through tifffile's zarr store (an open file) from a zarr store."""
    store = getattr(array, "store", None)
    return (type(store).__module__ or "").split(".")[0] == "tifffile"


def _native_byte_order(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Return ``dtype`` in the machine's byte order (unchanged where it already is)."""
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def _describe(meta: tuple[Any, ...]) -> str:
    shape, dtype, chunks = meta
    return f"{shape}, {dtype}, {chunks}"


def store_url(array: Any) -> str:
    """Return how errors name a zarr array: its store's URL (or its type's name).

    Parameters
    ----------
    array : zarr.Array or zarr.Group
        The opened array or group.

    Returns
    -------
    str
        The name.
    """
    return str(getattr(array, "store_path", type(array).__name__))


def is_chunked_stack(value: Any) -> bool:
    """Tell whether ``value`` is a chunked stack (:class:`ChunkedStack` or a zarr array).

    Parameters
    ----------
    value : Any
        A stack.

    Returns
    -------
    bool
        True for the stacks this module reads.
    """
    return isinstance(value, ChunkedStack) or is_zarr_array(value)


def as_chunked_stack(value: Any, name: str = "stack") -> ChunkedStack:
    """Return a :class:`ChunkedStack` as is, or a zarr array (axes ``SC(Z)YX``) wrapped."""
    if isinstance(value, ChunkedStack):
        return value
    if is_zarr_array(value):
        shape = tuple(int(s) for s in value.shape)
        if len(shape) not in (4, 5):
            raise ValueError(
                f"{name} is a zarr array of shape {shape}; a stack needs the axes SC(Z)YX "
                "(4 or 5 axes): open it with gpu_patching.stores.open_stack(array, axes=...)"
            )
        return ChunkedStack(value)
    raise TypeError(
        f"{name} is not a chunked stack (a ChunkedStack or a zarr array) but a "
        f"{type(value).__name__}: chunked stores and in-memory arrays cannot be mixed"
    )
