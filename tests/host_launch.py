"""Launch the shipped CUDA kernels on the host, exactly as a GPU would get them.

:class:`HostKernels` compiles each ``.cu`` file of ``gpu_patching/kernels``
with the host C++ compiler, together with ``host_cuda/cuda_host.h`` (a stand-in
for CUDA's launch model) and a small generated launcher per kernel of
:data:`gpu_patching.kernels.KERNELS`: ``gp_host::run`` sets ``gridDim`` and
``blockDim`` and calls the ``__global__`` function itself once for every block
and thread, in an order permuted by a seed. No kernel body exists in the tests.

:meth:`HostKernels.function` returns a callable with CuPy's ``RawKernel``
calling convention, ``function(grid, block, args)``, so that the backends run
their real launch path against it: the argument tuple a test launches is the
one :meth:`gpu_patching.kernels.descriptor.Kernel.arguments` builds for a GPU.
On the way in, every argument is checked against the kernel's parameter
description: a scalar must be a NumPy scalar of the exact C type (CuPy passes a
bare Python int as 64 bits), an array must have the element size of its
pointer. Every array is copied into a buffer with guard zones before the
launch and back after it: the guards of the inputs hold junk (a read past the
end gives a wrong result) and those of the outputs a pattern that must survive
(a write past the end fails the launch).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpu_patching.backends.cuda_backend import CudaBackend
from gpu_patching.kernels import KERNELS
from gpu_patching.kernels.crop_patches import crop_kernel
from gpu_patching.kernels.descriptor import C_SCALAR_TYPES, NULL_POINTER, Kernel, kernel_dir

HOST_HEADER_DIR = Path(__file__).with_name("host_cuda")
HOST_FLAGS = ["-O1", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-Wall", "-Wextra"]
#: Elements of guard zone on each side of every array argument.
GUARD = 64
#: The byte that fills the guards of outputs; any change to it is a write out of bounds.
GUARD_BYTE = 0xA5

_CTYPES = {
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
}


#: The crop kernel instantiated with an element that counts the assignments
#: made to it (``gp_host::WriteCounter`` in ``host_cuda/cuda_host.h``): the
#: shipped template, so a launch shows how often each output element is written.
#: Its ``out`` is an array of 8-byte counters starting at 0; the stacks must
#: have 8-byte elements.
WRITE_COUNTS = Kernel.from_source(crop_kernel(8).file, "crop_patches<gp_host::WriteCounter>")
#: The crop kernel instantiated with an element that counts how often it is
#: read (``gp_host::ReadCounter``): the stacks are arrays of 8-byte counters
#: starting at 0, and a launch shows how many times each element was read.
READ_COUNTS = Kernel.from_source(crop_kernel(8).file, "crop_patches<gp_host::ReadCounter>")
#: Kernels the tests add to the shipped ones, and their elements' sizes.
TEST_KERNELS = (WRITE_COUNTS, READ_COUNTS)
_TEST_ELEMENT_SIZES = {"gp_host::WriteCounter": 8, "gp_host::ReadCounter": 8}
_ALL_KERNELS = (*KERNELS, *TEST_KERNELS)


class LaunchStruct(ctypes.Structure):
    """``gp_host::Launch``: grid, block and the seed of the thread order."""

    _fields_ = [
        ("grid", ctypes.c_longlong * 3),
        ("block", ctypes.c_longlong * 3),
        ("order_seed", ctypes.c_ulonglong),
        ("only_pair", ctypes.c_longlong),
    ]


class OutOfBoundsWriteError(AssertionError):
    """A kernel wrote into the guard zone of an array argument."""


def cxx() -> str | None:
    """Return the host C++ compiler, or None when there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _c_call_type(c_type: str) -> Any:
    return ctypes.c_void_p if c_type.endswith("*") else _CTYPES[c_type]


def entry_name(kernel: Kernel) -> str:
    """The exported name of a kernel's host launcher."""
    return f"gp_host_launch_{_ALL_KERNELS.index(kernel)}"


def launcher_source(file_name: str, kernels: Sequence[Kernel]) -> str:
    """The C++ launcher of one ``.cu`` file: one ``extern "C"`` entry per kernel."""
    lines = ['#include "cuda_host.h"', f'#include "{file_name}"', ""]
    for kernel in kernels:
        params = ", ".join(f"{c_type} {name}" for name, c_type in kernel.params)
        names = ", ".join(name for name, _ in kernel.params)
        lines += [
            f'extern "C" void {entry_name(kernel)}(const gp_host::Launch* launch, {params}) {{',
            f"    gp_host::run(*launch, [&]() {{ {kernel.name}({names}); }});",
            "}",
            "",
        ]
    return "\n".join(lines)


class HostKernels:
    """The shipped kernels, compiled for the host and launchable like CuPy's.

    Parameters
    ----------
    directory : pathlib.Path
        Where the launchers and libraries are written.
    extra_flags : sequence of str
        More compiler flags (e.g. sanitizers).
    files : sequence of str, optional
        Only these ``.cu`` files (all of :data:`~gpu_patching.kernels.KERNELS`'
        files by default).
    """

    def __init__(
        self,
        directory: Path,
        extra_flags: Sequence[str] = (),
        files: Sequence[str] | None = None,
        *,
        load: bool = True,
    ) -> None:
        compiler = cxx()
        if compiler is None:
            raise FileNotFoundError("no C++ compiler (c++, g++ or clang++) on PATH")
        self._entries: dict[str, tuple[ctypes.CDLL, str]] = {}
        self.libraries: dict[str, Path] = {}
        chosen = sorted({kernel.file for kernel in KERNELS} if files is None else set(files))
        self.launches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        for file_name in chosen:
            here = [kernel for kernel in _ALL_KERNELS if kernel.file == file_name]
            stem = Path(file_name).stem
            source = directory / f"{stem}_launcher.cpp"
            source.write_text(launcher_source(file_name, here))
            library = directory / f"{stem}_host.so"
            command = [
                compiler,
                *HOST_FLAGS,
                *extra_flags,
                f"-I{HOST_HEADER_DIR}",
                f"-I{kernel_dir()}",
                str(source),
                "-o",
                str(library),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)}\n{result.stderr}")
            self.libraries[file_name] = library
            if not load:
                continue
            lib = ctypes.CDLL(str(library))
            for kernel in here:
                entry = getattr(lib, entry_name(kernel))
                entry.argtypes = [ctypes.POINTER(LaunchStruct)] + [
                    _c_call_type(c_type) for _, c_type in kernel.params
                ]
                entry.restype = None
                self._entries[kernel.name] = (lib, entry_name(kernel))

    def function(self, kernel: Kernel, order_seed: int = 0x5EED) -> HostFunction:
        """Return ``kernel`` as a callable ``function(grid, block, args)``."""
        lib, entry = self._entries[kernel.name]
        return HostFunction(self, kernel, getattr(lib, entry), order_seed)

    def functions(self, order_seed: int = 0x5EED) -> Any:
        """Return ``functions(kernel, device_id)``, the hook the backends take."""

        def get(kernel: Kernel, device_id: int) -> HostFunction:
            return self.function(kernel, order_seed)

        return get


def _dims(value: Any) -> tuple[int, int, int]:
    dims = tuple(int(v) for v in (value if isinstance(value, tuple) else (value,)))
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise ValueError(f"grid and block take 1 to 3 sizes >= 1, got {value}")
    return (*dims, *(1,) * (3 - len(dims)))  # type: ignore[return-value]


class HostFunction:
    """One kernel with CuPy's ``RawKernel`` calling convention, run on the host."""

    def __init__(self, owner: HostKernels, kernel: Kernel, entry: Any, order_seed: int) -> None:
        self._owner = owner
        self.kernel = kernel
        self._entry = entry
        self.order_seed = order_seed
        #: >= 0: run only the (block, thread) pair of this linear index
        #: (block_linear * threads_per_block + thread_linear).
        self.only_pair = -1

    def __call__(self, grid: Any, block: Any, args: tuple[Any, ...]) -> None:
        kernel = self.kernel
        if len(args) != len(kernel.params):
            raise TypeError(f"{kernel.name} takes {len(kernel.params)} arguments, got {len(args)}")
        grid3, block3 = _dims(grid), _dims(block)
        self._owner.launches.append((kernel.name, grid3, block3))
        converted: list[Any] = []
        guarded: list[tuple[str, np.ndarray, np.ndarray, bool]] = []
        for (name, c_type), value in zip(kernel.params, args, strict=True):
            if not c_type.endswith("*"):
                expected = C_SCALAR_TYPES[c_type]
                if type(value) is not expected:
                    raise TypeError(
                        f"{kernel.name}: {name} ({c_type}) was passed as "
                        f"{type(value).__name__}, not {expected.__name__}"
                    )
                converted.append(_CTYPES[c_type](int(value)))
                continue
            if value is NULL_POINTER or (
                isinstance(value, np.integer) and type(value) is np.uint64 and int(value) == 0
            ):
                converted.append(None)
                continue
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{kernel.name}: {name} ({c_type}) got {type(value).__name__}")
            element = c_type.replace("const ", "").rstrip("*").strip()
            size = _TEST_ELEMENT_SIZES.get(element) or np.dtype(C_SCALAR_TYPES[element]).itemsize
            if value.dtype.itemsize != size:
                raise TypeError(f"{kernel.name}: {name} ({c_type}) got dtype {value.dtype}")
            if not value.flags.c_contiguous:
                raise ValueError(f"{kernel.name}: {name} is not C-contiguous")
            is_output = not c_type.startswith("const ")
            buffer = self._guarded_copy(value, is_output)
            guarded.append((name, value, buffer, is_output))
            converted.append(buffer[GUARD:].ctypes.data)
        launch = LaunchStruct(
            (ctypes.c_longlong * 3)(*grid3),
            (ctypes.c_longlong * 3)(*block3),
            self.order_seed,
            self.only_pair,
        )
        self._entry(ctypes.byref(launch), *converted)
        for name, value, buffer, is_output in guarded:
            if is_output:
                raw = buffer.view(np.uint8)
                itemsize = buffer.dtype.itemsize
                head = raw[: GUARD * itemsize]
                tail = raw[(GUARD + value.size) * itemsize :]
                if (head != GUARD_BYTE).any() or (tail != GUARD_BYTE).any():
                    raise OutOfBoundsWriteError(f"{kernel.name} wrote outside {name}")
                value.reshape(-1)[...] = buffer[GUARD : GUARD + value.size]

    @staticmethod
    def _guarded_copy(value: np.ndarray, is_output: bool) -> np.ndarray:
        flat = value.reshape(-1)
        buffer = np.empty(flat.size + 2 * GUARD, dtype=flat.dtype)
        raw = buffer.view(np.uint8)
        if is_output:
            raw[...] = GUARD_BYTE
        else:
            # Junk around inputs: a read past either end gives wrong values.
            raw[...] = np.random.default_rng(flat.size).integers(0, 256, raw.size, dtype=np.uint8)
        buffer[GUARD : GUARD + flat.size] = flat
        return buffer


def with_launch_shape(functions: Any, grid: Any, block: Any) -> Any:
    """``functions`` whose kernels run with a given grid and block, whatever is asked.

    The backends size their grids themselves; this launches the same argument
    tuple with another shape (one block, fewer or more threads than rows,
    several blocks on both axes) to show that the kernels' loops, not the
    launch code, make every row and element come out exactly once.
    """

    def get(kernel: Kernel, device_id: int) -> Any:
        function = functions(kernel, device_id)

        def launch(_grid: Any, _block: Any, args: tuple[Any, ...]) -> None:
            function(grid, block, args)

        return launch

    return get


class HostBackend(CudaBackend):
    """``CudaBackend`` with NumPy as its device and the shipped kernel run on the host.

    Everything but the kernel's execution is the class's own code: the index
    checks, the table packing and upload cache, the argument tuple and the grid.
    """

    def __init__(self, kernels: HostKernels, functions: Any = None, order_seed: int = 0x5EED):
        super().__init__(xp=np, functions=functions or kernels.functions(order_seed))

    def _device_id(self) -> int:
        return 0

    def _stream_id(self) -> int:
        return 0


SANITIZER_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]


class SanitizerUnavailable(Exception):  # noqa: N818 (a reason to skip, not an error)
    """AddressSanitizer cannot run a Python child process on this machine."""


def run_under_sanitizers(
    directory: Path, kernel: Kernel, script_text: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Build ``kernel``'s file with ASan and UBSan, and run a script against it in a child.

    The script gets the library's path and the kernel's launcher entry as
    ``sys.argv[1:3]``. Each array it passes is its own allocation with red
    zones (no guard copies here), so any read or write outside an array
    aborts the child, as does undefined behaviour such as a division by zero.

    Raises
    ------
    SanitizerUnavailable
        If there is no compiler, no ASan runtime, or it cannot run Python here.
    """
    compiler = cxx()
    if compiler is None:
        raise SanitizerUnavailable("no C++ compiler on PATH")
    runtime = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not runtime or not Path(runtime).exists():
        raise SanitizerUnavailable(f"{compiler} has no AddressSanitizer runtime")
    kernels = HostKernels(directory, SANITIZER_FLAGS, files=[kernel.file], load=False)
    script = directory / "fuzz.py"
    script.write_text(script_text)
    environment = {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0"}
    # Some address-space layouts defeat a preloaded ASan runtime; only a
    # failure of the fuzz run itself (not of a bare interpreter) is a bug.
    bare = subprocess.run(
        [sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=60,
    )
    if bare.returncode != 0:
        raise SanitizerUnavailable(f"AddressSanitizer cannot run Python here: {bare.stderr[-300:]}")
    return subprocess.run(
        [sys.executable, str(script), str(kernels.libraries[kernel.file]), entry_name(kernel)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=timeout,
    )
