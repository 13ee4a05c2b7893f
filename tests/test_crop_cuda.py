"""extract_patches on a real device (skipped cleanly without CuPy or a GPU).

Device stacks must give exactly what host stacks give (bit for bit, every
supported dtype), from one crop launch per call, reading the stacks in place
(no copies, strided views included) and refusing bad input before any launch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpu_patching import PatchBatch, StratifiedPatching, extract_patches
from gpu_patching import crop as crop_module
from gpu_patching.kernels.crop_patches import crop_kernel
from gpu_patching.testing import usable_cupy

cupy, _WHY_SKIPPED = usable_cupy()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(cupy is None, reason=_WHY_SKIPPED)]

DTYPES = [np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.int64, np.bool_]


def _values(shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    """Random bit patterns of the dtype (NaNs and all), so any misplaced byte shows."""
    generator = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return generator.integers(0, 2, size=shape).astype(bool)
    raw = generator.integers(0, 256, size=(*shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _batch(
    shapes: list[tuple[int, ...]], patch: tuple[int, ...], n_rows: int, seed: int
) -> PatchBatch:
    """NumPy rows over every stack, corners at both edges of every axis often."""
    generator = np.random.default_rng(seed)
    data_idx = generator.integers(0, len(shapes), size=n_rows)
    sample_idx = np.empty(n_rows, dtype=np.int64)
    coords = np.empty((n_rows, len(patch)), dtype=np.int64)
    for row, d in enumerate(data_idx):
        sample_idx[row] = generator.integers(0, shapes[d][0])
        for axis, p in enumerate(patch):
            last = shapes[d][2 + axis] - p
            coords[row, axis] = generator.choice([0, last, generator.integers(0, last + 1)])
    return PatchBatch(data_idx, sample_idx, coords, np.arange(n_rows), patch)


def _on_device(batch: PatchBatch) -> PatchBatch:
    return PatchBatch(
        cupy.asarray(batch.data_idx),
        cupy.asarray(batch.sample_idx),
        cupy.asarray(batch.coords),
        cupy.asarray(batch.indices),
        batch.patch_size,
    )


def _assert_same_bits(device_result: Any, host_result: np.ndarray) -> None:
    assert isinstance(device_result, cupy.ndarray)
    assert device_result.flags.c_contiguous
    got = cupy.asnumpy(device_result)
    assert got.dtype == host_result.dtype and got.shape == host_result.shape
    np.testing.assert_array_equal(
        got.view(np.uint8), np.ascontiguousarray(host_result).view(np.uint8)
    )


def _cropper() -> Any:
    return crop_module.device_crop()


CASES = {
    "2d": ([(3, 1, 97, 64), (2, 1, 40, 300)], (16, 24)),
    "2d-channels": ([(2, 3, 50, 50), (1, 3, 20, 33)], (8, 8)),
    "3d": ([(2, 1, 20, 33, 31), (1, 1, 9, 70, 9)], (4, 5, 3)),
    "3d-channels": ([(1, 2, 12, 40, 40)], (3, 16, 40)),
    "wide": ([(1, 1, 5, 1000)], (2, 600)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_device_patches_equal_host_patches_bit_for_bit(case: str, dtype: Any) -> None:
    shapes, patch = CASES[case]
    host = [_values(shape, dtype, seed=k) for k, shape in enumerate(shapes)]
    device = [cupy.asarray(stack) for stack in host]
    batch = _batch(shapes, patch, 300, seed=len(case))
    expected = extract_patches(host, batch)
    _assert_same_bits(extract_patches(device, batch), expected)
    _assert_same_bits(extract_patches(device, _on_device(batch)), expected)


def test_strided_and_reversed_device_views_are_read_in_place() -> None:
    base = _values((4, 2, 60, 80), np.float32, seed=1)
    device_base = cupy.asarray(base)
    views = [
        (base[::2, :, 1::3, ::-2], device_base[::2, :, 1::3, ::-2]),
        (base[1:3, ::-1].transpose(0, 1, 3, 2), device_base[1:3, ::-1].transpose(0, 1, 3, 2)),
    ]
    host = [h for h, _ in views]
    device = [d for _, d in views]
    assert not any(d.flags.c_contiguous for d in device)
    batch = _batch([h.shape for h in host], (8, 7), 400, seed=2)
    _assert_same_bits(extract_patches(device, batch), extract_patches(host, batch))


def test_one_crop_launch_per_call_and_one_check_for_device_rows() -> None:
    shapes, patch = CASES["2d"]
    device = [cupy.asarray(_values(shape, np.float32, seed=k)) for k, shape in enumerate(shapes)]
    batch = _batch(shapes, patch, 64, seed=3)
    cropper = _cropper()
    launches, checks = cropper.launch_count, cropper.check_count
    extract_patches(device, batch)
    assert (cropper.launch_count - launches, cropper.check_count - checks) == (1, 0)
    extract_patches(device, _on_device(batch))
    assert (cropper.launch_count - launches, cropper.check_count - checks) == (2, 1)


def test_stacks_are_not_copied() -> None:
    # Every allocation during the call is far smaller than a stack: no copy.
    stack = cupy.asarray(_values((2, 1, 512, 512), np.float32, seed=4))
    view = stack[:, :, ::-1]
    batch = _batch([tuple(stack.shape)], (32, 32), 16, seed=5)
    sizes: list[int] = []
    hook_base: Any = cupy.cuda.MemoryHook

    class AllocationCounter(hook_base):  # type: ignore[misc]
        name = "AllocationCounter"

        def malloc_preprocess(self, **kwargs: Any) -> None:
            sizes.append(int(kwargs["size"]))

    extract_patches([view], batch)  # compile and warm the caches first
    # A fresh pool makes every allocation go through the hook, whatever
    # allocator the process had set.
    pool = cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc), AllocationCounter():
        result = extract_patches([view], _on_device(batch))
    _assert_same_bits(result, extract_patches([cupy.asnumpy(view)], batch))
    assert sizes and max(sizes) < stack.nbytes // 8


def test_out_is_filled_in_place_and_returned() -> None:
    shapes, patch = CASES["3d"]
    host = [_values(shape, np.uint16, seed=k) for k, shape in enumerate(shapes)]
    device = [cupy.asarray(stack) for stack in host]
    out = cupy.empty((50, 1, *patch), dtype=cupy.uint16)
    for seed in (6, 7):
        batch = _batch(shapes, patch, 50, seed=seed)
        assert extract_patches(device, batch, out=out) is out
        _assert_same_bits(out, extract_patches(host, batch))


def test_errors_are_raised_before_any_launch_and_leave_out_alone() -> None:
    shapes, patch = CASES["2d"]
    host = [_values(shape, np.float32, seed=k) for k, shape in enumerate(shapes)]
    device = [cupy.asarray(stack) for stack in host]
    batch = _batch(shapes, patch, 20, seed=8)
    bad_coords = batch.coords.copy()
    bad_coords[13] = (97 - 16 + 1, 0) if batch.data_idx[13] == 0 else (40 - 16 + 1, 0)
    bad = PatchBatch(batch.data_idx, batch.sample_idx, bad_coords, batch.indices, patch)
    out = cupy.full((20, 1, *patch), -1.0, dtype=cupy.float32)
    cropper = _cropper()
    launches = cropper.launch_count
    messages = []
    for rows in (bad, _on_device(bad)):
        with pytest.raises(ValueError, match=r"batch.coords\[13\]") as caught:
            extract_patches(device, rows, out=out)
        messages.append(str(caught.value))
    with pytest.raises(ValueError, match=r"batch.coords\[13\]") as caught:
        extract_patches(host, bad)
    messages.append(str(caught.value))
    assert len(set(messages)) == 1, "host and device rows give the same message"
    with pytest.raises(TypeError, match="dtype"):
        extract_patches(device, batch, out=cupy.empty((20, 1, *patch), dtype=cupy.float64))
    with pytest.raises(TypeError, match="device array"):
        extract_patches(device, batch, out=np.empty((20, 1, *patch), dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        extract_patches(device, batch, out=cupy.empty((20, 1, *patch, 2), np.float32)[..., 0])
    with pytest.raises(ValueError, match="shares memory"):
        inside = device[0].reshape(-1)[: 16 * 24].reshape(1, 1, 16, 24)
        extract_patches(device, batch[:1], out=inside)
    with pytest.raises(TypeError, match="not supported"):
        extract_patches([cupy.zeros((1, 1, 20, 30), dtype=cupy.complex128)], batch[:1])
    with pytest.raises(TypeError, match="same dtype"):
        extract_patches([device[0], device[1].astype(cupy.float64)], batch)
    assert cropper.launch_count == launches
    assert bool((out == -1).all())


def test_the_kernel_clamps_rows_that_skip_the_host_checks() -> None:
    # Straight to the kernel, bypassing validation: every read stays in its stack.
    stack = cupy.arange(2 * 1 * 10 * 12, dtype=cupy.int32).reshape(2, 1, 10, 12)
    rows = (
        cupy.asarray([-1, 5, 0, 1], dtype=cupy.int64),
        cupy.asarray([9, -2, 1, 0], dtype=cupy.int64),
        cupy.asarray(
            [[-5, 100], [2**62, -(2**62)], [6, 8], [2**63 - 1, 2**63 - 1]], dtype=cupy.int64
        ).reshape(-1),
    )
    table = cupy.asarray(
        crop_module.stack_table([stack.data.ptr], [stack.shape], [(120, 120, 12, 1)])
    )
    out = cupy.full((4, 1, 4, 4), -1, dtype=cupy.int32)
    args = crop_module.crop_launch_args(table, rows, 4, 1, (4, 4), out)
    launch = crop_module.crop_launch(4, 1, (4, 4))
    kernel = _cropper()._functions(crop_kernel(4), cupy.cuda.Device().id)
    kernel(launch.grid, launch.block, args)
    host = cupy.asnumpy(stack)
    got = cupy.asnumpy(out)
    np.testing.assert_array_equal(got[0, 0], host[1, 0, 0:4, 8:12])
    np.testing.assert_array_equal(got[1, 0], host[0, 0, 6:10, 0:4])
    np.testing.assert_array_equal(got[2, 0], host[1, 0, 6:10, 8:12])
    np.testing.assert_array_equal(got[3, 0], host[0, 0, 6:10, 8:12])


def test_a_cuda_sampler_epoch_is_cropped_on_the_device() -> None:
    shapes = [(3, 1, 128, 96), (1, 1, 70, 200)]
    sampler = StratifiedPatching(shapes, (32, 16), seed=9, backend="cuda")
    host = [_values(shape, np.float32, seed=k) for k, shape in enumerate(shapes)]
    batch = sampler.sample_epoch(0)
    assert isinstance(batch.coords, cupy.ndarray)
    _assert_same_bits(
        extract_patches([cupy.asarray(s) for s in host], batch), extract_patches(host, batch)
    )


def test_torch_cuda_tensors_are_read_and_written_through_dlpack_without_copies() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    host = _values((2, 2, 40, 50), np.float32, seed=10)
    tensor = torch.from_numpy(host).cuda()
    batch = _batch([host.shape], (8, 8), 100, seed=11)
    result = extract_patches([tensor], batch)
    _assert_same_bits(result, extract_patches([host], batch))
    # A strided tensor view and a tensor out.
    view = tensor[:, :, ::2].transpose(2, 3)
    out = torch.empty((100, 2, 8, 8), dtype=torch.float32, device="cuda")
    view_batch = _batch([tuple(view.shape)], (8, 8), 100, seed=12)
    assert extract_patches([view], view_batch, out=out) is out
    torch.cuda.synchronize()
    expected = extract_patches([host[:, :, ::2].transpose(0, 1, 3, 2)], view_batch)
    np.testing.assert_array_equal(out.cpu().numpy(), expected)
