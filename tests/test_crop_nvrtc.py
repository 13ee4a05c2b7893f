"""The crop kernels compile with NVRTC, and their argument tuples have the C widths.

The NVRTC helpers (the ``nvrtc`` fixture, ``_compile``) are the epoch kernel's,
imported from ``test_kernels_nvrtc``; like there, no GPU is needed. The
parameters themselves are parsed from the source (``test_kernel_signatures``).
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest
import test_kernels_nvrtc
from test_kernels_nvrtc import ARCHITECTURES, _compile_lowered

from gpu_patching.crop import (
    STACK_FIELDS,
    check_launch_args,
    crop_launch,
    crop_launch_args,
    stack_table,
)
from gpu_patching.cuda import compile_options, kernel_source, name_expressions
from gpu_patching.kernels.crop_patches import (
    CHECK_CROP_ROWS,
    CROP_LINES_PER_THREAD,
    CROP_THREADS_PER_BLOCK,
    ELEMENT_C_TYPES,
    crop_kernel,
)
from gpu_patching.kernels.descriptor import C_SCALAR_TYPES, kernel_dir

# The epoch kernel's NVRTC fixture, shared: pytest passes it to the tests by name.
nvrtc = test_kernels_nvrtc.nvrtc

ITEMSIZES = sorted(ELEMENT_C_TYPES)
CROP_FILE = CHECK_CROP_ROWS.file
CHECK_PARAMS = CHECK_CROP_ROWS.params

# -- NVRTC -----------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_crop_kernels_compile_with_nvrtc(nvrtc: ctypes.CDLL, architecture: str) -> None:
    # kernel_source() and name_expressions() are exactly what CuPy's RawModule
    # is handed (digest line included); every instantiation gets an entry.
    options = [*compile_options(), f"--gpu-architecture={architecture}"]
    expressions = name_expressions(CROP_FILE)
    assert expressions == tuple(crop_kernel(size).name for size in ITEMSIZES)
    ptx, lowered = _compile_lowered(
        nvrtc, kernel_source(CROP_FILE), CROP_FILE, options, expressions
    )
    for entry in [*lowered.values(), CHECK_CROP_ROWS.name]:
        assert re.search(rf"\.entry\s+{re.escape(entry)}\s*\(", ptx), f"no {entry} entry"
    assert len(set(lowered.values())) == len(ITEMSIZES)
    # The per-thread line buffer stays in registers: no local-memory stack.
    assert ".local" not in ptx


def test_kernel_source_names_every_kernel_source_in_its_digest() -> None:
    first, rest = kernel_source(CROP_FILE).split("\n", 1)
    assert re.fullmatch(r"// gpu-patching kernel sources sha256 [0-9a-f]{64}", first)
    assert rest == (kernel_dir() / CROP_FILE).read_text()


# -- the C types ------------------------------------------------------------------------


def test_element_types_are_unsigned_integers_of_each_size() -> None:
    widths = {
        "unsigned char": ctypes.c_ubyte,
        "unsigned short": ctypes.c_ushort,
        "unsigned int": ctypes.c_uint,
        "unsigned long long": ctypes.c_ulonglong,
    }
    for itemsize, c_type in ELEMENT_C_TYPES.items():
        assert ctypes.sizeof(widths[c_type]) == itemsize
        assert crop_kernel(itemsize).params[-1] == ("out", f"{c_type}*")
        assert np.dtype(C_SCALAR_TYPES[c_type]).itemsize == itemsize


@pytest.mark.parametrize(
    ("c_type", "c_scalar"), [("int", ctypes.c_int), ("long long", ctypes.c_longlong)]
)
def test_numpy_twin_of_each_scalar_type_has_its_width_and_sign(
    c_type: str, c_scalar: type[ctypes._SimpleCData]
) -> None:
    dtype = np.dtype(C_SCALAR_TYPES[c_type])
    assert dtype.itemsize == ctypes.sizeof(c_scalar) and dtype.kind == "i"


def test_every_scalar_parameter_has_a_numpy_twin() -> None:
    for name, c_type in (*crop_kernel(4).params, *CHECK_PARAMS):
        if c_type.endswith("*"):
            base = c_type.removeprefix("const ").removesuffix("*")
            assert base == "long long" or base in ELEMENT_C_TYPES.values(), name
        else:
            assert c_type in C_SCALAR_TYPES, name


# -- the argument tuples ---------------------------------------------------------------


def _host_case(ndim: int, dtype: type[np.generic], n_rows: int = 5):
    stacks = [np.zeros((2, 3, 9, 10, 11)[:2] + (9, 10, 11)[-ndim:], dtype=dtype) for _ in range(2)]
    itemsize = np.dtype(dtype).itemsize
    table = stack_table(
        [s.ctypes.data for s in stacks],
        [s.shape for s in stacks],
        [tuple(v // itemsize for v in s.strides) for s in stacks],
    )
    rows = (
        np.zeros(n_rows, dtype=np.int64),
        np.zeros(n_rows, dtype=np.int64),
        np.zeros(n_rows * ndim, dtype=np.int64),
    )
    patch = (2, 3, 4)[-ndim:]
    out = np.empty((n_rows, 3, *patch), dtype=dtype)
    return stacks, table, rows, patch, out


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.float16, np.uint16, np.int32, np.float32, np.float64]
)
def test_crop_launch_args_scalars_are_numpy_scalars_of_the_exact_c_type(
    ndim: int, dtype: type[np.generic]
) -> None:
    _, table, rows, patch, out = _host_case(ndim, dtype)
    args = crop_launch_args(table, rows, 5, 3, patch, out)
    params = crop_kernel(np.dtype(dtype).itemsize).params
    assert len(args) == len(params)
    for (name, c_type), value in zip(params, args, strict=True):
        if c_type.endswith("*"):
            assert isinstance(value, np.ndarray) and value.flags.c_contiguous, name
        else:
            assert type(value) is C_SCALAR_TYPES[c_type], f"{name}: {type(value)}"
    values = dict(zip((n for n, _ in params), args, strict=True))
    assert values["stack_table"] is table and values["out"] is out
    assert (values["data_idx"], values["sample_idx"], values["coords"]) == rows
    assert values["n_stacks"] == 2 and values["ndim"] == ndim and values["n_rows"] == 5
    assert values["n_channels"] == 3
    assert (values["patch_z"], values["patch_y"], values["patch_x"]) == (
        (1, 3, 4) if ndim == 2 else (2, 3, 4)
    )


def test_check_launch_args_scalars_are_numpy_scalars_of_the_exact_c_type() -> None:
    _, table, rows, patch, _ = _host_case(3, np.float32)
    first_bad = np.array([5], dtype=np.int64)
    args = check_launch_args(table, rows, 5, patch, first_bad)
    for (name, c_type), value in zip(CHECK_PARAMS, args, strict=True):
        if not c_type.endswith("*"):
            assert type(value) is C_SCALAR_TYPES[c_type], name
    assert args[-1] is first_bad


def test_crop_launch_args_refuse_arrays_of_the_wrong_dtype_length_or_layout() -> None:
    _, table, rows, patch, out = _host_case(2, np.float32)
    with pytest.raises(TypeError, match="stack_table"):
        crop_launch_args(table.astype(np.int32), rows, 5, 3, patch, out)
    with pytest.raises(ValueError, match="stack_table"):
        crop_launch_args(table[:, :10], rows, 5, 3, patch, out)
    with pytest.raises(ValueError, match="coords"):
        crop_launch_args(table, (rows[0], rows[1], rows[2][:-1]), 5, 3, patch, out)
    with pytest.raises(TypeError, match="data_idx"):
        crop_launch_args(table, (rows[0].astype(np.int32), rows[1], rows[2]), 5, 3, patch, out)
    with pytest.raises(ValueError, match="sample_idx"):
        crop_launch_args(table, (rows[0], np.zeros(10, np.int64)[::2], rows[2]), 5, 3, patch, out)
    with pytest.raises(ValueError, match="out"):
        crop_launch_args(table, rows, 5, 3, patch, out[:4])
    with pytest.raises(ValueError, match="out"):
        crop_launch_args(table, rows, 5, 3, patch, np.asfortranarray(out))
    with pytest.raises(ValueError, match="1, 2, 4 or 8 bytes"):
        crop_launch_args(table, rows, 5, 3, patch, np.zeros(out.shape, np.complex128))
    with pytest.raises(ValueError, match="2 or 3 spatial dimensions"):
        crop_launch_args(table, rows, 5, 3, (1, 2, 3, 4), out)
    with pytest.raises(ValueError, match="first_bad"):
        check_launch_args(table, rows, 5, patch, np.zeros(2, dtype=np.int64))


def test_crop_kernel_name_covers_each_element_size_only() -> None:
    assert [crop_kernel(size).name for size in ITEMSIZES] == [
        "crop_patches<unsigned char>",
        "crop_patches<unsigned short>",
        "crop_patches<unsigned int>",
        "crop_patches<unsigned long long>",
    ]
    for size in (0, 3, 16, "4", None):
        with pytest.raises(ValueError, match=repr(size)):
            crop_kernel(size)  # type: ignore[arg-type]


def test_stack_table_rows_hold_address_shape_and_strides() -> None:
    table = stack_table(
        [2**64 - 8, 16], [(2, 3, 4, 5), (1, 1, 6, 7, 8)], [(60, 20, 5, 1), (-336, 336, 56, 8, 1)]
    )
    assert table.shape == (2, STACK_FIELDS) and table.dtype == np.int64
    assert table[0].tolist() == [-8, 2, 3, 1, 4, 5, 60, 20, 0, 5, 1]
    assert table[1].tolist() == [16, 1, 1, 6, 7, 8, -336, 336, 56, 8, 1]
    with pytest.raises(ValueError, match="empty axis"):
        stack_table([0], [(0, 1, 2, 2)], [(4, 4, 2, 1)])


# -- the launch configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "n_channels", "patch"),
    [
        (256, 1, (64, 64)),
        (4096, 1, (32, 64, 64)),
        (1, 3, (1, 1)),
        (7, 2, (5, 300)),
        (10, 1, (2, 3, 17)),
        (0, 1, (4, 4)),
        (2**33, 1, (70000, 8)),
    ],
)
def test_crop_launch_stays_within_cuda_limits_and_covers_a_patch(
    n_rows: int, n_channels: int, patch: tuple[int, ...]
) -> None:
    launch = crop_launch(n_rows, n_channels, patch)
    threads_x, threads_y = launch.block
    assert threads_x % 32 == 0 and 1 <= threads_x * threads_y <= 1024
    assert threads_x >= min(patch[-1], CROP_THREADS_PER_BLOCK)
    assert 1 <= launch.grid[0] <= 2**31 - 1 and 1 <= launch.grid[1] <= 65535
    assert launch.grid[0] == min(max(n_rows, 1), 2**31 - 1)
    lines = n_channels * int(np.prod(patch[:-1]))
    chunks = -(-lines // (threads_y * CROP_LINES_PER_THREAD))
    assert launch.grid[1] == min(chunks, 65535)
