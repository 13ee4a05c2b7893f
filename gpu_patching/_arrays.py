"""Small helpers shared by modules that may hold NumPy or CuPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["to_host"]


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
