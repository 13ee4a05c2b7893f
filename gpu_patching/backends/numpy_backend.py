"""The per-patch draw, vectorised with NumPy.

This is one of the two implementations of the per-patch draw (the other is the
CUDA kernel in ``gpu_patching/kernels``); the test suite proves they agree bit
for bit. The draw of patch ``i`` with draw number ``k``:

1. ``s``: the sample whose patch range holds ``i``; ``j = i - patch_offset[s]``
   is the stratum, ``n`` the sample's patch count, ``M`` its total mass.
2. ``r``: the 64-bit word ``w1 << 32 | w0`` of the first two Philox output
   words of counter ``(i, k, PURPOSE_STRATUM)``.
3. Stratum ``j`` owns the integer mass points ``[lo, hi)`` with
   ``lo = floor(j * M / n)`` and ``hi = floor((j + 1) * M / n)``; the draw
   takes ``x = lo + floor(r * (hi - lo) / 2**64)``. The strata tile ``[0, M)``
   exactly, so every mass point, hence every corner, is reached with a
   probability proportional to its mass.
4. ``x`` is located: the region whose mass interval holds it, then the rank of
   the corner inside the region (each corner owns ``q`` consecutive points),
   then the sub-box and the corner inside the sub-box (row-major).

All integer arithmetic is exact in int64/uint64 within the limits that
``tables`` enforces (``n < 2**31``, total mass ``< 2**62``).

A shuffled or sharded epoch (:class:`~gpu_patching.permutation.EpochOrder`)
changes only which index each row draws, never the draw of an index: its
indices are drawn in increasing order (cache-friendly) and the rows gathered
into the epoch's order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import grid, rng
from ..permutation import EpochOrder
from ..tables import RegionTables

__all__ = ["NumpyBackend", "locate_corners", "mulhi64", "stratum_points"]

#: Patches drawn per vectorised pass; 8192 int64 values are 64 KiB.
_CHUNK = 8192
_MASK32 = np.uint64(0xFFFFFFFF)
#: _MASK_BITS[n_boxes][bit, mask] is bit ``bit`` of the sub-box mask ``mask``.
_MASK_BITS = {
    n_boxes: ((np.arange(256)[None, :] >> np.arange(n_boxes)[:, None]) & 1).astype(np.uint8)
    for n_boxes in (4, 8)
}
_SHIFT32 = np.uint64(32)


def mulhi64(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Return the high 64 bits of the 128-bit products ``a * b``, exactly.

    Parameters
    ----------
    a, b : numpy.ndarray of uint64
        Factors.

    Returns
    -------
    numpy.ndarray of uint64
        ``floor(a * b / 2**64)``, from 32-bit limbs whose products fit uint64.
    """
    a_low, a_high = a & _MASK32, a >> _SHIFT32
    b_low, b_high = b & _MASK32, b >> _SHIFT32
    high_low = a_high * b_low
    # (low*low >> 32) + low 32 bits of high*low + low*high < 2**64: no overflow.
    middle = ((a_low * b_low) >> _SHIFT32) + (high_low & _MASK32) + a_low * b_high
    return a_high * b_high + (high_low >> _SHIFT32) + (middle >> _SHIFT32)


def stratum_points(
    stratum: NDArray[np.int64],
    n_patches: NDArray[np.int64],
    mass_total: NDArray[np.int64],
    word: NDArray[np.uint64],
) -> NDArray[np.int64]:
    """Return the mass point drawn in each stratum.

    Parameters
    ----------
    stratum : numpy.ndarray of int64
        Stratum ``j`` of each draw, ``0 <= j < n``.
    n_patches : numpy.ndarray of int64
        Number of strata ``n`` (the sample's patch count), ``0 < n < 2**31``.
    mass_total : numpy.ndarray of int64
        Total mass ``M`` of the sample, ``0 < M < 2**62``.
    word : numpy.ndarray of uint64
        A uniform 64-bit random word per draw.

    Returns
    -------
    numpy.ndarray of int64
        ``x = lo + floor(word * (hi - lo) / 2**64)`` in ``[lo, hi)`` with
        ``lo = floor(j M / n)`` and ``hi = floor((j + 1) M / n)``, or ``lo``
        when the stratum is empty (only possible when ``M < n``). A stratum is
        narrower than ``2**62``, so 64 random bits reach every one of its points.
    """
    quotient, remainder = np.divmod(mass_total, n_patches)
    # j * remainder < n**2 < 2**62: exact.
    lower = stratum * quotient + (stratum * remainder) // n_patches
    upper = (stratum + 1) * quotient + ((stratum + 1) * remainder) // n_patches
    width = (upper - lower).astype(np.uint64)
    return lower + mulhi64(word, width).astype(np.int64)


def locate_corners(
    tables: RegionTables, sample: NDArray[np.int64], point: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Return the corner that owns each mass point of a sample.

    Parameters
    ----------
    tables : RegionTables
        Tables on the NumPy backend.
    sample : numpy.ndarray of int64
        Flat sample number of each point.
    point : numpy.ndarray of int64
        Mass point relative to the sample, ``0 <= point < M``.

    Returns
    -------
    numpy.ndarray of int64, shape (len(point), d)
        Patch corners (top-left, and first slice in 3D).
    """
    corner = np.empty((len(point), tables.ndim), dtype=np.int64)
    # Samples of one stack share their grid, so each stack is located with
    # scalar shapes; a loop over stacks, never over regions or patches.
    stack = tables.stack_of_sample[sample]
    if len(stack) < 2 or bool(np.all(stack[1:] >= stack[:-1])):
        order = None
        stack_sorted = stack
    else:
        order = np.argsort(stack, kind="stable")
        stack_sorted = stack[order]
    bounds = np.searchsorted(stack_sorted, np.arange(tables.n_stacks + 1))
    for k in range(tables.n_stacks):
        if bounds[k] == bounds[k + 1]:
            continue
        rows: Any = slice(bounds[k], bounds[k + 1])
        if order is not None:
            rows = order[rows]
        corner[rows] = _locate_in_stack(tables, k, sample[rows], point[rows])
    return corner


def _locate_in_stack(
    tables: RegionTables,
    stack: int,
    sample: NDArray[np.int64],
    point: NDArray[np.int64],
) -> NDArray[np.int64]:
    """:func:`locate_corners` for points whose samples all belong to ``stack``."""
    ndim = tables.ndim
    first = tables.first_sample[stack]
    grid_shape = [int(g) for g in tables.grid_shape[first]]
    last_corner = [
        int(s - p) for s, p in zip(tables.spatial_shape[first], tables.patch_size, strict=True)
    ]

    global_point = tables.mass_offset[sample] + point
    # The last region whose prefix is <= the point holds it; zero-mass regions
    # share their prefix with the next region and are skipped by 'right'.
    region = np.searchsorted(tables.mass_prefix, global_point, side="right") - 1
    rank = (global_point - tables.mass_prefix[region]) // tables.weight[region]
    mask = tables.subbox_mask[region]

    # Row-major cell coordinates, then the corner counts of both parts per axis.
    cell = region - tables.region_offset[sample]
    cell_start = [np.empty(0, dtype=np.int64)] * ndim
    for axis in range(ndim - 1, 0, -1):
        # floor_divide by a scalar is much faster than divmod in NumPy.
        quotient = cell // grid_shape[axis]
        cell_start[axis] = (cell - quotient * grid_shape[axis]) * tables.patch_size[axis]
        cell = quotient
    cell_start[0] = cell * tables.patch_size[0]
    part0 = [
        (start <= last).astype(np.int64)
        for start, last in zip(cell_start, last_corner, strict=True)
    ]
    part1 = [
        np.clip(last - start, 0, patch - 1)
        for start, last, patch in zip(cell_start, last_corner, tables.patch_size, strict=True)
    ]

    # Sub-boxes in bit order: the chosen one is the first whose cumulative end
    # exceeds the rank (empty sub-boxes end where the previous one did). The
    # last sub-box ends at the region's area, which always exceeds the rank.
    boxes = grid.subbox_offsets(ndim)
    selectable = _MASK_BITS[len(boxes)][:, mask]
    chosen = np.zeros(len(point), dtype=np.int64)
    box_start = np.zeros(len(point), dtype=np.int64)
    box_end = np.zeros(len(point), dtype=np.int64)
    for bit, box in enumerate(boxes[:-1]):
        size = selectable[bit].astype(np.int64)
        for axis, b in enumerate(box):
            size *= part1[axis] if b else part0[axis]
        box_end += size
        passed = box_end <= rank
        chosen += passed
        box_start = np.where(passed, box_end, box_start)
    box_rank = rank - box_start

    # Row-major offsets inside the chosen sub-box.
    corner = np.empty((len(point), ndim), dtype=np.int64)
    for axis in range(ndim - 1, -1, -1):
        in_part1 = (chosen >> (ndim - 1 - axis)) & 1
        if axis > 0:
            box_length = np.where(in_part1 == 1, part1[axis], part0[axis])
            box_rank, offset = np.divmod(box_rank, box_length)
        else:  # what is left of the rank is the offset along the first axis
            offset = box_rank
        corner[:, axis] = cell_start[axis] + in_part1 * (1 + offset)
    return corner


def _draw_chunk(
    tables: RegionTables, indices: NDArray[np.int64], draw_number: int, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """:meth:`NumpyBackend.draw` for one chunk of indices."""
    sample = np.searchsorted(tables.patch_offset, indices, side="right") - 1
    stratum = indices - tables.patch_offset[sample]
    n_patches = tables.n_patches[sample]
    mass_total = tables.mass_offset[sample + 1] - tables.mass_offset[sample]
    word = rng.random_uint64(seed, indices, draw_number, rng.PURPOSE_STRATUM)
    point = stratum_points(stratum, n_patches, mass_total, word)
    return sample, locate_corners(tables, sample, point)


class NumpyBackend:
    """The host backend: NumPy tables and a vectorised per-patch draw."""

    name = "numpy"
    xp: Any = np

    def draw(
        self,
        tables: RegionTables,
        indices: EpochOrder | range | NDArray[np.int64],
        draw_number: int,
        seed: int,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """Draw the patches of the given global patch indices.

        Parameters
        ----------
        tables : RegionTables
            The sampler's tables.
        indices : EpochOrder, range or numpy.ndarray of int64
            Global patch indices, each in ``[0, tables.total_patches)``: an
            :class:`~gpu_patching.permutation.EpochOrder` (a shuffled or
            sharded epoch; its indices depend on ``seed`` and
            ``draw_number``), a range (an epoch is ``range(total_patches)``)
            or an array.
        draw_number : int
            The draw number, in ``[0, 2**32)``.
        seed : int
            The 64-bit seed.

        Returns
        -------
        data_idx, sample_idx : numpy.ndarray of int64, shape (N,)
            Stack, and sample within the stack, of each patch.
        coords : numpy.ndarray of int64, shape (N, d)
            Patch corners.
        indices : numpy.ndarray of int64, shape (N,)
            The global patch index of each row.

        Raises
        ------
        IndexError
            If an order draws indices outside ``[0, tables.total_patches)``.
        """
        if isinstance(indices, EpochOrder):
            indices.check_within(tables.total_patches)
            if not indices.is_contiguous:
                return self._draw_order(tables, indices, draw_number, seed)
            indices = range(indices.first_position, indices.first_position + indices.n_rows)
        if isinstance(indices, range):
            indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        else:
            indices = np.array(indices, dtype=np.int64)
        sample, corner = self._draw_samples(tables, indices, draw_number, seed)
        data_idx = tables.stack_of_sample[sample]
        sample_idx = tables.sample_in_stack[sample]
        return data_idx, sample_idx, corner, indices

    @staticmethod
    def _draw_samples(
        tables: RegionTables,
        indices: range | NDArray[np.int64],
        draw_number: int,
        seed: int,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Flat sample and corner of each index (fastest when the indices increase)."""
        sample = np.empty(len(indices), dtype=np.int64)
        corner = np.empty((len(indices), tables.ndim), dtype=np.int64)
        # Chunks keep every temporary small: cache-resident, and recycled by
        # the allocator instead of being mapped (and page-faulted) afresh. A
        # range is never made into an array as long as the epoch.
        for start in range(0, len(indices), _CHUNK):
            rows = slice(start, start + _CHUNK)
            if isinstance(indices, range):
                chunk = np.arange(
                    indices.start + start, min(indices.stop, indices.start + start + _CHUNK)
                )
            else:
                chunk = indices[rows]
            sample[rows], corner[rows] = _draw_chunk(tables, chunk, draw_number, seed)
        return sample, corner

    def _draw_order(
        self, tables: RegionTables, order: EpochOrder, draw_number: int, seed: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """:meth:`draw` of a shuffled or sharded order.

        The indices are drawn in increasing order and the rows then gathered
        into the order's: a draw walks the tables (searches over regions) and
        is several times faster on increasing indices, which stay in cache,
        than on shuffled ones. Increasing order comes from a mask over all
        indices (linear, no sort), which also draws a padded duplicate once.
        """
        wanted = order.indices(seed, draw_number)
        n_patches = tables.total_patches
        drawn: range | NDArray[np.int64]
        if order.n_rows == order.n_positions == n_patches and order.position_step == 1:
            # A whole shuffled epoch: every index once, so row k is index k.
            drawn = range(n_patches)
            row_of = wanted
        else:
            present = np.zeros(n_patches, dtype=bool)
            present[wanted] = True
            drawn = np.flatnonzero(present)
            # Index i is row (number of drawn indices up to i) - 1 of `drawn`.
            row_of = np.cumsum(present, dtype=np.int64)[wanted]
            row_of -= 1
        sample, corner = self._draw_samples(tables, drawn, draw_number, seed)
        # np.take, not fancy indexing: ten times faster on the (N, d) corners.
        sample = np.take(sample, row_of)
        data_idx = tables.stack_of_sample[sample]
        sample_idx = tables.sample_in_stack[sample]
        return data_idx, sample_idx, np.take(corner, row_of, axis=0), wanted

    @staticmethod
    def to_host(values: Any) -> NDArray[Any]:
        """Return ``values`` as a NumPy array."""
        return np.asarray(values)
