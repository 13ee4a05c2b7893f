"""The per-patch draw on a CUDA device: one kernel launch per epoch.

The kernel source lives beside this module in ``gpu_patching/kernels``
(``sample_epoch.cu`` and the ``__host__ __device__`` headers it includes); it
is the CUDA twin of :mod:`gpu_patching.backends.numpy_backend` and returns the
same integers bit for bit. CuPy compiles it with NVRTC on first use, once per
device, with :data:`COMPILE_OPTIONS` (no FMA contraction: the draw is integer
arithmetic, and it stays exact if that ever changes).

Launch contract (checked by the test suite without a GPU):

* :data:`SAMPLE_EPOCH_PARAMS` lists the kernel's parameters, names and C types
  in order; a test parses the C signature of ``sample_epoch`` and compares.
* :func:`_launch_args` is the only place that builds the argument tuple. It is
  driven by :data:`SAMPLE_EPOCH_PARAMS`, passes arrays through as pointers and
  makes every scalar a NumPy scalar of the exact C width (:data:`C_SCALAR_TYPES`):
  CuPy passes a bare Python int as 64 bits, and an ``int`` parameter would then
  read garbage.
* :func:`launch_grid` sizes the grid; the kernel's grid-stride loop covers
  every row exactly once for any grid size.

Indices: :meth:`CudaBackend.draw` takes an
:class:`~gpu_patching.permutation.EpochOrder` (the kernel computes each row's
index from the row number: position, wrap for a DDP shard's padding, and the
seed-and-epoch keyed permutation when shuffling; no index array exists), a
``range`` with step 1 (a plain order), or an array of arbitrary indices (read
through a pointer). Each is one launch (an index array that is not
C-contiguous int64 is converted first, which is a copy). A range is checked
against ``[0, total_patches)`` on the host, and an order is built within it;
an index array is not checked (that would need a device reduction and a
synchronisation): a row whose index is out of range is written as ``-1`` in
every column rather than raising as NumPy does.

Outputs: the kernel writes all four columns of the result (``data_idx``,
``sample_idx``, ``coords`` and the global index of each row) into arrays made
with ``cupy.empty``, which allocates without launching anything. An epoch is
therefore exactly one kernel launch, and the arrays returned are the very
arrays the kernel wrote.

Tables: the per-region arrays (``mass_prefix``, ``weight``, ``subbox_mask``)
are CuPy arrays that stay on the device. The small per-sample arrays
(``stack_of_sample`` and ``sample_in_stack`` included) are NumPy on the host;
they are packed into one int64 buffer, uploaded in one copy (a memory copy,
not a kernel), and the upload is reused while their contents are unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._arrays import to_host
from ..permutation import EpochOrder
from ..tables import RegionTables

__all__ = [
    "COMPILE_OPTIONS",
    "C_SCALAR_TYPES",
    "KERNEL_NAME",
    "NULL_POINTER",
    "OUTPUT_PARAMS",
    "SAMPLE_EPOCH_PARAMS",
    "THREADS_PER_BLOCK",
    "CudaBackend",
    "compile_options",
    "kernel_code",
    "kernel_dir",
    "launch_grid",
    "pack_sample_table",
    "split_sample_table",
]

#: NVRTC options of every compile of the kernels (the include path is added by
#: :func:`compile_options`). CuPy adds the target architecture.
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false")
#: The ``.cu`` file that holds the epoch kernel, and its entry point.
KERNEL_FILE = "sample_epoch.cu"
KERNEL_NAME = "sample_epoch"
#: Threads per block of the epoch kernel.
THREADS_PER_BLOCK = 256
# CUDA's limit on gridDim.x.
_MAX_BLOCKS = (1 << 31) - 1

#: Parameters of ``sample_epoch`` in order, as ``(name, C type)``. This mirrors
#: the C signature in ``kernels/sample_epoch.cu`` (a test compares them) and
#: drives :func:`_launch_args`.
SAMPLE_EPOCH_PARAMS: tuple[tuple[str, str], ...] = (
    ("patch_offset", "const long long*"),
    ("n_patches", "const long long*"),
    ("mass_offset", "const long long*"),
    ("region_offset", "const long long*"),
    ("grid_shape", "const long long*"),
    ("spatial_shape", "const long long*"),
    ("patch_size", "const long long*"),
    ("stack_of_sample", "const long long*"),
    ("sample_in_stack", "const long long*"),
    ("mass_prefix", "const long long*"),
    ("weight", "const long long*"),
    ("subbox_mask", "const unsigned char*"),
    ("n_samples", "long long"),
    ("n_regions", "long long"),
    ("ndim", "int"),
    ("indices", "const long long*"),
    ("first_position", "long long"),
    ("position_step", "long long"),
    ("n_positions", "long long"),
    ("shuffle", "int"),
    ("n_rows", "long long"),
    ("draw_number", "unsigned int"),
    ("seed", "unsigned long long"),
    ("data_idx", "long long*"),
    ("sample_idx", "long long*"),
    ("coords", "long long*"),
    ("patch_index", "long long*"),
)

#: The output parameters of ``sample_epoch``, in order: the columns of a draw.
OUTPUT_PARAMS = ("data_idx", "sample_idx", "coords", "patch_index")

#: The NumPy scalar type of each C type used by the kernels; a pointer's
#: element type maps the same way (``const long long*`` -> int64 arrays).
C_SCALAR_TYPES: dict[str, type[np.generic]] = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
    "unsigned char": np.uint8,
}

#: The argument that passes a null pointer to a kernel: a 64-bit zero. CuPy
#: passes a NumPy scalar by value at its width, but turns ``None`` into the
#: address 0xffffffff, not 0 (cupy/cupy issue 9046).
NULL_POINTER = np.uint64(0)

# The per-sample host arrays packed into one buffer, in this order.
_SAMPLE_ARRAYS = (
    "patch_offset",
    "n_patches",
    "mass_offset",
    "region_offset",
    "grid_shape",
    "spatial_shape",
    "patch_size",
    "stack_of_sample",
    "sample_in_stack",
)


def kernel_dir() -> Path:
    """Return the folder that holds the kernel sources.

    Returns
    -------
    pathlib.Path
        ``gpu_patching/kernels`` of the installed package; it is also the
        include path of every compile.
    """
    return Path(str(importlib.resources.files("gpu_patching") / "kernels"))


def compile_options() -> tuple[str, ...]:
    """Return the NVRTC options of the kernels, include path included.

    Returns
    -------
    tuple of str
        :data:`COMPILE_OPTIONS` and ``-I<kernel_dir()>``.
    """
    return (*COMPILE_OPTIONS, f"-I{kernel_dir()}")


def kernel_source(file_name: str) -> str:
    """Return a ``.cu`` file of :func:`kernel_dir` as handed to CuPy.

    CuPy caches compiled kernels on disk keyed on the source text and the
    options, not on the headers that the source includes. The first line is
    therefore a digest of every file in :func:`kernel_dir`, so editing a header
    can never bring back a stale binary.

    Parameters
    ----------
    file_name : str
        The ``.cu`` file, e.g. ``"sample_epoch.cu"``.

    Returns
    -------
    str
        The file's text after one comment line.
    """
    folder = kernel_dir()
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.cu*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    source = (folder / file_name).read_text()
    return f"// gpu-patching kernel sources sha256 {digest.hexdigest()}\n{source}"


def kernel_code() -> str:
    """Return the source of the epoch kernel as handed to CuPy (see :func:`kernel_source`)."""
    return kernel_source(KERNEL_FILE)


def launch_grid(n_rows: int, threads: int = THREADS_PER_BLOCK) -> tuple[int, int]:
    """Return ``(blocks, threads)`` for a launch over ``n_rows`` rows.

    One thread per row while the grid allows it; beyond CUDA's block limit the
    kernel's grid-stride loop gives each thread several rows, so every row is
    covered exactly once for any result.

    Parameters
    ----------
    n_rows : int
        Number of output rows, ``>= 0``.
    threads : int, default THREADS_PER_BLOCK
        Threads per block.

    Returns
    -------
    blocks, threads : int
        At least one block.
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    blocks = min(max(1, math.ceil(n_rows / threads)), _MAX_BLOCKS)
    return blocks, threads


def pack_sample_table(tables: RegionTables) -> NDArray[np.int64]:
    """Pack the per-sample host arrays of the tables into one int64 buffer.

    Parameters
    ----------
    tables : RegionTables
        Tables of any backend (their per-sample arrays are NumPy).

    Returns
    -------
    numpy.ndarray of int64
        ``patch_offset, n_patches, mass_offset, region_offset, grid_shape,
        spatial_shape, patch_size, stack_of_sample, sample_in_stack``,
        flattened and concatenated; see :func:`split_sample_table`.

    Raises
    ------
    ValueError
        If an array's length does not match the number of samples.
    """
    n_samples, ndim = tables.n_samples, tables.ndim
    parts = [
        np.asarray(getattr(tables, name), dtype=np.int64).reshape(-1) for name in _SAMPLE_ARRAYS
    ]
    lengths = _sample_lengths(n_samples, ndim)
    for name, part, length in zip(_SAMPLE_ARRAYS, parts, lengths, strict=True):
        if part.size != length:
            raise ValueError(
                f"tables.{name} has {part.size} values, expected {length} "
                f"for {n_samples} samples of {ndim} dimensions"
            )
    return np.concatenate(parts)


def split_sample_table(buffer: Any, n_samples: int, ndim: int) -> dict[str, Any]:
    """Return views of the arrays packed by :func:`pack_sample_table`.

    Parameters
    ----------
    buffer : numpy.ndarray or cupy.ndarray of int64
        A packed buffer, on the host or on the device.
    n_samples : int
        Number of samples.
    ndim : int
        Number of spatial dimensions.

    Returns
    -------
    dict of str to array
        One contiguous 1-D view of ``buffer`` per packed array.

    Raises
    ------
    ValueError
        If the buffer's length does not match ``n_samples`` and ``ndim``.
    """
    lengths = _sample_lengths(n_samples, ndim)
    if buffer.ndim != 1 or buffer.size != sum(lengths):
        raise ValueError(f"sample table has shape {buffer.shape}, expected ({sum(lengths)},)")
    views = {}
    start = 0
    for name, length in zip(_SAMPLE_ARRAYS, lengths, strict=True):
        views[name] = buffer[start : start + length]
        start += length
    return views


def _sample_lengths(n_samples: int, ndim: int) -> tuple[int, ...]:
    """Lengths of the packed per-sample arrays, in ``_SAMPLE_ARRAYS`` order."""
    s, d = n_samples, ndim
    return (s + 1, s, s + 1, s + 1, s * d, s * d, d, s, s)


def _check_array(name: str, array: Any, dtype: type[np.generic], size: int) -> None:
    """Check an array argument's metadata (never its contents: no device sync)."""
    if np.dtype(array.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if array.size != size:
        raise ValueError(f"{name} has {array.size} values, expected {size}")


def _launch_args(
    tables: RegionTables,
    sample_arrays: dict[str, Any],
    rows: EpochOrder | Any,
    draw_number: int,
    seed: int,
    outputs: tuple[Any, Any, Any, Any],
) -> tuple[Any, ...]:
    """Build the argument tuple of ``sample_epoch``, in SAMPLE_EPOCH_PARAMS order.

    Arrays pass through unchanged (CuPy passes an array as its device
    pointer), a missing array as :data:`NULL_POINTER`; every scalar becomes a
    NumPy scalar of the
    exact C width, which also rejects out-of-range values. The lengths of all
    arrays are checked here, because the kernel trusts them: with the lengths
    right, no table contents can make it read or write out of bounds. Works on
    NumPy arrays too, so the tests can call it without a GPU.

    ``rows`` is an :class:`~gpu_patching.permutation.EpochOrder` (no index
    array: the kernel computes each row's index) or a 1-D int64 index array
    (one row per index). ``outputs`` is ``(data_idx, sample_idx, coords,
    patch_index)`` (:data:`OUTPUT_PARAMS`): int64 arrays of ``n_rows``,
    ``n_rows``, ``n_rows * ndim`` and ``n_rows`` values.
    """
    if isinstance(rows, EpochOrder):
        indices = None
        order = rows
        n_rows = order.n_rows
    else:
        indices = rows
        # Unused by the kernel when it reads indices; zeros for clarity.
        order = EpochOrder(0, 0, int(indices.size), 0, False)
        n_rows = int(indices.size)
    n_samples, ndim = tables.n_samples, tables.ndim
    n_regions = int(tables.mass_prefix.size)
    if ndim not in (2, 3):
        raise ValueError(f"the kernels support 2 or 3 spatial dimensions, got {ndim}")
    lengths = dict(zip(_SAMPLE_ARRAYS, _sample_lengths(n_samples, ndim), strict=True))
    for name, length in lengths.items():
        _check_array(name, sample_arrays[name], np.int64, length)
    _check_array("mass_prefix", tables.mass_prefix, np.int64, n_regions)
    _check_array("weight", tables.weight, np.int64, n_regions)
    _check_array("subbox_mask", tables.subbox_mask, np.uint8, n_regions)
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if indices is not None:
        _check_array("indices", indices, np.int64, n_rows)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    if len(outputs) != len(OUTPUT_PARAMS):
        raise ValueError(f"expected {len(OUTPUT_PARAMS)} output arrays, got {len(outputs)}")
    output_values = dict(zip(OUTPUT_PARAMS, outputs, strict=True))
    for name, array in output_values.items():
        _check_array(name, array, np.int64, n_rows * ndim if name == "coords" else n_rows)

    values = {
        **sample_arrays,
        "mass_prefix": tables.mass_prefix,
        "weight": tables.weight,
        "subbox_mask": tables.subbox_mask,
        "n_samples": n_samples,
        "n_regions": n_regions,
        "ndim": ndim,
        "indices": indices,
        "first_position": order.first_position,
        "position_step": order.position_step,
        "n_positions": order.n_positions,
        "shuffle": int(order.shuffle),
        "n_rows": n_rows,
        "draw_number": draw_number,
        "seed": seed,
        **output_values,
    }
    args = []
    for name, c_type in SAMPLE_EPOCH_PARAMS:
        value = values[name]
        if c_type.endswith("*"):
            args.append(NULL_POINTER if value is None else value)
        else:
            # NumPy >= 2 raises OverflowError rather than wrapping.
            args.append(C_SCALAR_TYPES[c_type](int(value)))
    return tuple(args)


# Compiled epoch kernels, one per device id.
_KERNELS: dict[int, Any] = {}


class CudaBackend:
    """The CUDA backend: CuPy tables on the current device and one launch per draw.

    Parameters
    ----------
    xp : module, optional
        The device array namespace; CuPy when omitted. The host tests pass
        NumPy together with a host-compiled kernel, to run this class's launch
        path without a GPU.

    Attributes
    ----------
    launch_count : int
        Kernel launches made by this backend (for tests and benchmarks).
    """

    name = "cuda"
    xp: Any

    def __init__(self, xp: Any = None) -> None:
        if xp is None:
            import cupy

            xp = cupy
        self.xp = xp
        self.launch_count = 0
        # device id -> (packed host buffer, its device copy)
        # (device id, stream) -> (tables, packed per-sample arrays, version)
        self._uploads: dict[tuple[int, int], tuple[weakref.ref[RegionTables], Any, int]] = {}

    def draw(
        self,
        tables: RegionTables,
        indices: Any,
        draw_number: int,
        seed: int,
    ) -> tuple[Any, Any, Any, Any]:
        """Draw the patches of the given global patch indices, in one launch.

        The kernel writes every returned array itself: apart from the launch,
        this makes only allocations (``cupy.empty``) and, when the per-sample
        arrays changed, one host-to-device copy. No other kernel runs.

        Parameters
        ----------
        tables : RegionTables
            The sampler's tables, built with ``xp=cupy``.
        indices : EpochOrder, range or array of int
            Which global patch index each row draws. An
            :class:`~gpu_patching.permutation.EpochOrder` (a shuffled or
            sharded epoch) or a ``range`` with step 1 (an epoch is
            ``range(n_patches)``) must stay in ``[0, tables.total_patches)``;
            the kernel computes each row's index. An array (NumPy or CuPy,
            1-D) is read by the kernel, and a row with an index outside that
            interval is written as ``-1`` in every column.
        draw_number : int
            The draw number, in ``[0, 2**32)``.
        seed : int
            The 64-bit seed, in ``[0, 2**64)``.

        Returns
        -------
        data_idx : cupy.ndarray of int64, shape (N,)
            Stack of each patch.
        sample_idx : cupy.ndarray of int64, shape (N,)
            Sample (within its stack) of each patch.
        coords : cupy.ndarray of int64, shape (N, d)
            Patch corners.
        indices : cupy.ndarray of int64, shape (N,)
            Global patch index of each row, written by the kernel (a copy of
            an index array).

        Raises
        ------
        IndexError
            If a range or an order leaves ``[0, tables.total_patches)``.
        TypeError
            If an index array does not hold integers.
        ValueError
            If a range has a step other than 1, an index array is not 1-D, or
            ``draw_number`` / ``seed`` is out of range.
        """
        cupy = self.xp
        if not 0 <= draw_number < 1 << 32:
            raise ValueError(f"draw_number must be in [0, 2**32), got {draw_number}")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        rows = self._rows(tables, indices)
        n_rows = rows.n_rows if isinstance(rows, EpochOrder) else int(rows.size)
        # cupy.empty only allocates (from the memory pool): no kernel runs.
        outputs = (
            cupy.empty(n_rows, dtype=cupy.int64),
            cupy.empty(n_rows, dtype=cupy.int64),
            cupy.empty((n_rows, tables.ndim), dtype=cupy.int64),
            cupy.empty(n_rows, dtype=cupy.int64),
        )
        if n_rows == 0:
            # Nothing to write; a launch of no rows would only cost time.
            return outputs
        sample_arrays = split_sample_table(
            self._sample_table(tables), tables.n_samples, tables.ndim
        )
        args = _launch_args(tables, sample_arrays, rows, draw_number, seed, outputs)
        blocks, threads = launch_grid(n_rows)
        self._kernel()((blocks,), (threads,), args)
        self.launch_count += 1
        return outputs

    @staticmethod
    def to_host(values: Any) -> NDArray[Any]:
        """Return ``values`` (CuPy or NumPy) as a NumPy array."""
        return to_host(values)

    def _rows(self, tables: RegionTables, indices: Any) -> Any:
        """Return the checked order, or the device index array, of ``indices``."""
        if isinstance(indices, range):
            if len(indices) > 1 and indices.step != 1:
                raise ValueError(f"a range of indices must have step 1, got {indices}")
            indices = EpochOrder.contiguous(indices.start, indices.stop)
        if isinstance(indices, EpochOrder):
            indices.check_within(tables.total_patches)
            return indices
        array = self.xp.asarray(indices)
        if array.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {array.shape}")
        if array.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {array.dtype}")
        return self.xp.ascontiguousarray(array, dtype=self.xp.int64)

    def _sample_table(self, tables: RegionTables) -> Any:
        """Return the packed per-sample arrays on the current device.

        The upload is kept per device and stream with the tables it came from
        and their :attr:`~gpu_patching.tables.RegionTables.version`, so an
        epoch of unchanged tables neither packs nor copies anything. Per
        stream, because the copy is asynchronous on the stream current when
        it is made, and CuPy's memory pool recycles freed memory per stream: a
        launch on another stream gets its own copy, ordered on that stream.
        """
        key = (self._device_id(), self._stream_id())
        cached = self._uploads.get(key)
        if cached is not None and cached[0]() is tables and cached[2] == tables.version:
            return cached[1]
        uploaded = self.xp.asarray(pack_sample_table(tables))
        self._uploads[key] = (weakref.ref(tables), uploaded, tables.version)
        return uploaded

    def _device_id(self) -> int:
        """Return the id of the current CUDA device."""
        return int(self.xp.cuda.Device().id)

    def _stream_id(self) -> int:
        """Return the handle of the current CUDA stream."""
        return int(self.xp.cuda.get_current_stream().ptr)

    def _kernel(self) -> Any:
        """Return the epoch kernel compiled for the current device (memoised)."""
        device_id = self._device_id()
        kernel = _KERNELS.get(device_id)
        if kernel is None:
            module = self.xp.RawModule(code=kernel_code(), options=compile_options())
            kernel = module.get_function(KERNEL_NAME)
            _KERNELS[device_id] = kernel
        return kernel
