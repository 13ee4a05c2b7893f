"""Input checks shared by the public calls.

Every function here either returns a clean value or raises ``TypeError``,
``ValueError`` or ``IndexError`` with a message that names the offending value
and what was expected. None of them changes any state.
"""

from __future__ import annotations

import math
import operator
import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import grid
from .arrays import as_array, to_host

__all__ = [
    "EPOCH_LIMIT",
    "MAX_WORLD_SIZE",
    "SmallSampleWarning",
    "as_int",
    "as_real",
    "check_epoch",
    "check_flag",
    "check_index",
    "check_rank_world_size",
    "check_stack_shape",
    "coords_to_mask",
    "dense_grid_array",
    "is_dense",
    "probabilities_to_grid",
    "validate_data_shapes",
    "validate_patch_size",
    "validate_seed",
    "warn_small_samples",
]


def as_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int; reject bools, floats and the rest.

    Python and NumPy integers are accepted, and so is any 0-d integer array
    or tensor (NumPy, CuPy, PyTorch: whatever implements ``__index__`` for a
    single integer element), as samplers that yield tensors hand them out.

    Parameters
    ----------
    value : Any
        The value to check.
    name : str
        How the value is named in the error message.

    Returns
    -------
    int
        The value, exactly (a uint64 ``2**64 - 1`` stays ``2**64 - 1``).

    Raises
    ------
    TypeError
        If ``value`` is a bool, not an integer, or an array of more than one
        element or of a non-integer type.
    """
    if type(value) is int:
        return value
    # Booleans index as 0 and 1 but are flags, not counts or positions.
    boolean = isinstance(value, (bool, np.bool_)) or "bool" in str(getattr(value, "dtype", ""))
    if not boolean and tuple(getattr(value, "shape", ())) == ():
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def as_real(value: Any, name: str, *, finite: bool = False) -> float:
    """Return ``value`` as a float; reject bools, strings and the rest.

    Python and NumPy integers and floats are accepted, and so is a 0-d real
    array or tensor. Integers too large for a float (``10**400``) are refused
    with the value as given.

    Parameters
    ----------
    value, name
        As :func:`as_int`: the value and how its error message names it.
    finite : bool, default False
        Refuse NaN and infinities too.

    Returns
    -------
    float
        The value.

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If ``value`` is an integer too large for a float, or not finite when
        ``finite`` is set.
    """
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    ):
        scalar: Any = value
    else:
        dtype = str(getattr(value, "dtype", ""))
        real = any(kind in dtype for kind in ("int", "float")) and "complex" not in dtype
        if not real or tuple(getattr(value, "shape", (1,))) != ():
            raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
        scalar = value.item()
    try:
        number = float(scalar)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float64, got {value!r}") from None
    if finite and not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


#: Epochs and draw numbers are 32-bit (the Philox counter word that holds them).
EPOCH_LIMIT = 1 << 32
#: Largest world size: positions ``rank + t * world_size`` stay far inside int64.
MAX_WORLD_SIZE = 1 << 32


def check_epoch(value: Any, name: str = "epoch") -> int:
    """Return an epoch (or draw number) as an int in ``[0, 2**32)``.

    Parameters
    ----------
    value : Any
        The epoch.
    name : str, default "epoch"
        How the value is named in the error message.

    Returns
    -------
    int
        The epoch.

    Raises
    ------
    TypeError
        If ``value`` is not an integer.
    ValueError
        If it is negative or not below ``2**32``.
    """
    epoch = as_int(value, name)
    if not 0 <= epoch < EPOCH_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**32), got {epoch}")
    return epoch


def check_rank_world_size(
    rank: Any,
    world_size: Any,
    *,
    rank_name: str = "rank",
    world_size_name: str = "world_size",
) -> tuple[int, int]:
    """Return ``(rank, world_size)``: ``1 <= world_size <= 2**32``, ``0 <= rank < world_size``.

    Parameters
    ----------
    rank, world_size : Any
        This process's rank and the number of processes.
    rank_name, world_size_name : str
        How they are named in the error messages (PyTorch calls the world
        size ``num_replicas``).

    Returns
    -------
    tuple of int
        The rank and the world size.

    Raises
    ------
    TypeError
        If either is not an integer.
    ValueError
        If the world size is below 1 or above ``2**32``, or the rank is
        outside ``[0, world_size)``.
    """
    size = as_int(world_size, world_size_name)
    index = as_int(rank, rank_name)
    if not 1 <= size <= MAX_WORLD_SIZE:
        raise ValueError(f"{world_size_name} must be >= 1 and at most 2**32, got {size}")
    if not 0 <= index < size:
        raise ValueError(
            f"{rank_name} must be in [0, {world_size_name}) = [0, {size}), got {index}"
        )
    return index, size


def check_flag(value: Any, name: str) -> bool:
    """Return a bool flag; ``TypeError`` for anything but ``bool`` and ``numpy.bool_``.

    Parameters
    ----------
    value : Any
        The flag.
    name : str
        How the flag is named in the error message.

    Returns
    -------
    bool
        The flag.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_index(value: Any, name: str, length: int) -> int:
    """Return ``value`` as an int in ``[0, length)``; ``IndexError`` otherwise."""
    index = as_int(value, name)
    if not 0 <= index < length:
        raise IndexError(f"{name} {index} is out of range: expected 0 <= {name} < {length}")
    return index


def _int_sequence(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        # A 1-D tensor or other array-like of integers reads as its host copy.
        array = None if isinstance(value, (str, bytes)) else as_array(value, name)
        if array is None or array.ndim != 1:
            raise TypeError(f"{name} must be a sequence of integers, got {value!r}")
        value = to_host(array)
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
    no patches, as the reference does); the crop and statistics calls accept
    such stacks too (:func:`check_stack_shape` with ``smaller_ok``), and the
    crops refuse a row that names one.
    """
    if isinstance(data_shapes, (str, bytes)) or not isinstance(data_shapes, (Sequence, np.ndarray)):
        array = (
            None if isinstance(data_shapes, (str, bytes)) else as_array(data_shapes, "data_shapes")
        )
        if array is None or array.ndim != 2:
            raise TypeError(f"data_shapes must be a sequence of shapes, got {data_shapes!r}")
        data_shapes = to_host(array)
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
    dense = as_array(grid_coords, name)
    if dense is not None:
        array = to_host(dense)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
        if array.size == 0:
            array = array.reshape(0, ndim)
        if array.ndim != 2 or array.shape[1] != ndim:
            raise ValueError(
                f"{name} must have shape (k, {ndim}) for a {ndim}D grid, got {array.shape}"
            )
        # Compare before converting: a uint64 2**64 - 1 would wrap to -1.
        outside = np.any((array < 0) | (array >= np.asarray(cells)), axis=1)
        if outside.any():
            bad = tuple(array[np.argmax(outside)].tolist())
            raise ValueError(f"{name} entry {bad} lies outside the grid of shape {cells}")
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
    raw = [as_real(value, f"{name} value") for value in probs.values()]
    values = check_probabilities(np.asarray(raw, dtype=np.float64), name)
    updated = current.copy()
    updated[tuple(coords.T)] = values
    return updated


class SmallSampleWarning(UserWarning):
    """A sample is smaller than the patch along some axis, so it gets no patches.

    :class:`StratifiedPatching` accepts such samples, as CAREamics does, and
    every call works with them; filter this category to silence the warning.
    """


def warn_small_samples(shapes: Sequence[tuple[int, ...]], patch: tuple[int, ...]) -> None:
    """Warn once per image stack whose samples are smaller than the patch.

    Parameters
    ----------
    shapes : sequence of tuple of int
        The ``SC(Z)YX`` shape of every image stack.
    patch : tuple of int
        The patch size.

    Warns
    -----
    SmallSampleWarning
        Naming the stack, its samples and the short axes; ``stacklevel`` points
        at the code that built the sampler.
    """
    axes = "ZYX"[-len(patch) :]
    for data_idx, shape in enumerate(shapes):
        short = [a for a, (size, p) in enumerate(zip(shape[2:], patch, strict=True)) if size < p]
        if not short:
            continue
        samples = "sample_idx 0" if shape[0] == 1 else f"sample_idx 0..{shape[0] - 1}"
        warnings.warn(
            f"data_idx {data_idx}, {samples} (shape {shape}): the spatial shape {shape[2:]} "
            f"is smaller than the patch size {patch} along "
            f"{', '.join(axes[a] for a in short)}, so "
            f"{'this sample has' if shape[0] == 1 else 'these samples have'} no patches",
            SmallSampleWarning,
            stacklevel=3,
        )
