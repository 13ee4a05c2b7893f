"""Patches of at least ``THREAD_CUT_BYTES`` are cut out on the decoding threads.

Those of at least ``LOOP_COPY_BYTES`` that lie inside one chunk are copied
into their rows one by one instead of gathered.

Every store is written by zarr into ``tmp_path``; every batch is compared with
slicing the same array in memory, and the chunk order with the shuffled one.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sliced_patches

from gpu_patching import PatchLoader, StratifiedPatching
from gpu_patching.stores import ChunkReader, open_stack, plan_chunks
from gpu_patching.stores.cut import LOOP_COPY_BYTES
from gpu_patching.stores.reader import THREAD_CUT_BYTES

zarr = pytest.importorskip("zarr", minversion="3")

# 2 channels of 8x32x64 uint16: 64 KiB a patch, cut on the threads.
_SHAPE = (2, 2, 24, 160, 160)
_CHUNKS = (1, 1, 16, 64, 64)
_PATCH = (8, 32, 64)


def _stack(tmp_path):
    data = np.random.default_rng(3).integers(0, 60000, _SHAPE, dtype=np.uint16)
    path = tmp_path / "v.zarr"
    zarr.create_array(str(path), shape=_SHAPE, chunks=_CHUNKS, dtype="uint16")[...] = data
    return data, open_stack(path)


def _assert_epoch_equals_slicing(data, stack, strategy, order):
    """A loader's epoch in ``order``, batches of 16: every patch equals slicing ``data``."""
    loader = PatchLoader([stack], strategy, 16, shuffle=True, order=order)
    n = 0
    for patches, batch in loader:
        np.testing.assert_array_equal(patches, sliced_patches(data, batch))
        n += len(batch)
    assert n == strategy.n_patches


def test_the_patches_here_are_large_enough_to_be_cut_on_the_threads():
    assert 2 * 2 * int(np.prod(_PATCH)) >= THREAD_CUT_BYTES


@pytest.mark.parametrize("order", ["shuffle", "chunks"])
def test_large_patches_cut_on_the_threads_equal_the_sliced_patches(tmp_path, order):
    data, stack = _stack(tmp_path)
    strategy = StratifiedPatching([stack.shape], _PATCH, seed=5, backend="numpy")
    _assert_epoch_equals_slicing(data, stack, strategy, order)


def test_large_patches_in_a_cache_of_a_few_chunks_equal_the_sliced_patches(tmp_path):
    # Chunks are evicted while others are still being cut out of on the threads.
    data, stack = _stack(tmp_path)
    strategy = StratifiedPatching([stack.shape], _PATCH, seed=6, backend="numpy")
    rows = strategy.sample_epoch(0, shuffle=True).to_numpy()
    reader = ChunkReader([stack], cache_bytes=12 * stack.chunk_bytes)
    for patches, batch in reader.batches(rows, 8, read_ahead=2):
        np.testing.assert_array_equal(patches, sliced_patches(data, batch))
    assert reader.peak_held_bytes <= reader.cache_bytes


@pytest.mark.parametrize("order", ["shuffle", "chunks"])
def test_large_patches_inside_chunks_copied_one_by_one_equal_the_sliced_patches(tmp_path, order):
    # float32 in chunks of one channel: each piece fills one channel of its row.
    shape, chunks, patch = (2, 3, 40, 150, 150), (1, 1, 40, 96, 96), (16, 32, 32)
    data = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    path = tmp_path / "f.zarr"
    zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32")[...] = data
    stack = open_stack(path)
    assert shape[1] * int(np.prod(patch)) * 4 >= LOOP_COPY_BYTES
    strategy = StratifiedPatching([stack.shape], patch, seed=9, backend="numpy")
    rows = strategy.sample_epoch(0).to_numpy()
    plan = plan_chunks(
        [stack.shape], [stack.chunks], (rows.data_idx, rows.sample_idx, rows.coords), patch
    )
    # Both kinds of piece are there: most patches lie inside a chunk, some straddle.
    assert plan.piece_whole.sum() > len(rows) and not plan.piece_whole.all()
    _assert_epoch_equals_slicing(data, stack, strategy, order)
