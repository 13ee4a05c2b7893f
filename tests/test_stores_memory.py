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
from conftest import sliced_patches

from gpu_patching import PatchLoader, StratifiedPatching
from gpu_patching.stores import (
    DEFAULT_CACHE_BYTES,
    ChunkReader,
    default_cache_bytes,
    open_stack,
)

zarr = pytest.importorskip("zarr", minversion="3")


def _store(path, shape, chunks, *, write=True):
    """A uint16 zarr store; with ``write=False`` metadata only (every chunk its fill value)."""
    array = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint16")
    if write:
        array[...] = np.random.default_rng(0).integers(0, 4096, shape, dtype=np.uint16)
    return array


def test_default_cache_of_a_loader_over_a_small_store_holds_it_twice_beside_its_reads(tmp_path):
    # 100x90 does not divide into 16x16 chunks: the edge chunks are cut at
    # the edges, so the store decodes to exactly its own bytes. 126 chunks,
    # 6 reads in flight of three chunk sizes (16x16 uint16, 512 bytes) each.
    _store(tmp_path / "a.zarr", (3, 1, 100, 90), (1, 1, 16, 16))
    stack = open_stack(tmp_path / "a.zarr")
    strategy = StratifiedPatching([stack.shape], (8, 8), seed=0)
    loader = PatchLoader([stack], strategy, batch_size=16, workers=6)
    assert loader._reader is not None
    assert loader._reader.cache_bytes == 2 * (3 * 100 * 90 * 2 + 6 * 3 * 16 * 16 * 2)


def test_default_cache_counts_no_more_reads_in_flight_than_the_stores_have_chunks(tmp_path):
    _store(tmp_path / "a.zarr", (1, 1, 32, 32), (1, 1, 16, 16))  # 4 chunks
    reader = ChunkReader([open_stack(tmp_path / "a.zarr")], workers=30)
    assert reader.cache_bytes == 2 * (32 * 32 * 2 + 4 * 3 * 16 * 16 * 2)


@pytest.mark.parametrize(
    ("workers", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError)]
)
def test_default_cache_refuses_a_bad_number_of_workers_naming_it(tmp_path, workers, error):
    _store(tmp_path / "a.zarr", (1, 1, 32, 32), (1, 1, 16, 16))
    with pytest.raises(error, match="workers"):
        default_cache_bytes([open_stack(tmp_path / "a.zarr")], workers)


def test_default_cache_over_several_stores_holds_them_together(tmp_path):
    _store(tmp_path / "a.zarr", (2, 1, 64, 64), (1, 1, 16, 16))
    _store(tmp_path / "b.zarr", (1, 1, 40, 50), (1, 1, 16, 16))
    reader = ChunkReader(
        [open_stack(tmp_path / "a.zarr"), open_stack(tmp_path / "b.zarr")], workers=2
    )
    assert reader.cache_bytes == 2 * ((2 * 64 * 64 + 40 * 50) * 2 + 2 * 3 * 16 * 16 * 2)


@pytest.mark.parametrize("order", ["shuffle", "chunks"])
def test_at_the_default_cache_an_epoch_decodes_each_chunk_once_and_the_next_none(tmp_path, order):
    # A store below the cap, in chunks of 64 KiB, and batches of 32 KiB (up to
    # 16 read ahead): the default budget leaves every chunk room in the cache.
    # With the stores' bytes alone as the budget, the reads in flight and the
    # batches read ahead left the cache a few chunks: a shuffled epoch decoded
    # each chunk several times over, and so did every later epoch.
    _store(tmp_path / "a.zarr", (1, 1, 1024, 1024), (1, 1, 256, 128))
    stack = open_stack(tmp_path / "a.zarr")
    pixels = np.asarray(stack.array[...]).reshape(stack.shape)
    strategy = StratifiedPatching([stack.shape], (32, 32), seed=1)
    loader = PatchLoader([stack], strategy, batch_size=16, shuffle=True, order=order)
    reader = loader._reader
    assert reader is not None and reader.cache_bytes < DEFAULT_CACHE_BYTES
    for epoch in (0, 1):  # 32 chunks, every one decoded in epoch 0, none in epoch 1
        loader.set_epoch(epoch)
        for patches, batch in loader:
            np.testing.assert_array_equal(patches, sliced_patches(pixels, batch))
        assert reader.chunks_read == 32
    assert reader.peak_held_bytes <= reader.cache_bytes


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


# -- reads in flight and read-ahead within the budget ------------------------------------

# The 3D rows of bench_stores.py (8 MiB chunks, patches 16x64x64, batches of 128)
# shrunk to test size: 32 KiB chunks, patches 4x16x16, batches of 16 (32 KiB).
_VOLUME = (2, 1, 16, 128, 128)
_VOLUME_CHUNKS = (1, 1, 16, 32, 32)
_VOLUME_CHUNK_BYTES = 16 * 32 * 32 * 2
_VOLUME_PATCH = (4, 16, 16)


def _volume(path):
    data = np.random.default_rng(7).integers(0, 4096, _VOLUME, dtype=np.uint16)
    zarr.create_array(str(path), shape=_VOLUME, chunks=_VOLUME_CHUNKS, dtype="uint16")[...] = data
    return data, open_stack(path)


def test_a_budget_below_a_batchs_reads_bounds_cache_reads_in_flight_and_read_ahead(tmp_path):
    data, stack = _volume(tmp_path / "v.zarr")
    rows = StratifiedPatching([stack.shape], _VOLUME_PATCH, seed=4).sample_epoch(0, shuffle=True)
    budget = 12 * _VOLUME_CHUNK_BYTES
    reader = ChunkReader([stack], cache_bytes=budget, workers=6)
    # Six reads of three chunk sizes each would take 18 chunk sizes at once.
    assert 6 * reader.read_bytes > budget
    for patches, batch in reader.batches(rows.to_numpy(), 16):
        assert np.array_equal(patches, sliced_patches(data, batch))
    assert reader.chunks_read > 0
    assert 0 < reader.peak_held_bytes <= budget


def test_a_budget_below_one_read_still_reads_one_chunk_at_a_time(tmp_path):
    data, stack = _volume(tmp_path / "v.zarr")
    rows = StratifiedPatching([stack.shape], _VOLUME_PATCH, seed=5).sample_epoch(0, shuffle=True)
    rows = rows.to_numpy()
    reader = ChunkReader([stack], cache_bytes=_VOLUME_CHUNK_BYTES // 2, workers=6)
    for patches, batch in reader.batches(rows, 16):
        assert np.array_equal(patches, sliced_patches(data, batch))
    assert reader.peak_reads_in_flight == 1
    # One read, the pass's rows and one batch's bookkeeping: the least a pass holds.
    floor = reader.pass_floor_bytes(rows, 16)
    rows_bytes = sum(a.nbytes for a in (rows.data_idx, rows.sample_idx, rows.coords, rows.indices))
    assert floor <= 3 * _VOLUME_CHUNK_BYTES + rows_bytes + 16 * 1024
    assert reader.peak_held_bytes <= floor


def test_a_call_reader_reads_every_chunk_of_the_call_at_once(tmp_path):
    _data, stack = _volume(tmp_path / "v.zarr")
    # Four patches in four chunks of sample 0, the budget none: nothing holds reads back.
    corners = np.array([[0, 0, 0], [0, 0, 32], [0, 32, 0], [0, 32, 32]], np.int64)
    rows = (np.zeros(4, np.int64), np.zeros(4, np.int64), corners)
    reader = ChunkReader([stack], cache_bytes=0, workers=6, memory="call")
    reader.read(rows, _VOLUME_PATCH)
    assert reader.chunks_read == 4
    assert reader.peak_reads_in_flight == 4


def test_extract_patches_reads_every_chunk_of_the_call_at_once(tmp_path, monkeypatch):
    from gpu_patching import crop, extract_patches
    from gpu_patching.specs import PatchBatch

    data, stack = _volume(tmp_path / "v.zarr")
    readers = []

    class RecordedReader(ChunkReader):  # the real reader, remembered for its counters
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            readers.append(self)

    monkeypatch.setattr(crop, "ChunkReader", RecordedReader)
    corners = np.array([[0, 0, 0], [0, 0, 32], [0, 32, 0], [0, 32, 32], [0, 64, 64]], np.int64)
    batch = PatchBatch(
        data_idx=np.zeros(5, np.int64),
        sample_idx=np.zeros(5, np.int64),
        coords=corners,
        indices=np.arange(5, dtype=np.int64),
        patch_size=_VOLUME_PATCH,
    )
    patches = extract_patches([stack], batch)
    assert np.array_equal(patches, sliced_patches(data, batch))
    (reader,) = readers
    assert reader.peak_reads_in_flight == 5


def test_memory_is_budget_or_call(tmp_path):
    _store(tmp_path / "a.zarr", (1, 1, 32, 32), (1, 1, 16, 16))
    stack = open_stack(tmp_path / "a.zarr")
    with pytest.raises(ValueError, match="'cache'"):
        ChunkReader([stack], memory="cache")
    with pytest.raises(TypeError, match="memory"):
        ChunkReader([stack], memory=None)


def test_a_loader_keeps_its_reader_within_a_small_cache_bytes(tmp_path):
    data, stack = _volume(tmp_path / "v.zarr")
    strategy = StratifiedPatching([stack.shape], _VOLUME_PATCH, seed=6)
    budget = 12 * _VOLUME_CHUNK_BYTES
    loader = PatchLoader([stack], strategy, batch_size=16, cache_bytes=budget, workers=6)
    for patches, batch in loader:
        assert np.array_equal(patches, sliced_patches(data, batch))
    assert loader._reader is not None
    assert 0 < loader._reader.peak_held_bytes <= budget
