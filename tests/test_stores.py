"""Chunked stores as stacks: zarr (formats 2 and 3), OME-Zarr, TIFF.

Every store is written by zarr or tifffile into ``tmp_path``; every patch is
compared with slicing the same array in memory.
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from gpu_patching import BackendUnavailableError, PatchLoader, StratifiedPatching, extract_patches
from gpu_patching.specs import PatchBatch
from gpu_patching.stores import (
    ChunkReader,
    StoreError,
    open_stack,
    plan_chunks,
)

zarr = pytest.importorskip("zarr", minversion="3")
tifffile = pytest.importorskip("tifffile", minversion="2025.5.21")
from conftest import sliced_patches  # noqa: E402
from zarr.codecs import BloscCodec  # noqa: E402
from zarr_logs import logged_stack  # noqa: E402


def _data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


def _write(path, data, chunks, zarr_format=3):
    compressors = (
        BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle") if zarr_format == 3 else "auto"
    )
    array = zarr.create_array(
        str(path),
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        zarr_format=zarr_format,
        compressors=compressors,
    )
    array[...] = data
    return array


def _batch(patch_size, sample_idx, coords, data_idx=None) -> PatchBatch:
    n = len(sample_idx)
    return PatchBatch(
        data_idx=np.zeros(n, np.int64) if data_idx is None else np.asarray(data_idx, np.int64),
        sample_idx=np.asarray(sample_idx, np.int64),
        coords=np.asarray(coords, np.int64).reshape(n, len(patch_size)),
        indices=np.arange(n, dtype=np.int64),
        patch_size=tuple(patch_size),
    )


# -- every patch equals slicing ----------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [(1, 1, 16, 16), (2, 2, 7, 11), (3, 1, 64, 5)],
    ids=["divides", "does-not-divide", "wider-than-patch"],
)
def test_2d_store_patches_equal_slicing(tmp_path, chunks):
    data = _data((3, 2, 45, 53))
    array = _write(tmp_path / "a.zarr", data, chunks)
    strategy = StratifiedPatching([data.shape], (16, 16), seed=3)
    batch = strategy.sample_epoch(0, shuffle=True).to_numpy()
    assert np.array_equal(extract_patches([array], batch), sliced_patches(data, batch))


def test_patches_straddling_chunk_corners_equal_slicing(tmp_path):
    data = _data((2, 1, 40, 40), seed=1)
    stack = open_stack(_write(tmp_path / "a.zarr", data, (1, 1, 10, 10)))
    # Corners 3 short of a chunk corner: each 6x6 patch touches four chunks.
    coords = [(7, 7), (17, 27), (27, 17), (0, 34), (34, 0)]
    batch = _batch((6, 6), [0, 1, 0, 1, 1], coords)
    assert np.array_equal(extract_patches([stack], batch), sliced_patches(data, batch))
    assert np.array_equal(stack.read_chunk((1, 0, 2, 3)), data[1:2, :, 20:30, 30:40])
    with pytest.raises(IndexError, match="outside the chunk grid"):
        stack.read_chunk((2, 0, 0, 0))


def test_3d_format_2_store_patches_equal_slicing(tmp_path):
    data = _data((2, 1, 12, 30, 26), seed=2)
    array = _write(tmp_path / "a.zarr", data, (1, 1, 5, 8, 7), zarr_format=2)
    strategy = StratifiedPatching([data.shape], (4, 9, 8), seed=5)
    batch = strategy.sample_epoch(1, shuffle=True).to_numpy()
    assert np.array_equal(extract_patches([array], batch), sliced_patches(data, batch))


def test_several_stores_keep_the_batch_order(tmp_path):
    first, second = _data((2, 1, 30, 30), 4), _data((1, 1, 50, 20), 5)
    stacks = [
        _write(tmp_path / "a.zarr", first, (1, 1, 8, 8)),
        _write(tmp_path / "b.zarr", second, (1, 1, 16, 6), zarr_format=2),
    ]
    strategy = StratifiedPatching([first.shape, second.shape], (10, 10), seed=7)
    batch = strategy.sample_epoch(0, shuffle=True).to_numpy()
    expected = extract_patches([first, second], batch)
    assert np.array_equal(extract_patches(stacks, batch), expected)


def test_axes_map_other_orders(tmp_path):
    # stored as Z, Y, X, C
    stored = _data((6, 20, 18, 2), seed=6)
    array = _write(tmp_path / "a.zarr", stored, (4, 8, 8, 1))
    stack = open_stack(tmp_path / "a.zarr", axes="ZYXC")
    assert stack.shape == (1, 2, 6, 20, 18)
    assert stack.chunks == (1, 1, 4, 8, 8)
    scyx = np.transpose(stored, (3, 0, 1, 2))[np.newaxis]
    strategy = StratifiedPatching([stack.shape], (3, 7, 5), seed=1)
    batch = strategy.sample_epoch(0).to_numpy()
    assert np.array_equal(extract_patches([stack], batch), sliced_patches(scyx, batch))
    assert array.shape == stored.shape
    # Indexing reads only the selection, in SC(Z)YX order.
    for key in [(0, 1), (0, slice(None), slice(2, 5), slice(None, None, 3)), (-1, -1, 3), (0,)]:
        assert np.array_equal(stack[key], scyx[key])
    with pytest.raises(IndexError, match="out of range"):
        stack[0, 2]
    with pytest.raises(IndexError, match="6 indices"):
        stack[0, 0, 0, 0, 0, 0]


def _write_ome(path, levels, axes, zarr_format):
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    for k, level in enumerate(levels):
        array = group.create_array(str(k), shape=level.shape, chunks=(1, 9, 9), dtype=level.dtype)
        array[...] = level
    multiscales = [
        {
            "version": "0.4" if zarr_format == 2 else "0.5",
            "axes": [{"name": a, "type": "space" if a in "zyx" else "channel"} for a in axes],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0 if a == "c" else 2.0**k for a in axes]}
                    ],
                }
                for k in range(len(levels))
            ],
        }
    ]
    if zarr_format == 2:
        group.attrs["multiscales"] = multiscales
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}


@pytest.mark.parametrize("zarr_format", [2, 3], ids=["ome-zarr-0.4", "ome-zarr-0.5"])
def test_ome_zarr_multiscale_reads_level_0_by_default(tmp_path, zarr_format):
    full = _data((2, 36, 40), seed=8)
    half = full[:, ::2, ::2].copy()
    _write_ome(tmp_path / "image.zarr", [full, half], "cyx", zarr_format)
    stack = open_stack(tmp_path / "image.zarr")
    assert stack.shape == (1, 2, 36, 40)
    strategy = StratifiedPatching([stack.shape], (8, 8), seed=2)
    batch = strategy.sample_epoch(0).to_numpy()
    assert np.array_equal(extract_patches([stack], batch), sliced_patches(full[np.newaxis], batch))
    level_1 = open_stack(tmp_path / "image.zarr", level=1)
    assert level_1.shape == (1, 2, 18, 20)
    small = _batch((8, 8), [0], [(10, 12)])
    expected = sliced_patches(half[np.newaxis], small)
    assert np.array_equal(extract_patches([level_1], small), expected)
    with pytest.raises(ValueError, match="level 2 does not exist"):
        open_stack(tmp_path / "image.zarr", level=2)


@pytest.mark.parametrize("tiled", [True, False], ids=["tiles", "strips"])
def test_tiff_patches_equal_slicing(tmp_path, tiled):
    data = _data((5, 48, 40), seed=9)  # Z, Y, X
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, tile=(16, 16) if tiled else None, compression="zlib")
    stack = open_stack(path, axes="ZYX")
    try:
        assert stack.shape == (1, 1, 5, 48, 40)
        strategy = StratifiedPatching([stack.shape], (2, 12, 10), seed=4)
        batch = strategy.sample_epoch(0, shuffle=True).to_numpy()
        patches = extract_patches([stack], batch)
    finally:
        stack.close()
    assert np.array_equal(patches, sliced_patches(data[np.newaxis, np.newaxis], batch))


# -- each chunk once per batch, the cache ------------------------------------------------


def test_each_chunk_is_read_once_per_batch(tmp_path):
    data = _data((2, 1, 40, 50), seed=10)
    _write(tmp_path / "a.zarr", data, (1, 1, 8, 8))
    stack, log = logged_stack(tmp_path / "a.zarr")
    strategy = StratifiedPatching([data.shape], (12, 12), seed=6)
    batch = strategy.sample_epoch(0, shuffle=True).to_numpy()[:24]
    # The chunks each patch touches, by brute force.
    expected = set()
    for s, (y, x) in zip(batch.sample_idx.tolist(), batch.coords.tolist(), strict=True):
        for cy, cx in itertools.product(
            range(y // 8, (y + 11) // 8 + 1), range(x // 8, (x + 11) // 8 + 1)
        ):
            expected.add(f"c/{s}/0/{cy}/{cx}")
    reader = ChunkReader([stack], cache_bytes=0, workers=3)
    rows = (batch.data_idx, batch.sample_idx, batch.coords)
    log.keys.clear()
    patches = reader.read(rows, (12, 12))
    chunk_gets = [key for key in log.keys if key.startswith("c/")]
    assert sorted(chunk_gets) == sorted(expected)  # every one, each exactly once
    assert reader.chunks_read == len(expected)
    assert np.array_equal(patches, sliced_patches(data, batch))


def test_cache_serves_a_repeated_batch_within_its_byte_limit(tmp_path):
    data = _data((1, 1, 64, 64), seed=11)
    _write(tmp_path / "a.zarr", data, (1, 1, 16, 16))
    stack, log = logged_stack(tmp_path / "a.zarr")
    batch = _batch((10, 10), [0, 0, 0], [(0, 0), (30, 30), (50, 10)])
    rows = (batch.data_idx, batch.sample_idx, batch.coords)
    chunk_bytes = 16 * 16 * 2
    # One read in flight takes three chunk sizes of the budget.
    reader = ChunkReader([stack], cache_bytes=(3 + 20) * chunk_bytes, workers=1)
    assert reader.cache_limit == 20 * chunk_bytes
    reader.read(rows, (10, 10))
    log.keys.clear()
    again = reader.read(rows, (10, 10))
    assert [key for key in log.keys if key.startswith("c/")] == []
    assert reader.cache_hits == reader.chunks_read
    assert np.array_equal(again, sliced_patches(data, batch))
    small = ChunkReader([stack], cache_bytes=(3 + 3) * chunk_bytes, workers=1)
    small.read(rows, (10, 10))
    assert small.cached_bytes == 3 * chunk_bytes  # 9 chunks read, the last 3 kept


def test_plan_tiles_every_patch_once():
    shapes = [(2, 3, 30, 31)]
    chunks = [(1, 2, 7, 5)]
    rows = (
        np.zeros(4, np.int64),
        np.array([0, 1, 1, 0], np.int64),
        np.array([[0, 0], [6, 4], [20, 21], [13, 9]], np.int64),
    )
    plan = plan_chunks(shapes, chunks, rows, (10, 10))
    coverage = np.zeros((4, 3, 10, 10), np.int64)
    for row, low, high in zip(plan.piece_row, plan.piece_low, plan.piece_high, strict=True):
        corner = np.array([0, *rows[2][row]])
        box = tuple(slice(a, b) for a, b in zip(low - corner, high - corner, strict=True))
        coverage[(row, *box)] += 1
    assert (coverage == 1).all()
    keys = {(int(s), tuple(c)) for s, c in zip(plan.stack, plan.chunk.tolist(), strict=True)}
    assert len(keys) == len(plan.chunk)


def test_read_ahead_windows_give_the_same_batches_and_read_each_chunk_once(tmp_path):
    data = _data((1, 1, 48, 48), seed=16)
    _write(tmp_path / "a.zarr", data, (1, 1, 16, 16))
    stack, log = logged_stack(tmp_path / "a.zarr")
    strategy = StratifiedPatching([data.shape], (8, 8), seed=2)
    rows = strategy.sample_epoch(0, shuffle=True).to_numpy()[:40]
    # memory="call": no cache, and the windows are not cut to fit a budget.
    one_at_a_time = ChunkReader([stack], cache_bytes=0, memory="call")
    expected = [(p.copy(), b) for p, b in one_at_a_time.batches(rows, 6, read_ahead=1)]
    windowed = ChunkReader([stack], cache_bytes=0, memory="call")
    log.keys.clear()
    got = list(windowed.batches(rows, 6, read_ahead=4))
    assert len(got) == len(expected) == -(-len(rows) // 6)
    for (patches, batch), (want, want_batch) in zip(got, expected, strict=True):
        assert np.array_equal(batch.coords, want_batch.coords)
        assert np.array_equal(patches, want)
    chunk_gets = [key for key in log.keys if key.startswith("c/")]
    # windows of 1, 4 and 1 batches, each reading each of its chunks once
    assert len(chunk_gets) == windowed.chunks_read <= 3 * 9
    assert windowed.chunks_read < one_at_a_time.chunks_read
    with pytest.raises(ValueError, match="read_ahead"):
        windowed.batches(rows, 6, read_ahead=0)


def test_default_read_ahead_buffers_half_of_the_cache_at_most(tmp_path):
    stack = open_stack(_write(tmp_path / "a.zarr", _data((1, 1, 32, 32)), (1, 1, 16, 16)))
    batch_bytes = 1 << 20
    assert ChunkReader([stack], cache_bytes=0).read_ahead(batch_bytes) == 1
    # 2W - 2 batches of buffers within 16 MiB: W = 9
    assert ChunkReader([stack], cache_bytes=32 << 20).read_ahead(batch_bytes) == 9
    assert ChunkReader([stack], cache_bytes=1 << 40).read_ahead(batch_bytes) == 16


# -- the loader ----------------------------------------------------------------------------


def test_loader_on_a_store_yields_the_in_memory_batches(tmp_path):
    data = _data((2, 1, 40, 36), seed=12)
    stack = open_stack(_write(tmp_path / "a.zarr", data, (1, 1, 9, 9)))
    strategy = StratifiedPatching([data.shape], (8, 8), seed=9)
    from_store = PatchLoader([stack], strategy, batch_size=7, workers=2, cache_bytes=4096)
    in_memory = PatchLoader([data], strategy, batch_size=7)
    from_store.set_epoch(2)
    in_memory.set_epoch(2)
    pairs = list(zip(from_store, in_memory, strict=True))
    assert len(pairs) == len(in_memory)
    for (patches, batch), (expected, expected_batch) in pairs:
        assert np.array_equal(batch.coords, expected_batch.coords)
        assert np.array_equal(patches, expected)


def test_loader_device_output_is_for_stores(tmp_path):
    data = _data((1, 1, 32, 32))
    stack = open_stack(_write(tmp_path / "a.zarr", data, (1, 1, 16, 16)))
    strategy = StratifiedPatching([data.shape], (8, 8), seed=0)
    with pytest.raises(ValueError, match="device_output"):
        PatchLoader([data], strategy, batch_size=4, device_output=True)
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="CuPy"):
            PatchLoader([stack], strategy, batch_size=4, device_output=True)


@pytest.mark.cuda
def test_device_output_uploads_the_same_batches(tmp_path):
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as error:  # no driver
        pytest.skip(f"no usable CUDA device ({error})")
    data = _data((2, 1, 40, 36), seed=19)
    stack = open_stack(_write(tmp_path / "a.zarr", data, (1, 1, 9, 9)))
    strategy = StratifiedPatching([data.shape], (8, 8), seed=4)
    stream = cupy.cuda.Stream(non_blocking=True)
    on_device = PatchLoader([stack], strategy, 7, device_output=True, stream=stream)
    on_host = PatchLoader([data], strategy, 7)
    for (patches, batch), (expected, _) in zip(on_device, on_host, strict=True):
        assert isinstance(patches, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(patches), expected)
        assert np.array_equal(expected, sliced_patches(data, batch))


# -- faults ------------------------------------------------------------------------------


def test_corrupt_chunk_names_the_store_and_the_chunk(tmp_path):
    data = _data((1, 1, 32, 32), seed=13)
    path = tmp_path / "a.zarr"
    _write(path, data, (1, 1, 16, 16))
    (path / "c" / "0" / "0" / "1" / "0").write_bytes(b"not a blosc frame at all")
    stack = open_stack(path)
    out = np.full((2, 1, 8, 8), 7, dtype=np.uint16)
    batch = _batch((8, 8), [0, 0], [(0, 0), (20, 4)])
    with pytest.raises(StoreError, match=r"chunk \(0, 0, 1, 0\).*c/0/0/1/0") as caught:
        extract_patches([stack], batch, out=out)
    assert caught.value.chunk == (0, 0, 1, 0)
    assert str(path) in str(caught.value)
    assert (out == 7).all()  # no partial batch reaches out


def test_deleted_store_raises_in_the_consumer_and_hands_over_no_bad_batch(tmp_path):
    data = _data((1, 1, 64, 64), seed=14)
    path = tmp_path / "a.zarr"
    stack = open_stack(_write(path, data, (1, 1, 16, 16)))
    strategy = StratifiedPatching([data.shape], (8, 8), seed=1)
    loader = PatchLoader([stack], strategy, batch_size=4, cache_bytes=0)
    batches = iter(loader)
    patches, batch = next(batches)
    assert np.array_equal(patches, sliced_patches(data, batch))
    shutil.rmtree(path)
    with pytest.raises(StoreError, match="disappeared"):
        for patches, batch in batches:  # a batch read before the deletion is still whole
            assert np.array_equal(patches, sliced_patches(data, batch))


def test_changed_shape_is_an_error(tmp_path):
    data = _data((1, 1, 32, 32), seed=15)
    path = tmp_path / "a.zarr"
    stack = open_stack(_write(path, data, (1, 1, 16, 16)))
    zarr.create_array(
        str(path), shape=(1, 1, 32, 48), chunks=(1, 1, 16, 16), dtype=np.uint16, overwrite=True
    )
    with pytest.raises(StoreError, match=r"changed since it was opened.*\(1, 1, 32, 48\)"):
        extract_patches([stack], _batch((8, 8), [0], [(0, 0)]))


# -- bad input -----------------------------------------------------------------------------


def test_bad_input_is_named(tmp_path):
    data = _data((1, 1, 32, 32))
    array = _write(tmp_path / "a.zarr", data, (1, 1, 16, 16))
    flat = _write(tmp_path / "flat.zarr", data[0], (1, 16, 16))
    batch = _batch((8, 8), [0], [(0, 0)])
    with pytest.raises(TypeError, match="cannot be mixed"):
        extract_patches([array, data], _batch((8, 8), [0], [(0, 0)]))
    with pytest.raises(ValueError, match="open_stack"):
        extract_patches([flat], batch)
    with pytest.raises(ValueError, match="give its axes"):
        open_stack(tmp_path / "flat.zarr")
    with pytest.raises(ValueError, match="outside"):
        extract_patches([array], _batch((8, 8), [0], [(25, 0)]))
    with pytest.raises(IndexError, match="sample_idx"):
        extract_patches([array], _batch((8, 8), [1], [(0, 0)]))
    with pytest.raises(ValueError, match="out has shape"):
        extract_patches([array], batch, out=np.empty((2, 1, 8, 8), np.uint16))
    with pytest.raises(FileNotFoundError):
        open_stack(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="cache_bytes"):
        ChunkReader([array], cache_bytes=-1)
    with pytest.raises(ValueError, match="workers"):
        ChunkReader([array], workers=0)
    with pytest.raises(TypeError, match="not read whole"):
        np.asarray(open_stack(array))
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(ValueError, match="multiscales"):
        open_stack(group)


# -- the command ---------------------------------------------------------------------------


def test_demo_reads_one_plane_of_an_ome_zarr_store(tmp_path, capsys):
    import argparse

    from gpu_patching.cli import _load_demo_image, main

    planes = _data((2, 40, 48), seed=17)
    _write_ome(tmp_path / "image.zarr", [planes, planes[:, ::2, ::2].copy()], "cyx", 3)
    args = argparse.Namespace(
        image=str(tmp_path / "image.zarr"), axes="CYX", level=0, sample=0, channel=1
    )
    image, name = _load_demo_image(args)
    assert np.array_equal(image, planes[1].astype(np.float32))
    assert "channel 1 of 2" in name
    _write_ome(tmp_path / "volume.zarr", [planes], "zyx", 3)
    assert main(["demo", "--image", str(tmp_path / "volume.zarr")]) == 2
    assert "3D" in capsys.readouterr().err


def test_a_closed_pass_reads_no_more_chunks(tmp_path):
    import threading

    from gpu_patching.stores.reader import _StoppedError

    data = _data((1, 1, 32, 32), seed=18)
    stack = open_stack(_write(tmp_path / "a.zarr", data, (1, 1, 8, 8)))
    # memory="call": the pass below reads ahead on its thread whatever the budget.
    reader = ChunkReader([stack], cache_bytes=0, workers=1, memory="call")
    batch = _batch((8, 8), [0, 0], [(0, 0), (20, 20)])
    stop = threading.Event()
    stop.set()
    with pytest.raises(_StoppedError):
        reader._read((batch.data_idx, batch.sample_idx, batch.coords), (8, 8), stop)
    assert reader.chunks_read == 0
    # A pass closed after its first batch leaves the reader usable.
    rows = StratifiedPatching([data.shape], (8, 8), seed=3).sample_epoch(0).to_numpy()
    passes = reader.batches(rows, 2, read_ahead=3)
    next(passes)
    passes.close()
    patches, first = next(iter(reader.batches(rows, 2)))
    assert np.array_equal(patches, sliced_patches(data, first))


def test_the_store_package_imports_no_private_zarr_module():
    # zarr's public API is the top-level package and zarr.api, zarr.abc,
    # zarr.codecs, zarr.storage; zarr.core is zarr's internals.
    import ast
    from pathlib import Path

    import gpu_patching.stores

    package = Path(gpu_patching.stores.__file__).parent
    private = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            private += [
                f"{source.name}: {name}"
                for name in names
                if name.startswith("zarr.")
                and name.split(".")[1] not in ("api", "abc", "codecs", "storage")
            ]
    assert private == []
