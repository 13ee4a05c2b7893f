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
import operator
import weakref
from bisect import bisect_right as _search_one
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from .. import grid, rng
from .._arrays import to_host
from ..permutation import EpochOrder
from ..tables import RegionTables
from .base import check_draw, check_indices

__all__ = ["HostTables", "NumpyBackend", "draw_rows", "host_tables"]

#: Patches drawn per vectorised pass; 8192 int64 values are 64 KiB.
_CHUNK = 8192
#: Largest sampler (in patches) whose epoch chunks keep their draw-independent
#: parts between epochs (56 bytes per patch: at most 28 MiB).
_CACHED_PATCHES = 1 << 19
#: Shuffled or sharded draws of at least this many rows keep their corners in
#: index order in 32 bits (when they fit): memory matters, the widening does not.
_NARROW_CORNERS = 1 << 16
#: Samples with at least this many patches get chunks of their own.
_MIN_SAMPLE_CHUNK = 256
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def _mulhi64_halves(
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


class _BoxIndex:
    """Small tables that take a global mass point to its corner in a few NumPy calls.

    A point is located in two searches. The first, over the tables'
    ``mass_prefix`` (one entry per region), finds the region whose mass
    interval holds the point; the point's offset in the region, divided by
    the region's weight, is the *rank* of its corner there. The second finds
    the sub-box that holds the rank, in a small table of *layouts*.

    A region's layout is everything its corners' order depends on besides its
    position: its sub-box mask, and along each axis the sizes of its two
    parts (interior cells all share them; the last cells of an axis differ).
    Layout ``k`` has ``2**d`` entries ``k * 2**d + bit``, one per sub-box in
    bit order, holding ``entry_start`` (``layout_base[k]`` plus the corners of
    the sub-boxes before it), which part the sub-box takes along each axis and
    its number of corners along each axis. ``layout_base`` leaves one unused
    value after each layout, so that ``entry_start`` is increasing across
    layouts and the sub-box of rank ``r`` in layout ``k`` is the last entry
    with ``entry_start <= layout_base[k] + r`` (one ``searchsorted``; an
    empty sub-box shares its start with the next one and is never chosen).
    The region's cell, unravelled from its row, gives the corner's origin.

    Per region the index keeps one layout number (``uint16``; ``uint32`` if
    there are more than 65,536 layouts): a few hundred layouts at most for a
    stack, so the layout tables are small. Layout numbers are rebuilt when
    the tables change (their ``version``), in O(R) with small temporaries.
    """

    def __init__(self, tables: RegionTables) -> None:
        self.ndim = tables.ndim
        self.patch_size = [int(p) for p in tables.patch_size]
        self.part_of = np.asarray(grid.subbox_offsets(self.ndim), dtype=np.int64)
        # Per sample, for locating points of many samples at once.
        self.region_offset = tables.region_offset
        self.sample_cells = [
            np.ascontiguousarray(tables.grid_shape[:, axis]) for axis in range(self.ndim)
        ]
        # The static part of each stack's layouts: per axis, the distinct
        # (part 0, part 1) sizes of its cells and the class of each cell, and
        # each cell's combination of classes (row-major, the smallest dtype).
        self._stack_classes: list[_StackClasses | None] = [
            _stack_classes(tables, stack) for stack in range(tables.n_stacks)
        ]
        self.version = -1
        self.layout: NDArray[Any] = np.empty(0, dtype=np.uint16)
        self.layout_base = np.empty(0, dtype=np.int64)
        self.entry_start = np.empty(0, dtype=np.int64)
        self.entry_part: list[NDArray[np.int64]] = []
        self.entry_length: list[NDArray[np.int64]] = []
        self.mass_prefix = np.empty(0, dtype=np.int64)
        self.weight = np.empty(0, dtype=np.int64)
        self.weight_shift = -1
        self.uniform_weight = 0
        # Kept between epochs for samplers of at most _CACHED_PATCHES patches:
        # Philox prefixes by (seed, first index, rows) (tables-independent),
        # and stratum bounds by (first index, rows) (rebuilt with the layouts).
        self.cache_chunks = tables.total_patches <= _CACHED_PATCHES
        self._prefixes: dict[tuple[int, int, int], rng.CounterPrefix] = {}
        self._bounds: dict[tuple[int, int], tuple[NDArray[np.int64], ...]] = {}
        self._patch_offset = np.empty(0, dtype=np.int64)
        self._views: _IntViews | None = None
        self.refresh(tables)

    def refresh(self, tables: RegionTables) -> None:
        """Rebuild the layouts if the tables changed since the last build."""
        if self.version == tables.version:
            return
        self._build_layouts(tables)
        self.mass_prefix = np.asarray(tables.mass_prefix, dtype=np.int64)
        self.weight = np.asarray(tables.weight, dtype=np.int64)
        # The per-sample arrays the draw reads (host arrays on every backend).
        self.patch_offset = tables.patch_offset
        self.n_patches = tables.n_patches
        self.mass_total = tables.mass_total
        self.mass_offset = tables.mass_offset
        self.stack_of_sample = tables.stack_of_sample
        self.sample_in_stack = tables.sample_in_stack
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

    def _build_layouts(self, tables: RegionTables) -> None:
        """Give every region its layout number and build the layout tables."""
        n_boxes = 1 << self.ndim
        rows_of_layout: dict[bytes, int] = {}
        layouts: list[NDArray[np.int64]] = []  # (cumulative corners, lengths, area)
        keymaps: list[NDArray[np.int64] | None] = []
        stack_keys: list[list[tuple[slice, NDArray[Any]]] | None] = []
        for stack, classes in enumerate(self._stack_classes):
            if classes is None:
                keymaps.append(None)
                stack_keys.append([])
                continue
            present = np.zeros(classes.n_keys, dtype=bool)
            # A small stack's keys are kept for the second pass (a large
            # one's are made again: its keys would cost memory).
            kept_keys: list[tuple[slice, NDArray[Any]]] | None = []
            for rows, key in _stack_keys(tables, stack, classes):
                # A bincount: linear in the regions, unlike a sort.
                present |= np.bincount(key.reshape(-1), minlength=classes.n_keys) > 0
                if kept_keys is not None and key.size <= _KEPT_KEYS:
                    kept_keys.append((rows, key))
                else:
                    kept_keys = None
            stack_keys.append(kept_keys)
            keys = np.flatnonzero(present)
            keymap = np.zeros(classes.n_keys, dtype=np.int64)
            for key, row in zip(
                keys.tolist(), _layout_rows(classes, keys, self.part_of), strict=True
            ):
                text = row.tobytes()
                number = rows_of_layout.get(text)
                if number is None:
                    number = rows_of_layout[text] = len(layouts)
                    layouts.append(row)
                keymap[key] = number
            keymaps.append(keymap)
        number_type = np.uint16 if len(layouts) <= 1 << 16 else np.uint32
        if self.layout.dtype != number_type or len(self.layout) != len(tables.weight):
            self.layout = np.zeros(len(tables.weight), dtype=number_type)
        for stack, classes in enumerate(self._stack_classes):
            stack_keymap = keymaps[stack]
            if classes is None or stack_keymap is None:
                continue
            numbers = stack_keymap.astype(number_type)
            kept = stack_keys[stack]
            for rows, key in kept if kept is not None else _stack_keys(tables, stack, classes):
                # Every key is below n_keys: mode="clip" only skips the checks.
                np.take(numbers, key, out=self.layout[rows].reshape(key.shape), mode="clip")
        width = n_boxes * (1 + self.ndim) + 1
        table = np.asarray(layouts, dtype=np.int64).reshape(len(layouts), width)
        cumulative = table[:, :n_boxes]
        lengths = table[:, n_boxes:-1].reshape(len(layouts), n_boxes, self.ndim)
        area = table[:, -1]
        # One spare value after each layout keeps the starts increasing.
        self.layout_base = np.concatenate([[0], np.cumsum(area + 1)[:-1]]).astype(np.int64)
        self.entry_start = (self.layout_base[:, None] + cumulative).reshape(-1)
        self.entry_part = [
            np.tile(self.part_of[:, axis], len(layouts)) for axis in range(self.ndim)
        ]
        self.entry_length = [
            np.ascontiguousarray(lengths[:, :, axis].reshape(-1)) for axis in range(self.ndim)
        ]

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
        self,
        point: Any,
        sample: int | NDArray[np.int64],
        out: NDArray[np.int64] | None = None,
        views: _IntViews | None = None,
    ) -> tuple[int, ...] | None:
        """Find the corner that owns each global mass point.

        One rule for both sizes: with arrays each step is a NumPy call over
        all points (the corners go into ``out``); with one Python-int point
        the same steps run on Python ints read through ``memoryview``s (a
        NumPy call costs more than the whole one-point locate) and the corner
        is returned.

        Parameters
        ----------
        point : numpy.ndarray of int64, shape (n,), or int
            Global mass points (an array is overwritten: used as scratch).
        sample : int or numpy.ndarray of int64
            The flat sample of each point (a scalar when they share it).
        out : numpy.ndarray of int64, shape (n, d), optional
            Where the corners of an array of points go.
        views : _IntViews, optional
            :meth:`views`, when the caller has them at hand.

        Returns
        -------
        tuple of int or None
            The corner of a single point; None for arrays (see ``out``).
        """
        one = isinstance(point, int)
        tables: Any = (views or self.views()) if one else self
        search, take = (_search_one, _take_one) if one else (_search, _take)
        region = search(tables.mass_prefix, point)
        region -= 1
        rank = point
        rank -= take(tables.mass_prefix, region)
        if self.weight_shift >= 0:
            rank >>= self.weight_shift
        elif self.uniform_weight:
            rank //= self.uniform_weight
        else:
            rank //= take(tables.weight, region)
        key = take(tables.layout_base, take(tables.layout, region))
        key += rank
        entry = search(tables.entry_start, key)
        entry -= 1
        inside = key
        inside -= take(tables.entry_start, entry)  # rank in the sub-box
        # The region's cell, row-major in its sample's grid.
        cell = region
        shared = isinstance(sample, int)
        cell -= tables.region_offset[sample] if shared else take(tables.region_offset, sample)
        corner: list[Any] = [0] * self.ndim
        # Row-major inside the sub-box too: the last axis varies fastest, and
        # what is left of the rank is the offset along the first axis.
        for axis in range(self.ndim - 1, 0, -1):
            cells = tables.sample_cells[axis]
            cell, along = divmod(cell, cells[sample] if shared else take(cells, sample))
            inside, offset = divmod(inside, take(tables.entry_length[axis], entry))
            along *= self.patch_size[axis]
            along += offset
            along += take(tables.entry_part[axis], entry)
            corner[axis] = along
        cell *= self.patch_size[0]
        cell += inside
        cell += take(tables.entry_part[0], entry)
        corner[0] = cell
        if one:
            return tuple(corner)
        assert out is not None
        for axis in range(self.ndim):
            out[:, axis] = corner[axis]
        return None

    def views(self) -> _IntViews:
        """Return the index's and the tables' arrays as ``memoryview``s of int64.

        Indexing a ``memoryview`` yields a Python int: the one-point draw
        reads its tables through these. Made once per version of the tables.
        """
        if self._views is None or self._views.version != self.version:
            self._views = _IntViews(self)
        return self._views


def _search(values: NDArray[np.int64], point: Any) -> Any:
    """Return the index after the last value ``<= point``, per point (arrays)."""
    return np.searchsorted(values, point, side="right")


def _take(values: NDArray[Any], rows: Any) -> Any:
    """``values[rows]``; every row is valid, so mode="clip" only skips the checks."""
    return np.take(values, rows, mode="clip")


#: ``values[row]`` of a ``memoryview``: a Python int (a C call, no Python frame).
_take_one = operator.getitem


def _as_view(values: Any) -> memoryview:
    """Return an array as a flat ``memoryview`` of int64 (indexing yields Python ints)."""
    return np.ascontiguousarray(values, dtype=np.int64).reshape(-1).data


class _IntViews:
    """The arrays of a :class:`_BoxIndex` and its tables as int64 ``memoryview``s."""

    def __init__(self, index: _BoxIndex) -> None:
        self.version = index.version
        self.mass_prefix = _as_view(index.mass_prefix)
        self.weight = _as_view(index.weight)
        self.layout = _as_view(index.layout)
        self.layout_base = _as_view(index.layout_base)
        self.entry_start = _as_view(index.entry_start)
        self.region_offset = _as_view(index.region_offset)
        self.patch_offset = _as_view(index.patch_offset)
        self.n_patches = _as_view(index.n_patches)
        self.mass_total = _as_view(index.mass_total)
        self.mass_offset = _as_view(index.mass_offset)
        self.stack_of_sample = _as_view(index.stack_of_sample)
        self.sample_in_stack = _as_view(index.sample_in_stack)
        self.sample_cells = [_as_view(cells) for cells in index.sample_cells]
        self.entry_part = [_as_view(part) for part in index.entry_part]
        self.entry_length = [_as_view(length) for length in index.entry_length]


class _StackClasses(NamedTuple):
    """The static part of one stack's layouts (see :class:`_BoxIndex`)."""

    #: Per axis, the distinct ``(part 0, part 1)`` sizes, shape (k_a, 2).
    parts: list[NDArray[np.int64]]
    #: Each cell's class combination, row-major over the sample's grid.
    combination: NDArray[Any]
    #: Number of class combinations (the product of the ``k_a``).
    n_combinations: int
    #: Number of layout keys ``mask * n_combinations + combination``.
    n_keys: int


def _stack_classes(tables: RegionTables, stack: int) -> _StackClasses | None:
    """Return the per-axis classes of a stack's cells (None for a stack without regions)."""
    first, last = int(tables.first_sample[stack]), int(tables.first_sample[stack + 1])
    cells = tables.sample_grid(first) if first < last else ()
    if not cells or min(cells) == 0:
        return None  # no samples, or samples smaller than the patch: no regions
    spatial = [int(s) for s in tables.spatial_shape[first]]
    parts, classes = [], []
    for axis in range(tables.ndim):
        part0, part1 = grid.axis_part_sizes(spatial[axis], tables.patch_size[axis], cells[axis])
        # Both parts only shrink along an axis (interior cells, then the last
        # ones): a class starts wherever either changes; no sort needed.
        starts = np.ones(cells[axis], dtype=bool)
        starts[1:] = (part0[1:] != part0[:-1]) | (part1[1:] != part1[:-1])
        parts.append(np.stack([part0[starts], part1[starts]], axis=1))
        classes.append(np.cumsum(starts) - 1)
    n_combinations = 1
    for distinct in parts:
        n_combinations *= len(distinct)
    n_keys = (1 << (1 << tables.ndim)) * n_combinations
    key_type = np.int16 if n_keys < 1 << 15 else np.int32
    combination = np.zeros(cells, dtype=key_type)
    for axis, of_cell in enumerate(classes):
        along = [1] * tables.ndim
        along[axis] = cells[axis]
        combination *= len(parts[axis])
        combination += of_cell.reshape(along).astype(key_type)
    return _StackClasses(parts, combination.reshape(-1), n_combinations, n_keys)


#: Regions whose layout keys are computed in one pass (bounds the temporaries).
_KEY_ROWS = 1 << 20
#: Stacks of at most this many regions keep their keys between the two passes.
_KEPT_KEYS = 1 << 16


def _stack_keys(
    tables: RegionTables, stack: int, classes: _StackClasses
) -> Iterator[tuple[slice, NDArray[Any]]]:
    """Yield ``(rows, key)``: the layout key of every region of a stack, by slices.

    ``key = sub-box mask * n_combinations + class combination``, shaped
    ``(samples, cells)`` for whole samples or flat for part of one sample.
    """
    first, last = int(tables.first_sample[stack]), int(tables.first_sample[stack + 1])
    n_cells = len(classes.combination)
    key_type = classes.combination.dtype
    offset = int(tables.region_offset[first])
    if n_cells <= _KEY_ROWS:
        step = max(1, _KEY_ROWS // max(n_cells, 1))
        for start in range(first, last, step):
            stop = min(start + step, last)
            rows = slice(offset + (start - first) * n_cells, offset + (stop - first) * n_cells)
            key = tables.subbox_mask[rows].reshape(stop - start, n_cells).astype(key_type)
            key *= classes.n_combinations
            key += classes.combination
            yield rows, key
        return
    for sample in range(last - first):
        for start in range(0, n_cells, _KEY_ROWS):
            stop = min(start + _KEY_ROWS, n_cells)
            base = offset + sample * n_cells
            rows = slice(base + start, base + stop)
            key = tables.subbox_mask[rows].astype(key_type)
            key *= classes.n_combinations
            key += classes.combination[start:stop]
            yield rows, key


def _layout_rows(
    classes: _StackClasses, keys: NDArray[np.int64], part_of: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Return the layouts of some keys of a stack, one row each.

    A row is the corners before each sub-box (bit order), the corners of each
    sub-box along each axis (bit-major), and the region's area.
    """
    n_boxes, ndim = part_of.shape
    mask, combination = np.divmod(keys, classes.n_combinations)
    length = np.empty((len(keys), n_boxes, ndim), dtype=np.int64)
    for axis in range(ndim - 1, -1, -1):
        combination, of_axis = np.divmod(combination, len(classes.parts[axis]))
        sizes = classes.parts[axis][of_axis]  # (keys, 2): part 0, part 1
        length[:, :, axis] = sizes[:, part_of[:, axis]]
    selectable = (mask[:, None] >> np.arange(n_boxes)) & 1
    box = np.prod(length, axis=2) * selectable
    cumulative = np.cumsum(box, axis=1) - box
    area = box.sum(axis=1)
    return np.concatenate([cumulative, length.reshape(len(keys), -1), area[:, None]], axis=1)


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
        index.locate(point, first, corner_out)
        return
    # Increasing indices of one sample (a shard's chunks): scalar n, M.
    _draw_points(index, indices, first if one_sample else sample, draw_number, seed, corner_out)


def _draw_points(
    index: _BoxIndex,
    indices: Any,
    sample: Any,
    draw_number: Any,
    seed: int,
    out: NDArray[np.int64] | None = None,
) -> tuple[int, ...] | None:
    """Draw the corner of each index in its stratum: the per-patch draw, once.

    Steps 2 to 4 of the module docstring, written with operators that act on
    NumPy arrays and Python ints alike: arrays of indices (with one draw
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
            n_patches, mass = _take(tables.n_patches, sample), _take(tables.mass_total, sample)
            first_index = _take(tables.patch_offset, sample)
            offset = _take(tables.mass_offset, sample)
    quotient, remainder = divmod(mass, n_patches)
    lower, upper = _stratum_bounds(indices - first_index, quotient, remainder, n_patches, offset)
    width = upper - lower
    if one:
        point = lower + ((word1 << 32 | word0) * width >> 64)
    else:
        width = width.view(np.uint64)
        point = _mulhi64_halves(word0, word1, width & _MASK32, width >> _SHIFT32).view(np.int64)
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
    index = _box_index(tables)
    if isinstance(indices, int):
        # One patch (random access): Python ints end to end, a few
        # microseconds where NumPy calls on one-element arrays cost more.
        views = index.views()
        flat = _search_one(views.patch_offset, indices) - 1
        corner = _draw_points(index, indices, flat, int(draw_numbers), seed)
        assert corner is not None
        return views.stack_of_sample[flat], views.sample_in_stack[flat], corner
    per_row = np.ndim(draw_numbers) > 0
    n_rows = len(indices)
    sample = np.empty(n_rows, dtype=np.int64)
    coords = np.empty((n_rows, tables.ndim), dtype=np.int64)
    for start in range(0, n_rows, _CHUNK):
        rows = slice(start, start + _CHUNK)
        chunk_sample = sample[rows]
        chunk_sample[:] = _search(tables.patch_offset, indices[rows])
        chunk_sample -= 1
        draws = np.asarray(draw_numbers[rows], dtype=np.uint64) if per_row else draw_numbers
        _draw_points(index, indices[rows], chunk_sample, draws, seed, coords[rows])
    return tables.stack_of_sample[sample], tables.sample_in_stack[sample], coords


class HostTables:
    """A host view of device tables: what the host draw reads.

    The three per-region arrays the ``(region, sub-box)`` index is built
    from (``weight``, ``subbox_mask``, ``mass_prefix``: 17 bytes per region)
    are host copies, made once per version of the tables; every other
    attribute (per-sample arrays, which are NumPy on every backend, shapes
    and the version) is the tables' own. Random access on the CUDA backend
    draws on the host: a kernel launch and a copy back per batch of a few
    dozen patches would cost more than drawing them here.

    Parameters
    ----------
    tables : RegionTables
        Tables whose per-region arrays live in another array namespace.
    """

    def __init__(self, tables: RegionTables) -> None:
        self._tables = tables
        self.weight = to_host(tables.weight)
        self.subbox_mask = to_host(tables.subbox_mask)
        self.mass_prefix = to_host(tables.mass_prefix)
        self.version = tables.version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tables, name)


def host_tables(tables: RegionTables) -> Any:
    """Return ``tables`` if they are NumPy tables, else a :class:`HostTables` mirror."""
    return tables if tables.xp is np else HostTables(tables)


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
    :class:`_BoxIndex`). A draw allocates its outputs and chunk-sized
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
        index = _box_index(tables)
        sample = np.empty(min(_CHUNK, len(indices)), dtype=np.int64)
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
        narrow = len(drawn) >= _NARROW_CORNERS and int(tables.spatial_shape.max()) < 1 << 31
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
        for start in range(0, len(wanted), _CHUNK):
            rows = slice(start, start + _CHUNK)
            if wide is None:
                coords[rows] = np.take(corner, row_of[rows], axis=0, mode="clip")
            if to_fill is not None and samples is not None:
                sample = np.take(samples, row_of[rows], mode="clip")
                _fill_names(tables, sample, to_fill, rows)
        return data_idx, sample_idx, coords, wanted
