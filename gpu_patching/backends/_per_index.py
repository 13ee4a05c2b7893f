"""Patches of many indices, each at its own draw number, on the host.

``get_patch_spec(i)`` uses draw number ``base + calls[i]``, so with indices
drawn with replacement (or any order in which the call counts drift apart)
the patches it needs belong to many different epochs. Drawing a whole epoch
per draw number would cost O(n_patches) per call; :func:`draw_each` draws
exactly the ``(index, draw number)`` pairs asked for, vectorised, so that the
sampler can fill its per-process cache of upcoming patches in batches
(:mod:`gpu_patching._counters`).

It is the vectorised NumPy draw of :mod:`~gpu_patching.backends.numpy_backend`
with one draw number per row instead of one per call: the same Philox
counters (:mod:`gpu_patching.rng` broadcasts a draw-number array), the same
stratum bounds, the same ``(region, sub-box)`` index and the same locate, so
its rows equal the rows of ``sample_epoch(k)`` bit for bit (the tests compare
them on random access orders).

With the CUDA backend the per-region tables live on the device; a
:class:`HostTables` mirror copies the three arrays the ``(region, sub-box)``
index is built from (``weight``, ``subbox_mask``, ``mass_prefix``: 17 bytes per
region) to the host once per version of the tables, and the per-index draws
run on the host too: a kernel launch and a copy back per batch of a few dozen
patches would cost more than drawing them here.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import grid, rng
from ..tables import RegionTables
from .numpy_backend import _box_index, _mulhi64_halves, _stratum_bounds

__all__ = ["HostTables", "ScalarDraw", "draw_each", "host_tables"]

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
#: Rows per vectorised pass: keeps the temporaries cache-resident.
_CHUNK = 8192


class HostTables:
    """A host view of device tables: what the NumPy backend's index reads.

    The three per-region arrays the ``(region, sub-box)`` index is built
    from are host copies; every other attribute (per-sample arrays, which are
    NumPy on every backend, shapes and the version) is the tables' own.

    Parameters
    ----------
    tables : RegionTables
        Tables whose per-region arrays live in another array namespace.
    """

    def __init__(self, tables: RegionTables) -> None:
        self._tables = tables
        self.weight = _to_numpy(tables.weight)
        self.subbox_mask = _to_numpy(tables.subbox_mask)
        self.mass_prefix = _to_numpy(tables.mass_prefix)
        self.version = tables.version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tables, name)


def _to_numpy(values: Any) -> NDArray[Any]:
    """Return a device or host array as a NumPy array."""
    get = getattr(values, "get", None)
    return np.asarray(get() if callable(get) and not isinstance(values, np.ndarray) else values)


def host_tables(tables: RegionTables) -> Any:
    """Return ``tables`` if they are NumPy tables, else a :class:`HostTables` mirror."""
    return tables if tables.xp is np else HostTables(tables)


def draw_each(
    tables: Any,
    indices: NDArray[np.int64],
    draw_numbers: NDArray[np.int64],
    seed: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Draw the patch of every ``(index, draw number)`` pair.

    Parameters
    ----------
    tables : RegionTables or HostTables
        The sampler's tables as NumPy arrays (see :func:`host_tables`).
    indices : numpy.ndarray of int64, shape (N,)
        Global patch indices, each in ``[0, total_patches)`` (not checked).
    draw_numbers : numpy.ndarray of int64, shape (N,)
        The draw number of each row, each in ``[0, 2**32)`` (not checked).
    seed : int
        The 64-bit seed.

    Returns
    -------
    data_idx, sample_idx : numpy.ndarray of int64, shape (N,)
        Stack, and sample within the stack, of each patch.
    coords : numpy.ndarray of int64, shape (N, d)
        Row ``r`` is row ``indices[r]`` of ``sample_epoch(draw_numbers[r])``.
    """
    index = _box_index(tables)
    n_rows = len(indices)
    sample = np.empty(n_rows, dtype=np.int64)
    coords = np.empty((n_rows, tables.ndim), dtype=np.int64)
    for start in range(0, n_rows, _CHUNK):
        rows = slice(start, start + _CHUNK)
        chunk = indices[rows]
        chunk_sample = np.searchsorted(tables.patch_offset, chunk, side="right")
        chunk_sample -= 1
        sample[rows] = chunk_sample
        word0, word1 = rng.random_uint32_pair(
            seed,
            chunk,
            draw_numbers[rows].astype(np.uint64),  # type: ignore[arg-type]
            rng.PURPOSE_STRATUM,
        )
        n_patches = tables.n_patches[chunk_sample]
        quotient, remainder = np.divmod(tables.mass_total[chunk_sample], n_patches)
        stratum = chunk - tables.patch_offset[chunk_sample]
        lower, upper = _stratum_bounds(
            stratum, quotient, remainder, n_patches, tables.mass_offset[chunk_sample]
        )
        width = (upper - lower).view(np.uint64)
        point = _mulhi64_halves(word0, word1, width & _MASK32, width >> _SHIFT32).view(np.int64)
        point += lower
        index.locate(point, chunk_sample, coords[rows])
    return tables.stack_of_sample[sample], tables.sample_in_stack[sample], coords


def _view(values: Any) -> memoryview:
    """Return an array as a flat ``memoryview`` of int64 (indexing yields Python ints)."""
    return np.ascontiguousarray(values, dtype=np.int64).reshape(-1).data


class ScalarDraw:
    """The patch of one ``(index, draw number)``, in plain Python integers.

    :func:`draw_each` for a single row, in about a hundred Python operations
    instead of a hundred NumPy calls: one Philox evaluation in Python ints
    (:func:`gpu_patching.rng.random_pair_int`),
    the stratum's bounds, one ``bisect`` over the mass prefix of the index's
    sample (read through a ``memoryview``, without a copy) for the region,
    and then the corner of the rank inside the region by the rule of the
    sampling model (selectable sub-boxes in bit order, row-major inside a
    sub-box; see :mod:`gpu_patching.grid`). Python integers are exact, so
    each step gives the integers the vectorised draws give in int64/uint64;
    the tests compare the two with ``sample_epoch`` rows.

    Parameters
    ----------
    tables : RegionTables or HostTables
        The sampler's tables as NumPy arrays (see :func:`host_tables`).
    seed : int
        The 64-bit seed.
    """

    def __init__(self, tables: Any, seed: int) -> None:
        self._tables = tables  # keeps the arrays behind the views alive
        self._ndim = ndim = tables.ndim
        self._patch_size = tuple(int(p) for p in tables.patch_size)
        self._seed = seed
        self._mass_prefix = _view(tables.mass_prefix)
        self._weight = _view(tables.weight)
        self._subbox_mask = np.ascontiguousarray(tables.subbox_mask, dtype=np.uint8).data
        self._patch_offset = _view(tables.patch_offset)
        self._boxes = list(enumerate(grid.subbox_offsets(ndim)))
        # Per stack: its grid shape, and per axis the corners of part 0 and
        # part 1 of every cell.
        self._grids: list[tuple[int, ...]] = []
        self._parts: list[list[tuple[list[int], list[int]]]] = []
        for stack in range(tables.n_stacks):
            first = int(tables.first_sample[stack])
            if first == int(tables.first_sample[stack + 1]):
                self._grids.append(())
                self._parts.append([])
                continue
            shape = [int(s) for s in tables.spatial_shape[first]]
            cells = tables.sample_grid(first)
            self._grids.append(cells)
            axes = []
            for axis in range(ndim):
                part0, part1 = grid.axis_part_sizes(
                    shape[axis], self._patch_size[axis], cells[axis]
                )
                axes.append((part0.tolist(), part1.tolist()))
            self._parts.append(axes)
        n_patches = tables.n_patches
        quotient, remainder = np.divmod(tables.mass_total, np.maximum(n_patches, 1))
        # One row of int64 scalars per sample, read through one view.
        self._samples = _view(
            np.stack(
                [
                    tables.patch_offset[:-1],
                    n_patches,
                    quotient,
                    remainder,
                    tables.mass_offset[:-1],
                    tables.region_offset[:-1],
                    tables.region_offset[1:],
                    tables.stack_of_sample,
                    tables.sample_in_stack,
                ],
                axis=1,
            )
        )

    def draw(self, index: int, draw_number: int) -> tuple[int, int, tuple[int, ...]]:
        """Return ``(data_idx, sample_idx, coords)`` of one index at one draw number.

        Parameters
        ----------
        index : int
            Global patch index, ``0 <= index < n_patches`` (not checked).
        draw_number : int
            Draw number, in ``[0, 2**32)`` (not checked).

        Returns
        -------
        tuple
            Row ``index`` of ``sample_epoch(draw_number)``: its stack, sample
            in the stack, and corner.
        """
        sample = bisect_right(self._patch_offset, index) - 1
        row = sample * 9
        (
            first_index,
            n_patches,
            quotient,
            remainder,
            mass_offset,
            first_region,
            end_region,
            stack,
            sample_idx,
        ) = self._samples[row : row + 9].tolist()
        stratum = index - first_index
        lower = stratum * quotient + stratum * remainder // n_patches + mass_offset
        stratum += 1
        upper = stratum * quotient + stratum * remainder // n_patches + mass_offset
        word0, word1 = rng.random_pair_int(self._seed, index, draw_number, rng.PURPOSE_STRATUM)
        point = lower + (((word1 << 32 | word0) * (upper - lower)) >> 64)
        prefix = self._mass_prefix
        # The regions of the sample only (its points lie in its mass range);
        # an empty region shares its prefix with the next one, never chosen.
        region = bisect_right(prefix, point, first_region, end_region) - 1
        rank = (point - prefix[region]) // self._weight[region]
        mask = self._subbox_mask[region]
        ndim = self._ndim
        # The region's cell, row-major in the sample's grid.
        cell = region - first_region
        grid_shape = self._grids[stack]
        cell_of = [0] * ndim
        for axis in range(ndim - 1, 0, -1):
            cell, cell_of[axis] = divmod(cell, grid_shape[axis])
        cell_of[0] = cell
        parts = self._parts[stack]
        lengths = [(parts[axis][0][g], parts[axis][1][g]) for axis, g in enumerate(cell_of)]
        # The selectable sub-boxes in bit order: the first whose corners hold the rank.
        offsets: tuple[int, ...] = ()
        for bit, offsets in self._boxes:
            if mask >> bit & 1:
                size = 1
                for axis, part in enumerate(offsets):
                    size *= lengths[axis][part]
                if rank < size:
                    break
                rank -= size
        patch = self._patch_size
        corner = [0] * ndim
        for axis in range(ndim - 1, 0, -1):
            rank, offset = divmod(rank, lengths[axis][offsets[axis]])
            corner[axis] = cell_of[axis] * patch[axis] + offsets[axis] + offset
        corner[0] = cell_of[0] * patch[0] + offsets[0] + rank
        return stack, sample_idx, tuple(corner)
