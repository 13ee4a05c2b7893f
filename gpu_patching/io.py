"""Reading image stacks from files, and their axes.

Readers return NumPy-compatible arrays (read lazily where the format allows:
``.npy`` is memory-mapped, ``.zarr`` stays a zarr array) together with the axes
rearranged to the sampler's ``SC(Z)YX`` order. ``.tif``/``.tiff`` needs
``tifffile`` and ``.zarr`` needs ``zarr`` (``pip install 'gpu-patching[cli]'``).
Errors name the file they are about.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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


#: The first bytes of every ``.npy`` file (NumPy's format, any version).
_NPY_MAGIC = b"\x93NUMPY"
#: How to install the optional readers.
_CLI_EXTRA = "pip install 'gpu-patching[cli]'"


def _open_npy(path: Path) -> Any:
    # Checked first: np.load falls back to unpickling anything without the
    # header, and its refusal then advises allow_pickle, which is never the fix.
    try:
        with open(path, "rb") as stream:
            start = stream.read(len(_NPY_MAGIC))
    except OSError as error:
        raise OSError(f"cannot read {path}: {error.strerror or error}") from error
    if start != _NPY_MAGIC:
        raise ValueError(f"{path} is not a NumPy .npy file (it lacks the .npy header)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy array: {error}") from error


def _open(path: Path) -> Any:
    """Open an array lazily (memory map, zarr array or TIFF series)."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path)
    if suffix == ".zarr":
        try:
            import zarr
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ImportError(f"reading .zarr needs zarr: {_CLI_EXTRA}") from error
        try:
            array = zarr.open(str(path), mode="r")
        except Exception as error:  # zarr raises many kinds for a folder it cannot read
            raise ValueError(f"{path} is not a readable zarr store: {error}") from error
        if not hasattr(array, "shape"):
            raise ValueError(f"{path} is a zarr group, not an array; name the array inside it")
        return array
    if suffix in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ImportError(f"reading .tif needs tifffile: {_CLI_EXTRA}") from error
        try:
            with _quiet_tifffile():
                return tifffile.TiffFile(path)
        except Exception as error:  # tifffile's errors do not name the file
            raise ValueError(f"{path} is not a readable TIFF file: {error}") from error
    raise ValueError(
        f"{path} has an unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}"
    )


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Keep tifffile's own log lines about a damaged file off the terminal.

    The error we raise for such a file names it and says what is wrong, on
    one line; tifffile would add lines of its own before it.
    """
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tiff_series(opened: Any, path: Path, read: bool) -> Any:
    """Return the first series of an open TIFF: its shape, or its pixels when ``read``."""
    with opened, _quiet_tifffile():
        try:
            series = opened.series[0]
            return series.asarray() if read else tuple(int(s) for s in series.shape)
        except Exception as error:  # a damaged file fails here, not at opening
            raise ValueError(f"{path} is not a readable TIFF file: {error}") from error


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
        shape = _tiff_series(opened, Path(path), read=False)
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
        axes of length 1), in native byte order.
    """
    opened = _open(Path(path))
    if hasattr(opened, "series"):
        data = _tiff_series(opened, Path(path), read=True)
    else:
        try:
            data = np.asarray(opened[...])
        except (ValueError, OSError, EOFError) as error:  # e.g. a truncated file
            raise ValueError(f"cannot read the pixels of {path}: {error}") from error
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
