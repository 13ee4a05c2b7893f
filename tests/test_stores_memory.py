"""Memory of reads from chunked stores: the default budget and the bytes the cache holds.

Counted in bytes the reader holds, never in resident memory (which depends on
the allocator and the machine's load); ``benchmarks/bench_stores.py`` measures
the resident memory.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from gpu_patching import PatchLoader, StratifiedPatching
from gpu_patching.stores import DEFAULT_CACHE_BYTES, ChunkReader, open_stack

zarr = pytest.importorskip("zarr", minversion="3")


def _store(path, shape, chunks, *, write=True):
    """A uint16 zarr store; with ``write=False`` metadata only (every chunk its fill value)."""
    array = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint16")
    if write:
        array[...] = np.random.default_rng(0).integers(0, 4096, shape, dtype=np.uint16)
    return array


def test_default_cache_of_a_loader_over_a_small_store_is_the_stores_bytes(tmp_path):
    # 100x90 does not divide into 16x16 chunks: the edge chunks are cut at
    # the edges, so the store decodes to exactly its own bytes.
    _store(tmp_path / "a.zarr", (3, 1, 100, 90), (1, 1, 16, 16))
    stack = open_stack(tmp_path / "a.zarr")
    strategy = StratifiedPatching([stack.shape], (8, 8), seed=0)
    loader = PatchLoader([stack], strategy, batch_size=16)
    assert loader._reader is not None
    assert loader._reader.cache_bytes == 3 * 100 * 90 * 2


def test_default_cache_over_several_stores_is_their_bytes_together(tmp_path):
    _store(tmp_path / "a.zarr", (2, 1, 64, 64), (1, 1, 16, 16))
    _store(tmp_path / "b.zarr", (1, 1, 40, 50), (1, 1, 16, 16))
    reader = ChunkReader([open_stack(tmp_path / "a.zarr"), open_stack(tmp_path / "b.zarr")])
    assert reader.cache_bytes == (2 * 64 * 64 + 40 * 50) * 2


def test_default_cache_over_a_store_larger_than_the_cap_is_the_cap(tmp_path):
    # 1 GiB of uint16, metadata only: nothing is read to size the budget.
    _store(tmp_path / "big.zarr", (1, 1, 16384, 32768), (1, 1, 1024, 1024), write=False)
    reader = ChunkReader([open_stack(tmp_path / "big.zarr")])
    assert reader.cache_bytes == DEFAULT_CACHE_BYTES


def test_an_explicit_cache_bytes_is_kept_even_above_the_stores_bytes(tmp_path):
    _store(tmp_path / "a.zarr", (1, 1, 32, 32), (1, 1, 16, 16))
    reader = ChunkReader([open_stack(tmp_path / "a.zarr")], cache_bytes=1 << 30)
    assert reader.cache_bytes == 1 << 30


def test_cache_never_holds_more_decoded_bytes_than_cache_bytes(tmp_path):
    # 32 chunks of 8 KiB and a budget of 12 chunk sizes: the read in flight
    # takes three, the batch read ahead, the rows and their bookkeeping about
    # four, so the cache keeps about five chunks and evicts all along.
    _store(tmp_path / "a.zarr", (2, 1, 256, 256), (1, 1, 64, 64))
    stack = open_stack(tmp_path / "a.zarr")
    chunk_bytes = 64 * 64 * 2
    strategy = StratifiedPatching([stack.shape], (16, 16), seed=3)
    reader = ChunkReader([stack], cache_bytes=12 * chunk_bytes, workers=1)
    for epoch in range(2):
        rows = strategy.sample_epoch(epoch, shuffle=True).to_numpy()
        for _ in reader.batches(rows, 8, read_ahead=1):
            assert reader.cached_bytes <= reader.cache_bytes
    assert reader.cache_hits > 0  # the cache was used, not bypassed
    assert reader.chunks_read > 32  # and chunks were evicted and read again
    assert 0 < reader.peak_cached_bytes <= 12 * chunk_bytes


def test_peak_cached_bytes_counts_the_largest_cache_of_the_readers_life(tmp_path):
    _store(tmp_path / "a.zarr", (1, 1, 64, 64), (1, 1, 16, 16))
    stack = open_stack(tmp_path / "a.zarr")
    chunk_bytes = 16 * 16 * 2
    reader = ChunkReader([stack], cache_bytes=(3 + 100) * chunk_bytes, workers=1)
    # Two patches touching 4 and 1 chunks: 5 chunks cached, then dropped.
    rows = (np.zeros(2, np.int64), np.zeros(2, np.int64), np.array([[8, 8], [33, 33]]))
    reader.read(rows, (12, 12))
    reader.clear_cache()
    assert reader.cached_bytes == 0
    assert reader.peak_cached_bytes == 5 * chunk_bytes


def test_chunks_decode_on_at_most_one_thread_per_core(tmp_path):
    # Each decoding thread keeps a malloc arena of freed chunks: asyncio's
    # default of cpu_count + 4 threads made that the largest cost beyond the
    # budget. 64 chunks and 16 reads in flight ask for more threads than that.
    _store(tmp_path / "a.zarr", (1, 1, 256, 256), (1, 1, 32, 32))
    stack = open_stack(tmp_path / "a.zarr")
    corners = [(y, x) for y in range(0, 256, 32) for x in range(0, 256, 32)]
    rows = (np.zeros(64, np.int64), np.zeros(64, np.int64), np.array(corners, np.int64))
    ChunkReader([stack], cache_bytes=0, workers=16).read(rows, (32, 32))
    decoders = [t for t in threading.enumerate() if t.name.startswith("gpu_patching_decode")]
    assert 1 <= len(decoders) <= min(32, os.cpu_count() or 1)
