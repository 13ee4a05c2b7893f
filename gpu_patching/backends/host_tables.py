"""What the host draw reads: host copies of the tables and the index that locates a mass point.

:class:`BoxIndex` takes a global mass point to its corner in a few NumPy calls
(or Python-int reads through :class:`IntViews`); :class:`HostTables` mirrors
device tables on the host. Both serve :mod:`gpu_patching.backends.numpy_backend`
(step 4 of the draw) and are rebuilt when the tables' ``version`` changes.
"""

from __future__ import annotations

import operator
import weakref
from bisect import bisect_right as search_one
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .. import grid
from ..arrays import to_host
from ..tables import RegionTables

__all__ = [
    "CACHED_PATCHES",
    "KEPT_KEYS",
    "KEY_ROWS",
    "BoxIndex",
    "HostTables",
    "IntViews",
    "box_index",
    "host_tables",
    "search",
    "search_one",
    "take",
    "take_one",
]

#: Largest sampler (in patches) whose epoch chunks keep their draw-independent
#: parts between epochs (56 bytes per patch: at most 28 MiB).
CACHED_PATCHES = 1 << 19


class BoxIndex:
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
        # The epoch draw's parts kept between epochs for samplers of at most
        # CACHED_PATCHES patches (numpy_backend's consecutive chunks):
        # Philox prefixes by (seed, first index, rows) (tables-independent),
        # and stratum bounds by (first index, rows) (rebuilt with the layouts).
        self.cache_chunks = tables.total_patches <= CACHED_PATCHES
        self.prefixes: dict[tuple[int, int, int], Any] = {}
        self.bounds: dict[tuple[int, int], tuple[NDArray[np.int64], ...]] = {}
        self._patch_offset = np.empty(0, dtype=np.int64)
        self._views: IntViews | None = None
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
        self.cache_chunks = tables.total_patches <= CACHED_PATCHES
        self.bounds = {}
        # Prefixes depend on the chunk layout only: keep them while the
        # samples' patch ranges stay, so that updates never pile them up.
        if not np.array_equal(self._patch_offset, tables.patch_offset):
            self.prefixes = {}
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
                if kept_keys is not None and key.size <= KEPT_KEYS:
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

    def locate(
        self,
        point: Any,
        sample: int | NDArray[np.int64],
        out: NDArray[np.int64] | None = None,
        views: IntViews | None = None,
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
        views : IntViews, optional
            :meth:`views`, when the caller has them at hand.

        Returns
        -------
        tuple of int or None
            The corner of a single point; None for arrays (see ``out``).
        """
        one = isinstance(point, int)
        tables: Any = (views or self.views()) if one else self
        find, read = (search_one, take_one) if one else (search, take)
        region = find(tables.mass_prefix, point)
        region -= 1
        rank = point
        rank -= read(tables.mass_prefix, region)
        if self.weight_shift >= 0:
            rank >>= self.weight_shift
        elif self.uniform_weight:
            rank //= self.uniform_weight
        else:
            rank //= read(tables.weight, region)
        key = read(tables.layout_base, read(tables.layout, region))
        key += rank
        entry = find(tables.entry_start, key)
        entry -= 1
        inside = key
        inside -= read(tables.entry_start, entry)  # rank in the sub-box
        # The region's cell, row-major in its sample's grid.
        cell = region
        shared = isinstance(sample, int)
        cell -= tables.region_offset[sample] if shared else read(tables.region_offset, sample)
        corner: list[Any] = [0] * self.ndim
        # Row-major inside the sub-box too: the last axis varies fastest, and
        # what is left of the rank is the offset along the first axis.
        for axis in range(self.ndim - 1, 0, -1):
            cells = tables.sample_cells[axis]
            cell, along = divmod(cell, cells[sample] if shared else read(cells, sample))
            inside, offset = divmod(inside, read(tables.entry_length[axis], entry))
            along *= self.patch_size[axis]
            along += offset
            along += read(tables.entry_part[axis], entry)
            corner[axis] = along
        cell *= self.patch_size[0]
        cell += inside
        cell += read(tables.entry_part[0], entry)
        corner[0] = cell
        if one:
            return tuple(corner)
        assert out is not None
        for axis in range(self.ndim):
            out[:, axis] = corner[axis]
        return None

    def views(self) -> IntViews:
        """Return the index's and the tables' arrays as ``memoryview``s of int64.

        Indexing a ``memoryview`` yields a Python int: the one-point draw
        reads its tables through these. Made once per version of the tables.
        """
        if self._views is None or self._views.version != self.version:
            self._views = IntViews(self)
        return self._views


def search(values: NDArray[np.int64], point: Any) -> Any:
    """Return the index after the last value ``<= point``, per point (arrays)."""
    return np.searchsorted(values, point, side="right")


def take(values: NDArray[Any], rows: Any) -> Any:
    """``values[rows]``; every row is valid, so mode="clip" only skips the checks."""
    return np.take(values, rows, mode="clip")


#: ``values[row]`` of a ``memoryview``: a Python int (a C call, no Python frame).
take_one = operator.getitem


def as_int_view(values: Any) -> memoryview:
    """Return an array as a flat ``memoryview`` of int64 (indexing yields Python ints)."""
    return np.ascontiguousarray(values, dtype=np.int64).reshape(-1).data


class IntViews:
    """The arrays of a :class:`BoxIndex` and its tables as int64 ``memoryview``s.

    Under the index's names, so that the one-point draw reads either alike.
    The annotations below are the list of names: a ``memoryview`` is one of
    the index's flat arrays, a ``list[memoryview]`` one of its lists of one
    array per axis.
    """

    mass_prefix: memoryview
    weight: memoryview
    layout: memoryview
    layout_base: memoryview
    entry_start: memoryview
    region_offset: memoryview
    patch_offset: memoryview
    n_patches: memoryview
    mass_total: memoryview
    mass_offset: memoryview
    stack_of_sample: memoryview
    sample_in_stack: memoryview
    sample_cells: list[memoryview]
    entry_part: list[memoryview]
    entry_length: list[memoryview]

    def __init__(self, index: BoxIndex) -> None:
        self.version: int = index.version
        # The class's own annotations, strings under ``from __future__ import annotations``.
        for name, kind in IntViews.__annotations__.items():
            values = getattr(index, name)
            if kind == "memoryview":
                setattr(self, name, as_int_view(values))
            else:
                setattr(self, name, [as_int_view(axis) for axis in values])


class _StackClasses(NamedTuple):
    """The static part of one stack's layouts (see :class:`BoxIndex`)."""

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
KEY_ROWS = 1 << 20
#: Stacks of at most this many regions keep their keys between the two passes.
KEPT_KEYS = 1 << 16


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
    if n_cells <= KEY_ROWS:
        step = max(1, KEY_ROWS // max(n_cells, 1))
        for start in range(first, last, step):
            stop = min(start + step, last)
            rows = slice(offset + (start - first) * n_cells, offset + (stop - first) * n_cells)
            key = tables.subbox_mask[rows].reshape(stop - start, n_cells).astype(key_type)
            key *= classes.n_combinations
            key += classes.combination
            yield rows, key
        return
    for sample in range(last - first):
        for start in range(0, n_cells, KEY_ROWS):
            stop = min(start + KEY_ROWS, n_cells)
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
_BOX_INDEXES: weakref.WeakKeyDictionary[RegionTables, BoxIndex] = weakref.WeakKeyDictionary()


def box_index(tables: RegionTables) -> BoxIndex:
    """Return the up-to-date :class:`BoxIndex` of ``tables``."""
    index = _BOX_INDEXES.get(tables)
    if index is None:
        index = _BOX_INDEXES[tables] = BoxIndex(tables)
    else:
        index.refresh(tables)
    return index


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
