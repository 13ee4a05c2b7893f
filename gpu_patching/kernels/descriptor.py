"""What a kernel is to Python: its entry point and its parameters, in order.

A :class:`Kernel` names a ``__global__`` function of a ``.cu`` file of this
folder; :meth:`Kernel.from_source` reads its parameters from that signature
(:func:`parse_signature`), so they are written once, in C.
:meth:`Kernel.arguments` makes the argument tuple of a launch, with every
scalar at its exact C width.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "C_SCALAR_TYPES",
    "MAX_GRID_X",
    "MAX_GRID_Y",
    "NULL_POINTER",
    "THREADS_PER_BLOCK",
    "Kernel",
    "check_launch_array",
    "kernel_dir",
    "parse_signature",
]

#: The NumPy scalar type of each C type the kernels use; a pointer's element
#: type maps the same way (``const long long*`` -> int64 arrays). ``double``
#: only ever types a pointer (``Kernel.arguments`` takes integer scalars).
C_SCALAR_TYPES: dict[str, type[np.generic]] = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "unsigned long long": np.uint64,
    "unsigned char": np.uint8,
    "unsigned short": np.uint16,
    "double": np.float64,
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
        ``(name, C type)`` of every parameter in order, as
        :func:`parse_signature` reads them.
    """

    file: str
    name: str
    params: tuple[tuple[str, str], ...]

    @classmethod
    def from_source(cls, file: str, name: str) -> Kernel:
        """Return the kernel ``name`` of a shipped ``.cu`` file, parsed once per process.

        Parameters
        ----------
        file : str
            A ``.cu`` file of :func:`kernel_dir`, e.g. ``"count.cu"``.
        name : str
            The ``__global__`` function, or a template instantiation of it
            (``"crop_patches<unsigned short>"``).

        Returns
        -------
        Kernel
            The same object for the same arguments, every time.

        Raises
        ------
        ValueError
            If the file is not there, or as :func:`parse_signature`.
        """
        return _shipped_kernel(file, name)

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


def kernel_dir() -> Path:
    """Return the folder that holds the kernel sources.

    Returns
    -------
    pathlib.Path
        ``gpu_patching/kernels`` of the installed package (the ``.cu`` and
        ``.cuh`` files are package data); it is also the include path of
        every compile.
    """
    return Path(str(importlib.resources.files("gpu_patching") / "kernels"))


@functools.cache
def _shipped_kernel(file: str, name: str) -> Kernel:
    """Parse ``name`` of ``file`` (a cache: each launch asks for its kernel again)."""
    path = kernel_dir() / file
    if not path.is_file():
        raise ValueError(f"no kernel source {file} in {kernel_dir()}")
    return Kernel(file=file, name=name, params=parse_signature(path.read_text(), name, file))


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
# Qualifiers that promise the compiler something but leave the passed value as it is.
_RESTRICT = re.compile(r"\b(?:__restrict__|__restrict)\b")
# A declaration that ends in one of these words is a type without a name.
_TYPE_WORDS = frozenset({"const", *(word for c_type in C_SCALAR_TYPES for word in c_type.split())})


def parse_signature(source: str, name: str, file: str) -> tuple[tuple[str, str], ...]:
    """Return ``(name, C type)`` of every parameter of a ``__global__`` function.

    Comments are ignored; a type is folded to single spaces with ``*``
    attached (``const long long *p`` gives ``const long long*``), without
    ``__restrict__`` and without a ``const`` of the parameter itself
    (``const long long n`` and ``double* const p`` give ``long long`` and
    ``double*``). ``__launch_bounds__(...)`` may stand before the name, and
    ``(void)`` lists no parameters. For a template instantiation each
    template argument replaces its type parameter (``T*`` of
    ``crop_patches<unsigned short>`` gives ``unsigned short*``).

    Parameters
    ----------
    source : str
        The text of a ``.cu`` file.
    name : str
        The function, or a template instantiation ``function<arguments>``.
    file : str
        The file's name, for the messages.

    Returns
    -------
    tuple of (str, str)
        The parameters in order.

    Raises
    ------
    ValueError
        If the function is not defined exactly once, the template arguments
        do not match, a plain kernel is not ``extern "C"`` (its name would be
        mangled), a parameter has no name, or a scalar's C type is not in
        :data:`C_SCALAR_TYPES` (the message names the file and the kernel).
    """
    function, _, rest = name.partition("<")
    function = function.strip()
    rest = rest.strip()
    arguments = [" ".join(arg.split()) for arg in rest.removesuffix(">").split(",")] if rest else []
    definition = re.compile(
        r"(?:template\s*<(?P<template>[^>]*)>\s*)?(?P<extern>extern\s+\"C\"\s+)?"
        r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?"
        rf"{re.escape(function)}\s*\((?P<params>[^)]*)\)\s*\{{"
    )
    found = list(definition.finditer(_COMMENT.sub(" ", source)))
    if not found:
        raise ValueError(f"{file} has no __global__ function {function}")
    if len(found) > 1:
        raise ValueError(f"{file} defines __global__ function {function} {len(found)} times")
    match = found[0]
    template = match["template"]
    type_params = [p.split()[-1] for p in template.split(",")] if template else []
    if len(type_params) != len(arguments):
        raise ValueError(
            f"{file}: {name}: {function} takes {len(type_params)} template arguments, "
            f"got {len(arguments)}"
        )
    if not type_params and match["extern"] is None:
        raise ValueError(f'{file}: {name} is not extern "C", so its name would be mangled')
    params: list[tuple[str, str]] = []
    listed = " ".join(match["params"].split())
    declarations = listed.split(",") if listed not in ("", "void") else []
    for number, raw in enumerate(declarations, start=1):
        declaration = re.sub(r"\s*\*\s*", "* ", " ".join(_RESTRICT.sub(" ", raw).split())).strip()
        c_type, _, param = declaration.rpartition(" ")
        if not c_type or param in _TYPE_WORDS or not param.isidentifier():
            raise ValueError(f"{file}: {name}: parameter {number} ({declaration!r}) has no name")
        # A const parameter (not a pointer to const) only qualifies the kernel's
        # own copy: the caller passes the unqualified type.
        c_type = c_type.removesuffix(" const")
        if not c_type.endswith("*"):
            c_type = c_type.removeprefix("const ")
        for type_param, argument in zip(type_params, arguments, strict=True):
            c_type = re.sub(rf"\b{re.escape(type_param)}\b", argument, c_type)
        if not c_type.endswith("*") and c_type not in C_SCALAR_TYPES:
            raise ValueError(
                f"{file}: {name}: parameter {param} has C type {c_type!r}, which has no NumPy twin"
            )
        params.append((param, c_type))
    return tuple(params)


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
