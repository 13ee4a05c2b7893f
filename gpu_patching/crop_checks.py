"""The checks of a crop call, shared by every path of :mod:`gpu_patching.crop`.

The batch's arrays, the stacks' shapes and dtypes, the rows against the
stacks (``gp::row_in_range`` on the host, with the error that names the
first bad row) and a caller's ``out``: all run before any work, so a refused
call writes nothing. :class:`~gpu_patching.PatchLoader` applies the stacks'
rule when it is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._validation import check_stack_shape, validate_patch_size
from .arrays import to_host
from .specs import PatchBatch

__all__ = [
    "as_stack_list",
    "bad_rows",
    "check_batch",
    "check_host_out",
    "check_host_rows",
    "check_out_metadata",
    "check_stacks",
    "native_dtype",
    "raise_for_row",
    "rows_to_host",
]


def check_batch(batch: Any) -> tuple[tuple[int, ...], int]:
    """Return ``(patch_size, n_rows)`` after checking the batch's array metadata."""
    if not isinstance(batch, PatchBatch):
        raise TypeError(f"batch must be a PatchBatch, got {type(batch).__name__}")
    patch_size = validate_patch_size(batch.patch_size)
    ndim = len(patch_size)
    for name in ("data_idx", "sample_idx", "coords"):
        array = getattr(batch, name)
        if not (hasattr(array, "shape") and hasattr(array, "dtype")):
            raise TypeError(f"batch.{name} must be an array, got {type(array).__name__}")
        if np.dtype(array.dtype).kind not in "iu":
            raise TypeError(f"batch.{name} must hold integers, got dtype {array.dtype}")
    if len(batch.data_idx.shape) != 1:
        raise ValueError(f"batch.data_idx must be 1-D, got shape {tuple(batch.data_idx.shape)}")
    n_rows = int(batch.data_idx.shape[0])
    for name, shape in (("sample_idx", (n_rows,)), ("coords", (n_rows, ndim))):
        actual = tuple(int(s) for s in getattr(batch, name).shape)
        if actual != shape:
            raise ValueError(
                f"batch.{name} has shape {actual}; with {n_rows} rows and a {ndim}D "
                f"patch_size it must have shape {shape}"
            )
    return patch_size, n_rows


def as_stack_list(stacks: Any) -> list[Any]:
    """Return the stacks as a non-empty list."""
    if isinstance(stacks, (str, bytes)) or not isinstance(stacks, (Sequence, np.ndarray)):
        raise TypeError(
            f"stacks must be a sequence of arrays (one per stack), got {type(stacks).__name__}"
        )
    if len(stacks) == 0:
        raise ValueError("stacks is empty: give one SC(Z)YX array per stack")
    return list(stacks)


def native_dtype(dtype: Any) -> np.dtype[Any]:
    """Return ``dtype`` in the machine's byte order (``>u2`` becomes ``uint16`` on x86).

    Patches always come out in native byte order: PyTorch cannot hold any
    other, and a conversion while copying a patch loses no value.

    Parameters
    ----------
    dtype : dtype-like
        Any NumPy dtype.

    Returns
    -------
    numpy.dtype
        The same type in native byte order.
    """
    return np.dtype(dtype).newbyteorder("=")


def check_stacks(
    shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype[Any]], patch_size: tuple[int, ...]
) -> tuple[int, np.dtype[Any]]:
    """Return ``(n_channels, dtype)`` after checking the stacks' metadata.

    The crops' rule, also applied by :class:`~gpu_patching.PatchLoader` when
    it is built: the same channel count and dtype for every stack, and shapes
    that suit the patch (a stack smaller than it is accepted).

    Parameters
    ----------
    shapes : sequence of tuple of int
        ``SC(Z)YX`` shape of each stack.
    dtypes : sequence of numpy.dtype
        Dtype of each stack.
    patch_size : tuple of int
        The patch size, checked.

    Returns
    -------
    n_channels : int
        The stacks' channel count.
    dtype : numpy.dtype
        Their common dtype in native byte order: stacks that differ only in
        byte order hold the same values and are accepted.

    Raises
    ------
    ValueError
        If a shape does not suit the patch or the channel counts differ.
    TypeError
        If the dtypes differ.
    """
    for k, shape in enumerate(shapes):
        # A stack smaller than the patch is accepted, as the sampler accepts
        # it (it gives no patches); only a row that names it is refused.
        check_stack_shape(shape, patch_size, f"stacks[{k}]", smaller_ok=True)
        if shape[1] != shapes[0][1]:
            raise ValueError(
                f"every stack must have the same number of channels: stacks[0] has "
                f"{shapes[0][1]} (shape {shapes[0]}), stacks[{k}] has {shape[1]} (shape {shape})"
            )
        if native_dtype(dtypes[k]) != native_dtype(dtypes[0]):
            raise TypeError(
                f"every stack must have the same dtype: stacks[0] is {dtypes[0]}, "
                f"stacks[{k}] is {dtypes[k]}"
            )
    return shapes[0][1], native_dtype(dtypes[0])


def bad_rows(
    data_idx: NDArray[np.int64],
    sample_idx: NDArray[np.int64],
    coords: NDArray[np.int64],
    shapes: Sequence[tuple[int, ...]],
    patch_size: tuple[int, ...],
) -> NDArray[np.bool_]:
    """Which rows name a patch outside its stack (``gp::row_in_range``, vectorised)."""
    n_stacks = len(shapes)
    table = np.asarray(shapes, dtype=np.int64)  # (n_stacks, 2 + d)
    stack_ok = (data_idx >= 0) & (data_idx < n_stacks)
    stack = np.where(stack_ok, data_idx, 0)
    sample_ok = (sample_idx >= 0) & (sample_idx < table[stack, 0])
    last_corner = table[stack, 2:] - np.asarray(patch_size, dtype=np.int64)
    corner_ok = np.all((coords >= 0) & (coords <= last_corner), axis=1)
    bad: NDArray[np.bool_] = ~(stack_ok & sample_ok & corner_ok)
    return bad


def raise_for_row(
    row: int,
    batch: PatchBatch,
    shapes: Sequence[tuple[int, ...]],
    patch_size: tuple[int, ...],
) -> None:
    """Raise the error that names why ``row`` of ``batch`` is out of range (it must be).

    The values are read from the batch as given, not from their int64 copies,
    so a uint64 ``2**64 - 1`` is shown as such rather than as ``-1``.
    """
    data_idx = int(to_host(batch.data_idx[row : row + 1])[0])
    sample_idx = int(to_host(batch.sample_idx[row : row + 1])[0])
    corner = tuple(int(c) for c in to_host(batch.coords[row]).tolist())
    if not 0 <= data_idx < len(shapes):
        raise IndexError(
            f"batch.data_idx[{row}] = {data_idx} is out of range: there are "
            f"{len(shapes)} stacks, expected 0 <= data_idx < {len(shapes)}"
        )
    shape = shapes[data_idx]
    if not 0 <= sample_idx < shape[0]:
        raise IndexError(
            f"batch.sample_idx[{row}] = {sample_idx} is out of range: stacks[{data_idx}] "
            f"(shape {shape}) has {shape[0]} samples"
        )
    last_corner = tuple(d - p for d, p in zip(shape[2:], patch_size, strict=True))
    if min(last_corner) < 0:
        raise ValueError(
            f"batch.coords[{row}] = {corner} names stacks[{data_idx}] (spatial shape "
            f"{shape[2:]}), which is smaller than the {patch_size} patch: no patch fits in it"
        )
    raise ValueError(
        f"batch.coords[{row}] = {corner} puts the {patch_size} patch outside "
        f"stacks[{data_idx}] (spatial shape {shape[2:]}): expected "
        f"0 <= corner <= {last_corner} on every axis"
    )


def check_host_rows(
    rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
    shapes: Sequence[tuple[int, ...]],
    patch_size: tuple[int, ...],
    batch: PatchBatch,
) -> None:
    """Raise for the first row of host ``(data_idx, sample_idx, coords)`` out of range."""
    data_idx, sample_idx, coords = rows
    bad = bad_rows(data_idx, sample_idx, coords, shapes, patch_size)
    if bad.any():
        raise_for_row(int(np.argmax(bad)), batch, shapes, patch_size)


def _as_int64(values: Any) -> NDArray[np.int64]:
    """Return integer row values as int64 on the host, saturating unsigned values past int64.

    A plain cast would wrap a uint64 ``2**63`` or more to a negative number;
    saturated, it stays a value no stack can hold, so the row is still
    refused (and the message reads the value from the batch itself).
    """
    host = to_host(values)
    if host.dtype.kind == "u" and host.dtype.itemsize == 8:
        host = np.minimum(host, np.uint64(np.iinfo(np.int64).max))
    return host.astype(np.int64, copy=False)


def rows_to_host(
    batch: PatchBatch,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Return the batch's rows as int64 NumPy arrays (copied from the device if needed)."""
    return (_as_int64(batch.data_idx), _as_int64(batch.sample_idx), _as_int64(batch.coords))


def check_host_out(
    out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], stacks: list[NDArray[Any]]
) -> None:
    """Check a caller's ``out`` for host stacks."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array for host stacks, got {type(out).__name__}")
    check_out_metadata(out, shape, dtype)
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for k, stack in enumerate(stacks):
        if np.may_share_memory(out, stack):
            raise ValueError(f"out shares memory with stacks[{k}]; give a separate buffer")


def check_out_metadata(out: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """Check the shape, dtype and C-contiguity of a caller's ``out``."""
    actual = tuple(int(s) for s in out.shape)
    if actual != shape:
        raise ValueError(f"out has shape {actual}, expected (len(batch), C, *patch_size) = {shape}")
    # Either byte order: copying into out converts, and loses no value.
    if native_dtype(out.dtype) != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected the stacks' dtype {dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
