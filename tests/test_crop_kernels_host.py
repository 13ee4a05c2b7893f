"""The shipped crop kernels, launched on the host, equal plain slicing.

``crop_patches<T>`` and ``check_crop_rows`` themselves
(``gpu_patching/kernels/crop_patches.cu``) are compiled by the host C++
compiler against a stand-in for CUDA's launch model and run over every block
and thread of a launch, in a permuted order (``tests/host_launch.py``; no
kernel body lives in the tests). They are driven through ``DeviceCrop``
itself (with NumPy as its array namespace), so the validation, the stack
table, the argument tuple and the launch configuration are the ones a GPU
launch uses; other tests force other launch shapes (one block, several blocks
on both axes, blocks that are not warp multiples) on the same arguments. No
GPU is needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from host_launch import WRITE_COUNTS, HostKernels, SanitizerUnavailable, run_under_sanitizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_patching import PatchBatch, extract_patches
from gpu_patching.crop import (
    STACK_FIELDS,
    DeviceCrop,
    check_launch_args,
    crop_launch,
    crop_launch_args,
    stack_table,
)
from gpu_patching.crop_checks import bad_rows
from gpu_patching.cuda import launch_grid
from gpu_patching.kernels.crop_patches import CHECK_CROP_ROWS, CROP_LINES_PER_THREAD, crop_kernel
from gpu_patching.kernels.descriptor import kernel_dir

SHIM_SOURCE = Path(__file__).with_name("crop_shim.cpp")
HOST_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra"]
DTYPES = [np.uint8, np.uint16, np.float16, np.int32, np.float32, np.float64, np.int64, np.bool_]


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """``crop.cuh``'s constants, for the test that they are the launch code's."""
    compiler = next(
        (shutil.which(n) for n in (os.environ.get("CXX"), "c++", "g++") if n and shutil.which(n)),
        None,
    )
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH to build the host kernel")
    library = tmp_path_factory.mktemp("crop_shim") / "crop_shim.so"
    command = [compiler, *HOST_FLAGS, f"-I{kernel_dir()}", str(SHIM_SOURCE), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    return ctypes.CDLL(str(library))


def _run_crop(
    kernels: HostKernels, args: tuple[Any, ...], grid: tuple[int, ...], block: tuple[int, ...]
) -> None:
    """Launch the shipped ``crop_patches<T>`` for ``out``'s element size."""
    kernels.function(crop_kernel(args[-1].dtype.itemsize))(grid, block, args)


class HostCrop(DeviceCrop):
    """``DeviceCrop`` with NumPy as its device and the shipped kernels run on the host."""

    def __init__(
        self, kernels: HostKernels, *, rows_on_device: bool = False, order_seed: int = 0x5EED
    ) -> None:
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        functions = kernels.functions(order_seed)

        def recorded(kernel: Any, device_id: int) -> Any:
            function = functions(kernel, device_id)

            def launch(grid: Any, block: Any, args: tuple[Any, ...]) -> None:
                self.launches.append((kernel.name, grid, block))
                function(grid, block, args)

            return launch

        super().__init__(xp=np, functions=recorded)
        self._rows_on_device = rows_on_device

    def is_device_array(self, value: Any) -> bool:
        return isinstance(value, np.ndarray)

    def rows_on_device(self, columns: list[Any]) -> bool:
        return self._rows_on_device

    def address(self, array: Any) -> int:
        return int(array.ctypes.data)

    def device_id(self, array: Any) -> int:
        return 0

    def on_device(self, device_id: int) -> Any:
        return contextlib.nullcontext()

    def stream_key(self) -> int:
        return 0


# -- the reference: plain slicing ------------------------------------------------------


def sliced(stacks: list[np.ndarray], batch: PatchBatch) -> np.ndarray:
    """Row k is stacks[d][s, :, z:z+pz, y:y+py, x:x+px], one patch at a time."""
    patch = batch.patch_size
    rows = []
    for k in range(len(batch)):
        corner = [int(c) for c in batch.coords[k]]
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        stack = stacks[int(batch.data_idx[k])]
        rows.append(stack[(int(batch.sample_idx[k]), slice(None), *window)])
    n_channels = stacks[0].shape[1]
    if not rows:
        return np.empty((0, n_channels, *patch), stacks[0].dtype)
    return np.ascontiguousarray(np.stack(rows))


def clamped(stacks: list[np.ndarray], batch: PatchBatch) -> np.ndarray:
    """What the kernel reads for any row: every index clamped into its stack."""
    patch = np.asarray(batch.patch_size)
    rows = []
    for k in range(len(batch)):
        d = int(np.clip(batch.data_idx[k], 0, len(stacks) - 1))
        stack = stacks[d]
        s = int(np.clip(batch.sample_idx[k], 0, stack.shape[0] - 1))
        spatial = np.asarray(stack.shape[2:])
        corner = np.clip(batch.coords[k], 0, np.maximum(spatial - patch, 0))
        axes = [
            np.minimum(c + np.arange(p), size - 1)
            for c, p, size in zip(corner, patch, spatial, strict=True)
        ]
        rows.append(stack[s][(slice(None), *np.ix_(*axes))])
    return np.ascontiguousarray(np.stack(rows))


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal dtype, shape and bytes (NaN payloads of floats included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(
        np.ascontiguousarray(actual).view(np.uint8), np.ascontiguousarray(expected).view(np.uint8)
    )


def _values(dtype: Any, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Distinct-ish values of a dtype (unique bit patterns where the dtype allows)."""
    generator = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return generator.integers(0, 2, size=shape).astype(np.bool_)
    bits = generator.integers(0, 2**63, size=shape, dtype=np.int64)
    return (
        bits.astype(np.uint64)
        .view(np.uint8)
        .reshape(*shape, 8)[..., : np.dtype(dtype).itemsize]
        .copy()
        .view(dtype)
        .reshape(shape)
    )


# -- random cases ----------------------------------------------------------------------


@st.composite
def crop_cases(draw: st.DrawFn) -> tuple[list[np.ndarray], PatchBatch]:
    """Random stacks (some strided views) and a random valid batch over them."""
    ndim = draw(st.sampled_from([2, 3]))
    patch = tuple(draw(st.integers(1, 9 if ndim == 2 else 4)) for _ in range(ndim))
    n_channels = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    stacks = []
    for k in range(draw(st.integers(1, 3))):
        shape = (draw(st.integers(1, 3)), n_channels) + tuple(
            p + draw(st.integers(0, 6)) for p in patch
        )
        layout = draw(st.sampled_from(["contiguous", "strided", "reversed", "fortran"]))
        if layout == "strided":  # every other element along each axis of a larger array
            base = _values(dtype, tuple(2 * s for s in shape), seed=k)
            stack = base[tuple(slice(None, None, 2) for _ in shape)]
        elif layout == "reversed":  # negative strides
            stack = _values(dtype, shape, seed=k)[:, ::-1, ..., ::-1]
        elif layout == "fortran":
            stack = np.asfortranarray(_values(dtype, shape, seed=k))
        else:
            stack = _values(dtype, shape, seed=k)
        assert stack.shape == shape
        stacks.append(stack)
    n_rows = draw(st.integers(0, 40))
    data_idx = np.asarray(
        draw(st.lists(st.integers(0, len(stacks) - 1), min_size=n_rows, max_size=n_rows)),
        dtype=np.int64,
    )
    sample_idx = np.empty(n_rows, dtype=np.int64)
    coords = np.empty((n_rows, ndim), dtype=np.int64)
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for row, d in enumerate(data_idx):
        shape = stacks[d].shape
        sample_idx[row] = generator.integers(0, shape[0])
        # Corners at both edges are likely: the last row/column/slice is reached.
        for axis in range(ndim):
            last = shape[2 + axis] - patch[axis]
            coords[row, axis] = generator.choice([0, last, generator.integers(0, last + 1)])
    batch = PatchBatch(data_idx, sample_idx, coords, np.arange(n_rows), patch)
    return stacks, batch


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(case=crop_cases())
def test_host_kernel_equals_slicing_and_the_numpy_path(
    host_kernels: HostKernels, case: Any
) -> None:
    stacks, batch = case
    expected = sliced(stacks, batch)
    cropper = HostCrop(host_kernels)
    actual = cropper.extract(stacks, batch, batch.patch_size, len(batch), None)
    assert actual.flags.c_contiguous
    assert_same_bits(actual, expected)
    assert_same_bits(extract_patches(stacks, batch), expected)
    assert cropper.launch_count == (1 if len(batch) else 0)
    assert cropper.check_count == 0, "host rows are checked on the host"


def _table(stacks: list[np.ndarray]) -> np.ndarray:
    """The stack table of host stacks (host addresses)."""
    itemsize = stacks[0].dtype.itemsize
    return stack_table(
        [s.ctypes.data for s in stacks],
        [s.shape for s in stacks],
        [tuple(v // itemsize for v in s.strides) for s in stacks],
    )


def _rows(batch: PatchBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.ascontiguousarray(batch.data_idx, dtype=np.int64),
        np.ascontiguousarray(batch.sample_idx, dtype=np.int64),
        np.ascontiguousarray(batch.coords, dtype=np.int64).reshape(-1),
    )


def _crop_args(stacks: list[np.ndarray], batch: PatchBatch, out: np.ndarray) -> tuple[Any, ...]:
    """The crop kernel's argument tuple for host stacks and rows, bypassing every check."""
    n_channels = stacks[0].shape[1]
    return crop_launch_args(
        _table(stacks), _rows(batch), len(batch), n_channels, batch.patch_size, out
    )


@SETTINGS
@given(case=crop_cases(), data=st.data())
def test_any_grid_and_block_write_every_element_exactly_once(
    host_kernels: HostKernels, case: Any, data: st.DataObject
) -> None:
    # The grid-stride loops and the line stepping hold for any launch shape,
    # including grids far too small and blocks that are not warp multiples.
    stacks, batch = case
    if len(batch) == 0:
        return
    grid = (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4)))
    block = (data.draw(st.integers(1, 70)), data.draw(st.integers(1, 12)))
    expected = sliced(stacks, batch)
    # Start from a poisoned buffer: every element must be overwritten.
    out = (
        np.full(expected.nbytes, 0xA5, dtype=np.uint8).view(expected.dtype).reshape(expected.shape)
    )
    _run_crop(host_kernels, _crop_args(stacks, batch, out), grid, block)
    assert_same_bits(out, expected)
    # ...and written once: the same kernel with counting elements.
    wide = [np.zeros(s.shape, dtype=np.int64) for s in stacks]
    writes = np.zeros(expected.shape, dtype=np.uint64)
    args = _crop_args(wide, batch, writes)
    host_kernels.function(WRITE_COUNTS)(grid, block, args)
    assert (writes == 1).all(), f"write counts {np.unique(writes)} with grid {grid}, block {block}"


def test_the_launch_configuration_writes_every_element_once(host_kernels: HostKernels) -> None:
    stacks = [np.zeros((2, 3, 20, 40, 70), dtype=np.int64)]
    generator = np.random.default_rng(0)
    n = 9
    coords = np.stack(
        [
            generator.integers(0, 20 - 5 + 1, n),
            generator.integers(0, 40 - 33 + 1, n),
            generator.integers(0, 70 - 65 + 1, n),
        ],
        axis=1,
    )
    batch = PatchBatch(
        np.zeros(n, np.int64), generator.integers(0, 2, n), coords, np.arange(n), (5, 33, 65)
    )
    launch = crop_launch(n, 3, batch.patch_size)
    writes = np.zeros((n, 3, 5, 33, 65), dtype=np.uint64)
    host_kernels.function(WRITE_COUNTS)(
        launch.grid, launch.block, _crop_args(stacks, batch, writes)
    )
    assert (writes == 1).all()


def test_header_constants_are_the_launch_codes(shim: ctypes.CDLL) -> None:
    assert shim.crop_lines_per_thread() == CROP_LINES_PER_THREAD
    assert shim.crop_stack_fields() == STACK_FIELDS


# -- rows that the host would reject: the kernel still reads only inside the stacks --------


@pytest.mark.parametrize("ndim", [2, 3])
def test_kernel_reads_only_inside_the_stacks_whatever_the_rows(
    host_kernels: HostKernels, ndim: int
) -> None:
    patch = (3, 4, 5)[-ndim:]
    shapes = [(2, 2, 6, 7, 9)[:2] + (6, 7, 9)[-ndim:], (1, 2, 4, 4, 5)[:2] + (4, 4, 5)[-ndim:]]
    # Each stack sits in the middle of a buffer of sentinels (-1); the stacks
    # hold only values >= 0, so any read outside a stack shows up as -1.
    stacks, buffers = [], []
    for k, shape in enumerate(shapes):
        buffer = np.full(3 * int(np.prod(shape)), -1, dtype=np.int32)
        size = int(np.prod(shape))
        buffer[size : 2 * size] = np.arange(size, dtype=np.int32) + 1000 * k
        buffers.append(buffer)
        stacks.append(buffer[size : 2 * size].reshape(shape))
    huge = 2**62
    rows = [
        (-1, 0, [0] * ndim),
        (2, 0, [0] * ndim),
        (-(2**63), 2**63 - 1, [huge] * ndim),
        (0, -5, [-huge] * ndim),
        (0, 7, [1] * ndim),
        (1, 0, [-3] + [100] * (ndim - 1)),
        (1, 0, [2**63 - 1] * ndim),  # corner + offset would overflow without the clamp
        (
            0,
            1,
            [6 - p for p in (6, 7, 9)[-ndim:]][:0]
            + [s - p for s, p in zip((6, 7, 9)[-ndim:], patch, strict=True)],
        ),
    ]
    batch = PatchBatch(
        np.array([r[0] for r in rows], dtype=np.int64),
        np.array([r[1] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.int64),
        np.arange(len(rows)),
        patch,
    )
    out = np.full((len(rows), 2, *patch), -7, dtype=np.int32)
    launch = crop_launch(len(rows), 2, patch)
    _run_crop(host_kernels, _crop_args(stacks, batch, out), launch.grid, launch.block)
    assert (out >= 0).all(), "a read left its stack"
    np.testing.assert_array_equal(out, clamped(stacks, batch))
    # The only valid row (the last one, at the far corner) is exact.
    np.testing.assert_array_equal(out[-1], sliced(stacks, batch[-1:])[0])


# -- the row check ---------------------------------------------------------------------


@st.composite
def checked_rows(draw: st.DrawFn) -> tuple[list[tuple[int, ...]], PatchBatch]:
    """Stacks' shapes and rows of which some leave their stack."""
    ndim = draw(st.sampled_from([2, 3]))
    patch = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    shapes = [
        (draw(st.integers(1, 3)), 1) + tuple(p + draw(st.integers(0, 3)) for p in patch)
        for _ in range(draw(st.integers(1, 3)))
    ]
    n_rows = draw(st.integers(1, 30))
    values = st.integers(-2, 8) | st.sampled_from([-(2**63), 2**63 - 1])
    data_idx = draw(
        st.lists(
            st.integers(-1, len(shapes)) | st.sampled_from([0]), min_size=n_rows, max_size=n_rows
        )
    )
    sample_idx = draw(st.lists(values, min_size=n_rows, max_size=n_rows))
    coords = draw(
        st.lists(st.lists(values, min_size=ndim, max_size=ndim), min_size=n_rows, max_size=n_rows)
    )
    batch = PatchBatch(
        np.array(data_idx, dtype=np.int64),
        np.array(sample_idx, dtype=np.int64),
        np.array(coords, dtype=np.int64).reshape(n_rows, ndim),
        np.arange(n_rows),
        patch,
    )
    return shapes, batch


@SETTINGS
@given(case=checked_rows())
def test_host_check_kernel_finds_the_first_row_the_numpy_check_rejects(
    host_kernels: HostKernels, case: Any
) -> None:
    shapes, batch = case
    stacks = [np.zeros(shape, dtype=np.uint8) for shape in shapes]
    bad = bad_rows(batch.data_idx, batch.sample_idx, batch.coords, shapes, batch.patch_size)
    expected = int(np.argmax(bad)) if bad.any() else len(batch)
    # The launcher's grid, one thread, fewer threads than rows, more than rows.
    computed = tuple((size,) for size in launch_grid(len(batch)))
    for grid, block in (computed, ((1,), (1,)), ((2,), (3,)), ((3,), (64,))):
        first_bad = np.array([len(batch)], dtype=np.int64)
        args = check_launch_args(
            _table(stacks), _rows(batch), len(batch), batch.patch_size, first_bad
        )
        host_kernels.function(CHECK_CROP_ROWS)(grid, block, args)
        assert int(first_bad[0]) == expected, (grid, block)


@pytest.mark.parametrize(
    ("sample_idx", "corner", "first_bad"),
    [([0, 2, 0], [(2, 2), (0, 0), (0, 0)], 1), ([0, 0, 0], [(2, 2), (0, 0), (20, 20)], 2)],
)
def test_host_check_kernel_judges_each_row_against_the_shape_of_its_own_stack(
    host_kernels: HostKernels, sample_idx: list[int], corner: list[tuple[int, int]], first_bad: int
) -> None:
    # Stack 0 has more samples and is larger than stack 1: a row of stack 1
    # whose sample or corner only fits stack 0 must be the first bad row.
    stacks = [np.zeros((3, 1, 40, 40), dtype=np.uint8), np.zeros((1, 1, 10, 10), dtype=np.uint8)]
    rows = (np.ones(3, dtype=np.int64), np.array(sample_idx), np.array(corner), np.arange(3))
    batch = PatchBatch(*rows, (4, 4))
    shapes = [stack.shape for stack in stacks]
    bad = bad_rows(batch.data_idx, batch.sample_idx, batch.coords, shapes, batch.patch_size)
    assert int(np.argmax(bad)) == first_bad
    found = np.array([len(batch)], dtype=np.int64)
    args = check_launch_args(_table(stacks), _rows(batch), len(batch), batch.patch_size, found)
    host_kernels.function(CHECK_CROP_ROWS)((2,), (2,), args)
    assert int(found[0]) == first_bad


@SETTINGS
@given(case=checked_rows())
def test_device_rows_raise_the_same_error_as_host_rows(
    host_kernels: HostKernels, case: Any
) -> None:
    shapes, batch = case
    stacks = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    errors = []
    for on_device in (False, True):
        cropper = HostCrop(host_kernels, rows_on_device=on_device)
        out = np.full((len(batch), 1, *batch.patch_size), 3.0, dtype=np.float32)
        try:
            cropper.extract(stacks, batch, batch.patch_size, len(batch), out)
            errors.append(None)
        except (IndexError, ValueError) as error:
            errors.append((type(error), str(error)))
            assert cropper.launch_count == 0, "no crop launch after a rejected row"
            assert (out == 3.0).all(), "a rejected call writes nothing"
        assert cropper.check_count == int(on_device)
    assert errors[0] == errors[1]


@pytest.mark.parametrize("on_device", [False, True])
def test_a_uint64_corner_is_named_with_the_value_given(
    host_kernels: HostKernels, on_device: bool
) -> None:
    # The check kernel sees the int64 copy (-1); the message shows the batch's value.
    stacks = [np.zeros((1, 1, 16, 16), dtype=np.float32)]
    coords = np.array([[0, 0], [2**64 - 1, 0]], dtype=np.uint64)
    batch = PatchBatch(np.zeros(2, np.uint64), np.zeros(2, np.uint64), coords, np.arange(2), (8, 8))
    cropper = HostCrop(host_kernels, rows_on_device=on_device)
    with pytest.raises(ValueError, match=r"batch.coords\[1\] = \(18446744073709551615, 0\)"):
        cropper.extract(stacks, batch, batch.patch_size, len(batch), None)
    assert cropper.launch_count == 0


def test_device_rows_are_checked_by_one_launch_then_cropped_by_one(
    host_kernels: HostKernels,
) -> None:
    stacks = [_values(np.uint16, (2, 3, 17, 19), 0), _values(np.uint16, (1, 3, 9, 12), 1)]
    batch = PatchBatch(
        np.array([1, 0, 0, 1], dtype=np.int64),
        np.array([0, 1, 0, 0], dtype=np.int64),
        np.array([[0, 0], [9, 11], [3, 4], [1, 4]], dtype=np.int64),
        np.arange(4),
        (8, 8),
    )
    cropper = HostCrop(host_kernels, rows_on_device=True)
    actual = cropper.extract(stacks, batch, (8, 8), 4, None)
    np.testing.assert_array_equal(actual, sliced(stacks, batch))
    assert (cropper.check_count, cropper.launch_count) == (1, 1)
    assert len(cropper.launches) == 2


def test_trusted_device_rows_skip_the_check_launch(host_kernels: HostKernels) -> None:
    # For rows in range by construction (a sampler's epoch): one launch, no sync.
    stacks = [_values(np.int32, (2, 1, 12, 12), 0)]
    batch = PatchBatch(
        np.zeros(3, np.int64),
        np.array([0, 1, 1]),
        np.array([[0, 0], [8, 8], [3, 5]]),
        np.arange(3),
        (4, 4),
    )
    cropper = HostCrop(host_kernels, rows_on_device=True)
    actual = cropper.extract(stacks, batch, (4, 4), 3, None, trusted_rows=True)
    np.testing.assert_array_equal(actual, sliced(stacks, batch))
    assert (cropper.check_count, cropper.launch_count) == (0, 1)


def test_out_is_written_in_place_and_returned(host_kernels: HostKernels) -> None:
    stacks = [_values(np.float64, (2, 1, 10, 10, 10), 3)]
    batch = PatchBatch(
        np.zeros(3, np.int64),
        np.array([0, 1, 1]),
        np.array([[0, 0, 0], [7, 7, 7], [2, 5, 1]]),
        np.arange(3),
        (3, 3, 3),
    )
    out = np.empty((3, 1, 3, 3, 3))
    assert HostCrop(host_kernels).extract(stacks, batch, (3, 3, 3), 3, out) is out
    np.testing.assert_array_equal(out, sliced(stacks, batch))


def test_the_stack_table_upload_is_reused_while_unchanged(host_kernels: HostKernels) -> None:
    stacks = [_values(np.uint8, (1, 1, 8, 8), 0)]
    batch = PatchBatch(
        np.zeros(2, np.int64),
        np.zeros(2, np.int64),
        np.array([[0, 0], [4, 4]]),
        np.arange(2),
        (4, 4),
    )
    cropper = HostCrop(host_kernels)
    cropper.extract(stacks, batch, (4, 4), 2, None)
    first = cropper._tables._entries[(0, 0)][1]
    cropper.extract(stacks, batch, (4, 4), 2, None)
    assert cropper._tables._entries[(0, 0)][1] is first
    other = [_values(np.uint8, (1, 1, 8, 8), 1)]
    np.testing.assert_array_equal(
        cropper.extract(other, batch, (4, 4), 2, None), sliced(other, batch)
    )
    assert cropper._tables._entries[(0, 0)][1] is not first


# -- any rows, any launch shape, under AddressSanitizer ----------------------------------

_CROP_FUZZ_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np

    from gpu_patching.crop import check_launch_args, crop_launch_args, stack_table
    from gpu_patching.kernels import KERNELS
    from gpu_patching.kernels.crop_patches import CHECK_CROP_ROWS, crop_kernel

    lib = ctypes.CDLL(sys.argv[1])
    prefix = sys.argv[2].rsplit("_", 1)[0] + "_"

    class Launch(ctypes.Structure):
        _fields_ = [
            ("grid", ctypes.c_longlong * 3),
            ("block", ctypes.c_longlong * 3),
            ("order_seed", ctypes.c_ulonglong),
            ("only_pair", ctypes.c_longlong),
        ]

    def entry(kernel):
        return getattr(lib, prefix + str(KERNELS.index(kernel)))

    def call(kernel, grid, block, args, trial):
        # Arrays as raw pointers, scalars at their C width: no guard copies,
        # so every array is exactly its own allocation with ASan's red zones.
        values = []
        for (name, c_type), value in zip(kernel.params, args):
            if c_type.endswith("*"):
                values.append(ctypes.c_void_p(value.ctypes.data if value.size else None))
            elif c_type == "int":
                values.append(ctypes.c_int(int(value)))
            else:
                values.append(ctypes.c_longlong(int(value)))
        grid = (*grid, 1, 1)[:3]
        block = (*block, 1, 1)[:3]
        launch = Launch((ctypes.c_longlong * 3)(*grid), (ctypes.c_longlong * 3)(*block),
                        trial + 1, -1)
        entry(kernel)(ctypes.byref(launch), *values)

    generator = np.random.default_rng(2024)
    dtypes = [np.uint8, np.int16, np.float32, np.float64]
    huge = [-(2**63), -(2**40), -1, 2**40, 2**63 - 1]
    for trial in range(250):
        ndim = int(generator.choice([2, 3]))
        patch = tuple(int(p) for p in generator.integers(1, 6, size=ndim))
        dtype = dtypes[trial % len(dtypes)]
        n_channels = int(generator.integers(1, 3))
        stacks = []
        for _ in range(int(generator.integers(1, 3))):
            # Spatial sizes below, at and above the patch: clamps on every side.
            spatial = tuple(int(p + generator.integers(-p + 1, 4)) for p in patch)
            shape = (int(generator.integers(1, 3)), n_channels, *spatial)
            stacks.append(np.ascontiguousarray(generator.random(shape) * 100).astype(dtype))
        itemsize = np.dtype(dtype).itemsize
        table = stack_table(
            [s.ctypes.data for s in stacks],
            [s.shape for s in stacks],
            [tuple(v // itemsize for v in s.strides) for s in stacks],
        )
        n_rows = int(generator.integers(1, 40))
        def column(low, high, size):
            values = generator.integers(low, high, size=size, dtype=np.int64)
            wild = generator.random(size) < 0.2
            values[wild] = generator.choice(huge, size=int(wild.sum()))
            return values
        rows = (
            column(-1, len(stacks) + 1, n_rows),
            column(-1, 3, n_rows),
            column(-2, 8, n_rows * ndim),
        )
        out = np.empty((n_rows, n_channels, *patch), dtype=dtype)
        grid = (int(generator.integers(1, 5)), int(generator.integers(1, 4)))
        block = (int(generator.integers(1, 40)), int(generator.integers(1, 7)))
        args = crop_launch_args(table, rows, n_rows, n_channels, patch, out)
        call(crop_kernel(itemsize), grid, block, args, trial)
        first_bad = np.array([n_rows], dtype=np.int64)
        args = check_launch_args(table, rows, n_rows, patch, first_bad)
        call(CHECK_CROP_ROWS, (grid[0],), (block[0],), args, trial)
        assert 0 <= int(first_bad[0]) <= n_rows, trial
    print("ok")
    """
)


def test_crop_kernels_stay_in_bounds_whatever_the_rows_and_launch_shape(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Hostile rows over random grids, under AddressSanitizer and UBSan.

    The shipped crop and row-check kernels read the row arrays, the stack table
    and the stacks, and write ``out``: each its own allocation here, so one
    element read or written past any of them aborts the child process. Stacks
    are smaller than, equal to and larger than the patch.
    """
    try:
        result = run_under_sanitizers(
            tmp_path_factory.mktemp("crop_kernels_asan"), CHECK_CROP_ROWS, _CROP_FUZZ_SCRIPT
        )
    except SanitizerUnavailable as reason:
        pytest.skip(str(reason))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]


def test_a_launch_with_the_wrong_number_of_arguments_is_refused_before_any_kernel() -> None:
    from gpu_patching import cuda

    fetched: list[Any] = []

    def functions(kernel: Any, device_id: int) -> Any:
        fetched.append(kernel)
        return lambda grid, block, args: None

    n_params = len(CHECK_CROP_ROWS.params)
    with pytest.raises(ValueError, match=f"takes {n_params} arguments, got {n_params - 1}"):
        cuda.launch(functions, CHECK_CROP_ROWS, 0, (1,), (1,), (0,) * (n_params - 1))
    assert fetched == []
