"""Region statistics: a score for every sampling region of a stack, in one pass.

:func:`region_statistics` gives the mean, std, min, max, histogram entropy and
mask coverage of every region (the box ``[g * P, (g + 2) * P)`` of grid cell
``g``, clipped to the image) at once, on the stack's device, from the block
reductions of :mod:`gpu_patching.blocks`; :func:`filter_map` shows one as an
image, to pick a threshold. It reads pixels and a patch size and knows nothing
of samplers (:mod:`gpu_patching.policies` applies the scores). Why it is cheap
and bounded in memory: ``docs/design.md``, "Region statistics".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _validation as check
from .arrays import namespace, require_array, to_host
from .blocks import (
    BlockPlan,
    combine_regions,
    group_slices,
    reduce_group,
    region_pixels,
    worker_pool,
)
from .grid import grid_shape

__all__ = ["DEFAULT_BINS", "MAX_BINS", "STATISTICS", "filter_map", "region_statistics"]

#: Statistics that :func:`region_statistics` computes.
STATISTICS = ("mean", "std", "min", "max", "entropy", "coverage")
#: How :func:`filter_map` combines the regions that overlap a pixel.
_COMBINE = ("max", "min")
#: Elements per group of pixels for the reductions that need no full-size
#: temporary (sum, max, min, mask count): large, so that the Python overhead
#: per group stays negligible.
_GROUP_ELEMENTS_CPU = 1 << 24
_GROUP_ELEMENTS_GPU = 1 << 26
#: Largest number of histogram counts (blocks times bins) held per group.
_HISTOGRAM_ELEMENTS = 1 << 24
#: Elements per piece for the reductions that make a float64 copy of the
#: pixels (squares, histograms). On the CPU a piece whose copy fits in the
#: L2/L3 caches is ~3x faster than one big pass (measured on the 10000x6760
#: benchmark); on the GPU large pieces keep the launches few.
_COPY_ELEMENTS_CPU = 1 << 18
_COPY_ELEMENTS_GPU = 1 << 24
#: Largest region (in pixels) for which ``c * log2(c)`` is tabulated.
_ENTROPY_TABLE_MAX = 1 << 22
#: Default number of histogram bins of the entropy.
DEFAULT_BINS = 64
#: Most histogram bins: a block's histogram (``bins + 1`` int64 counts) stays
#: within a few MiB.
MAX_BINS = 1 << 20


# -- array namespaces and checks -----------------------------------------------


def check_stack(stack: Any, patch: tuple[int, ...], name: str) -> Any:
    """Check a ``SC(Z)YX`` image stack against the patch size; return its namespace.

    Parameters
    ----------
    stack : numpy.ndarray or cupy.ndarray
        The stack, of integers or floats.
    patch : tuple of int
        The patch size.
    name : str
        How the stack is named in error messages.

    Returns
    -------
    module
        The stack's :func:`~gpu_patching.arrays.namespace`.

    Raises
    ------
    TypeError, ValueError
        If the stack is not such an array, or its shape does not fit the patch.
    """
    xp = namespace(stack, name)
    if np.dtype(stack.dtype).kind not in "iuf":
        raise TypeError(
            f"{name} must hold integers or floats, got dtype {np.dtype(stack.dtype).name}"
        )
    # A stack smaller than the patch is accepted, as the sampler accepts it:
    # its grid is empty along that axis, or its one cell holds no corner.
    check.check_stack_shape(tuple(int(s) for s in stack.shape), patch, name, smaller_ok=True)
    return xp


def _spatial_mask(mask: Any, stack_shape: tuple[int, ...], channel: int, name: str, xp: Any) -> Any:
    """Return a boolean mask stack as an ``(S, *spatial)`` array of namespace ``xp``.

    Accepted shapes: ``(S, *spatial)``, ``(S, 1, *spatial)`` and the stack's own
    ``(S, C, *spatial)`` (then channel ``channel`` is used).
    """
    namespace(mask, name)
    if np.dtype(mask.dtype) != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {np.dtype(mask.dtype).name}")
    shape = tuple(int(s) for s in mask.shape)
    samples, spatial = stack_shape[0], stack_shape[2:]
    if shape == (samples, *spatial):
        plain = mask
    elif shape == (samples, 1, *spatial):
        plain = mask[:, 0]
    elif shape == stack_shape:
        plain = mask[:, channel]
    else:
        raise ValueError(
            f"{name} has shape {shape}; expected {(samples, *spatial)}, "
            f"{(samples, 1, *spatial)} or {stack_shape} to match the image stack"
        )
    return to_host(plain) if xp is np else xp.asarray(plain)


def _check_stats(stats: Any) -> tuple[str, ...]:
    """Return the requested statistic names, in order, without duplicates."""
    names = (stats,) if isinstance(stats, str) else stats
    if not isinstance(names, (Sequence, set, frozenset)):
        raise TypeError(f"stats must be a sequence of names from {STATISTICS}, got {stats!r}")
    ordered: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"stats entries must be strings, got {name!r}")
        if name not in STATISTICS:
            raise ValueError(f"unknown statistic {name!r}: expected one of {STATISTICS}")
        if name not in ordered:
            ordered.append(name)
    if not ordered:
        raise ValueError(f"stats is empty: name at least one of {STATISTICS}")
    return tuple(ordered)


def _check_value_range(value_range: Any) -> tuple[float, float] | None:
    if value_range is None:
        return None
    if isinstance(value_range, (str, bytes)) or not isinstance(value_range, (Sequence, np.ndarray)):
        raise TypeError(f"value_range must be a pair (low, high) or None, got {value_range!r}")
    if len(value_range) != 2:
        raise ValueError(f"value_range must be a pair (low, high), got {value_range!r}")
    low = check.as_real(value_range[0], "value_range[0]", finite=True)
    high = check.as_real(value_range[1], "value_range[1]", finite=True)
    if not low < high:
        raise ValueError(f"value_range must have low < high, got ({low}, {high})")
    return low, high


def _entropy_bits(histograms: Any, pixels: Any, xp: Any) -> Any:
    """Return the entropy in bits of ``(..., bins + 1)`` histograms (last bin: NaN).

    With ``n`` pixels and counts ``c``: ``H = log2(n) - sum(c * log2(c)) / n``.
    ``c * log2(c)`` is read from a table over ``0 .. max(n)``, which is much
    cheaper than a logarithm per bin of every region.
    """
    counts, nan_count = histograms[..., :-1], histograms[..., -1]
    largest = int(pixels.max()) if pixels.size else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if largest <= _ENTROPY_TABLE_MAX:
            table = xp.arange(largest + 1, dtype=xp.float64)
            table[1:] *= xp.log2(table[1:])  # 0 * log2(0) = 0
            weighted = table[counts].sum(axis=-1)
        else:  # huge regions: a table would cost more than it saves
            as_float = counts.astype(xp.float64)
            weighted = (as_float * xp.log2(xp.maximum(as_float, 1.0))).sum(axis=-1)
        entropy = xp.log2(pixels) - weighted / pixels
    # Rounding can leave -1e-16 for a single-valued region.
    return xp.where(nan_count > 0, xp.nan, xp.maximum(entropy, 0.0))


def _stack_shift(image: Any, xp: Any) -> float:
    """Return a value near the stack's mean, to subtract before squaring."""
    steps = tuple(slice(None, None, max(1, int(n) // 64)) for n in image.shape[1:])
    sample = image[(slice(None, None, max(1, int(image.shape[0]) // 4)),) + steps]
    sample = sample.astype(xp.float64)
    sample = sample[xp.isfinite(sample)]
    if int(sample.size) == 0:
        return 0.0
    shift = float(sample.mean())
    # An integer shift keeps integer images integer: their sums stay exact.
    return float(round(shift)) if np.dtype(image.dtype).kind in "iu" else shift


def check_workers(workers: Any) -> int:
    """Return the number of threads for host reductions (``None``: every usable core).

    Parameters
    ----------
    workers : int or None
        Threads asked for, at least 1; None for every core this process may use.

    Returns
    -------
    int
        The number of threads.

    Raises
    ------
    TypeError, ValueError
        If ``workers`` is not an integer, or is below 1.
    """
    if workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # no sched_getaffinity (macOS, Windows)
            return max(1, os.cpu_count() or 1)
    count = check.as_int(workers, "workers")
    if count < 1:
        raise ValueError(f"workers must be >= 1 (or None for every core), got {count}")
    return count


def region_statistics(
    stack: Any,
    patch_size: Sequence[int],
    *,
    channel: int = 0,
    stats: Sequence[str] | str = ("mean", "std", "max"),
    bins: int = DEFAULT_BINS,
    value_range: tuple[float, float] | None = None,
    mask: Any = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Return statistics of every sampling region of every sample of a stack.

    The sampling region of grid cell ``g`` is the box ``[g * P, (g + 2) * P)``
    clipped to the image, the "twice the patch size" region that patches with
    a corner in cell ``g`` are drawn from. The grid has
    ``(D + 1) // P`` cells per axis, as in :class:`StratifiedPatching`; a
    stack smaller than the patch is accepted as the sampler accepts it (no
    cell along an axis where ``D < P - 1``, one cell covering the image where
    ``D == P - 1``).

    Every region is computed at once, on the stack's device, in one pass over
    the pixels per statistic family: each ``P``-sized block of the image is
    reduced once, and each region combines its ``2**d`` blocks. There is no
    loop over regions.

    Parameters
    ----------
    stack : numpy.ndarray or cupy.ndarray
        Image stack with axes ``SC(Z)YX``, integer or float. PyTorch tensors
        and other array-likes are read as NumPy arrays (``__array__``, DLPack),
        CUDA arrays as CuPy arrays.
    patch_size : sequence of int
        Patch size per spatial axis (2 or 3 entries), as given to the sampler.
    channel : int, default 0
        The channel the statistics are computed on.
    stats : sequence of str or str, default ("mean", "std", "max")
        Which statistics, among:

        - ``"mean"``: mean pixel value;
        - ``"std"``: population standard deviation (``ddof=0``);
        - ``"min"``, ``"max"``: smallest and largest pixel value;
        - ``"entropy"``: Shannon entropy, in bits, of the histogram of the
          region's pixels over ``bins`` equal bins of ``value_range``;
        - ``"coverage"``: fraction of the region's pixels that are True in
          ``mask``.
    bins : int, default 64
        Number of histogram bins of ``"entropy"``, in ``[1, 2**20]``.
    value_range : (float, float) or None, default None
        The range ``(low, high)`` that the entropy's bins split equally. Values
        outside it are counted in the first or last bin. None uses the
        smallest and largest value of the channel over the whole stack (every
        sample), so the entropies of one stack are comparable; give a range to
        compare several stacks. Only used by ``"entropy"``.
    mask : numpy.ndarray or cupy.ndarray of bool, optional
        Required by ``"coverage"`` (and only accepted with it): a boolean mask
        of shape ``(S, *spatial)``, ``(S, 1, *spatial)`` or the stack's shape
        (then channel ``channel`` is used). Moved to the stack's device.
    workers : int or None, default None
        Threads that reduce a NumPy stack, each its own rows or samples (NumPy
        releases the GIL in its loops); None uses every core this process may
        run on, 1 works in the calling thread. Ignored for CuPy stacks, which
        the GPU reduces.

    Returns
    -------
    dict of str to array
        One float64 array of shape ``(S, *grid_shape)`` per requested
        statistic, in the order asked, on the stack's device (NumPy in, NumPy
        out; CuPy or CUDA tensor in, CuPy out). A region without pixels (only possible when
        a patch size is 1) is NaN. Regions with a NaN pixel have a NaN mean,
        std, min, max and entropy.

    Raises
    ------
    TypeError
        If ``stack`` or ``mask`` is not an array (nor array-like), ``stack`` is not
        integer or float, ``mask`` is not boolean, or an argument has the
        wrong type.
    ValueError
        If a shape does not match, a statistic is unknown, ``bins`` is not
        positive, ``value_range`` is not a finite increasing pair, the
        stack's values are not finite when the entropy needs their range, or
        ``mask`` is given without (or missing for) ``"coverage"``.
    IndexError
        If ``channel`` is out of range.

    Notes
    -----
    Precision: sums and sums of squares accumulate in float64. Before
    squaring, a value near the stack's mean (rounded to an integer for
    integer images) is subtracted, which keeps ``E[x^2] - E[x]^2`` from
    cancelling; for integer images every sum is exact while a region's sum of
    squared deviations stays below ``2**53`` (any 16-bit image with regions up
    to ``2**21`` pixels), so mean and std are then correctly rounded up to the
    final division and square root.

    Examples
    --------
    >>> import numpy as np
    >>> from gpu_patching import region_statistics
    >>> stack = np.arange(2 * 1 * 64 * 64, dtype=np.uint16).reshape(2, 1, 64, 64)
    >>> stats = region_statistics(stack, (16, 16), stats=("mean", "max"))
    >>> stats["mean"].shape
    (2, 4, 4)
    >>> float(stats["max"][0, 0, 0])  # rows 0..31, columns 0..31 of sample 0
    2015.0
    """
    patch = check.validate_patch_size(patch_size)
    stack = require_array(stack, "stack")
    mask = None if mask is None else require_array(mask, "mask")
    xp = check_stack(stack, patch, "stack")
    names = _check_stats(stats)
    stack_shape = tuple(int(s) for s in stack.shape)
    channel = check.check_index(channel, "channel", stack_shape[1])
    bins = check.as_int(bins, "bins")
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be in [1, {MAX_BINS}], got {bins}")
    value_range = _check_value_range(value_range)
    n_workers = check_workers(workers)
    if "coverage" in names and mask is None:
        raise ValueError("the 'coverage' statistic needs a mask: pass mask=<boolean stack>")
    if mask is not None and "coverage" not in names:
        raise ValueError("mask is only used by the 'coverage' statistic; add it to stats")
    plain_mask = None if mask is None else _spatial_mask(mask, stack_shape, channel, "mask", xp)

    image = stack[:, channel]
    spatial = stack_shape[2:]
    grid = grid_shape(spatial, patch)
    n_samples = stack_shape[0]

    wants_entropy = "entropy" in names
    if wants_entropy and value_range is None:
        low, high = float(image.min()), float(image.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                "the stack holds NaN or infinite values, so the entropy's histogram has "
                "no natural range: pass value_range=(low, high)"
            )
        value_range = (low, high)
    wants_sum = "mean" in names or "std" in names
    wants_squares = "std" in names
    shift = _stack_shift(image, xp) if wants_squares else 0.0

    pixels = region_pixels(spatial, patch, grid, xp)
    results = {name: xp.empty((n_samples, *grid), dtype=xp.float64) for name in names}
    on_host = xp is np

    plan = BlockPlan(
        patch=patch,
        sums=wants_sum,
        squares=wants_squares,
        shift=shift,
        maximum="max" in names,
        minimum="min" in names,
        bins=bins if wants_entropy else 0,
        value_range=value_range or (0.0, 1.0),
        copy_budget=_COPY_ELEMENTS_CPU if on_host else _COPY_ELEMENTS_GPU,
    )
    group_budget = _GROUP_ELEMENTS_CPU if on_host else _GROUP_ELEMENTS_GPU
    if wants_entropy:  # a block's histogram is (bins + 1) counts: small blocks, large groups
        group_budget = min(group_budget, _HISTOGRAM_ELEMENTS * math.prod(patch) // (bins + 1))
    n_workers = n_workers if on_host else 1
    # With threads, a large sample is cut into about two row slices per thread
    # (no thinner than a sixteenth of a group, so Python's share stays small).
    row_budget = (
        None if n_workers == 1 else max(group_budget // (2 * n_workers), group_budget // 16)
    )
    with worker_pool(n_workers) as pool:
        for samples, row_slices in group_slices(
            n_samples, spatial, patch, group_budget, row_budget
        ):
            blocks = reduce_group(image, plain_mask, samples, row_slices, plan, xp, pool, n_workers)
            _finish_group(blocks, samples, results, grid, pixels, shift, xp)
    return results


def _finish_group(
    blocks: dict[str, Any],
    samples: slice,
    results: dict[str, Any],
    grid: tuple[int, ...],
    pixels: Any,
    shift: float,
    xp: Any,
) -> None:
    """Combine a group's blocks into regions and write its rows of ``results``.

    ``results`` has the names asked for; sums and squares are of the values
    minus ``shift``.
    """
    region = combine_regions(blocks, grid, xp)
    empty = pixels == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if "sum" in region:
            mean_shifted = region["sum"] / pixels
            if "mean" in results:
                results["mean"][samples] = mean_shifted + shift
            if "std" in results:
                variance = region["squares"] / pixels - mean_shifted**2
                results["std"][samples] = xp.sqrt(xp.maximum(variance, 0.0))
        if "max" in results:
            results["max"][samples] = xp.where(empty, xp.nan, region["max"])
        if "min" in results:
            results["min"][samples] = xp.where(empty, xp.nan, region["min"])
        if "entropy" in results:
            entropy = _entropy_bits(region["hist"], pixels, xp)
            results["entropy"][samples] = xp.where(empty, xp.nan, entropy)
        if "coverage" in results:
            results["coverage"][samples] = region["mask"] / pixels


# -- looking at a statistic ----------------------------------------------------


def filter_map(
    statistic: Any,
    patch_size: Sequence[int],
    spatial_shape: Sequence[int],
    *,
    combine: str = "max",
) -> Any:
    """Spread a per-region statistic back over the pixels of the image.

    Each pixel gets the largest (``combine="max"``) or smallest
    (``combine="min"``) value of the statistic over the sampling regions that
    contain it (up to ``2**d`` regions). With ``"max"``, a pixel whose value
    is under a threshold lies only in regions that :func:`filter_background`
    would filter with that threshold: thresholding the map shows what will be
    sampled less. With ``"min"``, a pixel at or over the threshold lies only
    in regions that keep their probability.

    Parameters
    ----------
    statistic : numpy.ndarray or cupy.ndarray
        A statistic per region, shape ``(S, *grid_shape)`` (e.g. an entry of
        :func:`region_statistics`) or ``grid_shape`` for one sample.
    patch_size : sequence of int
        Patch size per spatial axis.
    spatial_shape : sequence of int
        The ``(Z)YX`` shape of the image.
    combine : {"max", "min"}, default "max"
        How the regions over a pixel are combined. NaN regions (without
        pixels) are ignored.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        Float64 map of shape ``(S, *spatial_shape)`` (or ``spatial_shape``
        for a single sample), on the statistic's device.

    Raises
    ------
    TypeError
        If ``statistic`` is not an array (or array-like) of real numbers.
    ValueError
        If the shapes do not match or ``combine`` is unknown.

    Examples
    --------
    >>> import numpy as np
    >>> from gpu_patching import filter_map
    >>> region_mean = np.array([[[0.0, 5.0], [1.0, 2.0]]])
    >>> filter_map(region_mean, (2, 2), (4, 4))[0]
    array([[0., 0., 5., 5.],
           [0., 0., 5., 5.],
           [1., 1., 5., 5.],
           [1., 1., 5., 5.]])
    """
    statistic = require_array(statistic, "statistic")
    xp = namespace(statistic, "statistic")
    if np.dtype(statistic.dtype).kind not in "iuf":
        raise TypeError(
            f"statistic must hold real numbers, got dtype {np.dtype(statistic.dtype).name}"
        )
    patch = check.validate_patch_size(patch_size)
    if isinstance(spatial_shape, (str, bytes)) or not isinstance(
        spatial_shape, (Sequence, np.ndarray)
    ):
        raise TypeError(f"spatial_shape must be a sequence of ints, got {spatial_shape!r}")
    spatial = tuple(check.as_int(n, "spatial_shape entry") for n in spatial_shape)
    if len(spatial) != len(patch):
        raise ValueError(
            f"spatial_shape {spatial} has {len(spatial)} axes but patch_size {patch} has "
            f"{len(patch)}"
        )
    if min(spatial, default=0) < 1:
        raise ValueError(f"spatial_shape entries must be positive, got {spatial}")
    if combine not in _COMBINE:
        raise ValueError(f"combine must be one of {_COMBINE}, got {combine!r}")
    grid = grid_shape(spatial, patch)
    shape = tuple(int(s) for s in statistic.shape)
    ndim = len(patch)
    if shape[-ndim:] != grid or len(shape) not in (ndim, ndim + 1):
        cells = ", ".join(str(g) for g in grid)
        raise ValueError(
            f"statistic has shape {shape}; for spatial shape {spatial} and patch size "
            f"{patch} it must be (S, {cells}) or ({cells})"
        )
    single = len(shape) == ndim
    values = statistic[None] if single else statistic
    values = values.astype(xp.float64)
    pick = xp.fmax if combine == "max" else xp.fmin
    for a, (length, size) in enumerate(zip(spatial, patch, strict=True)):
        axis = 1 + a
        n_blocks = -(-length // size)
        # Block b lies in regions b - 1 and b: pad with NaN (ignored by fmax /
        # fmin) so both exist for every block, then take the pair.
        pad_shape = list(values.shape)
        pad_shape[axis] = 1
        nan = xp.full(pad_shape, xp.nan, dtype=xp.float64)
        padded = xp.concatenate([nan, values, nan], axis=axis)
        before = (slice(None),) * axis
        blocks = pick(
            padded[before + (slice(0, n_blocks),)], padded[before + (slice(1, n_blocks + 1),)]
        )
        values = xp.repeat(blocks, size, axis=axis)[before + (slice(0, length),)]
    return values[0] if single else values
