"""Cutting a batch's patches out of decoded chunks, into reused window arrays.

:func:`cut_pieces` copies the planned pieces of one chunk
(:class:`~gpu_patching.stores.plan.ChunkPlan`) into their rows;
:class:`WindowBuffers` hands a reader's pass the arrays it cuts into.
``docs/design.md``, "Chunked stores".
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from .plan import ChunkPlan

__all__ = ["LOOP_COPY_BYTES", "WindowBuffers", "cut_pieces"]

#: Patches of at least this many bytes that lie inside one chunk are copied
#: into their rows one by one; smaller ones with one gather per chunk. The
#: gather writes a temporary as large as the chunk's patches and copies it
#: again into the rows: for a large patch that second copy costs more than a
#: statement per patch. ``benchmarks/bench_stores.py``'s chunk-order epoch
#: (2 cores, in turns, best of 3-4): 3D patches 16x64x64 uint16 (128 KiB)
#: 0.92x the time copied one by one, 8x64x64 (64 KiB) 0.96-0.98x, 2D 128x128
#: (32 KiB) 1.05-1.10x (slower: the gather stays below this size).
LOOP_COPY_BYTES = 64 << 10


class WindowBuffers:
    """The arrays of a pass's last two windows, written again once the consumer lets go.

    A fresh array per window costs its page faults, as much as cutting the
    patches into it for windows past glibc's largest heap block (32 MiB, a
    3D window of 9 batches of 16 MiB). The window read next takes the array
    of the window before the current one when nothing but this pool refers
    to it: a batch the consumer keeps (in a list, as a view, as a tensor of
    ``torch.from_numpy``) refers to its window's array, which is then never
    written again. The pool holds the two windows a pass counts anyway (the
    one handed over and the one read ahead).
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self._row_shape = row_shape
        self._dtype = dtype
        self._arrays: list[NDArray[Any]] = []

    def take(self, n_rows: int) -> NDArray[Any]:
        """Return an array of ``n_rows`` rows: the oldest one released, or a new one."""
        if len(self._arrays) == 2:
            oldest = self._arrays.pop(0)
            # References: oldest and getrefcount's argument; a view adds its own.
            if sys.getrefcount(oldest) == 2 and len(oldest) >= n_rows:
                self._arrays.append(oldest)
                return oldest[:n_rows]
        array = np.empty((n_rows, *self._row_shape), dtype=self._dtype)
        self._arrays.append(array)
        return array


def cut_pieces(
    plan: ChunkPlan,
    first: int,
    stop: int,
    block: NDArray[Any],
    out: NDArray[Any],
    patch_size: tuple[int, ...],
) -> None:
    """Copy the plan's pieces ``[first, stop)``, all of one chunk ``block``, into ``out``.

    Most patches lie inside one chunk (but for channels): below
    :data:`LOOP_COPY_BYTES` those are cut out together with one gather from
    the chunk's sliding windows, which costs about a copy per patch instead
    of a Python statement per patch (the statements were most of a
    chunk-order epoch beyond decoding, ``benchmarks/bench_stores.py``);
    larger ones are copied into their rows one by one, without the gather's
    temporary. The pieces of patches that straddle chunks have shapes of
    their own and are copied one by one.
    """
    whole = plan.piece_whole[first:stop]
    source = plan.piece_source[first:stop]
    # Every piece of a chunk covers the chunk's channels, the same for all.
    channels = slice(int(plan.piece_low[first, 0]), int(plan.piece_high[first, 0]))
    if whole.any() and out[0].nbytes >= LOOP_COPY_BYTES:
        rows = plan.piece_row[first:stop][whole].tolist()
        for row, corner in zip(rows, source[whole].tolist(), strict=True):
            spatial = [slice(a, a + e) for a, e in zip(corner[2:], patch_size, strict=True)]
            piece = (corner[0], slice(None), *spatial)
            out[row, channels] = block[piece]
    elif whole.any():
        rows = plan.piece_row[first:stop][whole]
        corners = source[whole]
        windows = sliding_window_view(block, patch_size, axis=tuple(range(2, block.ndim)))
        # Index arrays on the sample and spatial axes, every channel: the
        # gather has shape (n, C, *patch_size), as out[rows, channels] has.
        index = (corners[:, 0], slice(None), *corners[:, 2:].T)
        out[rows, channels] = windows[index]
    if whole.all():
        return
    straddling = np.flatnonzero(~whole) + first
    extent = (plan.piece_high[straddling, 1:] - plan.piece_low[straddling, 1:]).T.tolist()
    corner = plan.piece_source[straddling, 2:].T.tolist()
    place = plan.piece_target[straddling, 1:].T.tolist()
    # One slice per piece and spatial axis, made by list comprehensions, so
    # that a piece costs two basic indexings and one copy.
    targets = zip(
        plan.piece_row[straddling].tolist(),
        itertools.repeat(channels),
        *(
            [slice(a, a + e) for a, e in zip(p, x, strict=True)]
            for p, x in zip(place, extent, strict=True)
        ),
    )
    sources = zip(
        plan.piece_source[straddling, 0].tolist(),
        itertools.repeat(slice(None)),
        *(
            [slice(a, a + e) for a, e in zip(c, x, strict=True)]
            for c, x in zip(corner, extent, strict=True)
        ),
    )
    for target, source in zip(targets, sources, strict=True):
        out[target] = block[source]
