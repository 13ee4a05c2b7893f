"""``PatchLoader``: an epoch of patches, cut out batch by batch, ready to train on.

Per epoch one :meth:`~gpu_patching.StratifiedPatching.sample_epoch` call
draws this rank's rows; each batch is cut out of host stacks by
:func:`~gpu_patching.crop.copy_patches` into a buffer a released batch left,
of device stacks by one crop launch on the loader's stream (batch ``k + 1``
prepared while ``k`` trains), of chunked stores through a
:class:`~gpu_patching.stores.ChunkReader`. How the loader's stream and the
consumer's wait for each other: ``docs/design.md``, "The loader".
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _validation as check
from ._row_threads import check_threads
from .arrays import is_device_array
from .backends import BackendUnavailableError
from .crop import (
    check_stacks,
    copy_patches,
    device_crop,
    native_dtype,
)
from .permutation import EpochOrder
from .specs import PatchBatch
from .stores import (
    DEFAULT_CHUNK_WINDOW,
    DEFAULT_WORKERS,
    ChunkReader,
    check_order,
    check_reader_options,
    check_tile,
    chunk_order,
    is_chunked_stack,
    tile_choice,
)
from .strategy import StratifiedPatching

__all__ = ["PatchLoader", "upload_batch"]


def upload_batch(patches: NDArray[Any], stream: Any = None) -> Any:
    """Copy an assembled batch to the current CUDA device, ordered for the current stream.

    The copy is enqueued on ``stream``; the current stream then waits for it
    through an event, without blocking the host. Uploading the assembled
    batch moves ``len(batch) * C * prod(patch_size)`` elements, while
    uploading the chunks to crop them on the device would move every decoded
    chunk the batch touches (see ``benchmarks/results/stores.md``). A
    :class:`PatchLoader` with ``device_output=True`` over chunked stores
    uploads each batch with it.

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


def _stack_dtype(stack: Any, name: str) -> np.dtype[Any]:
    """Return a stack's dtype as a NumPy dtype; ``TypeError`` naming the stack otherwise."""
    try:
        try:
            return np.dtype(stack.dtype)
        except TypeError:
            # PyTorch names its dtypes "torch.float32": the NumPy name follows the dot.
            return np.dtype(str(stack.dtype).rpartition(".")[2])
    except (AttributeError, TypeError) as error:
        raise TypeError(
            f"{name} ({type(stack).__name__}) has no NumPy dtype: {error}; give NumPy or "
            "CuPy arrays, CUDA arrays or chunked stores"
        ) from None


class _ReleasedBuffers:
    """The outputs of earlier host batches, handed out again once the consumer drops them.

    A fresh array per batch costs its page faults, as much as the copy itself
    for large batches. A buffer is reused only when nothing but this pool refers
    to it: a batch the consumer keeps (in a list, as a view, or as a tensor
    made with ``torch.from_numpy``, which refers to the array) is never written
    again. In a plain ``for`` loop the consumer holds the current batch while
    the next one is cut, so two buffers take turns.
    """

    #: Buffers kept at most; a consumer that holds more batches gets new arrays.
    MAX_BUFFERS = 3

    def __init__(self) -> None:
        self._buffers: list[np.ndarray[Any, Any]] = []

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """Return a released buffer of ``shape`` and ``dtype``, or a new one."""
        for buffer in self._buffers:
            # Three references: the list, the loop variable and getrefcount's argument.
            if buffer.shape == shape and buffer.dtype == dtype and sys.getrefcount(buffer) == 3:
                return buffer
        buffer = np.empty(shape, dtype=dtype)
        if len(self._buffers) < self.MAX_BUFFERS:
            self._buffers.append(buffer)
        return buffer


class PatchLoader:
    """Iterate over one rank's epoch as ``(patches, batch)`` pairs.

    Parameters
    ----------
    stacks : sequence of arrays
        The image stacks the strategy was built for, one per ``data_idx``,
        axes ``SC(Z)YX`` and exactly the strategy's ``data_shapes``. Host
        arrays (NumPy) are cropped on the host; device arrays (CuPy, or CUDA
        arrays with ``__cuda_array_interface__``/DLPack such as PyTorch CUDA
        tensors) by one CUDA kernel per batch. Chunked stores (zarr arrays,
        stacks from :func:`gpu_patching.stores.open_stack`) are read chunk by
        chunk and never whole (see the notes). Other stacks must fit in the
        memory they live in.
    strategy : StratifiedPatching
        The sampler.
    batch_size : int
        Patches per batch; the last batch of an epoch may be smaller.
    shuffle : bool, default True
        Shuffle each epoch (a different order every epoch).
    rank, world_size : int, default 0 and 1
        This process's share of the epoch, by ``DistributedSampler``'s rules
        (see :meth:`~gpu_patching.StratifiedPatching.sample_epoch`).
    drop_last : bool, default False
        Passed to ``sample_epoch``: drop the tail of the order so that every
        rank gets the same, disjoint rows, instead of padding it.
    as_torch : bool, default False
        Yield the patches as a PyTorch tensor (through DLPack, no copy).
        Stacks of unsigned integers wider than 8 bits (uint16 microscopy data)
        need PyTorch 2.3 or later, and most PyTorch operations do not take
        such tensors: convert the batches (``patches.float()``) or the stacks.
    stream : cupy.cuda.Stream, optional
        CUDA stream for the epoch draw and the crops (device stacks), or for
        the uploads (``device_output``); default: the stream current when
        iteration starts.
    cache_bytes : int, optional
        Chunked stores only: the reader's memory budget (chunk cache, reads
        in flight, batches read ahead, the epoch's rows). Default: room for
        every chunk of the stores beside the reads and the batches read
        ahead (about twice their decoded bytes), at most 512 MiB
        (:func:`gpu_patching.stores.default_cache_bytes`). Peak memory of a
        pass: ``docs/design.md``, "Chunked stores".
    workers : int, default gpu_patching.stores.DEFAULT_WORKERS
        Chunked stores only: chunk reads in flight at once.
    device_output : bool, default False
        Chunked stores only: upload each assembled batch to the current CUDA
        device (CuPy, or a CUDA tensor with ``as_torch``) on ``stream``.
    order : {"shuffle", "chunks"}, default "shuffle"
        Chunked stores only for ``"chunks"``: the epoch's rows swept tile by
        tile through the chunks (tiles of ``chunk_tile`` chunks in a shuffled
        order, the chunks of a tile row by row, the rows of ``chunk_window``
        consecutive chunks mixed; :func:`gpu_patching.stores.chunk_order`),
        so each chunk is decoded about once per epoch; with
        ``world_size > 1`` each rank takes whole tiles (see the notes).
    chunk_window : int, default gpu_patching.stores.DEFAULT_CHUNK_WINDOW
        With ``order="chunks"``: home chunks whose rows are mixed. A larger
        window mixes more regions into each batch.
    chunk_tile : sequence of int, optional
        With ``order="chunks"``: chunks per tile along each spatial axis
        ``(Z)YX``. Default: :func:`gpu_patching.stores.choose_tile` of the
        cache budget and ``world_size`` (the tile that decodes fewest chunks
        whose sweep fits in the cache), with the read-ahead that leaves the
        cache room for the best such tile (fewer batches read ahead than a
        shuffled epoch's where that saves decodes). Larger tiles decode
        fewer chunks twice; smaller ones give a more random order. Every rank must use
        the same tile (the same ``cache_bytes`` and ``workers``, or an
        explicit ``chunk_tile``).
    worker_id, num_workers : int, default 0 and 1
        This DataLoader worker's part of the rank's rows, for host stacks and
        chunked stores (:class:`gpu_patching.torch.PatchIterableDataset` sets
        them): with ``order="chunks"`` a run of whole tiles, cut near
        ``n / num_workers`` rows; else the ``worker_id``-th of
        ``num_workers`` equal runs. Nothing is padded or dropped: the workers
        together yield the rank's rows once. The default tile counts
        ``world_size * num_workers`` shards.
    threads : int, optional
        Host stacks only: threads that copy each batch's rows, as for
        :func:`~gpu_patching.extract_patches`. ``None`` (default): automatic,
        several only for batches of large patches, and one inside a PyTorch
        DataLoader worker (the workers use the cores); ``1``: the iterating
        thread alone. The batches are the same for every count.

    Notes
    -----
    Chunked stores (zarr arrays with axes ``SC(Z)YX`` or stacks from
    :func:`gpu_patching.stores.open_stack`) are read by a
    :class:`~gpu_patching.stores.ChunkReader`: each chunk a batch touches is
    read once, concurrently, through a chunk cache of ``cache_bytes``, and the
    next batch is read on a thread while the current one trains. A store
    fault raises :class:`~gpu_patching.stores.StoreError` from the loop, in
    place of the batch it spoiled.

    With ``order="chunks"`` the loader yields the same rows as the shuffled
    epoch when ``world_size`` is 1, in another order. With several ranks,
    each rank takes a run of whole tiles as near to ``N / world_size`` rows
    as the tiles allow, and every rank gets as many rows as the longest run
    (shorter runs wrap round to their own start), or as the shortest with
    ``drop_last``; so ``len(loader)`` can differ from the shuffled order's.

    ``set_epoch(e)`` selects the epoch of the next passes, exactly as with
    PyTorch's ``DistributedSampler``: call it at the start of every epoch. A
    pass without a new ``set_epoch`` repeats the epoch (same order, same
    patches), as :class:`gpu_patching.torch.PatchSampler` does.

    Examples
    --------
    >>> import numpy as np
    >>> from gpu_patching import PatchLoader, StratifiedPatching
    >>> stack = np.zeros((2, 1, 128, 128), dtype=np.float32)
    >>> strategy = StratifiedPatching([stack.shape], (32, 32), seed=0)
    >>> loader = PatchLoader([stack], strategy, batch_size=16)
    >>> patches, batch = next(iter(loader))
    >>> patches.shape
    (16, 1, 32, 32)
    """

    def __init__(
        self,
        stacks: Sequence[Any],
        strategy: StratifiedPatching,
        batch_size: int,
        *,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        as_torch: bool = False,
        stream: Any = None,
        cache_bytes: int | None = None,
        workers: int = DEFAULT_WORKERS,
        device_output: bool = False,
        order: str = "shuffle",
        chunk_window: int = DEFAULT_CHUNK_WINDOW,
        chunk_tile: Sequence[int] | None = None,
        worker_id: int = 0,
        num_workers: int = 1,
        threads: int | None = None,
    ) -> None:
        self._threads = check_threads(threads)
        if not isinstance(strategy, StratifiedPatching):
            raise TypeError(f"strategy must be a StratifiedPatching, got {type(strategy).__name__}")
        size = check.as_int(batch_size, "batch_size")
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        # Checks rank, world_size and the flags now rather than at the first pass.
        EpochOrder.shard(
            strategy.n_patches,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        order, window = check_order(order, chunk_window)
        worker_id, num_workers = check.check_rank_world_size(
            worker_id, num_workers, rank_name="worker_id", world_size_name="num_workers"
        )
        if order == "chunks" and not shuffle:
            raise ValueError("order='chunks' is a shuffled order: give shuffle=True, not False")
        tile = None
        if chunk_tile is not None:
            if order != "chunks":
                raise ValueError(f"chunk_tile={chunk_tile!r} is for order='chunks', not {order!r}")
            tile = check_tile(chunk_tile, len(strategy.patch_size))
        if isinstance(stacks, (str, bytes)) or not isinstance(stacks, Sequence):
            raise TypeError(f"stacks must be a sequence of arrays, got {type(stacks).__name__}")
        shapes = [tuple(int(s) for s in getattr(stack, "shape", ())) for stack in stacks]
        expected = [tuple(shape) for shape in strategy.data_shapes]
        if shapes != expected:
            raise ValueError(
                f"the stacks' shapes {shapes} differ from the strategy's data_shapes {expected}"
            )
        as_torch = check.check_flag(as_torch, "as_torch")
        if stream is not None and not hasattr(stream, "ptr"):
            raise TypeError(f"stream must be a cupy.cuda.Stream or None, got {stream!r}")
        # The crops' own rule (channels, one dtype, shapes against the patch),
        # applied now rather than at the first batch, mid-training.
        dtypes = [_stack_dtype(stack, f"stacks[{k}]") for k, stack in enumerate(stacks)]
        check_stacks(shapes, dtypes, strategy.patch_size)
        cache_limit, n_workers = check_reader_options(cache_bytes, workers)
        chunked = [is_chunked_stack(stack) for stack in stacks]
        if order == "chunks" and not all(chunked):
            raise ValueError(
                "order='chunks' groups patches by the chunks of chunked stores; these "
                "stacks are in memory, where order='shuffle' reads nothing twice"
            )
        if device_output and not all(chunked):
            raise ValueError("device_output=True is for chunked stores; give device stacks instead")
        if device_output:
            try:
                import cupy  # noqa: F401  (fail now, not at the first batch)
            except ImportError as error:
                raise BackendUnavailableError(
                    "device_output=True needs CuPy: pip install 'gpu-patching[cuda12]'"
                ) from error
        # The reader checks that stores are not mixed with in-memory arrays.
        self._reader = (
            ChunkReader(stacks, cache_bytes=cache_limit, workers=n_workers)
            if any(chunked)
            else None
        )
        self._device_output = bool(device_output)
        on_device = {is_device_array(stack) for stack in stacks}
        if len(on_device) > 1:
            raise TypeError("stacks must all be host arrays or all be device arrays")
        if num_workers > 1 and on_device == {True}:
            raise ValueError(
                f"num_workers={num_workers} is for host stacks and chunked stores: device "
                "stacks are cropped by the GPU in the main process"
            )
        if as_torch:
            import torch  # fail now, not at the first batch

            # Batches come out in native byte order, which is what PyTorch holds.
            for dtype in map(native_dtype, dtypes):
                if dtype.kind not in "biuf":
                    raise TypeError(
                        f"as_torch=True: the stacks hold {dtype} values, which PyTorch "
                        "tensors cannot hold; give stacks of booleans, integers or floats"
                    )
                wide_unsigned = dtype.kind == "u" and dtype.itemsize > 1
                if wide_unsigned and getattr(torch, str(dtype), None) is None:
                    raise TypeError(
                        f"as_torch=True: PyTorch {torch.__version__} has no {dtype} tensors "
                        "(PyTorch 2.3 added them); convert the stacks, e.g. to float32"
                    )
        self._stacks = list(stacks)
        # Host stacks as NumPy arrays once (a PyTorch CPU tensor without a copy).
        host = not any(chunked) and on_device == {False}
        self._host_arrays = [np.asarray(stack) for stack in stacks] if host else []
        # The (C, *patch_size) of a row and the native dtype of every batch.
        self._row_shape = (shapes[0][1], *strategy.patch_size)
        self._dtype = native_dtype(dtypes[0])
        self._on_device = on_device == {True}
        self._strategy = strategy
        self._batch_size = size
        self._options: dict[str, Any] = {
            "shuffle": shuffle,
            "rank": rank,
            "world_size": world_size,
            "drop_last": drop_last,
        }
        self._order = order
        self._chunk_window = window
        self._worker = (worker_id, num_workers)
        # The reader's own read-ahead unless the default tile comes with a shorter one.
        self._read_ahead: int | None = None
        if order == "chunks" and tile is None:
            tile, self._read_ahead = self._default_tile(world_size * num_workers)
        self._chunk_tile = tile
        self._as_torch = bool(as_torch)
        self._stream = stream
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch of the next passes (0 until :meth:`set_epoch`)."""
        return self._epoch

    def _default_tile(self, n_shards: int) -> tuple[tuple[int, ...], int | None]:
        """Return the tile and read-ahead of a chunk order whose sweeps decode fewest chunks.

        :func:`~gpu_patching.stores.tile_choice` of the cache a pass leaves to
        chunks with each read-ahead from the reader's own down to one batch:
        the tile that fits best and decodes fewest, then the longest
        read-ahead (``None``: the reader's own). Batches read ahead save no
        decodes in chunk order (a batch's chunks are its neighbours'), and each
        one held takes room the sweep's chunks would use.
        """
        assert self._reader is not None
        stores = self._reader.stacks
        first = stores[0]
        row_bytes = first.shape[1] * math.prod(self._strategy.patch_size) * first.dtype.itemsize
        batch_bytes = self._batch_size * row_bytes
        n_rows = self._strategy.n_patches
        homes = sum(math.prod(s.chunk_grid[:1] + s.chunk_grid[2:]) for s in stores)
        own = self._reader.read_ahead(batch_bytes)
        best: tuple[tuple[int, int, int], tuple[int, ...], int] | None = None
        for ahead in range(own, 0, -1):
            # A pass takes from the budget, besides reads in flight (cache_limit
            # leaves those out): the batches it reads ahead beyond two, the
            # epoch's rows (int64 columns) and about 1 KiB of plan per row read
            # ahead (ChunkReader.batches). The chunks of a read-ahead block's
            # home chunks and of a window are wanted too, beside the sweep's planes.
            span = -(-ahead * self._batch_size * homes // max(n_rows, 1)) + self._chunk_window
            pass_bytes = (
                max(1, 2 * ahead - 2) * batch_bytes
                + n_rows * 8 * (3 + len(self._strategy.patch_size))
                + ahead * self._batch_size * 1024
                + span * max(s.chunk_bytes for s in stores)
            )
            choice = tile_choice(
                [s.chunk_grid for s in stores],
                [s.chunk_bytes for s in stores],
                max(0, self._reader.cache_limit - pass_bytes),
                n_shards=n_shards,
            )
            rank = (-choice.fits, choice.decodes, -ahead)
            if best is None or rank < best[0]:
                best = (rank, choice.tile, ahead)
        assert best is not None
        _, tile, ahead = best
        return tile, None if ahead == own else ahead

    @property
    def chunk_tile(self) -> tuple[int, ...] | None:
        """With ``order="chunks"``: chunks per tile along each spatial axis; else ``None``."""
        return self._chunk_tile

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next passes.

        Parameters
        ----------
        epoch : int
            The epoch, in ``[0, 2**32)``.
        """
        self._epoch = check.check_epoch(epoch)

    def __len__(self) -> int:
        if self._worker[1] > 1 or (self._order == "chunks" and self._options["world_size"] > 1):
            # The runs of whole tiles depend on the epoch's rows.
            rows = len(self._epoch_rows(self._epoch))
        else:
            rows = EpochOrder.shard(self._strategy.n_patches, **self._options).n_rows
        return -(-rows // self._batch_size)

    def _epoch_rows(self, epoch: int) -> PatchBatch:
        """Return this rank's and worker's rows of ``epoch`` (NumPy columns), in order."""
        worker_id, num_workers = self._worker
        if self._order == "shuffle":
            rows = self._strategy.sample_epoch(epoch, **self._options).to_numpy()
            n_rows = len(rows)
            part = slice(n_rows * worker_id // num_workers, n_rows * (worker_id + 1) // num_workers)
            return rows[part]
        assert self._reader is not None
        plain = self._strategy.sample_epoch(epoch).to_numpy()
        order = chunk_order(
            plain,
            [stack.chunks for stack in self._reader.stacks],
            seed=self._strategy.seed,
            epoch=epoch,
            window=self._chunk_window,
            tile=self._chunk_tile,
            rank=self._options["rank"],
            world_size=self._options["world_size"],
            drop_last=self._options["drop_last"],
            worker_id=worker_id,
            num_workers=num_workers,
        )
        return plain[order.rows]

    def __iter__(self) -> Iterator[tuple[Any, PatchBatch]]:
        if self._reader is not None:
            return self._store_batches(self._epoch)
        if self._on_device:
            return self._device_batches(self._epoch)
        return self._host_batches(self._epoch)

    # -- host stacks -----------------------------------------------------------

    def _host_batches(self, epoch: int) -> Iterator[tuple[Any, PatchBatch]]:
        rows = self._epoch_rows(epoch)
        buffers = _ReleasedBuffers()
        for start in range(0, len(rows), self._batch_size):
            batch = rows[start : start + self._batch_size]
            patches = buffers.take((len(batch), *self._row_shape), self._dtype)
            # The stacks were checked when the loader was built, and the rows
            # come from the strategy built for their shapes: in range by
            # construction, so extract_patches' checks are not repeated.
            columns = (batch.data_idx, batch.sample_idx, batch.coords)
            copy_patches(
                self._host_arrays, columns, batch.patch_size, patches, threads=self._threads
            )
            yield self._convert(patches), batch

    # -- chunked stores --------------------------------------------------------

    def _store_batches(self, epoch: int) -> Iterator[tuple[Any, PatchBatch]]:
        assert self._reader is not None
        rows = self._epoch_rows(epoch)
        for raw, batch in self._reader.batches(rows, self._batch_size, read_ahead=self._read_ahead):
            # A store in the other byte order: swap while copying (no copy otherwise).
            patches = raw.astype(native_dtype(raw.dtype), copy=False)
            if not self._device_output:
                yield self._convert(patches), batch
                continue
            uploaded = upload_batch(patches, self._stream)
            if self._as_torch:
                import torch

                uploaded = torch.from_dlpack(uploaded)
            yield uploaded, batch

    # -- device stacks ---------------------------------------------------------

    def _device_batches(self, epoch: int) -> Iterator[tuple[Any, PatchBatch]]:
        import cupy

        stream = self._stream if self._stream is not None else cupy.cuda.get_current_stream()
        self._wait_for_consumer(stream)
        with stream:
            rows = self._strategy.sample_epoch(epoch, **self._options)
        starts = list(range(0, len(rows), self._batch_size))
        pending = self._enqueue_crop(rows, starts[0], stream) if starts else None
        for k in range(len(starts)):
            ready = pending
            # Enqueue the next crop before handing this batch over, so that
            # the device prepares it while the consumer trains on this one
            # (after what the consumer has enqueued so far: batch k - 1).
            pending = None
            if k + 1 < len(starts):
                self._wait_for_consumer(stream)
                pending = self._enqueue_crop(rows, starts[k + 1], stream)
            assert ready is not None
            patches, batch, done = ready
            cupy.cuda.get_current_stream().wait_event(done)
            yield self._convert(patches), batch

    def _consumer_stream(self) -> Any:
        """Return the stream the batches are used on (PyTorch's with ``as_torch``, else CuPy's)."""
        import cupy

        if self._as_torch:
            import torch

            return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        return cupy.cuda.get_current_stream()

    def _wait_for_consumer(self, stream: Any) -> None:
        """Make ``stream`` wait for the work enqueued so far on the consumer's stream."""
        import cupy

        consumer = self._consumer_stream()
        if consumer.ptr == stream.ptr:
            return  # one stream: already in order
        enqueued = cupy.cuda.Event(disable_timing=True)
        enqueued.record(consumer)
        stream.wait_event(enqueued)

    def _enqueue_crop(
        self, rows: PatchBatch, start: int, stream: Any
    ) -> tuple[Any, PatchBatch, Any]:
        import cupy

        batch = rows[start : start + self._batch_size]
        with stream:
            # The rows come from the strategy built for these shapes, so they
            # are in range by construction: skip the row check (and its wait).
            patches = device_crop().extract(
                self._stacks,
                batch,
                batch.patch_size,
                len(batch),
                None,
                trusted_rows=True,
            )
            done = cupy.cuda.Event(disable_timing=True)
            done.record(stream)
        return patches, batch, done

    def _convert(self, patches: Any) -> Any:
        if not self._as_torch:
            return patches
        import torch

        if self._on_device:
            return torch.from_dlpack(patches)
        return torch.from_numpy(patches)
