"""Block reductions: each ``P``-sized block of an image reduced once, then regions.

Along every axis a sampling region is exactly two blocks (the image cut into
``P``-sized tiles), so :mod:`gpu_patching.stats` reduces every block once
(:func:`reduce_group`, one pass over the pixels in bounded groups and pieces,
on host threads or the device) and combines each block with its neighbours
(:func:`combine_regions`). Arrays in, arrays out, on NumPy or CuPy; the why
of the budgets is in ``docs/design.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BlockPlan",
    "combine_regions",
    "group_slices",
    "reduce_group",
    "region_pixels",
    "worker_pool",
]

# -- step 1: reduce blocks -----------------------------------------------------

Reduction = Callable[[Any, int], Any]


def _block_reduce(
    values: Any,
    patch: tuple[int, ...],
    reduce: Reduction,
    xp: Any,
    first: Reduction | None = None,
) -> Any:
    """Reduce ``(n, *spatial)`` values over ``P``-sized blocks of every spatial axis.

    Returns ``(n, *ceil(spatial / P))``; the last block of an axis holds the
    ``D % P`` leftover pixels when ``P`` does not divide ``D``. The outermost
    axis goes first (with ``first`` when given): reducing whole rows is the
    vectorised, cache-friendly reduction, and it leaves ``1 / P`` as much data
    for the other axes.
    """
    out = values
    for a, size in enumerate(patch):
        step = first if (a == 0 and first is not None) else reduce
        axis = 1 + a
        length = int(out.shape[axis])
        n_full = length // size
        before = (slice(None),) * axis
        parts = []
        if n_full:
            head = out[before + (slice(0, n_full * size),)]
            head = head.reshape(out.shape[:axis] + (n_full, size) + out.shape[axis + 1 :])
            parts.append(step(head, axis + 1))
        if length % size:
            tail = out[before + (slice(n_full * size, None),)]
            parts.append(xp.expand_dims(step(tail, axis), axis))
        out = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=axis)
    return out


def _sum64(values: Any, axis: int) -> Any:
    return values.sum(axis=axis, dtype=np.float64)


def _count64(values: Any, axis: int) -> Any:
    return values.sum(axis=axis, dtype=np.int64)


def _max(values: Any, axis: int) -> Any:
    return values.max(axis=axis)


def _min(values: Any, axis: int) -> Any:
    return values.min(axis=axis)


def _narrow_sum(dtype: Any, rows: int) -> Reduction | None:
    """Return an exact, faster sum over ``rows`` values of a small integer type.

    Adding up to ``rows`` 8- or 16-bit integers (or booleans) in 32 bits is
    exact and ~1.5x faster than casting every pixel to float64; None when the
    type is wider or the sum could overflow.
    """
    kind = np.dtype(dtype)
    if kind.kind not in "biu" or kind.itemsize > 2:
        return None
    largest = 1 if kind.kind == "b" else int(max(abs(np.iinfo(kind).min), np.iinfo(kind).max))
    accumulator = np.int32 if kind.kind == "i" else np.uint32
    if rows * largest > np.iinfo(accumulator).max:
        return None

    def narrow(values: Any, axis: int) -> Any:
        return values.sum(axis=axis, dtype=accumulator)

    return narrow


def _bins_of(values: Any, bins: int, value_range: tuple[float, float], xp: Any) -> Any:
    """Return the bin (int64) of every value; NaN gets the extra bin ``bins``.

    Bin of ``x``: ``clip(floor((x - low) * bins / (high - low)), 0, bins - 1)``
    in float64, so values outside the range land in the end bins.
    """
    low, high = value_range
    scale = bins / (high - low) if high > low else 0.0
    scaled = values.astype(xp.float64)
    scaled -= low
    scaled *= scale
    xp.floor(scaled, out=scaled)
    xp.clip(scaled, 0, bins - 1, out=scaled)  # NaN stays NaN
    if np.dtype(values.dtype).kind == "f":
        scaled = xp.nan_to_num(scaled, copy=False, nan=bins)
    return scaled.astype(xp.int64)


def _block_histograms(values: Any, plan: BlockPlan, xp: Any) -> Any:
    """Return the histogram of every block of ``(n, *spatial)`` values.

    ``bins + 1`` slots per block: the last one counts NaN, which makes the
    region's entropy NaN. One ``bincount`` over ``block * (bins + 1) + bin``
    counts every block at once.

    Returns
    -------
    array of int64, shape (n, *ceil(spatial / P), bins + 1)
    """
    patch, slots = plan.patch, plan.bins + 1
    flat_index = _bins_of(values, plan.bins, plan.value_range, xp)
    blocks = [-(-int(n) // p) for n, p in zip(values.shape[1:], patch, strict=True)]
    block_shape = (int(values.shape[0]), *blocks)
    # Flat block number of every pixel, built from one small index per axis.
    stride = slots
    for a in range(len(block_shape) - 1, -1, -1):
        length = int(values.shape[a])
        index = xp.arange(length, dtype=xp.int64)
        if a > 0:
            index //= patch[a - 1]
        shape = [1] * len(block_shape)
        shape[a] = length
        flat_index += (index * stride).reshape(shape)
        stride *= block_shape[a]
    counts = xp.bincount(flat_index.reshape(-1), minlength=stride)
    return counts.reshape((*block_shape, slots))


def _merge(parts: list[dict[str, Any]], axis: int, xp: Any) -> dict[str, Any]:
    """Concatenate the block arrays of consecutive pieces along ``axis``."""
    return {
        key: parts[0][key] if len(parts) == 1 else xp.concatenate([p[key] for p in parts], axis)
        for key in parts[0]
    }


def _by_pieces(
    chunk: Any,
    compute: Callable[[Any], dict[str, Any]],
    first_patch: int,
    budget: int,
    xp: Any,
) -> dict[str, Any]:
    """Run ``compute`` on pieces of at most ``budget`` elements and join the blocks.

    Pieces are whole samples when a sample fits, else rows of one sample cut
    at multiples of ``first_patch`` so that their blocks line up.
    """
    n_samples = int(chunk.shape[0])
    per_sample = math.prod(int(n) for n in chunk.shape[1:])
    if per_sample <= budget:
        step = max(1, budget // per_sample)
        return _merge([compute(chunk[s : s + step]) for s in range(0, n_samples, step)], 0, xp)
    n_rows = int(chunk.shape[1])
    rows = max(1, budget // (first_patch * (per_sample // n_rows))) * first_patch
    samples = [
        _merge([compute(chunk[s : s + 1, r : r + rows]) for r in range(0, n_rows, rows)], 1, xp)
        for s in range(n_samples)
    ]
    return _merge(samples, 0, xp)


def group_slices(
    n_samples: int,
    spatial: tuple[int, ...],
    patch: tuple[int, ...],
    budget: int,
    row_budget: int | None = None,
) -> list[tuple[slice, list[slice]]]:
    """Cut a stack into groups of whole samples, and a group into row slices.

    Every group is finished (blocks combined into regions) before the next
    starts, so block temporaries stay small. A sample larger than ``budget``
    elements is a group of its own, cut into row slices of about
    ``row_budget`` elements (``budget`` when None). Row slices start at
    multiples of ``P_1``, so the blocks of consecutive slices line up.

    Parameters
    ----------
    n_samples : int
        Samples of the stack.
    spatial, patch : tuple of int
        The spatial shape of a sample, and the patch size.
    budget : int
        Elements per group.
    row_budget : int or None, default None
        Elements per row slice of a sample larger than ``budget``.

    Returns
    -------
    list of (slice, list of slice)
        Each group's samples and its row slices.
    """
    sample_elements = math.prod(spatial)
    if sample_elements <= budget:
        per_group = max(1, budget // sample_elements)
        return [
            (slice(start, min(start + per_group, n_samples)), [slice(None)])
            for start in range(0, n_samples, per_group)
        ]
    row_elements = sample_elements // spatial[0]
    per_slice = budget if row_budget is None else row_budget
    rows = max(1, per_slice // (patch[0] * row_elements)) * patch[0]
    row_slices = [slice(start, start + rows) for start in range(0, spatial[0], rows)]
    return [(slice(s, s + 1), row_slices) for s in range(n_samples)]


# -- step 2: combine blocks into regions ---------------------------------------


#: Per block reduction: the value of a block past the image, and how two
#: neighbouring blocks combine (the name of a ufunc of NumPy and CuPy).
_BLOCK_COMBINE = {
    "sum": (0.0, "add"),
    "squares": (0.0, "add"),
    "hist": (0, "add"),
    "mask": (0, "add"),
    "max": (-math.inf, "maximum"),
    "min": (math.inf, "minimum"),
}


def _combine_neighbours(
    blocks: Any, grid: tuple[int, ...], identity: float, combine: str, xp: Any
) -> Any:
    """Combine block ``g`` with block ``g + 1`` along every spatial axis.

    Region ``g`` covers blocks ``g`` and ``g + 1``; a block past the image is
    the ``identity`` (0 for sums, -inf for max, +inf for min). ``combine`` names
    the ufunc (``"add"``, ``"maximum"`` or ``"minimum"``).
    """
    ufunc = getattr(xp, combine)
    out = blocks
    for a, cells in enumerate(grid):
        axis = 1 + a
        missing = cells + 1 - int(out.shape[axis])
        if missing > 0:
            pad_shape = list(out.shape)
            pad_shape[axis] = missing
            out = xp.concatenate([out, xp.full(pad_shape, identity, dtype=out.dtype)], axis=axis)
        before = (slice(None),) * axis
        out = ufunc(out[before + (slice(0, cells),)], out[before + (slice(1, cells + 1),)])
    return out


def region_pixels(
    spatial: tuple[int, ...], patch: tuple[int, ...], grid: tuple[int, ...], xp: Any
) -> Any:
    """Return the pixels of every region box ``[g * P, (g + 2) * P)`` clipped to the image.

    Parameters
    ----------
    spatial, patch, grid : tuple of int
        The spatial shape of a sample, the patch size and the grid shape.
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    array of float64
        Shape ``grid``.
    """
    count = xp.ones(grid, dtype=xp.float64)
    for a, (length, size, cells) in enumerate(zip(spatial, patch, grid, strict=True)):
        start = xp.arange(cells, dtype=xp.int64) * size
        extent = xp.clip(length - start, 0, 2 * size).astype(xp.float64)
        shape = [1] * len(grid)
        shape[a] = cells
        count = count * extent.reshape(shape)
    return count


def combine_regions(blocks: dict[str, Any], grid: tuple[int, ...], xp: Any) -> dict[str, Any]:
    """Combine every block reduction of a group into its regions.

    Parameters
    ----------
    blocks : dict of str to array
        :func:`reduce_group`'s block reductions, ``(n, *blocks)`` each.
    grid : tuple of int
        The grid shape: region ``g`` covers blocks ``g`` and ``g + 1``.
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    dict of str to array
        The same keys, ``(n, *grid)`` each (``"hist"`` keeps its bins axis).
    """
    return {
        key: _combine_neighbours(value, grid, *_BLOCK_COMBINE[key], xp)
        for key, value in blocks.items()
    }


@dataclass(frozen=True)
class BlockPlan:
    """Which block reductions one call of :func:`gpu_patching.stats.region_statistics` needs.

    ``sum`` and ``squares`` are of the values minus ``shift``; ``bins`` 0 asks
    for no histograms; ``copy_budget`` is the elements per piece of the
    reductions that copy pixels.
    """

    patch: tuple[int, ...]
    sums: bool
    squares: bool
    shift: float
    maximum: bool
    minimum: bool
    bins: int  # 0: no histograms
    value_range: tuple[float, float]
    copy_budget: int  # elements per piece of the reductions that copy pixels


def _copy_reductions(piece: Any, plan: BlockPlan, xp: Any) -> dict[str, Any]:
    """Return the block reductions that need a float64 (or int64) copy of the pixels."""
    found = {}
    if plan.bins:
        found["hist"] = _block_histograms(piece, plan, xp)
    if plan.squares:
        # One float64 copy serves both sums; the shift keeps the squares small.
        centred = piece.astype(xp.float64)
        centred -= plan.shift
        found["sum"] = _block_reduce(centred, plan.patch, _sum64, xp)
        centred *= centred
        found["squares"] = _block_reduce(centred, plan.patch, _sum64, xp)
    return found


@dataclass(frozen=True)
class _GroupPixels:
    """What every piece of a group reduces: the channel, its mask, the plan, the array module."""

    image: Any
    mask: Any
    plan: BlockPlan
    xp: Any

    def reduce(self, samples: slice, row_slices: list[slice]) -> dict[str, Any]:
        """Return the block reductions of some samples, row slice by row slice.

        Keys: ``"sum"`` and ``"squares"`` (of the values minus ``plan.shift``),
        ``"max"``, ``"min"``, ``"hist"`` and ``"mask"`` (True pixels), each an
        array ``(n, *blocks)`` (``"hist"`` has a trailing bins axis).
        """
        plan, xp = self.plan, self.xp
        parts = []
        first_patch = plan.patch[0]
        for rows in row_slices:
            chunk = self.image[samples, rows]
            found = {}
            if plan.squares or plan.bins:
                found.update(
                    _by_pieces(
                        chunk,
                        lambda piece: _copy_reductions(piece, plan, xp),
                        first_patch,
                        plan.copy_budget,
                        xp,
                    )
                )
            if plan.sums and not plan.squares:
                # No shift needed: reduce the raw values, no float64 copy.
                narrow = _narrow_sum(chunk.dtype, first_patch)
                found["sum"] = _block_reduce(chunk, plan.patch, _sum64, xp, first=narrow)
            if plan.maximum:
                found["max"] = _block_reduce(chunk, plan.patch, _max, xp).astype(xp.float64)
            if plan.minimum:
                found["min"] = _block_reduce(chunk, plan.patch, _min, xp).astype(xp.float64)
            if self.mask is not None:
                narrow = _narrow_sum(np.bool_, first_patch)
                found["mask"] = _block_reduce(
                    self.mask[samples, rows], plan.patch, _count64, xp, narrow
                )
            parts.append(found)
        return _merge(parts, 1, xp)


@contextmanager
def worker_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """Yield a thread pool for ``workers > 1``, else None (the calling thread works).

    Parameters
    ----------
    workers : int
        Threads, at least 1.

    Yields
    ------
    concurrent.futures.ThreadPoolExecutor or None
        The pool to pass to :func:`reduce_group`.
    """
    if workers == 1:
        yield None
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpu-patching") as pool:
        yield pool


def reduce_group(
    image: Any,
    mask: Any,
    samples: slice,
    row_slices: list[slice],
    plan: BlockPlan,
    xp: Any,
    pool: ThreadPoolExecutor | None,
    workers: int,
) -> dict[str, Any]:
    """Return the block reductions of one group, its rows (or samples) spread over ``pool``.

    NumPy releases the GIL inside its loops, so ``workers`` threads reduce
    separate rows (or samples) of the image at once; every piece writes only
    its own arrays.

    Parameters
    ----------
    image, mask : array
        The ``(S, *spatial)`` channel of the stack, and its mask or None.
    samples, row_slices : slice, list of slice
        One group of :func:`group_slices`.
    plan : BlockPlan
        The reductions to make.
    xp : module
        ``numpy`` or ``cupy``.
    pool, workers : ThreadPoolExecutor or None, int
        From :func:`worker_pool`.

    Returns
    -------
    dict of str to array
        ``"sum"`` and ``"squares"`` (of the values minus ``plan.shift``),
        ``"max"``, ``"min"``, ``"hist"`` and ``"mask"`` (True pixels), as
        asked, each ``(n, *blocks)`` (``"hist"`` with a trailing bins axis).
    """
    pixels = _GroupPixels(image, mask, plan, xp)
    if pool is None:
        return pixels.reduce(samples, row_slices)
    if len(row_slices) > 1:
        parts = pool.map(lambda rows: pixels.reduce(samples, [rows]), row_slices)
        return _merge(list(parts), 1, xp)
    # A group of whole samples: a share of the samples per thread.
    step = max(1, -(-(samples.stop - samples.start) // workers))
    shares = [
        slice(first, min(first + step, samples.stop))
        for first in range(samples.start, samples.stop, step)
    ]
    parts = pool.map(lambda share: pixels.reduce(share, row_slices), shares)
    return _merge(list(parts), 0, xp)
