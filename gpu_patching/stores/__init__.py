"""Chunked stores: patches straight from zarr, OME-Zarr and TIFF stores.

:func:`open_stack` opens a store as a :class:`ChunkedStack` (metadata only);
:class:`ChunkReader` reads the patches of batches from such stacks, each chunk
once, through a cache. Modules: ``open`` (every file and store is opened
there), ``stack`` (the stack view), ``plan`` (the chunks of a batch),
``order`` (an epoch in chunk order),
``reader`` (reads, cache). How and why: ``docs/design.md``,
"Chunked stores".
"""

from .open import open_stack
from .order import (
    DEFAULT_CHUNK_WINDOW,
    MIN_TILES_PER_SHARD,
    ORDERS,
    ChunkOrder,
    TileChoice,
    check_order,
    check_tile,
    choose_tile,
    chunk_order,
    sweep_axes,
    tile_choice,
)
from .plan import ChunkPlan, plan_chunks
from .reader import (
    DECODE_THREADS,
    DEFAULT_CACHE_BYTES,
    DEFAULT_WORKERS,
    MAX_READ_AHEAD,
    MEMORY_MODES,
    ChunkReader,
    check_reader_options,
    default_cache_bytes,
)
from .stack import ChunkedStack, StoreError, as_chunked_stack, is_chunked_stack

__all__ = [
    "DECODE_THREADS",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CHUNK_WINDOW",
    "DEFAULT_WORKERS",
    "MAX_READ_AHEAD",
    "MEMORY_MODES",
    "MIN_TILES_PER_SHARD",
    "ORDERS",
    "ChunkOrder",
    "ChunkPlan",
    "ChunkReader",
    "ChunkedStack",
    "StoreError",
    "TileChoice",
    "as_chunked_stack",
    "check_order",
    "check_reader_options",
    "check_tile",
    "choose_tile",
    "chunk_order",
    "default_cache_bytes",
    "is_chunked_stack",
    "open_stack",
    "plan_chunks",
    "sweep_axes",
    "tile_choice",
]
