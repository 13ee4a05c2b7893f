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
   then the sub-box and the corner inside the sub-box (row-major). The NumPy
   backend finds region and sub-box at once, with one search over a table of
   the first mass point of every ``(region, sub-box)`` pair (``_BoxIndex``,
   built at the first draw and refreshed after every update of the tables).

All integer arithmetic is exact in int64/uint64 within the limits that
``tables`` enforces (``n < 2**31``, total mass ``< 2**62``).

A shuffled or sharded epoch (:class:`~gpu_patching.permutation.EpochOrder`)
changes only which index each row draws, never the draw of an index: its
indices are drawn in increasing order (cache-friendly) and the rows gathered
into the epoch's order.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import grid, rng
from ..permutation import EpochOrder
from ..tables import RegionTables

__all__ = ["NumpyBackend", "locate_corners", "mulhi64", "stratum_points"]

#: Patches drawn per vectorised pass; 8192 int64 values are 64 KiB.
_CHUNK = 8192
#: Largest sampler (in patches) whose epoch chunks keep their draw-independent
#: parts between epochs (56 bytes per patch: at most 28 MiB).
_CACHED_PATCHES = 1 << 19
#: Samples with at least this many patches get chunks of their own.
_MIN_SAMPLE_CHUNK = 256
_MASK32 = np.uint64(0xFFFFFFFF)
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
    return _mulhi64_halves(a & _MASK32, a >> _SHIFT32, b & _MASK32, b >> _SHIFT32)


def _mulhi64_halves(
    a_low: NDArray[np.uint64],
    a_high: NDArray[np.uint64],
    b_low: NDArray[np.uint64],
    b_high: NDArray[np.uint64],
) -> NDArray[np.uint64]:
    """:func:`mulhi64` of ``a = a_high << 32 | a_low`` and ``b``, given as 32-bit halves."""
    high_low = a_high * b_low
    # (low*low >> 32) + low 32 bits of high*low + low*high < 2**64: no overflow.
    middle = a_low * b_low
    middle >>= _SHIFT32
    middle += high_low & _MASK32
    middle += a_low * b_high
    middle >>= _SHIFT32
    high_low >>= _SHIFT32
    result = a_high * b_high
    result += high_low
    result += middle
    return result


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
    lower, upper = _stratum_bounds(stratum, quotient, remainder, n_patches, 0)
    width = (upper - lower).astype(np.uint64)
    return lower + mulhi64(word, width).astype(np.int64)


class _BoxIndex:
    """Flat tables over every ``(region, sub-box)`` pair: point to corner in a few calls.

    Entry ``e = region * 2**d + bit`` is sub-box ``bit`` of a region, and
    ``start[e]`` its first global mass point: a region's selectable sub-boxes
    lie along its mass interval in bit order, each ``weight * size`` points
    long, and an unselectable one is empty and starts where the next one does.
    ``start`` is non-decreasing, so the sub-box holding a point ``x`` is the
    last entry with ``start <= x`` (one ``searchsorted``); an empty entry
    shares its start with the next one and is never chosen.

    The shapes of the sub-boxes are the same for every sample of a stack, so
    they are kept once per stack: geometry row ``e + delta[sample]`` holds the
    first corner of entry ``e`` (``origin``: the cell's first corner, plus 1
    along the axes where the sub-box takes part 1) and its number of corners
    along each axis but the first (``row_length``), to unravel a rank inside
    the sub-box row-major. ``start`` is rebuilt when the tables change (their
    ``version``), in O(R * 2**d).
    """

    def __init__(self, tables: RegionTables) -> None:
        self.ndim = tables.ndim
        self.shift = tables.ndim
        n_boxes = 1 << self.shift
        origins, lengths = [], []
        self.box_size: list[NDArray[np.int64]] = []
        self.delta = np.zeros(tables.n_samples, dtype=np.int64)
        geometry_rows = 0
        for stack in range(tables.n_stacks):
            first, last = int(tables.first_sample[stack]), int(tables.first_sample[stack + 1])
            cells = tables.sample_grid(first) if first < last else ()
            if first < last:
                origin, length, size = _stack_geometry(
                    tuple(int(s) for s in tables.spatial_shape[first]), tables.patch_size, cells
                )
                origins.append(origin)
                lengths.append(length)
                self.delta[first:last] = geometry_rows - tables.region_offset[first:last] * n_boxes
                geometry_rows += len(origin)
            else:
                size = np.zeros((n_boxes, 0), dtype=np.int64)
            self.box_size.append(size)
        self.origin = origins[0] if len(origins) == 1 else np.concatenate(origins)
        # The first axis takes what is left of a rank: its lengths are not needed.
        self.row_length = [np.empty(0, dtype=np.int64)] + [
            lengths[0][axis] if len(lengths) == 1 else np.concatenate([le[axis] for le in lengths])
            for axis in range(1, self.ndim)
        ]
        self.version = -1
        self.start = np.empty(0, dtype=np.int64)
        self.weight = np.empty(0, dtype=np.int64)
        self.weight_shift = -1
        self.uniform_weight = 0
        # Kept between epochs for samplers of at most _CACHED_PATCHES patches:
        # Philox prefixes by (seed, first index, rows) (tables-independent),
        # and stratum bounds by (first index, rows) (rebuilt with `start`).
        self.cache_chunks = tables.total_patches <= _CACHED_PATCHES
        self._prefixes: dict[tuple[int, int, int], rng.CounterPrefix] = {}
        self._bounds: dict[tuple[int, int], tuple[NDArray[np.int64], ...]] = {}
        self._patch_offset = np.empty(0, dtype=np.int64)
        self.refresh(tables)

    def refresh(self, tables: RegionTables) -> None:
        """Rebuild ``start`` if the tables changed since the last build."""
        if self.version == tables.version:
            return
        n_boxes = 1 << self.shift
        start = np.empty((len(tables.weight), n_boxes), dtype=np.int64)
        for stack in range(tables.n_stacks):
            first, last = int(tables.first_sample[stack]), int(tables.first_sample[stack + 1])
            rows = slice(int(tables.region_offset[first]), int(tables.region_offset[last]))
            batch = (last - first, -1)
            mask = tables.subbox_mask[rows].reshape(batch)
            weight = tables.weight[rows].reshape(batch)
            running = tables.mass_prefix[rows].reshape(batch)
            out = start[rows].reshape(last - first, -1, n_boxes)
            for bit in range(n_boxes):
                out[:, :, bit] = running
                if bit < n_boxes - 1:
                    box_mass = np.where(mask & (1 << bit), self.box_size[stack][bit], 0)
                    box_mass *= weight
                    running = running + box_mass
        self.start = start.reshape(-1)
        self.weight = np.asarray(tables.weight, dtype=np.int64)
        # Without probabilities every region that can be drawn has the same
        # weight: the rank is then a shift (a power of two) or one division.
        drawn_weights = self.weight[self.weight > 0]
        first = int(drawn_weights[0]) if drawn_weights.size else 1
        uniform = bool(np.all(drawn_weights == first))
        self.weight_shift = first.bit_length() - 1 if uniform and first & (first - 1) == 0 else -1
        self.uniform_weight = first if uniform else 0
        self.cache_chunks = tables.total_patches <= _CACHED_PATCHES
        self._bounds = {}
        # Prefixes depend on the chunk layout only: keep them while the
        # samples' patch ranges stay, so that updates never pile them up.
        if not np.array_equal(self._patch_offset, tables.patch_offset):
            self._prefixes = {}
            self._patch_offset = tables.patch_offset.copy()
        self.version = tables.version

    def consecutive_chunk(
        self,
        tables: RegionTables,
        sample: int,
        first_index: int,
        n_rows: int,
        seed: int,
        draw_number: int,
    ) -> tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.int64], Any, Any]:
        """Random words and stratum bounds of consecutive indices of one sample.

        Returns ``(word0, word1, lower, width_low, width_high)``: the two
        Philox words of each index, the global first mass point of its
        stratum, and the 32-bit halves of the stratum's width.
        """
        key = (first_index, n_rows)
        bounds = self._bounds.get(key) if self.cache_chunks else None
        if bounds is None:
            n_patches = int(tables.n_patches[sample])
            quotient, remainder = divmod(int(tables.mass_total[sample]), n_patches)
            first_stratum = first_index - int(tables.patch_offset[sample])
            stratum = np.arange(first_stratum, first_stratum + n_rows + 1, dtype=np.int64)
            # Consecutive strata: the upper bound of one is the lower of the next.
            bound = _mass_bound(
                stratum, quotient, remainder, n_patches, int(tables.mass_offset[sample])
            )
            width = np.diff(bound).view(np.uint64)
            bounds = (bound[:-1], width & _MASK32, width >> _SHIFT32)
            if self.cache_chunks:
                self._bounds[key] = bounds
        if self.cache_chunks:
            prefix_key = (seed, first_index, n_rows)
            prefix = self._prefixes.get(prefix_key)
            if prefix is None:
                if len(self._prefixes) > 2 * (tables.total_patches // _CHUNK + tables.n_samples):
                    self._prefixes = {}  # draws of many other ranges: start afresh
                indices = np.arange(first_index, first_index + n_rows, dtype=np.int64)
                prefix = self._prefixes[prefix_key] = rng.CounterPrefix(
                    seed, indices, rng.PURPOSE_STRATUM
                )
            word0, word1 = prefix.words(draw_number)
        else:
            indices = np.arange(first_index, first_index + n_rows, dtype=np.int64)
            word0, word1 = rng.random_uint32_pair(seed, indices, draw_number, rng.PURPOSE_STRATUM)
        return word0, word1, bounds[0], bounds[1], bounds[2]

    def locate(
        self, point: NDArray[np.int64], delta: int | NDArray[np.int64], out: NDArray[np.int64]
    ) -> None:
        """Write the corner that owns each global mass point into ``out``.

        Parameters
        ----------
        point : numpy.ndarray of int64, shape (n,)
            Global mass points.
        delta : int or numpy.ndarray of int64
            ``self.delta`` of each point's sample (a scalar when they share it).
        out : numpy.ndarray of int64, shape (n, d)
            Where the corners go.
        """
        entry = np.searchsorted(self.start, point, side="right")
        entry -= 1
        # Every entry and geometry row is valid (start[0] is 0 and every point
        # is >= 0), so mode="clip" only skips NumPy's bounds check.
        rank = point - np.take(self.start, entry, mode="clip")
        if self.weight_shift >= 0:
            rank >>= self.weight_shift
        elif self.uniform_weight:
            rank //= self.uniform_weight
        else:
            rank //= np.take(self.weight, entry >> self.shift, mode="clip")
        entry += delta
        np.take(self.origin, entry, axis=0, mode="clip", out=out)
        # Row-major inside the sub-box: the last axis varies fastest; what is
        # left of the rank is the offset along the first axis.
        for axis in range(self.ndim - 1, 0, -1):
            rank, offset = np.divmod(rank, np.take(self.row_length[axis], entry, mode="clip"))
            out[:, axis] += offset
        out[:, 0] += rank


def _stack_geometry(
    spatial_shape: tuple[int, ...], patch_size: tuple[int, ...], cells: tuple[int, ...]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Origins, lengths and sizes of the sub-boxes of one sample's regions.

    Returns
    -------
    origin : numpy.ndarray of int64, shape (n_cells * 2**d, d)
        First corner of sub-box ``bit`` of cell ``c`` (row-major) in row
        ``c * 2**d + bit``.
    length : numpy.ndarray of int64, shape (d, n_cells * 2**d)
        Corners along each axis of the same sub-boxes.
    size : numpy.ndarray of int64, shape (2**d, n_cells)
        Corners of sub-box ``bit`` of each cell when it is selectable.
    """
    ndim = len(patch_size)
    part_of = np.asarray(grid.subbox_offsets(ndim), dtype=np.int64)  # (2**d, d)
    n_boxes = len(part_of)
    # Grid-shaped views: every value below is broadcast from per-axis vectors.
    origin = np.empty((*cells, n_boxes, ndim), dtype=np.int64)
    length = np.empty((ndim, *cells, n_boxes), dtype=np.int64)
    size = np.ones((n_boxes, *cells), dtype=np.int64)
    for axis in range(ndim):
        along = [1] * ndim
        along[axis] = cells[axis]
        cell_start = np.arange(cells[axis], dtype=np.int64) * patch_size[axis]
        origin[..., axis] = cell_start.reshape(*along, 1) + part_of[:, axis]
        parts = np.stack(grid.axis_part_sizes(spatial_shape[axis], patch_size[axis], cells[axis]))
        box_parts = parts[part_of[:, axis]]  # (2**d, cells[axis])
        length[axis] = box_parts.T.reshape(*along, n_boxes)
        size *= box_parts.reshape(n_boxes, *along)
    return origin.reshape(-1, ndim), length.reshape(ndim, -1), size.reshape(n_boxes, -1)


#: One index per live tables object, rebuilt lazily when the tables change.
_BOX_INDEXES: weakref.WeakKeyDictionary[RegionTables, _BoxIndex] = weakref.WeakKeyDictionary()


def _box_index(tables: RegionTables) -> _BoxIndex:
    """Return the up-to-date :class:`_BoxIndex` of ``tables``."""
    index = _BOX_INDEXES.get(tables)
    if index is None:
        index = _BOX_INDEXES[tables] = _BoxIndex(tables)
    else:
        index.refresh(tables)
    return index


def locate_corners(
    tables: RegionTables, sample: NDArray[np.int64], point: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Return the corner that owns each mass point of a sample.

    The region is the one whose mass interval holds the point; inside it each
    corner owns ``weight`` consecutive points, in the order of the selectable
    sub-boxes (bit order) and row-major inside a sub-box.

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
    global_point = np.asarray(tables.mass_offset[sample] + point, dtype=np.int64)
    index = _box_index(tables)
    index.locate(global_point, index.delta[sample], corner)
    return corner


def _draw_chunk(
    tables: RegionTables,
    index: _BoxIndex,
    indices: NDArray[np.int64],
    draw_number: int,
    seed: int,
    sample_out: NDArray[np.int64],
    corner_out: NDArray[np.int64],
    *,
    increasing: bool,
) -> None:
    """:meth:`NumpyBackend.draw` for one chunk of indices, into the outputs.

    ``increasing`` says the indices are known to be strictly increasing.
    """
    sample = np.searchsorted(tables.patch_offset, indices, side="right")
    sample -= 1
    sample_out[:] = sample
    first, last = int(sample[0]), int(sample[-1])
    one_sample = increasing and first == last
    if one_sample and indices[-1] - indices[0] == len(indices) - 1:
        # Consecutive indices of one sample (an epoch's chunks, mostly): the
        # stratum bounds are one row of a single sequence, with scalar n, M;
        # they and the draw-independent Philox rounds are kept between epochs
        # when the sampler is small enough (see _BoxIndex.consecutive_chunk).
        word0, word1, lower, width_low, width_high = index.consecutive_chunk(
            tables, first, int(indices[0]), len(indices), seed, draw_number
        )
        point = _mulhi64_halves(word0, word1, width_low, width_high).view(np.int64)
        point += lower
        index.locate(point, int(index.delta[first]), corner_out)
        return
    word0, word1 = rng.random_uint32_pair(seed, indices, draw_number, rng.PURPOSE_STRATUM)
    delta: int | NDArray[np.int64]
    if one_sample:
        # Increasing indices of one sample (a shard's chunks): scalar n, M.
        n_patches = int(tables.n_patches[first])
        quotient, remainder = divmod(int(tables.mass_total[first]), n_patches)
        offset = int(tables.mass_offset[first])
        stratum = indices - int(tables.patch_offset[first])
        lower, upper = _stratum_bounds(stratum, quotient, remainder, n_patches, offset)
        delta = int(index.delta[first])
    else:
        stratum = indices - tables.patch_offset[sample]
        n_patches_of = tables.n_patches[sample]
        quotient_of, remainder_of = np.divmod(tables.mass_total[sample], n_patches_of)
        lower, upper = _stratum_bounds(
            stratum, quotient_of, remainder_of, n_patches_of, tables.mass_offset[sample]
        )
        delta = np.take(index.delta, sample)
    width = (upper - lower).view(np.uint64)
    point = _mulhi64_halves(word0, word1, width & _MASK32, width >> _SHIFT32).view(np.int64)
    point += lower
    index.locate(point, delta, corner_out)


def _mass_bound(
    stratum: NDArray[np.int64], quotient: Any, remainder: Any, n_patches: Any, offset: Any
) -> NDArray[np.int64]:
    """Global first mass point ``offset + floor(j M / n)`` of strata ``j``.

    ``M = quotient * n + remainder``; the other arguments are scalars or arrays
    (per row). ``j * remainder < n**2 < 2**62``: exact in int64.
    """
    bound = stratum * remainder
    bound //= n_patches
    bound += stratum * quotient
    bound += offset
    return bound


def _stratum_bounds(
    stratum: NDArray[np.int64], quotient: Any, remainder: Any, n_patches: Any, offset: Any
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """:func:`_mass_bound` of strata ``j`` and ``j + 1`` (lower and upper bounds)."""
    lower = _mass_bound(stratum, quotient, remainder, n_patches, offset)
    return lower, _mass_bound(stratum + 1, quotient, remainder, n_patches, offset)


def _chunk_bounds(
    tables: RegionTables, indices: range | NDArray[np.int64], increasing: bool
) -> list[tuple[int, int]]:
    """Row ranges of the chunks of a draw: at most ``_CHUNK`` rows each.

    Consecutive indices are also cut where a sample of at least
    ``_MIN_SAMPLE_CHUNK`` patches starts or ends, so that its chunks lie
    inside it and take the fast path of :func:`_draw_chunk`; smaller samples
    share chunks (fewer, larger NumPy calls).
    """
    n_rows = len(indices)
    cuts = set(range(0, n_rows, _CHUNK))
    if increasing and n_rows and int(indices[-1]) - int(indices[0]) == n_rows - 1:
        first_index = int(indices[0])
        offsets = tables.patch_offset
        large = np.flatnonzero(tables.n_patches >= _MIN_SAMPLE_CHUNK)
        for edge in np.concatenate([offsets[large], offsets[large + 1]]).tolist():
            if 0 < edge - first_index < n_rows:
                cuts.add(edge - first_index)
    bounds = sorted(cuts) + [n_rows]
    return [(start, stop) for start, stop in itertools.pairwise(bounds) if stop > start]


def _sample_names(
    tables: RegionTables, sample: NDArray[np.int64], rows: NDArray[np.int64] | None = None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Return ``(data_idx, sample_idx)`` of flat sample numbers (of ``sample[rows]``)."""
    n_rows = len(sample) if rows is None else len(rows)
    if tables.n_samples == 1:
        # np.zeros maps zero pages lazily: no pass over the memory here.
        return np.zeros(n_rows, dtype=np.int64), np.zeros(n_rows, dtype=np.int64)
    # Rows and flat samples are valid: mode="clip" only skips the bounds checks.
    if rows is not None:
        sample = np.take(sample, rows, mode="clip")
    return (
        np.take(tables.stack_of_sample, sample, mode="clip"),
        np.take(tables.sample_in_stack, sample, mode="clip"),
    )


class NumpyBackend:
    """The host backend: NumPy tables and a vectorised per-patch draw.

    A backend belongs to one sampler. It keeps two scratch arrays between
    draws (the flat sample of each row, and the corners of a shuffled epoch in
    index order, ``(1 + d) * 8`` bytes per patch): fresh memory of that size
    costs a page fault per 4 KiB when first written, which is a sizeable part
    of an epoch's time on the CPU. The arrays it returns never share memory
    with the scratch, and concurrent draws from several threads each get their
    own (only one at a time uses the scratch).
    """

    name = "numpy"
    xp: Any = np

    def __init__(self) -> None:
        self._scratch_lock = threading.Lock()
        self._scratch_sample = np.empty(0, dtype=np.int64)
        self._scratch_corner = np.empty((0, 0), dtype=np.int64)

    @contextmanager
    def _scratch(
        self, n_rows: int, ndim: int, *, corners: bool
    ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64] | None]]:
        """Lend ``n_rows`` rows of scratch: samples, and corners if asked for."""
        if not self._scratch_lock.acquire(blocking=False):
            # Another thread is drawing: this draw uses its own memory.
            corner = np.empty((n_rows, ndim), dtype=np.int64) if corners else None
            yield np.empty(n_rows, dtype=np.int64), corner
            return
        try:
            if len(self._scratch_sample) < n_rows:
                self._scratch_sample = np.empty(n_rows, dtype=np.int64)
            corner = None
            if corners:
                if len(self._scratch_corner) < n_rows or self._scratch_corner.shape[1] != ndim:
                    self._scratch_corner = np.empty((n_rows, ndim), dtype=np.int64)
                corner = self._scratch_corner[:n_rows]
            yield self._scratch_sample[:n_rows], corner
        finally:
            self._scratch_lock.release()

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
        increasing = isinstance(indices, range) and indices.step == 1
        if isinstance(indices, range):
            indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        else:
            indices = np.array(indices, dtype=np.int64)
        corner = np.empty((len(indices), tables.ndim), dtype=np.int64)
        with self._scratch(len(indices), tables.ndim, corners=False) as (sample, _):
            self._draw_samples(
                tables, indices, draw_number, seed, sample, corner, increasing=increasing
            )
            data_idx, sample_idx = _sample_names(tables, sample)
        return data_idx, sample_idx, corner, indices

    @staticmethod
    def _draw_samples(
        tables: RegionTables,
        indices: range | NDArray[np.int64],
        draw_number: int,
        seed: int,
        sample: NDArray[np.int64],
        corner: NDArray[np.int64],
        *,
        increasing: bool,
    ) -> None:
        """Write the flat sample and corner of each index into ``sample``, ``corner``.

        Fastest when the indices increase; ``increasing`` says they are known
        to increase strictly.
        """
        index = _box_index(tables)
        # Chunks keep every temporary small: cache-resident, and recycled by
        # the allocator instead of being mapped (and page-faulted) afresh. A
        # range is never made into an array as long as the epoch.
        for start, stop in _chunk_bounds(tables, indices, increasing):
            rows = slice(start, stop)
            if isinstance(indices, range):
                chunk = np.arange(indices.start + start, indices.start + stop)
            else:
                chunk = indices[rows]
            _draw_chunk(
                tables,
                index,
                chunk,
                draw_number,
                seed,
                sample[rows],
                corner[rows],
                increasing=increasing,
            )

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
            # Index i is row (number of drawn indices up to i) - 1 of `drawn`;
            # the running count in 32 bits when it fits (half the memory).
            count_type = np.int32 if n_patches < 1 << 31 else np.int64
            row_of = np.cumsum(present, dtype=count_type)[wanted].astype(np.int64)
            row_of -= 1
        with self._scratch(len(drawn), tables.ndim, corners=True) as (sample, corner):
            assert corner is not None
            # Both kinds of `drawn` increase strictly.
            self._draw_samples(tables, drawn, draw_number, seed, sample, corner, increasing=True)
            # np.take, not fancy indexing: ten times faster on the (N, d)
            # corners; every row_of is a valid row, so mode="clip" only skips
            # the bounds checks.
            data_idx, sample_idx = _sample_names(tables, sample, row_of)
            coords = np.take(corner, row_of, axis=0, mode="clip")
        return data_idx, sample_idx, coords, wanted

    @staticmethod
    def to_host(values: Any) -> NDArray[Any]:
        """Return ``values`` as a NumPy array."""
        return np.asarray(values)
