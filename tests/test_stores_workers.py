"""TIFF stacks read in DataLoader worker processes give the in-memory patches.

A TIFF stack keeps its file open. Forked workers inherit that open file, and
with it one file position shared by every process: reads from several workers
then seek and read over each other and return wrong pixels (or undecodable
bytes) without an error. Spawned workers get the stack by pickling, which an
open file does not survive. Each process must read through its own handle.

Every TIFF is written by tifffile into ``tmp_path``, read through
:class:`gpu_patching.torch.PatchDataset` by a real ``DataLoader`` with two
workers, and compared with slicing the same array in memory.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
zarr = pytest.importorskip("zarr", minversion="3")
tifffile = pytest.importorskip("tifffile", minversion="2025.5.21")

from gpu_patching import StratifiedPatching, extract_patches  # noqa: E402
from gpu_patching.stores import StoreError, open_stack  # noqa: E402
from gpu_patching.torch import PatchDataset  # noqa: E402

#: Layouts of the TIFF: tiles or strips, compressed or not.
LAYOUTS = {
    "strips": {"rowsperstrip": 4},
    "strips-zlib": {"rowsperstrip": 4, "compression": "zlib"},
    "tiles": {"tile": (16, 16)},
    "tiles-zlib": {"tile": (16, 16), "compression": "zlib"},
}
PATCH_SIZE = (24, 24)


def _stack_data() -> np.ndarray:
    """Samples of 96x96 pixels, axes SCYX; every pixel differs from its neighbours."""
    return np.random.default_rng(7).integers(0, 60000, (6, 1, 96, 96), dtype=np.uint16)


def _write_tiff(path: Path, data: np.ndarray, layout: str) -> Path:
    tifffile.imwrite(path, data[:, 0], **LAYOUTS[layout])
    return path


def _loader_patches(
    stack: object, start_method: str, persistent: bool, n_passes: int = 1
) -> tuple[list[np.ndarray], StratifiedPatching]:
    """The patches of ``n_passes`` in-order passes of a two-worker DataLoader."""
    strategy = StratifiedPatching([_stack_data().shape], PATCH_SIZE, seed=5, backend="numpy")
    loader = torch.utils.data.DataLoader(
        PatchDataset(strategy, [stack]),
        batch_size=4,
        num_workers=2,
        multiprocessing_context=start_method,
        persistent_workers=persistent,
    )
    return [torch.cat(list(loader)).numpy() for _ in range(n_passes)], strategy


def _expected(strategy: StratifiedPatching, epoch: int) -> np.ndarray:
    # Pass k of an in-order loader is epoch k: the k-th call of index i is row i of epoch k.
    return extract_patches([_stack_data()], strategy.sample_epoch(epoch).to_numpy())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forked_workers_read_a_tiff_stack_like_the_array_in_memory(tmp_path, layout):
    stack = open_stack(_write_tiff(tmp_path / "stack.tif", _stack_data(), layout), axes="SYX")
    try:
        # The parent reads first, so that the workers inherit a used handle.
        assert np.array_equal(stack[0, 0], _stack_data()[0, 0])
        (patches,), strategy = _loader_patches(stack, "fork", persistent=False)
    finally:
        stack.close()
    assert np.array_equal(patches, _expected(strategy, 0))


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh workers", "persistent"])
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_read_a_tiff_stack_like_the_array_in_memory_on_every_pass(
    tmp_path, start_method, persistent
):
    path = _write_tiff(tmp_path / "stack.tif", _stack_data(), "tiles-zlib")
    stack = open_stack(path, axes="SYX")
    try:
        passes, strategy = _loader_patches(stack, start_method, persistent, n_passes=2)
    finally:
        stack.close()
    for epoch, patches in enumerate(passes):
        assert np.array_equal(patches, _expected(strategy, epoch))


def test_an_unpickled_tiff_stack_reads_through_a_handle_of_its_own(tmp_path):
    data = _stack_data()
    stack = open_stack(_write_tiff(tmp_path / "stack.tif", data, "strips"), axes="SYX")
    try:
        copy = pickle.loads(pickle.dumps(stack))
        try:
            assert (copy.shape, copy.dtype, copy.name) == (stack.shape, stack.dtype, stack.name)
            assert np.array_equal(copy[2, :, 10:40, 5:70], data[2, :, 10:40, 5:70])
            # Closing the copy leaves the original readable.
            copy.close()
            assert np.array_equal(stack[3, 0], data[3, 0])
        finally:
            copy.close()
    finally:
        stack.close()


def test_a_tiff_array_wrapped_without_its_path_is_refused_in_a_worker(tmp_path):
    from gpu_patching.stores import ChunkedStack

    data = _stack_data()
    with tifffile.TiffFile(_write_tiff(tmp_path / "stack.tif", data, "strips")) as tiff:
        array = zarr.open_array(store=tiff.aszarr(), mode="r")
        stack = ChunkedStack(array, "SYX")  # no path: it cannot open the file again
        assert np.array_equal(stack[0, 0], data[0, 0])
        # The worker's StoreError reaches the main process as a StoreError.
        with pytest.raises(StoreError, match="open_stack"):
            _loader_patches(stack, "fork", persistent=False)
