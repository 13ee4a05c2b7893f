"""Reading whole image stacks from files, with their axes in ``SC(Z)YX`` order.

What the command reads: ``.npy``, ``.zarr`` and ``.tif``/``.tiff`` files,
opened by :mod:`gpu_patching.stores.open` (the one place that opens a file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .stores.axes import scyx_shape, to_scyx_axes
from .stores.open import SUPPORTED_SUFFIXES, read_file, read_file_shape

__all__ = ["SUPPORTED_SUFFIXES", "read_shape", "read_stack", "to_scyx_axes"]


def read_shape(path: str | Path, axes: str) -> tuple[int, ...]:
    """Return the ``SC(Z)YX`` shape of a stored stack without reading its pixels.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.tif``/``.tiff``, ``.zarr`` or ``.npy`` file.
    axes : str
        The axes of the stored array (see :func:`to_scyx_axes`).

    Returns
    -------
    tuple of int
        The shape with axes ``SCYX`` or ``SCZYX``.
    """
    return scyx_shape(read_file_shape(Path(path)), axes)


def read_stack(path: str | Path, axes: str) -> np.ndarray:
    """Read a stored stack into memory with axes ``SC(Z)YX``.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.tif``/``.tiff``, ``.zarr`` or ``.npy`` file.
    axes : str
        The axes of the stored array (see :func:`to_scyx_axes`).

    Returns
    -------
    numpy.ndarray
        The stack, axes ``SCYX`` or ``SCZYX`` (missing ``S``/``C`` added as
        axes of length 1), in native byte order.
    """
    data = read_file(Path(path))
    order, target = to_scyx_axes(axes, data.ndim)
    data = np.transpose(data, order)
    if "S" not in target:
        data = data[np.newaxis]
    if "C" not in target:
        data = data[:, np.newaxis]
    # In native byte order: a big-endian file (.npy, zarr format 2) would give
    # an array that PyTorch and the crop kernels refuse.
    native = data.dtype if data.dtype.isnative else data.dtype.newbyteorder("=")
    return np.ascontiguousarray(data, dtype=native)
