"""The per-patch draw, vectorised with NumPy: the one host draw.

:func:`draw_rows` draws any rows (one draw number for all, or one per row; or
one Python-int index in Python ints), and :class:`NumpyBackend` draws epochs,
shuffled and sharded or not, through the same steps. The CUDA kernel in
``gpu_patching/kernels`` is the one device draw, and the tests prove the two
agree bit for bit. The steps, and the limits that keep their integer
arithmetic exact, are in docs/design.md ("The draw inside a stratum").
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from .. import rng
from ..permutation import EpochOrder
from ..tables import RegionTables
from .base import check_draw, check_indices
from .host_tables import BoxIndex, box_index, search, search_one, take

__all__ = [
    "CHUNK_ROWS",
    "NARROW_CORNERS",
    "NumpyBackend",
    "draw_rows",
    "mulhi64_halves",
    "stratum_bounds",
]

#: Patches drawn per vectorised pass; 8192 int64 values are 64 KiB.
CHUNK_ROWS = 8192
#: Shuffled or sharded draws of at least this many rows keep their corners in
#: index order in 32 bits (when they fit): memory matters, the widening does not.
NARROW_CORNERS = 1 << 16
#: Samples with at least this many patches get chunks of their own.
_MIN_SAMPLE_CHUNK = 256
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def mulhi64_halves(
    a_low: NDArray[np.uint64],
    a_high: NDArray[np.uint64],
    b_low: NDArray[np.uint64],
    b_high: NDArray[np.uint64],
) -> NDArray[np.uint64]:
    """Return the high 64 bits of the 128-bit products ``a * b``, exactly.

    ``a = a_high << 32 | a_low`` and ``b`` are given as 32-bit halves (uint64
    arrays), so that every partial product fits uint64.
    """
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


def _consecutive_chunk(
    index: BoxIndex,
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
    bounds = index.bounds.get(key) if index.cache_chunks else None
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
        if index.cache_chunks:
            index.bounds[key] = bounds
    if index.cache_chunks:
        prefix_key = (seed, first_index, n_rows)
        prefix = index.prefixes.get(prefix_key)
        if prefix is None:
            if len(index.prefixes) > 2 * (tables.total_patches // CHUNK_ROWS + tables.n_samples):
                index.prefixes = {}  # draws of many other ranges: start afresh
            indices = np.arange(first_index, first_index + n_rows, dtype=np.int64)
            prefix = index.prefixes[prefix_key] = rng.CounterPrefix(
                seed, indices, rng.PURPOSE_STRATUM
            )
        word0, word1 = prefix.words(draw_number)
    else:
        indices = np.arange(first_index, first_index + n_rows, dtype=np.int64)
        word0, word1 = rng.random_uint32_pair(seed, indices, draw_number, rng.PURPOSE_STRATUM)
    return word0, word1, bounds[0], bounds[1], bounds[2]


def _draw_chunk(
    tables: RegionTables,
    index: BoxIndex,
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
        # when the sampler is small enough (see _consecutive_chunk).
        word0, word1, lower, width_low, width_high = _consecutive_chunk(
            index, tables, first, int(indices[0]), len(indices), seed, draw_number
        )
        point = mulhi64_halves(word0, word1, width_low, width_high).view(np.int64)
        point += lower
        index.locate(point, first, corner_out)
        return
    # Increasing indices of one sample (a shard's chunks): scalar n, M.
    _draw_points(index, indices, first if one_sample else sample, draw_number, seed, corner_out)


def _draw_points(
    index: BoxIndex,
    indices: Any,
    sample: Any,
    draw_number: Any,
    seed: int,
    out: NDArray[np.int64] | None = None,
) -> tuple[int, ...] | None:
    """Draw the corner of each index in its stratum: the per-patch draw, once.

    The steps of docs/design.md ("The draw inside a stratum"), written with
    operators that act on NumPy arrays and Python ints alike: arrays of
    indices (with one draw
    number or one per row, and one sample or one per row) write their corners
    into ``out``; one Python-int index at one draw number returns its corner,
    every value a Python int read through the index's ``memoryview``s.
    """
    one = isinstance(indices, int)
    tables: Any
    word0: Any
    word1: Any
    width: Any
    if one:
        tables = views = index.views()
        word0, word1 = rng.random_pair_int(seed, indices, draw_number, rng.PURPOSE_STRATUM)
        n_patches, mass = tables.n_patches[sample], tables.mass_total[sample]
        first_index, offset = tables.patch_offset[sample], tables.mass_offset[sample]
    else:
        tables, views = index, None
        word0, word1 = rng.random_uint32_pair(seed, indices, draw_number, rng.PURPOSE_STRATUM)
        if isinstance(sample, int):
            n_patches, mass = int(tables.n_patches[sample]), int(tables.mass_total[sample])
            first_index = int(tables.patch_offset[sample])
            offset = int(tables.mass_offset[sample])
        else:
            n_patches, mass = take(tables.n_patches, sample), take(tables.mass_total, sample)
            first_index = take(tables.patch_offset, sample)
            offset = take(tables.mass_offset, sample)
    quotient, remainder = divmod(mass, n_patches)
    lower, upper = stratum_bounds(indices - first_index, quotient, remainder, n_patches, offset)
    width = upper - lower
    if one:
        point = lower + ((word1 << 32 | word0) * width >> 64)
    else:
        width = width.view(np.uint64)
        point = mulhi64_halves(word0, word1, width & _MASK32, width >> _SHIFT32).view(np.int64)
        point += lower
    return index.locate(point, sample, out, views)


def draw_rows(tables: Any, indices: Any, draw_numbers: Any, seed: int) -> tuple[Any, Any, Any]:
    """Draw the patch of each ``(index, draw number)``: the host draw of any rows.

    The epoch draw of :class:`NumpyBackend`, random access
    (``get_patch_spec`` through :mod:`gpu_patching._counters`) and the CUDA
    backend's host side all draw through this function's steps.

    Parameters
    ----------
    tables : RegionTables or HostTables
        The sampler's tables as NumPy arrays (see :func:`host_tables`).
    indices : int or numpy.ndarray of int64, shape (N,)
        Global patch indices, each in ``[0, total_patches)`` (not checked).
    draw_numbers : int or numpy.ndarray of int64, shape (N,)
        One draw number for every row or one per row, each in
        ``[0, 2**32)`` (not checked); an int with an int index.
    seed : int
        The 64-bit seed.

    Returns
    -------
    data_idx, sample_idx, coords
        Arrays of shapes ``(N,)``, ``(N,)``, ``(N, d)``, or for one int index
        two ints and a tuple of ints: row ``indices[r]`` of
        ``sample_epoch(draw_numbers[r])``.
    """
    index = box_index(tables)
    if isinstance(indices, int):
        # One patch (random access): Python ints end to end, a few
        # microseconds where NumPy calls on one-element arrays cost more.
        views = index.views()
        flat = search_one(views.patch_offset, indices) - 1
        corner = _draw_points(index, indices, flat, int(draw_numbers), seed)
        assert corner is not None
        return views.stack_of_sample[flat], views.sample_in_stack[flat], corner
    per_row = np.ndim(draw_numbers) > 0
    n_rows = len(indices)
    sample = np.empty(n_rows, dtype=np.int64)
    coords = np.empty((n_rows, tables.ndim), dtype=np.int64)
    for start in range(0, n_rows, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        chunk_sample = sample[rows]
        chunk_sample[:] = search(tables.patch_offset, indices[rows])
        chunk_sample -= 1
        draws = np.asarray(draw_numbers[rows], dtype=np.uint64) if per_row else draw_numbers
        _draw_points(index, indices[rows], chunk_sample, draws, seed, coords[rows])
    return tables.stack_of_sample[sample], tables.sample_in_stack[sample], coords


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


def stratum_bounds(
    stratum: NDArray[np.int64], quotient: Any, remainder: Any, n_patches: Any, offset: Any
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """:func:`_mass_bound` of strata ``j`` and ``j + 1`` (lower and upper bounds)."""
    lower = _mass_bound(stratum, quotient, remainder, n_patches, offset)
    return lower, _mass_bound(stratum + 1, quotient, remainder, n_patches, offset)


def _chunk_bounds(
    tables: RegionTables, indices: range | NDArray[np.int64], increasing: bool
) -> list[tuple[int, int]]:
    """Row ranges of the chunks of a draw: at most ``CHUNK_ROWS`` rows each.

    Consecutive indices are also cut where a sample of at least
    ``_MIN_SAMPLE_CHUNK`` patches starts or ends, so that its chunks lie
    inside it and take the fast path of :func:`_draw_chunk`; smaller samples
    share chunks (fewer, larger NumPy calls).
    """
    n_rows = len(indices)
    cuts = set(range(0, n_rows, CHUNK_ROWS))
    if increasing and n_rows and int(indices[-1]) - int(indices[0]) == n_rows - 1:
        first_index = int(indices[0])
        offsets = tables.patch_offset
        large = np.flatnonzero(tables.n_patches >= _MIN_SAMPLE_CHUNK)
        for edge in np.concatenate([offsets[large], offsets[large + 1]]).tolist():
            if 0 < edge - first_index < n_rows:
                cuts.add(edge - first_index)
    bounds = sorted(cuts) + [n_rows]
    return [(start, stop) for start, stop in itertools.pairwise(bounds) if stop > start]


def _name_arrays(
    tables: RegionTables, n_rows: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], tuple[NDArray[np.int64], ...] | None]:
    """Return ``(data_idx, sample_idx, to_fill)`` arrays for ``n_rows`` rows.

    With a single sample both are zeros (``np.zeros`` maps zero pages lazily:
    no pass over the memory, and no memory until read) and ``to_fill`` is
    None; otherwise they are empty and ``to_fill`` holds them.
    """
    if tables.n_samples == 1:
        return np.zeros(n_rows, dtype=np.int64), np.zeros(n_rows, dtype=np.int64), None
    data_idx, sample_idx = np.empty(n_rows, dtype=np.int64), np.empty(n_rows, dtype=np.int64)
    return data_idx, sample_idx, (data_idx, sample_idx)


def _fill_names(
    tables: RegionTables,
    sample: NDArray[np.int32] | NDArray[np.int64],
    to_fill: tuple[NDArray[np.int64], ...],
    rows: slice,
) -> None:
    """Write ``(data_idx, sample_idx)`` of flat samples into rows of ``to_fill``."""
    # Flat samples are valid: mode="clip" only skips the bounds checks.
    np.take(tables.stack_of_sample, sample, out=to_fill[0][rows], mode="clip")
    np.take(tables.sample_in_stack, sample, out=to_fill[1][rows], mode="clip")


class NumpyBackend:
    """The host backend: NumPy tables and a vectorised per-patch draw.

    A backend belongs to one sampler and keeps nothing between draws but the
    draw index of its tables (one layout number per region, see
    :class:`BoxIndex`). A draw allocates its outputs and chunk-sized
    temporaries only, plus, for a shuffled or sharded epoch, the corners in
    index order (``4 * d`` bytes per patch when the coordinates fit in 32
    bits), so that its peak memory stays a small multiple of its output's
    (the README's Memory section). Concurrent draws from several
    threads share nothing but the index.
    """

    name = "numpy"
    xp: Any = np

    def draw(
        self,
        tables: RegionTables,
        indices: EpochOrder | range | NDArray[np.int64],
        draw_number: int,
        seed: int,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """Draw the patches of the given global patch indices, on the host.

        Parameters
        ----------
        tables, indices, draw_number, seed
            As :meth:`Backend.draw <gpu_patching.backends.base.Backend.draw>`:
            ``indices`` is an :class:`~gpu_patching.permutation.EpochOrder` (its
            indices depend on ``seed`` and ``draw_number``), a range (an epoch
            is ``range(total_patches)``) or a NumPy array of int64.

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
            If an index is outside ``[0, tables.total_patches)`` (the same
            rule and message as the CUDA backend's).
        TypeError
            If an index array does not hold integers.
        ValueError
            If a range has a step other than 1, an index array is not 1-D, or
            ``draw_number`` / ``seed`` is out of range.
        """
        draw_number, seed = check_draw(draw_number, seed)
        if isinstance(indices, EpochOrder):
            indices.check_within(tables.total_patches)
            if not indices.is_contiguous:
                return self._draw_order(tables, indices, draw_number, seed)
            indices = range(indices.first_position, indices.first_position + indices.n_rows)
        increasing = isinstance(indices, range) and indices.step == 1
        if isinstance(indices, range):
            if len(indices) > 1 and indices.step != 1:
                raise ValueError(f"a range of indices must have step 1, got {indices}")
            # The same check, and message, as the CUDA backend's.
            EpochOrder.contiguous(indices.start, indices.stop).check_within(tables.total_patches)
            indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        else:
            array = np.asarray(indices)
            if array.ndim != 1:
                raise ValueError(f"indices must be 1-D, got shape {array.shape}")
            if array.dtype.kind not in "iu":
                raise TypeError(f"indices must be integers, got dtype {array.dtype}")
            check_indices(np, array, tables.total_patches)
            indices = np.array(array, dtype=np.int64)
        corner = np.empty((len(indices), tables.ndim), dtype=np.int64)
        data_idx, sample_idx, to_fill = _name_arrays(tables, len(indices))
        self._draw_samples(
            tables, indices, draw_number, seed, corner, to_fill, increasing=increasing
        )
        return data_idx, sample_idx, corner, indices

    @staticmethod
    def _draw_samples(
        tables: RegionTables,
        indices: range | NDArray[np.int64],
        draw_number: int,
        seed: int,
        corner: NDArray[Any],
        to_fill: tuple[NDArray[np.int64], ...] | None,
        *,
        increasing: bool,
        samples: NDArray[Any] | None = None,
    ) -> None:
        """Write the corner of each index into ``corner``, its names into ``to_fill``.

        ``to_fill`` is ``(data_idx, sample_idx)``, or None to skip them;
        ``samples``, if given, gets the flat sample of each index.
        Fastest when the indices increase; ``increasing`` says they are known
        to increase strictly.
        """
        index = box_index(tables)
        sample = np.empty(min(CHUNK_ROWS, len(indices)), dtype=np.int64)
        # Chunks keep every temporary small: cache-resident, and recycled by
        # the allocator instead of being mapped (and page-faulted) afresh. A
        # range is never made into an array as long as the epoch.
        for start, stop in _chunk_bounds(tables, indices, increasing):
            rows = slice(start, stop)
            if isinstance(indices, range):
                chunk = np.arange(indices.start + start, indices.start + stop)
            else:
                chunk = indices[rows]
            chunk_sample = sample[: stop - start]
            _draw_chunk(
                tables,
                index,
                chunk,
                draw_number,
                seed,
                chunk_sample,
                corner[rows],
                increasing=increasing,
            )
            if to_fill is not None:
                _fill_names(tables, chunk_sample, to_fill, rows)
            if samples is not None:
                samples[rows] = chunk_sample

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
        # The corners in index order: the largest temporary of a large draw,
        # so in 32 bits when they fit (every axis shorter than 2**31).
        narrow = len(drawn) >= NARROW_CORNERS and int(tables.spatial_shape.max()) < 1 << 31
        corner = np.empty((len(drawn), tables.ndim), dtype=np.int32 if narrow else np.int64)
        data_idx, sample_idx, to_fill = _name_arrays(tables, len(wanted))
        # Each drawn row's flat sample, for the names (32 bits: 4 bytes a row).
        sample_type = np.int32 if tables.n_samples < 1 << 31 else np.int64
        samples = None if to_fill is None else np.empty(len(drawn), dtype=sample_type)
        # Both kinds of `drawn` increase strictly.
        self._draw_samples(
            tables, drawn, draw_number, seed, corner, None, increasing=True, samples=samples
        )
        # np.take, not fancy indexing: ten times faster on (N, d) corners;
        # every row_of is a valid row, so mode="clip" only skips the bounds
        # checks. Narrow corners are widened a chunk at a time.
        # Not narrow: the corners are int64 already, and so is their gather.
        wide = (
            None
            if narrow
            else cast(NDArray[np.int64], np.take(corner, row_of, axis=0, mode="clip"))
        )
        coords = np.empty((len(wanted), tables.ndim), dtype=np.int64) if wide is None else wide
        for start in range(0, len(wanted), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            if wide is None:
                coords[rows] = np.take(corner, row_of[rows], axis=0, mode="clip")
            if to_fill is not None and samples is not None:
                sample = np.take(samples, row_of[rows], mode="clip")
                _fill_names(tables, sample, to_fill, rows)
        return data_idx, sample_idx, coords, wanted
