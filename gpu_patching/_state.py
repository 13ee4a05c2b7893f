"""The checkpoint codec of :meth:`StratifiedPatching.state_dict`: plain JSON, checksummed.

:func:`encode_state` makes a state and :func:`decode_state` checks one
completely and returns its values; the sampler only builds tables from them.
Arrays are compressed little-endian bytes (:func:`encode_array`) and a SHA-256
of everything else (:func:`state_checksum`) makes a modified state detectable.
Version 1 states (no ``probability_order``) still load: see :func:`decode_state`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from . import _validation as check

__all__ = [
    "STATE_FORMAT",
    "STATE_KEYS",
    "STATE_VERSION",
    "DecodedState",
    "check_envelope",
    "decode_array",
    "decode_calls",
    "decode_state",
    "encode_array",
    "encode_state",
    "seal",
    "state_checksum",
]

#: The ``format`` entry of every :meth:`StratifiedPatching.state_dict`.
STATE_FORMAT = "gpu_patching.StratifiedPatching"
#: The layout version of :meth:`StratifiedPatching.state_dict`.
STATE_VERSION = 2
#: The keys of a state, no more and no fewer.
STATE_KEYS = frozenset(
    {
        "format",
        "version",
        "seed",
        "data_shapes",
        "patch_size",
        "epoch_base",
        "n_patches",
        "excluded",
        "probability",
        "probability_order",
        "calls",
        "checksum",
    }
)
#: Older layout versions that still load, and their keys.
_OLD_STATE_KEYS = {1: STATE_KEYS - {"probability_order"}}
_ARRAY_KEYS = frozenset({"dtype", "length", "encoding", "data"})
_ARRAY_ENCODING = "zlib+base64"


def encode_array(values: NDArray[Any]) -> dict[str, Any]:
    """Return a 1-D array as JSON data: little-endian bytes, zlib, base64 text.

    Booleans are packed eight to a byte first. Per-region and per-index arrays
    are mostly runs of one value (no exclusion, probability 1, equal call
    counts), which zlib shrinks by orders of magnitude.

    Parameters
    ----------
    values : numpy.ndarray
        A 1-D array of bool or of a fixed-width number type.

    Returns
    -------
    dict
        ``{"dtype", "length", "encoding", "data"}``, all JSON values.
    """
    if values.dtype == np.bool_:
        dtype = "bool"
        raw = np.packbits(values, bitorder="little").tobytes()
    else:
        little = values.dtype.newbyteorder("<")
        dtype = little.str
        raw = values.astype(little, copy=False).tobytes()
    return {
        "dtype": dtype,
        "length": len(values),
        "encoding": _ARRAY_ENCODING,
        "data": base64.b64encode(zlib.compress(raw)).decode("ascii"),
    }


def check_array_header(entry: Any, name: str, dtype: str, length: int) -> None:
    """Check an encoded array's keys, dtype, encoding and length, without decoding it.

    Parameters are those of :func:`decode_array`, which calls this first.

    Raises
    ------
    ValueError
        If the entry is not an encoded array of that dtype and length.
    """
    where = f"state[{name!r}]"
    if not isinstance(entry, Mapping) or set(entry) != _ARRAY_KEYS:
        raise ValueError(f"{where} must be an encoded array with keys {sorted(_ARRAY_KEYS)}")
    if entry["dtype"] != dtype or entry["encoding"] != _ARRAY_ENCODING:
        raise ValueError(
            f"{where} is {entry['dtype']!r} data encoded as {entry['encoding']!r}, "
            f"expected {dtype!r} encoded as {_ARRAY_ENCODING!r}"
        )
    if entry["length"] != length:
        raise ValueError(f"{where} holds {entry['length']} values, this sampler needs {length}")


def decode_array(entry: Any, name: str, dtype: str, length: int) -> NDArray[Any]:
    """Return an array made by :func:`encode_array`, checking what it claims to be.

    Parameters
    ----------
    entry : Any
        The encoded array, as found in a state.
    name : str
        Its key in the state, for the error messages.
    dtype : str
        The dtype it must have (``"bool"``, or a little-endian NumPy type
        string such as ``"<u4"``).
    length : int
        The number of values it must hold.

    Returns
    -------
    numpy.ndarray
        The values, in native byte order.

    Raises
    ------
    ValueError
        If the entry is not an encoded array of that dtype and length, or its
        data cannot be decoded.
    """
    check_array_header(entry, name, dtype, length)
    where = f"state[{name!r}]"
    if dtype == "bool":
        expected_bytes = -(-length // 8)
    else:
        expected_bytes = length * np.dtype(dtype).itemsize
    try:
        # Inflate at most one byte more than expected: a small hostile state
        # must not make gigabytes before its length is found wrong.
        inflate = zlib.decompressobj()
        compressed = base64.b64decode(entry["data"], validate=True)
        raw = inflate.decompress(compressed, expected_bytes + 1)
    except (binascii.Error, zlib.error, TypeError, ValueError) as error:
        raise ValueError(f"{where} cannot be decoded: {error}") from None
    if len(raw) != expected_bytes:
        raise ValueError(f"{where} decodes to {len(raw)} bytes, expected {expected_bytes}")
    if dtype == "bool":
        bits = np.frombuffer(raw, dtype=np.uint8)
        return np.unpackbits(bits, count=length, bitorder="little").astype(bool)
    return np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))


def state_checksum(state: Mapping[str, Any]) -> str:
    """Return the SHA-256 of a state's canonical JSON text, its checksum excluded.

    Parameters
    ----------
    state : Mapping
        A state, with or without its ``checksum`` entry.

    Returns
    -------
    str
        ``"sha256:"`` followed by 64 hex digits.

    Raises
    ------
    ValueError
        If the state holds values that are not plain JSON data.
    """
    body = {key: value for key, value in state.items() if key != "checksum"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise ValueError(f"state is not plain JSON data: {error}") from None
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(body: dict[str, Any]) -> dict[str, Any]:
    """Return a state: ``body`` with its format, version and checksum added.

    Parameters
    ----------
    body : dict
        Every key of :data:`STATE_KEYS` but ``format``, ``version`` and
        ``checksum``, as JSON values.

    Returns
    -------
    dict
        The state, ``format`` and ``version`` first.
    """
    state: dict[str, Any] = {"format": STATE_FORMAT, "version": STATE_VERSION, **body}
    state["checksum"] = state_checksum(state)
    return state


def check_envelope(state: Any) -> Mapping[str, Any]:
    """Check a state's type, keys, format, version and checksum; return it.

    Parameters
    ----------
    state : Any
        What the user gave to ``load_state_dict``.

    Returns
    -------
    Mapping
        The same object, known to be a complete, unmodified state of this
        format and of a version that loads (its values are still to check).

    Raises
    ------
    TypeError
        If ``state`` is not a mapping.
    ValueError
        If it is not a state of this format and version, or its checksum does
        not match its contents.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
    version = state.get("version")
    if type(version) is not int or (version != STATE_VERSION and version not in _OLD_STATE_KEYS):
        version = STATE_VERSION  # the keys are checked first, against the current layout
    expected = _OLD_STATE_KEYS.get(version, STATE_KEYS)
    keys = set(state)
    missing, unknown = expected - keys, keys - expected
    if missing or unknown:
        raise ValueError(
            f"not a StratifiedPatching state: missing keys {sorted(missing)}, "
            f"unknown keys {sorted(map(str, unknown))}"
        )
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"state format is {state['format']!r}, expected {STATE_FORMAT!r}")
    if type(state["version"]) is not int or (
        state["version"] != STATE_VERSION and state["version"] not in _OLD_STATE_KEYS
    ):
        raise ValueError(
            f"state version {state['version']!r} is not supported (this gpu-patching "
            f"reads versions {sorted([*_OLD_STATE_KEYS, STATE_VERSION])})"
        )
    if state["checksum"] != state_checksum(state):
        raise ValueError(
            "state checksum does not match its contents: the state was modified or "
            "corrupted after state_dict() made it"
        )
    return state


class DecodedState(NamedTuple):
    """The checked values of a state (:func:`decode_state`)."""

    seed: int
    epoch_base: int
    n_patches: int
    #: Per region, in row order.
    excluded: NDArray[np.bool_]
    probability: NDArray[np.float64]
    #: When each region's probability was first set (-1: never); None for a
    #: version 1 state, whose regions count as set in row order.
    probability_order: NDArray[np.int64] | None


def encode_state(
    *,
    seed: int,
    data_shapes: tuple[tuple[int, ...], ...],
    patch_size: tuple[int, ...],
    epoch_base: int,
    excluded: NDArray[np.bool_],
    probability: NDArray[np.float64],
    probability_order: NDArray[np.int64],
    calls: NDArray[np.uint32],
) -> dict[str, Any]:
    """Return the state of a sampler with these values (see ``state_dict``).

    Parameters
    ----------
    seed : int
        The seed in use.
    data_shapes, patch_size : tuple
        What the sampler was built on.
    epoch_base : int
        The last ``set_epoch``.
    excluded, probability, probability_order : numpy.ndarray
        Per region, in row order (host arrays).
    calls : numpy.ndarray of uint32
        The per-index call counters; their length is ``n_patches``.

    Returns
    -------
    dict
        The sealed state: JSON values only.
    """
    return seal(
        {
            "seed": seed,
            "data_shapes": [list(shape) for shape in data_shapes],
            "patch_size": list(patch_size),
            "epoch_base": epoch_base,
            "n_patches": len(calls),
            "excluded": encode_array(excluded),
            "probability": encode_array(probability),
            "probability_order": encode_array(probability_order),
            "calls": encode_array(calls),
        }
    )


def decode_state(
    state: Any,
    data_shapes: tuple[tuple[int, ...], ...],
    patch_size: tuple[int, ...],
    n_regions: int,
) -> DecodedState:
    """Check a state made by ``state_dict`` against a sampler and return its values.

    Everything but the call counters is decoded and checked here; the caller
    checks that the exclusions and probabilities give ``n_patches`` patches
    before it inflates the counters (:func:`decode_calls`), so that a state's
    own word never sizes an allocation.

    A version 1 state has no ``probability_order``: its regions whose
    probability is not 1 count as set in row order (row-major per sample,
    samples in order). The patch count subtracts the probabilities in that
    order, so where they were set in another order the counts of the restored
    sampler can differ from the original's by the float rounding of the sum,
    in rare cases by one patch.

    Parameters
    ----------
    state : Any
        What the user gave to ``load_state_dict``.
    data_shapes, patch_size : tuple
        The sampler's; the state must have been made for the same.
    n_regions : int
        The sampler's number of regions.

    Returns
    -------
    DecodedState

    Raises
    ------
    TypeError, ValueError
        As :func:`check_envelope`; ``ValueError`` also when the state was made
        for other shapes or its values are inconsistent.
    """
    state = check_envelope(state)
    patch = check.validate_patch_size(state["patch_size"])
    shapes = check.validate_data_shapes(state["data_shapes"], patch)
    if shapes != data_shapes or patch != patch_size:
        raise ValueError(
            f"the state is for data_shapes {list(shapes)} and patch_size {patch}, but "
            f"this sampler has data_shapes {list(data_shapes)} and patch_size {patch_size}"
        )
    if state["seed"] is None:
        raise ValueError("state['seed'] is None; a state always holds the seed in use")
    seed = check.validate_seed(state["seed"])
    epoch_base = check.check_epoch(state["epoch_base"], "state['epoch_base']")
    n_patches = check.as_int(state["n_patches"], "state['n_patches']")
    excluded = decode_array(state["excluded"], "excluded", "bool", n_regions)
    probability = check.check_probabilities(
        decode_array(state["probability"], "probability", "<f8", n_regions),
        "state['probability']",
    )
    order = None
    if "probability_order" in state:
        order = _check_set_order(
            decode_array(state["probability_order"], "probability_order", "<i8", n_regions),
            probability,
        )
    check_array_header(state["calls"], "calls", "<u4", n_patches)
    return DecodedState(seed, epoch_base, n_patches, excluded, probability, order)


def decode_calls(state: Mapping[str, Any], n_patches: int) -> NDArray[np.uint32]:
    """Return the call counters of a state checked by :func:`decode_state`.

    Raises
    ------
    ValueError
        If they cannot be decoded.
    """
    return decode_array(state["calls"], "calls", "<u4", n_patches)


def _check_set_order(set_order: NDArray[np.int64], probability: NDArray[Any]) -> NDArray[np.int64]:
    """Check a state's first-set order of the region probabilities; return it.

    Every value is -1 (never set) or a distinct non-negative number, and a
    region whose probability is not 1 has been set: otherwise the order the
    patch count subtracts the probabilities in is not defined.
    """
    name = "state['probability_order']"
    if set_order.size and int(set_order.min()) < -1:
        raise ValueError(f"{name} holds {int(set_order.min())}; expected -1 or a number >= 0")
    placed = set_order[set_order >= 0]
    if np.unique(placed).size != placed.size:
        raise ValueError(f"{name} gives two regions the same place in the order")
    unset = (set_order < 0) & (probability != 1.0)
    if unset.any():
        region = int(np.argmax(unset))
        raise ValueError(
            f"{name} says region row {region} was never set, but its probability is "
            f"{float(probability[region])}, not 1"
        )
    return set_order
