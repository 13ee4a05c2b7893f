"""Reading image stacks from files, and their axes.

Readers return NumPy-compatible arrays (read lazily where the format allows:
``.npy`` is memory-mapped, ``.zarr`` stays a zarr array) together with the axes
rearranged to the sampler's ``SC(Z)YX`` order. ``.tif``/``.tiff`` needs
``tifffile`` and ``.zarr`` needs ``zarr`` (``pip install gpu-patching[cli]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUPPORTED_SUFFIXES", "read_shape", "read_stack", "to_scyx_axes"]

#: File types the readers understand.
SUPPORTED_SUFFIXES = (".tif", ".tiff", ".zarr", ".npy")
_KNOWN_AXES = "SCZYX"


def to_scyx_axes(axes: str, ndim: int) -> tuple[list[int], str]:
    """Check an axes string and say how to reach ``SC(Z)YX``.

    Parameters
    ----------
    axes : str
        One letter per array axis, from ``S`` (samples), ``C`` (channels),
        ``Z``, ``Y``, ``X``; for example ``"YX"``, ``"SYX"``, ``"ZYX"``,
        ``"SCZYX"``. ``Y`` and ``X`` are required.
    ndim : int
        The number of axes of the array.

    Returns
    -------
    order : list of int
        The transpose that puts the present axes in ``SC(Z)YX`` order.
    target : str
        The axes after the transpose, before missing ``S``/``C`` are added.

    Raises
    ------
    ValueError
        If a letter is unknown or repeated, ``Y`` or ``X`` is missing, or the
        string does not have one letter per axis.
    """
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string such as 'SYX', got {axes!r}")
    letters = axes.upper()
    unknown = sorted({a for a in letters if a not in _KNOWN_AXES})
    if unknown:
        raise ValueError(
            f"axes {axes!r} has unknown letter(s) {''.join(unknown)}; "
            f"use letters from {_KNOWN_AXES}"
        )
    if len(set(letters)) != len(letters):
        raise ValueError(f"axes {axes!r} repeats a letter")
    if "Y" not in letters or "X" not in letters:
        raise ValueError(f"axes {axes!r} must contain Y and X")
    if len(letters) != ndim:
        raise ValueError(f"axes {axes!r} has {len(letters)} letters but the data has {ndim} axes")
    target = "".join(a for a in _KNOWN_AXES if a in letters)
    return [letters.index(a) for a in target], target


def _scyx_shape(shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    order, target = to_scyx_axes(axes, len(shape))
    sizes = dict(zip(target, (shape[i] for i in order), strict=True))
    spatial = [sizes[a] for a in "ZYX" if a in sizes]
    return (sizes.get("S", 1), sizes.get("C", 1), *spatial)


def _open(path: Path) -> Any:
    """Open an array lazily (memory map, zarr array or TIFF series)."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if suffix == ".zarr":
        try:
            import zarr
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ImportError("reading .zarr needs zarr: pip install gpu-patching[cli]") from error
        array = zarr.open(str(path), mode="r")
        if not hasattr(array, "shape"):
            raise ValueError(f"{path} is a zarr group, not an array; name the array inside it")
        return array
    if suffix in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ImportError(
                "reading .tif needs tifffile: pip install gpu-patching[cli]"
            ) from error
        return tifffile.TiffFile(path)
    raise ValueError(
        f"{path} has an unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}"
    )


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
    opened = _open(Path(path))
    if hasattr(opened, "series"):  # a TiffFile
        with opened:
            shape = tuple(int(s) for s in opened.series[0].shape)
    else:
        shape = tuple(int(s) for s in opened.shape)
    return _scyx_shape(shape, axes)


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
        axes of length 1).
    """
    opened = _open(Path(path))
    if hasattr(opened, "series"):
        with opened:
            data = opened.series[0].asarray()
    else:
        data = np.asarray(opened[...])
    order, target = to_scyx_axes(axes, data.ndim)
    data = np.transpose(data, order)
    if "S" not in target:
        data = data[np.newaxis]
    if "C" not in target:
        data = data[:, np.newaxis]
    return np.ascontiguousarray(data)
