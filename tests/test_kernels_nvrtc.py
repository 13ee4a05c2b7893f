"""The kernels compile with NVRTC, and the launch code matches their C signature.

NVRTC comes from the ``nvidia-cuda-nvrtc-cu12`` wheel and needs no GPU, so
these checks run in CI: the exact source CuPy is handed compiles for every
architecture we support, and the Python argument tuple has the order and the
exact scalar widths of the kernel's parameters.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from gpu_patching import StratifiedPatching, cuda
from gpu_patching.backends.cuda_backend import (
    OUTPUT_PARAMS,
    _launch_args,
    pack_sample_table,
    split_sample_table,
)
from gpu_patching.cuda import compile_options, kernel_source, launch_grid
from gpu_patching.kernels import KERNELS
from gpu_patching.kernels.descriptor import (
    C_SCALAR_TYPES,
    NULL_POINTER,
    THREADS_PER_BLOCK,
    kernel_dir,
)
from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH
from gpu_patching.permutation import EpochOrder

KERNEL_NAME = SAMPLE_EPOCH.name
SAMPLE_EPOCH_PARAMS = SAMPLE_EPOCH.params

ARCHITECTURES = ["compute_70", "compute_90"]

# -- NVRTC through ctypes --------------------------------------------------------------


def _nvrtc_library() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(glob.glob(str(Path(root) / "cuda_nvrtc" / "lib" / "libnvrtc.so*")))
        if found:
            return Path(found[0])
    return None


@pytest.fixture(scope="module")
def nvrtc() -> ctypes.CDLL:
    library = _nvrtc_library()
    if library is None:
        pytest.skip(
            "NVRTC is not installed: pip install nvidia-cuda-nvrtc-cu12 "
            "(Linux) to compile the kernels without a GPU"
        )
    lib = ctypes.CDLL(str(library))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _compile(nvrtc: ctypes.CDLL, source: str, name: str, options: list[str]) -> str:
    """Compile one source to PTX; fail with NVRTC's log on any error."""
    return _compile_lowered(nvrtc, source, name, options, ())[0]


def _compile_lowered(
    nvrtc: ctypes.CDLL,
    source: str,
    name: str,
    options: list[str],
    name_expressions: tuple[str, ...],
) -> tuple[str, dict[str, str]]:
    """Compile to PTX with template name expressions, as CuPy's RawModule does.

    Returns the PTX and the lowered (mangled) entry name of each expression.
    """
    program = ctypes.c_void_p()
    status = nvrtc.nvrtcCreateProgram(
        ctypes.byref(program), source.encode(), name.encode(), 0, None, None
    )
    assert status == 0, nvrtc.nvrtcGetErrorString(status).decode()
    try:
        for expression in name_expressions:
            status = nvrtc.nvrtcAddNameExpression(program, expression.encode())
            assert status == 0, nvrtc.nvrtcGetErrorString(status).decode()
        encoded = [option.encode() for option in options]
        status = nvrtc.nvrtcCompileProgram(
            program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)
        )
        log_size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        message = nvrtc.nvrtcGetErrorString(status).decode()
        assert status == 0, f"NVRTC failed on {name} ({message}):\n{log.value.decode()}"
        ptx_size = ctypes.c_size_t()
        assert nvrtc.nvrtcGetPTXSize(program, ctypes.byref(ptx_size)) == 0
        ptx = ctypes.create_string_buffer(ptx_size.value)
        assert nvrtc.nvrtcGetPTX(program, ptx) == 0
        lowered = {}
        for expression in name_expressions:
            mangled = ctypes.c_char_p()
            status = nvrtc.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(mangled))
            assert status == 0, nvrtc.nvrtcGetErrorString(status).decode()
            lowered[expression] = mangled.value.decode()
        return ptx.value.decode(), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_epoch_kernel_compiles_with_nvrtc(nvrtc: ctypes.CDLL, architecture: str) -> None:
    # kernel_code() is the exact text CuPy compiles (digest line included).
    options = [*compile_options(), f"--gpu-architecture={architecture}"]
    ptx = _compile(nvrtc, kernel_source(SAMPLE_EPOCH.file), SAMPLE_EPOCH.file, options)
    assert re.search(rf"\.entry\s+{KERNEL_NAME}\s*\(", ptx), "no sample_epoch entry"
    # One thread keeps its few values in registers: no local-memory stack.
    assert ".local" not in ptx


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("source", sorted(p.name for p in kernel_dir().glob("*.cu")))
def test_every_kernel_file_compiles_with_nvrtc(
    nvrtc: ctypes.CDLL, source: str, architecture: str
) -> None:
    options = [*compile_options(), f"--gpu-architecture={architecture}"]
    ptx = _compile(nvrtc, (kernel_dir() / source).read_text(), source, options)
    assert ".entry" in ptx


# -- the C signature -------------------------------------------------------------------


def test_the_kernel_descriptions_are_every_global_function_of_the_sources() -> None:
    # Every __global__ function of every .cu file is described (and so
    # compiled, marshalled and launched on the host by the tests), and every
    # description names one.
    described = {(kernel.file, kernel.name.split("<")[0]) for kernel in KERNELS}
    found = set()
    for path in kernel_dir().glob("*.cu"):
        text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", path.read_text(), flags=re.DOTALL)
        for name in re.findall(r"__global__\s+void\s+(\w+)\s*\(", text):
            found.add((path.name, name))
    assert found == described


@pytest.mark.parametrize(
    ("c_type", "c_scalar"),
    [
        ("int", ctypes.c_int),
        ("unsigned int", ctypes.c_uint),
        ("long long", ctypes.c_longlong),
        ("unsigned long long", ctypes.c_ulonglong),
        ("unsigned char", ctypes.c_ubyte),
    ],
)
def test_numpy_twin_of_each_c_type_has_its_width_and_sign(
    c_type: str, c_scalar: type[ctypes._SimpleCData]
) -> None:
    dtype = np.dtype(C_SCALAR_TYPES[c_type])
    assert dtype.itemsize == ctypes.sizeof(c_scalar)
    assert (dtype.kind == "i") == (not c_type.startswith("unsigned"))


def test_every_kernel_parameter_type_has_a_numpy_twin() -> None:
    for name, c_type in SAMPLE_EPOCH_PARAMS:
        base = c_type.removeprefix("const ").removesuffix("*")
        assert base in C_SCALAR_TYPES, f"{name}: {c_type}"


# -- the argument tuple ----------------------------------------------------------------


def _small_tables(ndim: int):
    shapes = [(2, 1, 20, 18), (1, 1, 9, 30)] if ndim == 2 else [(2, 1, 9, 10, 11)]
    patch = (4, 5) if ndim == 2 else (3, 3, 4)
    sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
    return sampler._tables


def _outputs(n_rows: int, ndim: int) -> tuple[np.ndarray, ...]:
    """Output arrays of a launch of ``n_rows`` rows, in OUTPUT_PARAMS order."""
    return tuple(
        np.empty((n_rows, ndim) if name == "coords" else n_rows, dtype=np.int64)
        for name in OUTPUT_PARAMS
    )


def _args_for(
    tables, *, indices=None, n_rows=None, draw=3, seed=2**64 - 1, outputs=None, order=None
):
    n_rows = tables.total_patches if n_rows is None else n_rows
    arrays = split_sample_table(pack_sample_table(tables), tables.n_samples, tables.ndim)
    outputs = _outputs(n_rows, tables.ndim) if outputs is None else outputs
    if indices is None:
        rows = EpochOrder.contiguous(0, n_rows) if order is None else order
    else:
        rows = indices
    return _launch_args(tables, arrays, rows, draw, seed, outputs)


@pytest.mark.parametrize("ndim", [2, 3])
def test_launch_args_scalars_are_numpy_scalars_of_the_exact_c_type(ndim: int) -> None:
    tables = _small_tables(ndim)
    args = _args_for(tables)
    assert len(args) == len(SAMPLE_EPOCH_PARAMS)
    for (name, c_type), value in zip(SAMPLE_EPOCH_PARAMS, args, strict=True):
        if c_type.endswith("*"):
            if name == "indices":
                # A null pointer (the kernel computes the index): a 64-bit
                # zero, never None, which CuPy passes as 0xffffffff.
                assert value is NULL_POINTER
                assert type(value) is np.uint64 and value == 0
                continue
            element = C_SCALAR_TYPES[c_type.removeprefix("const ").removesuffix("*")]
            assert isinstance(value, np.ndarray), name
            assert value.dtype == np.dtype(element), name
            assert value.flags.c_contiguous, name
        else:
            assert type(value) is C_SCALAR_TYPES[c_type], f"{name}: {type(value)}"
    values = dict(zip((n for n, _ in SAMPLE_EPOCH_PARAMS), args, strict=True))
    np.testing.assert_array_equal(values["stack_of_sample"], tables.stack_of_sample)
    np.testing.assert_array_equal(values["sample_in_stack"], tables.sample_in_stack)
    assert values["ndim"] == ndim
    assert values["n_samples"] == tables.n_samples
    assert values["n_regions"] == tables.mass_prefix.size
    assert values["seed"] == np.uint64(2**64 - 1)


def test_launch_args_pass_an_index_array_through() -> None:
    tables = _small_tables(2)
    indices = np.arange(5, dtype=np.int64)
    args = _args_for(tables, indices=indices, n_rows=5)
    position = [name for name, _ in SAMPLE_EPOCH_PARAMS].index("indices")
    assert args[position] is indices


def test_launch_args_pass_the_output_arrays_through_in_order() -> None:
    # The kernel writes the result into these very arrays; the backend returns
    # them as they are.
    tables = _small_tables(3)
    outputs = _outputs(7, tables.ndim)
    args = _args_for(tables, n_rows=7, outputs=outputs)
    names = [name for name, _ in SAMPLE_EPOCH_PARAMS]
    assert names[-len(OUTPUT_PARAMS) :] == list(OUTPUT_PARAMS)
    for name, array in zip(OUTPUT_PARAMS, outputs, strict=True):
        assert args[names.index(name)] is array, name


def test_every_sample_array_is_packed_once() -> None:
    # The per-sample pointers of the kernel are exactly the packed arrays.
    tables = _small_tables(2)
    packed = split_sample_table(pack_sample_table(tables), tables.n_samples, tables.ndim)
    pointers = [name for name, c_type in SAMPLE_EPOCH_PARAMS if c_type.startswith("const")]
    per_region = {"mass_prefix", "weight", "subbox_mask", "indices"}
    assert sorted(packed) == sorted(set(pointers) - per_region)
    for name, view in packed.items():
        np.testing.assert_array_equal(view, np.asarray(getattr(tables, name)).reshape(-1))


@pytest.mark.parametrize(
    ("field", "value"), [("draw", 2**32), ("draw", -1), ("seed", 2**64), ("seed", -1)]
)
def test_launch_args_refuse_scalars_that_do_not_fit_their_c_type(field: str, value: int) -> None:
    tables = _small_tables(2)
    parameter = "draw_number" if field == "draw" else "seed"
    with pytest.raises(ValueError, match=parameter):
        _args_for(tables, **{field: value})


def test_launch_args_refuse_a_table_of_the_wrong_dtype_or_length() -> None:
    tables = _small_tables(2)
    tables.weight = tables.weight.astype(np.int32)
    with pytest.raises(TypeError, match="weight"):
        _args_for(tables)
    tables = _small_tables(2)
    tables.subbox_mask = tables.subbox_mask[:-1]
    with pytest.raises(ValueError, match="subbox_mask"):
        _args_for(tables)
    tables = _small_tables(2)
    with pytest.raises(ValueError, match="indices"):
        _args_for(tables, indices=np.arange(4, dtype=np.int64).reshape(2, 2), n_rows=4)
    with pytest.raises(TypeError, match="indices"):
        _args_for(tables, indices=np.arange(4, dtype=np.int32), n_rows=4)


def test_launch_args_take_the_rows_from_the_index_array() -> None:
    # An index array sets the row count: outputs of another length are refused.
    tables = _small_tables(2)
    with pytest.raises(ValueError, match="data_idx"):
        _args_for(tables, indices=np.arange(3, dtype=np.int64), n_rows=4)


def test_launch_args_carry_the_epoch_order_of_a_shuffled_shard() -> None:
    tables = _small_tables(2)
    n = tables.total_patches
    order = EpochOrder.shard(n, shuffle=True, rank=2, world_size=3)
    args = _args_for(tables, n_rows=order.n_rows, order=order)
    values = dict(zip((name for name, _ in SAMPLE_EPOCH_PARAMS), args, strict=True))
    assert values["indices"] is NULL_POINTER
    assert values["first_position"] == 2 and values["position_step"] == 3
    assert values["n_positions"] == n and values["shuffle"] == 1
    assert values["n_rows"] == -(-n // 3)
    assert type(values["shuffle"]) is np.int32


def test_launch_args_of_an_index_array_leave_the_order_inert() -> None:
    tables = _small_tables(2)
    args = _args_for(tables, indices=np.arange(5, dtype=np.int64), n_rows=5)
    values = dict(zip((name for name, _ in SAMPLE_EPOCH_PARAMS), args, strict=True))
    assert values["shuffle"] == 0 and values["n_positions"] == 0 and values["n_rows"] == 5


@pytest.mark.parametrize("name", OUTPUT_PARAMS)
def test_launch_args_refuse_an_output_of_the_wrong_dtype_or_length(name: str) -> None:
    tables = _small_tables(2)
    position = OUTPUT_PARAMS.index(name)
    short = list(_outputs(4, tables.ndim))
    short[position] = short[position][:-1]
    with pytest.raises(ValueError, match=name):
        _args_for(tables, n_rows=4, outputs=tuple(short))
    narrow = list(_outputs(4, tables.ndim))
    narrow[position] = narrow[position].astype(np.int32)
    with pytest.raises(TypeError, match=name):
        _args_for(tables, n_rows=4, outputs=tuple(narrow))
    with pytest.raises(ValueError, match="output arrays"):
        _args_for(tables, n_rows=4, outputs=_outputs(4, tables.ndim)[:3])


def _rows_of_each_thread(n_rows: int, blocks: int, threads: int) -> list[int]:
    """The rows the kernel's grid-stride loop visits, over all threads."""
    stride = blocks * threads
    visited: list[int] = []
    for thread in range(stride):
        visited.extend(range(thread, n_rows, stride))
    return visited


@pytest.mark.parametrize("n_rows", [0, 1, 255, 256, 257, 1000, 4097])
def test_launch_grid_covers_every_row_exactly_once(n_rows: int) -> None:
    blocks, threads = launch_grid(n_rows)
    assert blocks >= 1 and threads == THREADS_PER_BLOCK
    assert blocks * threads >= n_rows
    assert sorted(_rows_of_each_thread(n_rows, blocks, threads)) == list(range(n_rows))


def test_launch_grid_stays_within_cuda_limits_for_huge_epochs() -> None:
    blocks, threads = launch_grid(2**45)
    assert 1 <= blocks <= 2**31 - 1 and threads <= 1024


def test_grid_stride_covers_every_row_when_the_grid_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cuda, "MAX_GRID_X", 3)
    blocks, threads = launch_grid(1000, threads=32)
    assert blocks == 3 and blocks * threads < 1000
    assert sorted(_rows_of_each_thread(1000, blocks, threads)) == list(range(1000))
