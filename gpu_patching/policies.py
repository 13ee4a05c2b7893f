"""Policies that change a sampler: background filtering and validation splits.

Both act on a :class:`~gpu_patching.StratifiedPatching` through its public
update calls, in one transaction: :func:`filter_background` scores every
region with :func:`~gpu_patching.stats.region_statistics` and lowers the
probability of those under a threshold (or a mask coverage);
:func:`validation_split` sets grid cells aside as a fixed validation set,
spread over the samples by their patch counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _validation as check
from .arrays import require_array, to_host
from .grid import MAX_PROBABILITY, grid_shape
from .specs import PatchSpecs
from .stats import (
    DEFAULT_BINS,
    STATISTICS,
    check_stack,
    check_workers,
    region_statistics,
)
from .strategy import StratifiedPatching

__all__ = ["FilterResult", "filter_background", "validation_split"]

logger = logging.getLogger(__name__)


# -- background filtering ------------------------------------------------------


@dataclass(frozen=True)
class FilterResult:
    """What :func:`filter_background` did.

    Attributes
    ----------
    filtered : dict of (int, int) to int
        Per ``(data_idx, sample_idx)``: how many included regions met the
        filter criterion and now have the filtered probability.
    scored : dict of (int, int) to int
        Per ``(data_idx, sample_idx)``: how many regions were looked at (the
        included ones; excluded cells keep their state).
    n_patches_before : int
        ``strategy.n_patches`` before the call.
    n_patches : int
        ``strategy.n_patches`` after the call.
    """

    filtered: dict[tuple[int, int], int] = field(default_factory=dict)
    scored: dict[tuple[int, int], int] = field(default_factory=dict)
    n_patches_before: int = 0
    n_patches: int = 0

    @property
    def n_filtered(self) -> int:
        """Filtered regions over all samples."""
        return sum(self.filtered.values())

    @property
    def n_scored(self) -> int:
        """Scored regions over all samples."""
        return sum(self.scored.values())


def _check_strategy(strategy: Any) -> StratifiedPatching:
    if not isinstance(strategy, StratifiedPatching):
        raise TypeError(f"strategy must be a StratifiedPatching, got {type(strategy).__name__}")
    return strategy


def _per_stack(values: Any, n_stacks: int, name: str) -> list[Any]:
    """Return one entry per stack; a lone array is accepted for a single stack."""
    if check.is_dense(values):
        items = [values]
    elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of arrays (one per stack), got {values!r}")
    else:
        items = list(values)
    if len(items) != n_stacks:
        raise ValueError(
            f"{name} has {len(items)} entries but the strategy has {n_stacks} stacks"
            " (one array per data_idx is expected)"
        )
    return items


def _included_grids(strategy: StratifiedPatching) -> dict[tuple[int, int], NDArray[np.bool_]]:
    """Return, per sample, a boolean grid that is True at the included cells."""
    grids = {}
    for data_idx, shape in enumerate(strategy.data_shapes):
        for sample_idx in range(shape[0]):
            grids[(data_idx, sample_idx)] = ~strategy.get_excluded_cells(data_idx, sample_idx)
    return grids


def filter_background(
    strategy: StratifiedPatching,
    stacks: Sequence[Any] | Any,
    *,
    stat: str = "mean",
    threshold: float | None = None,
    filtered_prob: float = 0.1,
    channel: int = 0,
    mask_stacks: Sequence[Any] | Any | None = None,
    coverage: float | None = None,
    bins: int = DEFAULT_BINS,
    value_range: tuple[float, float] | None = None,
    workers: int | None = None,
) -> FilterResult:
    """Sample background regions less often.

    Scores every included region of every sample with
    :func:`region_statistics` and gives ``filtered_prob`` to the regions
    whose statistic is under ``threshold`` or whose mask coverage is under
    ``coverage`` (either criterion suffices). The other regions keep their
    current probability, so repeated calls only ever filter more; excluded
    cells are left as they are. Each sample gets at most one dense
    ``set_region_probs`` call.

    Parameters
    ----------
    strategy : StratifiedPatching
        The sampler to update.
    stacks : sequence of array, or array
        One ``SC(Z)YX`` array per ``data_idx`` (NumPy, CuPy, or a tensor
        read as one, see :func:`~gpu_patching.stats.region_statistics`), of shape
        ``strategy.data_shapes[data_idx]`` (a lone array for a single stack).
        Stacks smaller than the patch are accepted, as the sampler accepts
        them; their samples have no patches to filter.
    stat : {"mean", "std", "min", "max", "entropy"}, default "mean"
        The statistic compared with ``threshold``.
    threshold : float or None, default None
        Regions with ``stat < threshold`` are filtered. None filters on
        ``coverage`` only; at least one of the two must be given. Pick it by
        looking at :func:`filter_map`.
    filtered_prob : float, default 0.1
        The probability that filtered regions get, in
        ``[0, gpu_patching.grid.MAX_PROBABILITY]``.
    channel : int, default 0
        The channel the statistic is computed on.
    mask_stacks : sequence of array, or array, optional
        Boolean masks (e.g. foreground), one per stack, shaped as
        :func:`region_statistics` accepts; required with ``coverage``.
    coverage : float or None, default None
        Regions where less than this fraction (``0..1``) of the pixels is True
        in the mask are filtered.
    bins : int, default 64
        Histogram bins, for ``stat="entropy"``.
    value_range : (float, float) or None, default None
        Histogram range, for ``stat="entropy"``; None uses each stack's own
        range (give one to make several stacks comparable).
    workers : int or None, default None
        Threads that score a NumPy stack (see :func:`region_statistics`);
        None uses every core this process may run on.

    Returns
    -------
    FilterResult
        Filtered and scored regions per sample, and ``n_patches`` before and
        after. The same summary is logged (``logging``, level INFO).

    Raises
    ------
    TypeError
        If an argument has the wrong type (see :func:`region_statistics`).
    ValueError
        If a stack's shape differs from ``strategy.data_shapes``, a value is
        out of range, or neither ``threshold`` nor ``coverage`` is given.
    IndexError
        If ``channel`` is out of range.

    Notes
    -----
    Every input is checked and every region scored before the sampler is
    changed; if updating a sample fails, the whole state of the sampler
    (probabilities, exclusions, call counters) comes back as it was, so a
    failed call changes nothing.
    Regions without pixels (NaN statistic) are never filtered.

    Examples
    --------
    >>> import numpy as np
    >>> from gpu_patching import StratifiedPatching, filter_background
    >>> image = np.zeros((1, 1, 128, 128), dtype=np.uint16)
    >>> image[..., :64, :] = 1000  # the top half has signal
    >>> sampler = StratifiedPatching([image.shape], (32, 32), seed=0, backend="numpy")
    >>> result = filter_background(sampler, [image], threshold=500, filtered_prob=0.1)
    >>> result.filtered[(0, 0)], result.n_patches_before, result.n_patches
    (8, 16, 9)
    """
    strategy = _check_strategy(strategy)
    n_stacks = len(strategy.data_shapes)
    stack_list = _per_stack(stacks, n_stacks, "stacks")
    scored_stats = tuple(s for s in STATISTICS if s != "coverage")
    if not isinstance(stat, str) or stat not in scored_stats:
        raise ValueError(
            f"stat must be one of {scored_stats}, got {stat!r} (mask coverage has its own "
            "'coverage' argument)"
        )
    if threshold is None and coverage is None:
        raise ValueError("give a threshold, a coverage, or both: nothing to filter on")
    limit = None if threshold is None else check.as_real(threshold, "threshold", finite=True)
    min_coverage = None if coverage is None else check.as_real(coverage, "coverage", finite=True)
    if min_coverage is not None and not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"coverage must be a fraction in [0, 1], got {min_coverage}")
    probability = check.as_real(filtered_prob, "filtered_prob", finite=True)
    if not 0.0 <= probability <= MAX_PROBABILITY:
        raise ValueError(f"filtered_prob must be in [0, {MAX_PROBABILITY:g}], got {probability}")
    if min_coverage is not None and mask_stacks is None:
        raise ValueError("coverage needs mask_stacks: one boolean mask per stack")
    if min_coverage is None and mask_stacks is not None:
        raise ValueError("mask_stacks is only used with coverage=<fraction>")
    check_workers(workers)
    masks = (
        [None] * n_stacks
        if mask_stacks is None
        else _per_stack(mask_stacks, n_stacks, "mask_stacks")
    )
    stack_list = [require_array(stack, f"stacks[{k}]") for k, stack in enumerate(stack_list)]
    masks = [
        None if mask is None else require_array(mask, f"mask_stacks[{k}]")
        for k, mask in enumerate(masks)
    ]
    for k, stack in enumerate(stack_list):
        check_stack(stack, strategy.patch_size, f"stacks[{k}]")
        shape = tuple(int(s) for s in stack.shape)
        if shape != strategy.data_shapes[k]:
            raise ValueError(
                f"stacks[{k}] has shape {shape}, but the strategy's data_shapes[{k}] is "
                f"{strategy.data_shapes[k]}"
            )

    # Score everything first: nothing changes until every stack has passed.
    names = (() if limit is None else (stat,)) + (() if min_coverage is None else ("coverage",))
    filtered_by_stack = []
    for stack, mask in zip(stack_list, masks, strict=True):
        scores = region_statistics(
            stack,
            strategy.patch_size,
            channel=channel,
            stats=names,
            bins=bins,
            value_range=value_range,
            mask=mask,
            workers=workers,
        )
        below: NDArray[np.bool_] | None = None
        if limit is not None:
            below = to_host(scores[stat]) < limit
        if min_coverage is not None:
            sparse = to_host(scores["coverage"]) < min_coverage
            below = sparse if below is None else below | sparse
        assert below is not None  # threshold or coverage was given
        filtered_by_stack.append(below)

    n_before = strategy.n_patches
    included = _included_grids(strategy)
    filtered: dict[tuple[int, int], int] = {}
    scored: dict[tuple[int, int], int] = {}
    # All or nothing: if one sample's update is refused (say, it would exceed
    # the per-sample patch limit), the whole sampler state comes back as it
    # was, call counters included.
    with strategy.transaction():
        for (data_idx, sample_idx), kept in included.items():
            hit = filtered_by_stack[data_idx][sample_idx] & kept
            key = (data_idx, sample_idx)
            filtered[key] = int(hit.sum())
            scored[key] = int(kept.sum())
            current = strategy.get_region_probs(data_idx, sample_idx)
            updated = np.where(hit, probability, current)
            if not np.array_equal(updated, current):
                strategy.set_region_probs(data_idx, sample_idx, updated)
    result = FilterResult(
        filtered=filtered, scored=scored, n_patches_before=n_before, n_patches=strategy.n_patches
    )
    criteria = []
    if limit is not None:
        criteria.append(f"{stat} < {limit:g}")
    if min_coverage is not None:
        criteria.append(f"coverage < {min_coverage:g}")
    logger.info(
        "filter_background: %d of %d regions (%s) set to probability %g; n_patches %d -> %d",
        result.n_filtered,
        result.n_scored,
        " or ".join(criteria),
        probability,
        n_before,
        result.n_patches,
    )
    for key, count in filtered.items():
        logger.debug(
            "filter_background: sample %s: %d of %d regions filtered", key, count, scored[key]
        )
    return result


# -- validation split ----------------------------------------------------------


def _apportion(total: int, weights: Sequence[int], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` without exceeding ``capacity``.

    Largest-remainder (Hamilton) rounding in exact integer arithmetic, ties
    to the lower index. When a share exceeds its capacity it is capped and
    the rest is shared again among the others; when only zero-weight entries
    have room left, they share by their spare capacity.
    """
    allocated = [0] * len(weights)
    full = [c <= 0 for c in capacity]
    while True:
        remaining = total - sum(allocated)
        if remaining == 0:
            return allocated
        room = [c - a for c, a in zip(capacity, allocated, strict=True)]
        share_by = [0 if f else w for f, w in zip(full, weights, strict=True)]
        if sum(share_by) == 0:
            share_by = [0 if f else r for f, r in zip(full, room, strict=True)]
        whole = sum(share_by)
        shares = [remaining * w // whole for w in share_by]
        order = sorted(range(len(shares)), key=lambda k: (-(remaining * share_by[k] % whole), k))
        for k in order[: remaining - sum(shares)]:
            shares[k] += 1
        capped = False
        for k, share in enumerate(shares):
            if share > room[k] and not full[k]:
                shares[k] = room[k]
                full[k] = True
                capped = True
        if not capped:
            return [a + s for a, s in zip(allocated, shares, strict=True)]
        # Keep only the capped entries' shares; the others are shared again.
        for k, share in enumerate(shares):
            if full[k]:
                allocated[k] += share


def validation_split(
    strategy: StratifiedPatching, n_val_patches: int, *, seed: int | None = None
) -> list[PatchSpecs]:
    """Set grid cells aside as a fixed validation set and exclude them from training.

    Chooses ``n_val_patches`` distinct grid cells among the included ones,
    spread over the samples in proportion to their number of patches
    (largest-remainder rounding; a sample never gives more cells than it
    has), excludes them from ``strategy``, and returns the patch of each: its
    corner is ``cell * patch_size``, so it covers exactly the cell. As no
    training patch may overlap an excluded cell, training patches never
    overlap a validation patch.

    Only cells whose patch fits in the image (``(cell + 1) * patch_size <= D``
    along every axis) are candidates; a cell at the far edge may be too
    short.

    Parameters
    ----------
    strategy : StratifiedPatching
        The sampler; its cells are excluded (one dense ``exclude_patches`` call
        per sample that gives cells).
    n_val_patches : int
        How many validation patches, ``>= 0``.
    seed : int or None, default None
        Seed of the choice, in ``[0, 2**64)``. None uses ``strategy.seed``, so
        the split can be replayed from the sampler's seed alone.

    Returns
    -------
    list of PatchSpecs
        The validation patches, in ``(data_idx, sample_idx)`` order and
        row-major cell order within a sample.

    Raises
    ------
    TypeError
        If ``strategy`` is not a ``StratifiedPatching`` or a number is not an
        integer.
    ValueError
        If ``n_val_patches`` is negative or more than the available cells (the
        message says how many are available), or ``seed`` is out of range.

    Examples
    --------
    >>> from gpu_patching import StratifiedPatching, validation_split
    >>> sampler = StratifiedPatching([(2, 1, 256, 256)], (64, 64), seed=0, backend="numpy")
    >>> validation = validation_split(sampler, 4, seed=1)
    >>> len(validation), sampler.n_patches
    (4, 28)
    """
    strategy = _check_strategy(strategy)
    n_wanted = check.as_int(n_val_patches, "n_val_patches")
    if n_wanted < 0:
        raise ValueError(f"n_val_patches must be >= 0, got {n_wanted}")
    chosen_seed = strategy.seed if seed is None else check.validate_seed(seed)
    patch = np.asarray(strategy.patch_size, dtype=np.int64)

    included = _included_grids(strategy)
    keys = list(included)
    candidates = []
    for data_idx, sample_idx in keys:
        # Row-major, as get_included_grid_coords lists them.
        cells = np.argwhere(included[(data_idx, sample_idx)]).astype(np.int64)
        spatial = np.asarray(strategy.data_shapes[data_idx][2:], dtype=np.int64)
        candidates.append(cells[np.all((cells + 1) * patch <= spatial, axis=1)])
    capacity = [len(cells) for cells in candidates]
    available = sum(capacity)
    if n_wanted > available:
        raise ValueError(
            f"n_val_patches={n_wanted} is more than the {available} grid cells available "
            "(included cells whose whole patch lies inside the image)"
        )
    if n_wanted == 0:
        return []

    # Samples are keyed in (data_idx, sample_idx) order, the order of the counts.
    weights = strategy.n_patches_per_sample.tolist()
    counts = _apportion(n_wanted, weights, capacity)

    generator = np.random.default_rng(chosen_seed)
    specs: list[PatchSpecs] = []
    picked: list[tuple[int, int, NDArray[np.int64]]] = []
    for (data_idx, sample_idx), cells, count in zip(keys, candidates, counts, strict=True):
        if count == 0:
            continue
        rows = np.sort(generator.choice(len(cells), size=count, replace=False))
        chosen = cells[rows]
        picked.append((data_idx, sample_idx, chosen))
        for cell in chosen:
            specs.append(
                {
                    "data_idx": data_idx,
                    "sample_idx": sample_idx,
                    "coords": tuple(int(c) for c in cell * patch),
                    "patch_size": strategy.patch_size,
                }
            )
    n_before = strategy.n_patches
    with strategy.transaction():  # a refused sample undoes the others
        for data_idx, sample_idx, chosen in picked:
            shape = strategy.data_shapes[data_idx][2:]
            excluded = np.zeros(grid_shape(shape, strategy.patch_size), dtype=bool)
            excluded[tuple(chosen.T)] = True
            # The dense boolean form: one call per sample (typed as a sequence there).
            strategy.exclude_patches(data_idx, sample_idx, excluded)
    logger.info(
        "validation_split: %d validation patches from %d samples (seed %d); n_patches %d -> %d",
        len(specs),
        len(picked),
        chosen_seed,
        n_before,
        strategy.n_patches,
    )
    return specs
