"""Whole files, read by the command: a ``.npy``, ``.zarr`` or TIFF file opened lazily.

:func:`open_file` opens one (a memory map, a zarr array or a TIFF file),
:func:`read_file_shape` and :func:`read_file` read its shape or its pixels;
errors name the file. Chunked reading is :func:`~gpu_patching.stores.open_stack`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUPPORTED_SUFFIXES", "open_file", "read_file", "read_file_shape"]

#: File types :func:`open_file` understands.
SUPPORTED_SUFFIXES = (".tif", ".tiff", ".zarr", ".npy")
#: How to install the readers of whole files.
_CLI_EXTRA = "pip install 'gpu-patching[cli]'"
#: The first bytes of every ``.npy`` file (NumPy's format, any version).
_NPY_MAGIC = b"\x93NUMPY"


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


def open_file(path: Path) -> Any:
    """Open a file lazily: a ``.npy`` memory map, a zarr array or a ``tifffile.TiffFile``.

    Parameters
    ----------
    path : pathlib.Path
        A ``.tif``/``.tiff``, ``.zarr`` or ``.npy`` file (any zarr-python
        for ``.zarr``; :func:`open_stack` is the chunked reader).

    Returns
    -------
    Any
        The opened array, or the open TIFF file (:func:`read_file_shape` and
        :func:`read_file` read and close it).

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    ValueError
        If the file is of another type or cannot be read as its type.
    ImportError
        If its reader (zarr, tifffile) is not installed.
    """
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


def read_file_shape(path: Path) -> tuple[int, ...]:
    """Return the shape of the array :func:`read_file` reads, without reading its pixels.

    Parameters
    ----------
    path : pathlib.Path
        The ``.npy``, ``.zarr`` or TIFF file.

    Returns
    -------
    tuple of int
        Its stored shape, in the file's own axes (a TIFF file: its first series).
    """
    opened = open_file(path)
    if hasattr(opened, "series"):  # a TiffFile
        return _tiff_series(opened, path, read=False)
    return tuple(int(s) for s in opened.shape)


def read_file(path: Path) -> np.ndarray:
    """Read a file's array into memory, in the file's own axes and byte order.

    Parameters
    ----------
    path : pathlib.Path
        A file :func:`open_file` opens.

    Returns
    -------
    numpy.ndarray
        The pixels.
    """
    opened = open_file(path)
    if hasattr(opened, "series"):
        return _tiff_series(opened, path, read=True)
    try:
        return np.asarray(opened[...])
    except (ValueError, OSError, EOFError) as error:  # e.g. a truncated file
        raise ValueError(f"cannot read the pixels of {path}: {error}") from error
