"""Array kinds told apart in one place, and copies to the host.

NumPy arrays (memmaps included), CuPy arrays, PyTorch tensors and other
producers of ``__cuda_array_interface__``, ``__array__`` or DLPack: which
namespace an array belongs to, how to read an array-like as a NumPy or CuPy
array, whether it lives on a CUDA device, and how to copy it to host memory.
CuPy and zarr are recognised by their types' module, so NumPy users import neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DLPACK_CUDA_DEVICES",
    "as_array",
    "dlpack_device_type",
    "has_cuda_dlpack",
    "is_cupy_array",
    "is_device_array",
    "is_zarr_array",
    "is_zarr_object",
    "namespace",
    "require_array",
    "to_host",
]

#: DLPack device types of CUDA memory: kDLCUDA and kDLCUDAManaged.
DLPACK_CUDA_DEVICES = (2, 13)

#: What reading an array through a protocol raises when it cannot.
_PROTOCOL_ERRORS = (
    ImportError,
    TypeError,
    ValueError,
    RuntimeError,
    BufferError,
    NotImplementedError,
)


def _package_of(value: Any) -> str:
    """Return the top-level package that defines ``value``'s type (``"cupy"``, ...)."""
    return (type(value).__module__ or "").split(".")[0]


def is_cupy_array(value: Any) -> bool:
    """Return whether ``value`` is a CuPy array, without importing CuPy."""
    return _package_of(value) == "cupy"


def is_zarr_object(value: Any) -> bool:
    """Return whether ``value`` is a zarr object (an array or a group), without importing zarr."""
    return _package_of(value) == "zarr"


def is_zarr_array(value: Any) -> bool:
    """Return whether ``value`` is a zarr array (of any store), without importing zarr."""
    return is_zarr_object(value) and hasattr(value, "chunks") and hasattr(value, "shape")


def namespace(array: Any, name: str) -> Any:
    """Return the array namespace of a NumPy or CuPy array: ``numpy`` or ``cupy``.

    Parameters
    ----------
    array : numpy.ndarray or cupy.ndarray
        The array (a ``numpy.memmap`` is a NumPy array).
    name : str
        How the array is named in error messages.

    Returns
    -------
    module
        ``numpy`` or ``cupy``.

    Raises
    ------
    TypeError
        For anything else, naming ``name`` and the value's type.
    """
    if isinstance(array, np.ndarray):
        return np
    if is_cupy_array(array):
        import cupy

        return cupy
    raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(array).__name__}")


def as_array(value: Any, name: str) -> Any:
    """Return an array-like as a NumPy or CuPy array; None for Python containers.

    NumPy and CuPy arrays are returned as they are. Other arrays are read
    through the protocols they offer: ``__cuda_array_interface__`` (PyTorch
    CUDA tensors, Numba) into CuPy, ``__array__`` (PyTorch CPU tensors and
    most array libraries) or DLPack into NumPy, and a ``memoryview`` through
    the buffer protocol. Lists, tuples, sets, dicts and other sequences give
    None: the caller reads them entry by entry.

    Parameters
    ----------
    value : Any
        The value.
    name : str
        How the value is named in error messages.

    Returns
    -------
    numpy.ndarray, cupy.ndarray or None
        The array, or None when ``value`` is not an array.

    Raises
    ------
    TypeError
        If ``value`` offers an array protocol but cannot be read through it
        (e.g. a CUDA array without CuPy, or a memoryview of an unknown
        format), naming its type.
    """
    if isinstance(value, np.ndarray) or is_cupy_array(value):
        return value
    try:
        if isinstance(value, memoryview):
            return np.asarray(value)
        if hasattr(value, "__cuda_array_interface__"):
            import cupy

            return cupy.asarray(value)
        if hasattr(value, "__array__"):
            return np.asarray(value)
        if hasattr(value, "__dlpack__"):
            return np.from_dlpack(value)
    except _PROTOCOL_ERRORS as error:
        raise TypeError(
            f"{name} ({type(value).__name__}) cannot be read as a NumPy or CuPy array: {error}"
        ) from None
    return None


def require_array(value: Any, name: str) -> Any:
    """:func:`as_array`, refusing anything that is not an array.

    Parameters
    ----------
    value : Any
        An array, tensor or other array-like.
    name : str
        How the value is named in error messages.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        The array.

    Raises
    ------
    TypeError
        If ``value`` is not an array (a list, say) or cannot be read as one.
    """
    array = as_array(value, name)
    if array is None:
        raise TypeError(
            f"{name} must be a NumPy or CuPy array (or a tensor), got {type(value).__name__}"
        )
    return array


def dlpack_device_type(value: Any) -> int | None:
    """Return the first entry of ``value.__dlpack_device__()``; None if it has none or fails."""
    dlpack_device = getattr(value, "__dlpack_device__", None)
    if not callable(dlpack_device):
        return None
    try:
        return int(dlpack_device()[0])
    except Exception:  # a producer that cannot say: not a device array to us
        return None


def has_cuda_dlpack(value: Any) -> bool:
    """Return whether ``value`` has ``__dlpack__`` and its DLPack device is CUDA memory."""
    return dlpack_device_type(value) in DLPACK_CUDA_DEVICES and hasattr(value, "__dlpack__")


def is_device_array(value: Any) -> bool:
    """Return whether ``value`` is a CUDA array (``__cuda_array_interface__`` or CUDA DLPack).

    Parameters
    ----------
    value : object
        Any stack, row array or buffer.

    Returns
    -------
    bool
        True for CuPy arrays, PyTorch CUDA tensors and other CUDA arrays.

    Raises
    ------
    TypeError
        For a PyTorch CUDA tensor that requires grad (it cannot be shared).
    """
    if isinstance(value, np.ndarray):
        return False
    try:
        if hasattr(value, "__cuda_array_interface__"):
            return True
    except RuntimeError as error:  # PyTorch: a CUDA tensor that requires grad
        raise TypeError(
            "a CUDA tensor that requires grad cannot be shared without a copy; pass "
            f"tensor.detach() ({error})"
        ) from None
    return dlpack_device_type(value) in DLPACK_CUDA_DEVICES


def to_host(values: Any, dtype: Any = None) -> NDArray[Any]:
    """Return ``values`` as a NumPy array, copying from the device for CuPy.

    Parameters
    ----------
    values : array_like
        A NumPy or CuPy array, or anything ``numpy.asarray`` accepts.
    dtype : data-type, optional
        Convert to this dtype.

    Returns
    -------
    numpy.ndarray
        The values in host memory.
    """
    get = getattr(values, "get", None)
    host = get() if callable(get) else values
    return np.asarray(host, dtype=dtype)
