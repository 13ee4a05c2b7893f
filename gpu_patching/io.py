"""Reading whole image stacks from files, with their axes in ``SC(Z)YX`` order.

What the command reads: ``.npy``, ``.zarr`` and ``.tif``/``.tiff`` files and
OME-Zarr images, opened by :mod:`gpu_patching.stores.open` (the one place that
opens a file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .stores.axes import scyx_shape, to_scyx_axes
from .stores.open import SUPPORTED_SUFFIXES, ome_zarr_axes, open_stack, read_file, read_file_shape

__all__ = ["SUPPORTED_SUFFIXES", "read_shape", "read_stack", "to_scyx_axes"]


def read_shape(path: str | Path, axes: str | None, *, level: int = 0) -> tuple[int, ...]:
    """Return the ``SC(Z)YX`` shape of a stored stack without reading its pixels.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.tif``/``.tiff``, ``.zarr`` or ``.npy`` file, or an OME-Zarr image
        (its group, or the array of one of its levels).
    axes : str or None
        The axes of the stored array (see :func:`to_scyx_axes`); None for an
        OME-Zarr image, which declares its own (given ones must agree).
    level : int, default 0
        The level of an OME-Zarr image (0 is full resolution).

    Returns
    -------
    tuple of int
        The shape with axes ``SCYX`` or ``SCZYX``.

    Raises
    ------
    ValueError
        If ``axes`` is None for a file that does not declare its axes, they
        contradict an OME-Zarr image's, or the level does not exist.
    """
    path = Path(path)
    if ome_zarr_axes(path) is not None:
        return tuple(open_stack(path, axes, level=level).shape)
    if axes is None:
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        raise ValueError(
            f"{path} does not say what its axes are (only OME-Zarr images do): give them, "
            "e.g. 'SYX' (--axes in the command)"
        )
    if level:
        raise ValueError(f"{path} has 1 level(s); level {level} does not exist")
    return scyx_shape(read_file_shape(path), axes)


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
