"""Cut the patches of a batch out of image stacks: :func:`extract_patches`.

The last stage of the data flow (corners -> crops). The work happens where the
stacks live: host stacks by :func:`copy_patches` (one copy per patch, from a
window view into its row), device stacks by one launch of the crop kernel
(:class:`DeviceCrop`; the kernel and its arguments are in
:mod:`gpu_patching.kernels.crop_patches`), chunked stores by a
:class:`~gpu_patching.stores.ChunkReader`. Every check runs before any work.
``docs/design.md`` (section 7) explains the paths, the checks and the launch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from . import cuda
from ._row_threads import check_threads, copy_threads, run_split
from .arrays import has_cuda_dlpack, is_device_array, to_host
from .crop_checks import (
    as_stack_list,
    check_batch,
    check_host_out,
    check_host_rows,
    check_out_metadata,
    check_stacks,
    native_dtype,
    raise_for_row,
    rows_to_host,
)
from .cuda import BackendUnavailableError
from .kernels.crop_patches import (
    CHECK_CROP_ROWS,
    ELEMENT_C_TYPES,
    STACK_FIELDS,
    CropLaunch,
    check_launch_args,
    crop_kernel,
    crop_launch,
    crop_launch_args,
    stack_table,
)
from .specs import PatchBatch
from .stores import ChunkReader, as_chunked_stack, is_chunked_stack

__all__ = [
    "STACK_FIELDS",
    "CropLaunch",
    "DeviceCrop",
    "check_launch_args",
    "check_stacks",
    "copy_patches",
    "crop_launch",
    "crop_launch_args",
    "device_crop",
    "extract_patches",
    "native_dtype",
    "stack_table",
]


# -- the public call ---------------------------------------------------------------------


def extract_patches(
    stacks: Sequence[Any], batch: PatchBatch, *, out: Any = None, threads: int | None = None
) -> Any:
    """Cut every patch of a batch out of the stacks, as one array.

    Parameters
    ----------
    stacks : sequence of arrays
        One array per stack, shaped like the sampler's ``data_shapes``: axes
        ``SC(Z)YX``, the same channel count and dtype for all (in either byte
        order). A stack smaller than the patch is accepted (the sampler gives
        it no patches), but no row may name it. Either all on the host (NumPy
        arrays, or anything ``numpy.asarray`` accepts) or all on one CUDA device (CuPy
        arrays, or arrays with ``__cuda_array_interface__`` or DLPack such as
        PyTorch CUDA tensors, read in place through their strides), or all
        chunked stores (zarr arrays with axes ``SC(Z)YX``, or stacks from
        :func:`gpu_patching.stores.open_stack`): each chunk the batch touches
        is read once, concurrently, and nothing reads a whole stack.
    batch : PatchBatch
        The patches: ``data_idx``, ``sample_idx`` and ``coords`` (NumPy or
        CuPy arrays of integers) and ``patch_size``.
    out : array, optional
        Where to write the patches: C-contiguous, of shape
        ``(len(batch), C, *patch_size)`` and the stacks' dtype (on the host, in
        either byte order), on the host for
        host stacks and on the stacks' device for device stacks, sharing no
        memory with any stack. It is returned. The crop is enqueued on CuPy's
        current stream; an ``out`` from another library (a PyTorch tensor)
        is written after that library's pending work, but reading it on
        another stream needs ordering by the caller (e.g.
        ``torch.cuda.current_stream().wait_stream(...)`` or a synchronize).
    threads : int, optional
        Host stacks only: threads that copy the rows, each a contiguous run
        (NumPy releases the GIL while copying). ``None`` (default): automatic,
        one per usable core (at most 4) for batches of large patches (rows of
        at least 64 KiB, at least 8 MiB in all), else the calling thread
        alone, and always alone inside a PyTorch DataLoader worker. ``1``: the
        calling thread alone; another count is taken as given (at most one
        thread per row, and 64 in all). The result is the same for every count.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        ``out`` when given; otherwise a new C-contiguous array of shape
        ``(len(batch), C, *patch_size)`` and the stacks' dtype in native byte
        order (a big-endian ``>u2`` stack gives ``uint16`` patches on x86 or
        ARM, with the same values), NumPy for host stacks and CuPy for device
        stacks. It never shares memory with a stack. Row ``k`` equals
        ``stacks[d][s, :, z:z+pz, y:y+py, x:x+px]`` for
        ``d = batch.data_idx[k]``, ``s = batch.sample_idx[k]`` and
        ``(z,) y, x = batch.coords[k]``.

    Raises
    ------
    TypeError
        If ``batch`` is not a ``PatchBatch``, its arrays are not integers,
        ``threads`` is not an integer, ``stacks`` is not a sequence, the
        stacks mix host and device arrays or dtypes, a device stack's dtype
        is not 1, 2, 4 or 8 bytes of bool, integer or float, or ``out`` has
        the wrong type or dtype.
    ValueError
        If ``threads`` is below 1; if a stack has the wrong number of axes, an
        empty axis or another channel count; if a corner leaves ``[0, D - P]``
        (no corner does in a stack smaller than the patch); if the batch's
        arrays have inconsistent shapes; if the arrays are on different
        devices, a device array is misaligned for its dtype; or if ``out`` has
        the wrong shape, is not C-contiguous, is read-only or overlaps a stack.
    IndexError
        If a row's ``data_idx`` or ``sample_idx`` is out of range.

    Notes
    -----
    Every check runs before any work, so a rejected call writes nothing (not
    even into ``out``). On the device, one crop kernel runs per call; rows
    that live on the device are first checked by one small kernel and one
    scalar copy back (see the module docstring). Stacks that do not fit on the
    device stay on the host or in a chunked store (see the module docstring).
    """
    n_threads = check_threads(threads)
    patch_size, n_rows = check_batch(batch)
    stack_list = as_stack_list(stacks)
    if any(is_chunked_stack(stack) for stack in stack_list):
        return _extract_host(stack_list, batch, patch_size, n_rows, out, chunked=True)
    on_device = [is_device_array(stack) for stack in stack_list]
    if any(on_device) and not all(on_device):
        host = on_device.index(False)
        device = on_device.index(True)
        raise TypeError(
            f"stacks must all be host arrays or all be device arrays: stacks[{device}] "
            f"is a device array ({type(stack_list[device]).__name__}) and stacks[{host}] "
            f"is not ({type(stack_list[host]).__name__})"
        )
    if all(on_device):
        return device_crop().extract(stack_list, batch, patch_size, n_rows, out)
    return _extract_host(
        stack_list, batch, patch_size, n_rows, out, chunked=False, threads=n_threads
    )


# -- the host paths: NumPy arrays and chunked stores ----------------------------------------


def _extract_host(
    stacks: list[Any],
    batch: PatchBatch,
    patch_size: tuple[int, ...],
    n_rows: int,
    out: Any,
    *,
    chunked: bool,
    threads: int | None = None,
) -> NDArray[Any]:
    """``extract_patches`` for host stacks, or for chunked stores (see :mod:`.stores`).

    Both run the same checks; host arrays are copied patch by patch straight
    into their rows, chunked stores read each chunk the batch touches once.
    """
    if chunked:
        sources: list[Any] = [as_chunked_stack(s, f"stacks[{k}]") for k, s in enumerate(stacks)]
        shapes = [stack.shape for stack in sources]
    else:
        sources = [np.asarray(stack) for stack in stacks]
        shapes = [tuple(int(s) for s in array.shape) for array in sources]
    n_channels, dtype = check_stacks(shapes, [source.dtype for source in sources], patch_size)
    result_shape = (n_rows, n_channels, *patch_size)
    if out is not None:
        # A chunked store cannot share memory with out: nothing to compare.
        check_host_out(out, result_shape, dtype, [] if chunked else sources)
    rows = rows_to_host(batch)
    check_host_rows(rows, shapes, patch_size, batch)
    if not chunked:
        target = np.empty(result_shape, dtype=dtype) if out is None else out
        copy_patches(sources, rows, patch_size, target, threads=threads)
        return target
    # Each chunk the batch touches is read once, all at once (a one-shot call
    # holds the chunks it reads); no cache outlives the call.
    patches = ChunkReader(sources, cache_bytes=0, memory="call").read(rows, patch_size)
    if out is None:
        # No copy when the store's dtype is already in native byte order.
        return patches.astype(dtype, copy=False)
    out[...] = patches  # only a complete batch reaches out
    return out


def copy_patches(
    stacks: Sequence[NDArray[Any]],
    rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
    patch_size: tuple[int, ...],
    target: NDArray[Any],
    *,
    threads: int | None = None,
) -> None:
    """Copy the patch of every row into ``target[row]``: the one host crop path.

    It trusts its inputs: :func:`extract_patches` checks them first, and
    :class:`~gpu_patching.PatchLoader` passes rows its sampler drew for these
    stacks into buffers of its own.

    Parameters
    ----------
    stacks : sequence of numpy.ndarray
        The ``SC(Z)YX`` stacks.
    rows : tuple of numpy.ndarray of int64
        ``(data_idx, sample_idx, coords)``, every row already checked in range.
    patch_size : tuple of int
        ``(PY, PX)`` or ``(PZ, PY, PX)``.
    target : numpy.ndarray
        Of shape ``(len(rows[0]), C, *patch_size)``; converted to its dtype
        (a stack in the other byte order is swapped while copied).
    threads : int or None, default None
        Threads that copy contiguous runs of rows (checked by the caller):
        ``None`` for automatic (several only for large patches and batches,
        none beside the calling thread in a DataLoader worker), ``1`` for the
        calling thread alone. The rows are disjoint, so the result is the
        same whatever the count.
    """
    data_idx, sample_idx, coords = rows
    n_rows = len(data_idx)
    spatial_axes = tuple(range(2, 2 + len(patch_size)))
    # windows[s, :, z, y, x] is the patch of corner (z, y, x) as a view, so a
    # row costs one basic index and one copy into place: no index arrays and
    # no temporary, which NumPy's fancy indexing (it has no out=) would need.
    # Built only for the stacks the rows name (a stack smaller than the patch
    # has no windows, and no checked row names it), before any thread starts:
    # the runs only read them.
    stack_list, sample_list, corner_list = data_idx.tolist(), sample_idx.tolist(), coords.tolist()
    used = set(stack_list)
    windows: list[Any] = [
        sliding_window_view(stacks[k], patch_size, axis=spatial_axes) if k in used else None
        for k in range(len(stacks))
    ]
    every_channel = slice(None)

    def copy_run(start: int, stop: int) -> None:
        runs = zip(
            range(start, stop),
            stack_list[start:stop],
            sample_list[start:stop],
            corner_list[start:stop],
            strict=True,
        )
        # The corner unpacked in the index itself, not through a tuple built
        # per row: a few percent of a batch of small patches.
        if len(patch_size) == 2:
            for row, stack, sample, (y, x) in runs:
                target[row] = windows[stack][sample, every_channel, y, x]
        else:
            for row, stack, sample, (z, y, x) in runs:
                target[row] = windows[stack][sample, every_channel, z, y, x]

    row_bytes = target[0].nbytes if n_rows else 0
    run_split(copy_run, n_rows, copy_threads(threads, n_rows, row_bytes))


# -- the CUDA path --------------------------------------------------------------------------


def _supports_device_dtype(dtype: np.dtype[Any]) -> bool:
    return dtype.kind in "biufc" and dtype.itemsize in ELEMENT_C_TYPES


def _byte_extent(
    address: int, shape: Sequence[int], byte_strides: Sequence[int], itemsize: int
) -> tuple[int, int]:
    """``[low, high)`` byte range an array's elements occupy."""
    low = address + sum((n - 1) * s for n, s in zip(shape, byte_strides, strict=True) if s < 0)
    high = address + sum((n - 1) * s for n, s in zip(shape, byte_strides, strict=True) if s > 0)
    return low, high + itemsize


class DeviceCrop(cuda.Launcher):
    """The CUDA path of :func:`extract_patches`: one crop launch per call.

    Constructed as :class:`gpu_patching.cuda.Launcher`; its ``launch_count``
    counts crop launches.

    Attributes
    ----------
    check_count : int
        Row-check kernel launches made (for tests).
    """

    def __init__(self, xp: Any = None, functions: cuda.KernelFunctions | None = None) -> None:
        super().__init__(xp, functions)
        self.check_count = 0
        # (device id, stream) -> (host stack table, its device copy)
        self._tables = cuda.UploadCache(self.xp.asarray)

    # The few places that differ between CuPy and the host tests' NumPy stand-in.

    def as_device_array(self, value: Any) -> Any:
        """Wrap a device array as an ``xp`` array without copying it."""
        xp = self.xp
        if isinstance(value, xp.ndarray):
            return value
        try:
            # DLPack first: the producer orders its stream before ours.
            if has_cuda_dlpack(value):
                return xp.from_dlpack(value)
            return xp.asarray(value)
        except NotImplementedError as error:  # CuPy: a dtype it lacks, e.g. bfloat16
            raise TypeError(
                f"device stacks of dtype {getattr(value, 'dtype', '?')} are not supported: "
                f"the crop kernel copies bool, integer, float or complex elements ({error})"
            ) from None

    def is_device_array(self, value: Any) -> bool:
        """Whether ``value`` is a device array this class can wrap."""
        return is_device_array(value)

    def rows_on_device(self, columns: list[Any]) -> bool:
        """Whether the batch's rows live on the device (then a kernel checks them)."""
        return any(self.is_device_array(column) for column in columns)

    def address(self, array: Any) -> int:
        """Address of element ``(0, ...)`` of an ``xp`` array."""
        return int(array.data.ptr)

    def device_id(self, array: Any) -> int:
        """Return the id of the device an ``xp`` array lives on."""
        return int(array.device.id)

    def on_device(self, device_id: int) -> Any:
        """Return a context manager that makes ``device_id`` current."""
        return self.xp.cuda.Device(device_id)

    def stream_key(self) -> int:
        """Return the current stream (device copies are only reused on their stream)."""
        return cuda.current_stream_key(self.xp)

    # The path itself.

    def extract(
        self,
        stacks: list[Any],
        batch: PatchBatch,
        patch_size: tuple[int, ...],
        n_rows: int,
        out: Any,
        *,
        trusted_rows: bool = False,
    ) -> Any:
        """Validate everything, then crop every row in one launch.

        Parameters
        ----------
        stacks : list of device arrays
            The stacks (wrapped here without copies).
        batch : PatchBatch
            The rows; NumPy or ``xp`` arrays.
        patch_size : tuple of int
            ``batch.patch_size``, checked.
        n_rows : int
            ``len(batch)``.
        out : device array or None
            The caller's buffer.
        trusted_rows : bool, default False
            Skip the row check of device rows (the check kernel and its copy
            back, which waits for the stream). Only for callers whose rows are
            in range by construction, such as the epochs of a sampler built
            with these stacks' shapes; the crop kernel still clamps every read
            into its stack.

        Returns
        -------
        array
            ``out`` itself when given, else a new ``xp`` array.
        """
        xp = self.xp
        arrays = [self.as_device_array(stack) for stack in stacks]
        shapes = [tuple(int(s) for s in array.shape) for array in arrays]
        dtypes = [np.dtype(array.dtype) for array in arrays]
        n_channels, dtype = check_stacks(shapes, dtypes, patch_size)
        if not _supports_device_dtype(dtype):
            raise TypeError(
                f"device stacks of dtype {dtype} are not supported: the crop kernel "
                f"copies bool, integer, float or complex elements of 1, 2, 4 or 8 bytes"
            )
        device_id = self._common_device(arrays)
        addresses = [self.address(array) for array in arrays]
        element_strides = [
            self._element_strides(f"stacks[{k}]", array, address)
            for k, (array, address) in enumerate(zip(arrays, addresses, strict=True))
        ]
        result_shape = (n_rows, n_channels, *patch_size)
        target = None
        if out is not None:
            target = self._check_out(out, result_shape, dtype, device_id, arrays, addresses)
        columns = {"data_idx": batch.data_idx, "sample_idx": batch.sample_idx}
        columns["coords"] = batch.coords
        if self.rows_on_device(list(columns.values())):
            for name, column in columns.items():
                if self.is_device_array(column):
                    column_device = self.device_id(self.as_device_array(column))
                    if column_device != device_id:
                        raise ValueError(
                            f"batch.{name} is on device {column_device}, the stacks on "
                            f"device {device_id}"
                        )
            host_rows = None
        else:
            # Host rows are checked here, with no device work.
            host_rows = rows_to_host(batch)
            check_host_rows(host_rows, shapes, patch_size, batch)

        with self.on_device(device_id):
            if n_rows == 0:
                return out if out is not None else xp.empty(result_shape, dtype=dtype)
            table = self._device_table(device_id, stack_table(addresses, shapes, element_strides))
            if host_rows is None:
                # Already C-contiguous int64 for a sampler's batch: then no copy.
                rows = tuple(
                    xp.ascontiguousarray(self.as_device_array(column), dtype=xp.int64).reshape(-1)
                    for column in columns.values()
                )
                if not trusted_rows:
                    self._check_device_rows(
                        device_id, table, rows, n_rows, shapes, patch_size, batch
                    )
            else:
                rows = self._upload_rows(host_rows, n_rows)
            if target is None:
                # xp.empty only allocates (from the memory pool): no kernel runs.
                target = xp.empty(result_shape, dtype=dtype)
            args = crop_launch_args(table, rows, n_rows, n_channels, patch_size, target)
            launch = crop_launch(n_rows, n_channels, patch_size)
            kernel = crop_kernel(dtype.itemsize)
            cuda.launch(self.functions, kernel, device_id, launch.grid, launch.block, args)
            self.launch_count += 1
        return out if out is not None else target

    def _common_device(self, arrays: list[Any]) -> int:
        device_ids = [self.device_id(array) for array in arrays]
        for k, device_id in enumerate(device_ids):
            if device_id != device_ids[0]:
                raise ValueError(
                    f"every stack must be on one device: stacks[0] is on device "
                    f"{device_ids[0]}, stacks[{k}] on device {device_id}"
                )
        return device_ids[0]

    @staticmethod
    def _element_strides(name: str, array: Any, address: int) -> tuple[int, ...]:
        """Strides in elements; misaligned arrays would fault in the kernel's typed loads."""
        itemsize = np.dtype(array.dtype).itemsize
        strides = tuple(int(s) for s in array.strides)
        if address % itemsize or any(s % itemsize for s in strides):
            raise ValueError(
                f"{name} is not aligned to its {itemsize}-byte elements (address "
                f"{address:#x}, strides {strides}); pass an aligned copy"
            )
        return tuple(s // itemsize for s in strides)

    def _check_out(
        self,
        out: Any,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        device_id: int,
        stacks: list[Any],
        addresses: list[int],
    ) -> Any:
        """Check a caller's ``out`` for device stacks; return it as an ``xp`` array."""
        if not self.is_device_array(out):
            raise TypeError(
                f"out must be a device array on the stacks' device, got {type(out).__name__}"
            )
        target = self.as_device_array(out)
        check_out_metadata(target, shape, dtype)
        if self.device_id(target) != device_id:
            raise ValueError(
                f"out is on device {self.device_id(target)}, the stacks on device {device_id}"
            )
        out_address = self.address(target)
        self._element_strides("out", target, out_address)
        low, high = _byte_extent(out_address, target.shape, target.strides, dtype.itemsize)
        for k, (stack, address) in enumerate(zip(stacks, addresses, strict=True)):
            stack_low, stack_high = _byte_extent(
                address, stack.shape, stack.strides, dtype.itemsize
            )
            if low < stack_high and stack_low < high:
                raise ValueError(f"out shares memory with stacks[{k}]; give a separate buffer")
        return target

    def _device_table(self, device_id: int, host: NDArray[np.int64]) -> Any:
        """Return the stack table on the device: one small copy, reused while unchanged."""
        return self._tables.get((device_id, self.stream_key()), host, np.array_equal, lambda: host)

    def _upload_rows(
        self, host_rows: tuple[NDArray[np.int64], ...], n_rows: int
    ) -> tuple[Any, Any, Any]:
        """Host rows in one int64 buffer, uploaded in one copy; views of it per column."""
        packed = np.concatenate([np.ascontiguousarray(part).reshape(-1) for part in host_rows])
        uploaded = self.xp.asarray(packed)
        return (
            uploaded[:n_rows],
            uploaded[n_rows : 2 * n_rows],
            uploaded[2 * n_rows :],
        )

    def _check_device_rows(
        self,
        device_id: int,
        table: Any,
        rows: tuple[Any, ...],
        n_rows: int,
        shapes: Sequence[tuple[int, ...]],
        patch_size: tuple[int, ...],
        batch: PatchBatch,
    ) -> None:
        """One check launch and one 8-byte copy back; raise for the first bad row."""
        first_bad = self.xp.asarray(np.array([n_rows], dtype=np.int64))
        args = check_launch_args(table, (rows[0], rows[1], rows[2]), n_rows, patch_size, first_bad)
        blocks, threads = cuda.launch_grid(n_rows)
        cuda.launch(self.functions, CHECK_CROP_ROWS, device_id, (blocks,), (threads,), args)
        self.check_count += 1
        row = int(to_host(first_bad)[0])
        if row < n_rows:
            raise_for_row(row, batch, shapes, patch_size)


# The DeviceCrop of extract_patches (created on first use: it imports CuPy).
_DEVICE_CROPS: list[DeviceCrop] = []


def device_crop() -> DeviceCrop:
    """Return the process's :class:`DeviceCrop` (CuPy), created on first use.

    Returns
    -------
    DeviceCrop
        The one that :func:`extract_patches` and
        :class:`~gpu_patching.PatchLoader` launch through.

    Raises
    ------
    BackendUnavailableError
        If CuPy is not installed.
    """
    if not _DEVICE_CROPS:
        try:
            _DEVICE_CROPS.append(DeviceCrop())
        except ImportError as error:
            raise BackendUnavailableError(
                "the stacks are CUDA arrays, but CuPy is not installed to crop them on the "
                "device: pip install 'gpu-patching[cuda12]' (or move the stacks to the host)"
            ) from error
    return _DEVICE_CROPS[0]
