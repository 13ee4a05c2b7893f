"""The PyTorch glue: sampler, dataset, DataLoader workers and DLPack tensors.

Skipped without PyTorch. The DDP test (two processes) is ``test_ddp.py``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import numpy_sampler  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from gpu_patching import StratifiedPatching  # noqa: E402
from gpu_patching.torch import PatchDataset, PatchSampler, PatchTensors, to_tensors  # noqa: E402

SHAPES = [(2, 1, 40, 36), (3, 1, 30, 30)]
PATCH = (8, 6)


def coded_stacks() -> list[np.ndarray]:
    """Stacks whose every pixel encodes (stack, sample, channel, y, x)."""
    stacks = []
    for data_idx, shape in enumerate(SHAPES):
        s, c, y, x = np.indices(shape)
        stacks.append(((((data_idx * 10 + s) * 10 + c) * 1000 + y) * 1000 + x).astype(np.int64))
    return stacks


def decode(patch: Any) -> tuple[int, int, int, int]:
    """``(data_idx, sample_idx, y, x)`` of a patch's top-left pixel (channel 0)."""
    value = int(patch[0, 0, 0])
    x, value = value % 1000, value // 1000
    y, value = value % 1000, value // 1000
    value //= 10  # channel
    return value // 10, value % 10, y, x


def strategy() -> StratifiedPatching:
    sampler = numpy_sampler(SHAPES, PATCH, seed=2024)
    sampler.exclude_patches(0, 1, [(2, 2)])
    return sampler


def epoch_patches(loader: DataLoader, sampler: PatchSampler, epoch: int) -> list[Any]:
    """The decoded patches of one pass, in the sampler's order."""
    sampler.set_epoch(epoch)
    return [decode(patch) for batch in loader for patch in batch]


def expected_patches(strategy: StratifiedPatching, sampler: PatchSampler, epoch: int) -> list[Any]:
    """What one pass must yield: the epoch's rows of the sampler's indices."""
    batch = strategy.sample_epoch(epoch)
    rows = strategy.epoch_indices(epoch, **sampler._options())
    return [
        (int(batch.data_idx[i]), int(batch.sample_idx[i]), *map(int, batch.coords[i])) for i in rows
    ]


# -- the sampler -----------------------------------------------------------------------


def test_sampler_yields_this_ranks_indices_of_the_epoch() -> None:
    patching = strategy()
    sampler = PatchSampler(patching, num_replicas=3, rank=1, shuffle=True)
    sampler.set_epoch(4)
    expected = patching.sample_epoch(4, shuffle=True, rank=1, world_size=3).indices
    assert list(sampler) == expected.tolist()
    assert all(type(index) is int for index in sampler)


def test_sampler_length_is_the_shard_size() -> None:
    patching = strategy()
    for drop_last in (False, True):
        sampler = PatchSampler(patching, num_replicas=4, rank=3, drop_last=drop_last)
        n = patching.n_patches
        assert len(sampler) == len(list(sampler))
        assert len(sampler) == (n // 4 if drop_last else -(-n // 4))


@pytest.mark.parametrize("drop_last", [False, True])
def test_unshuffled_sampler_equals_torchs_distributed_sampler(drop_last: bool) -> None:
    patching = strategy()
    n = patching.n_patches
    for world_size in (1, 2, 3, 5, n + 2):
        for rank in range(world_size):
            ours = PatchSampler(
                patching, num_replicas=world_size, rank=rank, shuffle=False, drop_last=drop_last
            )
            theirs = DistributedSampler(
                range(n), num_replicas=world_size, rank=rank, shuffle=False, drop_last=drop_last
            )
            assert list(ours) == list(theirs), (world_size, rank)
            assert len(ours) == len(theirs)


def test_set_epoch_moves_the_order_and_the_strategy() -> None:
    patching = strategy()
    sampler = PatchSampler(patching)
    first = list(sampler)
    sampler.set_epoch(7)
    assert sampler.epoch == 7 and patching.epoch == 7
    assert list(sampler) != first
    assert sorted(list(sampler)) == sorted(first)


def test_a_pass_without_set_epoch_repeats_the_epoch() -> None:
    patching = strategy()
    sampler = PatchSampler(patching)
    loader = DataLoader(PatchDataset(patching, coded_stacks()), sampler=sampler, batch_size=8)
    sampler.set_epoch(2)
    first = [decode(patch) for batch in loader for patch in batch]
    again = [decode(patch) for batch in loader for patch in batch]
    assert first == again


@pytest.mark.parametrize(
    ("epoch", "error"), [(-1, ValueError), (2**32, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_set_epoch_refuses_a_bad_epoch(epoch: Any, error: type[Exception]) -> None:
    patching = strategy()
    sampler = PatchSampler(patching)
    sampler.set_epoch(3)
    with pytest.raises(error):
        sampler.set_epoch(epoch)
    assert sampler.epoch == 3 and patching.epoch == 3


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"num_replicas": 2, "rank": 2}, ValueError),
        ({"num_replicas": 0, "rank": 0}, ValueError),
        ({"num_replicas": 2, "rank": -1}, ValueError),
        ({"num_replicas": 2.0, "rank": 0}, TypeError),
        ({"num_replicas": 2, "rank": "1"}, TypeError),
        ({"num_replicas": 2**64, "rank": 2**63 + 1}, ValueError),
        ({"num_replicas": 2, "rank": 2**63 + 1}, ValueError),
        ({"num_replicas": 2, "rank": 0, "shuffle": "yes"}, TypeError),
        ({"num_replicas": 2, "rank": 0, "drop_last": 1}, TypeError),
    ],
)
def test_sampler_refuses_a_bad_rank_or_world_size(
    arguments: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        PatchSampler(strategy(), **arguments)


def test_sampler_is_one_process_without_torch_distributed() -> None:
    assert not torch.distributed.is_initialized()
    sampler = PatchSampler(strategy())
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


# -- the dataset -----------------------------------------------------------------------


def test_dataset_item_is_the_patch_that_get_patch_spec_names() -> None:
    patching = strategy()
    twin = strategy()
    dataset = PatchDataset(patching, coded_stacks())
    assert len(dataset) == patching.n_patches
    for index in (0, 5, patching.n_patches - 1, 5):
        spec = twin.get_patch_spec(index)
        patch = dataset[index]
        assert isinstance(patch, torch.Tensor) and patch.shape == (1, *PATCH)
        assert decode(patch) == (spec["data_idx"], spec["sample_idx"], *spec["coords"])


def test_dataset_applies_the_transform() -> None:
    dataset = PatchDataset(strategy(), coded_stacks(), transform=lambda patch: patch.shape)
    assert dataset[0] == (1, *PATCH)


def test_dataset_refuses_stacks_of_other_shapes() -> None:
    stacks = coded_stacks()
    with pytest.raises(ValueError, match="the stacks have shapes"):
        PatchDataset(strategy(), [stacks[0]])
    with pytest.raises(ValueError, match="the stacks have shapes"):
        PatchDataset(strategy(), [stacks[0][:, :, :-1], stacks[1]])


def test_dataset_pickles_with_its_strategy() -> None:
    # DataLoader workers started with spawn or forkserver get a pickled copy.
    patching = strategy()
    patching.set_epoch(5)
    dataset = PatchDataset(patching, coded_stacks())
    copy = pickle.loads(pickle.dumps(dataset))
    for index in (0, 3, 3):
        assert decode(copy[index]) == decode(dataset[index])


# -- DataLoader workers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_passes() -> dict[int, list[Any]]:
    """Three epochs through a DataLoader with two non-persistent worker processes."""
    patching = strategy()
    sampler = PatchSampler(patching, shuffle=True)
    loader = DataLoader(
        PatchDataset(patching, coded_stacks()),
        sampler=sampler,
        batch_size=16,
        num_workers=2,
        persistent_workers=False,
    )
    return {epoch: epoch_patches(loader, sampler, epoch) for epoch in range(3)}


def test_workers_draw_different_patches_every_epoch(worker_passes: dict[int, list[Any]]) -> None:
    by_index = []
    patching = strategy()
    for epoch, patches in worker_passes.items():
        indices = patching.epoch_indices(epoch, shuffle=True)
        by_index.append(dict(zip(indices.tolist(), patches, strict=True)))
    for earlier, later in ((0, 1), (1, 2), (0, 2)):
        moved = sum(by_index[earlier][i] != by_index[later][i] for i in by_index[earlier])
        assert moved > len(by_index[earlier]) // 2, (earlier, later)


def test_workers_draw_the_patches_of_the_epoch(worker_passes: dict[int, list[Any]]) -> None:
    patching = strategy()
    sampler = PatchSampler(patching, shuffle=True)
    for epoch, patches in worker_passes.items():
        sampler.set_epoch(epoch)
        assert patches == expected_patches(patching, sampler, epoch)


def test_workers_and_the_main_process_draw_the_same_patches(
    worker_passes: dict[int, list[Any]],
) -> None:
    patching = strategy()
    sampler = PatchSampler(patching, shuffle=True)
    loader = DataLoader(
        PatchDataset(patching, coded_stacks()), sampler=sampler, batch_size=16, num_workers=0
    )
    for epoch, patches in worker_passes.items():
        assert epoch_patches(loader, sampler, epoch) == patches


def test_spawned_workers_draw_the_patches_of_the_epoch() -> None:
    # spawn pickles the dataset (and strategy) for each worker, every epoch.
    patching = strategy()
    sampler = PatchSampler(patching, shuffle=True, num_replicas=2, rank=1)
    loader = DataLoader(
        PatchDataset(patching, coded_stacks()),
        sampler=sampler,
        batch_size=32,
        num_workers=1,
        persistent_workers=False,
        multiprocessing_context="spawn",
    )
    for epoch in (3, 4):
        assert epoch_patches(loader, sampler, epoch) == expected_patches(patching, sampler, epoch)


# -- batches as tensors ----------------------------------------------------------------


def test_to_tensors_shares_memory_with_a_numpy_batch() -> None:
    batch = strategy().sample_epoch(1, shuffle=True)
    tensors = to_tensors(batch)
    assert isinstance(tensors, PatchTensors)
    for name in ("data_idx", "sample_idx", "coords", "indices"):
        array, tensor = getattr(batch, name), getattr(tensors, name)
        assert tensor.dtype == torch.int64 and tuple(tensor.shape) == array.shape, name
        assert tensor.data_ptr() == array.ctypes.data, f"{name} was copied"
        np.testing.assert_array_equal(tensor.numpy(), array)


def test_to_tensors_of_a_batch_slice() -> None:
    batch = strategy().sample_epoch(1)[::3]
    tensors = to_tensors(batch)
    np.testing.assert_array_equal(tensors.coords.numpy(), batch.coords)


def test_the_core_never_imports_torch() -> None:
    code = (
        "import sys, gpu_patching, gpu_patching.strategy, gpu_patching.permutation, "
        "gpu_patching.backends.numpy_backend, gpu_patching.backends.cuda_backend; "
        "s = gpu_patching.StratifiedPatching([(1, 1, 32, 32)], (8, 8), seed=1, backend='numpy'); "
        "s.sample_epoch(0, shuffle=True, world_size=2); s.state_dict(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- arguments of the wrong kind are TypeErrors that name them ----------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: PatchSampler("x"), "strategy must be a StratifiedPatching, got str"),
        (lambda: PatchDataset("x", coded_stacks()), "strategy must be a StratifiedPatching"),
        (lambda: PatchDataset(strategy(), [1, 2]), r"stacks\[0\] must be an array.*got 1 \(int\)"),
        (lambda: PatchDataset(strategy(), "ab"), "stacks must be a sequence of arrays, got str"),
        (
            lambda: PatchDataset(strategy(), coded_stacks(), transform=3),
            "transform must be callable",
        ),
        (lambda: to_tensors({"data_idx": 1}), "batch must be a PatchBatch.*got dict"),
        (lambda: to_tensors(None), "batch must be a PatchBatch.*got NoneType"),
    ],
)
def test_arguments_of_the_wrong_kind_are_type_errors_naming_them(call: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call()


def test_set_epoch_takes_a_0d_integer_tensor() -> None:
    patching = strategy()
    sampler = PatchSampler(patching)
    sampler.set_epoch(torch.tensor(5))
    assert sampler.epoch == 5 and patching.epoch == 5
    assert list(sampler) == patching.epoch_indices(5, shuffle=True).tolist()


def test_dataset_items_may_be_0d_integer_tensors() -> None:
    stacks = coded_stacks()
    dataset = PatchDataset(strategy(), stacks)
    twin = PatchDataset(strategy(), stacks)
    for index in (0, 3, 3, 7):
        assert torch.equal(dataset[torch.tensor(index)], twin[index])


# -- items never alias the user's stacks (issue 19, item 3) ---------------------------


def zero_in_place(patch: torch.Tensor) -> torch.Tensor:
    """An in-place transform, as augmentations often are."""
    return patch.mul_(0)


@pytest.mark.parametrize(
    ("shape", "patch"),
    [
        ((2, 1, 16, 12), (16, 12)),  # the patch is the whole image
        ((2, 1, 40, 12), (8, 12)),  # the patch spans whole rows
        ((2, 1, 6, 16, 12), (2, 16, 12)),  # 3D: whole slices
    ],
)
def test_an_in_place_transform_never_changes_the_stack(
    shape: tuple[int, ...], patch: tuple[int, ...]
) -> None:
    stack = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    original = stack.copy()
    dataset = PatchDataset(numpy_sampler([shape], patch, seed=3), [stack], transform=zero_in_place)
    loader = DataLoader(dataset, batch_size=4, num_workers=0)
    batches = list(loader)
    assert all(bool((batch == 0).all()) for batch in batches)
    np.testing.assert_array_equal(stack, original)


def test_an_item_of_a_whole_image_patch_is_a_copy() -> None:
    stack = np.ones((1, 1, 16, 12), dtype=np.float32)
    item = PatchDataset(numpy_sampler([stack.shape], (16, 12)), [stack])[0]
    assert not np.shares_memory(item.numpy(), stack)


def test_an_in_place_transform_of_a_read_only_array_gives_a_writable_copy() -> None:
    stack = np.arange(2 * 16 * 12, dtype=np.float32).reshape(2, 1, 16, 12) + 1
    stack.flags.writeable = False
    original = stack.copy()
    dataset = PatchDataset(numpy_sampler([stack.shape], (16, 12)), [stack], transform=zero_in_place)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        items = [dataset[index] for index in range(len(dataset))]
    assert all(bool((item == 0).all()) for item in items)
    np.testing.assert_array_equal(stack, original)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_in_place_transform_of_a_read_only_memmap_does_not_crash(
    tmp_path: Any, num_workers: int
) -> None:
    # A memmap opened with mode "r" is mapped read-only: a write into it is a
    # segmentation fault, so the check runs in a child process.
    path = tmp_path / "stack.npy"
    stack = (np.arange(2 * 16 * 12) % 200).astype(np.uint8).reshape(2, 1, 16, 12)
    np.save(path, stack)
    code = f"""
import numpy as np
from torch.utils.data import DataLoader
from gpu_patching import StratifiedPatching
from gpu_patching.torch import PatchDataset

stack = np.load({str(path)!r}, mmap_mode="r")
strategy = StratifiedPatching([stack.shape], (16, 12), seed=0, backend="numpy")
dataset = PatchDataset(strategy, [stack], transform=lambda patch: patch.add_(1))
loader = DataLoader(dataset, batch_size=2, num_workers={num_workers})
batches = [batch for batch in loader]
assert sum(len(batch) for batch in batches) == strategy.n_patches
assert all(int(batch.min()) >= 1 for batch in batches)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(path), stack)


# -- big-endian stacks are read correctly (issue 19, item 8) ------------------------


@pytest.mark.parametrize("dtype", [">u2", ">f4", ">i8"])
def test_a_big_endian_stack_gives_the_same_items_as_a_native_one(dtype: str) -> None:
    native = [stack.astype(np.dtype(dtype).newbyteorder("=")) for stack in coded_stacks()]
    if np.dtype(dtype).itemsize < 8:
        native = [stack % 60000 for stack in native]
    swapped = [stack.astype(dtype) for stack in native]
    items = PatchDataset(strategy(), swapped)
    expected = PatchDataset(strategy(), native)
    for index in (0, 5, 5, 17):
        item, want = items[index], expected[index]
        assert item.dtype == want.dtype and torch.equal(item, want)


def test_the_dataset_takes_stacks_smaller_than_the_patch_beside_normal_ones() -> None:
    shapes = [(1, 1, 5, 40), (2, 1, 40, 36)]
    with pytest.warns(UserWarning, match="data_idx 0"):
        patching = numpy_sampler(shapes, PATCH, seed=4)
    stacks = [np.full(shape, k, dtype=np.float32) for k, shape in enumerate(shapes)]
    loader = DataLoader(PatchDataset(patching, stacks), batch_size=16, num_workers=0)
    batches = list(loader)
    assert sum(len(batch) for batch in batches) == patching.n_patches
    assert all(bool((batch == 1).all()) for batch in batches)  # never the small stack
