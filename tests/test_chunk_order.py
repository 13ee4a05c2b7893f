"""The chunk order of an epoch (``PatchLoader(..., order="chunks")``).

Every store is a real zarr array written into ``tmp_path``; patches are read
through the public loader and compared with the shuffled epoch of the same
seed and epoch.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", minversion="3")

from gpu_patching import PatchLoader, StratifiedPatching, extract_patches  # noqa: E402
from gpu_patching.stores import (  # noqa: E402
    DEFAULT_CHUNK_WINDOW,
    MIN_TILES_PER_SHARD,
    choose_tile,
    chunk_order,
    open_stack,
    sweep_axes,
)


def _store(path, data: np.ndarray, chunks: tuple[int, ...]):
    array = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype)
    array[...] = data
    return open_stack(str(path))


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


CASES = {
    "2D, two stacks": ([(3, 1, 96, 128), (2, 1, 80, 64)], (1, 1, 32, 32), (8, 8)),
    "3D": ([(2, 1, 24, 48, 48)], (1, 1, 8, 16, 16), (4, 8, 8)),
}


def _case(tmp_path, name: str, seed: int = 11):
    shapes, chunks, patch = CASES[name]
    arrays = [_data(shape, k) for k, shape in enumerate(shapes)]
    stacks = [_store(tmp_path / f"s{k}.zarr", a, chunks) for k, a in enumerate(arrays)]
    strategy = StratifiedPatching(shapes, patch, seed=seed, backend="numpy")
    cell = (1,) * len(patch)
    strategy.exclude_patches(0, 0, [cell])
    return arrays, stacks, strategy


def _indices(loader: PatchLoader) -> np.ndarray:
    return np.concatenate([batch.indices for _, batch in loader])


@pytest.mark.parametrize("name", list(CASES))
def test_chunk_order_yields_the_patches_of_the_shuffled_epoch(tmp_path, name):
    arrays, stacks, strategy = _case(tmp_path, name)
    chunk_loader = PatchLoader(stacks, strategy, batch_size=16, order="chunks")
    chunk_loader.set_epoch(3)
    patches, rows = zip(*chunk_loader, strict=True)
    indices = np.concatenate([batch.indices for batch in rows])
    shuffled = PatchLoader(stacks, strategy, batch_size=16)
    shuffled.set_epoch(3)
    assert sorted(indices.tolist()) == sorted(_indices(shuffled).tolist())
    assert len(indices) == strategy.n_patches
    # Each patch is the one its index has in epoch 3, cut as plain slicing cuts it.
    plain = strategy.sample_epoch(3).to_numpy()
    assert np.array_equal(np.concatenate(patches), extract_patches(arrays, plain[indices]))


def test_chunk_order_is_the_same_for_the_same_seed_and_epoch_and_new_for_a_new_epoch(tmp_path):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    twin = StratifiedPatching(strategy.data_shapes, strategy.patch_size, seed=strategy.seed)
    twin.load_state_dict(strategy.state_dict())
    first = PatchLoader(stacks, strategy, batch_size=16, order="chunks")
    second = PatchLoader(stacks, twin, batch_size=16, order="chunks")
    assert np.array_equal(_indices(first), _indices(second))
    second.set_epoch(1)
    assert not np.array_equal(_indices(first), _indices(second))


def test_rows_of_a_window_come_together_and_windows_hold_whole_groups(tmp_path):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    order = chunk_order(
        strategy.sample_epoch(0).to_numpy(),
        [s.chunks for s in stacks],
        seed=strategy.seed,
        epoch=0,
    )
    # Windows follow one another: each appears as one run.
    assert np.all(np.diff(order.window) >= 0)
    for window in np.unique(order.window):
        groups = np.unique(order.group[order.window == window])
        assert len(groups) <= DEFAULT_CHUNK_WINDOW
        # No group of this window appears in another.
        assert not np.isin(order.group[order.window != window], groups).any()


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_whole_groups_and_together_the_epoch(tmp_path, world_size, drop_last):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    plain = strategy.sample_epoch(2).to_numpy()
    shards = [
        chunk_order(
            plain,
            [s.chunks for s in stacks],
            seed=strategy.seed,
            epoch=2,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        for rank in range(world_size)
    ]
    assert len({len(shard.rows) for shard in shards}) == 1  # DDP needs equal lengths
    for key in ("group", "tile"):
        owned = [set(getattr(shard, key).tolist()) for shard in shards]
        for a, b in itertools.combinations(owned, 2):
            assert not a & b  # a home chunk, and a tile, is read by one rank
    rows = [set(shard.rows.tolist()) for shard in shards]
    if drop_last:
        assert sum(len(r) for r in rows) == sum(len(shard.rows) for shard in shards)
    else:
        assert set().union(*rows) == set(range(strategy.n_patches))


def test_sharded_loaders_yield_their_chunk_order_shards(tmp_path):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    loaders = [
        PatchLoader(stacks, strategy, batch_size=16, order="chunks", rank=r, world_size=2)
        for r in range(2)
    ]
    seen = [_indices(loader) for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == len(loaders[0]) * 16 - (-len(seen[0]) % 16)
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(strategy.n_patches))


def test_a_checkpoint_mid_epoch_resumes_the_same_remaining_batches(tmp_path):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    loader = PatchLoader(stacks, strategy, batch_size=16, order="chunks")
    loader.set_epoch(5)
    batches = iter(loader)
    done = [next(batches)[1].indices for _ in range(3)]
    saved = json.dumps(strategy.state_dict())
    rest = [batch.indices for _, batch in batches]
    restored = StratifiedPatching(strategy.data_shapes, strategy.patch_size, backend="numpy")
    restored.load_state_dict(json.loads(saved))
    resumed = PatchLoader(stacks, restored, batch_size=16, order="chunks")
    resumed.set_epoch(5)
    again = [batch.indices for _, batch in itertools.islice(resumed, len(done), None)]
    assert len(again) == len(rest)
    assert all(np.array_equal(a, b) for a, b in zip(again, rest, strict=True))


def test_every_full_batch_mixes_several_groups_with_the_default_window(tmp_path):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    order = chunk_order(
        strategy.sample_epoch(0).to_numpy(), [s.chunks for s in stacks], seed=strategy.seed, epoch=0
    )
    batch_size = 16
    full = len(order.rows) // batch_size * batch_size
    groups_per_batch = [
        len(np.unique(order.group[start : start + batch_size]))
        for start in range(0, full, batch_size)
    ]
    assert min(groups_per_batch) >= 2
    assert np.mean(groups_per_batch) >= 3


def test_chunk_order_decodes_fewer_chunks_than_the_shuffled_order(tmp_path):
    # One 512x512 image in 64x64 chunks, 8x8 patches, a cache of a quarter of the store.
    data = _data((1, 1, 512, 512), 3)
    stack = _store(tmp_path / "big.zarr", data, (1, 1, 64, 64))
    strategy = StratifiedPatching([data.shape], (8, 8), seed=1, backend="numpy")
    decoded = {}
    for order in ("shuffle", "chunks"):
        loader = PatchLoader(
            [stack], strategy, batch_size=64, order=order, cache_bytes=128 << 10, workers=2
        )
        n_rows = len(_indices(loader))
        decoded[order] = loader._reader.chunks_read / n_rows
    floor = 64 / strategy.n_patches
    assert decoded["chunks"] < decoded["shuffle"] / 2
    assert decoded["chunks"] >= floor


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"order": "random"}, ValueError, "'random'"),
        (
            {"order": "chunks", "chunk_window": 0},
            ValueError,
            "chunk_window must be at least 1, got 0",
        ),
        ({"order": "chunks", "chunk_window": 2.5}, TypeError, "chunk_window"),
        ({"order": "chunks", "shuffle": False}, ValueError, "shuffle=True"),
    ],
)
def test_bad_orders_are_refused_when_the_loader_is_built(tmp_path, kwargs, error, message):
    _, stacks, strategy = _case(tmp_path, "3D")
    with pytest.raises(error, match=message):
        PatchLoader(stacks, strategy, batch_size=4, **kwargs)


def test_chunk_order_is_refused_for_stacks_in_memory():
    stack = _data((1, 1, 64, 64), 0)
    strategy = StratifiedPatching([stack.shape], (8, 8), seed=0, backend="numpy")
    with pytest.raises(ValueError, match="chunked stores"):
        PatchLoader([stack], strategy, batch_size=4, order="chunks")


def test_more_ranks_than_tiles_are_refused_naming_both():
    strategy = StratifiedPatching([(1, 1, 32, 32)], (8, 8), seed=0, backend="numpy")
    with pytest.raises(ValueError, match="1 tiles for world_size 2"):
        chunk_order(
            strategy.sample_epoch(0).to_numpy(), [(1, 1, 64, 64)], seed=0, epoch=0, world_size=2
        )


# -- tiles: each chunk decoded about once ---------------------------------------


def test_a_row_is_homed_in_the_chunk_that_holds_its_corner(tmp_path):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    plain = strategy.sample_epoch(0).to_numpy()
    order = chunk_order(plain, [s.chunks for s in stacks], seed=strategy.seed, epoch=0)
    rows = plain[order.rows]
    homes = np.column_stack([rows.data_idx, rows.sample_idx, np.asarray(rows.coords) // 32])
    # One home chunk per group, and one group per home chunk.
    pairs = set(zip(order.group.tolist(), map(tuple, homes.tolist()), strict=True))
    assert len(pairs) == len(set(order.group.tolist())) == len({p[1] for p in pairs})


def _sweeps(
    tmp_path, epoch: int, tile: tuple[int, int] = (4, 2)
) -> tuple[object, list[list[tuple[int, ...]]]]:
    """An 8x8 grid of chunks in chunk order, tiles of ``tile``, and each tile's home chunks."""
    data = _data((1, 1, 256, 256), 2)
    stack = _store(tmp_path / f"grid{epoch}-{tile}.zarr", data, (1, 1, 32, 32))
    strategy = StratifiedPatching([data.shape], (8, 8), seed=4, backend="numpy")
    plain = strategy.sample_epoch(epoch).to_numpy()
    order = chunk_order(plain, [stack.chunks], seed=4, epoch=epoch, tile=tile, window=1)
    homes = np.asarray(plain[order.rows].coords) // 32
    sweeps = [
        [tuple(h) for h, _ in itertools.groupby(homes[order.tile == tile].tolist())]
        for tile in range(order.n_tiles)
    ]
    return order, sweeps


def test_inside_a_tile_home_chunks_come_row_by_row_and_tiles_come_whole(tmp_path):
    order, sweeps = _sweeps(tmp_path, 1)
    assert order.n_tiles == 2 * 4  # an 8x8 chunk grid in tiles of 4x2 chunks
    tiles_seen = [t for t, _ in itertools.groupby(order.tile.tolist())]
    assert sorted(tiles_seen) == list(range(order.n_tiles))  # each tile in one stretch
    for sweep in sweeps:
        assert len(sweep) == len(set(sweep)) == 4 * 2  # each home chunk once
        # Row by row, each axis in one direction (the tile's own).
        directions = [1 if sweep[-1][axis] >= sweep[0][axis] else -1 for axis in range(2)]
        signed = [tuple(d * c for d, c in zip(directions, home, strict=True)) for home in sweep]
        assert signed == sorted(signed)


def test_a_tile_is_swept_with_its_longest_axis_outermost(tmp_path):
    # Tiles of 2x4 chunks: X outermost, so the sweep goes column by column.
    order, sweeps = _sweeps(tmp_path, 1, tile=(2, 4))
    assert order.n_tiles == 4 * 2
    for sweep in sweeps:
        directions = [1 if sweep[-1][axis] >= sweep[0][axis] else -1 for axis in range(2)]
        signed = [(directions[1] * x, directions[0] * y) for y, x in sweep]
        assert signed == sorted(signed)


def test_sweep_axes_put_the_longest_axis_outermost_and_keep_ties_in_order():
    assert sweep_axes((4, 8, 3)) == (1, 0, 2)
    assert sweep_axes((4, 8, 8)) == (1, 2, 0)
    assert sweep_axes((20, 20)) == (0, 1)
    assert sweep_axes((2, 4)) == (1, 0)


def test_sweep_directions_vary_between_tiles_and_epochs(tmp_path):
    directions = set()
    for epoch in range(3):
        _, sweeps = _sweeps(tmp_path, epoch)
        for sweep in sweeps:
            directions.add(tuple(np.sign(np.subtract(sweep[-1], sweep[0])).tolist()))
    assert directions == {(1, 1), (1, -1), (-1, 1), (-1, -1)}


# A 20x20 grid of chunks (128x128, 16 patches each) and a 4x8x8 grid (16x64x64).
BIG = {
    "2D": ((1, 1, 2560, 2560), (1, 1, 128, 128), (32, 32)),
    "3D": ((1, 1, 64, 512, 512), (1, 1, 16, 64, 64), (4, 8, 8)),
}


@pytest.fixture(scope="module")
def big_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    return {
        name: _store(root / f"{name}.zarr", _data(shape, 5), chunks)
        for name, (shape, chunks, _) in BIG.items()
    }


def _decodes_per_chunk(stack, patch, order: str, cache_bytes=None, **kwargs) -> float:
    """Chunks the reader decoded over one epoch, per chunk of the store."""
    strategy = StratifiedPatching([stack.shape], patch, seed=1, backend="numpy")
    loader = PatchLoader(
        [stack], strategy, batch_size=64, order=order, cache_bytes=cache_bytes, workers=2, **kwargs
    )
    n_rows = len(_indices(loader))
    assert n_rows == strategy.n_patches or "world_size" in kwargs
    return loader._reader.chunks_read / np.prod(stack.chunk_grid)


@pytest.mark.parametrize("name", list(BIG))
def test_chunk_order_decodes_each_chunk_about_once_with_the_default_cache(big_stores, name):
    _, _, patch = BIG[name]
    decodes = _decodes_per_chunk(big_stores[name], patch, "chunks")
    assert decodes <= 1.2  # measured 1.00 for both (the shuffled order: 3.2 and 12.3)


def test_chunk_order_with_a_tenth_of_the_store_cached_stays_near_the_floor(big_stores):
    stack = big_stores["2D"]
    cache = stack.chunk_bytes * 40  # a tenth of the 400 chunks
    chunks = _decodes_per_chunk(stack, BIG["2D"][2], "chunks", cache)
    shuffled = _decodes_per_chunk(stack, BIG["2D"][2], "shuffle", cache)
    # Measured 1.78 and 17.2: reads ahead take most of so small a budget.
    assert chunks <= 2.0
    assert chunks < shuffled / 5


def _pattern(shape: tuple[int, ...]) -> np.ndarray:
    """A uint16 stack that compresses well (written and decoded fast), every chunk stored."""
    axes = np.indices(shape[2:], dtype=np.uint16)
    return (axes[0] * 7 + axes[1] * 3 + axes[2])[None, None]


def test_a_3d_store_at_a_full_size_budget_decodes_each_chunk_about_once(tmp_path):
    # bench_stores' 3D store scaled down with its ratios kept: a 4x8x8 grid of
    # chunks (here 16x128x128, 512 KiB; there 64x256x256), patches a quarter
    # of a chunk per axis, batches of two chunks' bytes, a cache of 64 chunks
    # (there the default 512 MiB), 6 reads in flight. Reads in flight and the
    # reader's own read-ahead (9 batches) left 13 chunks of cache, so the
    # default tile was 4x1x1 chunks (3.49 decodes per chunk, 3.53 at full
    # size); a read-ahead of 2 batches leaves 41, for tiles of 4x8x3 swept
    # along Y (two planes of 4x4 chunks): 1.22, the model's 320 / 256 = 1.25.
    shape = (1, 1, 64, 1024, 1024)
    stack = _store(tmp_path / "3d.zarr", _pattern(shape), (1, 1, 16, 128, 128))
    strategy = StratifiedPatching([shape], (4, 32, 32), seed=1, backend="numpy")
    loader = PatchLoader(
        [stack], strategy, 128, order="chunks", cache_bytes=64 * stack.chunk_bytes, workers=6
    )
    assert len(_indices(loader)) == strategy.n_patches
    assert loader._reader.chunks_read / np.prod(stack.chunk_grid) <= 1.25


def test_two_ranks_together_decode_about_what_one_rank_decodes(big_stores):
    stack = big_stores["2D"]
    patch = BIG["2D"][2]
    alone = _decodes_per_chunk(stack, patch, "chunks")
    together = sum(
        _decodes_per_chunk(stack, patch, "chunks", rank=rank, world_size=2) for rank in range(2)
    )
    assert together <= 1.2 * alone  # measured 1.05: two tiles, one shared edge


def test_the_default_tile_is_the_whole_grid_when_two_planes_fit_the_cache():
    grid, chunk = [(1, 1, 20, 20)], [32 << 10]
    assert choose_tile(grid, chunk, 400 * chunk[0]) == (20, 20)


def test_a_smaller_cache_gives_tiles_of_fewer_chunks_per_row():
    grid, chunk = [(1, 1, 20, 20)], [32 << 10]
    # Two rows of T + 1 chunks must fit: 16 chunks give T = 7.
    assert choose_tile(grid, chunk, 16 * chunk[0]) == (20, 7)


def test_every_shard_gets_at_least_two_tiles_where_the_grid_allows():
    grid, chunk = [(1, 1, 20, 20)], [32 << 10]
    tile = choose_tile(grid, chunk, 400 * chunk[0], n_shards=4)
    n_tiles = np.prod([-(-20 // t) for t in tile])
    assert n_tiles >= MIN_TILES_PER_SHARD * 4


def test_a_3d_tile_holds_two_planes_across_its_longest_axis_in_the_cache():
    grid, chunk = [(1, 1, 4, 8, 8)], [128 << 10]
    # Two planes in 40 chunks: 20 per plane. Swept along Y, a 4x8x4 tile's
    # plane is 4 x (4 + 1) chunks (the whole Z, X one chunk past the tile):
    # 4 x 8 x 9 decodes. Swept along Z, planes of (T_y + 1) x (T_x + 1) would
    # allow 4x3x3 at best: 4 x 10 x 10.
    tile = choose_tile(grid, chunk, 40 * chunk[0])
    assert tile == (4, 8, 4)
    assert sweep_axes(tile)[0] == 1


def test_an_explicit_chunk_tile_is_used(tmp_path):
    _, stacks, strategy = _case(tmp_path, "3D")
    loader = PatchLoader(stacks, strategy, batch_size=8, order="chunks", chunk_tile=(1, 2, 1))
    assert loader.chunk_tile == (1, 2, 1)
    assert PatchLoader(stacks, strategy, batch_size=8).chunk_tile is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"order": "chunks", "chunk_tile": (1, 2)}, ValueError, r"chunk_tile .*\(1, 2\)"),
        ({"order": "chunks", "chunk_tile": (1, 0, 1)}, ValueError, r"\(1, 0, 1\)"),
        ({"order": "chunks", "chunk_tile": 2}, TypeError, "chunk_tile"),
        ({"chunk_tile": (1, 1, 1)}, ValueError, "order='chunks'"),
    ],
)
def test_bad_chunk_tiles_are_refused_when_the_loader_is_built(tmp_path, kwargs, error, message):
    _, stacks, strategy = _case(tmp_path, "3D")
    with pytest.raises(error, match=message):
        PatchLoader(stacks, strategy, batch_size=4, **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([], [], 1), {}, "same stacks"),
        (([(1, 1, 0, 4)], [8], 1), {}, "positive"),
        (([(1, 1, 4, 4)], [8], -1), {}, "cache_bytes must be at least 0"),
        (([(1, 1, 4, 4)], [8], 1), {"n_shards": 0}, "n_shards must be at least 1"),
    ],
)
def test_bad_choose_tile_arguments_are_refused_naming_them(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        choose_tile(*args, **kwargs)


@pytest.mark.parametrize("drop_last", [False, True])
def test_worker_parts_are_whole_tiles_that_together_make_the_ranks_rows(tmp_path, drop_last):
    _, stacks, strategy = _case(tmp_path, "2D, two stacks")
    plain = strategy.sample_epoch(6).to_numpy()
    options = {"seed": strategy.seed, "epoch": 6, "world_size": 2, "drop_last": drop_last}
    chunks = [s.chunks for s in stacks]
    for rank in range(2):
        whole = chunk_order(plain, chunks, rank=rank, **options)
        parts = [
            chunk_order(plain, chunks, rank=rank, worker_id=w, num_workers=3, **options)
            for w in range(3)
        ]
        together = np.concatenate([part.rows for part in parts])
        # As many rows as the rank has (padding and drop_last apply to the
        # parts together), all of the rank's tiles, and every one without drop_last.
        assert len(together) == len(whole.rows)
        assert set(np.concatenate([p.tile for p in parts]).tolist()) <= set(whole.tile.tolist())
        if not drop_last:
            assert set(together.tolist()) == set(whole.rows.tolist())
        owned = [set(part.tile.tolist()) for part in parts]
        for a, b in itertools.combinations(owned, 2):
            assert not a & b


def test_home_chunks_past_int64_ranks_are_ordered_as_the_same_chunks_near_the_origin():
    # Corners near 2**40 on both axes of chunks of 1: the home keys have no
    # int64 rank together (2**80 of them), so they are sorted as rows.
    from gpu_patching.specs import PatchBatch

    rng = np.random.default_rng(5)
    near = rng.integers(0, 6, (40, 2)).astype(np.int64)
    far = near + 2**40

    def rows(coords):
        n = len(coords)
        zeros = np.zeros(n, dtype=np.int64)
        return PatchBatch(zeros, zeros, coords, np.arange(n, dtype=np.int64), (1, 1))

    chunks = [(1, 1, 1, 1)]
    low = chunk_order(rows(near), chunks, seed=3, epoch=1, window=2)
    high = chunk_order(rows(far), chunks, seed=3, epoch=1, window=2)
    assert low.n_groups == len({tuple(c) for c in near.tolist()})
    for name in ("rows", "group", "tile", "window"):
        assert np.array_equal(getattr(low, name), getattr(high, name)), name
