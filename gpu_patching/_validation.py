"""Input checks shared by the public calls.

Every function here either returns a clean value or raises ``TypeError``,
``ValueError`` or ``IndexError`` with a message that names the offending value
and what was expected. None of them changes any state.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import grid
from ._arrays import to_host

__all__ = [
    "as_int",
    "check_index",
    "check_stack_shape",
    "coords_to_mask",
    "dense_grid_array",
    "is_dense",
    "probabilities_to_grid",
    "validate_data_shapes",
    "validate_patch_size",
    "validate_seed",
]


def as_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int; reject bools, floats and the rest.

    Parameters
    ----------
    value : Any
        The value to check.
    name : str
        How the value is named in the error message.

    Returns
    -------
    int
        The value.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def check_index(value: Any, name: str, length: int) -> int:
    """Return ``value`` as an int in ``[0, length)``; ``IndexError`` otherwise."""
    index = as_int(value, name)
    if not 0 <= index < length:
        raise IndexError(f"{name} {index} is out of range: expected 0 <= {name} < {length}")
    return index


def _int_sequence(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of integers, got {value!r}")
    return tuple(as_int(v, f"{name} entry") for v in value)


def validate_patch_size(patch_size: Any) -> tuple[int, ...]:
    """Return the patch size as a tuple of 2 or 3 positive ints."""
    patch = _int_sequence(patch_size, "patch_size")
    if len(patch) not in (2, 3):
        raise ValueError(
            f"patch_size must have 2 (YX) or 3 (ZYX) entries, got {len(patch)}: {patch}"
        )
    if min(patch) < 1:
        raise ValueError(f"patch_size entries must be positive, got {patch}")
    return patch


def validate_data_shapes(
    data_shapes: Any, patch_size: tuple[int, ...]
) -> tuple[tuple[int, ...], ...]:
    """Return the data shapes as tuples of positive ints, axes ``SC(Z)YX``.

    Each shape must have ``len(patch_size) + 2`` axes. A spatial part smaller
    than the patch along some axis is accepted (the sampler gives such samples
    no patches, as the reference does); the crop and statistics calls check
    their stacks with :func:`check_stack_shape`, which refuses it.
    """
    if isinstance(data_shapes, (str, bytes)) or not isinstance(data_shapes, (Sequence, np.ndarray)):
        raise TypeError(f"data_shapes must be a sequence of shapes, got {data_shapes!r}")
    if len(data_shapes) == 0:
        raise ValueError("data_shapes is empty: give the SC(Z)YX shape of at least one stack")
    shapes = []
    for k, raw in enumerate(data_shapes):
        shape = _int_sequence(raw, f"data_shapes[{k}]")
        check_stack_shape(shape, patch_size, f"data_shapes[{k}]", smaller_ok=True)
        shapes.append(shape)
    return tuple(shapes)


def check_stack_shape(
    shape: tuple[int, ...], patch_size: tuple[int, ...], name: str, *, smaller_ok: bool = False
) -> None:
    """Check one ``SC(Z)YX`` shape against the patch size; ``ValueError`` names it.

    Parameters
    ----------
    shape : tuple of int
        The shape, ``len(patch_size) + 2`` axes, every size positive, the
        spatial part at least the patch along every axis.
    patch_size : tuple of int
        The patch size (2 or 3 entries).
    name : str
        How the shape's owner is named in the message, e.g. ``"stacks[1]"``.
    smaller_ok : bool, default False
        Accept a spatial part smaller than the patch (the sampler's data
        shapes: such a sample just has no patches).
    """
    ndim = len(patch_size)
    axes = "SCZYX" if ndim == 3 else "SCYX"
    if len(shape) != ndim + 2:
        raise ValueError(
            f"{name} has shape {shape} ({len(shape)} axes); with a {ndim}D patch_size "
            f"it must have {ndim + 2} axes ({axes})"
        )
    if min(shape) < 1:
        raise ValueError(f"{name} has shape {shape}, with an empty or negative axis")
    if not smaller_ok and any(p > s for p, s in zip(patch_size, shape[2:], strict=True)):
        raise ValueError(
            f"patch_size {patch_size} is larger than the spatial shape {shape[2:]} "
            f"of {name} (shape {shape})"
        )


def validate_seed(seed: Any) -> int:
    """Return the seed as an int in ``[0, 2**64)``, drawing one when None."""
    if seed is None:
        return secrets.randbits(64)
    value = as_int(seed, "seed")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {value}")
    return value


def is_dense(value: Any) -> bool:
    """Tell whether ``value`` is an array (NumPy, CuPy, ...) rather than a sequence."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def dense_grid_array(value: Any, cells: tuple[int, ...], name: str, xp: Any) -> Any:
    """Return a dense per-cell array as an ``xp`` array, checking its shape."""
    shape = tuple(int(s) for s in value.shape)
    if shape != cells:
        raise ValueError(f"{name} has shape {shape}, but the sample's grid has shape {cells}")
    if xp is np:
        return to_host(value)
    return xp.asarray(value)


def coords_to_mask(grid_coords: Any, cells: tuple[int, ...], name: str) -> np.ndarray:
    """Return a boolean grid that is True at each of ``grid_coords``.

    Parameters
    ----------
    grid_coords : sequence of tuple of int, or array of int, shape (k, d)
        Grid coordinates.
    cells : tuple of int
        The grid shape.
    name : str
        How the coordinates are named in error messages.

    Returns
    -------
    numpy.ndarray of bool, shape ``cells``
        The marked cells (duplicates are harmless).
    """
    coords = coords_array(grid_coords, cells, name)
    mask = np.zeros(cells, dtype=bool)
    mask[tuple(coords.T)] = True
    return mask


def coords_array(grid_coords: Any, cells: tuple[int, ...], name: str) -> np.ndarray:
    """Return grid coordinates as a checked ``(k, d)`` int64 array."""
    ndim = len(cells)
    if is_dense(grid_coords):
        array = to_host(grid_coords)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
        if array.size == 0:
            array = array.reshape(0, ndim)
        if array.ndim != 2 or array.shape[1] != ndim:
            raise ValueError(
                f"{name} must have shape (k, {ndim}) for a {ndim}D grid, got {array.shape}"
            )
        coords = array.astype(np.int64)
    else:
        if isinstance(grid_coords, (str, bytes)) or not isinstance(
            grid_coords, (Sequence, set, frozenset)
        ):
            raise TypeError(
                f"{name} must be a sequence of {ndim}-tuples of ints, got {grid_coords!r}"
            )
        fast = _fast_coords(grid_coords, ndim)
        if fast is not None:
            coords = fast
        else:  # slow path: find the first bad entry and name it
            rows = []
            for coord in grid_coords:
                row = _int_sequence(coord, f"{name} entry {coord!r}")
                if len(row) != ndim:
                    raise ValueError(
                        f"{name} entry {coord!r} has {len(row)} values; the grid is "
                        f"{ndim}D with shape {cells}"
                    )
                if any(not 0 <= c < g for c, g in zip(row, cells, strict=True)):
                    raise ValueError(f"{name} entry {row} lies outside the grid of shape {cells}")
                rows.append(row)
            coords = np.asarray(rows, dtype=np.int64).reshape(-1, ndim)
    outside = np.any((coords < 0) | (coords >= np.asarray(cells)), axis=1)
    if outside.any():
        bad = tuple(int(c) for c in coords[np.argmax(outside)])
        raise ValueError(f"{name} entry {bad} lies outside the grid of shape {cells}")
    return coords


def _fast_coords(grid_coords: Any, ndim: int) -> np.ndarray | None:
    """Convert well-formed coordinates in one NumPy call; None if not well formed."""
    if isinstance(grid_coords, (set, frozenset)):
        grid_coords = list(grid_coords)
    if len(grid_coords) == 0:
        return np.zeros((0, ndim), dtype=np.int64)
    try:
        # NumPy would silently read True as 1: leave bools to the slow path.
        value_types = {type(value) for coord in grid_coords for value in coord}
        array = np.asarray(grid_coords)
    except (ValueError, TypeError, OverflowError):  # ragged or exotic entries
        return None
    if bool in value_types or np.bool_ in value_types:
        return None
    if array.dtype.kind not in "iu" or array.ndim != 2 or array.shape[1] != ndim:
        return None
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        return None
    return array.astype(np.int64)


def check_probabilities(values: np.ndarray, name: str) -> np.ndarray:
    """Return probabilities as float64 after checking they are finite and in range."""
    if values.dtype.kind == "b" or values.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
    probabilities = values.astype(np.float64)
    bad = ~np.isfinite(probabilities) | (probabilities < 0)
    bad |= probabilities > grid.MAX_PROBABILITY
    if bad.any():
        value = probabilities.reshape(-1)[np.argmax(bad.reshape(-1))]
        raise ValueError(f"{name} must be finite and in [0, {grid.MAX_PROBABILITY:g}], got {value}")
    return probabilities


def probabilities_to_grid(
    probs: Any, current: np.ndarray, cells: tuple[int, ...], name: str
) -> np.ndarray:
    """Return a new probability grid from a ``{grid_coord: p}`` mapping.

    Cells the mapping does not name keep their ``current`` probability.
    """
    if not isinstance(probs, Mapping):
        raise TypeError(
            f"{name} must be a dict {{grid_coord: probability}} or an array of the "
            f"grid shape {cells}, got {type(probs).__name__}"
        )
    coords = coords_array(list(probs.keys()), cells, name)
    raw = list(probs.values())
    for value in raw:
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise TypeError(f"{name} values must be real numbers, got {value!r}")
    values = check_probabilities(np.asarray(raw, dtype=np.float64), name)
    updated = current.copy()
    updated[tuple(coords.T)] = values
    return updated
