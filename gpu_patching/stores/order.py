"""The chunk order of an epoch: the epoch's patches swept tile by tile through the chunks.

:func:`chunk_order` reorders the *same* rows as the shuffled epoch: each row's
home chunk holds its patch's corner; home chunks are grouped into tiles, the
tiles shuffled by the counter-based bijection of ``(seed, epoch)`` and swept
row by row, ranks take runs of whole tiles, and the rows of ``window``
consecutive home chunks are mixed. :func:`choose_tile` picks the tile from the
cache's budget. A pure function of ``(seed, epoch)``, the tile and the rows.
Why and the measurements: ``docs/design.md``, "Chunk order".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .. import _validation as check
from ..permutation import permute
from ..rng import PURPOSE_SWEEP, random_uint32
from ..specs import PatchBatch

__all__ = [
    "DEFAULT_CHUNK_WINDOW",
    "MIN_TILES_PER_SHARD",
    "ORDERS",
    "ChunkOrder",
    "TileChoice",
    "check_order",
    "check_tile",
    "choose_tile",
    "chunk_order",
    "sweep_axes",
    "tile_choice",
]

#: Epoch orders a loader takes: the shuffled epoch, or the chunk order.
ORDERS = ("shuffle", "chunks")
#: Home chunks whose patches are mixed together by default: each batch then
#: takes patches of up to this many regions.
DEFAULT_CHUNK_WINDOW = 4
#: Tiles :func:`choose_tile` gives each shard (rank, or DataLoader worker) at
#: least, where the chunk grid allows: runs of whole tiles then come out near
#: ``N / world_size`` rows, so little is padded or dropped.
MIN_TILES_PER_SHARD = 2


@dataclass(frozen=True)
class ChunkOrder:
    """One rank's rows of an epoch in chunk order.

    Attributes
    ----------
    rows : numpy.ndarray of int64, shape (n_rows,)
        Positions in the plain epoch (equal to the patch indices), in the
        order this rank reads them.
    group : numpy.ndarray of int64, shape (n_rows,)
        The home chunk of each row, numbered in sorted key order over the
        whole epoch.
    tile : numpy.ndarray of int64, shape (n_rows,)
        The tile of each row, numbered in sorted key order over the whole
        epoch.
    window : numpy.ndarray of int64, shape (n_rows,)
        The window of each row, numbered from 0 in this rank's (or worker's)
        order.
    n_groups : int
        Home chunks in the whole epoch.
    n_tiles : int
        Tiles in the whole epoch.
    """

    rows: NDArray[np.int64]
    group: NDArray[np.int64]
    tile: NDArray[np.int64]
    window: NDArray[np.int64]
    n_groups: int
    n_tiles: int


def check_order(order: object, window: object) -> tuple[str, int]:
    """Return ``(order, window)`` after checking them.

    Parameters
    ----------
    order : str
        ``"shuffle"`` or ``"chunks"``.
    window : int
        Home chunks per window, at least 1.

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


def check_tile(tile: object, n_axes: int, name: str = "chunk_tile") -> tuple[int, ...]:
    """Return a tile shape (chunks per spatial axis) after checking it.

    Parameters
    ----------
    tile : sequence of int
        ``n_axes`` positive chunk counts, ``(Z)YX``.
    n_axes : int
        Spatial axes of the patches (2 or 3).
    name : str, default "chunk_tile"
        How the value is named in errors.

    Returns
    -------
    tuple of int
        The tile shape.

    Raises
    ------
    TypeError
        If ``tile`` is not a sequence of integers.
    ValueError
        If it has another length than ``n_axes`` or an entry below 1.
    """
    if isinstance(tile, (str, bytes)) or not isinstance(tile, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of {n_axes} integers, got {tile!r}")
    shape = tuple(check.as_int(t, f"{name} entry") for t in tile)
    if len(shape) != n_axes or min(shape) < 1:
        raise ValueError(
            f"{name} must be {n_axes} positive chunk counts, one per spatial axis, got {tile!r}"
        )
    return shape


def sweep_axes(extent: Sequence[int] | NDArray[np.int64]) -> tuple[int, ...]:
    """Return the spatial axes in the order a tile's home chunks are swept, outermost first.

    The axis of the longest extent outermost, the shortest innermost (ties:
    the earlier axis first). A sweep wants the chunks of about two
    cross-sections across its outermost axis at once (the one swept and the
    next, which its patches spill into), so the cross-section across the
    longest axis is the smallest: a 4x8x8 tile of chunks swept along Y wants
    two planes of 4x8 chunks, along Z two of 8x8.

    Parameters
    ----------
    extent : sequence of int
        The tile's chunks along each spatial axis, ``(Z)YX``.

    Returns
    -------
    tuple of int
        Axis numbers, outermost first.
    """
    sizes = [int(e) for e in extent]
    return tuple(sorted(range(len(sizes)), key=lambda axis: -sizes[axis]))


@dataclass(frozen=True)
class TileChoice:
    """A tile :func:`tile_choice` picked, and what its model counts for it.

    Attributes
    ----------
    tile : tuple of int
        Chunks per tile along each spatial axis.
    decodes : int
        Chunk decodes of one epoch's sweeps by the model (each chunk of its
        tile once, plus the chunks just beyond a tile's far edges).
    fits : int
        2 when two cross-sections of the tile's sweep fit the cache (each
        chunk decoded once in its tile), 1 when one does, 0 when neither.
    """

    tile: tuple[int, ...]
    decodes: int
    fits: int


def _axis_candidates(longest: int) -> list[int]:
    """Tile sizes that give distinct tile counts on an axis of ``longest`` chunks."""
    return sorted({-(-longest // n) for n in range(1, longest + 1)})


def choose_tile(
    grids: Sequence[tuple[int, ...]],
    chunk_bytes: Sequence[int],
    cache_bytes: int,
    *,
    n_shards: int = 1,
) -> tuple[int, ...]:
    """Return the tile (chunks per spatial axis) that decodes fewest chunks within the cache.

    ``tile_choice(...).tile``: :func:`tile_choice` takes the same arguments,
    raises the same errors and says how the tile is picked.

    Returns
    -------
    tuple of int
        Chunks per tile along each spatial axis; all ones when not even one
        chunk's sweep fits.
    """
    return tile_choice(grids, chunk_bytes, cache_bytes, n_shards=n_shards).tile


def tile_choice(
    grids: Sequence[tuple[int, ...]],
    chunk_bytes: Sequence[int],
    cache_bytes: int,
    *,
    n_shards: int = 1,
) -> TileChoice:
    """Return the tile that decodes fewest chunks within the cache, with its model's counts.

    A tile's sweep (its axes in :func:`sweep_axes` order) wants about two
    cross-sections of its chunks across its outermost axis at once (rows in
    2D, planes in 3D), each one chunk longer than the tile on every other
    axis (patches reach into the next chunk). Those two must fit in
    ``cache_bytes``: the cache drops the chunks used least recently, which
    include the cross-section just finished, so one cross-section of room
    is not enough. Among the tiles that fit, with at least
    :data:`MIN_TILES_PER_SHARD` tiles per shard where the grid allows, the
    one whose sweeps decode fewest chunks (each tile decodes its own chunks
    and the next chunk beyond its far edge on every axis), then the one
    with more tiles (a more random order).

    Parameters
    ----------
    grids : sequence of tuple of int
        Each stack's chunk grid, ``SC(Z)YX`` (chunks per axis).
    chunk_bytes : sequence of int
        Each stack's bytes per chunk.
    cache_bytes : int
        Bytes the chunk cache holds during a pass (what reads in flight,
        batches read ahead and the epoch's rows leave of the reader's budget).
    n_shards : int, default 1
        Ranks times DataLoader workers that share the epoch out in whole tiles.

    Returns
    -------
    TileChoice
        The tile (all ones when not even one chunk's sweep fits), its
        decodes by the model and how much of its sweep fits.

    Raises
    ------
    ValueError
        If ``grids`` is empty, its entries differ in length or are not
        positive, ``chunk_bytes`` has another length, ``cache_bytes`` is
        negative or ``n_shards`` is below 1.
    TypeError
        If a value is not an integer.
    """
    if len(grids) == 0 or len(grids) != len(chunk_bytes):
        raise ValueError(
            f"grids and chunk_bytes must name the same stacks, got {len(grids)} and "
            f"{len(chunk_bytes)}"
        )
    table = np.asarray([[check.as_int(g, "grids entry") for g in grid] for grid in grids])
    if table.ndim != 2 or table.shape[1] < 3 or table.min() < 1:
        raise ValueError(f"grids must be positive SC(Z)YX chunk counts of one length, got {grids}")
    sizes = np.asarray([check.as_int(b, "chunk_bytes entry") for b in chunk_bytes])
    budget = check.as_int(cache_bytes, "cache_bytes")
    if budget < 0:
        raise ValueError(f"cache_bytes must be at least 0, got {budget}")
    shards = check.as_int(n_shards, "n_shards")
    if shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {shards}")
    # Stacks of one grid and chunk size count once, weighted by their number.
    rows, weight = np.unique(np.column_stack([table, sizes]), axis=0, return_counts=True)
    grid = rows[:, 2:-1]  # (stacks, d) spatial chunk counts
    sample_tiles = weight * rows[:, 0]  # tile grids per stack: one per sample chunk
    chunks_per_home = sample_tiles * rows[:, 1]  # every channel chunk is read
    home_bytes = rows[:, 1] * rows[:, -1]
    candidates = np.asarray(
        list(itertools.product(*(_axis_candidates(int(g)) for g in grid.max(axis=0)))),
        dtype=np.int64,
    )  # (K, d)
    counts = -(-grid[None] // candidates[:, None])  # tiles per axis, (K, stacks, d)
    n_tiles = (np.prod(counts, axis=2) * sample_tiles).sum(axis=1)
    # Each tile decodes its chunks and one more beyond its far edge on every
    # axis that goes on: along an axis of G chunks in n tiles, G + n - 1.
    decodes = (np.prod(grid[None] + counts - 1, axis=2) * chunks_per_home).sum(axis=1)
    # A cross-section: the tile and one chunk more (at most the grid) on every
    # axis but the outermost one chunk_order sweeps (from the tile's extent
    # within the largest grid).
    reach = np.minimum(candidates[:, None] + 1, grid[None])  # (K, stacks, d)
    outer = [sweep_axes(np.minimum(c, grid.max(axis=0)))[0] for c in candidates]
    reach[np.arange(len(candidates)), :, outer] = 1
    plane_bytes = (np.prod(reach, axis=2) * home_bytes).max(axis=1)
    wanted = min(MIN_TILES_PER_SHARD * shards, int(n_tiles.max())) if shards > 1 else 1
    enough = n_tiles >= wanted
    # Two planes in the cache: each chunk is decoded once in its tile's sweep.
    # One plane: the chunks of the next plane are decoded twice (as the spill
    # of this plane and as homes) but a plane's chunks stay cached. Less than
    # that (reads ahead take the budget): no tile saves decodes, but a tile of
    # a few chunks per plane keeps each read-ahead block on neighbouring chunks.
    smallest = 4 * int(home_bytes.max())
    for fits in (2 * plane_bytes <= budget, plane_bytes <= max(budget, smallest)):
        usable = np.flatnonzero(fits & enough)
        if len(usable):
            break
    else:
        usable = np.flatnonzero(fits)
    # Ties (a tile and its transpose): the one longer on earlier axes, swept
    # like an untransposed tile (outermost axis first).
    best = usable[np.lexsort((-usable, -n_tiles[usable], decodes[usable]))[0]]
    level = int(plane_bytes[best] <= budget) + int(2 * plane_bytes[best] <= budget)
    return TileChoice(tuple(int(t) for t in candidates[best]), int(decodes[best]), level)


def _keys(
    rows: PatchBatch, chunks: Sequence[tuple[int, ...]]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Return each row's home chunk key (stack, sample chunk, spatial chunk) and its group."""
    data_idx = np.asarray(rows.data_idx, dtype=np.int64)
    sample_idx = np.asarray(rows.sample_idx, dtype=np.int64)
    coords = np.asarray(rows.coords, dtype=np.int64).reshape(len(data_idx), -1)
    chunk_table = np.asarray(chunks, dtype=np.int64).reshape(len(chunks), -1)
    size = chunk_table[data_idx]
    # The corner, not the centre: a patch then reads only its home chunk and
    # the next one along each axis, the chunks a row-major sweep reaches next.
    keys = np.column_stack([data_idx, sample_idx // size[:, 0], coords // size[:, 2:]])
    if len(keys) == 0:
        return keys, np.zeros(0, dtype=np.int64)
    # One integer per key, mixed-radix (the keys are non-negative), sorts as
    # the rows do: a sort of integers instead of np.unique's sort of rows,
    # which was most of a 2D chunk-order epoch's time before its first read.
    radix = (keys.max(axis=0) + 1).tolist()
    if math.prod(radix) >= 2**63:  # no int64 rank for every key: sort the rows
        unique, group = np.unique(keys, axis=0, return_inverse=True)
        return unique, group.reshape(-1).astype(np.int64)
    rank = keys[:, 0].copy()
    for axis in range(1, keys.shape[1]):
        rank *= radix[axis]
        rank += keys[:, axis]
    _, first, group = np.unique(rank, return_index=True, return_inverse=True)
    return keys[first], group.reshape(-1).astype(np.int64)


def _cut_runs(sizes: NDArray[np.int64], world_size: int) -> NDArray[np.int64]:
    """Return the bounds of ``world_size`` runs of whole items (``sizes`` rows each)."""
    n_items = len(sizes)
    ends = np.cumsum(sizes)
    ideal = np.arange(1, world_size) * ends[-1] / world_size
    after = np.searchsorted(ends, ideal)  # the first item whose end reaches the cut
    before = np.maximum(after - 1, 0)
    closer = (after > 0) & (np.abs(ends[before] - ideal) <= np.abs(ends[after] - ideal))
    cut = np.where(closer, before, after) + 1  # items before the cut
    # Every run keeps at least one item: cut r in [r, n_items - world_size + r],
    # strictly increasing (there are at least world_size items).
    lowest = np.arange(1, world_size)
    cut = np.clip(cut, lowest, n_items - world_size + lowest)
    cut = np.maximum.accumulate(cut - lowest) + lowest
    return np.concatenate([[0], cut, [n_items]]).astype(np.int64)


def chunk_order(
    rows: PatchBatch,
    chunks: Sequence[tuple[int, ...]],
    *,
    seed: int,
    epoch: int,
    window: int = DEFAULT_CHUNK_WINDOW,
    tile: Sequence[int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    worker_id: int = 0,
    num_workers: int = 1,
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
        Home chunks whose rows are mixed together.
    tile : sequence of int, optional
        Chunks per tile along each spatial axis (:func:`choose_tile` picks
        one for a cache); default: whole axes, one tile per stack and sample
        chunk.
    rank, world_size : int, default 0 and 1
        This rank and the number of ranks.
    drop_last : bool, default False
        Give every rank the shortest run's length (disjoint shards) instead
        of padding every run to the longest's.
    worker_id, num_workers : int, default 0 and 1
        This DataLoader worker's part of the rank's rows: the rank's tiles
        cut into ``num_workers`` runs of whole tiles, each near
        ``n / num_workers`` rows (the last workers get none when the rank has
        fewer tiles than workers). The parts together are the rank's rows,
        padding (in the last part) and ``drop_last`` included.

    Returns
    -------
    ChunkOrder
        This rank's rows, home chunks, tiles and windows.

    Raises
    ------
    ValueError
        If ``window`` is below 1, ``rank`` or ``world_size`` is out of range,
        a chunk shape does not match the rows, ``tile`` has another length
        than the patches' axes or an entry below 1, or there are fewer tiles
        than ranks (some rank would get no rows).
    TypeError
        If an integer argument is not an integer or ``drop_last`` not a bool.
    """
    _, size = check_order("chunks", window)
    rank, world_size = check.check_rank_world_size(rank, world_size)
    worker_id, num_workers = check.check_rank_world_size(
        worker_id, num_workers, rank_name="worker_id", world_size_name="num_workers"
    )
    drop_last = check.check_flag(drop_last, "drop_last")
    epoch = check.check_epoch(epoch)
    n_axes = len(rows.patch_size) + 2
    tile_shape = None if tile is None else check_tile(tile, n_axes - 2, "tile")
    for k, shape in enumerate(chunks):
        if len(shape) != n_axes or min(shape) < 1:
            raise ValueError(
                f"chunks[{k}] must be {n_axes} positive SC(Z)YX chunk sizes, got {shape}"
            )
    n_rows_all = len(rows)
    if n_rows_all == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ChunkOrder(empty, empty, empty, empty, 0, 0)
    homes, group = _keys(rows, chunks)
    n_groups = len(homes)
    spatial = homes[:, 2:]
    if tile_shape is None:
        tile_keys = homes[:, :2]
    else:
        tile_keys = np.column_stack([homes[:, :2], spatial // np.asarray(tile_shape)])
    _, home_tile = np.unique(tile_keys, axis=0, return_inverse=True)
    home_tile = home_tile.reshape(-1).astype(np.int64)
    n_tiles = int(home_tile.max()) + 1
    if n_tiles < world_size:
        raise ValueError(
            f"order='chunks' gives each rank whole tiles of chunks, but the epoch has "
            f"{n_tiles} tiles for world_size {world_size}; give a smaller chunk_tile "
            "or use order='shuffle'"
        )
    # Rank of each tile in the epoch's tile order.
    tile_at = permute(np.arange(n_tiles), n_tiles, seed, epoch)
    tile_rank = np.empty(n_tiles, dtype=np.int64)
    tile_rank[tile_at] = np.arange(n_tiles, dtype=np.int64)
    # The sweep: tiles in their shuffled order, home chunks row by row inside
    # a tile (a tile holds one stack and sample chunk, so the spatial index
    # orders it), each axis forwards or backwards by a bit of the tile's own.
    # Backwards costs nothing: the row swept before is then the next row,
    # whose chunks this row's patches spill into, still cached.
    # The axes in sweep_axes order (the tile's extent, or the home chunks'
    # where they reach less far).
    bits = random_uint32(seed, np.arange(n_tiles), epoch, PURPOSE_SWEEP).astype(np.int64)
    axes = np.arange(spatial.shape[1])
    backwards = (bits[home_tile][:, None] >> axes) & 1
    signed = np.where(backwards == 1, -spatial, spatial)
    extent = spatial.max(axis=0) + 1
    swept = list(sweep_axes(extent if tile_shape is None else np.minimum(tile_shape, extent)))
    sweep = np.lexsort((*signed[:, swept].T[::-1], tile_rank[home_tile]))
    home_position = np.empty(n_groups, dtype=np.int64)
    home_position[sweep] = np.arange(n_groups, dtype=np.int64)
    row_tile = home_tile[group]
    tile_rows = np.bincount(row_tile, minlength=n_tiles)[tile_at]  # in tile order
    bounds = _cut_runs(tile_rows, world_size)
    run_lengths = np.diff(np.concatenate([[0], np.cumsum(tile_rows)])[bounds])
    n_rows = int(run_lengths.min() if drop_last else run_lengths.max())
    first_tile, last_tile = int(bounds[rank]), int(bounds[rank + 1])
    # This worker's run of the rank's tiles; rows before it in the rank's order.
    offset = 0
    if num_workers > 1:
        rank_tile_rows = tile_rows[first_tile:last_tile]
        if len(rank_tile_rows) > num_workers:
            parts = _cut_runs(rank_tile_rows, num_workers)
        else:  # a tile each, the last workers none
            parts = np.minimum(np.arange(num_workers + 1), len(rank_tile_rows))
        offset = int(rank_tile_rows[: parts[worker_id]].sum())
        last_worker = bool(parts[worker_id + 1] == len(rank_tile_rows))
        first_tile, last_tile = (first_tile + int(parts[k]) for k in (worker_id, worker_id + 1))
    else:
        last_worker = True
    row_tile_rank = tile_rank[row_tile]
    mine = np.flatnonzero((row_tile_rank >= first_tile) & (row_tile_rank < last_tile))
    mine = mine.astype(np.int64)
    # Windows of `size` home chunks in this part's sweep, mixed by their
    # patch indices' shuffled positions.
    position = home_position[group[mine]]
    row_window = (position - position.min(initial=0)) // size
    mixed = permute(mine, n_rows_all, seed, epoch)
    ordered = mine[np.lexsort((mixed, row_window))]
    # The rank has n_rows rows: the last part pads by wrapping round its own
    # rows (no chunk of another worker or rank), and drop_last cuts the
    # rank's rows at n_rows, wherever that falls.
    if last_worker and offset + len(ordered) < n_rows and len(ordered):
        ordered = np.resize(ordered, n_rows - offset)
    ordered = ordered[: max(0, n_rows - offset)]
    positions = home_position[group[ordered]]
    return ChunkOrder(
        rows=ordered,
        group=group[ordered],
        tile=home_tile[group[ordered]],
        window=(positions - positions.min(initial=0)) // size,
        n_groups=n_groups,
        n_tiles=n_tiles,
    )
