"""Which thread does which work: every (block, thread) pair launched alone.

Parity tests cannot see a thread doing work that another thread also does
(a row drawn twice writes the same values twice). Here each (block, thread)
pair of a launch runs on its own (``HostFunction.only_pair``), and the rows or
elements it touched must be exactly the ones the kernel's work split assigns
to it. The row check is also given exactly one bad row, at every position, so
that the first bad row is not always row 0 or 1; and the crop's clamps are
driven by stacks smaller than the patch and by a table longer than
``n_stacks``.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_launch import READ_COUNTS, WRITE_COUNTS, HostKernels
from test_crop_kernels_host import _crop_args, clamped

from gpu_patching import PatchBatch, StratifiedPatching
from gpu_patching.backends.cuda_backend import _launch_args, pack_sample_table, split_sample_table
from gpu_patching.crop import check_launch_args, crop_launch_args, stack_table
from gpu_patching.kernels.crop_patches import CHECK_CROP_ROWS, CROP_LINES_PER_THREAD, crop_kernel
from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH
from gpu_patching.permutation import EpochOrder

SHAPES = [((3,), (5,)), ((2,), (7,)), ((1,), (4,)), ((4,), (1,))]
SENTINEL = -(2**62)


@pytest.mark.parametrize(("grid", "block"), SHAPES)
def test_each_thread_of_sample_epoch_draws_exactly_its_grid_stride_rows(
    host_kernels: HostKernels, grid: tuple[int], block: tuple[int]
) -> None:
    sampler = StratifiedPatching([(2, 1, 30, 30)], (5, 5), seed=3, backend="numpy")
    tables = sampler._tables
    n = 37
    assert tables.total_patches >= n
    arrays = split_sample_table(pack_sample_table(tables), tables.n_samples, tables.ndim)
    threads = grid[0] * block[0]
    function = host_kernels.function(SAMPLE_EPOCH)
    for pair in range(threads):
        outputs = (
            np.full(n, SENTINEL, dtype=np.int64),
            np.full(n, SENTINEL, dtype=np.int64),
            np.full((n, tables.ndim), SENTINEL, dtype=np.int64),
            np.full(n, SENTINEL, dtype=np.int64),
        )
        args = _launch_args(tables, arrays, EpochOrder.contiguous(0, n), 4, sampler.seed, outputs)
        function.only_pair = pair
        function(grid, block, args)
        mine = np.arange(n) % threads == pair
        for column in outputs:
            written = (column != SENTINEL).reshape(n, -1).all(axis=1)
            untouched = (column == SENTINEL).reshape(n, -1).all(axis=1)
            assert (written == mine).all() and (untouched == ~mine).all(), (grid, block, pair)


@pytest.mark.parametrize(("grid", "block"), SHAPES)
def test_each_thread_of_check_crop_rows_checks_exactly_its_grid_stride_rows(
    host_kernels: HostKernels, grid: tuple[int], block: tuple[int]
) -> None:
    n = 23
    stacks = [np.zeros((2, 1, 8, 8), dtype=np.uint8)]
    table = stack_table(
        [s.ctypes.data for s in stacks], [s.shape for s in stacks], [s.strides for s in stacks]
    )
    threads = grid[0] * block[0]
    function = host_kernels.function(CHECK_CROP_ROWS)
    for bad in range(n):
        data_idx = np.zeros(n, dtype=np.int64)
        data_idx[bad] = 5  # no such stack: only this row leaves its stack
        rows = (data_idx, np.zeros(n, dtype=np.int64), np.zeros(2 * n, dtype=np.int64))
        for pair in range(threads):
            first_bad = np.array([n], dtype=np.int64)
            function.only_pair = pair
            function(grid, block, check_launch_args(table, rows, n, (4, 4), first_bad))
            expected = bad if bad % threads == pair else n
            assert int(first_bad[0]) == expected, (grid, block, bad, pair)


@pytest.mark.parametrize(
    ("grid", "block", "patch", "channels"),
    [((2, 3), (5, 2), (3, 4, 7), 2), ((3, 1), (4, 3), (9, 11), 3), ((1, 2), (3, 1), (2, 5, 6), 1)],
)
def test_each_thread_of_crop_patches_writes_exactly_its_lines_and_columns(
    host_kernels: HostKernels,
    grid: tuple[int, int],
    block: tuple[int, int],
    patch: tuple[int, ...],
    channels: int,
) -> None:
    # The documented split (crop.cuh, "Work split"): block (bx, by) owns rows
    # bx + k gx and chunks by + k gy of dim_y * CROP_LINES_PER_THREAD lines;
    # thread (tx, ty) owns the lines ty + k dim_y of a chunk and columns tx + k dim_x.
    n = 5
    ndim = len(patch)
    spatial = tuple(p + 2 for p in patch)
    stacks = [np.zeros((2, channels, *spatial), dtype=np.int64)]
    table = stack_table(
        [s.ctypes.data for s in stacks],
        [s.shape for s in stacks],
        [tuple(v // 8 for v in s.strides) for s in stacks],
    )
    rows = (
        np.zeros(n, np.int64),
        np.arange(n, dtype=np.int64) % 2,
        np.ones(n * ndim, dtype=np.int64),
    )
    full = (1,) * (3 - ndim) + patch
    lines = channels * full[0] * full[1]
    chunk = block[1] * CROP_LINES_PER_THREAD
    row, line, x = np.meshgrid(np.arange(n), np.arange(lines), np.arange(full[2]), indexing="ij")
    bx, by = row % grid[0], (line // chunk) % grid[1]
    tx, ty = x % block[0], (line % chunk) % block[1]
    owner = (bx + by * grid[0]) * (block[0] * block[1]) + tx + ty * block[0]
    function = host_kernels.function(WRITE_COUNTS)
    for pair in range(grid[0] * grid[1] * block[0] * block[1]):
        writes = np.zeros((n, channels, *patch), dtype=np.uint64)
        function.only_pair = pair
        function(grid, block, crop_launch_args(table, rows, n, channels, patch, writes))
        assert (writes.reshape(n, lines, full[2]) == (owner == pair)).all(), (grid, block, pair)


@pytest.mark.parametrize("ndim", [2, 3])
def test_check_crop_rows_finds_a_lone_bad_row_at_every_position_and_launch_shape(
    host_kernels: HostKernels, ndim: int
) -> None:
    # Needs no harness change: exactly one row leaves its stack, at every
    # position, in turn; each way a row can leave (stack, sample, each axis'
    # low and high edge) is used; every launch shape must report that row.
    n = 41
    patch = (2, 3, 4)[-ndim:]
    shape = (2, 1, *(p + 2 for p in patch))
    stacks = [np.zeros(shape, dtype=np.uint8)]
    table = stack_table(
        [s.ctypes.data for s in stacks], [s.shape for s in stacks], [s.strides for s in stacks]
    )
    function = host_kernels.function(CHECK_CROP_ROWS)
    ways = ["stack-", "stack+", "sample-", "sample+"] + [
        f"{edge}{axis}" for axis in range(ndim) for edge in "<>"
    ]
    for bad in range(n):
        way = ways[bad % len(ways)]
        data_idx = np.zeros(n, np.int64)
        sample_idx = np.ones(n, np.int64)
        coords = np.ones((n, ndim), np.int64)
        if way == "stack-":
            data_idx[bad] = -1
        elif way == "stack+":
            data_idx[bad] = 1
        elif way == "sample-":
            sample_idx[bad] = -1
        elif way == "sample+":
            sample_idx[bad] = 2
        else:
            axis = int(way[1])
            coords[bad, axis] = -1 if way[0] == "<" else 3  # last valid corner is 2
        rows = (data_idx, sample_idx, coords.reshape(-1))
        for grid, block in [
            ((1,), (1,)),
            ((1,), (2,)),
            ((2,), (3,)),
            ((3,), (5,)),
            ((1,), (64,)),
            ((7,), (1,)),
        ]:
            first_bad = np.array([n], dtype=np.int64)
            function(grid, block, check_launch_args(table, rows, n, patch, first_bad))
            assert int(first_bad[0]) == bad, (grid, block, way)


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_of_a_stack_smaller_than_the_patch_reads_only_clamped_elements(
    host_kernels: HostKernels, ndim: int
) -> None:
    # Rows the host would reject, in a stack smaller than the patch on every
    # axis: the corner clamps to 0 (max(D - P, 0)) and every index to D - 1.
    patch = (3, 4, 5)[-ndim:]
    shape = (2, 2) + (2, 3, 4)[-ndim:]
    size = int(np.prod(shape))
    buffer = np.full(3 * size, -1, dtype=np.int32)
    buffer[size : 2 * size] = np.arange(size, dtype=np.int32)
    stacks = [buffer[size : 2 * size].reshape(shape)]
    coords = np.array([[0] * ndim, [1] * ndim, [5] * ndim, [-2] * ndim], dtype=np.int64)
    batch = PatchBatch(np.zeros(4, np.int64), np.array([0, 1, 1, 0]), coords, np.arange(4), patch)
    out = np.full((4, 2, *patch), -7, dtype=np.int32)
    function = host_kernels.function(crop_kernel(4))
    function((2, 2), (3, 2), _crop_args(stacks, batch, out))
    assert (out >= 0).all(), "a read left its stack"
    np.testing.assert_array_equal(out, clamped(stacks, batch))


def test_check_crop_rows_rejects_a_stack_past_n_stacks_even_where_the_table_memory_holds_one(
    host_kernels: HostKernels,
) -> None:
    # The table has two valid stacks but the kernel is told n_stacks = 1: a row
    # naming stack 1 must be bad, whatever the memory after row 0 holds.
    stacks = [np.zeros((2, 1, 8, 8), dtype=np.uint8), np.zeros((2, 1, 8, 8), dtype=np.uint8)]
    table = stack_table(
        [s.ctypes.data for s in stacks], [s.shape for s in stacks], [s.strides for s in stacks]
    )
    n = 9
    position = [name for name, _ in CHECK_CROP_ROWS.params].index("n_stacks")
    for bad in range(n):
        data_idx = np.zeros(n, np.int64)
        data_idx[bad] = 1
        rows = (data_idx, np.zeros(n, np.int64), np.zeros(2 * n, np.int64))
        first_bad = np.array([n], dtype=np.int64)
        args = list(check_launch_args(table, rows, n, (4, 4), first_bad))
        args[position] = np.int64(1)
        host_kernels.function(CHECK_CROP_ROWS)((2,), (3,), tuple(args))
        assert int(first_bad[0]) == bad


@pytest.mark.parametrize(
    ("grid", "block"), [((1, 1), (1, 1)), ((2, 3), (5, 3)), ((4, 1), (32, 8)), ((1, 2), (7, 2))]
)
@pytest.mark.parametrize("patch", [(3, 5), (2, 3, 9), (13, 4)])
def test_crop_patches_reads_each_stack_element_once_per_patch_that_covers_it(
    host_kernels: HostKernels, grid: tuple[int, int], block: tuple[int, int], patch: tuple[int, ...]
) -> None:
    # No load the kernel does not need: every element of a stack is read
    # exactly as many times as the batch's patches cover it (the last chunk's
    # partial lines included, where a thread has fewer than
    # CROP_LINES_PER_THREAD lines).
    ndim = len(patch)
    generator = np.random.default_rng(len(patch) * 100 + grid[0] * 10 + block[1])
    shapes = [(2, 2, *(p + 3 for p in patch)), (1, 2, *(p + 1 for p in patch))]
    stacks = [np.zeros(shape, dtype=np.int64) for shape in shapes]
    table = stack_table(
        [s.ctypes.data for s in stacks],
        [s.shape for s in stacks],
        [tuple(v // 8 for v in s.strides) for s in stacks],
    )
    n = 11
    data_idx = generator.integers(0, 2, n)
    sample_idx = np.array([generator.integers(0, shapes[d][0]) for d in data_idx])
    coords = np.array(
        [
            [generator.integers(0, shapes[d][2 + a] - patch[a] + 1) for a in range(ndim)]
            for d in data_idx
        ]
    )
    rows = (data_idx.astype(np.int64), sample_idx.astype(np.int64), coords.reshape(-1))
    expected = [np.zeros(shape, dtype=np.int64) for shape in shapes]
    for d, s, corner in zip(data_idx, sample_idx, coords, strict=True):
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        expected[d][(s, slice(None), *window)] += 1
    out = np.zeros((n, 2, *patch), dtype=np.int64)
    host_kernels.function(READ_COUNTS)(grid, block, crop_launch_args(table, rows, n, 2, patch, out))
    for k in range(2):
        np.testing.assert_array_equal(stacks[k], expected[k], err_msg=f"stack {k}")
