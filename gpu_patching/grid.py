"""Cells, sub-boxes, selectable areas and integer masses of sampling regions.

Everything here is written once against an array namespace ``xp`` (NumPy or
CuPy) and works on a batch of samples that share one spatial shape, so the same
code builds the tables on the host and on the device. The model (grid cells
``(D_a + 1) // P_a``, regions, sub-box masks, exclusion, quantised
probabilities ``PROB_ONE``, masses ``area * q``) and the patch count are
``docs/design.md``, section 1.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import cuda
from .arrays import to_host
from .cuda import KernelFunctions
from .kernels.count import SUBTRACT_IN_ORDER, subtract_in_order_args

__all__ = [
    "MAX_PROBABILITY",
    "PROB_ONE",
    "axis_part_sizes",
    "count_start",
    "grid_shape",
    "patch_budget",
    "patches_per_sample",
    "quantise_probabilities",
    "region_areas",
    "subbox_masks",
    "subbox_offsets",
]

#: Quantisation step of probabilities: a probability ``p`` becomes the integer
#: ``round(p * PROB_ONE)`` (at least 1 when ``p > 0``).
PROB_ONE = 1 << 20
#: Largest accepted probability (1024 times the default). With it a sample's
#: summed weights stay below ``2**61`` for up to ``2**31`` cells.
MAX_PROBABILITY = float(1 << 10)


def grid_shape(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """Return the number of grid cells along each spatial axis.

    Parameters
    ----------
    spatial_shape : sequence of int
        The ``(Z)YX`` shape of one sample.
    patch_size : sequence of int
        The patch size, same length as ``spatial_shape``.

    Returns
    -------
    tuple of int
        ``(D_a + 1) // P_a`` for every axis ``a``. The ``+ 1`` keeps the last
        corner inside the grid when ``D_a`` is a multiple of ``P_a``.
    """
    return tuple(
        (int(size) + 1) // int(patch) for size, patch in zip(spatial_shape, patch_size, strict=True)
    )


def subbox_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Return the sub-boxes ``b`` of a region in mask-bit order.

    Parameters
    ----------
    ndim : int
        Number of spatial dimensions (2 or 3).

    Returns
    -------
    list of tuple of int
        ``{0, 1}^ndim`` in row-major order; entry ``k`` owns bit ``k`` of the
        sub-box mask and is also the ``k``-th sub-box in the corner order.
    """
    return list(itertools.product((0, 1), repeat=ndim))


def axis_part_sizes(
    spatial_length: int, patch_length: int, n_cells: int, xp: Any = np
) -> tuple[Any, Any]:
    """Return how many valid corners each cell has in part 0 and part 1 of an axis.

    Parameters
    ----------
    spatial_length : int
        ``D_a``, the length of the axis.
    patch_length : int
        ``P_a``, the patch size along the axis.
    n_cells : int
        ``G_a``, the number of grid cells along the axis.
    xp : module
        Array namespace (``numpy`` or ``cupy``).

    Returns
    -------
    part0, part1 : array of int64, shape (n_cells,)
        ``part0[g]`` is 1 when the corner ``g * P_a`` is valid, else 0;
        ``part1[g]`` counts the valid corners ``g * P_a + 1 .. g * P_a + P_a - 1``.
    """
    last_corner = spatial_length - patch_length
    cell_start = xp.arange(n_cells, dtype=xp.int64) * patch_length
    part0 = (cell_start <= last_corner).astype(xp.int64)
    part1 = xp.clip(last_corner - cell_start, 0, patch_length - 1).astype(xp.int64)
    return part0, part1


def subbox_masks(excluded: Any, xp: Any = np) -> Any:
    """Return the sub-box mask of every region of a batch of samples.

    Parameters
    ----------
    excluded : array of bool, shape (B, G_1, ..., G_d)
        Excluded cells of ``B`` samples that share a grid shape.
    xp : module
        Array namespace (``numpy`` or ``cupy``).

    Returns
    -------
    array of uint8, shape (B, G_1, ..., G_d)
        Bit ``k`` is set when sub-box ``subbox_offsets(d)[k]`` is selectable,
        i.e. no cell ``g + o`` with ``o <= b`` is excluded (cells outside the
        grid are never excluded).
    """
    ndim = excluded.ndim - 1
    offsets = subbox_offsets(ndim)
    # shifted[o][g] = excluded[g + o], False past the far edge of the grid.
    shifted = {}
    for offset in offsets:
        view = xp.zeros_like(excluded)
        target = (slice(None),) + tuple(
            slice(0, excluded.shape[1 + a] - o) for a, o in enumerate(offset)
        )
        source = (slice(None),) + tuple(slice(o, None) for o in offset)
        view[target] = excluded[source]
        shifted[offset] = view
    mask = xp.zeros(excluded.shape, dtype=xp.uint8)
    for bit, box in enumerate(offsets):
        blocked = xp.zeros_like(excluded)
        for offset in offsets:
            if all(o <= b for o, b in zip(offset, box, strict=True)):
                blocked |= shifted[offset]
        mask |= (~blocked).astype(xp.uint8) << bit
    return mask


def region_areas(
    masks: Any, spatial_shape: Sequence[int], patch_size: Sequence[int], xp: Any = np
) -> Any:
    """Return the number of selectable corners of every region.

    Parameters
    ----------
    masks : array of uint8, shape (B, G_1, ..., G_d)
        Sub-box masks from :func:`subbox_masks`.
    spatial_shape : sequence of int
        The ``(Z)YX`` shape shared by the ``B`` samples.
    patch_size : sequence of int
        The patch size.
    xp : module
        Array namespace (``numpy`` or ``cupy``).

    Returns
    -------
    array of int64, shape (B, G_1, ..., G_d)
        Selectable corners per region.
    """
    ndim = len(patch_size)
    cells = masks.shape[1:]
    parts = [
        axis_part_sizes(int(spatial_shape[a]), int(patch_size[a]), cells[a], xp)
        for a in range(ndim)
    ]
    area = xp.zeros(masks.shape, dtype=xp.int64)
    # One region-sized int64 scratch for every sub-box: the box sizes are
    # broadcast from per-axis vectors, never made grid-sized.
    term = xp.empty(masks.shape, dtype=xp.int64)
    for bit, box in enumerate(subbox_offsets(ndim)):
        box_size = xp.ones((1,) * ndim, dtype=xp.int64)
        for a, b in enumerate(box):
            shape = [1] * ndim
            shape[a] = cells[a]
            box_size = box_size * parts[a][b].reshape(shape)
        selectable = (masks >> bit) & 1
        xp.multiply(selectable, box_size, out=term)
        area += term
    return area


def quantise_probabilities(probabilities: Any, xp: Any = np) -> Any:
    """Return the integer weights ``q`` of probabilities.

    Parameters
    ----------
    probabilities : array of float64
        Validated probabilities: finite, in ``[0, MAX_PROBABILITY]``.
    xp : module
        Array namespace (``numpy`` or ``cupy``).

    Returns
    -------
    array of int64
        ``round(p * PROB_ONE)``, raised to 1 where ``p > 0`` so that a small
        positive probability never switches a region off.
    """
    scaled = probabilities * PROB_ONE
    xp.rint(scaled, out=scaled)
    q = scaled.astype(xp.int64)
    del scaled
    # In place, with boolean temporaries only: 1 where 0 < p rounded to 0.
    q[(q < 1) & (probabilities > 0)] = 1
    return q


def _subtract_in_order(
    start: float, terms: Any, xp: Any, functions: KernelFunctions | None = None
) -> Any:
    """Return ``(((start - t_0) - t_1) - ...)`` per row of ``terms``, rounded at every step.

    The reference subtracts one float64 at a time, and float64 subtraction
    does not associate: a tree or a scan (``cumsum``) rounds differently, and
    the ceil of the result can move by one. So the fold is strictly
    sequential along a row: NumPy's ``subtract.accumulate`` is defined as
    that loop; on the device (CuPy has no ``subtract.accumulate``) the shipped
    kernel ``subtract_in_order`` (``kernels/count.cu``) runs it, one thread
    per row, compiled without FMA contraction, so every step is one IEEE-754
    subtraction as on the host. ``functions`` (the host tests' hook, see
    :class:`gpu_patching.cuda.Launcher`) runs the device branch with NumPy.
    """
    batch, n_terms = terms.shape
    if xp is np and functions is None:
        running = np.empty((batch, n_terms + 1), dtype=np.float64)
        running[:, 0] = start
        running[:, 1:] = terms
        np.subtract.accumulate(running, axis=1, out=running)
        return running[:, -1].copy()
    total = xp.full(batch, start, dtype=xp.float64)
    args = subtract_in_order_args(xp.ascontiguousarray(terms), total)
    if functions is None:
        functions = cuda.device_functions(xp)
    device_id = 0 if xp is np else cuda.current_device_id(xp)
    blocks, threads = cuda.launch_grid(batch)
    cuda.launch(functions, SUBTRACT_IN_ORDER, device_id, (blocks,), (threads,), args)
    return total


def count_start(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> float:
    """Return ``prod(D / P)`` as the reference computes it.

    Float64 ``D / P`` per axis, multiplied in axis order.

    Parameters
    ----------
    spatial_shape : sequence of int
        The ``(Z)YX`` shape of a sample.
    patch_size : sequence of int
        The patch size.

    Returns
    -------
    float
        The patch count of a sample with nothing excluded and no probability set.
    """
    return float(np.prod(np.asarray(spatial_shape) / np.asarray(patch_size)))


def patch_budget(
    spatial_shape: Sequence[int],
    patch_size: Sequence[int],
    probability: Any,
    set_order: Any,
    xp: Any = np,
    *,
    functions: KernelFunctions | None = None,
) -> NDArray[np.float64]:
    """Return the reference's patch count before exclusions and ceil, per sample.

    ``prod(D / P) - (1 - p_1) - (1 - p_2) - ...`` in float64, with one term per
    region whose probability was ever set, subtracted in the order the
    regions were first set: exactly CAREamics 0.3.5's float operations, so
    the count equals its count bit for bit (``docs/design.md``, "Patches per
    sample"). The probabilities are the ones given, not the quantised
    weights: those only serve the draw. A region never set has ``p = 1``,
    whose term ``0.0`` changes no float, so its place in the order is free.

    Parameters
    ----------
    spatial_shape : sequence of int
        The ``(Z)YX`` shape shared by the ``B`` samples.
    patch_size : sequence of int
        The patch size.
    probability : array of float64, shape (B, n_cells)
        Region probabilities, row-major per sample.
    set_order : array of int64, shape (B, n_cells)
        When each region's probability was first set (smaller is earlier;
        distinct within a sample), or -1 for a region never set.
    xp : module
        Array namespace of ``probability`` and ``set_order``.
    functions : KernelFunctions, optional
        Where the fold's kernel comes from (:func:`gpu_patching.cuda.launch`);
        CuPy's compile of ``kernels/count.cu`` when ``xp`` is CuPy. Given with
        NumPy (the host tests), the fold runs through the kernel's launch path
        instead of ``numpy.subtract.accumulate``.

    Returns
    -------
    numpy.ndarray of float64, shape (B,)
        The budget of every sample (on the host).
    """
    start = count_start(spatial_shape, patch_size)
    batch = set_order.shape[0]
    # Only the regions ever set take part: O(set regions) beyond one boolean
    # pass, so a fresh million-region sample costs nothing here.
    sample, cell = xp.nonzero(set_order >= 0)
    n_set = int(sample.size)
    if n_set == 0:
        return np.full(batch, start, dtype=np.float64)
    # The orders are distinct over all samples: sort by them, then (stably)
    # by sample, and every sample's terms follow one another in first-set order.
    by_order = xp.argsort(set_order[sample, cell])
    sample, cell = sample[by_order], cell[by_order]
    by_sample = xp.argsort(sample, kind="stable")
    sample, cell = sample[by_sample], cell[by_sample]
    per_sample = xp.bincount(sample, minlength=batch)
    first = xp.cumsum(per_sample) - per_sample
    place = xp.arange(n_set, dtype=xp.int64) - first[sample]
    # Padding with 0.0 changes no float: (t - 0.0) is t.
    terms = xp.zeros((batch, int(per_sample.max())), dtype=xp.float64)
    terms[sample, place] = 1.0 - probability[sample, cell]  # 1 - p, one IEEE step
    total = _subtract_in_order(start, terms, xp, functions)
    return to_host(total, np.float64)


def patches_per_sample(
    n_excluded: NDArray[np.int64],
    budget: NDArray[np.float64],
    mass_total: NDArray[np.int64],
) -> NDArray[np.int64]:
    """Return the number of patches of every sample (host-side, float64).

    ``n = ceil(budget - n_excluded)``, CAREamics 0.3.5's count bit for bit
    (``budget`` from :func:`patch_budget`), with two rules of our own where
    the reference has no usable answer:

    * ``n = 0`` when the sample has no mass (every selectable corner lies in
      a region of probability 0, or there is none): the reference may still
      count patches there, but it cannot draw them (0 / 0 weights).
    * ``n = 0`` when the count is negative (the reference raises there).

    Parameters
    ----------
    n_excluded : numpy.ndarray of int64, shape (S,)
        Excluded cells per sample.
    budget : numpy.ndarray of float64, shape (S,)
        :func:`patch_budget` of every sample.
    mass_total : numpy.ndarray of int64, shape (S,)
        Total mass per sample.

    Returns
    -------
    numpy.ndarray of int64, shape (S,)
        Patches per sample.
    """
    wanted = np.ceil(budget - n_excluded.astype(np.float64))
    n_patches = np.maximum(wanted, 0).astype(np.int64)
    return np.where(mass_total > 0, n_patches, 0).astype(np.int64)


def cell_count(shape: Sequence[int]) -> int:
    """Return the number of cells of a grid shape (product of its lengths)."""
    return math.prod(int(s) for s in shape)
