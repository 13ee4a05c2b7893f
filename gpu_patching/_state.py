"""The checkpoint codec of :meth:`StratifiedPatching.state_dict`: plain JSON, checksummed.

A state is a flat dict of JSON values (dicts, lists, strings, ints; no
pickle), so it can be saved with ``json.dump`` or inside a PyTorch
checkpoint and read by any gpu-patching of the same :data:`STATE_VERSION`.
Per-region and per-index arrays are stored as compressed little-endian bytes
(:func:`encode_array`), and a SHA-256 of everything else
(:func:`state_checksum`) makes a modified or corrupted state detectable.

This module knows the layout of a state, not what its values mean: the
sampler checks the values (shapes, seed, epoch, counts) against itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "STATE_FORMAT",
    "STATE_KEYS",
    "STATE_VERSION",
    "check_envelope",
    "decode_array",
    "encode_array",
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
        format and version (its values are still the caller's to check).

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
    keys = set(state)
    missing, unknown = STATE_KEYS - keys, keys - STATE_KEYS
    if missing or unknown:
        raise ValueError(
            f"not a StratifiedPatching state: missing keys {sorted(missing)}, "
            f"unknown keys {sorted(map(str, unknown))}"
        )
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"state format is {state['format']!r}, expected {STATE_FORMAT!r}")
    if type(state["version"]) is not int or state["version"] != STATE_VERSION:
        raise ValueError(
            f"state version {state['version']!r} is not supported (this gpu-patching "
            f"reads version {STATE_VERSION})"
        )
    if state["checksum"] != state_checksum(state):
        raise ValueError(
            "state checksum does not match its contents: the state was modified or "
            "corrupted after state_dict() made it"
        )
    return state
