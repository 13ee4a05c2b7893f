"""Counter-based random bits: Philox4x32-10 and the counter layout.

The one host Philox: it turns counters into random 32-bit words and knows
nothing about patches. Every random number is a pure function of
``(seed, patch index, draw number, purpose)`` with the counter
``(index & 0xffffffff, draw_number, purpose, index >> 32)`` under the key
``(seed & 0xffffffff, seed >> 32)``; ``kernels/philox.cuh`` is the CUDA twin,
and both are tested against Random123's known answers (``docs/design.md``,
"Philox4x32-10").
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "PURPOSE_SHUFFLE",
    "PURPOSE_STRATUM",
    "PURPOSE_SWEEP",
    "CounterPrefix",
    "philox4x32_10",
    "random_pair_int",
    "random_uint32",
    "random_uint32_pair",
    "random_uint64",
    "random_words",
]

#: Purpose word of the draw that places a patch inside its stratum.
PURPOSE_STRATUM = 0
#: Purpose word of the round keys of the epoch shuffle (``permutation``).
PURPOSE_SHUFFLE = 1
#: Purpose word of the sweep directions of the chunk order's tiles (``stores.order``).
PURPOSE_SWEEP = 2

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
#: The same constants as Python ints: the rounds mix them with ints and arrays alike.
_WORD = 0xFFFFFFFF
_M0 = int(_PHILOX_M0)
_M1 = int(_PHILOX_M1)
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


@functools.lru_cache(maxsize=64)
def _round_keys(seed: int) -> tuple[tuple[int, int], ...]:
    """Return the ten round keys of a 64-bit seed (the key bumped by the Weyl constants)."""
    k0, k1 = seed & _WORD, seed >> 32
    return tuple(
        ((k0 + r * _PHILOX_W0) & _WORD, (k1 + r * _PHILOX_W1) & _WORD) for r in range(_ROUNDS)
    )


def _philox_rounds(
    c0: Any,
    c1: Any,
    c2: Any,
    c3: Any,
    seed: int,
    *,
    n_words: int = 4,
    first_round: int = 0,
) -> tuple[Any, ...]:
    """Run the ten Philox rounds on words held as Python ints, uint64 scalars or arrays.

    The one host implementation of the rounds: written with operators and
    Python-int constants only, so that Python ints stay exact Python ints (a
    single counter, :func:`random_pair_int`) and uint64 arrays stay uint64
    (NumPy keeps an array's dtype against a Python int that fits it).
    Scalars stay scalars for as long as the data flow allows (the draw number
    and purpose words are the same for every patch), and the temporaries are
    updated in place: this is the hot loop of the NumPy draw. With
    ``n_words`` 1 or 2 the last round computes only the output words asked
    for. ``first_round`` > 0 continues from the state after that many rounds.
    """
    keys = _round_keys(seed)
    last = _ROUNDS - 1 if n_words <= 2 else _ROUNDS
    for k0, k1 in keys[first_round:last]:
        # Products of two 32-bit words fit exactly in uint64.
        product1 = c2 * _M1
        product0 = c0 * _M0
        new0 = product1 >> 32
        new0 ^= c1
        new0 ^= k0
        product1 &= _WORD
        new2 = product0 >> 32
        new2 ^= c3
        new2 ^= k1
        product0 &= _WORD
        c0, c1, c2, c3 = new0, product1, new2, product0
    if last == _ROUNDS:
        return c0, c1, c2, c3
    product1 = c2 * _M1
    word0 = product1 >> 32
    word0 ^= c1
    word0 ^= keys[last][0]
    product1 &= _WORD
    return (word0, product1)[:n_words]


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
    out = _philox_rounds(words[0], words[1], words[2], words[3], k1 << 32 | k0)
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
        seed,
        n_words=n_words,
    )
    return tuple(
        w if np.shape(w) == shape else np.broadcast_to(w, shape).astype(np.uint64) for w in words
    )


class CounterPrefix:
    """The part of Philox4x32-10 that does not depend on the draw number.

    For the counters ``(index, draw, purpose, 0)`` of a fixed array of
    indices below ``2**32`` under a fixed key, the first rounds mix the index
    words with constants only; the draw number enters them as a scalar. This
    object keeps what rounds 0 to 2 compute from the indices (four arrays of
    ``len(index)`` words), so that :meth:`words` runs only the rest: the same
    bits as :func:`random_uint32_pair`, for about three rounds fewer of
    NumPy calls per draw.

    Parameters
    ----------
    seed : int
        The 64-bit key, in ``[0, 2**64)``.
    index : numpy.ndarray of int64
        Patch indices in ``[0, 2**32)``.
    purpose : int
        The counter's purpose word.
    """

    def __init__(self, seed: int, index: NDArray[np.int64], purpose: int) -> None:
        if index.size and (int(index.min()) < 0 or int(index.max()) > 0xFFFFFFFF):
            raise ValueError("CounterPrefix needs indices in [0, 2**32)")
        self._seed = seed
        keys = _round_keys(seed)
        mask = 0xFFFFFFFF
        # Round 0: (index, draw, purpose, 0). The purpose product is a constant.
        purpose_product = int(_PHILOX_M1) * purpose
        self._draw_mix = (purpose_product >> 32) ^ keys[0][0]  # new0 = draw ^ this
        carried = purpose_product & mask  # new1
        product = np.multiply(_PHILOX_M0, index.view(np.uint64))
        word2 = product >> _SHIFT32
        word2 ^= np.uint64(keys[0][1])  # new2 (the high index word is 0)
        product &= _MASK32  # new3
        # Round 1: words (draw-scalar, constant, word2, product).
        product1 = np.multiply(_PHILOX_M1, word2)
        round1_word0 = product1 >> _SHIFT32
        round1_word0 ^= np.uint64(carried ^ keys[1][0])
        product1 &= _MASK32  # round-1 new1
        # round-1 new2 = hi(M0 * draw-scalar) ^ product ^ k1: all but the scalar.
        product ^= np.uint64(keys[1][1])
        self._round1_word2 = product
        # Round 2: the products of the draw-independent words.
        product0 = np.multiply(_PHILOX_M0, round1_word0)
        high0 = product0 >> _SHIFT32
        high0 ^= np.uint64(keys[2][1])
        self._round2_word2 = high0  # ^ the round-1 new3 scalar
        product0 &= _MASK32
        self._round2_word3 = product0
        product1 ^= np.uint64(keys[2][0])
        self._round2_word1_key = product1  # round-1 new1 ^ k0 of round 2

    def words(self, draw_number: int) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
        """Return ``random_uint32_pair(seed, index, draw_number, purpose)``."""
        mask = 0xFFFFFFFF
        word0 = int(draw_number) ^ self._draw_mix  # round-0 new0, a scalar
        product = int(_PHILOX_M0) * word0  # round 1's scalar product
        # Round 2 on (round1_word0, round-1 new1, round-1 new2, round-1 new3).
        word2 = self._round1_word2 ^ np.uint64(product >> 32)
        product1 = np.multiply(_PHILOX_M1, word2)
        new0 = product1 >> _SHIFT32
        new0 ^= self._round2_word1_key
        product1 &= _MASK32
        new2 = self._round2_word2 ^ np.uint64(product & mask)
        return _philox_rounds(  # type: ignore[return-value]
            new0, product1, new2, self._round2_word3, self._seed, n_words=2, first_round=3
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


def random_pair_int(seed: int, index: int, draw_number: int, purpose: int) -> tuple[int, int]:
    """Return :func:`random_uint32_pair` of one counter, in Python ints.

    The same rounds as the vectorised generator, on Python ints: about two
    microseconds, where a NumPy call on one-element arrays costs more than
    ten. For the draw of a single patch (random access).

    Parameters
    ----------
    seed : int
        The 64-bit key, in ``[0, 2**64)`` (not checked).
    index : int
        Non-negative patch index, below ``2**63`` (not checked).
    draw_number : int
        The draw number, in ``[0, 2**32)`` (not checked).
    purpose : int
        What the bits are for (``PURPOSE_STRATUM``, ``PURPOSE_SHUFFLE``).

    Returns
    -------
    word0, word1 : int
        The first two 32-bit output words.
    """
    return _philox_rounds(  # type: ignore[return-value]
        index & _WORD, draw_number, purpose, index >> 32, seed, n_words=2
    )


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
