"""The CUDA backend on a real device (skipped cleanly without CuPy or a GPU).

The GPU kernel must return exactly what the NumPy backend returns (all four
columns: data_idx, sample_idx, coords, indices), in one launch per epoch and
no other kernel, from tables that stay on the device.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.backends.numpy_backend import NumpyBackend
from gpu_patching.permutation import EpochOrder
from gpu_patching.tables import RegionTables
from gpu_patching.testing import usable_cupy

cupy, _WHY_SKIPPED = usable_cupy()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(cupy is None, reason=_WHY_SKIPPED)]

SEEDS = (0, 42, 2**64 - 1)
DRAWS = (0, 1, 2**32 - 1)


def _configured_sampler(name: str) -> StratifiedPatching:
    """A NumPy sampler with exclusions and probabilities, for each named case."""
    generator = np.random.default_rng(len(name))
    if name == "2d":
        sampler = StratifiedPatching(
            [(3, 1, 97, 64), (2, 2, 40, 50)], (8, 6), seed=7, backend="numpy"
        )
    elif name == "3d":
        sampler = StratifiedPatching(
            [(2, 1, 20, 33, 31), (1, 1, 9, 9, 9)], (4, 5, 3), seed=7, backend="numpy"
        )
    elif name == "large":
        return StratifiedPatching([(4, 1, 1024, 1024)], (4, 4), seed=7, backend="numpy")
    else:
        raise ValueError(name)
    tables = sampler._tables
    for flat in range(tables.n_samples):
        data_idx = int(tables.stack_of_sample[flat])
        sample_idx = int(tables.sample_in_stack[flat])
        cells = list(itertools.product(*map(range, tables.sample_grid(flat))))
        if flat == 1:  # one sample loses every cell
            sampler.exclude_patches(data_idx, sample_idx, cells)
            continue
        picks = generator.choice(len(cells), size=len(cells) // 5, replace=False)
        sampler.exclude_patches(data_idx, sample_idx, [cells[k] for k in picks])
        values = generator.choice([0.0, 1e-9, 0.25, 1.0, 3.5, 40.0], size=len(cells))
        sampler.set_region_probs(data_idx, sample_idx, dict(zip(cells, values, strict=True)))
    return sampler


def _device_tables(sampler: StratifiedPatching) -> RegionTables:
    """The sampler's tables rebuilt on the device from its exclusions and probabilities."""
    host = sampler._tables
    shapes = sampler.data_shapes
    tables = RegionTables(
        [shape[2:] for shape in shapes],
        [shape[0] for shape in shapes],
        sampler.patch_size,
        cupy,
    )
    for flat in range(host.n_samples):
        tables.update_sample(
            flat,
            cupy.asarray(host.excluded_grid(flat)),
            cupy.asarray(host.probability_grid(flat)),
        )
    return tables


def _backend() -> Any:
    from gpu_patching.backends.cuda_backend import CudaBackend

    return CudaBackend()


COLUMNS = ("data_idx", "sample_idx", "coords", "indices")


def _assert_same_draws(expected: tuple[np.ndarray, ...], actual: tuple[Any, ...]) -> None:
    """A device draw equals a NumPy draw in all four columns, dtypes and shapes."""
    assert len(actual) == len(expected) == len(COLUMNS)
    for name, want, got in zip(COLUMNS, expected, actual, strict=True):
        assert isinstance(got, cupy.ndarray), name
        assert got.dtype == cupy.int64 and got.shape == want.shape, name
        np.testing.assert_array_equal(cupy.asnumpy(got), want, err_msg=name)


def _record_launches(backend: Any) -> list[tuple[Any, ...]]:
    """Make ``backend`` record the argument tuple of each launch of its kernel."""
    functions = backend._functions
    launched: list[tuple[Any, ...]] = []

    def recording(kernel: Any, device_id: int) -> Any:
        function = functions(kernel, device_id)

        def launch(grid: tuple[int], block: tuple[int], args: tuple[Any, ...]) -> None:
            launched.append(args)
            function(grid, block, args)

        return launch

    backend._functions = recording
    return launched


def _allocation_counter(sizes: list[int]) -> Any:
    """A CuPy memory hook that records the size of every memory-pool allocation."""

    # Through Any: `cupy` is a module variable (None without CuPy) to mypy.
    hook_base: Any = cupy.cuda.MemoryHook

    class AllocationCounter(hook_base):  # type: ignore[misc]
        name = "AllocationCounter"

        def malloc_preprocess(self, **kwargs: Any) -> None:
            sizes.append(int(kwargs["size"]))

    return AllocationCounter()


@pytest.fixture(scope="module", params=["2d", "3d", "large"])
def case(request: pytest.FixtureRequest) -> tuple[StratifiedPatching, RegionTables]:
    sampler = _configured_sampler(request.param)
    return sampler, _device_tables(sampler)


def test_device_tables_equal_host_tables(case: Any) -> None:
    sampler, tables = case
    host = sampler._tables
    for name in ("mass_prefix", "weight", "subbox_mask"):
        np.testing.assert_array_equal(cupy.asnumpy(getattr(tables, name)), getattr(host, name))
    np.testing.assert_array_equal(tables.patch_offset, host.patch_offset)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("draw", DRAWS)
def test_gpu_draw_equals_numpy_draw_bit_for_bit(case: Any, seed: int, draw: int) -> None:
    sampler, tables = case
    n = tables.total_patches
    expected = NumpyBackend().draw(sampler._tables, range(n), draw, seed)
    _assert_same_draws(expected, _backend().draw(tables, range(n), draw, seed))


def test_gpu_draw_equals_numpy_draw_for_an_index_array(case: Any) -> None:
    sampler, tables = case
    n = tables.total_patches
    indices = np.random.default_rng(3).integers(0, n, size=5000)
    expected = NumpyBackend().draw(sampler._tables, indices, 12, 99)
    device_indices = cupy.asarray(indices)
    actual = _backend().draw(tables, device_indices, 12, 99)
    _assert_same_draws(expected, actual)
    assert actual[3] is not device_indices, "the index column is the kernel's copy"
    # A host index array is uploaded and gives the same rows.
    _assert_same_draws(expected, _backend().draw(tables, indices, 12, 99))


def test_gpu_writes_minus_one_for_indices_out_of_range(case: Any) -> None:
    _, tables = case
    n = tables.total_patches
    indices = cupy.asarray([-1, n, 2**63 - 1, 0], dtype=cupy.int64)
    actual = [cupy.asnumpy(column) for column in _backend().draw(tables, indices, 0, 0)]
    for name, column in zip(COLUMNS, actual, strict=True):
        assert (column[:3] == -1).all(), name
        assert (column[3:] >= 0).all(), name
    assert actual[3][3] == 0


def test_one_kernel_launch_per_epoch(case: Any) -> None:
    _, tables = case
    backend = _backend()
    for draw in range(3):
        backend.draw(tables, range(tables.total_patches), draw, 5)
        assert backend.launch_count == draw + 1


def test_tables_and_outputs_live_on_the_device(case: Any) -> None:
    _, tables = case
    for name in ("mass_prefix", "weight", "subbox_mask", "excluded", "probability"):
        assert isinstance(getattr(tables, name), cupy.ndarray), name
    backend = _backend()
    result = backend.draw(tables, range(tables.total_patches), 0, 1)
    assert len(result) == 4
    assert all(isinstance(column, cupy.ndarray) for column in result)
    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    assert isinstance(backend._uploads._entries[key][1], cupy.ndarray)


def test_kernel_is_compiled_once_per_device(case: Any) -> None:
    from gpu_patching import cuda
    from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH

    _, tables = case
    _backend().draw(tables, range(1), 0, 1)
    device_id = cupy.cuda.Device().id
    module = cuda.compiled_module(SAMPLE_EPOCH.file, cupy, device_id)
    _backend().draw(tables, range(1), 1, 1)
    assert cuda.compiled_module(SAMPLE_EPOCH.file, cupy, device_id) is module


def _cuda_twin(host: StratifiedPatching) -> StratifiedPatching:
    """A sampler with backend="cuda" configured like ``host``, through the public API."""
    device = StratifiedPatching(host.data_shapes, host.patch_size, seed=host.seed, backend="cuda")
    for flat in range(host._tables.n_samples):
        data_idx = int(host._tables.stack_of_sample[flat])
        sample_idx = int(host._tables.sample_in_stack[flat])
        device.set_region_probs(data_idx, sample_idx, host._tables.probability_grid(flat))
        excluded = host._tables.excluded_grid(flat)
        if excluded.any():
            device.exclude_patches(data_idx, sample_idx, excluded)
    assert device.backend == "cuda" and device.n_patches == host.n_patches
    return device


def test_sampler_on_cuda_matches_sampler_on_numpy() -> None:
    host = _configured_sampler("2d")
    device = _cuda_twin(host)
    backend: Any = device._backend
    launches = backend.launch_count
    batch = device.sample_epoch(3)
    assert backend.launch_count == launches + 1
    expected = host.sample_epoch(3).to_numpy()
    actual = batch.to_numpy()
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), name)
    for index in (0, host.n_patches // 2, host.n_patches - 1):
        assert device.get_patch_spec(index) == host.get_patch_spec(index)


EPOCH_OPTIONS = [
    {},
    {"shuffle": True},
    {"shuffle": True, "rank": 1, "world_size": 4},
    {"rank": 2, "world_size": 3, "drop_last": True},
]


@pytest.mark.parametrize("options", EPOCH_OPTIONS)
def test_sample_epoch_is_one_kernel_launch_and_no_other_kernel(options: dict[str, Any]) -> None:
    from gpu_patching.backends.cuda_backend import OUTPUT_PARAMS
    from gpu_patching.kernels.descriptor import NULL_POINTER
    from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH

    host = _configured_sampler("3d")
    device = _cuda_twin(host)
    backend: Any = device._backend
    launched = _record_launches(backend)
    device.sample_epoch(0, **options)  # compiles the kernel and uploads the per-sample arrays
    launched.clear()
    launches = backend.launch_count
    sizes: list[int] = []
    # A fresh pool makes every allocation go through the hook, whatever
    # allocator the process had set; it stays referenced while the batch is used.
    pool = cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc), _allocation_counter(sizes):
        batch = device.sample_epoch(1, **options)
    n, d = len(batch), len(device.patch_size)
    # Exactly one launch of our kernel, over the epoch as an order: no index
    # array was made for it, shuffled and sharded or not.
    assert backend.launch_count == launches + 1 and len(launched) == 1
    values = dict(zip((name for name, _ in SAMPLE_EPOCH.params), launched[0], strict=True))
    assert values["indices"] is NULL_POINTER and int(values["n_rows"]) == n
    assert int(values["shuffle"]) == int(options.get("shuffle", False))
    # The batch holds the very arrays the kernel wrote: no gather, no copy.
    for column, name in zip(COLUMNS, OUTPUT_PARAMS, strict=True):
        assert getattr(batch, column) is values[name], column
    # Any other CuPy kernel that made an array (arange, a gather, a conversion)
    # would have allocated it: the only allocations are the four outputs.
    assert sorted(sizes) == sorted([8 * n, 8 * n, 8 * n * d, 8 * n])
    expected = host.sample_epoch(1, **options).to_numpy()
    for column in COLUMNS:
        np.testing.assert_array_equal(
            cupy.asnumpy(getattr(batch, column)), getattr(expected, column), column
        )


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 3])
def test_gpu_shuffled_shards_equal_numpy_bit_for_bit(
    case: Any, world_size: int, drop_last: bool
) -> None:
    sampler, tables = case
    for rank in range(world_size):
        order = EpochOrder.shard(
            tables.total_patches,
            shuffle=True,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        for seed, draw in ((0, 0), (2**64 - 1, 2**32 - 1)):
            expected = NumpyBackend().draw(sampler._tables, order, draw, seed)
            _assert_same_draws(expected, _backend().draw(tables, order, draw, seed))


def test_state_moves_between_backends() -> None:
    host = _configured_sampler("2d")
    host.set_epoch(4)
    for index in (0, 1, 1, 5):
        host.get_patch_spec(index)
    device = StratifiedPatching(host.data_shapes, host.patch_size, backend="cuda")
    device.load_state_dict(host.state_dict())
    assert device.backend == "cuda" and device.state_dict() == host.state_dict()
    for index in (1, 1, 0, 7):
        assert device.get_patch_spec(index) == host.get_patch_spec(index)
    back = StratifiedPatching(host.data_shapes, host.patch_size, backend="numpy")
    back.load_state_dict(device.state_dict())
    assert back.state_dict() == device.state_dict()


def test_shuffled_shard_reaches_torch_through_dlpack_without_a_copy() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA support here")
    from gpu_patching.torch import to_tensors

    device = _cuda_twin(_configured_sampler("2d"))
    batch = device.sample_epoch(2, shuffle=True, rank=0, world_size=2)
    tensors = to_tensors(batch)
    for name in COLUMNS:
        tensor, array = getattr(tensors, name), getattr(batch, name)
        assert tensor.is_cuda and tensor.data_ptr() == array.data.ptr, name


def test_epoch_reaches_torch_through_dlpack_without_a_copy(case: Any) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA support here")
    sampler, tables = case
    corner = _backend().draw(tables, range(tables.total_patches), 4, 4)[2]
    tensor = torch.from_dlpack(corner)
    assert tensor.is_cuda and tensor.dtype == torch.int64
    assert tensor.data_ptr() == corner.data.ptr
    expected = NumpyBackend().draw(sampler._tables, range(tables.total_patches), 4, 4)
    np.testing.assert_array_equal(tensor.cpu().numpy(), expected[2])
