"""Shared helpers for the test suite.

The helpers here are written straight from the definitions of docs/design.md
section 1, independently of the library's grid code, so that the tests compare
the library against the specification rather than against itself:

* a corner ``c`` is valid iff ``0 <= c_a <= D_a - P_a``;
* the patch of corner ``c`` covers ``[c, c + P)``; grid cell ``e`` covers
  ``[e * P, (e + 1) * P)``; a corner is selectable iff its patch overlaps no
  excluded cell;
* the region of a corner is its cell ``c // P``.

Test modules import the plain helpers with ``from conftest import ...`` (the
tests folder is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from draw_reference import locate_corners
from hypothesis import settings

from gpu_patching import StratifiedPatching
from gpu_patching.testing import load_reference

# Every property test is derandomized, with no example database and no
# deadline: the same examples on every run and machine, so CI cannot flake.
# A test's own @settings still sets its example count.
settings.register_profile("gpu-patching", derandomize=True, database=None, deadline=None)
settings.load_profile("gpu-patching")

Cell = tuple[int, ...]


@pytest.fixture(scope="session", autouse=True)
def _run_in_an_empty_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterable[None]:
    """Run every test from an empty folder, never from the checkout.

    A command's default output (``demo-output/``, say) or any relative path
    then lands in a fresh folder, so no test sees what ``make demo`` or a
    user left in the working tree. Session-scoped: hypothesis refuses
    function-scoped fixtures on its tests.
    """
    import os

    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(before)


# -- the reference implementation ------------------------------------------------------


@pytest.fixture(scope="session")
def reference() -> Any:
    """CAREamics' ``StratifiedPatching`` class; the test is skipped without it."""
    try:
        return load_reference()
    except ImportError as error:
        pytest.skip(
            f"the CAREamics reference implementation cannot be loaded ({error}); "
            "install it with 'pip install --no-deps careamics==0.3.5'"
        )


# -- building samplers -----------------------------------------------------------------


def numpy_sampler(
    data_shapes: Sequence[Sequence[int]], patch_size: Sequence[int], seed: int = 0
) -> StratifiedPatching:
    """A sampler on the NumPy backend (the backend this suite is about)."""
    return StratifiedPatching(data_shapes, patch_size, seed=seed, backend="numpy")


def grid_shape(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> Cell:
    """``G_a = (D_a + 1) // P_a`` cells per axis (docs/design.md section 1)."""
    return tuple((d + 1) // p for d, p in zip(spatial_shape, patch_size, strict=True))


def all_cells(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> list[Cell]:
    """Every grid cell in row-major order."""
    return list(itertools.product(*(range(g) for g in grid_shape(spatial_shape, patch_size))))


def random_cells(
    rng: np.random.Generator,
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    fraction: float,
) -> list[Cell]:
    """A random subset of the grid cells, about ``fraction`` of them."""
    cells = all_cells(spatial_shape, patch_size)
    count = round(fraction * len(cells))
    chosen = rng.choice(len(cells), size=count, replace=False)
    return [cells[int(k)] for k in sorted(chosen)]


# -- brute force: which corners are selectable -----------------------------------------


def selectable_mask(
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    excluded_cells: Iterable[Sequence[int]],
) -> np.ndarray:
    """Brute force: which valid corners have a patch that overlaps no excluded cell.

    Returns a boolean array of shape ``D - P + 1`` (one entry per valid corner).
    The patch ``[c, c + P)`` overlaps the cell ``[e * P, (e + 1) * P)`` iff the
    two intervals intersect along every axis.
    """
    ndim = len(patch_size)
    excluded = np.asarray(list(excluded_cells), dtype=np.int64).reshape(-1, ndim)
    corner_range = [np.arange(d - p + 1) for d, p in zip(spatial_shape, patch_size, strict=True)]
    if len(excluded) == 0:
        return np.ones([len(r) for r in corner_range], dtype=bool)
    # overlap[a][c_a, k]: the patch interval of corner c_a meets cell k along axis a.
    overlap = []
    for a in range(ndim):
        corner = corner_range[a][:, None]
        cell_start = excluded[None, :, a] * patch_size[a]
        cell_stop = cell_start + patch_size[a]
        overlap.append((corner < cell_stop) & (cell_start < corner + patch_size[a]))
    blocked = np.zeros([len(r) for r in corner_range], dtype=bool)
    # Chunk over cells to bound memory; each chunk broadcasts to (*corners, k).
    for start in range(0, len(excluded), 256):
        chunk = slice(start, start + 256)
        meets = overlap[0][(slice(None),) + (None,) * (ndim - 1) + (chunk,)]
        for a in range(1, ndim):
            index = [None] * ndim + [chunk]
            index[a] = slice(None)
            meets = meets & overlap[a][tuple(index)]
        blocked |= meets.any(axis=-1)
    return ~blocked


def selectable_corners(
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    excluded_cells: Iterable[Sequence[int]],
) -> set[Cell]:
    """Brute force: the set of selectable corners (see :func:`selectable_mask`)."""
    mask = selectable_mask(spatial_shape, patch_size, excluded_cells)
    return {tuple(int(v) for v in c) for c in np.argwhere(mask)}


def corners_are_selectable(corners: np.ndarray, selectable: np.ndarray) -> np.ndarray:
    """Whether each corner (rows of ``corners``) is a selectable corner."""
    corners = np.asarray(corners, dtype=np.int64)
    in_bounds = np.all((corners >= 0) & (corners < np.asarray(selectable.shape)), axis=1)
    result = np.zeros(len(corners), dtype=bool)
    result[in_bounds] = selectable[tuple(corners[in_bounds].T)]
    return result


def patches_overlap_cells(
    corners: np.ndarray, patch_size: Sequence[int], cells: Iterable[Sequence[int]]
) -> np.ndarray:
    """For each patch corner, whether its patch overlaps any of ``cells``."""
    corners = np.asarray(corners, dtype=np.int64)
    cells_array = np.asarray(list(cells), dtype=np.int64).reshape(-1, len(patch_size))
    patch = np.asarray(patch_size, dtype=np.int64)
    hits = np.zeros(len(corners), dtype=bool)
    for cell in cells_array:
        start = cell * patch
        hits |= np.all((corners < start + patch) & (start < corners + patch), axis=1)
    return hits


# -- the patch-count formula -----------------------------------------------------------


def expected_sample_patches(
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    excluded_cells: Iterable[Sequence[int]],
    probabilities: Mapping[Cell, float] | None = None,
) -> int:
    """The number of patches of one sample, recomputed from docs/design.md section 1.

    ``n = 0`` when no selectable corner lies in a region with ``p > 0``, else
    ``max(0, ceil(prod(D / P) - (1 - p_1) - (1 - p_2) - ... - n_excluded))``,
    in float64, one subtraction per probability in the mapping's order (the
    order the regions were first set), as the reference implementation does.
    """
    probabilities = dict(probabilities or {})
    excluded = {tuple(int(v) for v in cell) for cell in excluded_cells}
    selectable = selectable_corners(spatial_shape, patch_size, excluded)
    has_mass = any(
        probabilities.get(tuple(c // p for c, p in zip(corner, patch_size, strict=True)), 1.0) > 0
        for corner in selectable
    )
    if not has_mass:
        return 0
    total = 1.0
    for d, p in zip(spatial_shape, patch_size, strict=True):
        total *= float(d) / float(p)
    for probability in probabilities.values():
        total -= 1.0 - float(probability)
    return max(0, math.ceil(total - len(excluded)))


# -- per-sample views of an epoch ------------------------------------------------------


def sliced_patches(array: np.ndarray, batch: Any) -> np.ndarray:
    """Every patch of ``batch`` by plain slicing of one in-memory ``SC(Z)YX`` array."""
    patch = batch.patch_size
    boxes = [
        (s, slice(None), *(slice(c, c + p) for c, p in zip(corner, patch, strict=True)))
        for s, corner in zip(batch.sample_idx.tolist(), batch.coords.tolist(), strict=True)
    ]
    return np.stack([array[box] for box in boxes])


def sample_rows(batch: Any, data_idx: int, sample_idx: int) -> np.ndarray:
    """The rows of a ``PatchBatch`` that come from one sample."""
    batch = batch.to_numpy()
    return np.flatnonzero((batch.data_idx == data_idx) & (batch.sample_idx == sample_idx))


def epoch_corners(
    sampler: StratifiedPatching, data_idx: int, sample_idx: int, epochs: Iterable[int]
) -> np.ndarray:
    """The corners of one sample's patches over several epochs, stacked."""
    corners = []
    for epoch in epochs:
        batch = sampler.sample_epoch(epoch).to_numpy()
        corners.append(batch.coords[sample_rows(batch, data_idx, sample_idx)])
    return np.concatenate(corners)


# -- the rank mapping of the draw algorithm --------------------------------------------


def rank_corners(
    sampler: StratifiedPatching, data_idx: int, sample_idx: int
) -> dict[Cell, dict[str, Any]]:
    """Map every rank of every region of a sample to its corner.

    Inside the sample's mass line, region ``r`` owns the points
    ``[mass_prefix[r], mass_prefix[r] + mass[r])`` and each of its corners owns
    ``weight[r]`` consecutive points (rank ``k`` owns
    ``[k * weight, (k + 1) * weight)`` relative to the region). This helper
    reads those (NumPy-backend) tables and runs
    :func:`draw_reference.locate_corners` on the first
    and the last point of every rank.

    Returns, for each region (grid cell) with a positive weight, a dict with
    ``prefix`` (its first mass point, relative to the sample), ``mass``,
    ``weight``, ``first`` (corners of the first point of each rank,
    shape ``(mass // weight, d)``) and ``last`` (same for the last point).
    """
    tables = sampler._tables  # the tables are the object under test here
    sample = tables.sample_id(data_idx, sample_idx)
    cells = list(itertools.product(*(range(g) for g in tables.sample_grid(sample))))
    rows = tables.sample_rows(sample)
    mass = np.asarray(tables.mass[rows], dtype=np.int64)
    weight = np.asarray(tables.weight[rows], dtype=np.int64)
    prefix = np.asarray(tables.mass_prefix[rows], dtype=np.int64) - int(tables.mass_offset[sample])
    kept = np.flatnonzero(weight > 0)
    n_ranks = mass[kept] // weight[kept]
    # One locate_corners call for every rank of every region of the sample.
    region_start = np.concatenate([[0], np.cumsum(n_ranks)])
    rank = np.arange(int(region_start[-1]), dtype=np.int64) - np.repeat(region_start[:-1], n_ranks)
    first = np.repeat(prefix[kept], n_ranks) + rank * np.repeat(weight[kept], n_ranks)
    last = first + np.repeat(weight[kept], n_ranks) - 1
    samples = np.full(len(first), sample, dtype=np.int64)
    first_corners = locate_corners(tables, samples, first)
    last_corners = locate_corners(tables, samples, last)
    result: dict[Cell, dict[str, Any]] = {}
    for k, row in enumerate(kept):
        ranks = slice(int(region_start[k]), int(region_start[k + 1]))
        result[cells[row]] = {
            "prefix": int(prefix[row]),
            "mass": int(mass[row]),
            "weight": int(weight[row]),
            "first": first_corners[ranks],
            "last": last_corners[ranks],
        }
    return result


def expected_corner_counts(
    sampler: StratifiedPatching, data_idx: int, sample_idx: int, n_patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact expected number of draws of every corner of a sample per epoch.

    Stratum ``j`` of ``n`` owns the mass points ``[lo_j, hi_j)`` with
    ``lo_j = floor(j * M / n)`` and draws one of them uniformly, so point ``x``
    of stratum ``j`` is drawn with probability ``1 / (hi_j - lo_j)``. The
    expected count of a corner is the sum of that over its points, computed
    with the piecewise-linear cumulative count ``F(x) = j + (x - lo_j) / w_j``.

    Returns ``(corners, expected)`` with one row per corner reachable by the
    rank mapping.
    """
    ranks = rank_corners(sampler, data_idx, sample_idx)
    total_mass = sum(region["mass"] for region in ranks.values())
    # Python ints: j * M can exceed int64 before the division.
    bounds = np.array([j * total_mass // n_patches for j in range(n_patches + 1)], dtype=np.int64)

    def cumulative(points: np.ndarray) -> np.ndarray:
        stratum = np.clip(np.searchsorted(bounds, points, side="right") - 1, 0, n_patches - 1)
        width = (bounds[stratum + 1] - bounds[stratum]).astype(np.float64)
        return stratum + (points - bounds[stratum]) / width

    corners, expected = [], []
    for region in ranks.values():
        rank = np.arange(len(region["first"]), dtype=np.int64)
        corner_start = region["prefix"] + rank * region["weight"]
        expected.append(cumulative(corner_start + region["weight"]) - cumulative(corner_start))
        corners.append(region["first"])
    return np.concatenate(corners), np.concatenate(expected)


def coverage_map(
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    corners: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """How often each pixel is covered by the given patches (optionally weighted)."""
    ndim = len(patch_size)
    if weights is None:
        weights = np.ones(len(corners))
    # Accumulate at the corners, then spread each over its patch with a box sum.
    density = np.zeros([d - p + 1 for d, p in zip(spatial_shape, patch_size, strict=True)])
    np.add.at(density, tuple(np.asarray(corners, dtype=np.int64).T), weights)
    coverage = np.zeros([d + 1 for d in spatial_shape])
    coverage[tuple(slice(0, d - p + 1) for d, p in zip(spatial_shape, patch_size, strict=True))] = (
        density
    )
    # Difference-array trick: mark +w at c and -w at c + P per axis, then cumsum.
    for a in range(ndim):
        shifted = np.zeros_like(coverage)
        source = [slice(None)] * ndim
        target = [slice(None)] * ndim
        source[a] = slice(0, coverage.shape[a] - patch_size[a])
        target[a] = slice(patch_size[a], None)
        shifted[tuple(target)] = coverage[tuple(source)]
        coverage = np.cumsum(coverage - shifted, axis=a)
    return coverage[tuple(slice(0, d) for d in spatial_shape)]


#: Seconds a test that launches the shipped kernels on the host may take (each
#: takes about a second, the kernels' build included): a kernel that never
#: returns (a grid stride of 0, a cycle walk that never ends) then ends the run
#: in two minutes, not at the suite's limit of 600 s per test.
HOST_KERNEL_TIMEOUT = 120


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test that launches host-built kernels :data:`HOST_KERNEL_TIMEOUT`."""
    for item in items:
        module = getattr(item, "module", None)
        launches = "host_kernels" in getattr(item, "fixturenames", ()) or hasattr(
            module, "HostKernels"
        )
        if launches and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(HOST_KERNEL_TIMEOUT))


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The shipped ``.cu`` files compiled for the host, once per session.

    See ``tests/host_launch.py``: each ``__global__`` function runs over every
    block and thread of a launch, so the device code runs on machines without a
    GPU. Skips when there is no C++ compiler.
    """
    from host_launch import HostKernels, cxx

    if cxx() is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH to build the host kernels")
    return HostKernels(tmp_path_factory.mktemp("host_kernels"))
