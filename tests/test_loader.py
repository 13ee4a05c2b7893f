"""PatchLoader: an epoch's batches, cropped, in the shuffled epoch's order."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from gpu_patching import PatchLoader, StratifiedPatching

SHAPES = [(2, 2, 90, 70), (1, 2, 64, 120)]
PATCH = (16, 16)


def make_stacks(shapes=SHAPES, dtype=np.float32):
    rng = np.random.default_rng(3)
    return [rng.random(shape).astype(dtype) for shape in shapes]


def make_strategy(shapes=SHAPES, patch=PATCH, seed=11):
    return StratifiedPatching(shapes, patch, seed=seed, backend="numpy")


def slice_patch(stacks, d, s, corner, patch):
    window = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
    return stacks[d][(s, slice(None), *window)]


@pytest.mark.parametrize(
    ("rank", "world_size", "drop_last"), [(0, 1, False), (1, 3, False), (2, 3, True)]
)
def test_concatenated_batches_are_the_shuffled_epoch_of_this_rank(rank, world_size, drop_last):
    stacks, strategy = make_stacks(), make_strategy()
    loader = PatchLoader(
        stacks, strategy, 10, rank=rank, world_size=world_size, drop_last=drop_last
    )
    loader.set_epoch(4)
    batches = [batch for _, batch in loader]
    epoch = strategy.sample_epoch(
        4, shuffle=True, rank=rank, world_size=world_size, drop_last=drop_last
    )
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), epoch.indices)
    np.testing.assert_array_equal(np.concatenate([b.coords for b in batches]), epoch.coords)
    assert len(batches) == len(loader)


def test_every_patch_equals_plain_slicing_of_its_row():
    stacks, strategy = make_stacks(), make_strategy()
    for patches, batch in PatchLoader(stacks, strategy, 9):
        assert patches.shape == (len(batch), 2, *PATCH)
        for k in range(len(batch)):
            expected = slice_patch(
                stacks, batch.data_idx[k], batch.sample_idx[k], batch.coords[k], PATCH
            )
            np.testing.assert_array_equal(patches[k], expected)


def test_batches_have_batch_size_rows_except_possibly_the_last():
    stacks, strategy = make_stacks(), make_strategy()
    loader = PatchLoader(stacks, strategy, 8, shuffle=False)
    sizes = [len(batch) for _, batch in loader]
    assert sizes[:-1] == [8] * (len(sizes) - 1)
    assert 1 <= sizes[-1] <= 8
    assert sum(sizes) == strategy.n_patches
    assert len(loader) == -(-strategy.n_patches // 8)


def test_unshuffled_loader_walks_the_indices_in_order():
    stacks, strategy = make_stacks(), make_strategy()
    indices = np.concatenate(
        [b.indices for _, b in PatchLoader(stacks, strategy, 5, shuffle=False)]
    )
    np.testing.assert_array_equal(indices, np.arange(strategy.n_patches))


def test_set_epoch_changes_the_patches_and_a_pass_without_it_repeats_them():
    stacks, strategy = make_stacks(), make_strategy()
    loader = PatchLoader(stacks, strategy, 64)

    def corners():
        return np.concatenate([batch.coords for _, batch in loader])

    first, again = corners(), corners()
    loader.set_epoch(1)
    second = corners()
    np.testing.assert_array_equal(first, again)
    assert loader.epoch == 1
    assert not np.array_equal(first, second)


def test_loader_keeps_the_stacks_dtype():
    stacks = make_stacks(dtype=np.uint16)
    patches, _ = next(iter(PatchLoader(stacks, make_strategy(), 4)))
    assert patches.dtype == np.uint16


def test_as_torch_yields_tensors_sharing_memory_with_the_crop():
    torch = pytest.importorskip("torch")
    stacks, strategy = make_stacks(), make_strategy()
    patches, batch = next(iter(PatchLoader(stacks, strategy, 6, as_torch=True)))
    assert isinstance(patches, torch.Tensor)
    assert tuple(patches.shape) == (6, 2, *PATCH)
    expected = slice_patch(stacks, batch.data_idx[0], batch.sample_idx[0], batch.coords[0], PATCH)
    np.testing.assert_array_equal(patches[0].numpy(), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"rank": 3, "world_size": 3}, ValueError, "rank"),
        ({"world_size": 0}, ValueError, "world_size"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
        ({"rank": 2**63 + 1, "world_size": 2**64}, ValueError, "world_size"),
        ({"as_torch": "yes"}, TypeError, "as_torch must be a bool, got 'yes'"),
        ({"stream": "default"}, TypeError, "stream must be a cupy.cuda.Stream or None"),
    ],
)
def test_bad_arguments_are_rejected_when_the_loader_is_built(kwargs, error, message):
    arguments = {"batch_size": 4, **kwargs}
    batch_size = arguments.pop("batch_size")
    with pytest.raises(error, match=message):
        PatchLoader(make_stacks(), make_strategy(), batch_size, **arguments)


def test_stacks_must_have_the_strategys_shapes():
    stacks = make_stacks()
    stacks[1] = stacks[1][:, :, :60]
    with pytest.raises(ValueError, match="differ from the strategy's data_shapes"):
        PatchLoader(stacks, make_strategy(), 4)


def test_strategy_must_be_a_stratified_patching():
    with pytest.raises(TypeError, match="StratifiedPatching"):
        PatchLoader(make_stacks(), object(), 4)


@pytest.mark.cuda
def test_device_stacks_give_the_same_batches_as_host_stacks():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as error:  # no driver
        pytest.skip(f"no usable CUDA device ({error})")
    stacks, strategy = make_stacks(), make_strategy()
    device_stacks = [cupy.asarray(stack) for stack in stacks]
    host = list(PatchLoader(stacks, strategy, 16))
    device = list(PatchLoader(device_stacks, strategy, 16))
    assert len(host) == len(device)
    for (host_patches, host_batch), (device_patches, device_batch) in zip(
        host, device, strict=True
    ):
        np.testing.assert_array_equal(host_batch.indices, cupy.asnumpy(device_batch.indices))
        np.testing.assert_array_equal(host_patches, cupy.asnumpy(device_patches))


def test_as_torch_refuses_unsigned_stacks_this_torch_cannot_hold(monkeypatch):
    torch = pytest.importorskip("torch")
    stacks = [stack.astype(np.uint16) for stack in make_stacks()]
    monkeypatch.delattr(torch, "uint16", raising=False)  # as PyTorch < 2.3
    with pytest.raises(TypeError, match=r"no uint16 tensors.*PyTorch 2\.3"):
        PatchLoader(stacks, make_strategy(), 4, as_torch=True)
    # float stacks, and uint16 without as_torch, are fine
    PatchLoader(make_stacks(), make_strategy(), 4, as_torch=True)
    PatchLoader(stacks, make_strategy(), 4)


def test_stacks_of_mixed_dtypes_are_refused_when_the_loader_is_built():
    stacks = make_stacks()
    stacks[1] = stacks[1].astype(np.uint16)
    with pytest.raises(TypeError, match="stacks\\[0\\] is float32, stacks\\[1\\] is uint16"):
        PatchLoader(stacks, make_strategy(), 4)


def test_stacks_of_mixed_channel_counts_are_refused_when_the_loader_is_built():
    shapes = [(2, 2, 90, 70), (1, 3, 64, 120)]
    with pytest.raises(ValueError, match="same number of channels"):
        PatchLoader(make_stacks(shapes), make_strategy(shapes), 4)


def test_stacks_without_a_dtype_are_refused_when_the_loader_is_built():
    class ShapeOnly:
        shape = SHAPES[0]

    with pytest.raises(TypeError, match="stacks\\[0\\] \\(ShapeOnly\\) has no NumPy dtype"):
        PatchLoader([ShapeOnly(), make_stacks()[1]], make_strategy(), 4)


def test_as_torch_refuses_stacks_torch_cannot_hold_when_the_loader_is_built():
    pytest.importorskip("torch")
    stacks = [stack.astype("U1") for stack in make_stacks()]
    with pytest.raises(TypeError, match="<U1"):
        PatchLoader(stacks, make_strategy(), 4, as_torch=True)


def test_set_epoch_takes_numpy_integers_and_refuses_the_rest():
    loader = PatchLoader(make_stacks(), make_strategy(), 4)
    loader.set_epoch(np.uint32(7))
    assert loader.epoch == 7
    with pytest.raises(ValueError, match=f"epoch must be in \\[0, 2\\*\\*32\\), got {2**64}"):
        loader.set_epoch(2**64)
    with pytest.raises(TypeError, match=r"epoch must be an integer, got 1\.0"):
        loader.set_epoch(1.0)
    assert loader.epoch == 7


@pytest.mark.parametrize("dtype", [">u2", ">f4"])
def test_a_big_endian_stack_gives_native_batches(dtype):
    native = [(stack * 60000).astype(np.dtype(dtype).newbyteorder("=")) for stack in make_stacks()]
    swapped = [stack.astype(dtype) for stack in native]
    loader = PatchLoader(swapped, make_strategy(), 8)
    for (patches, _), (expected, _) in zip(
        loader, PatchLoader(native, make_strategy(), 8), strict=True
    ):
        assert patches.dtype == expected.dtype and patches.dtype.isnative
        np.testing.assert_array_equal(patches, expected)


@pytest.mark.parametrize("dtype", [">u2", ">f4"])
def test_a_big_endian_stack_gives_tensors_with_as_torch(dtype):
    torch = pytest.importorskip("torch")
    native = [(stack * 60000).astype(np.dtype(dtype).newbyteorder("=")) for stack in make_stacks()]
    swapped = [stack.astype(dtype) for stack in native]
    loader = PatchLoader(swapped, make_strategy(), 8, as_torch=True)
    for (patches, _), (expected, _) in zip(
        loader, PatchLoader(native, make_strategy(), 8), strict=True
    ):
        assert isinstance(patches, torch.Tensor)
        np.testing.assert_array_equal(patches.numpy(), expected)


@pytest.mark.parametrize(
    ("shape", "patch"), [((2, 1, 16, 12), (16, 12)), ((2, 1, 40, 12), (8, 12))]
)
def test_an_in_place_change_of_a_batch_never_changes_the_stack(shape, patch):
    # Patches as large as the image, or spanning whole rows, are contiguous
    # slices of the stack: the batch must still be a copy.
    torch = pytest.importorskip("torch")
    stack = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    original = stack.copy()
    strategy = make_strategy([shape], patch)
    for as_torch in (False, True):
        for patches, _ in PatchLoader([stack], strategy, 3, as_torch=as_torch):
            assert isinstance(patches, torch.Tensor) == as_torch
            patches *= 0
    np.testing.assert_array_equal(stack, original)


def test_a_read_only_memmap_gives_writable_batches(tmp_path):
    pytest.importorskip("torch")
    stack = np.arange(2 * 16 * 12, dtype=np.float32).reshape(2, 1, 16, 12)
    np.save(tmp_path / "stack.npy", stack)
    mapped = np.load(tmp_path / "stack.npy", mmap_mode="r")
    strategy = make_strategy([stack.shape], (16, 12))
    for patches, _ in PatchLoader([mapped], strategy, 2):
        assert patches.flags.writeable and not np.shares_memory(patches, mapped)
    for patches, _ in PatchLoader([mapped], strategy, 2, as_torch=True):
        assert not np.shares_memory(patches.numpy(), mapped)
        patches.add_(1)  # a write into the mapping itself would be a segmentation fault


def test_a_host_batch_the_consumer_dropped_is_the_buffer_of_a_later_batch():
    # A plain loop holds one batch while the next is cut: the one before is free.
    stacks, strategy = make_stacks(), make_strategy()
    first = None
    reused = []
    for patches, batch in PatchLoader(stacks, strategy, 4, shuffle=False):
        if first is None:
            first = weakref.ref(patches)
        else:
            reused.append(patches is first())
        expected = [slice_patch(stacks, *row, PATCH) for row in _rows(batch)]
        np.testing.assert_array_equal(patches, np.stack(expected))
    assert len(reused) >= 3 and any(reused)


def test_host_batches_the_consumer_keeps_are_never_overwritten():
    stacks, strategy = make_stacks(), make_strategy()
    kept = list(PatchLoader(stacks, strategy, 4, shuffle=False))
    assert len({id(patches) for patches, _ in kept}) == len(kept)
    for patches, batch in kept:
        expected = [slice_patch(stacks, *row, PATCH) for row in _rows(batch)]
        np.testing.assert_array_equal(patches, np.stack(expected))


def test_host_batches_held_as_views_or_tensors_are_never_overwritten():
    torch = pytest.importorskip("torch")
    stacks, strategy = make_stacks(), make_strategy()
    held = []
    for k, (patches, batch) in enumerate(PatchLoader(stacks, strategy, 4, shuffle=False)):
        # Only a view or a tensor of the batch is kept, never the array itself.
        held.append((patches[:1] if k % 2 else torch.from_numpy(patches), batch))
    for part, batch in held:
        expected = [slice_patch(stacks, *row, PATCH) for row in _rows(batch)][: len(part)]
        np.testing.assert_array_equal(np.asarray(part), np.stack(expected))


def _rows(batch):
    """``(data_idx, sample_idx, corner)`` of every row of a batch."""
    return zip(batch.data_idx, batch.sample_idx, batch.coords, strict=True)
