"""The shipped epoch kernel, launched on the host, equals the NumPy draw bit for bit.

``sample_epoch`` itself (``gpu_patching/kernels/sample_epoch.cu``) is compiled
by the host C++ compiler against a stand-in for CUDA's launch model and run
over every block and thread of a launch, in a permuted order
(``tests/host_launch.py``; no kernel body lives in the tests). It is driven
through ``CudaBackend`` itself (with NumPy as its array namespace), so the
index checks, the table packing, the argument tuple and the grid are the ones
a GPU launch uses; other tests force other launch shapes on the same argument
tuple. No GPU is needed.

``tests/kernel_shim.cpp`` exposes the device functions the kernel calls
(Philox, the 64-bit words, the shuffle) for their own known-answer tests.

Both backends' ``draw`` return ``(data_idx, sample_idx, coords, indices)``;
every column is compared, and the kernel writes all four itself.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from draw_reference import mulhi64
from host_launch import HostBackend, HostKernels, SanitizerUnavailable, run_under_sanitizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_patching import StratifiedPatching, grid, permutation, rng
from gpu_patching.backends.cuda_backend import (
    OUTPUT_PARAMS,
    _launch_args,
    pack_sample_table,
    split_sample_table,
)
from gpu_patching.backends.numpy_backend import NumpyBackend
from gpu_patching.cuda import launch_grid
from gpu_patching.kernels.descriptor import NULL_POINTER, kernel_dir
from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH
from gpu_patching.permutation import EpochOrder
from gpu_patching.tables import RegionTables

SHIM_SOURCE = Path(__file__).with_name("kernel_shim.cpp")
HOST_FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-Wall", "-Wextra"]

_CTYPES = {
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
}

SAMPLE_EPOCH_PARAMS = SAMPLE_EPOCH.params

# -- building and calling the shim -----------------------------------------------------


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build_shim(directory: Path, extra_flags: list[str]) -> Path:
    compiler = _cxx()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH to build the host kernel")
    library = directory / "kernel_shim.so"
    command = [
        compiler,
        *HOST_FLAGS,
        *extra_flags,
        f"-I{kernel_dir()}",
        str(SHIM_SOURCE),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    return library


def _load_shim(library: Path) -> ctypes.CDLL:
    shim = ctypes.CDLL(str(library))
    shim.philox.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 3
    shim.philox.restype = None
    shim.random_u32.argtypes = [ctypes.c_ulonglong, ctypes.c_longlong, ctypes.c_uint, ctypes.c_uint]
    shim.random_u32.restype = ctypes.c_uint
    shim.random_u64.argtypes = [
        ctypes.c_ulonglong,
        ctypes.c_longlong,
        ctypes.c_uint,
        ctypes.c_uint,
    ]
    shim.random_u64.restype = ctypes.c_ulonglong
    shim.mulhi64.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong]
    shim.mulhi64.restype = ctypes.c_ulonglong
    shim.shuffle_parameters.argtypes = [
        ctypes.c_longlong,
        ctypes.c_ulonglong,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    shim.shuffle_parameters.restype = None
    shim.shuffle_positions.argtypes = [
        ctypes.c_longlong,
        ctypes.c_ulonglong,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_longlong,
        ctypes.c_void_p,
    ]
    shim.shuffle_positions.restype = None
    return shim


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return _load_shim(_build_shim(tmp_path_factory.mktemp("kernel_shim"), []))


Draw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
COLUMNS = ("data_idx", "sample_idx", "coords", "indices")


def _numpy_draw(tables: RegionTables, indices: Any, draw: int, seed: int) -> Draw:
    """NumpyBackend.draw; a list of indices becomes an int64 array, a range stays one."""
    if not isinstance(indices, range):
        indices = np.asarray(indices, dtype=np.int64)
    return NumpyBackend().draw(tables, indices, draw, seed)


def _assert_same_draws(expected: Draw, actual: Draw) -> None:
    """All four columns equal, with the same dtypes and shapes."""
    assert len(actual) == len(expected) == len(COLUMNS)
    for name, want, got in zip(COLUMNS, expected, actual, strict=True):
        assert isinstance(got, np.ndarray), name
        assert got.dtype == np.int64 and want.dtype == np.int64, name
        assert got.shape == want.shape, f"{name}: {got.shape} != {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=name)


def _assert_failed_rows(draw: Draw, rows: np.ndarray) -> None:
    """The given rows of a draw hold -1 in every column."""
    for name, column in zip(COLUMNS, draw, strict=True):
        assert (column[rows] == -1).all(), name


# -- Philox ----------------------------------------------------------------------------

KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF,) * 2,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_host_philox_matches_random123_known_answers(
    shim: ctypes.CDLL, counter: tuple[int, ...], key: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    out = (ctypes.c_uint * 4)()
    shim.philox((ctypes.c_uint * 4)(*counter), (ctypes.c_uint * 2)(*key), out)
    assert tuple(out) == expected


def test_host_counter_layout_matches_rng(shim: ctypes.CDLL) -> None:
    generator = np.random.default_rng(7)
    for _ in range(500):
        seed = int(generator.integers(0, 2**64, dtype=np.uint64))
        index = int(generator.integers(0, 2**63, dtype=np.int64)) >> int(generator.integers(0, 63))
        draw = int(generator.integers(0, 2**32))
        purpose = int(generator.integers(0, 2))
        expected = int(rng.random_uint32(seed, [index], draw, purpose)[0])
        assert shim.random_u32(seed, index, draw, purpose) == expected
        expected64 = int(rng.random_uint64(seed, [index], draw, purpose)[0])
        assert shim.random_u64(seed, index, draw, purpose) == expected64


def test_host_mulhi64_is_the_exact_high_word_and_equals_numpys(shim: ctypes.CDLL) -> None:
    generator = np.random.default_rng(8)
    edges = [0, 1, 2**32 - 1, 2**32, 2**62 - 1, 2**63, 2**64 - 1]
    pairs = [(a, b) for a in edges for b in edges]
    pairs += [
        (int(a), int(b)) for a, b in generator.integers(0, 2**64, size=(2000, 2), dtype=np.uint64)
    ]
    a = np.array([p[0] for p in pairs], dtype=np.uint64)
    b = np.array([p[1] for p in pairs], dtype=np.uint64)
    numpy_high = mulhi64(a, b)
    for k, (x, y) in enumerate(pairs):
        assert shim.mulhi64(x, y) == (x * y) >> 64 == int(numpy_high[k]), (x, y)


# -- the per-patch draw ----------------------------------------------------------------

PROBABILITIES = st.one_of(
    st.sampled_from([0.0, 1e-9, 2.0**-20, 0.5, 1.0, 2.0, 10.0]),
    st.floats(0.0, 1.0),
    st.floats(1.0, 20.0),
)


@st.composite
def samplers(draw: st.DrawFn) -> StratifiedPatching:
    """A NumPy sampler on random stacks, with random exclusions and probabilities."""
    ndim = draw(st.sampled_from([2, 3]))
    largest_patch = 7 if ndim == 2 else 4
    patch = tuple(draw(st.integers(1, largest_patch)) for _ in range(ndim))
    shapes = []
    for _ in range(draw(st.integers(1, 3))):
        spatial = tuple(draw(st.integers(p, 4 * p + 3)) for p in patch)
        shapes.append((draw(st.integers(1, 3)), draw(st.integers(1, 2)), *spatial))
    seed = draw(st.integers(0, 2**64 - 1))
    sampler = StratifiedPatching(shapes, patch, seed=seed, backend="numpy")
    for data_idx, shape in enumerate(shapes):
        for sample_idx in range(shape[0]):
            flat = sampler._tables.sample_id(data_idx, sample_idx)
            cells = list(itertools.product(*map(range, sampler._tables.sample_grid(flat))))
            mode = draw(st.sampled_from(["none", "some", "some", "all"]))
            if mode == "all":
                sampler.exclude_patches(data_idx, sample_idx, cells)
            elif mode == "some":
                excluded = draw(st.lists(st.sampled_from(cells), max_size=len(cells)))
                if excluded:
                    sampler.exclude_patches(data_idx, sample_idx, excluded)
            probs = draw(st.dictionaries(st.sampled_from(cells), PROBABILITIES))
            if probs:
                sampler.set_region_probs(data_idx, sample_idx, probs)
    return sampler


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sampler=samplers(), draw=st.integers(0, 2**32 - 1))
def test_host_kernel_equals_numpy_draw_on_random_tables(
    host_kernels: HostKernels, sampler: StratifiedPatching, draw: int
) -> None:
    tables = sampler._tables
    n = tables.total_patches
    expected = _numpy_draw(tables, range(n), draw, sampler.seed)
    actual = HostBackend(host_kernels).draw(tables, range(n), draw, sampler.seed)
    _assert_same_draws(expected, actual)
    # The same epoch given as an index array: the same rows.
    _assert_same_draws(expected, _numpy_draw(tables, np.arange(n), draw, sampler.seed))
    np.testing.assert_array_equal(actual[3], np.arange(n))
    for name, column in zip(COLUMNS, actual, strict=True):
        assert (column >= 0).all(), f"{name}: every row of a valid range is a real patch"
    # The kernel's (data_idx, sample_idx) is the flat sample's, and that sample
    # owns the row's index.
    flat = tables.first_sample[actual[0]] + actual[1]
    assert (tables.patch_offset[flat] <= actual[3]).all()
    assert (actual[3] < tables.patch_offset[flat + 1]).all()


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sampler=samplers(), draw=st.integers(0, 2**32 - 1), data=st.data())
def test_host_kernel_equals_numpy_draw_for_arbitrary_indices(
    host_kernels: HostKernels, sampler: StratifiedPatching, draw: int, data: st.DataObject
) -> None:
    n = sampler._tables.total_patches
    if n == 0:
        return
    indices = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=64))
    index_array = np.asarray(indices, dtype=np.int64)
    expected = _numpy_draw(sampler._tables, index_array, draw, sampler.seed)
    actual = HostBackend(host_kernels).draw(sampler._tables, index_array, draw, sampler.seed)
    _assert_same_draws(expected, actual)
    # The index column is a copy written by the kernel, not the input array.
    assert actual[3] is not index_array
    np.testing.assert_array_equal(actual[3], index_array)


# -- every launch shape and thread order ---------------------------------------------

#: Launch shapes the grid-stride loop must make equivalent: one thread, one
#: block, fewer threads than rows (each thread takes several rows), more threads
#: than rows (most threads take none).
LAUNCH_SHAPES = [
    ((1,), (1,)),
    ((1,), (256,)),
    ((3,), (5,)),
    ((2,), (7,)),
    ((40,), (64,)),
]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    sampler=samplers(),
    draw=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([None, *LAUNCH_SHAPES]),
    order_seed=st.integers(0, 2**64 - 1),
    mode=st.sampled_from(["epoch", "shuffled", "shard", "indices"]),
    data=st.data(),
)
def test_any_launch_shape_and_thread_order_draws_every_row_once_as_numpy_does(
    host_kernels: HostKernels,
    sampler: StratifiedPatching,
    draw: int,
    shape: Any,
    order_seed: int,
    mode: str,
    data: st.DataObject,
) -> None:
    # The same argument tuple launched over any grid, with the threads run in
    # any order: every row is written (the outputs start as a sentinel), nothing
    # outside the outputs is (guard zones), and the rows are the NumPy draw's.
    tables = sampler._tables
    n = tables.total_patches
    rows: Any
    if mode == "epoch":
        rows = range(n)
    elif mode == "shuffled":
        rows = EpochOrder.shard(n, shuffle=True, rank=0, world_size=1)
    elif mode == "shard":
        world_size = data.draw(st.integers(1, 5))
        rank = data.draw(st.integers(0, world_size - 1))
        rows = EpochOrder.shard(
            n, shuffle=data.draw(st.booleans()), rank=rank, world_size=world_size
        )
    else:
        if n == 0:
            return
        rows = np.asarray(data.draw(st.lists(st.integers(0, n - 1), max_size=50)), dtype=np.int64)
    expected = NumpyBackend().draw(tables, rows, draw, sampler.seed)
    actual = _raw_draw(host_kernels, tables, rows, draw, sampler.seed, shape, order_seed)
    _assert_same_draws(expected, actual)


def test_the_backend_launches_the_grid_it_computes_and_it_covers_every_row(
    host_kernels: HostKernels,
) -> None:
    sampler = StratifiedPatching([(3, 1, 90, 70)], (6, 5), seed=3, backend="numpy")
    n = sampler.n_patches
    assert n > 256, "more than one block"
    backend = HostBackend(host_kernels)
    host_kernels.launches.clear()
    actual = backend.draw(sampler._tables, range(n), 4, sampler.seed)
    blocks, threads = launch_grid(n)
    assert host_kernels.launches == [(SAMPLE_EPOCH.name, (blocks, 1, 1), (threads, 1, 1))]
    assert blocks > 1
    _assert_same_draws(_numpy_draw(sampler._tables, range(n), 4, sampler.seed), actual)


def test_the_host_launch_refuses_a_bare_python_int_for_a_c_scalar(
    host_kernels: HostKernels,
) -> None:
    # CuPy passes a bare int as 64 bits; the host launch refuses it, so a
    # marshalling slip fails here rather than on a GPU.
    sampler = StratifiedPatching([(1, 1, 20, 20)], (4, 4), seed=3, backend="numpy")
    tables = sampler._tables
    n = tables.total_patches
    arrays = split_sample_table(pack_sample_table(tables), tables.n_samples, tables.ndim)
    outputs = tuple(
        np.empty((n, tables.ndim) if name == "coords" else n, dtype=np.int64)
        for name in OUTPUT_PARAMS
    )
    args = list(_launch_args(tables, arrays, EpochOrder.contiguous(0, n), 0, 3, outputs))
    position = [name for name, _ in SAMPLE_EPOCH.params].index("ndim")
    args[position] = int(args[position])
    with pytest.raises(TypeError, match="ndim"):
        host_kernels.function(SAMPLE_EPOCH)((1,), (32,), tuple(args))


def test_host_kernel_skips_a_sample_whose_every_cell_is_excluded(host_kernels: HostKernels) -> None:
    sampler = StratifiedPatching(
        [(3, 1, 40, 36), (1, 1, 17, 23)], (8, 6), seed=2**64 - 1, backend="numpy"
    )
    grid = sampler._tables.sample_grid(1)
    sampler.exclude_patches(0, 1, list(itertools.product(*map(range, grid))))
    tables = sampler._tables
    assert tables.n_patches[1] == 0 and tables.total_patches > 0
    for draw in (0, 1, 2**32 - 1):
        expected = _numpy_draw(tables, range(tables.total_patches), draw, sampler.seed)
        actual = HostBackend(host_kernels).draw(
            tables, range(tables.total_patches), draw, sampler.seed
        )
        _assert_same_draws(expected, actual)
        # Flat sample 1 is (data_idx 0, sample_idx 1); the other two are drawn.
        pairs = set(zip(actual[0].tolist(), actual[1].tolist(), strict=True))
        assert pairs == {(0, 0), (0, 2), (1, 0)}


def test_host_kernel_draws_nothing_when_every_cell_of_every_sample_is_excluded(
    host_kernels: HostKernels,
) -> None:
    sampler = StratifiedPatching([(2, 1, 12, 12, 12)], (4, 4, 4), seed=3, backend="numpy")
    cells = list(itertools.product(range(3), repeat=3))
    sampler.exclude_patches(0, 0, cells)
    sampler.exclude_patches(0, 1, cells)
    assert sampler._tables.total_patches == 0
    backend = HostBackend(host_kernels)
    empty = backend.draw(sampler._tables, range(0), 5, 3)
    assert [column.shape for column in empty] == [(0,), (0,), (0, 3), (0,)]
    assert all(column.dtype == np.int64 for column in empty)
    assert backend.launch_count == 0, "nothing to draw, nothing launched"
    _assert_same_draws(_numpy_draw(sampler._tables, range(0), 5, 3), empty)
    # The kernel itself refuses any index of an empty epoch.
    _assert_failed_rows(_raw_draw(host_kernels, sampler._tables, range(0, 4), 5, 3), np.arange(4))


def test_host_kernel_handles_large_masses(host_kernels: HostKernels) -> None:
    # The largest accepted probability makes the masses ~2**36 per region and
    # ~10**3 patches: the 64-bit arithmetic of the stratum points is exercised.
    heavy = StratifiedPatching([(2, 1, 64, 48)], (8, 8), seed=11, backend="numpy")
    heavy.set_region_probs(0, 1, {(0, 0): grid.MAX_PROBABILITY, (3, 2): 0.0, (7, 5): 1e-9})
    # Huge patches on few cells: a stratum is wider than 2**32 mass points, so
    # the high word of the width takes part in placing the point.
    wide = StratifiedPatching([(1, 1, 1000, 1000)], (500, 500), seed=12, backend="numpy")
    wide.set_region_probs(0, 0, {(0, 0): grid.MAX_PROBABILITY})
    assert int(wide._tables.mass_offset[-1]) // wide._tables.total_patches > 2**32
    for sampler in (heavy, wide):
        tables = sampler._tables
        indices = np.random.default_rng(0).integers(0, tables.total_patches, size=4000)
        expected = _numpy_draw(tables, indices, 77, sampler.seed)
        actual = HostBackend(host_kernels).draw(tables, indices, 77, sampler.seed)
        _assert_same_draws(expected, actual)


def _raw_draw(
    host_kernels: HostKernels,
    tables: RegionTables,
    indices: Any,
    draw: int,
    seed: int,
    shape: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    order_seed: int = 0x5EED,
) -> Draw:
    """Launch the kernel directly (no host-side index checks), on the computed grid.

    The outputs start out as a sentinel that no draw writes, so a row the kernel
    skipped cannot pass for a failed (-1) or a real one. ``shape`` forces
    another ``(grid, block)``.
    """
    rows: Any
    if isinstance(indices, range):
        rows = EpochOrder.contiguous(indices.start, indices.stop)
        n = rows.n_rows
    elif isinstance(indices, EpochOrder):
        rows, n = indices, indices.n_rows
    else:
        rows = np.ascontiguousarray(indices, dtype=np.int64)
        n = len(rows)
    sentinel = -(2**62)
    outputs = (
        np.full(n, sentinel, dtype=np.int64),
        np.full(n, sentinel, dtype=np.int64),
        np.full((n, tables.ndim), sentinel, dtype=np.int64),
        np.full(n, sentinel, dtype=np.int64),
    )
    arrays = split_sample_table(pack_sample_table(tables), tables.n_samples, tables.ndim)
    args = _launch_args(tables, arrays, rows, draw, seed, outputs)
    blocks, threads = launch_grid(n)
    grid, block = shape or ((blocks,), (threads,))
    host_kernels.function(SAMPLE_EPOCH, order_seed)(grid, block, args)
    for name, column in zip(COLUMNS, outputs, strict=True):
        assert (column != sentinel).all(), f"{name}: a row was not written"
    return outputs


def test_host_kernel_writes_minus_one_for_indices_out_of_range(host_kernels: HostKernels) -> None:
    sampler = StratifiedPatching([(1, 1, 30, 30)], (5, 5), seed=5, backend="numpy")
    tables = sampler._tables
    n = tables.total_patches
    indices = np.array([-(2**63), -1, 0, n - 1, n, n + 7, 2**63 - 1], dtype=np.int64)
    bad = np.array([True, True, False, False, True, True, True])
    # The kernel's own guard: whatever reaches it, a bad index is a -1 row.
    for shape in (None, ((1,), (1,)), ((2,), (3,)), ((5,), (64,))):
        actual = _raw_draw(host_kernels, tables, indices, 9, 5, shape)
        _assert_failed_rows(actual, bad)
        good = _numpy_draw(tables, indices[~bad], 9, 5)
        _assert_same_draws(good, tuple(column[~bad] for column in actual))  # type: ignore[arg-type]
    # A range past the end: the kernel writes -1 rows, the backend refuses it.
    past_end = _raw_draw(host_kernels, tables, range(n - 2, n + 2), 9, 5)
    _assert_failed_rows(past_end, np.array([False, False, True, True]))
    _assert_same_draws(
        _numpy_draw(tables, range(n - 2, n), 9, 5),
        tuple(column[:2] for column in past_end),  # type: ignore[arg-type]
    )
    with pytest.raises(IndexError):
        HostBackend(host_kernels).draw(tables, range(n - 2, n + 2), 9, 5)


def test_host_backend_launches_once_per_draw_and_reuses_the_upload(
    host_kernels: HostKernels,
) -> None:
    sampler = StratifiedPatching([(2, 1, 20, 20)], (4, 4), seed=1, backend="numpy")
    backend = HostBackend(host_kernels)
    n = sampler.n_patches
    first = backend.draw(sampler._tables, range(n), 0, 1)
    uploaded = backend._uploads._entries[(0, 0)][1]
    backend.draw(sampler._tables, range(n), 1, 1)
    assert backend.launch_count == 2
    assert backend._uploads._entries[(0, 0)][1] is uploaded
    # An update changes the per-sample arrays: they are uploaded again.
    sampler.exclude_patches(0, 0, [(1, 1)])
    n_after = sampler.n_patches
    after = backend.draw(sampler._tables, range(n_after), 0, 1)
    assert backend._uploads._entries[(0, 0)][1] is not uploaded
    _assert_same_draws(_numpy_draw(sampler._tables, range(n_after), 0, 1), after)
    assert n_after < n and all(column.shape[0] == n for column in first)


def _recording(host_kernels: HostKernels, launched: list[tuple[Any, ...]]) -> Any:
    """Kernel functions that record every argument tuple, then launch it."""
    functions = host_kernels.functions()

    def get(kernel: Any, device_id: int) -> Any:
        function = functions(kernel, device_id)

        def launch(grid: Any, block: Any, args: tuple[Any, ...]) -> None:
            launched.append(args)
            function(grid, block, args)

        return launch

    return get


def test_host_backend_returns_the_arrays_the_kernel_wrote(host_kernels: HostKernels) -> None:
    # The result is exactly the kernel's output arguments: nothing is computed
    # from them afterwards (on a GPU that would be another kernel).
    sampler = StratifiedPatching([(2, 1, 20, 20), (1, 1, 9, 13)], (4, 4), seed=8, backend="numpy")
    launched: list[tuple[Any, ...]] = []
    backend = HostBackend(host_kernels, _recording(host_kernels, launched))
    n = sampler.n_patches
    result = backend.draw(sampler._tables, range(n), 2, 8)
    assert len(launched) == 1 and backend.launch_count == 1
    values = dict(zip((name for name, _ in SAMPLE_EPOCH_PARAMS), launched[0], strict=True))
    assert values["indices"] is NULL_POINTER, "an epoch reads no index array"
    for column, name in zip(result, OUTPUT_PARAMS, strict=True):
        assert column is values[name], name
    _assert_same_draws(_numpy_draw(sampler._tables, range(n), 2, 8), result)


# -- the epoch order: shuffle and shard ------------------------------------------------

PRIMES = [2, 3, 5, 7, 13, 31, 61, 127, 8191, 65537, 131071, 524287, 2147483647]
POWERS_OF_TWO = [2**k for k in (1, 2, 3, 6, 7, 10, 16, 17, 31, 32, 40, 62)]
ORDER_SIZES = st.one_of(
    st.sampled_from([0, 1, *PRIMES, *POWERS_OF_TWO, 63, 64, 65, 128, 129, 2**62 - 1]),
    st.integers(0, 5000),
    st.integers(0, 2**62),
)
SEEDS = st.integers(0, 2**64 - 1)
DRAWS = st.integers(0, 2**32 - 1)


def _host_shuffle(shim: ctypes.CDLL, n: int, seed: int, draw: int, positions: np.ndarray):
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    out = np.full(len(positions), -(2**62), dtype=np.int64)
    shim.shuffle_positions(n, seed, draw, positions.ctypes.data, len(positions), out.ctypes.data)
    return out


def _some_positions(n: int, generator: np.random.Generator) -> np.ndarray:
    """Every position of a small order; the ends and a random sample of a big one."""
    if n <= 600:
        return np.arange(n, dtype=np.int64)
    sample = generator.integers(0, n, size=500, dtype=np.int64)
    return np.concatenate([[0, 1, n // 2, n - 2, n - 1], sample])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=ORDER_SIZES, seed=SEEDS, draw=DRAWS)
def test_host_shuffle_domain_and_round_keys_equal_numpys(
    shim: ctypes.CDLL, n: int, seed: int, draw: int
) -> None:
    domain = np.zeros(2, dtype=np.int64)
    keys = np.zeros(permutation.SHUFFLE_ROUNDS, dtype=np.uint32)
    shim.shuffle_parameters(n, seed, draw, domain.ctypes.data, keys.ctypes.data)
    assert tuple(domain.tolist()) == permutation.feistel_domain(n)
    np.testing.assert_array_equal(keys, permutation.round_keys(seed, draw))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=ORDER_SIZES.filter(lambda n: n > 0), seed=SEEDS, draw=DRAWS)
def test_host_shuffle_equals_numpy_permutation(
    shim: ctypes.CDLL, n: int, seed: int, draw: int
) -> None:
    positions = _some_positions(n, np.random.default_rng(seed % 2**32))
    expected = permutation.permute(positions, n, seed, draw)
    np.testing.assert_array_equal(_host_shuffle(shim, n, seed, draw, positions), expected)


def test_host_shuffle_refuses_positions_outside_the_order(shim: ctypes.CDLL) -> None:
    positions = np.array([-(2**63), -1, 0, 9, 10, 2**63 - 1], dtype=np.int64)
    got = _host_shuffle(shim, 10, 5, 6, positions)
    np.testing.assert_array_equal(got[[0, 1, 4, 5]], -1)
    assert 0 <= got[2] < 10 and 0 <= got[3] < 10
    # An empty order has no valid position at all.
    np.testing.assert_array_equal(_host_shuffle(shim, 0, 5, 6, np.arange(3)), -1)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    sampler=samplers(),
    draw=DRAWS,
    shuffle=st.booleans(),
    world_size=st.integers(1, 6),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_host_kernel_equals_numpy_for_shuffled_sharded_epochs(
    host_kernels: HostKernels,
    sampler: StratifiedPatching,
    draw: int,
    shuffle: bool,
    world_size: int,
    drop_last: bool,
    data: st.DataObject,
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    tables = sampler._tables
    order = EpochOrder.shard(
        tables.total_patches,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    expected = NumpyBackend().draw(tables, order, draw, sampler.seed)
    backend = HostBackend(host_kernels)
    actual = backend.draw(tables, order, draw, sampler.seed)
    _assert_same_draws(expected, actual)
    assert backend.launch_count == (1 if order.n_rows else 0)
    np.testing.assert_array_equal(actual[3], order.indices(sampler.seed, draw))


def test_host_kernel_draws_a_shuffled_shard_in_one_launch_without_an_index_array(
    host_kernels: HostKernels,
) -> None:
    sampler = StratifiedPatching([(3, 1, 40, 36)], (8, 6), seed=9, backend="numpy")
    launched: list[tuple[Any, ...]] = []
    backend = HostBackend(host_kernels, _recording(host_kernels, launched))
    order = EpochOrder.shard(sampler.n_patches, shuffle=True, rank=1, world_size=4)
    result = backend.draw(sampler._tables, order, 7, sampler.seed)
    assert len(launched) == 1
    values = dict(zip((name for name, _ in SAMPLE_EPOCH_PARAMS), launched[0], strict=True))
    assert values["indices"] is NULL_POINTER, "the kernel computes every row's index"
    assert (values["first_position"], values["position_step"], values["shuffle"]) == (1, 4, 1)
    for column, name in zip(result, OUTPUT_PARAMS, strict=True):
        assert column is values[name], name
    batch = sampler.sample_epoch(7, shuffle=True, rank=1, world_size=4)
    _assert_same_draws((batch.data_idx, batch.sample_idx, batch.coords, batch.indices), result)


# -- inconsistent tables never make the kernel leave its arrays ------------------------

_FUZZ_SCRIPT = textwrap.dedent(
    """
    import ctypes, itertools, sys
    import numpy as np

    from gpu_patching import StratifiedPatching
    from gpu_patching.backends.cuda_backend import pack_sample_table, split_sample_table

    # The host launcher of the shipped sample_epoch (tests/host_launch.py).
    launch_entry = getattr(ctypes.CDLL(sys.argv[1]), sys.argv[2])

    class Launch(ctypes.Structure):
        _fields_ = [
            ("grid", ctypes.c_longlong * 3),
            ("block", ctypes.c_longlong * 3),
            ("order_seed", ctypes.c_ulonglong),
            ("only_pair", ctypes.c_longlong),
        ]

    generator = np.random.default_rng(12345)
    P = ctypes.c_void_p
    L = ctypes.c_longlong

    def real_tables():
        ndim = int(generator.choice([2, 3]))
        patch = [int(p) for p in generator.integers(1, 5, size=ndim)]
        shapes = [
            (int(generator.integers(1, 3)), 1,
             *(p + int(generator.integers(0, 3 * p + 3)) for p in patch))
            for _ in range(int(generator.integers(1, 3)))
        ]
        sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
        tables = sampler._tables
        for data_idx, shape in enumerate(shapes):
            for sample_idx in range(shape[0]):
                grid = tables.sample_grid(tables.sample_id(data_idx, sample_idx))
                cells = list(itertools.product(*map(range, grid)))
                picks = generator.integers(0, len(cells), size=len(cells) // 3)
                if generator.random() < 0.5 and len(picks):
                    sampler.exclude_patches(data_idx, sample_idx, [cells[k] for k in picks])
                if generator.random() < 0.5:
                    sampler.set_region_probs(
                        data_idx, sample_idx, {cells[0]: 0.0, cells[-1]: 3.0}
                    )
        views = split_sample_table(pack_sample_table(tables), tables.n_samples, ndim)
        arrays = [views[name].copy() for name in (
            "patch_offset", "n_patches", "mass_offset", "region_offset",
            "grid_shape", "spatial_shape", "patch_size", "stack_of_sample",
            "sample_in_stack")]
        arrays += [tables.mass_prefix.copy(), tables.weight.copy(),
                   tables.subbox_mask.copy()]
        return ndim, tables.n_samples, tables.mass_prefix.size, arrays

    def corrupt(array):
        # A few entries replaced by values around the array's own range: the
        # tables stay plausible, so the draw gets deep before it goes wrong.
        span = int(np.abs(array.astype(np.int64)).max()) + 3
        for _ in range(int(generator.integers(1, 4))):
            position = int(generator.integers(0, array.size))
            if array.dtype == np.uint8:
                array[position] = int(generator.integers(0, 256))
            else:
                array[position] = int(generator.integers(-span, 2 * span))

    for trial in range(300):
        ndim, n_samples, n_regions, arrays = real_tables()
        if trial % 10 == 0:
            ndim = int(generator.choice([0, 1, 4]))  # unsupported: rows of -1
        if trial % 10 != 1:  # every tenth trial runs the intact tables
            for k in generator.choice(len(arrays), size=int(generator.integers(1, 4))):
                if arrays[k].size:
                    corrupt(arrays[k])
        total = min(max(int(arrays[0][-1]), 0), 10**6)
        n_rows = int(generator.integers(1, 200))
        first_position = int(generator.integers(-3, max(total, 1) + 3))
        # Rows without an index array take, a third each, a plain range, a
        # shard (any step, wrapping round any length, shuffled or not), or
        # absurd order values.
        position_step, n_positions, shuffle = 1, 0, 0
        mode = (trial // 2) % 3
        if mode == 1:
            position_step = int(generator.integers(1, 5))
            n_positions = int(generator.integers(0, total + 3))
            shuffle = int(generator.integers(0, 2))
        elif mode == 2:
            first_position = int(generator.integers(-(2**63), 2**63 - 1))
            position_step = int(generator.integers(-(2**63), 2**63 - 1))
            n_positions = int(generator.integers(-(2**63), 2**63 - 1))
            shuffle = int(generator.integers(0, 2))
        indices = generator.integers(-3, total + 3, size=n_rows, dtype=np.int64)
        use_indices = trial % 2 == 0
        # Every output its own allocation of exactly its documented length (so
        # ASan catches a write past it), filled with a value no row can hold.
        sentinel = -(2**62)
        data_idx, sample_idx, patch_index = (
            np.full(n_rows, sentinel, dtype=np.int64) for _ in range(3)
        )
        coords = np.full(n_rows * max(ndim, 0), sentinel, dtype=np.int64)
        # Any launch shape: one thread, fewer threads than rows, more than rows.
        launch = Launch(
            (ctypes.c_longlong * 3)(int(generator.integers(1, 5)), 1, 1),
            (ctypes.c_longlong * 3)(int(generator.integers(1, 65)), 1, 1),
            trial + 1,
            -1,
        )
        launch_entry(
            ctypes.byref(launch),
            *[P(a.ctypes.data if a.size else None) for a in arrays],
            L(n_samples), L(n_regions), ctypes.c_int(ndim),
            P(indices.ctypes.data if use_indices else None),
            L(first_position), L(position_step), L(n_positions), ctypes.c_int(shuffle),
            L(n_rows),
            ctypes.c_uint(int(generator.integers(0, 2**32))),
            ctypes.c_ulonglong(int(generator.integers(0, 2**63))),
            P(data_idx.ctypes.data), P(sample_idx.ctypes.data),
            P(coords.ctypes.data if coords.size else None),
            P(patch_index.ctypes.data),
        )
        # Every value of every row written; a row is either failed (-1 in
        # every column) or carries the index it was asked for.
        for column in (data_idx, sample_idx, coords, patch_index):
            assert (column != sentinel).all(), trial
        failed = patch_index == -1
        if use_indices or mode == 0:
            wanted = indices if use_indices else first_position + np.arange(n_rows)
            assert (patch_index[~failed] == wanted[~failed]).all(), trial
        assert (data_idx[failed] == -1).all() and (sample_idx[failed] == -1).all(), trial
        assert (coords.reshape(n_rows, -1)[failed] == -1).all(), trial
    print("ok")
    """
)


def test_host_kernel_stays_in_bounds_on_inconsistent_tables(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Corrupted tables (right lengths, wrong contents) under AddressSanitizer.

    The shipped kernel, launched on the host over random grid shapes. Real
    tables with a few entries overwritten: every array is its own
    allocation with red zones, so a read or write outside the lengths
    documented on ``TableView`` aborts the child process, and
    UndefinedBehaviorSanitizer aborts it on a division by zero.
    """
    try:
        result = run_under_sanitizers(
            tmp_path_factory.mktemp("host_kernels_asan"), SAMPLE_EPOCH, _FUZZ_SCRIPT
        )
    except SanitizerUnavailable as reason:
        pytest.skip(str(reason))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]


@pytest.mark.parametrize("shape", [(2, 1, 20, 24), (1, 2, 9, 13, 11)])
def test_the_kernel_built_with_nvrtcs_integer_types_equals_numpy(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    """common.cuh spells gp::u8/u32/i64/u64 apart for NVRTC (no <cstdint> there).

    The host build otherwise never runs that branch, so here the kernels are
    built with ``__CUDACC_RTC__`` defined: the integer types a GPU gets under
    NVRTC must draw, bit for bit, what NumPy draws.
    """
    if _cxx() is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    kernels = HostKernels(tmp_path, ["-D__CUDACC_RTC__"], files=["sample_epoch.cu"])
    sampler = StratifiedPatching([shape], (4,) * (len(shape) - 2), seed=2**40 + 9, backend="numpy")
    sampler.set_region_probs(0, 0, {(0,) * (len(shape) - 2): 3.5, (1,) * (len(shape) - 2): 0.25})
    tables = sampler._tables
    indices = np.arange(tables.total_patches)
    for draw in (0, 2**32 - 1):
        expected = NumpyBackend().draw(tables, indices, draw, sampler.seed)
        actual = HostBackend(kernels).draw(tables, indices, draw, sampler.seed)
        _assert_same_draws(expected, actual)
