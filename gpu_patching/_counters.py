"""Call counters shared by every process of one training, and the patches they point to.

``get_patch_spec(i)`` returns row ``i`` of epoch ``base + calls[i]`` and then
counts the call. :class:`CallCounters` keeps the counters and ``base`` in
shared memory, so that DataLoader workers (``fork`` or ``spawn``) advance the
draws of the whole training; :class:`UpcomingPatches` is each process's cache
of the patches of every index's next calls; :class:`PatchCalls` holds both
for the sampler. docs/design.md ("Call counters across processes") says who
owns the memory and how the cache bounds the cost of any access order.
"""

from __future__ import annotations

import ctypes
import multiprocessing.context
import multiprocessing.sharedctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .arrays import to_host
from .backends.host_tables import host_tables
from .backends.numpy_backend import draw_rows
from .tables import RegionTables

__all__ = ["DRAW_MASK", "CallCounters", "PatchCalls", "UpcomingPatches"]

#: Draw numbers and call counters are taken modulo ``2**32``.
DRAW_MASK = 0xFFFFFFFF


class CallCounters:
    """Per-index call counters and the epoch base, shared with child processes.

    Parameters
    ----------
    n_indices : int
        Number of patch indices.
    values : numpy.ndarray of uint32, optional
        Initial counters (zero when omitted).
    base : int, default 0
        Initial epoch base, in ``[0, 2**32)``.

    Attributes
    ----------
    n_indices : int
        Number of counters.
    array : numpy.ndarray of uint32, shape (n_indices + 1,)
        The shared words: counters, then the epoch base.
    view : memoryview
        The same words as a ``memoryview`` (indexing yields Python ints: the
        per-call path reads and writes through it).
    """

    def __init__(self, n_indices: int, values: NDArray[Any] | None = None, base: int = 0) -> None:
        self._attach(multiprocessing.sharedctypes.RawArray(ctypes.c_uint32, n_indices + 1))
        if values is not None:
            self.array[:n_indices] = values
        self.array[n_indices] = base

    def _attach(self, block: Any) -> None:
        self._block = block
        self.array = np.frombuffer(block, dtype=np.uint32)
        self.n_indices = len(self.array) - 1
        self.view = self.array.data  # a memoryview: indexing yields ints

    @property
    def base(self) -> int:
        """The epoch base (the draw number of a first call)."""
        return int(self.view[self.n_indices])

    @property
    def counts(self) -> NDArray[np.uint32]:
        """A view of the call counters (no copy)."""
        return self.array[: self.n_indices]

    def draw_numbers(self) -> NDArray[np.uint32]:
        """Return the draw number of every index's next call (``base + calls``, mod ``2**32``)."""
        return self.counts + self.array[self.n_indices]

    def reset(self, base: int, values: NDArray[Any] | None = None) -> None:
        """Set every counter (to 0, or to ``values``) and the epoch base, in place."""
        if values is None:
            self.counts.fill(0)
        else:
            self.counts[:] = values
        self.array[self.n_indices] = base

    def snapshot(self) -> tuple[int, NDArray[np.uint32]]:
        """Return ``(base, counters)``: a private copy of the values."""
        return self.base, self.counts.copy()

    def resized(self, n_indices: int) -> CallCounters:
        """Return new counters for ``n_indices``: the first ones keep their counts."""
        kept = min(n_indices, self.n_indices)
        values = np.zeros(n_indices, dtype=np.uint32)
        values[:kept] = self.counts[:kept]
        return CallCounters(n_indices, values, self.base)

    def __reduce__(self) -> tuple[Any, ...]:
        # While multiprocessing starts a process it pickles the process's
        # arguments with a pickler that passes the shared block itself to the
        # child; any other pickle is an independent copy of the values.
        if multiprocessing.context.get_spawning_popen() is not None:
            return (_shared_counters, (self._block,))
        return (CallCounters, (self.n_indices, self.counts.copy(), self.base))


class PatchCalls:
    """What a sampler keeps for ``get_patch_spec``: the counters and this process's cache.

    ``next_patch(i)`` returns the patch of index ``i`` at its next draw
    number (``base + calls[i]``) and then counts the call.

    Parameters
    ----------
    n_indices : int
        Number of patch indices.

    Attributes
    ----------
    counters : CallCounters
        The call counters and epoch base, shared with worker processes.
    upcoming : UpcomingPatches or None
        This process's cache of upcoming patches; None until a call needs it
        after the tables or the seed changed (:meth:`forget_patches`).
    """

    def __init__(self, n_indices: int) -> None:
        self.counters = CallCounters(n_indices)
        self.upcoming: UpcomingPatches | None = None

    def next_patch(
        self, index: int, tables: RegionTables, seed: int, backend: Any
    ) -> tuple[int, int, tuple[int, ...]]:
        """Return ``(data_idx, sample_idx, coords)`` of ``index``'s next call, and count it.

        Raises
        ------
        IndexError
            If ``index`` is not in ``[0, n_indices)`` (nothing is counted).
        """
        counters = self.counters
        n_patches = counters.n_indices
        if not 0 <= index < n_patches:
            raise IndexError(f"index {index} is out of range: expected 0 <= index < {n_patches}")
        calls = counters.view
        count = calls[index]
        draw = (calls[n_patches] + count) & DRAW_MASK
        upcoming = self.upcoming
        patch = None if upcoming is None else upcoming.lookup(index, draw)
        if patch is None:
            if upcoming is None or not upcoming.is_current(tables, seed):
                upcoming = self.upcoming = UpcomingPatches(tables, seed, backend)
            patch = upcoming.miss(index, draw, counters)
        # Counted once the patch is drawn: a call that fails counts nothing.
        calls[index] = (count + 1) & DRAW_MASK
        return patch

    def forget_patches(self) -> None:
        """Drop the cache (the tables or the seed changed)."""
        self.upcoming = None

    def resize(self, n_indices: int) -> None:
        """Count ``n_indices`` indices: new shared counters if the number changes.

        Processes started before keep the old counters. The first indices
        keep their counts. When the new block cannot be allocated nothing
        changes.
        """
        if self.counters.n_indices != n_indices:
            self.counters = self.counters.resized(n_indices)

    def reset(self, base: int, values: NDArray[Any] | None = None) -> None:
        """Set the epoch base and every counter (to 0, or to ``values``), in place.

        In place, so that the processes sharing the counters see the change;
        with a different number of ``values`` than counters, new counters
        (allocated first: nothing changes if that fails).
        """
        if values is not None and len(values) != self.counters.n_indices:
            self.counters = CallCounters(len(values), values, base)
        else:
            self.counters.reset(base, values)
        self.upcoming = None

    def share(self, counters: Any) -> None:
        """Use ``counters`` (received from a parent process) if they fit these indices."""
        if isinstance(counters, CallCounters) and counters.n_indices == self.counters.n_indices:
            self.counters = counters

    def snapshot(self) -> tuple[CallCounters, int, NDArray[np.uint32]]:
        """Return what :meth:`restore` needs to undo every later change."""
        base, values = self.counters.snapshot()
        return self.counters, base, values

    def restore(self, snapshot: tuple[CallCounters, int, NDArray[np.uint32]]) -> None:
        """Undo every change since :meth:`snapshot`: the same shared block, the same values."""
        counters, base, values = snapshot
        self.counters = counters
        counters.reset(base, values)
        self.upcoming = None


def _shared_counters(block: Any) -> CallCounters:
    """Rebuild counters over a block received from the parent process."""
    counters = CallCounters.__new__(CallCounters)
    counters._attach(block)
    return counters


# The tuning of UpcomingPatches, by mechanism: one frozen instance of each,
# read at each use (so a test can swap in a dataclasses.replace of one).
@dataclass(frozen=True)
class _Windows:
    """How many draws of each index the cache holds.

    Attributes
    ----------
    cache_rows : int
        Rows of windows the cache holds for small samplers (``depth * n_patches``).
    max_depth : int
        Longest window of draws per index.
    """

    cache_rows: int = 1 << 10
    max_depth: int = 8


@dataclass(frozen=True)
class _Refills:
    """When the cache refills every window the counters moved past, and by how much at once.

    Attributes
    ----------
    stale_fraction : float
        The first miss after a refill refills every window if this fraction is behind.
    probes : int
        Windows probed to estimate that fraction.
    min_misses : int
        Misses served one by one before a refill: at least this many ...
    miss_ratio : int
        ... and one per this many indices (a refill compares every window).
    fill_block : int
        Indices whose windows are drawn in one pass (bounds a refill's temporaries).
    """

    stale_fraction: float = 0.5
    probes: int = 64
    min_misses: int = 16
    miss_ratio: int = 256
    fill_block: int = 1 << 16


@dataclass(frozen=True)
class _HotWindows:
    """When an index that keeps missing gets a long window of its own.

    Attributes
    ----------
    after_misses : int
        An index's misses served one by one before it gets a window of its own
        (a vectorised draw of a few rows costs about as much as this many
        one-patch draws).
    first_length, max_length : int
        That window's length, doubled at each further miss up to the last.
    warm_misses : int
        Indices with this many misses get a first window with the next index
        that needs one (one vectorised draw for many windows) ...
    max_batch : int
        ... up to this many at once.
    max_rows : int
        Rows of long windows kept at most (all are dropped beyond).
    max_remembered_misses : int
        Indices whose misses are remembered at most (forgotten beyond).
    """

    after_misses: int = 8
    first_length: int = 64
    max_length: int = 1024
    warm_misses: int = 3
    max_batch: int = 256
    max_rows: int = 1 << 18
    max_remembered_misses: int = 1 << 16


_WINDOWS = _Windows()
_REFILLS = _Refills()
_HOT = _HotWindows()


class UpcomingPatches:
    """One process's cache of the patches of every index's next calls.

    Holds, for each index ``i``, the patches of the draw numbers
    ``first[i] .. first[i] + depth - 1`` (mod ``2**32``), and long windows for a
    few indices that keep missing. Built for one version of the tables and
    one seed; the sampler drops it when either changes.

    Parameters
    ----------
    tables : RegionTables
        The sampler's tables (any backend).
    seed : int
        The 64-bit seed.
    backend : Backend
        The sampler's backend (its epoch draw fills uniform windows).
    """

    def __init__(self, tables: RegionTables, seed: int, backend: Any) -> None:
        n_patches = tables.total_patches
        self.tables = tables
        self.version = tables.version
        self.seed = seed
        self._backend = backend
        self._host: Any = None
        self.ndim = tables.ndim
        # Small samplers keep many draws per index: with indices drawn with
        # replacement an index is then rarely past its window.
        self.depth = max(1, min(_WINDOWS.max_depth, _WINDOWS.cache_rows // max(n_patches, 1)))
        self.first = np.zeros(n_patches, dtype=np.uint32)
        fits_int32 = int(np.max(tables.spatial_shape, initial=0)) < 1 << 31
        coord_type = np.int32 if fits_int32 else np.int64
        self.sample = np.zeros(n_patches * self.depth, dtype=np.int32)
        self.coords = np.zeros(n_patches * self.depth * self.ndim, dtype=coord_type)
        self.first_view = self.first.data
        self.sample_view = self.sample.data
        self.coords_view = self.coords.data
        self.names = list(
            zip(tables.stack_of_sample.tolist(), tables.sample_in_stack.tolist(), strict=True)
        )
        self.filled = False
        # Set once filled, when every index holds one draw of a 2D patch: the
        # sampler then reads the cache inline.
        self.compact_2d = False
        # Evenly spread indices whose windows estimate how many are behind.
        probes = np.linspace(0, max(n_patches - 1, 0), _REFILLS.probes)
        self._probes = np.unique(probes.astype(np.int64))
        # index -> (first draw, window length, flat samples, flat coords) of
        # repeating indices: windows of their own, valid until the tables change.
        self.hot: dict[int, tuple[int, int, memoryview, memoryview]] = {}
        self._hot_rows = 0
        self._hot_misses: dict[int, int] = {}
        # Indices with a few misses, whose windows the next window draw adds.
        self._warm: set[int] = set()
        # Misses served one by one since the last refill, and how many pay for one.
        self._misses = 0
        self._refill_after = max(_REFILLS.min_misses, n_patches // _REFILLS.miss_ratio)

    def is_current(self, tables: RegionTables, seed: int) -> bool:
        """Say whether this cache was built for these tables and this seed."""
        return tables is self.tables and tables.version == self.version and seed == self.seed

    def lookup(self, index: int, draw: int) -> tuple[int, int, tuple[int, ...]] | None:
        """Return ``(data_idx, sample_idx, coords)`` of ``(index, draw)``, or None if not cached."""
        offset = (draw - self.first_view[index]) & DRAW_MASK
        if offset < self.depth and self.filled:
            row = index * self.depth + offset
            data_idx, sample_idx = self.names[self.sample_view[row]]
            base = row * self.ndim
            if self.ndim == 2:
                coords: tuple[int, ...] = (self.coords_view[base], self.coords_view[base + 1])
            else:
                coords = tuple(self.coords_view[base : base + self.ndim])
            return data_idx, sample_idx, coords
        window = self.hot.get(index)
        if window is not None:
            offset = (draw - window[0]) & DRAW_MASK
            if offset < window[1]:
                data_idx, sample_idx = self.names[window[2][offset]]
                base = offset * self.ndim
                return data_idx, sample_idx, tuple(window[3][base : base + self.ndim])
        return None

    def miss(
        self, index: int, draw: int, counters: CallCounters
    ) -> tuple[int, int, tuple[int, ...]]:
        """Return the patch of ``(index, draw)``, which :meth:`lookup` did not have.

        ``draw`` is the index's next draw number (its counter not yet moved).
        Every window the counters moved past is refilled, in one vectorised
        pass, when most of them are (the first miss of a new pass over the
        data, or after ``set_epoch``), or once enough misses have been served
        one by one since the last refill to pay for it (indices drawn with
        replacement move past their windows a few at a time). In between a
        miss is drawn on its own (``draw_rows`` of one index, in Python ints),
        and an index that keeps missing (``_HOT.after_misses`` times) gets a
        window of its own, longer at each further miss.
        """
        if not self.filled:
            return self._refill(index, draw, counters)
        repeats = self._hot_misses.get(index, 0)
        if repeats >= _HOT.after_misses:
            # A repeating index: a window of its own, twice as long at each
            # further miss; it stays valid across refills.
            self._hot_misses[index] = repeats + 1
            length = _HOT.first_length << min(repeats - _HOT.after_misses, 5)
            self._fill_hot(index, draw, min(_HOT.max_length, length), counters)
            patch = self.lookup(index, draw)
            assert patch is not None  # the window starts at `draw`
            return patch
        self._misses += 1
        if self._misses >= self._refill_after or (
            self._misses == 1 and self._stale_fraction(counters) >= _REFILLS.stale_fraction
        ):
            return self._refill(index, draw, counters)
        if len(self._hot_misses) >= _HOT.max_remembered_misses:
            self._hot_misses.clear()
        self._hot_misses[index] = repeats + 1
        if repeats + 1 == _HOT.warm_misses:
            # Likely to need a window soon: drawn with the next one needed.
            if len(self._warm) >= _HOT.max_batch:
                self._warm.clear()
            self._warm.add(index)
        return draw_rows(self._host_tables(), index, draw, self.seed)  # type: ignore[no-any-return]

    def _refill(
        self, index: int, draw: int, counters: CallCounters
    ) -> tuple[int, int, tuple[int, ...]]:
        next_draws = counters.draw_numbers()
        if self.filled:
            stale = np.flatnonzero((next_draws - self.first) >= self.depth)
        else:
            stale = np.arange(len(next_draws), dtype=np.int64)
        # Not filled while it is written: a refill that stops half way (an
        # exception, an interrupt) leaves a cache that the next miss refills
        # whole, never windows that claim draws they do not hold.
        self.filled = self.compact_2d = False
        self._fill_windows(stale, next_draws[stale])
        self.filled = True
        self.compact_2d = self.depth == 1 and self.ndim == 2
        self._misses = 0
        patch = self.lookup(index, draw)
        assert patch is not None  # `draw` is the index's next draw: its window starts there
        return patch

    def _stale_fraction(self, counters: CallCounters) -> float:
        """Estimate the fraction of windows the counters moved past, from a few probes."""
        probes = self._probes
        behind = (counters.array[probes] + counters.array[-1]) - self.first[probes]
        return float(np.count_nonzero(behind >= self.depth)) / len(probes)

    def _fill_windows(self, stale: NDArray[np.int64], first: NDArray[np.uint32]) -> None:
        """Draw the windows of the ``stale`` indices, starting at draw numbers ``first``."""
        # By blocks of indices, so that the draws' outputs and temporaries
        # stay a few megabytes whatever the number of patches.
        for start in range(0, len(stale), _REFILLS.fill_block):
            block = slice(start, start + _REFILLS.fill_block)
            self._fill_block(stale[block], first[block])

    def _fill_block(self, stale: NDArray[np.int64], first: NDArray[np.uint32]) -> None:
        """:meth:`_fill_windows` of a block of increasing indices."""
        depth = self.depth
        if not len(stale):
            return
        if depth == 1 and int(first.min()) == int(first.max()):
            # Every index at one draw number (sequential or shuffled passes):
            # the backend's epoch draw, its fastest path (on a range when the
            # indices are consecutive).
            consecutive = int(stale[-1]) - int(stale[0]) == len(stale) - 1
            rows: Any = range(int(stale[0]), int(stale[-1]) + 1) if consecutive else stale
            data_idx, sample_idx, coords, _ = self._backend.draw(
                self.tables, rows, int(first[0]), self.seed
            )
            data_idx, sample_idx, coords = (
                to_host(data_idx),
                to_host(sample_idx),
                to_host(coords),
            )
            slots = stale
        else:
            indices = np.repeat(stale, depth)
            offsets = np.tile(np.arange(depth, dtype=np.uint32), len(stale))
            draws = (np.repeat(first, depth) + offsets).astype(np.int64)
            data_idx, sample_idx, coords = draw_rows(self._host_tables(), indices, draws, self.seed)
            slots = (indices * depth + offsets).astype(np.int64)
        tables = self.tables
        self.sample[slots] = tables.first_sample[data_idx] + sample_idx
        self.coords.reshape(-1, self.ndim)[slots] = coords
        self.first[stale] = first

    def _fill_hot(self, index: int, draw: int, length: int, counters: CallCounters) -> None:
        """Give ``index`` the window ``draw .. draw + length - 1``, and warm indices theirs."""
        self._warm.discard(index)
        windows = [(index, draw, length)]
        base = counters.base
        while self._warm and len(windows) < _HOT.max_batch:
            other = self._warm.pop()
            windows.append((other, (base + counters.view[other]) & DRAW_MASK, _HOT.first_length))
        rows = sum(window[2] for window in windows)
        if self._hot_rows + rows > _HOT.max_rows:
            self.hot.clear()
            self._hot_rows = 0
        lengths = np.array([window[2] for window in windows], dtype=np.int64)
        starts = np.array([window[1] for window in windows], dtype=np.int64)
        indices = np.repeat(np.array([window[0] for window in windows], dtype=np.int64), lengths)
        # Draw k of each window: its first draw plus k (mod 2**32).
        offsets = np.arange(rows, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        draws = (np.repeat(starts, lengths) + offsets) & DRAW_MASK
        data_idx, sample_idx, coords = draw_rows(self._host_tables(), indices, draws, self.seed)
        samples = (self.tables.first_sample[data_idx] + sample_idx).astype(np.int32)
        flat = coords.astype(self.coords.dtype).reshape(-1)
        first_row = 0
        for other, start, window_length in windows:
            old = self.hot.pop(other, None)
            if old is not None:
                self._hot_rows -= old[1]
            last_row = first_row + window_length
            self.hot[other] = (
                start,
                window_length,
                samples[first_row:last_row].data,
                flat[first_row * self.ndim : last_row * self.ndim].data,
            )
            self._hot_rows += window_length
            first_row = last_row

    def _host_tables(self) -> Any:
        if self._host is None:
            self._host = host_tables(self.tables)
        return self._host
