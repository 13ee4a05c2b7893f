"""Flat region tables over every sample of every stack ("struct of arrays").

A region is a row of flat arrays and a sample a contiguous range of rows, in
``(data_idx, sample_idx)`` order, row-major inside a sample; per-region arrays
live in the backend's namespace (NumPy or CuPy), the per-sample scalars the
host needs in NumPy. :class:`RegionTables` rebuilds the rows of one sample from
its exclusions and probabilities; it validates no input (``strategy`` does)
but checks the limits that keep every integer exact, and commits only once
everything is computed (``docs/design.md``, "Tables").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import grid
from .arrays import to_host

__all__ = [
    "MAX_AXIS_LENGTH",
    "MAX_PATCHES_PER_SAMPLE",
    "MAX_TOTAL_MASS",
    "MAX_TOTAL_REGIONS",
    "RegionTables",
    "check_size_limits",
]

#: Upper bound on the patches of one sample; keeps ``j * (M % n)`` in int64.
MAX_PATCHES_PER_SAMPLE = (1 << 31) - 1
#: Upper bound on the summed mass of all regions; keeps every prefix in int64.
MAX_TOTAL_MASS = 1 << 62
#: Upper bound on the regions (grid cells) of all samples. Every region is a
#: row of several flat arrays (tens of bytes), so 2**40 rows would be tens of
#: terabytes: a shape that asks for more is a mistake, refused before any
#: allocation rather than failing in the allocator.
MAX_TOTAL_REGIONS = 1 << 40
#: Upper bound on a spatial axis or a patch size: corners and cell starts are
#: int64, and ``D + 1`` must not wrap.
MAX_AXIS_LENGTH = 1 << 62
#: Lower bounds on what the tables keep: bytes per region (the per-region
#: arrays), per sample (the per-sample arrays) and per patch (the call
#: counters). Used to refuse, up front, tables larger than the machine.
_REGION_BYTES, _SAMPLE_BYTES, _PATCH_BYTES = 34, 96, 4
#: Values per block of the float64 mass estimate of an update.
_ESTIMATE_VALUES = 1 << 18


def _physical_memory_bytes() -> int | None:
    """Return the machine's physical memory, or None where it is not known."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


@dataclass
class _SampleUpdate:
    """Rows and scalars of one or more samples, computed but not yet committed."""

    excluded: Any
    probability: Any
    set_order: Any
    weight: Any
    subbox_mask: Any
    mass: Any
    n_excluded: NDArray[np.int64]
    budget: NDArray[np.float64]
    mass_total: NDArray[np.int64]
    mass_estimate: NDArray[np.float64]


def check_size_limits(
    spatial_shapes: Sequence[Sequence[int]],
    samples_per_stack: Sequence[int],
    patch_size: Sequence[int],
) -> None:
    """Refuse, before anything is allocated, stacks whose tables break a limit.

    Everything is computed from the shapes with Python integers (no array of
    the size being checked is made): the axis lengths, the regions of all
    samples, the patches of each sample with nothing excluded and every
    probability 1 (the tables' state after construction, computed by the
    same float64 expression as :func:`grid.patches_per_sample`), the total
    sampling mass (every valid corner weighs ``grid.PROB_ONE``) and the
    memory the tables need at the least, against the machine's. The patches
    of all samples need no limit of their own: at most ``MAX_TOTAL_REGIONS``
    at construction and ``MAX_PROBABILITY`` times as many after updates, far
    below the ``2**62`` positions an epoch's permutation orders.

    Parameters
    ----------
    spatial_shapes : sequence of sequence of int
        ``(Z)YX`` shape of each stack (positive; shape checks come first).
    samples_per_stack : sequence of int
        Number of samples of each stack.
    patch_size : sequence of int
        Patch size per spatial axis.

    Raises
    ------
    ValueError
        Naming the stack (``data_shapes[k]``), its shape, the patch size and
        the limit it breaks.
    """
    patch = tuple(int(p) for p in patch_size)
    total_regions = total_patches = total_corners = 0
    for stack, (spatial, n_samples) in enumerate(
        zip(spatial_shapes, samples_per_stack, strict=True)
    ):
        spatial = tuple(int(s) for s in spatial)
        n_samples = int(n_samples)
        name = f"data_shapes[{stack}] ({n_samples} samples of (Z)YX shape {spatial})"
        longest = max(max(spatial), max(patch))
        if longest > MAX_AXIS_LENGTH:
            raise ValueError(
                f"{name} with patch_size {patch} has an axis of {longest}, more than the "
                f"supported {MAX_AXIS_LENGTH} (2**62)"
            )
        n_cells = grid.cell_count(grid.grid_shape(spatial, patch))
        total_regions += n_samples * n_cells
        if total_regions > MAX_TOTAL_REGIONS:
            raise ValueError(
                f"{name} with patch_size {patch} brings the grid cells (sampling regions) "
                f"of all stacks to {total_regions}, more than the supported "
                f"{MAX_TOTAL_REGIONS} (2**40); use a larger patch size or less data"
            )
        # The patch count of a fresh sample, as grid.patches_per_sample has it.
        base = 1.0
        for length, size in zip(spatial, patch, strict=True):
            base *= float(length) / float(size)
        corners = 1
        for length, size in zip(spatial, patch, strict=True):
            corners *= max(0, length - size + 1)
        per_sample = max(1, math.ceil(base)) if corners else 0
        if per_sample > MAX_PATCHES_PER_SAMPLE:
            raise ValueError(
                f"{name} with patch_size {patch} would have {per_sample} patches per "
                f"sample, more than the supported {MAX_PATCHES_PER_SAMPLE} (2**31 - 1); "
                f"use a larger patch size or split the samples"
            )
        total_patches += n_samples * per_sample
        total_corners += n_samples * corners
        if total_corners * grid.PROB_ONE >= MAX_TOTAL_MASS:
            raise ValueError(
                f"{name} with patch_size {patch} brings the patch positions of all stacks "
                f"to {total_corners}, whose sampling mass ({grid.PROB_ONE} per position) "
                f"reaches the supported {MAX_TOTAL_MASS} (2**62); use less data"
            )
    n_samples_total = sum(int(s) for s in samples_per_stack)
    needed = (
        _REGION_BYTES * total_regions
        + _SAMPLE_BYTES * n_samples_total
        + _PATCH_BYTES * total_patches
    )
    memory = _physical_memory_bytes()
    if memory is not None and needed > memory:
        shapes = [tuple(int(s) for s in shape) for shape in spatial_shapes[:4]]
        more = ", ..." if len(spatial_shapes) > 4 else ""
        raise ValueError(
            f"{n_samples_total} samples of (Z)YX shapes {str(shapes)[:-1]}{more}] with "
            f"patch_size {patch} "
            f"({total_regions} grid cells, {total_patches} patches) need at least "
            f"{needed / 2**30:.1f} GiB for their tables, more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory"
        )


class RegionTables:
    """Per-region and per-sample tables of a stratified sampler.

    Parameters
    ----------
    spatial_shapes : sequence of tuple of int
        ``(Z)YX`` shape of each stack (all samples of a stack share it).
    samples_per_stack : sequence of int
        Number of samples ``S`` of each stack.
    patch_size : tuple of int
        Patch size per spatial axis.
    xp : module
        Array namespace for the per-region arrays (``numpy`` or ``cupy``).

    Raises
    ------
    ValueError
        If the shapes break a size limit (:func:`check_size_limits`), before
        anything is allocated.
    """

    def __init__(
        self,
        spatial_shapes: Sequence[tuple[int, ...]],
        samples_per_stack: Sequence[int],
        patch_size: tuple[int, ...],
        xp: Any = np,
    ) -> None:
        check_size_limits(spatial_shapes, samples_per_stack, patch_size)
        self.xp = xp
        self.patch_size = tuple(int(p) for p in patch_size)
        self.ndim = len(self.patch_size)

        stack_grids = [grid.grid_shape(shape, self.patch_size) for shape in spatial_shapes]
        counts = np.asarray(samples_per_stack, dtype=np.int64)
        self.first_sample = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.stack_of_sample = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self.sample_in_stack = (
            np.arange(int(counts.sum()), dtype=np.int64) - self.first_sample[self.stack_of_sample]
        )
        self.spatial_shape = np.asarray(
            [spatial_shapes[int(k)] for k in self.stack_of_sample], dtype=np.int64
        ).reshape(-1, self.ndim)
        self.grid_shape = np.asarray(
            [stack_grids[int(k)] for k in self.stack_of_sample], dtype=np.int64
        ).reshape(-1, self.ndim)
        self.n_cells = np.prod(self.grid_shape, axis=1).astype(np.int64)
        self.region_offset = np.concatenate([[0], np.cumsum(self.n_cells)]).astype(np.int64)
        n_regions = int(self.region_offset[-1])
        n_samples = len(self.n_cells)

        # A new sampler's rows: nothing excluded, every probability 1, every
        # sub-box selectable. Written in place: no row-sized temporary.
        self.excluded = xp.zeros(n_regions, dtype=bool)
        self.probability = xp.ones(n_regions, dtype=xp.float64)
        # When each region's probability was first set (-1: never), the
        # order CAREamics' count subtracts them in (grid.patch_budget);
        # ``next_order`` is the value the next newly set region gets.
        self.set_order = xp.full(n_regions, -1, dtype=xp.int64)
        self.next_order = 0
        self.weight = xp.full(n_regions, grid.PROB_ONE, dtype=xp.int64)
        self.subbox_mask = xp.full(n_regions, (1 << (1 << self.ndim)) - 1, dtype=xp.uint8)
        # Exclusive prefix of the region masses over all samples: region r
        # holds the global mass points [mass_prefix[r], mass_prefix[r + 1]).
        # The masses themselves are not kept (the ``mass`` property derives
        # them): 8 bytes per region less.
        self.mass_prefix = xp.zeros(n_regions, dtype=xp.int64)
        # Counts the changes of the tables, so that copies elsewhere (the CUDA
        # backend's upload of the per-sample arrays) know when they are stale.
        self.version = 0
        self.n_excluded = np.zeros(n_samples, dtype=np.int64)
        # grid.patch_budget per sample: the count before exclusions and ceil.
        self.budget = np.zeros(n_samples, dtype=np.float64)
        self.mass_total = np.zeros(n_samples, dtype=np.int64)
        # Float64 totals: they cannot wrap, so they tell when int64 would.
        self.mass_estimate = np.zeros(n_samples, dtype=np.float64)

        # Samples of one stack share a grid, so they are built as one batch.
        mass_start = 0
        for stack in range(len(stack_grids)):
            first, last = int(self.first_sample[stack]), int(self.first_sample[stack + 1])
            if first < last:
                mass_start += self._write_default_rows(stack, mass_start)
        self._refresh_totals()

    # -- shape helpers ---------------------------------------------------------

    @property
    def n_samples(self) -> int:
        """Number of samples over all stacks."""
        return len(self.n_cells)

    @property
    def n_stacks(self) -> int:
        """Number of stacks."""
        return len(self.first_sample) - 1

    def sample_id(self, data_idx: int, sample_idx: int) -> int:
        """Return the flat sample number of ``(data_idx, sample_idx)``."""
        return int(self.first_sample[data_idx]) + sample_idx

    def sample_grid(self, sample: int) -> tuple[int, ...]:
        """Return the grid shape of a flat sample."""
        return tuple(int(g) for g in self.grid_shape[sample])

    def sample_rows(self, sample: int) -> slice:
        """Return the slice of region rows of a flat sample."""
        return slice(int(self.region_offset[sample]), int(self.region_offset[sample + 1]))

    def excluded_grid(self, sample: int) -> Any:
        """Return a copy of a sample's excluded cells, shaped like its grid."""
        return self.excluded[self.sample_rows(sample)].reshape(self.sample_grid(sample)).copy()

    def probability_grid(self, sample: int) -> Any:
        """Return a copy of a sample's probabilities, shaped like its grid."""
        rows = self.sample_rows(sample)
        return self.probability[rows].reshape(self.sample_grid(sample)).copy()

    def set_order_grid(self, sample: int) -> Any:
        """Return a copy of a sample's first-set order (-1: never set), shaped like its grid."""
        rows = self.sample_rows(sample)
        return self.set_order[rows].reshape(self.sample_grid(sample)).copy()

    def set_order_after(self, sample: int, cells: NDArray[np.int64]) -> tuple[Any, int]:
        """Return a sample's first-set order after setting ``cells``, and the next free value.

        Parameters
        ----------
        sample : int
            Flat sample number.
        cells : numpy.ndarray of int64
            Row-major cell numbers inside the sample, in the order they are
            set (the order of a dict's keys); repeats count once, at their
            first place.

        Returns
        -------
        set_order : array of int64, shaped like the sample's grid
            Cells already set keep their place; new ones follow every value
            given before, in ``cells`` order, as a dict keeps keys.
        next_order : int
            The value the next newly set region will get.
        """
        xp = self.xp
        current = self.set_order[self.sample_rows(sample)]
        first_places = np.unique(cells, return_index=True)[1]
        in_order = xp.asarray(cells[np.sort(first_places)])
        new_cells = in_order[current[in_order] < 0]
        n_new = int(new_cells.size)
        updated = current.copy()
        updated[new_cells] = self.next_order + xp.arange(n_new, dtype=xp.int64)
        return updated.reshape(self.sample_grid(sample)), self.next_order + n_new

    # -- updates ---------------------------------------------------------------

    def update_sample(
        self,
        sample: int,
        excluded: Any,
        probability: Any,
        set_order: Any = None,
        next_order: int | None = None,
    ) -> None:
        """Replace the excluded cells and probabilities of one sample.

        Parameters
        ----------
        sample : int
            Flat sample number.
        excluded : array of bool, shaped like the sample's grid
            The new excluded cells (validated by the caller).
        probability : array of float64, shaped like the sample's grid
            The new probabilities (validated by the caller).
        set_order : array of int64, shaped like the sample's grid, optional
            The new first-set order (:meth:`set_order_after`); by default the
            sample keeps its own.
        next_order : int, optional
            The next free first-set value, with ``set_order``.

        Raises
        ------
        ValueError
            If the update would break a numeric limit (too many patches in one
            sample, or masses beyond int64); the tables are then unchanged.
        """
        stack = int(self.stack_of_sample[sample])
        if set_order is None:
            set_order, next_order = self.set_order_grid(sample), self.next_order
        update = self._compute(stack, excluded[None], probability[None], set_order[None])
        mass_total = self.mass_total.copy()
        mass_total[sample] = update.mass_total[0]
        mass_estimate = self.mass_estimate.copy()
        mass_estimate[sample] = update.mass_estimate[0]
        n_excluded = self.n_excluded.copy()
        n_excluded[sample] = update.n_excluded[0]
        budget = self.budget.copy()
        budget[sample] = update.budget[0]
        self._check_limits(mass_estimate, grid.patches_per_sample(n_excluded, budget, mass_total))
        rows = self.sample_rows(sample)
        mass_start = int(self.mass_offset[sample])
        change = int(update.mass_total[0]) - int(self.mass_total[sample])
        self._commit(sample, sample + 1, update, mass_start)
        self.next_order = int(next_order if next_order is not None else self.next_order)
        if change:
            # The samples after this one move along the mass line, in place.
            self.mass_prefix[rows.stop :] += change
        self._refresh_totals()

    def replace_all_rows(
        self,
        excluded: NDArray[np.bool_],
        probability: NDArray[Any],
        set_order: NDArray[np.int64] | None = None,
    ) -> None:
        """Set the excluded cells and probabilities of every sample of fresh tables.

        One batch per stack, as the constructor builds them, rather than an
        update per sample (each of which refreshes the prefix sums of all rows).
        Meant for tables just built: a stack whose new rows are all defaults
        (nothing excluded, probability 1) keeps the rows the constructor made.

        Parameters
        ----------
        excluded : numpy.ndarray of bool, shape (n_regions,)
            Excluded cells of all samples, in row order (validated by the caller).
        probability : numpy.ndarray of float64, shape (n_regions,)
            Probabilities of all cells, in row order (validated by the caller).
        set_order : numpy.ndarray of int64, shape (n_regions,), optional
            When each cell's probability was first set (-1: never; validated
            by the caller). By default the cells whose probability is not 1
            count as set in row order.

        Raises
        ------
        ValueError
            If the rows would break a numeric limit. Tables built for one call
            of this method should then be dropped: rows may be half replaced.
        """
        xp = self.xp
        if set_order is None:
            changed = probability != 1.0
            set_order = np.where(changed, np.cumsum(changed) - 1, -1).astype(np.int64)
        # Each stack's prefix is written from where the stack starts now; the
        # stacks after a changed one are moved once at the end (one pass).
        old_start = np.concatenate([[0], np.cumsum(self.mass_total)]).astype(np.int64)
        for stack in range(self.n_stacks):
            first, last = int(self.first_sample[stack]), int(self.first_sample[stack + 1])
            rows = slice(int(self.region_offset[first]), int(self.region_offset[last]))
            if not (
                excluded[rows].any()
                or (probability[rows] != 1.0).any()
                or (set_order[rows] >= 0).any()
            ):
                continue  # the constructor's rows are already these
            batch = (last - first, *self.sample_grid(first))
            update = self._compute(
                stack,
                xp.asarray(excluded[rows].reshape(batch)),
                xp.asarray(probability[rows].reshape(batch)),
                xp.asarray(set_order[rows].reshape(batch)),
            )
            self._commit(first, last, update, int(old_start[first]))
        new_start = np.concatenate([[0], np.cumsum(self.mass_total)]).astype(np.int64)
        for stack in range(self.n_stacks):
            first, last = int(self.first_sample[stack]), int(self.first_sample[stack + 1])
            move = int(new_start[first]) - int(old_start[first])
            if move and first < last:
                rows = slice(int(self.region_offset[first]), int(self.region_offset[last]))
                self.mass_prefix[rows] += move
        self.next_order = int(set_order.max(initial=-1)) + 1
        self._refresh_totals()

    def _write_default_rows(self, stack: int, mass_start: int) -> int:
        """Set a new stack's per-sample totals and mass prefix; return its total mass.

        Nothing excluded and every probability 1 (the rows the constructor
        filled), without the general steps of :meth:`_compute`: every sub-box
        is selectable, so a region's area is the product over the axes of its
        corners along each axis (part 0 plus part 1), the same in every sample
        of the stack. Only one sample's worth of temporaries is made.
        """
        xp = self.xp
        first, last = int(self.first_sample[stack]), int(self.first_sample[stack + 1])
        spatial = tuple(int(s) for s in self.spatial_shape[first])
        cells = self.sample_grid(first)
        area = xp.ones(cells, dtype=xp.int64)
        for axis, (length, patch) in enumerate(zip(spatial, self.patch_size, strict=True)):
            part0, part1 = grid.axis_part_sizes(length, patch, cells[axis], xp)
            shape = [1] * self.ndim
            shape[axis] = cells[axis]
            area *= (part0 + part1).reshape(shape)
        one_sample = area.reshape(-1)
        n_cells, batch = int(one_sample.size), last - first
        # Exact in float64 (fewer than 2**42 corners: the mass limit), so the
        # same value as the general update's float sum of area * weight.
        corners = int(to_host(one_sample.sum(), np.int64))
        one_sample *= grid.PROB_ONE  # the masses, in place
        sample_mass = corners * grid.PROB_ONE
        rows = slice(int(self.region_offset[first]), int(self.region_offset[last]))
        prefix = self.mass_prefix[rows].reshape(batch, n_cells)
        if n_cells:
            xp.cumsum(one_sample, out=prefix[0])
            prefix[0] -= one_sample
            prefix[0] += mass_start
            later = xp.arange(1, batch, dtype=xp.int64) * sample_mass
            xp.add(prefix[0][None, :], later[:, None], out=prefix[1:])
        self.n_excluded[first:last] = 0
        # No probability set yet: the budget is the reference's prod(D / P).
        self.budget[first:last] = grid.count_start(spatial, self.patch_size)
        self.mass_total[first:last] = sample_mass
        self.mass_estimate[first:last] = float(corners) * grid.PROB_ONE
        return sample_mass * batch

    def _compute(
        self, stack: int, excluded: Any, probability: Any, set_order: Any
    ) -> _SampleUpdate:
        """Compute the rows of a batch of samples of one stack (no commit)."""
        xp = self.xp
        first = int(self.first_sample[stack])
        spatial = tuple(int(s) for s in self.spatial_shape[first])
        masks = grid.subbox_masks(excluded, xp)
        area = grid.region_areas(masks, spatial, self.patch_size, xp)
        weight = grid.quantise_probabilities(probability, xp)
        batch = excluded.shape[0]
        flat = (batch, -1)
        budget = grid.patch_budget(
            spatial, self.patch_size, probability.reshape(flat), set_order.reshape(flat), xp
        )
        mass_estimate = self._mass_estimate(area.reshape(flat), weight.reshape(flat))
        area *= weight  # the masses, in place: one region-sized array less
        return _SampleUpdate(
            excluded=excluded.reshape(-1),
            probability=probability.reshape(-1),
            set_order=set_order.reshape(-1),
            weight=weight.reshape(-1),
            subbox_mask=masks.reshape(-1),
            mass=area.reshape(-1),
            n_excluded=to_host(excluded.reshape(flat).sum(axis=1), np.int64),
            budget=budget,
            mass_total=to_host(area.reshape(flat).sum(axis=1), np.int64),
            mass_estimate=mass_estimate,
        )

    def _mass_estimate(self, area: Any, weight: Any) -> NDArray[np.float64]:
        """Return ``sum(float64(area) * weight)`` per sample (rows), by column blocks.

        The float64 products of a block of columns at a time: the same value
        as one sum over whole rows when the sums are exact, and otherwise
        within the 1e-12 the limit check allows for; a few megabytes of
        temporaries instead of two region-sized arrays.
        """
        xp = self.xp
        n_cells = area.shape[1]
        step = max(1, _ESTIMATE_VALUES // max(area.shape[0], 1))
        total = np.zeros(area.shape[0], dtype=np.float64)
        for start in range(0, n_cells, step):
            block = area[:, start : start + step].astype(xp.float64)
            block *= weight[:, start : start + step]
            total += to_host(block.sum(axis=1), np.float64)
        return total

    def _commit(self, first: int, last: int, update: _SampleUpdate, mass_start: int) -> None:
        """Write computed rows; their mass prefix starts at ``mass_start``."""
        rows = slice(int(self.region_offset[first]), int(self.region_offset[last]))
        self.excluded[rows] = update.excluded
        self.probability[rows] = update.probability
        self.set_order[rows] = update.set_order
        self.weight[rows] = update.weight
        self.subbox_mask[rows] = update.subbox_mask
        prefix = self.mass_prefix[rows]
        self.xp.cumsum(update.mass, out=prefix)
        prefix -= update.mass
        prefix += mass_start
        self.n_excluded[first:last] = update.n_excluded
        self.budget[first:last] = update.budget
        self.mass_total[first:last] = update.mass_total
        self.mass_estimate[first:last] = update.mass_estimate

    def _check_limits(
        self, mass_estimate: NDArray[np.float64], n_patches: NDArray[np.int64]
    ) -> None:
        # The float64 estimate is within a relative 1e-12 of the exact total;
        # int64 holds up to 2**63, so the margin to 2**62 absorbs its error.
        if float(np.sum(mass_estimate)) >= MAX_TOTAL_MASS:
            raise ValueError(
                "the probabilities are too large for this much data: the weighted "
                "sampling mass of all samples would exceed 2**62 (the exact integer "
                "range); lower the largest probabilities or split the data"
            )
        if n_patches.size and int(n_patches.max()) > MAX_PATCHES_PER_SAMPLE:
            sample = int(np.argmax(n_patches))
            raise ValueError(
                f"sample {sample} would have {int(n_patches[sample])} patches, more "
                f"than the supported {MAX_PATCHES_PER_SAMPLE}; use a larger patch size"
            )

    def _refresh_totals(self) -> None:
        """Recompute the derived per-sample scalars and their prefix sums."""
        n_patches = grid.patches_per_sample(self.n_excluded, self.budget, self.mass_total)
        self._check_limits(self.mass_estimate, n_patches)
        self.version += 1
        self.n_patches = n_patches
        self.patch_offset = np.concatenate([[0], np.cumsum(n_patches)]).astype(np.int64)
        self.mass_offset = np.concatenate([[0], np.cumsum(self.mass_total)]).astype(np.int64)

    @property
    def mass(self) -> Any:
        """Every region's mass (a new array, from ``mass_prefix``: not kept)."""
        xp = self.xp
        following = xp.empty_like(self.mass_prefix)
        following[:-1] = self.mass_prefix[1:]
        following[-1:] = int(self.mass_offset[-1])
        following -= self.mass_prefix
        return following

    @property
    def total_patches(self) -> int:
        """Number of patches over all samples."""
        return int(self.patch_offset[-1])
