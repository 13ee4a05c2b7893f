"""Backends: where the tables live and who runs the per-patch draw.

``"numpy"`` keeps every table in host memory and draws with vectorised NumPy.
``"cuda"`` keeps them on the current CUDA device as CuPy arrays and draws with
one kernel launch per epoch. ``"auto"`` picks ``"cuda"`` only when CuPy
imports and a CUDA device is usable, and ``"numpy"`` otherwise. Both give the
same integers for the same inputs.
"""

from __future__ import annotations

from typing import Any

from ..cuda import BackendUnavailableError
from .base import Backend
from .numpy_backend import NumpyBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "NumpyBackend",
    "resolve_backend",
]

#: Accepted values of the ``backend`` argument.
BACKENDS = ("auto", "cuda", "numpy")


def _cuda_problem() -> str | None:
    """Return why the CUDA backend cannot run here, or None when it can."""
    try:
        import cupy
    except ImportError:
        return (
            "CuPy is not installed; install it with "
            "'pip install gpu-patching[cuda12]' (CUDA 12) or "
            "'pip install gpu-patching[cuda13]' (CUDA 13)"
        )
    except Exception as error:  # a broken CUDA install raises all sorts
        return f"CuPy failed to import ({type(error).__name__}: {error})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy is installed but no CUDA device is visible"
    except Exception as error:  # e.g. no driver: cudaErrorInsufficientDriver
        return f"CuPy is installed but no CUDA device is usable ({error})"
    return None


def resolve_backend(name: Any) -> Backend:
    """Return the backend object for a ``backend`` argument.

    Parameters
    ----------
    name : {"auto", "cuda", "numpy"}
        The requested backend.

    Returns
    -------
    NumpyBackend or CudaBackend
        The backend that will hold the tables and run the draws.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If ``name`` is not one of ``BACKENDS``.
    BackendUnavailableError
        If ``"cuda"`` was requested and cannot run here; the message says why.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}; got {name!r}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    if name == "numpy":
        return NumpyBackend()
    problem = _cuda_problem()
    if problem is None:
        # Imported here: the CUDA module is only needed where CuPy works.
        from .cuda_backend import CudaBackend

        return CudaBackend()
    if name == "cuda":
        raise BackendUnavailableError(f"backend='cuda' is unavailable: {problem}")
    return NumpyBackend()
