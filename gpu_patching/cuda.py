"""The CUDA runtime: compiling the shipped kernels, launching them, uploading tables.

The kernels' descriptors live in :mod:`gpu_patching.kernels`, each beside its
``.cu`` source, and are imported from there. Compiled modules
are memoised per file and device with ``cupy.memoize(for_each_device=True)``;
:func:`launch` is the one place the launchers
(:mod:`gpu_patching.backends.cuda_backend`, :mod:`gpu_patching.crop`) call a
kernel. Nothing here imports CuPy at module level; the test suite runs the
same sources on the host (``docs/testing.md``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .kernels import KERNELS
from .kernels.descriptor import MAX_GRID_X, THREADS_PER_BLOCK, Kernel, kernel_dir

__all__ = [
    "BackendUnavailableError",
    "KernelFunctions",
    "Launcher",
    "UploadCache",
    "compile_options",
    "compiled_module",
    "current_device_id",
    "current_stream_key",
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

# -- sources and compilation ---------------------------------------------------------------


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
    """Return the template instantiations of :data:`gpu_patching.kernels.KERNELS` in a file.

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
        One to three sizes each (:func:`launch_grid`,
        :func:`gpu_patching.kernels.crop_patches.crop_launch`).
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


class Launcher:
    """What the launchers share: a device array namespace and where compiled kernels come from.

    Parameters
    ----------
    xp : module, optional
        The device array namespace; CuPy when omitted.
    functions : KernelFunctions, optional
        ``functions(kernel, device_id)`` returns the compiled kernel;
        :func:`device_functions` of ``xp`` when omitted. The host tests pass
        NumPy and the shipped kernels compiled for the host, to run a
        launcher's validation and launch path without a GPU.

    Attributes
    ----------
    launch_count : int
        Launches of the launcher's main kernel (for tests and benchmarks).
    """

    xp: Any

    def __init__(self, xp: Any = None, functions: KernelFunctions | None = None) -> None:
        if xp is None:
            import cupy

            xp = cupy
        self.xp = xp
        self._functions = device_functions(xp) if functions is None else functions
        self.launch_count = 0

    @property
    def functions(self) -> KernelFunctions:
        """Where this launcher's compiled kernels come from, for :func:`launch`."""
        return self._functions


# -- grid sizing -------------------------------------------------------------------------


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
