"""``crop_patches<T>`` and ``check_crop_rows`` (``crop_patches.cu``): descriptors and arguments.

The stack table, the argument tuples and the launch configuration of the crop
kernels; :class:`gpu_patching.crop.DeviceCrop` launches them. Pure functions
over NumPy or CuPy arrays, so the tests run them without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .descriptor import MAX_GRID_X, MAX_GRID_Y, Kernel, check_launch_array

__all__ = [
    "CHECK_CROP_ROWS",
    "CROP_LINES_PER_THREAD",
    "CROP_THREADS_PER_BLOCK",
    "ELEMENT_C_TYPES",
    "STACK_FIELDS",
    "CropLaunch",
    "check_launch_args",
    "crop_kernel",
    "crop_launch",
    "crop_launch_args",
    "stack_table",
]

#: Threads per block of the crop kernel (at most; a narrow patch uses fewer).
CROP_THREADS_PER_BLOCK = 256
#: Lines of a patch each crop thread copies per chunk (``CROP_LINES_PER_THREAD``
#: in ``crop.cuh``; a host test compares them).
CROP_LINES_PER_THREAD = 8

#: The unsigned C type the crop kernel copies, per element size in bytes: the
#: kernel copies bits, so every dtype of a size shares one instantiation.
ELEMENT_C_TYPES: dict[int, str] = {
    1: "unsigned char",
    2: "unsigned short",
    4: "unsigned int",
    8: "unsigned long long",
}


#: ``check_crop_rows`` (``kernels/crop_patches.cu``): the first row whose
#: patch leaves its stack, through ``atomicMin`` on ``first_bad``.
CHECK_CROP_ROWS = Kernel.from_source("crop_patches.cu", "check_crop_rows")


def crop_kernel(itemsize: int) -> Kernel:
    """Return the crop kernel's instantiation for an element size.

    Parameters
    ----------
    itemsize : int
        Element size in bytes: 1, 2, 4 or 8.

    Returns
    -------
    Kernel
        ``crop_patches<T>`` with ``T`` the unsigned type of that size; only
        the type of ``out`` depends on the size.

    Raises
    ------
    ValueError
        For any other size.
    """
    try:
        element = ELEMENT_C_TYPES[itemsize]
    except (KeyError, TypeError):
        raise ValueError(
            f"the crop kernel copies elements of 1, 2, 4 or 8 bytes, not {itemsize!r}"
        ) from None
    return Kernel.from_source("crop_patches.cu", f"crop_patches<{element}>")


#: ``long long`` values per stack in the stack table: address, 5 sizes, 5 strides.
STACK_FIELDS = 11


@dataclass(frozen=True)
class CropLaunch:
    """The launch configuration of the crop kernel.

    Attributes
    ----------
    grid : tuple of int
        ``(rows, chunks)``: blocks along the batch rows and along the chunks
        of ``blockDim.y * CROP_LINES_PER_THREAD`` lines of a patch.
    block : tuple of int
        ``(threads along x, threads along lines)``.
    """

    grid: tuple[int, int]
    block: tuple[int, int]


def crop_launch(n_rows: int, n_channels: int, patch_size: Sequence[int]) -> CropLaunch:
    """Return the launch configuration of the crop kernel for a batch.

    Threads along X cover a patch row (``patch_x`` rounded up to a warp, at
    most :data:`CROP_THREADS_PER_BLOCK`), the rest of the block takes that
    many lines at once. Each block copies one chunk of one row's lines; beyond
    CUDA's grid limits the kernel's grid-stride loops give a block several, so
    every element is covered exactly once for any result.

    Parameters
    ----------
    n_rows : int
        Rows of the batch, ``>= 0``.
    n_channels : int
        Channels, ``>= 1``.
    patch_size : sequence of int
        ``(PY, PX)`` or ``(PZ, PY, PX)``, every size ``>= 1``.

    Returns
    -------
    CropLaunch
        At least one block of at least one thread.

    Raises
    ------
    ValueError
        If a size is out of range.
    """
    patch = tuple(int(size) for size in patch_size)
    if n_rows < 0 or n_channels < 1:
        raise ValueError(f"need n_rows >= 0 and n_channels >= 1, got {n_rows}, {n_channels}")
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ValueError(f"patch_size must be 2 or 3 sizes >= 1, got {tuple(patch_size)}")
    width = patch[-1]
    lines_per_patch = n_channels * math.prod(patch[:-1])
    threads_x = min(CROP_THREADS_PER_BLOCK, 32 * math.ceil(width / 32))
    threads_y = max(1, min(CROP_THREADS_PER_BLOCK // threads_x, lines_per_patch))
    lines_per_chunk = threads_y * CROP_LINES_PER_THREAD
    grid = (
        min(max(1, n_rows), MAX_GRID_X),
        min(math.ceil(lines_per_patch / lines_per_chunk), MAX_GRID_Y),
    )
    return CropLaunch(grid=grid, block=(threads_x, threads_y))


def stack_table(
    addresses: Sequence[int],
    shapes: Sequence[Sequence[int]],
    element_strides: Sequence[Sequence[int]],
) -> NDArray[np.int64]:
    """Return the stack table the crop kernels read: one row of 11 int64 per stack.

    Parameters
    ----------
    addresses : sequence of int
        Address of element ``(0, 0, ...)`` of each stack.
    shapes : sequence of tuple of int
        ``SC(Z)YX`` shape of each stack, every size ``>= 1``.
    element_strides : sequence of tuple of int
        Strides of each stack, in elements (negative allowed).

    Returns
    -------
    numpy.ndarray of int64, shape (n_stacks, 11)
        ``address, S, C, Z, Y, X, stride_S, stride_C, stride_Z, stride_Y,
        stride_X`` per stack; a 2D stack gets ``Z = 1`` and ``stride_Z = 0``.

    Raises
    ------
    ValueError
        If the lengths disagree, a stack has an empty axis, or it has neither
        4 nor 5 axes.
    """
    if not len(addresses) == len(shapes) == len(element_strides):
        raise ValueError("addresses, shapes and element_strides must have one entry per stack")
    table = np.empty((len(shapes), STACK_FIELDS), dtype=np.int64)
    for k, (address, shape, strides) in enumerate(
        zip(addresses, shapes, element_strides, strict=True)
    ):
        shape = tuple(int(s) for s in shape)
        strides = tuple(int(s) for s in strides)
        if len(shape) not in (4, 5) or len(strides) != len(shape):
            raise ValueError(
                f"stack {k}: expected 4 or 5 sizes and strides, got {shape}, {strides}"
            )
        if min(shape) < 1:
            raise ValueError(f"stack {k} has an empty axis: {shape}")
        if len(shape) == 4:  # 2D: one z-slice, never stepped over
            shape = (*shape[:2], 1, *shape[2:])
            strides = (*strides[:2], 0, *strides[2:])
        # Addresses above 2**63 are stored as their two's complement.
        table[k, 0] = np.uint64(address).view(np.int64)
        table[k, 1:6] = shape
        table[k, 6:11] = strides
    return table


def _row_values(
    table: Any,
    rows: tuple[Any, Any, Any],
    n_rows: int,
    patch_size: Sequence[int],
) -> dict[str, Any]:
    """Check the arrays shared by both kernels and return their parameter values."""
    ndim = len(patch_size)
    if ndim not in (2, 3):
        raise ValueError(f"the crop kernels support 2 or 3 spatial dimensions, got {ndim}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if table.ndim != 2 or table.shape[1] != STACK_FIELDS or table.shape[0] < 1:
        raise ValueError(f"stack_table must have shape (n_stacks >= 1, {STACK_FIELDS})")
    n_stacks = int(table.shape[0])
    check_launch_array("stack_table", table, n_stacks * STACK_FIELDS)
    data_idx, sample_idx, coords = rows
    check_launch_array("data_idx", data_idx, n_rows)
    check_launch_array("sample_idx", sample_idx, n_rows)
    check_launch_array("coords", coords, n_rows * ndim)
    patch_z = patch_size[0] if ndim == 3 else 1
    return {
        "stack_table": table,
        "n_stacks": n_stacks,
        "data_idx": data_idx,
        "sample_idx": sample_idx,
        "coords": coords,
        "ndim": ndim,
        "n_rows": n_rows,
        "patch_z": patch_z,
        "patch_y": patch_size[-2],
        "patch_x": patch_size[-1],
    }


def crop_launch_args(
    table: Any,
    rows: tuple[Any, Any, Any],
    n_rows: int,
    n_channels: int,
    patch_size: Sequence[int],
    out: Any,
) -> tuple[Any, ...]:
    """Build the argument tuple of ``crop_patches<T>`` (:func:`crop_kernel`).

    The lengths and dtypes of every array are checked here, because the kernel
    trusts them (and clamps everything else). Works on NumPy arrays too, so
    the tests can call it without a GPU.

    Parameters
    ----------
    table : array of int64, shape (n_stacks, 11)
        The stack table (:func:`stack_table`), on the launch's device.
    rows : tuple of arrays
        ``(data_idx, sample_idx, coords)``: C-contiguous int64 of ``n_rows``,
        ``n_rows`` and ``n_rows * d`` values.
    n_rows : int
        Rows of the batch.
    n_channels : int
        Channels of every stack.
    patch_size : sequence of int
        ``(PY, PX)`` or ``(PZ, PY, PX)``.
    out : array
        C-contiguous, ``n_rows * n_channels * prod(patch_size)`` elements of
        1, 2, 4 or 8 bytes.

    Returns
    -------
    tuple
        The arguments of the crop kernel for ``out.dtype.itemsize``.
    """
    values = _row_values(table, rows, n_rows, patch_size)
    itemsize = np.dtype(out.dtype).itemsize
    kernel = crop_kernel(itemsize)
    if n_channels < 1:
        raise ValueError(f"n_channels must be >= 1, got {n_channels}")
    size = n_rows * n_channels * math.prod(patch_size)
    check_launch_array("out", out, size, itemsize=itemsize)
    values.update(n_channels=n_channels, out=out)
    return kernel.arguments(values)


def check_launch_args(
    table: Any,
    rows: tuple[Any, Any, Any],
    n_rows: int,
    patch_size: Sequence[int],
    first_bad: Any,
) -> tuple[Any, ...]:
    """Build the argument tuple of ``check_crop_rows`` (:data:`CHECK_CROP_ROWS`).

    Parameters
    ----------
    table, rows, n_rows, patch_size
        As for :func:`crop_launch_args`.
    first_bad : array of int64, one value
        Holds ``n_rows`` before the launch; the first row out of range after.

    Returns
    -------
    tuple
        The arguments of ``check_crop_rows``.
    """
    values = _row_values(table, rows, n_rows, patch_size)
    check_launch_array("first_bad", first_bad, 1)
    values["first_bad"] = first_bad
    return CHECK_CROP_ROWS.arguments(values)
