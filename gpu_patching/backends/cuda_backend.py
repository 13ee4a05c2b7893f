"""The per-patch draw on a CUDA device: one kernel launch per epoch.

:class:`CudaBackend` launches ``sample_epoch`` (``kernels/sample_epoch.cu``),
the CUDA twin of :mod:`gpu_patching.backends.numpy_backend` (same integers,
bit for bit, same exceptions), through :mod:`gpu_patching.cuda`;
:func:`_launch_args` is the only place that gathers and checks the kernel's
values. Indices, the launch contract, outputs and the table upload:
``docs/design.md``, "The CUDA backend".
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import cuda
from ..kernels.descriptor import check_launch_array
from ..kernels.sample_epoch import SAMPLE_EPOCH
from ..permutation import EpochOrder
from ..tables import RegionTables
from .base import check_draw, check_indices

__all__ = [
    "OUTPUT_PARAMS",
    "CudaBackend",
    "pack_sample_table",
    "split_sample_table",
]

#: The output parameters of ``sample_epoch``, in order: the columns of a draw.
OUTPUT_PARAMS = ("data_idx", "sample_idx", "coords", "patch_index")

# The per-sample host arrays packed into one buffer, in this order.
_SAMPLE_ARRAYS = (
    "patch_offset",
    "n_patches",
    "mass_offset",
    "region_offset",
    "grid_shape",
    "spatial_shape",
    "patch_size",
    "stack_of_sample",
    "sample_in_stack",
)


def pack_sample_table(tables: RegionTables) -> NDArray[np.int64]:
    """Pack the per-sample host arrays of the tables into one int64 buffer.

    Parameters
    ----------
    tables : RegionTables
        Tables of any backend (their per-sample arrays are NumPy).

    Returns
    -------
    numpy.ndarray of int64
        ``patch_offset, n_patches, mass_offset, region_offset, grid_shape,
        spatial_shape, patch_size, stack_of_sample, sample_in_stack``,
        flattened and concatenated; see :func:`split_sample_table`.

    Raises
    ------
    ValueError
        If an array's length does not match the number of samples.
    """
    n_samples, ndim = tables.n_samples, tables.ndim
    parts = [
        np.asarray(getattr(tables, name), dtype=np.int64).reshape(-1) for name in _SAMPLE_ARRAYS
    ]
    lengths = _sample_lengths(n_samples, ndim)
    for name, part, length in zip(_SAMPLE_ARRAYS, parts, lengths, strict=True):
        if part.size != length:
            raise ValueError(
                f"tables.{name} has {part.size} values, expected {length} "
                f"for {n_samples} samples of {ndim} dimensions"
            )
    return np.concatenate(parts)


def split_sample_table(buffer: Any, n_samples: int, ndim: int) -> dict[str, Any]:
    """Return views of the arrays packed by :func:`pack_sample_table`.

    Parameters
    ----------
    buffer : numpy.ndarray or cupy.ndarray of int64
        A packed buffer, on the host or on the device.
    n_samples : int
        Number of samples.
    ndim : int
        Number of spatial dimensions.

    Returns
    -------
    dict of str to array
        One contiguous 1-D view of ``buffer`` per packed array.

    Raises
    ------
    ValueError
        If the buffer's length does not match ``n_samples`` and ``ndim``.
    """
    lengths = _sample_lengths(n_samples, ndim)
    if buffer.ndim != 1 or buffer.size != sum(lengths):
        raise ValueError(f"sample table has shape {buffer.shape}, expected ({sum(lengths)},)")
    views = {}
    start = 0
    for name, length in zip(_SAMPLE_ARRAYS, lengths, strict=True):
        views[name] = buffer[start : start + length]
        start += length
    return views


def _sample_lengths(n_samples: int, ndim: int) -> tuple[int, ...]:
    """Lengths of the packed per-sample arrays, in ``_SAMPLE_ARRAYS`` order."""
    s, d = n_samples, ndim
    return (s + 1, s, s + 1, s + 1, s * d, s * d, d, s, s)


def _launch_args(
    tables: RegionTables,
    sample_arrays: dict[str, Any],
    rows: EpochOrder | Any,
    draw_number: int,
    seed: int,
    outputs: tuple[Any, Any, Any, Any],
) -> tuple[Any, ...]:
    """Build the argument tuple of ``sample_epoch`` (:data:`SAMPLE_EPOCH`).

    :meth:`~gpu_patching.kernels.descriptor.Kernel.arguments` passes arrays
    through (CuPy passes an array as its device pointer), a missing array as a
    null pointer, and makes every scalar a NumPy scalar of the exact C width,
    which also rejects out-of-range values. The lengths of all arrays are
    checked here, because the kernel trusts them: with the lengths right, no
    table contents can make it read or write out of bounds. Works on NumPy
    arrays too, so the tests can call it without a GPU.

    ``rows`` is an :class:`~gpu_patching.permutation.EpochOrder` (no index
    array: the kernel computes each row's index) or a 1-D int64 index array
    (one row per index). ``outputs`` is ``(data_idx, sample_idx, coords,
    patch_index)`` (:data:`OUTPUT_PARAMS`): int64 arrays of ``n_rows``,
    ``n_rows``, ``n_rows * ndim`` and ``n_rows`` values.
    """
    if isinstance(rows, EpochOrder):
        indices = None
        order = rows
        n_rows = order.n_rows
    else:
        indices = rows
        # Unused by the kernel when it reads indices; zeros for clarity.
        order = EpochOrder(0, 0, int(indices.size), 0, False)
        n_rows = int(indices.size)
    n_samples, ndim = tables.n_samples, tables.ndim
    n_regions = int(tables.mass_prefix.size)
    if ndim not in (2, 3):
        raise ValueError(f"the kernels support 2 or 3 spatial dimensions, got {ndim}")
    lengths = dict(zip(_SAMPLE_ARRAYS, _sample_lengths(n_samples, ndim), strict=True))
    for name, length in lengths.items():
        check_launch_array(name, sample_arrays[name], length, np.int64)
    check_launch_array("mass_prefix", tables.mass_prefix, n_regions, np.int64)
    check_launch_array("weight", tables.weight, n_regions, np.int64)
    check_launch_array("subbox_mask", tables.subbox_mask, n_regions, np.uint8)
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if indices is not None:
        check_launch_array("indices", indices, n_rows, np.int64)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    if len(outputs) != len(OUTPUT_PARAMS):
        raise ValueError(f"expected {len(OUTPUT_PARAMS)} output arrays, got {len(outputs)}")
    output_values = dict(zip(OUTPUT_PARAMS, outputs, strict=True))
    for name, array in output_values.items():
        check_launch_array(name, array, n_rows * ndim if name == "coords" else n_rows, np.int64)

    values = {
        **sample_arrays,
        "mass_prefix": tables.mass_prefix,
        "weight": tables.weight,
        "subbox_mask": tables.subbox_mask,
        "n_samples": n_samples,
        "n_regions": n_regions,
        "ndim": ndim,
        "indices": indices,
        "first_position": order.first_position,
        "position_step": order.position_step,
        "n_positions": order.n_positions,
        "shuffle": int(order.shuffle),
        "n_rows": n_rows,
        "draw_number": draw_number,
        "seed": seed,
        **output_values,
    }
    return SAMPLE_EPOCH.arguments(values)


class CudaBackend(cuda.Launcher):
    """The CUDA backend: CuPy tables on the current device and one launch per draw.

    Constructed as :class:`gpu_patching.cuda.Launcher`; its ``launch_count``
    counts draws that launched.
    """

    name = "cuda"

    def __init__(self, xp: Any = None, functions: cuda.KernelFunctions | None = None) -> None:
        super().__init__(xp, functions)
        # (device id, stream) -> (tables, version): the packed per-sample arrays
        self._uploads = cuda.UploadCache(self.xp.asarray)

    def draw(
        self,
        tables: RegionTables,
        indices: Any,
        draw_number: int,
        seed: int,
    ) -> tuple[Any, Any, Any, Any]:
        """Draw the patches of the given global patch indices, in one launch.

        The kernel writes every returned array itself: apart from the launch,
        this makes only allocations (``xp.empty``) and, when the per-sample
        arrays changed, one host-to-device copy.

        Parameters
        ----------
        tables : RegionTables
            The sampler's tables, built with ``xp``.
        indices : EpochOrder, range or array of int
            Which global patch index each row draws, each in
            ``[0, tables.total_patches)``: an
            :class:`~gpu_patching.permutation.EpochOrder` (a shuffled or
            sharded epoch), a ``range`` with step 1 (an epoch is
            ``range(n_patches)``), or a 1-D integer array (NumPy or CuPy).
        draw_number : int
            The draw number, in ``[0, 2**32)``.
        seed : int
            The 64-bit seed, in ``[0, 2**64)``.

        Returns
        -------
        data_idx : cupy.ndarray of int64, shape (N,)
            Stack of each patch.
        sample_idx : cupy.ndarray of int64, shape (N,)
            Sample (within its stack) of each patch.
        coords : cupy.ndarray of int64, shape (N, d)
            Patch corners.
        indices : cupy.ndarray of int64, shape (N,)
            Global patch index of each row, written by the kernel.

        Raises
        ------
        IndexError
            If an index is outside ``[0, tables.total_patches)``.
        TypeError
            If an index array does not hold integers.
        ValueError
            If a range has a step other than 1, an index array is not 1-D, or
            ``draw_number`` / ``seed`` is out of range.
        """
        xp = self.xp
        draw_number, seed = check_draw(draw_number, seed)
        rows = self._rows(tables, indices)
        n_rows = rows.n_rows if isinstance(rows, EpochOrder) else int(rows.size)
        # xp.empty only allocates (from the memory pool): no kernel runs.
        outputs = (
            xp.empty(n_rows, dtype=xp.int64),
            xp.empty(n_rows, dtype=xp.int64),
            xp.empty((n_rows, tables.ndim), dtype=xp.int64),
            xp.empty(n_rows, dtype=xp.int64),
        )
        if n_rows == 0:
            # Nothing to write; a launch of no rows would only cost time.
            return outputs
        sample_arrays = split_sample_table(
            self._sample_table(tables), tables.n_samples, tables.ndim
        )
        args = _launch_args(tables, sample_arrays, rows, draw_number, seed, outputs)
        blocks, threads = cuda.launch_grid(n_rows)
        cuda.launch(self.functions, SAMPLE_EPOCH, self._device_id(), (blocks,), (threads,), args)
        self.launch_count += 1
        return outputs

    def _rows(self, tables: RegionTables, indices: Any) -> Any:
        """Return the checked order, or the checked device index array, of ``indices``."""
        if isinstance(indices, range):
            if len(indices) > 1 and indices.step != 1:
                raise ValueError(f"a range of indices must have step 1, got {indices}")
            indices = EpochOrder.contiguous(indices.start, indices.stop)
        if isinstance(indices, EpochOrder):
            indices.check_within(tables.total_patches)
            return indices
        array = self.xp.asarray(indices)
        if array.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {array.shape}")
        if array.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {array.dtype}")
        check_indices(self.xp, array, tables.total_patches)
        return self.xp.ascontiguousarray(array, dtype=self.xp.int64)

    def _sample_table(self, tables: RegionTables) -> Any:
        """Return the packed per-sample arrays on the current device and stream.

        Reused while the tables object and its
        :attr:`~gpu_patching.tables.RegionTables.version` are unchanged, so
        an epoch of unchanged tables neither packs nor copies anything.
        """
        token = (weakref.ref(tables), tables.version)
        return self._uploads.get(
            (self._device_id(), self._stream_id()),
            token,
            lambda cached, new: cached[0]() is tables and cached[1] == new[1],
            lambda: pack_sample_table(tables),
        )

    def _device_id(self) -> int:
        """Return the id of the current CUDA device."""
        return cuda.current_device_id(self.xp)

    def _stream_id(self) -> int:
        """Return the handle of the current CUDA stream."""
        return cuda.current_stream_key(self.xp)
