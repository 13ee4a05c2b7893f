"""The chunk order of an epoch: the epoch's patches grouped by the chunks they read.

A shuffled epoch spreads every batch over the whole store, so a chunk is
decoded again for each window of batches that touches it.
:func:`chunk_order` reorders the *same* rows so that each chunk is wanted
during one stretch of the epoch, while every batch still mixes several
regions (``docs/design.md``, "Chunk order"):

1. **Groups.** A row's group is its *home chunk*: the chunk of its stack that
   holds the centre of its patch (stack, sample chunk, spatial chunk). Most
   of a patch's pixels come from its home chunk.
2. **Group order.** The groups are numbered in sorted key order and put in
   the order of the counter-based bijection :func:`~gpu_patching.permutation.permute`
   of ``(seed, epoch)`` over the number of groups.
3. **Ranks.** The shuffled groups are cut into ``world_size`` runs of whole
   groups, each as close to ``N / world_size`` rows as group boundaries allow;
   rank ``r`` takes run ``r``, so a group (and its home chunk) is read by
   one rank. Every rank gets the same number of rows: the largest run's
   length, shorter runs padded by wrapping round to their own start (every
   row is in some shard), or the shortest run's length with ``drop_last``
   (the ranks' rows are disjoint).
4. **Windows.** Each rank's groups, in order, form windows of ``window``
   groups; inside a window the rows are ranked by the shuffle bijection of
   their patch indices (:func:`~gpu_patching.permutation.permute`), so a
   batch takes patches of several groups.

Everything is a pure function of ``(seed, epoch)`` and the epoch's rows: the
same on every backend, in every process, after a checkpoint is restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .. import _validation as check
from ..permutation import permute
from ..specs import PatchBatch

__all__ = ["DEFAULT_CHUNK_WINDOW", "ORDERS", "ChunkOrder", "check_order", "chunk_order"]

#: Epoch orders a loader takes: the shuffled epoch, or the chunk order.
ORDERS = ("shuffle", "chunks")
#: Groups (home chunks) whose patches are mixed together by default: each
#: batch then takes patches of up to this many regions, and the chunk cache
#: must hold about this many groups' chunks and their neighbours.
DEFAULT_CHUNK_WINDOW = 4


@dataclass(frozen=True)
class ChunkOrder:
    """One rank's rows of an epoch in chunk order.

    Attributes
    ----------
    rows : numpy.ndarray of int64, shape (n_rows,)
        Positions in the plain epoch (equal to the patch indices), in the
        order this rank reads them.
    group : numpy.ndarray of int64, shape (n_rows,)
        The group (home chunk, numbered in sorted key order) of each row.
    window : numpy.ndarray of int64, shape (n_rows,)
        The window of each row, counted over the whole epoch (windows of
        different ranks have different numbers).
    n_groups : int
        Groups in the whole epoch.
    """

    rows: NDArray[np.int64]
    group: NDArray[np.int64]
    window: NDArray[np.int64]
    n_groups: int


def check_order(order: object, window: object) -> tuple[str, int]:
    """Return ``(order, window)`` after checking them.

    Parameters
    ----------
    order : str
        ``"shuffle"`` or ``"chunks"``.
    window : int
        Groups per window, at least 1.

    Returns
    -------
    tuple of (str, int)
        The two values.

    Raises
    ------
    ValueError
        If ``order`` is not one of :data:`ORDERS` or ``window`` is below 1.
    TypeError
        If ``window`` is not an integer.
    """
    if not isinstance(order, str) or order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    size = check.as_int(window, "chunk_window")
    if size < 1:
        raise ValueError(f"chunk_window must be at least 1, got {size}")
    return order, size


def _home_groups(
    rows: PatchBatch, chunks: Sequence[tuple[int, ...]]
) -> tuple[NDArray[np.int64], int]:
    """Return each row's group (its home chunk, numbered in sorted key order) and their count."""
    data_idx = np.asarray(rows.data_idx, dtype=np.int64)
    sample_idx = np.asarray(rows.sample_idx, dtype=np.int64)
    coords = np.asarray(rows.coords, dtype=np.int64).reshape(len(data_idx), -1)
    chunk_table = np.asarray(chunks, dtype=np.int64).reshape(len(chunks), -1)
    size = chunk_table[data_idx]
    # The centre, not the corner: a patch then reaches into neighbours on
    # every side by at most half its size, so fewer patches leave home.
    centre = coords + np.asarray(rows.patch_size, dtype=np.int64) // 2
    keys = np.column_stack([data_idx, sample_idx // size[:, 0], centre // size[:, 2:]])
    unique, group = np.unique(keys, axis=0, return_inverse=True)
    return group.reshape(-1).astype(np.int64), len(unique)


def chunk_order(
    rows: PatchBatch,
    chunks: Sequence[tuple[int, ...]],
    *,
    seed: int,
    epoch: int,
    window: int = DEFAULT_CHUNK_WINDOW,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> ChunkOrder:
    """Return one rank's share of an epoch in chunk order.

    Parameters
    ----------
    rows : PatchBatch
        The whole plain epoch with NumPy columns
        (``strategy.sample_epoch(epoch).to_numpy()``): row ``i`` is index ``i``.
    chunks : sequence of tuple of int
        The ``SC(Z)YX`` chunk shape of each stack (``data_idx``).
    seed : int
        The sampler's 64-bit seed.
    epoch : int
        The epoch, in ``[0, 2**32)``.
    window : int, default DEFAULT_CHUNK_WINDOW
        Groups whose rows are mixed together.
    rank, world_size : int, default 0 and 1
        This rank and the number of ranks.
    drop_last : bool, default False
        Give every rank the shortest run's length (disjoint shards) instead
        of padding every run to the longest's.

    Returns
    -------
    ChunkOrder
        This rank's rows, groups and windows.

    Raises
    ------
    ValueError
        If ``window`` is below 1, ``rank`` or ``world_size`` is out of range,
        a chunk shape does not match the rows, or there are fewer groups than
        ranks (some rank would get no rows).
    TypeError
        If an integer argument is not an integer or ``drop_last`` not a bool.
    """
    _, size = check_order("chunks", window)
    rank, world_size = check.check_rank_world_size(rank, world_size)
    drop_last = check.check_flag(drop_last, "drop_last")
    epoch = check.check_epoch(epoch)
    n_axes = len(rows.patch_size) + 2
    for k, shape in enumerate(chunks):
        if len(shape) != n_axes or min(shape) < 1:
            raise ValueError(
                f"chunks[{k}] must be {n_axes} positive SC(Z)YX chunk sizes, got {shape}"
            )
    n_rows_all = len(rows)
    if n_rows_all == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ChunkOrder(empty, empty, empty, 0)
    group, n_groups = _home_groups(rows, chunks)
    if n_groups < world_size:
        raise ValueError(
            f"order='chunks' gives each rank whole chunk groups, but the epoch has "
            f"{n_groups} groups for world_size {world_size}; use order='shuffle'"
        )
    # Rank of each group in the epoch's group order.
    group_at = permute(np.arange(n_groups), n_groups, seed, epoch)
    group_rank = np.empty(n_groups, dtype=np.int64)
    group_rank[group_at] = np.arange(n_groups, dtype=np.int64)
    # Runs of whole groups, cut at the group boundary nearest to r * N / world_size.
    sizes = np.bincount(group, minlength=n_groups)[group_at]
    ends = np.cumsum(sizes)
    ideal = np.arange(1, world_size) * n_rows_all / world_size
    after = np.searchsorted(ends, ideal)  # the first group whose end reaches the cut
    before = np.maximum(after - 1, 0)
    closer = (after > 0) & (np.abs(ends[before] - ideal) <= np.abs(ends[after] - ideal))
    cut = np.where(closer, before, after) + 1  # groups before the cut
    # Every run keeps at least one group: cut r in [r, n_groups - world_size + r],
    # strictly increasing (there are at least world_size groups).
    lowest = np.arange(1, world_size)
    cut = np.clip(cut, lowest, n_groups - world_size + lowest)
    cut = np.maximum.accumulate(cut - lowest) + lowest
    bounds = np.concatenate([[0], cut, [n_groups]]).astype(np.int64)
    run_rows = np.concatenate([[0], ends])[bounds]
    run_lengths = np.diff(run_rows)
    n_rows = int(run_lengths.min() if drop_last else run_lengths.max())
    first_group, last_group = int(bounds[rank]), int(bounds[rank + 1])
    # This rank's rows: windows of `size` groups, mixed by their shuffled position.
    mine = np.flatnonzero(
        (group_rank[group] >= first_group) & (group_rank[group] < last_group)
    ).astype(np.int64)
    row_window = group_rank[group[mine]] // size
    mixed = permute(mine, n_rows_all, seed, epoch)
    ordered = mine[np.lexsort((mixed, row_window))]
    if len(ordered) < n_rows:
        # Padding wraps round this rank's own rows: no chunk of another rank.
        ordered = np.resize(ordered, n_rows)
    ordered = ordered[:n_rows]
    return ChunkOrder(
        rows=ordered,
        group=group[ordered],
        window=group_rank[group[ordered]] // size,
        n_groups=n_groups,
    )
