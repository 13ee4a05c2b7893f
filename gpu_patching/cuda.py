"""The one CUDA runtime of gpu-patching: sources, compilation, launches, uploads.

Every kernel we ship is described here once, by a :class:`Kernel`: the ``.cu``
file that holds it, its entry point (a plain name, or a template name
expression such as ``crop_patches<unsigned short>``) and its parameters in
order as ``(name, C type)``. That one description drives

* the argument tuple of every launch (:meth:`Kernel.arguments`): arrays pass
  through as pointers, a missing array as :data:`NULL_POINTER`, and every
  scalar becomes a NumPy scalar of the exact C width (CuPy passes a bare
  Python int as 64 bits, and an ``int`` parameter would then read garbage);
* the compilation (:func:`get_function`): one NVRTC compile per ``.cu`` file
  and device, memoised, with :data:`COMPILE_OPTIONS` and the template
  instantiations of that file as name expressions;
* the host launch of the test suite, which compiles the same ``.cu`` files with
  the host C++ compiler and launches each ``__global__`` function over every
  block and thread of a grid with the argument tuple built here, so CI runs the
  very code a GPU runs (see ``docs/testing.md``).

The sampler's backend (:mod:`gpu_patching.backends.cuda_backend`) and the crop
path (:mod:`gpu_patching.crop`) both launch through this module; neither
imports the other. Nothing here imports CuPy at module level: the functions
that need a device take the array namespace (``xp``) as an argument.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECK_CROP_ROWS",
    "CROP_LINES_PER_THREAD",
    "CROP_THREADS_PER_BLOCK",
    "C_SCALAR_TYPES",
    "ELEMENT_C_TYPES",
    "KERNELS",
    "MAX_GRID_X",
    "NULL_POINTER",
    "SAMPLE_EPOCH",
    "THREADS_PER_BLOCK",
    "BackendUnavailableError",
    "CropLaunch",
    "Kernel",
    "KernelFunctions",
    "UploadCache",
    "check_launch_array",
    "compile_options",
    "compiled_module",
    "crop_kernel",
    "crop_launch",
    "current_device_id",
    "current_stream_key",
    "device_functions",
    "get_function",
    "kernel_dir",
    "kernel_source",
    "launch",
    "launch_grid",
    "name_expressions",
]


class BackendUnavailableError(RuntimeError):
    """The requested backend, or the device path of a call, cannot run on this machine."""


#: NVRTC options of every compile of the kernels (the include path is added by
#: :func:`compile_options`; CuPy adds the target architecture). No FMA
#: contraction: the draw is integer arithmetic, and it stays exact if that
#: ever changes.
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false")

#: The NumPy scalar type of each C type the kernels use; a pointer's element
#: type maps the same way (``const long long*`` -> int64 arrays).
C_SCALAR_TYPES: dict[str, type[np.generic]] = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
    "unsigned char": np.uint8,
    "unsigned short": np.uint16,
}

#: The argument that passes a null pointer to a kernel: a 64-bit zero. CuPy
#: passes a NumPy scalar by value at its width, but turns ``None`` into the
#: address 0xffffffff, not 0 (cupy/cupy issue 9046).
NULL_POINTER = np.uint64(0)

#: CUDA's limits on ``gridDim.x`` and ``gridDim.y``.
MAX_GRID_X = (1 << 31) - 1
MAX_GRID_Y = 65535

#: Threads per block of the one-dimensional kernels (the epoch and the row check).
THREADS_PER_BLOCK = 256
#: Threads per block of the crop kernel (at most; a narrow patch uses fewer).
CROP_THREADS_PER_BLOCK = 256
#: Lines of a patch each crop thread copies per chunk (``CROP_LINES_PER_THREAD``
#: in ``crop.cuh``; a host test compares them).
CROP_LINES_PER_THREAD = 8

#: The unsigned C type the crop kernel copies, per element size in bytes: the
#: kernel copies bits, so every dtype of a size shares one instantiation.
ELEMENT_C_TYPES: dict[int, str] = {
    1: "unsigned char",
    2: "unsigned short",
    4: "unsigned int",
    8: "unsigned long long",
}


@dataclass(frozen=True)
class Kernel:
    """One ``__global__`` entry point: where it lives and its parameters.

    Attributes
    ----------
    file : str
        The ``.cu`` file of :func:`kernel_dir` that defines it.
    name : str
        The entry point: an ``extern "C"`` name, or a name expression of a
        template instantiation (``crop_patches<unsigned char>``).
    params : tuple of (str, str)
        ``(name, C type)`` of every parameter in order; it mirrors the C
        signature (a test parses the ``.cu`` file and compares).
    """

    file: str
    name: str
    params: tuple[tuple[str, str], ...]

    @property
    def is_template(self) -> bool:
        """Whether :attr:`name` is a template name expression."""
        return "<" in self.name

    def arguments(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """Return the argument tuple of a launch, in parameter order.

        Parameters
        ----------
        values : mapping of str to value
            One value per parameter name, no more and no fewer: an array (or
            ``None`` for a null pointer) for a pointer, an integer for a
            scalar.

        Returns
        -------
        tuple
            Arrays unchanged (CuPy passes an array as its device pointer),
            ``None`` as :data:`NULL_POINTER`, scalars as NumPy scalars of their
            exact C width.

        Raises
        ------
        ValueError
            If a parameter is missing or unknown, or a scalar does not fit its
            C type (the message names the parameter and the value).
        TypeError
            If a scalar is not an integer.
        """
        names = [name for name, _ in self.params]
        missing = [name for name in names if name not in values]
        unknown = [name for name in values if name not in names]
        if missing or unknown:
            raise ValueError(f"arguments of {self.name}: missing {missing}, unknown {unknown}")
        args: list[Any] = []
        for name, c_type in self.params:
            value = values[name]
            if c_type.endswith("*"):
                args.append(NULL_POINTER if value is None else value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(
                    f"{self.name}: parameter {name} ({c_type}) must be an integer, got {value!r}"
                )
            scalar_type = C_SCALAR_TYPES[c_type]
            info = np.iinfo(np.dtype(scalar_type))
            if not info.min <= int(value) <= info.max:
                raise ValueError(
                    f"{self.name}: parameter {name} ({c_type}) must be in "
                    f"[{info.min}, {info.max}], got {int(value)}"
                )
            args.append(scalar_type(int(value)))
        return tuple(args)


#: Parameters of ``sample_epoch`` (``kernels/sample_epoch.cu``) in order.
SAMPLE_EPOCH = Kernel(
    file="sample_epoch.cu",
    name="sample_epoch",
    params=(
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
    ),
)

# Parameters shared by the crop kernel and the row check, up to the patch size.
_CROP_ROW_PARAMS: tuple[tuple[str, str], ...] = (
    ("stack_table", "const long long*"),
    ("n_stacks", "long long"),
    ("data_idx", "const long long*"),
    ("sample_idx", "const long long*"),
    ("coords", "const long long*"),
    ("ndim", "int"),
    ("n_rows", "long long"),
)

#: ``check_crop_rows`` (``kernels/crop_patches.cu``): the first row whose
#: patch leaves its stack, through ``atomicMin`` on ``first_bad``.
CHECK_CROP_ROWS = Kernel(
    file="crop_patches.cu",
    name="check_crop_rows",
    params=(
        *_CROP_ROW_PARAMS,
        ("patch_z", "long long"),
        ("patch_y", "long long"),
        ("patch_x", "long long"),
        ("first_bad", "long long*"),
    ),
)


def crop_kernel(itemsize: int) -> Kernel:
    """Return the crop kernel's instantiation for an element size.

    Parameters
    ----------
    itemsize : int
        Element size in bytes: 1, 2, 4 or 8.

    Returns
    -------
    Kernel
        ``crop_patches<T>`` with ``T`` the unsigned type of that size; only
        the type of ``out`` depends on the size.

    Raises
    ------
    ValueError
        For any other size.
    """
    try:
        element = ELEMENT_C_TYPES[itemsize]
    except (KeyError, TypeError):
        raise ValueError(
            f"the crop kernel copies elements of 1, 2, 4 or 8 bytes, not {itemsize!r}"
        ) from None
    return Kernel(
        file="crop_patches.cu",
        name=f"crop_patches<{element}>",
        params=(
            *_CROP_ROW_PARAMS,
            ("n_channels", "long long"),
            ("patch_z", "long long"),
            ("patch_y", "long long"),
            ("patch_x", "long long"),
            ("out", f"{element}*"),
        ),
    )


#: Every kernel we ship; a test checks that these are exactly the
#: ``__global__`` functions (and template instantiations) of the ``.cu`` files.
KERNELS: tuple[Kernel, ...] = (
    SAMPLE_EPOCH,
    *(crop_kernel(size) for size in sorted(ELEMENT_C_TYPES)),
    CHECK_CROP_ROWS,
)


def check_launch_array(
    name: str,
    array: Any,
    size: int,
    dtype: Any = np.int64,
    *,
    itemsize: int | None = None,
) -> None:
    """Check an array argument's metadata before a launch (never its contents).

    The kernels trust the lengths of their arrays, so every launch checks them
    here; reading the metadata needs no device synchronisation.

    Parameters
    ----------
    name : str
        The parameter, for the message.
    array : array
        NumPy or CuPy.
    size : int
        The number of elements the kernel will touch.
    dtype : dtype, default int64
        The exact dtype expected (ignored when ``itemsize`` is given).
    itemsize : int, optional
        Accept any dtype of this element size instead.

    Raises
    ------
    TypeError
        If the dtype (or its size) is wrong.
    ValueError
        If the array is not C-contiguous or has another number of elements.
    """
    if itemsize is not None:
        if np.dtype(array.dtype).itemsize != itemsize:
            raise TypeError(f"{name} must have {itemsize}-byte elements, got dtype {array.dtype}")
    elif np.dtype(array.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if int(array.size) != size:
        raise ValueError(f"{name} has {array.size} values, expected {size}")


# -- sources and compilation ---------------------------------------------------------------


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


def sources_digest() -> str:
    """Return the SHA-256 of every kernel source file (names and contents).

    Returns
    -------
    str
        A hex digest that changes whenever any ``.cu`` or ``.cuh`` file does.
    """
    digest = hashlib.sha256()
    for path in sorted(kernel_dir().glob("*.cu*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def kernel_source(file_name: str) -> str:
    """Return a ``.cu`` file of :func:`kernel_dir` as handed to NVRTC.

    CuPy caches compiled kernels on disk keyed on the source text and the
    options, not on the headers that the source includes. The first line is
    therefore the digest of every kernel file (:func:`sources_digest`), so
    editing a header can never bring back a stale binary.

    Parameters
    ----------
    file_name : str
        The ``.cu`` file, e.g. ``"sample_epoch.cu"``.

    Returns
    -------
    str
        The file's text after one comment line.
    """
    source = (kernel_dir() / file_name).read_text()
    return f"// gpu-patching kernel sources sha256 {sources_digest()}\n{source}"


def name_expressions(file_name: str) -> tuple[str, ...]:
    """Return the template instantiations of :data:`KERNELS` defined in a file.

    Parameters
    ----------
    file_name : str
        A ``.cu`` file of :func:`kernel_dir`.

    Returns
    -------
    tuple of str
        The name expressions NVRTC must instantiate (``crop_patches<unsigned
        char>``, ...); empty for a file of ``extern "C"`` kernels only.
    """
    return tuple(
        kernel.name for kernel in KERNELS if kernel.file == file_name and kernel.is_template
    )


@functools.cache
def _module_compiler() -> Callable[[str], Any]:
    """Return the memoised compile of one ``.cu`` file (imports CuPy on first use)."""
    import cupy

    # One compiled module per file and device, as cupyx.scipy.ndimage memoises
    # its kernels: CuPy keys the memo on the current device.
    @cupy.memoize(for_each_device=True)
    def compile_file(file_name: str) -> Any:
        return cupy.RawModule(
            code=kernel_source(file_name),
            options=compile_options(),
            name_expressions=name_expressions(file_name) or None,
        )

    return compile_file


def compiled_module(file_name: str, xp: Any, device_id: int) -> Any:
    """Return a ``.cu`` file compiled for a device (one compile per file and device).

    Parameters
    ----------
    file_name : str
        A ``.cu`` file of :func:`kernel_dir`.
    xp : module
        CuPy.
    device_id : int
        The device to compile for; it is made current for the compile.

    Returns
    -------
    cupy.RawModule
        The same module on every call for this file and device.
    """
    with xp.cuda.Device(device_id):
        return _module_compiler()(file_name)


def get_function(kernel: Kernel, xp: Any, device_id: int) -> Any:
    """Return ``kernel`` compiled for a device (see :func:`compiled_module`).

    Parameters
    ----------
    kernel : Kernel
        The entry point.
    xp : module
        CuPy.
    device_id : int
        The device to compile for.

    Returns
    -------
    cupy.RawKernel
        Callable as ``function(grid, block, kernel.arguments(values))``.
    """
    return compiled_module(kernel.file, xp, device_id).get_function(kernel.name)


#: ``functions(kernel, device_id)``: the compiled kernel, called as
#: ``function(grid, block, args)``. The launchers take one, so that the test
#: suite can hand them the shipped kernels compiled for the host.
KernelFunctions = Callable[[Kernel, int], Any]


def device_functions(xp: Any) -> KernelFunctions:
    """Return the :data:`KernelFunctions` that compile the shipped kernels with CuPy.

    Parameters
    ----------
    xp : module
        CuPy.

    Returns
    -------
    callable
        ``functions(kernel, device_id)``, through :func:`get_function`.
    """

    def functions(kernel: Kernel, device_id: int) -> Any:
        return get_function(kernel, xp, device_id)

    return functions


def launch(
    functions: KernelFunctions,
    kernel: Kernel,
    device_id: int,
    grid: Sequence[int],
    block: Sequence[int],
    args: tuple[Any, ...],
) -> None:
    """Launch ``kernel`` on a device: the one place the launchers call a kernel.

    Parameters
    ----------
    functions : callable
        Where the compiled kernel comes from (:func:`device_functions`).
    kernel : Kernel
        The entry point.
    device_id : int
        The device it runs on.
    grid, block : sequence of int
        One to three sizes each (:func:`launch_grid`, :func:`crop_launch`).
    args : tuple
        The argument tuple, built by :meth:`Kernel.arguments`.

    Raises
    ------
    ValueError
        If ``args`` has another length than the kernel's parameters.
    """
    if len(args) != len(kernel.params):
        raise ValueError(f"{kernel.name} takes {len(kernel.params)} arguments, got {len(args)}")
    functions(kernel, device_id)(tuple(grid), tuple(block), args)


# -- grid sizing -------------------------------------------------------------------------


def launch_grid(n_rows: int, threads: int = THREADS_PER_BLOCK) -> tuple[int, int]:
    """Return ``(blocks, threads)`` of a one-dimensional launch over ``n_rows`` rows.

    One thread per row while the grid allows it; beyond CUDA's block limit the
    kernels' grid-stride loops give each thread several rows, so every row is
    covered exactly once for any result.

    Parameters
    ----------
    n_rows : int
        Number of rows, ``>= 0``.
    threads : int, default THREADS_PER_BLOCK
        Threads per block, ``>= 1``.

    Returns
    -------
    blocks, threads : int
        At least one block.

    Raises
    ------
    ValueError
        If ``n_rows < 0`` or ``threads < 1``.
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    blocks = min(max(1, math.ceil(n_rows / threads)), MAX_GRID_X)
    return blocks, threads


@dataclass(frozen=True)
class CropLaunch:
    """The launch configuration of the crop kernel.

    Attributes
    ----------
    grid : tuple of int
        ``(rows, chunks)``: blocks along the batch rows and along the chunks
        of ``blockDim.y * CROP_LINES_PER_THREAD`` lines of a patch.
    block : tuple of int
        ``(threads along x, threads along lines)``.
    """

    grid: tuple[int, int]
    block: tuple[int, int]


def crop_launch(n_rows: int, n_channels: int, patch_size: Sequence[int]) -> CropLaunch:
    """Return the launch configuration of the crop kernel for a batch.

    Threads along X cover a patch row (``patch_x`` rounded up to a warp, at
    most :data:`CROP_THREADS_PER_BLOCK`), the rest of the block takes that
    many lines at once. Each block copies one chunk of one row's lines; beyond
    CUDA's grid limits the kernel's grid-stride loops give a block several, so
    every element is covered exactly once for any result.

    Parameters
    ----------
    n_rows : int
        Rows of the batch, ``>= 0``.
    n_channels : int
        Channels, ``>= 1``.
    patch_size : sequence of int
        ``(PY, PX)`` or ``(PZ, PY, PX)``, every size ``>= 1``.

    Returns
    -------
    CropLaunch
        At least one block of at least one thread.

    Raises
    ------
    ValueError
        If a size is out of range.
    """
    patch = tuple(int(size) for size in patch_size)
    if n_rows < 0 or n_channels < 1:
        raise ValueError(f"need n_rows >= 0 and n_channels >= 1, got {n_rows}, {n_channels}")
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ValueError(f"patch_size must be 2 or 3 sizes >= 1, got {tuple(patch_size)}")
    width = patch[-1]
    lines_per_patch = n_channels * math.prod(patch[:-1])
    threads_x = min(CROP_THREADS_PER_BLOCK, 32 * math.ceil(width / 32))
    threads_y = max(1, min(CROP_THREADS_PER_BLOCK // threads_x, lines_per_patch))
    lines_per_chunk = threads_y * CROP_LINES_PER_THREAD
    grid = (
        min(max(1, n_rows), MAX_GRID_X),
        min(math.ceil(lines_per_patch / lines_per_chunk), MAX_GRID_Y),
    )
    return CropLaunch(grid=grid, block=(threads_x, threads_y))


# -- uploads -------------------------------------------------------------------------------


def current_device_id(xp: Any) -> int:
    """Return the id of the current CUDA device of ``xp`` (CuPy)."""
    return int(xp.cuda.Device().id)


def current_stream_key(xp: Any) -> int:
    """Return the handle of the current CUDA stream of ``xp`` (CuPy)."""
    return int(xp.cuda.get_current_stream().ptr)


class UploadCache:
    """Small host buffers uploaded once per (device, stream) and reused while unchanged.

    A copy to the device is asynchronous on the stream current when it is
    made, and CuPy's memory pool recycles freed memory per stream: an upload is
    therefore only reused on its own stream; a launch on another stream gets
    its own copy, ordered on that stream.

    Parameters
    ----------
    upload : callable
        Turns a host buffer into a device array (``xp.asarray``).
    """

    def __init__(self, upload: Callable[[Any], Any]) -> None:
        self._upload = upload
        self._entries: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def get(
        self,
        key: tuple[int, int],
        token: Any,
        same: Callable[[Any, Any], bool],
        build: Callable[[], Any],
    ) -> Any:
        """Return the device copy for ``key``, uploading ``build()`` when stale.

        Parameters
        ----------
        key : tuple of int
            ``(device id, stream handle)``.
        token : object
            What identifies the contents (a version, or the host buffer).
        same : callable
            ``same(cached_token, token)`` is True when the cached copy holds
            the contents ``token`` stands for.
        build : callable
            Makes the host buffer; called only on a miss.

        Returns
        -------
        device array
            The uploaded buffer.
        """
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and same(cached[0], token):
                return cached[1]
            uploaded = self._upload(build())
            self._entries[key] = (token, uploaded)
            return uploaded

    def __len__(self) -> int:
        return len(self._entries)
