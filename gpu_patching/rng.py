"""Counter-based random bits: Philox4x32-10 and the counter layout.

This module turns counters into random 32-bit words and knows nothing about
patches. Every random number the sampler uses is a pure function of
``(seed, patch index, draw number, purpose)``: there is no generator state, so
any order of evaluation, any device and any number of threads give the same
bits. The CUDA kernels implement the same function in
``gpu_patching/kernels/philox.cuh``; the test suite checks both against the
published Random123 known-answer vectors.

Counter layout (the only place it is defined on the Python side)::

    counter = (index & 0xffffffff, draw_number, purpose, index >> 32)
    key     = (seed & 0xffffffff, seed >> 32)

For patch indices below ``2**32`` the last word is 0, which is the
``(patch index, draw number, purpose, 0)`` layout of the design document; the
last word only carries the high bits of larger indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "PURPOSE_SHUFFLE",
    "PURPOSE_STRATUM",
    "philox4x32_10",
    "random_uint32",
    "random_uint32_pair",
    "random_uint64",
    "random_words",
]

#: Purpose word of the draw that places a patch inside its stratum.
PURPOSE_STRATUM = 0
#: Purpose word of the round keys of the epoch shuffle (``permutation``).
PURPOSE_SHUFFLE = 1

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_ROUNDS = 10


def _as_words(value: ArrayLike) -> NDArray[np.uint64]:
    """Return ``value`` as uint64 holding 32-bit words, rejecting wider values."""
    words = np.asarray(value)
    if words.dtype.kind not in "ui":
        raise TypeError(f"Philox words must be integers, got dtype {words.dtype}")
    if words.size and (words.min() < 0 or words.max() > 0xFFFFFFFF):
        raise ValueError("Philox words must lie in [0, 2**32)")
    return words.astype(np.uint64, copy=False)


def _philox_rounds(
    c0: Any, c1: Any, c2: Any, c3: Any, k0: int, k1: int, *, n_words: int = 4
) -> tuple[Any, ...]:
    """Run the ten Philox rounds on words held as uint64 scalars or arrays.

    Scalars stay scalars for as long as the data flow allows (the draw number
    and purpose words are the same for every patch), and the arrays are
    updated in place: this is the hot loop of the NumPy backend. With
    ``n_words`` 1 or 2 the last round computes only the output words asked for.
    """
    for round_number in range(_ROUNDS):
        key0, key1 = np.uint64(k0), np.uint64(k1)
        # Products of two 32-bit words fit exactly in uint64.
        product1 = np.multiply(_PHILOX_M1, c2)
        if n_words <= 2 and round_number == _ROUNDS - 1:
            word0 = product1 >> _SHIFT32
            word0 ^= c1
            word0 ^= key0
            product1 &= _MASK32
            return (word0, product1)[:n_words]
        product0 = np.multiply(_PHILOX_M0, c0)
        new0 = product1 >> _SHIFT32
        new0 ^= c1
        new0 ^= key0
        product1 &= _MASK32
        new2 = product0 >> _SHIFT32
        new2 ^= c3
        new2 ^= key1
        product0 &= _MASK32
        c0, c1, c2, c3 = new0, product1, new2, product0
        k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def philox4x32_10(
    counter: tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike],
    key: tuple[int, int],
) -> tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.uint64], NDArray[np.uint64]]:
    """Evaluate Philox4x32-10 element-wise (Salmon et al., SC'11; Random123).

    Parameters
    ----------
    counter : tuple of four array_like of int
        The four 32-bit counter words; arrays broadcast against each other.
    key : tuple of two int
        The two 32-bit key words.

    Returns
    -------
    tuple of four numpy.ndarray of numpy.uint64
        The four 32-bit output words (stored in uint64 arrays), broadcast to
        the common shape of the counter words.
    """
    words = [_as_words(c) for c in counter]
    k0, k1 = (int(k) for k in key)
    if not (0 <= k0 <= 0xFFFFFFFF and 0 <= k1 <= 0xFFFFFFFF):
        raise ValueError(f"Philox key words must lie in [0, 2**32), got {key}")
    shape = np.broadcast_shapes(*(w.shape for w in words))
    out = _philox_rounds(words[0], words[1], words[2], words[3], k0, k1)
    return tuple(np.broadcast_to(w, shape).astype(np.uint64) for w in out)  # type: ignore[return-value]


def _counter_words(
    seed: int, index: ArrayLike, draw_number: ArrayLike, purpose: int, n_words: int
) -> tuple[NDArray[np.uint64], ...]:
    """Return the first ``n_words`` Philox output words of each index's counter."""
    index = np.asarray(index, dtype=np.int64)
    draw = np.asarray(draw_number, dtype=np.uint64)
    shape = np.broadcast_shapes(index.shape, draw.shape)
    # Indices are non-negative, so their uint64 view is the same integers.
    unsigned = index.view(np.uint64)
    if index.size and int(index.max()) > 0xFFFFFFFF:
        low_word, high_word = unsigned & _MASK32, unsigned >> _SHIFT32
    else:
        # Below 2**32 the index is its low word (the rounds never write into
        # their inputs) and the high word is the scalar 0: round one is cheap.
        low_word, high_word = unsigned, np.uint64(0)
    words = _philox_rounds(
        low_word,
        draw if draw.ndim else np.uint64(draw),
        np.uint64(purpose),
        high_word,
        seed & 0xFFFFFFFF,
        seed >> 32,
        n_words=n_words,
    )
    return tuple(
        w if np.shape(w) == shape else np.broadcast_to(w, shape).astype(np.uint64) for w in words
    )


def random_uint32(
    seed: int, index: ArrayLike, draw_number: int, purpose: int
) -> NDArray[np.uint64]:
    """Return the first Philox output word of each patch index's counter.

    Parameters
    ----------
    seed : int
        The 64-bit key, in ``[0, 2**64)``.
    index : array_like of int
        Non-negative patch indices, below ``2**63``.
    draw_number : int
        The draw number, in ``[0, 2**32)``.
    purpose : int
        What the bits are for (``PURPOSE_STRATUM``, ``PURPOSE_SHUFFLE``).

    Returns
    -------
    numpy.ndarray of numpy.uint64
        One uniformly distributed 32-bit word per index (in uint64 storage).
    """
    return _counter_words(seed, index, draw_number, purpose, 1)[0]


def random_uint32_pair(
    seed: int, index: ArrayLike, draw_number: int, purpose: int
) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """Return the first two Philox output words of each patch index's counter.

    Parameters are those of :func:`random_uint32`.

    Returns
    -------
    word0, word1 : numpy.ndarray of numpy.uint64
        The low and the high half of :func:`random_uint64`'s word.
    """
    word0, word1 = _counter_words(seed, index, draw_number, purpose, 2)
    return word0, word1


def random_uint64(
    seed: int, index: ArrayLike, draw_number: int, purpose: int
) -> NDArray[np.uint64]:
    """Return ``word1 << 32 | word0`` of each patch index's Philox output.

    Parameters are those of :func:`random_uint32`.

    Returns
    -------
    numpy.ndarray of numpy.uint64
        One uniformly distributed 64-bit word per index.
    """
    word0, word1 = _counter_words(seed, index, draw_number, purpose, 2)
    return (word1 << _SHIFT32) | word0


def random_words(
    seed: int, index: ArrayLike, draw_number: ArrayLike, purpose: int
) -> tuple[NDArray[np.uint64], NDArray[np.uint64], NDArray[np.uint64], NDArray[np.uint64]]:
    """Return all four Philox output words of each counter.

    Parameters
    ----------
    seed : int
        The 64-bit key, in ``[0, 2**64)``.
    index : array_like of int
        Non-negative indices, below ``2**63`` (the counter's index words).
    draw_number : int or array_like of int
        Draw numbers in ``[0, 2**32)``; broadcasts against ``index``.
    purpose : int
        What the bits are for (``PURPOSE_STRATUM``, ``PURPOSE_SHUFFLE``).

    Returns
    -------
    tuple of four numpy.ndarray of numpy.uint64
        The 32-bit output words (in uint64 storage), broadcast shape.
    """
    return _counter_words(seed, index, draw_number, purpose, 4)  # type: ignore[return-value]
