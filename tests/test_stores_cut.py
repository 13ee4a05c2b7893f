"""Cutting patches out of chunks: whole patches gathered per chunk, straddlers piece by piece.

Every store is written by zarr into ``tmp_path``; every patch is compared with
slicing the same array in memory.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.stores import ChunkReader, open_stack, plan_chunks

zarr = pytest.importorskip("zarr", minversion="3")
from zarr_logs import logged_stack  # noqa: E402


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


def _sliced(data: np.ndarray, sample_idx: np.ndarray, coords: np.ndarray, patch) -> np.ndarray:
    """The patches by plain slicing of the in-memory array."""
    return np.stack(
        [
            data[(s, slice(None), *(slice(c, c + p) for c, p in zip(corner, patch, strict=True)))]
            for s, corner in zip(sample_idx.tolist(), coords.tolist(), strict=True)
        ]
    )


def test_plan_marks_exactly_the_pieces_that_span_their_whole_patch():
    shapes = [(2, 3, 30, 31)]
    chunks = [(1, 2, 10, 10)]
    # Rows 0 and 2 lie inside one chunk spatially; rows 1 and 3 straddle.
    rows = (
        np.zeros(4, np.int64),
        np.array([0, 1, 1, 0], np.int64),
        np.array([[0, 0], [6, 4], [12, 21], [13, 9]], np.int64),
    )
    plan = plan_chunks(shapes, chunks, rows, (5, 5))
    inside = {0, 2}
    assert plan.piece_whole.tolist() == [int(r) in inside for r in plan.piece_row]
    # Whole or not, every piece splits by channel chunk (2 + 1 channels).
    assert sorted(plan.piece_row[plan.piece_whole].tolist()) == [0, 0, 2, 2]


def test_plan_places_each_piece_in_its_chunk_and_in_its_patch():
    shapes = [(3, 3, 30, 31)]
    chunks = [(2, 2, 7, 5)]
    rows = (
        np.zeros(3, np.int64),
        np.array([2, 1, 0], np.int64),
        np.array([[6, 4], [20, 21], [0, 0]], np.int64),
    )
    plan = plan_chunks(shapes, chunks, rows, (10, 10))
    for p in range(len(plan.piece_row)):
        chunk = plan.chunk[plan.piece_chunk[p]]
        row = plan.piece_row[p]
        chunk_low = chunk * np.array(chunks[0])
        assert plan.piece_source[p, 0] == rows[1][row] - chunk_low[0]
        assert np.array_equal(plan.piece_source[p, 1:], plan.piece_low[p] - chunk_low[1:])
        corner = np.array([0, *rows[2][row]])
        assert np.array_equal(plan.piece_target[p], plan.piece_low[p] - corner)


def test_patches_inside_chunks_of_several_samples_and_channels_equal_slicing(tmp_path):
    # Chunks hold 2 of 3 samples and 2 of 3 channels, and the far chunks are
    # clipped: the gathered patches come from every kind of chunk.
    data = _data((3, 3, 70, 90), seed=21)
    zarr.create_array(
        str(tmp_path / "a.zarr"), shape=data.shape, chunks=(2, 2, 32, 40), dtype=data.dtype
    )[...] = data
    stack = open_stack(tmp_path / "a.zarr")
    strategy = StratifiedPatching([data.shape], (8, 8), seed=7)
    batch = strategy.sample_epoch(0, shuffle=True).to_numpy()
    rows = (batch.data_idx, batch.sample_idx, batch.coords)
    plan = plan_chunks([stack.shape], [stack.chunks], rows, (8, 8))
    assert plan.piece_whole.any() and not plan.piece_whole.all()  # both paths run
    patches = ChunkReader([stack], cache_bytes=0).read(rows, (8, 8))
    assert np.array_equal(patches, _sliced(data, batch.sample_idx, batch.coords, (8, 8)))


def test_3d_patches_inside_and_across_chunks_equal_slicing(tmp_path):
    data = _data((2, 1, 20, 40, 36), seed=22)
    zarr.create_array(
        str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 1, 10, 16, 16), dtype=data.dtype
    )[...] = data
    stack = open_stack(tmp_path / "a.zarr")
    strategy = StratifiedPatching([data.shape], (4, 6, 6), seed=8)
    batch = strategy.sample_epoch(1, shuffle=True).to_numpy()
    rows = (batch.data_idx, batch.sample_idx, batch.coords)
    patches = ChunkReader([stack], cache_bytes=0).read(rows, (4, 6, 6))
    assert np.array_equal(patches, _sliced(data, batch.sample_idx, batch.coords, (4, 6, 6)))


def _coverage_is_exact(plan, rows, n_channels, patch) -> bool:
    coverage = np.zeros((len(rows[0]), n_channels, *patch), np.int64)
    for row, low, high in zip(plan.piece_row, plan.piece_low, plan.piece_high, strict=True):
        corner = np.array([0, *rows[2][row]])
        box = tuple(slice(a, b) for a, b in zip(low - corner, high - corner, strict=True))
        coverage[(row, *box)] += 1
    return bool((coverage == 1).all())


def test_plan_lists_the_chunks_of_several_stacks_once_in_stack_then_index_order():
    shapes = [(3, 2, 45, 53), (2, 2, 30, 31)]
    chunks = [(2, 1, 7, 11), (1, 2, 5, 5)]
    rows = (
        np.array([1, 0, 1, 0, 0], np.int64),
        np.array([1, 2, 0, 0, 2], np.int64),
        np.array([[20, 21], [30, 40], [3, 4], [0, 0], [33, 12]], np.int64),
    )
    plan = plan_chunks(shapes, chunks, rows, (9, 9))
    keys = [(int(s), *c) for s, c in zip(plan.stack, plan.chunk.tolist(), strict=True)]
    assert keys == sorted(set(keys))
    assert np.all(np.diff(plan.piece_chunk) >= 0)  # pieces grouped by chunk
    assert _coverage_is_exact(plan, rows, 2, (9, 9))


def test_plan_of_a_chunk_grid_past_int64_still_lists_each_chunk_once():
    # 2**62 chunks of one element: more than the integer keys can rank.
    shapes = [(1, 1, 2**31, 2**31)]
    chunks = [(1, 1, 1, 1)]
    rows = (
        np.zeros(2, np.int64),
        np.zeros(2, np.int64),
        np.array([[2**31 - 3, 5], [2**31 - 2, 6]], np.int64),
    )
    plan = plan_chunks(shapes, chunks, rows, (2, 2))
    keys = [tuple(c) for c in plan.chunk.tolist()]
    assert keys == sorted(set(keys)) and len(keys) == 7  # 4 + 4 - 1 shared
    assert _coverage_is_exact(plan, rows, 1, (2, 2))


# -- the arrays of the windows ---------------------------------------------------------------


def _window_store(tmp_path):
    data = _data((1, 1, 64, 64), seed=23)
    zarr.create_array(
        str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 1, 16, 16), dtype=data.dtype
    )[...] = data
    strategy = StratifiedPatching([data.shape], (8, 8), seed=4)
    rows = strategy.sample_epoch(0, shuffle=True).to_numpy()  # 64 rows: 16 batches of 4
    return data, open_stack(tmp_path / "a.zarr"), rows


def test_a_pass_writes_again_the_array_of_a_window_the_consumer_let_go(tmp_path):
    data, stack, rows = _window_store(tmp_path)
    reader = ChunkReader([stack], cache_bytes=0, memory="call")
    arrays: list = []  # every window array seen (weakly: holding one would keep it)
    for patches, batch in reader.batches(rows, 4, read_ahead=2):
        if not any(patches.base is seen() for seen in arrays):
            arrays.append(weakref.ref(patches.base))
        assert np.array_equal(patches, _sliced(data, batch.sample_idx, batch.coords, (8, 8)))
        del patches
    # 9 windows (1 + 8 of 2 batches) took turns on 3 arrays.
    assert len(arrays) == 3


def test_batches_the_consumer_keeps_are_never_written_again(tmp_path):
    data, stack, rows = _window_store(tmp_path)
    reader = ChunkReader([stack], cache_bytes=0, memory="call")
    kept = []
    for k, (patches, batch) in enumerate(reader.batches(rows, 4, read_ahead=2)):
        if k % 3 == 0:  # one batch of some windows, as a view of its window
            kept.append((patches, batch))
    assert len(kept) == 6
    for patches, batch in kept:
        assert np.array_equal(patches, _sliced(data, batch.sample_idx, batch.coords, (8, 8)))


def test_a_pass_checks_the_store_before_its_first_read_and_after_every_read(tmp_path):
    _, _, rows = _window_store(tmp_path)
    stack, log = logged_stack(tmp_path / "a.zarr")
    reader = ChunkReader([stack], cache_bytes=0, memory="call")
    log.keys.clear()
    n_batches = sum(1 for _ in reader.batches(rows, 4, read_ahead=2))
    assert n_batches == 16
    # 9 windows (1 + 8 of 2 batches): 1 check before the first, 1 after each.
    assert sum(key == "zarr.json" for key in log.keys) == 1 + 9
