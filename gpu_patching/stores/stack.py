"""Chunked stacks: patches straight from zarr, OME-Zarr and TIFF stores.

Light-sheet and slide-scanner stacks fit in neither host nor device memory.
This module makes chunked stores stacks of their own, so that
:func:`~gpu_patching.extract_patches` and :class:`~gpu_patching.PatchLoader`
cut patches out of them without ever reading a whole stack:

* :func:`open_stack` opens a store as a :class:`ChunkedStack`, an ``SC(Z)YX``
  view of a chunked array that reads nothing but metadata: a zarr array
  (zarr-python 3, format 2 or 3 stores, any codec), level 0 (or another level)
  of an OME-Zarr multiscale image, or a TIFF through tifffile's zarr store.
  Other axis orders are mapped with ``axes=`` (e.g. ``"ZYX"``, ``"YXC"``);
  OME-Zarr images bring their own axes.
* :class:`ChunkReader` reads the patches of a batch: it finds the chunks the
  batch's patches touch (vectorised, :func:`plan_chunks`), reads each of them
  **once**, concurrently, and copies every patch's pieces out of each chunk as
  it arrives; the rows keep the batch's order. Chunks go through a cache with
  a byte limit (:data:`DEFAULT_CACHE_BYTES`), so neighbouring batches that
  touch the same chunks do not decode them again.
  :meth:`ChunkReader.batches` (what :class:`~gpu_patching.PatchLoader` uses)
  reads ``W`` batches at once, each chunk once for all ``W`` (``W`` up to 16,
  as many as half of the cache's bytes can buffer), and reads the next
  ``W`` on a thread while these train. The batches of a shuffled epoch are
  spread over the whole stack, so a window of them shares most chunks: this
  is what keeps shuffled epochs from decoding each chunk for a few patches.

Why this and not one zarr read per patch: a zarr read decodes every chunk the
selection touches, so slicing patch after patch decodes each chunk once per
patch that touches it, and pays zarr's per-call overhead (about a millisecond
in zarr-python 3) per patch.

The reader is zarr-python's own asynchronous API: one event-loop task per
chunk, at most ``workers`` reads in flight, and zarr's codecs decode in
zarr's thread pool (they release the GIL). ``benchmarks/bench_stores.py``
measured it against per-chunk synchronous reads from a thread pool and
against TensorStore on the same chunks: in every run the asynchronous reads
were no slower than either (decoding dominates all of them), so TensorStore,
an extra dependency that does not read tifffile's stores, is not used.

Memory. ``cache_bytes`` budgets the cached chunks, the reads in flight (at
most ``workers``, each holding up to three chunk sizes until its pieces are
copied), the batches read ahead, the rows of the pass (40 or 48 bytes per
patch of an epoch) and a read's bookkeeping (about 1 KiB per row); what is
left of it after the others is the cache's limit
(:attr:`ChunkReader.cache_limit`). Beyond it, a pass holds the two batches it
is handing over; nothing outside the budget grows with the store. (Reads in
flight are never held back, so a budget smaller than three chunks per worker
is exceeded by that much.)

Faults. A chunk that fails to decode or read, a store whose metadata has
disappeared, and a store whose shape, dtype or chunks changed since it was
opened each raise :class:`StoreError`, naming the store and (for a chunk) the
chunk's index and key. Metadata is checked before and after each read (a
batch, or a window of batches); a batch with a fault is never returned (not even partly: patches are
assembled into a new array and copied into a caller's ``out`` only once
complete). With :meth:`ChunkReader.batches` the error is raised in the
consumer's thread, from the ``next()`` that would have returned the batch.
zarr reads a chunk missing from a store as the fill value (zarr-python 3 does
not write chunks that hold only the fill value), so a store deleted while a
batch is being read is caught by the metadata check after the batch, not by
the chunk reads; a TIFF keeps being read through its open file handle.

Processes. A TIFF stack is read through an open file, and a forked process
shares that file's position with its parent: reads from several
``DataLoader`` workers would seek and read over each other and return wrong
pixels without an error. So each process reads through a file of its own: a
stack opened by :func:`open_stack` opens its TIFF again at its first read in
another process (forked, or unpickled in a spawned worker) and checks that
the file still holds the same array. A TIFF-backed zarr array wrapped
without its path cannot be opened again and is refused in another process.
zarr stores are read by key and need nothing of the sort.

Refusals. The stacks of one reader must agree on dtype and channel count
(a batch is one array); chunks come out in native byte order, so a
big-endian store (zarr format 2 can hold one) reads like any other. Malformed
OME-Zarr metadata is a ``ValueError`` naming the store and the field.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _validation as check
from .io import to_scyx_axes
from .specs import PatchBatch

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_WORKERS",
    "MAX_READ_AHEAD",
    "ChunkPlan",
    "ChunkReader",
    "ChunkedStack",
    "StoreError",
    "as_chunked_stack",
    "check_reader_options",
    "is_chunked_stack",
    "open_stack",
    "plan_chunks",
    "upload_batch",
]

#: Default memory budget of a :class:`ChunkReader` (512 MiB): its chunk cache,
#: reads in flight, batches read ahead and rows (see ``ChunkReader.cache_limit``).
DEFAULT_CACHE_BYTES = 512 << 20
#: Default number of chunk reads in flight (zarr's codecs decode in threads).
DEFAULT_WORKERS = min(32, (os.cpu_count() or 1) + 4)
#: The most batches :meth:`ChunkReader.batches` reads at once by default.
MAX_READ_AHEAD = 16
# What a read keeps besides pixels, per row: its plan's pieces as Python lists
# and one task per chunk (measured: about 0.9 KiB per row of a shuffled 2D
# window), counted against cache_bytes by ChunkReader.batches.
_BOOKKEEPING_BYTES_PER_ROW = 1024

# OME-Zarr axis names to our letters (time points are samples).
_OME_AXES = {"t": "S", "c": "C", "z": "Z", "y": "Y", "x": "X"}
# Files inherited from the process that forked this one (see ChunkedStack._reopen).
_INHERITED_FILES: list[Any] = []
#: How to install what this module needs (zarr-python 3 and tifffile's zarr 3 stores).
_STORES_EXTRA = "pip install 'gpu-patching[stores]'"
# tifffile's zarr store speaks zarr-python 3 from this release on.
_TIFFFILE_MIN = (2025, 5, 21)


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


# -- opening ---------------------------------------------------------------------------


class ChunkedStack:
    """An ``SC(Z)YX`` view of a chunked array: shape, dtype, chunk reads.

    Nothing but metadata is read when it is built; :meth:`read_chunk` reads
    one chunk, and indexing (``stack[s, c]``, slices) reads a selection.
    Build it with :func:`open_stack` (paths, OME-Zarr groups, TIFFs) or
    directly from a zarr array. It pickles, and can be used from any
    process: a TIFF opened by :func:`open_stack` is opened again by each
    process that reads it (see the module's notes on processes).

    Parameters
    ----------
    array : zarr.Array
        The stored array (zarr-python 3; a format 2 or 3 store, or tifffile's
        zarr store of a TIFF).
    axes : str, optional
        The stored array's axes, letters from ``S``, ``C``, ``Z``, ``Y``,
        ``X`` (``Y`` and ``X`` required), e.g. ``"ZYX"`` or ``"YXC"``; missing
        ``S``/``C`` become axes of length 1. Default: ``"SCYX"`` or
        ``"SCZYX"`` for 4 or 5 axes, ``"YX"`` for 2; other ranks need it.
    name : str, optional
        How errors name the store; default: zarr's store URL.

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

    def __init__(self, array: Any, axes: str | None = None, *, name: str | None = None) -> None:
        if not _is_zarr_array(array):
            raise TypeError(f"array must be a zarr array, got {type(array).__name__}")
        stored_shape = tuple(int(s) for s in array.shape)
        stored_chunks = tuple(int(c) for c in array.chunks)
        if axes is None:
            defaults = {2: "YX", 4: "SCYX", 5: "SCZYX"}
            if len(stored_shape) not in defaults:
                raise ValueError(
                    f"{name or _store_url(array)} has shape {stored_shape}; give its axes, "
                    "e.g. axes='ZYX' (2, 4 and 5 axes default to YX, SCYX and SCZYX)"
                )
            axes = defaults[len(stored_shape)]
        order, present = to_scyx_axes(axes, len(stored_shape))
        letters = axes.upper()
        full = "SC" + ("Z" if "Z" in present else "") + "YX"
        # stored axis of each SC(Z)YX axis; None for an added S or C
        self._stored_axis: tuple[int | None, ...] = tuple(
            letters.index(a) if a in letters else None for a in full
        )
        self._order = order
        # (process that opened it, the array, what closes its file). A TIFF is
        # read through an open file whose position every forked process would
        # share: a process other than the opener opens the file again
        # (_tiff_source), and so does an unpickled copy.
        self._handle: tuple[int, Any, Any] = (os.getpid(), array, None)
        self._tiff_source: tuple[str, int] | None = None
        self.axes = letters
        self.name = name if name is not None else _store_url(array)
        stored_dtype = np.dtype(array.dtype)
        # Chunks are handed out in native byte order (a zarr format 2 store may
        # hold big-endian elements, which PyTorch and the crop kernels refuse).
        self.dtype = _native_byte_order(stored_dtype)
        self.shape = tuple(1 if i is None else stored_shape[i] for i in self._stored_axis)
        self.chunks = tuple(1 if i is None else stored_chunks[i] for i in self._stored_axis)
        self._stored_meta = (stored_shape, stored_dtype, stored_chunks)

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
            if self._tiff_source is not None:
                return self._reopen()
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
        assert self._tiff_source is not None
        path, level = self._tiff_source
        if self._handle[2] is not None:
            # The opener's file, inherited through fork, is kept open and never
            # touched here: closing it takes its buffer's lock, which a thread
            # of the opener may have held when it forked (a deadlock), and
            # letting it be collected would close it the same way.
            _INHERITED_FILES.append(self._handle)
        try:
            array, close = _open_tiff(Path(path), level)
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
        if self._tiff_source is not None:
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
        block = np.asarray(self._array[tuple(stored)]).astype(self.dtype, copy=False)
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
        return self._to_full(np.asarray(self._array[self._stored_selection(starts, stops)]))

    async def _read_chunk_async(self, index: tuple[int, ...]) -> NDArray[Any]:
        starts, stops = self._chunk_bounds(index)
        selection = self._stored_selection(starts, stops)
        block = await self._array.async_array.getitem(selection)
        return self._to_full(np.asarray(block))

    def check_unchanged(self) -> None:
        """Raise :class:`StoreError` if the store is gone or its array changed.

        Re-reads the array's metadata (one small read); a TIFF is read
        through its open file, so it is not checked (a process that opens it
        again checks it then).
        """
        if self._tiff_source is not None:
            return
        zarr = _import_zarr()

        try:
            current = zarr.open_array(store=self._array.store, path=self._array.path, mode="r")
        except Exception as error:
            raise StoreError(
                f"the store {self.name} has disappeared or cannot be opened any more "
                f"({type(error).__name__}: {error})",
                self.name,
            ) from error
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


def _tiff_backed(array: Any) -> bool:
    """Tell an array read through tifffile's zarr store (an open file) from a zarr store."""
    store = getattr(array, "store", None)
    return (type(store).__module__ or "").split(".")[0] == "tifffile"


def _native_byte_order(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Return ``dtype`` in the machine's byte order (unchanged where it already is)."""
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def _version(text: str) -> tuple[int, ...]:
    """Return the leading numbers of a version string: ``"3.1.6"`` -> ``(3, 1, 6)``."""
    numbers = re.match(r"\d+(\.\d+)*", text)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def _import_zarr() -> Any:
    """Import zarr-python 3, or say which extra installs it."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError(
            f"chunked stores need zarr-python 3 (Python 3.11 or later): {_STORES_EXTRA}"
        ) from error
    if _version(zarr.__version__)[:1] < (3,):
        raise ImportError(
            f"chunked stores need zarr-python 3, found zarr {zarr.__version__}: {_STORES_EXTRA}"
        )
    return zarr


def _import_tifffile() -> Any:
    """Import a tifffile whose zarr store speaks zarr-python 3, or say which extra installs it."""
    wanted = ".".join(str(n) for n in _TIFFFILE_MIN)
    try:
        import tifffile
    except ImportError as error:
        raise ImportError(
            f"TIFF stacks need tifffile {wanted} or later: {_STORES_EXTRA}"
        ) from error
    if _version(tifffile.__version__) < _TIFFFILE_MIN:
        raise ImportError(
            f"TIFF stacks need tifffile {wanted} or later, found {tifffile.__version__}: "
            f"{_STORES_EXTRA}"
        )
    return tifffile


def _open_tiff(path: Path, level: int) -> tuple[Any, Any]:
    """Open level ``level`` of a TIFF as a zarr array; return it and what closes its file."""
    tifffile = _import_tifffile()
    zarr = _import_zarr()
    tiff = tifffile.TiffFile(path)
    try:
        n_levels = len(tiff.series[0].levels)
        _check_level(level, n_levels, str(path))
        array = zarr.open_array(store=tiff.aszarr(level=level), mode="r")
    except BaseException:
        tiff.close()
        raise
    return array, tiff.close


def _describe(meta: tuple[Any, ...]) -> str:
    shape, dtype, chunks = meta
    return f"{shape}, {dtype}, {chunks}"


def _is_zarr_array(value: Any) -> bool:
    """Tell a zarr array without importing zarr (an optional dependency)."""
    module = type(value).__module__ or ""
    return module.split(".")[0] == "zarr" and hasattr(value, "chunks") and hasattr(value, "shape")


def _store_url(array: Any) -> str:
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
    return isinstance(value, ChunkedStack) or _is_zarr_array(value)


def as_chunked_stack(value: Any, name: str = "stack") -> ChunkedStack:
    """Return a :class:`ChunkedStack` as is, or a zarr array (axes ``SC(Z)YX``) wrapped."""
    if isinstance(value, ChunkedStack):
        return value
    if _is_zarr_array(value):
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


def open_stack(source: Any, axes: str | None = None, *, level: int = 0) -> ChunkedStack:
    """Open a chunked store as an ``SC(Z)YX`` stack, reading only metadata.

    Parameters
    ----------
    source : str, pathlib.Path, zarr.Array or zarr.Group
        A zarr store (``.zarr`` folder, format 2 or 3), an OME-Zarr image
        (a group with ``multiscales`` metadata, version 0.4 or 0.5), a
        ``.tif``/``.tiff`` file (read through tifffile's zarr store: tiles or
        strips are its chunks), or an opened zarr array or group.
    axes : str, optional
        The stored array's axes (see :class:`ChunkedStack`). OME-Zarr images
        default to their own axes (``t`` is read as samples ``S``).
    level : int, default 0
        The multiscale level of an OME-Zarr image or a pyramidal TIFF (0 is
        full resolution); other stores have only level 0.

    Returns
    -------
    ChunkedStack
        The stack; ``stack.shape`` is what a sampler's ``data_shapes`` takes.

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    ValueError
        If the group is not a multiscale image or its metadata is malformed
        (the error names the field), the level does not exist or the axes do
        not fit the array.
    TypeError
        If ``source`` is of another type.
    ImportError
        If zarr-python 3 (or, for a TIFF, tifffile 2025.5.21 or later) is not
        installed: ``pip install 'gpu-patching[stores]'``.
    """
    level = check.as_int(level, "level")
    if level < 0:
        raise ValueError(f"level must be at least 0, got {level}")
    if isinstance(source, ChunkedStack):
        if axes is not None or level:
            raise ValueError("source is already a ChunkedStack; give axes and level when opening")
        return source
    if isinstance(source, (str, Path)):
        return _open_path(Path(source), axes, level)
    if _is_zarr_array(source):
        _check_level(level, 1, _store_url(source))
        return ChunkedStack(source, axes)
    if (type(source).__module__ or "").split(".")[0] == "zarr":  # a group
        return _open_group(source, axes, level, _store_url(source))
    raise TypeError(
        f"source must be a path, a zarr array or a zarr group, got {type(source).__name__}"
    )


def _check_level(level: int, n_levels: int, name: str) -> None:
    if level >= n_levels:
        raise ValueError(f"{name} has {n_levels} level(s); level {level} does not exist")


def _open_path(path: Path, axes: str | None, level: int) -> ChunkedStack:
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    zarr = _import_zarr()
    if path.suffix.lower() in (".tif", ".tiff"):
        array, close = _open_tiff(path, level)
        try:
            stack = ChunkedStack(array, axes, name=str(path))
        except BaseException:
            close()
            raise
        stack._handle = (os.getpid(), array, close)
        stack._tiff_source = (str(path.absolute()), level)
        return stack
    opened = zarr.open(str(path), mode="r")
    if _is_zarr_array(opened):
        _check_level(level, 1, str(path))
        return ChunkedStack(opened, axes, name=str(path))
    return _open_group(opened, axes, level, str(path))


def _open_group(group: Any, axes: str | None, level: int, name: str) -> ChunkedStack:
    """Level ``level`` of an OME-Zarr multiscale image (0.4: attrs; 0.5: attrs['ome']).

    The metadata is checked field by field: a malformed image is a
    ``ValueError`` that names the store and the field, not whatever Python
    error indexing it would raise.
    """
    attributes = dict(group.attrs)
    ome = attributes.get("ome", {})
    if not isinstance(ome, Mapping):
        raise ValueError(
            f"{name}: the OME-Zarr attribute 'ome' must be a mapping, got {_kind(ome)}"
        )
    multiscales = attributes.get("multiscales", ome.get("multiscales"))
    if multiscales is None:
        raise ValueError(
            f"{name} is a zarr group without OME-Zarr 'multiscales' metadata; "
            "open the array inside it instead"
        )
    if not isinstance(multiscales, list) or not multiscales:
        raise ValueError(
            f"{name}: OME-Zarr 'multiscales' must be a non-empty list, got {_kind(multiscales)}"
        )
    image = multiscales[0]
    if not isinstance(image, Mapping):
        raise ValueError(f"{name}: OME-Zarr 'multiscales[0]' must be a mapping, got {_kind(image)}")
    datasets = image.get("datasets")
    if not isinstance(datasets, list):
        raise ValueError(
            f"{name}: OME-Zarr 'multiscales[0].datasets' must be a list, got {_kind(datasets)}"
        )
    _check_level(level, len(datasets), name)
    field = f"multiscales[0].datasets[{level}].path"
    dataset = datasets[level]
    path = dataset.get("path") if isinstance(dataset, Mapping) else None
    if not isinstance(path, str):
        raise ValueError(f"{name}: OME-Zarr '{field}' must be a string, got {_kind(path)}")
    if axes is None and "axes" in image:
        axes = _ome_axes(image["axes"], name)
    try:
        array = group[path]
    except (KeyError, FileNotFoundError) as error:
        raise ValueError(
            f"{name}: OME-Zarr '{field}' is {path!r}, which does not exist in the group"
        ) from error
    if not _is_zarr_array(array):
        raise ValueError(f"{name}: OME-Zarr '{field}' is {path!r}, which is not an array")
    return ChunkedStack(array, axes, name=f"{name}/{path}")


def _ome_axes(entries: Any, name: str) -> str:
    """Our axes letters of OME-Zarr ``axes`` (0.4 and 0.5: mappings with a ``name``)."""
    if not isinstance(entries, list):
        raise ValueError(
            f"{name}: OME-Zarr 'multiscales[0].axes' must be a list, got {_kind(entries)}"
        )
    names = []
    for k, entry in enumerate(entries):
        # 0.3 listed the names themselves; later versions a mapping per axis.
        axis = entry.get("name") if isinstance(entry, Mapping) else entry
        if not isinstance(axis, str):
            raise ValueError(f"{name}: OME-Zarr 'multiscales[0].axes[{k}]' has no name: {entry!r}")
        names.append(axis)
    unknown = [n for n in names if n.lower() not in _OME_AXES]
    if unknown:
        raise ValueError(f"{name} has axes {names}; {unknown} have no SC(Z)YX meaning: give axes=")
    return "".join(_OME_AXES[n.lower()] for n in names)


def _kind(value: Any) -> str:
    """Describe a metadata value for an error: its type, and the value when short."""
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


# -- planning: which chunks a batch touches ---------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks a batch touches and the pieces to copy out of each.

    Attributes
    ----------
    stack : numpy.ndarray of int64, shape (n_chunks,)
        The stack of each chunk.
    chunk : numpy.ndarray of int64, shape (n_chunks, ndim + 2)
        Each chunk's ``SC(Z)YX`` index, every chunk once, sorted.
    piece_row : numpy.ndarray of int64, shape (n_pieces,)
        The batch row of each piece (the part of one patch inside one chunk).
    piece_chunk : numpy.ndarray of int64, shape (n_pieces,)
        The chunk (row of ``chunk``) each piece is copied from; pieces are
        grouped by chunk.
    piece_low, piece_high : numpy.ndarray of int64, shape (n_pieces, ndim + 1)
        The piece's box on the axes ``C(Z)YX`` of the stack, ``[low, high)``.
    """

    stack: NDArray[np.int64]
    chunk: NDArray[np.int64]
    piece_row: NDArray[np.int64]
    piece_chunk: NDArray[np.int64]
    piece_low: NDArray[np.int64]
    piece_high: NDArray[np.int64]


def plan_chunks(
    shapes: Sequence[tuple[int, ...]],
    chunks: Sequence[tuple[int, ...]],
    rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
    patch_size: tuple[int, ...],
) -> ChunkPlan:
    """Find the chunks a batch touches, each once, and the piece of each patch in each.

    Parameters
    ----------
    shapes, chunks : sequence of tuple of int
        ``SC(Z)YX`` shape and chunk shape of each stack.
    rows : tuple of numpy.ndarray of int64
        The batch's ``data_idx`` (n,), ``sample_idx`` (n,) and ``coords``
        (n, ndim), in range (checked by the caller).
    patch_size : tuple of int
        The patch size.

    Returns
    -------
    ChunkPlan
        Every chunk once, and the pieces that tile every patch exactly once.
    """
    data_idx, sample_idx, coords = rows
    n_axes = len(patch_size) + 2
    shape_table = np.asarray(shapes, dtype=np.int64).reshape(-1, n_axes)
    chunk_table = np.asarray(chunks, dtype=np.int64).reshape(-1, n_axes)
    size = chunk_table[data_idx]  # (n, axes)
    # Each patch's box on every axis: one sample, every channel, its corner.
    low = np.empty((len(data_idx), n_axes), dtype=np.int64)
    high = np.empty_like(low)
    low[:, 0], high[:, 0] = sample_idx, sample_idx + 1
    low[:, 1], high[:, 1] = 0, shape_table[data_idx, 1]
    low[:, 2:] = coords
    high[:, 2:] = coords + np.asarray(patch_size, dtype=np.int64)
    first = low // size
    count = (high - 1) // size - first + 1  # chunks per axis, >= 1
    # Every (row, chunk) pair at once: offsets up to the largest count on each
    # axis, keeping those inside each row's own count.
    widest = count.max(axis=0) if len(count) else np.ones(n_axes, dtype=np.int64)
    offsets = np.indices(tuple(int(w) for w in widest)).reshape(n_axes, -1).T
    inside = np.all(offsets[None, :, :] < count[:, None, :], axis=2)
    pair_row, pair_offset = np.nonzero(inside)
    pair_chunk = first[pair_row] + offsets[pair_offset]
    pair_stack = data_idx[pair_row]
    # One key per chunk of one stack: unique (stack, chunk index) rows.
    keys = np.column_stack([pair_stack, pair_chunk])
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    pair_row, pair_chunk, inverse = pair_row[order], pair_chunk[order], inverse[order]
    chunk_low = pair_chunk * size[pair_row]
    piece_low = np.maximum(low[pair_row], chunk_low)
    piece_high = np.minimum(high[pair_row], chunk_low + size[pair_row])
    return ChunkPlan(
        stack=unique[:, 0].copy(),
        chunk=unique[:, 1:].copy(),
        piece_row=pair_row.astype(np.int64),
        piece_chunk=inverse.astype(np.int64),
        piece_low=piece_low[:, 1:],
        piece_high=piece_high[:, 1:],
    )


# -- reading ---------------------------------------------------------------------------


class ChunkReader:
    """Read batches of patches from chunked stacks: each chunk once, concurrently, cached.

    Parameters
    ----------
    stacks : sequence of ChunkedStack or zarr.Array
        The stacks, axes ``SC(Z)YX`` (zarr arrays are wrapped as they are;
        use :func:`open_stack` for other axes, OME-Zarr and TIFF).
    cache_bytes : int, default DEFAULT_CACHE_BYTES
        Memory budget of the chunk cache, the reads in flight and (during a
        :meth:`batches` pass) the batches read ahead and the rows; the cache
        takes what the others leave (:attr:`cache_limit`), least recently
        used chunks leaving first. 0 keeps no chunk between reads.
    workers : int, default DEFAULT_WORKERS
        Chunk reads in flight at once (zarr decodes them in its thread pool).

    Attributes
    ----------
    chunks_read : int
        Chunks read from the stores so far.
    cache_hits : int
        Chunks taken from the cache instead.

    Raises
    ------
    TypeError
        If a stack is not a chunked stack, or the stacks' dtypes differ
        (compared in native byte order).
    ValueError
        If the stacks mix 2D and 3D, or their channel counts differ.

    Notes
    -----
    :meth:`read` and :meth:`batches` may be called from any thread; reads
    from several threads take turns (the cache has one owner at a time).
    """

    def __init__(
        self,
        stacks: Sequence[Any],
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if isinstance(stacks, (str, bytes)) or not isinstance(stacks, Sequence):
            raise TypeError(f"stacks must be a sequence of stacks, got {type(stacks).__name__}")
        if len(stacks) == 0:
            raise ValueError("stacks is empty: give one chunked stack per data_idx")
        limit, n_workers = check_reader_options(cache_bytes, workers)
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
        self.cache_bytes = limit
        self.workers = n_workers
        # Reads in flight hold up to three chunk sizes each (see cache_limit).
        self._in_flight_bytes = 3 * n_workers * max(s.chunk_bytes for s in self.stacks)
        self._reserved_bytes = 0
        self.chunks_read = 0
        self.cache_hits = 0
        self._cache: OrderedDict[tuple[int, tuple[int, ...]], NDArray[Any]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """``SC(Z)YX`` shape of every stack."""
        return [s.shape for s in self.stacks]

    @property
    def cached_bytes(self) -> int:
        """Bytes of the chunks in the cache now."""
        return self._cached_bytes

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
    ) -> NDArray[Any]:
        """:meth:`read`; once ``stop`` is set, chunks not yet read are skipped (_StoppedError)."""
        n_rows = len(rows[0])
        n_channels = self.stacks[0].shape[1]
        out = np.empty((n_rows, n_channels, *patch_size), dtype=self.stacks[0].dtype)
        if n_rows == 0:
            return out
        plan = plan_chunks(self.shapes, [s.chunks for s in self.stacks], rows, patch_size)
        touched = sorted({int(k) for k in plan.stack})
        with self._lock:
            for k in touched:
                self.stacks[k].check_unchanged()
            _run(self._read_plan(plan, rows, out, stop))
            # A store deleted during the reads gave fill values for the chunks
            # it no longer had: its metadata is gone now.
            for k in touched:
                self.stacks[k].check_unchanged()
        return out

    async def _read_plan(
        self,
        plan: ChunkPlan,
        rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
        out: NDArray[Any],
        stop: threading.Event | None,
    ) -> None:
        # Pieces of each chunk: [bounds[j], bounds[j + 1]) (pieces are grouped by chunk).
        bounds = np.searchsorted(plan.piece_chunk, np.arange(len(plan.chunk) + 1))
        piece_row = plan.piece_row.tolist()
        piece_low = plan.piece_low.tolist()
        piece_high = plan.piece_high.tolist()
        samples = rows[1].tolist()
        # Each patch's origin on the axes C(Z)YX: channel 0 and its corner.
        patch_origin = [[0, *corner] for corner in rows[2].tolist()]
        gate = asyncio.Semaphore(self.workers)

        def copy_pieces(j: int, stack: int, index: tuple[int, ...], block: NDArray[Any]) -> None:
            origin = [i * c for i, c in zip(index[1:], self.stacks[stack].chunks[1:], strict=True)]
            sample_origin = index[0] * self.stacks[stack].chunks[0]
            for p in range(int(bounds[j]), int(bounds[j + 1])):
                row, low, high = piece_row[p], piece_low[p], piece_high[p]
                corner = patch_origin[row]
                target = (
                    row,
                    *(slice(a - b, c - b) for a, b, c in zip(low, corner, high, strict=True)),
                )
                source = (
                    samples[row] - sample_origin,
                    *(slice(a - o, c - o) for a, o, c in zip(low, origin, high, strict=True)),
                )
                out[target] = block[source]

        async def one(j: int) -> None:
            stack = int(plan.stack[j])
            index = tuple(int(i) for i in plan.chunk[j])
            key = (stack, index)
            block = self._cache.get(key)
            if block is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                copy_pieces(j, stack, index, block)
                return
            # At most `workers` chunks are outside the cache at once, from the
            # start of their read to the end of their copy (see cache_limit).
            async with gate:
                if stop is not None and stop.is_set():
                    raise _StoppedError  # the pass was closed: its batches are not wanted
                try:
                    block = await self.stacks[stack]._read_chunk_async(index)
                except Exception as error:
                    raise _chunk_error(self.stacks[stack], index, error) from error
                self.chunks_read += 1
                copy_pieces(j, stack, index, block)
                self._keep(key, block)

        results = await asyncio.gather(
            *(one(j) for j in range(len(plan.chunk))), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @property
    def cache_limit(self) -> int:
        """Bytes the cached chunks may take now.

        ``cache_bytes`` less what reads in flight may hold (three chunk sizes
        each: the compressed bytes, zarr's decoded chunk and its copy) and
        less the batches a :meth:`batches` pass reads ahead and its rows.
        """
        return max(0, self.cache_bytes - self._in_flight_bytes - self._reserved_bytes)

    def _keep(self, key: tuple[int, tuple[int, ...]], block: NDArray[Any]) -> None:
        """Put a chunk in the cache (if it fits), then evict down to the limit."""
        if key not in self._cache and block.nbytes <= self.cache_limit:
            self._cache[key] = block
            self._cached_bytes += block.nbytes
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used chunks until the cache is within its limit."""
        limit = self.cache_limit
        while self._cached_bytes > limit:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes

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
            if _reserved_batches(window) * batch_bytes <= self.cache_bytes // 2:
                best = window
        return best

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
        during ``next()``) and ``rows``; all but two of those batches, and
        ``rows``, are taken out of ``cache_bytes`` for the pass
        (:attr:`cache_limit`).

        Parameters
        ----------
        rows : PatchBatch
            In-range rows with NumPy arrays (e.g. ``sample_epoch(e).to_numpy()``).
        batch_size : int
            Rows per batch (the last may be smaller).
        read_ahead : int, optional
            Batches read at once, ``W >= 1``; default :meth:`read_ahead` of
            the batch's size in bytes.

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
        return self._batches(rows, size, window, patch_size, batch_bytes)

    def _batches(
        self,
        rows: PatchBatch,
        size: int,
        window: int,
        patch_size: tuple[int, ...],
        batch_bytes: int,
    ) -> Iterator[tuple[Any, PatchBatch]]:
        starts = list(range(0, len(rows), size))
        if not starts:
            return
        # The first batch is read on its own, so that it comes as soon as its
        # chunks are read; the rest W at a time.
        windows = [starts[:1]] + [starts[k : k + window] for k in range(1, len(starts), window)]
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu_patching_prefetch")
        stop = threading.Event()

        def submit(batch_starts: list[int]) -> Future[NDArray[Any]]:
            part = rows[batch_starts[0] : batch_starts[-1] + size]
            host = (
                np.asarray(part.data_idx, dtype=np.int64),
                np.asarray(part.sample_idx, dtype=np.int64),
                np.asarray(part.coords, dtype=np.int64),
            )
            return prefetch.submit(self._read, host, patch_size, stop)

        # The pass's rows (the whole epoch, for a loader) count against the
        # budget too: they are the one thing that grows with the store.
        rows_bytes = sum(
            int(getattr(getattr(rows, name), "nbytes", 0))
            for name in ("data_idx", "sample_idx", "coords", "indices")
        )
        reserved = (
            _reserved_batches(window) * batch_bytes
            + rows_bytes
            + window * size * _BOOKKEEPING_BYTES_PER_ROW
        )
        with self._lock:
            self._reserved_bytes += reserved
            self._evict()
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
            with self._lock:
                self._reserved_bytes -= reserved

    def close(self) -> None:
        """Drop the cache (the stacks stay open)."""
        self.clear_cache()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reserved_batches(window: int) -> int:
    """Batches a pass of ``window`` batches at a time holds beyond the two allowed."""
    return max(1, 2 * window - 2)


def check_reader_options(cache_bytes: Any, workers: Any) -> tuple[int, int]:
    """Return ``(cache_bytes, workers)`` of a :class:`ChunkReader` after checking them.

    Parameters
    ----------
    cache_bytes : int
        At least 0.
    workers : int
        At least 1.

    Returns
    -------
    tuple of int
        The two values.
    """
    limit = check.as_int(cache_bytes, "cache_bytes")
    if limit < 0:
        raise ValueError(f"cache_bytes must be at least 0, got {limit}")
    n_workers = check.as_int(workers, "workers")
    if n_workers < 1:
        raise ValueError(f"workers must be at least 1, got {n_workers}")
    return limit, n_workers


def upload_batch(patches: NDArray[Any], stream: Any = None) -> Any:
    """Copy an assembled batch to the current CUDA device, ordered for the current stream.

    The copy is enqueued on ``stream``; the current stream then waits for it
    through an event, without blocking the host. Uploading the assembled
    batch moves ``len(batch) * C * prod(patch_size)`` elements, while
    uploading the chunks to crop them on the device would move every decoded
    chunk the batch touches (see ``benchmarks/results/stores.md``).

    Parameters
    ----------
    patches : numpy.ndarray
        The batch.
    stream : cupy.cuda.Stream, optional
        The stream of the copy; default: the current stream.

    Returns
    -------
    cupy.ndarray
        The batch on the device.
    """
    import cupy

    current = cupy.cuda.get_current_stream()
    stream = current if stream is None else stream
    with stream:
        device = cupy.asarray(patches)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(stream)
    current.wait_event(done)
    return device


class _StoppedError(Exception):
    """A read abandoned because its pass was closed."""


def _chunk_error(stack: ChunkedStack, index: tuple[int, ...], error: Exception) -> StoreError:
    stored = stack.stored_index(index)
    key = stack.chunk_key(index)
    where = f"chunk {stored}" + (f" (key {key!r})" if key else "")
    return StoreError(
        f"reading {where} of {stack.name} failed: {type(error).__name__}: {error}",
        stack.name,
        stored,
    )


def _run(coroutine: Any) -> None:
    """Run a coroutine on zarr's event loop (works from any thread, even inside a running loop)."""
    from zarr.core.sync import sync

    sync(coroutine)
