"""Planning the reads of a batch: which chunks its patches touch, and which pieces.

:func:`plan_chunks` finds every chunk a batch touches once, vectorised, and
the box of each patch inside each of them; :class:`~gpu_patching.stores.ChunkReader`
reads the chunks and copies the pieces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["ChunkPlan", "plan_chunks"]


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks a batch touches and the pieces to copy out of each.

    Attributes
    ----------
    stack : numpy.ndarray of int64, shape (n_chunks,)
        The stack of each chunk.
    chunk : numpy.ndarray of int64, shape (n_chunks, ndim + 2)
        Each chunk's ``SC(Z)YX`` index, every chunk once, sorted.
    piece_row : numpy.ndarray of int64, shape (n_pieces,)
        The batch row of each piece (the part of one patch inside one chunk).
    piece_chunk : numpy.ndarray of int64, shape (n_pieces,)
        The chunk (row of ``chunk``) each piece is copied from; pieces are
        grouped by chunk.
    piece_low, piece_high : numpy.ndarray of int64, shape (n_pieces, ndim + 1)
        The piece's box on the axes ``C(Z)YX`` of the stack, ``[low, high)``.
    piece_source : numpy.ndarray of int64, shape (n_pieces, ndim + 2)
        The piece's low corner inside its chunk, on the axes ``SC(Z)YX``
        (its sample first).
    piece_target : numpy.ndarray of int64, shape (n_pieces, ndim + 1)
        The piece's low corner inside its patch, on the axes ``C(Z)YX``.
    piece_whole : numpy.ndarray of bool, shape (n_pieces,)
        Whether the piece spans its patch on every spatial axis (the patch
        lies inside one chunk but for channels): such pieces of one chunk
        are cut out together, with one gather, instead of one by one.
    """

    stack: NDArray[np.int64]
    chunk: NDArray[np.int64]
    piece_row: NDArray[np.int64]
    piece_chunk: NDArray[np.int64]
    piece_low: NDArray[np.int64]
    piece_high: NDArray[np.int64]
    piece_source: NDArray[np.int64]
    piece_target: NDArray[np.int64]
    piece_whole: NDArray[np.bool_]


def plan_chunks(
    shapes: Sequence[tuple[int, ...]],
    chunks: Sequence[tuple[int, ...]],
    rows: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
    patch_size: tuple[int, ...],
) -> ChunkPlan:
    """Find the chunks a batch touches, each once, and the piece of each patch in each.

    Parameters
    ----------
    shapes, chunks : sequence of tuple of int
        ``SC(Z)YX`` shape and chunk shape of each stack.
    rows : tuple of numpy.ndarray of int64
        The batch's ``data_idx`` (n,), ``sample_idx`` (n,) and ``coords``
        (n, ndim), in range (checked by the caller).
    patch_size : tuple of int
        The patch size.

    Returns
    -------
    ChunkPlan
        Every chunk once, and the pieces that tile every patch exactly once.
    """
    data_idx, sample_idx, coords = rows
    n_axes = len(patch_size) + 2
    shape_table = np.asarray(shapes, dtype=np.int64).reshape(-1, n_axes)
    chunk_table = np.asarray(chunks, dtype=np.int64).reshape(-1, n_axes)
    size = chunk_table[data_idx]  # (n, axes)
    # Each patch's box on every axis: one sample, every channel, its corner.
    low = np.empty((len(data_idx), n_axes), dtype=np.int64)
    high = np.empty_like(low)
    low[:, 0], high[:, 0] = sample_idx, sample_idx + 1
    low[:, 1], high[:, 1] = 0, shape_table[data_idx, 1]
    low[:, 2:] = coords
    high[:, 2:] = coords + np.asarray(patch_size, dtype=np.int64)
    first = low // size
    count = (high - 1) // size - first + 1  # chunks per axis, >= 1
    # Every (row, chunk) pair at once: offsets up to the largest count on each
    # axis, keeping those inside each row's own count.
    widest = count.max(axis=0) if len(count) else np.ones(n_axes, dtype=np.int64)
    offsets = np.indices(tuple(int(w) for w in widest)).reshape(n_axes, -1).T
    inside = np.all(offsets[None, :, :] < count[:, None, :], axis=2)
    pair_row, pair_offset = np.nonzero(inside)
    pair_chunk = first[pair_row] + offsets[pair_offset]
    pair_stack = data_idx[pair_row]
    # One key per chunk of one stack, its rank in row-major order over the
    # stacks' chunk grids one after the other: sorting the keys sorts the
    # (stack, chunk index) rows, with one sort of integers instead of rows.
    grid = -(-shape_table // chunk_table)
    # Counted in Python integers: a product past int64 must not wrap around.
    n_chunks = [math.prod(int(g) for g in row) for row in grid.tolist()]
    if sum(n_chunks) < 2**62:
        grid_sizes = np.asarray(n_chunks, dtype=np.int64)
        key = np.cumsum(grid_sizes)[pair_stack] - grid_sizes[pair_stack]
        for axis in range(n_axes):
            key = key * grid[pair_stack, axis] + pair_chunk[:, axis]
    else:  # more chunks than int64 ranks: sort the rows themselves
        key = np.unique(np.column_stack([pair_stack, pair_chunk]), axis=0, return_inverse=True)[
            1
        ].reshape(-1)
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.ones(len(key), dtype=bool)
    starts[1:] = key[1:] != key[:-1]
    inverse = np.cumsum(starts) - 1
    pair_row, pair_chunk, pair_stack = pair_row[order], pair_chunk[order], pair_stack[order]
    chunk_low = pair_chunk * size[pair_row]
    piece_low = np.maximum(low[pair_row], chunk_low)
    piece_high = np.minimum(high[pair_row], chunk_low + size[pair_row])
    extent = piece_high[:, 2:] - piece_low[:, 2:]
    return ChunkPlan(
        stack=pair_stack[starts].astype(np.int64),
        chunk=pair_chunk[starts],
        piece_row=pair_row.astype(np.int64),
        piece_chunk=inverse.astype(np.int64),
        piece_low=piece_low[:, 1:],
        piece_high=piece_high[:, 1:],
        piece_source=piece_low - chunk_low,
        piece_target=piece_low[:, 1:] - low[pair_row, 1:],
        piece_whole=np.all(extent == np.asarray(patch_size, dtype=np.int64), axis=1),
    )
