"""The order of an epoch: a counter-based shuffle and PyTorch's sharding rules.

Which patch index each row of an epoch draws, and nothing else: this module
knows neither tables nor corners. :func:`permute` is the bijection (a Feistel
network with cycle walking, keyed by ``(seed, epoch)``; one position at a
time, so one GPU thread per row), :class:`EpochOrder` the positions one rank
takes (``DistributedSampler``'s rules). ``kernels/permutation.cuh`` is the CUDA
twin. Domain, rounds and keys: ``docs/design.md``, "The shuffle bijection".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _validation as check
from . import rng

__all__ = [
    "MAX_POSITIONS",
    "SHUFFLE_ROUNDS",
    "EpochOrder",
    "feistel_domain",
    "permute",
    "round_keys",
]

#: Rounds of the Feistel network, each of which changes one half (a classic
#: Feistel round): twice the four of Luby and Rackoff's strong permutation.
SHUFFLE_ROUNDS = 8
#: Largest ``N`` the permutation orders: keeps ``B <= 2**31``, so ``R + r``
#: (below ``2 B``) never wraps 32 bits.
MAX_POSITIONS = 1 << 62
# Smallest halves: a round on one- or two-bit halves picks among so few
# functions that eight rounds leave pairs of positions visibly correlated, so
# an order of fewer than 64 patches walks in [0, 64) (a few passes, on a few
# rows).
_MIN_LOW_BITS = 3
_MIN_HIGH_SIZE = 8
# Key words per Philox call; SHUFFLE_ROUNDS is a multiple of it.
_WORDS_PER_CALL = 4
# MurmurHash3's fmix32 multipliers.
_MIX1 = np.uint32(0x85EBCA6B)
_MIX2 = np.uint32(0xC2B2AE35)
# Positions permuted per vectorised pass: a chunk's uint32 temporaries stay
# in the CPU's L2 cache.
_CHUNK = 1 << 15


def feistel_domain(n_positions: int) -> tuple[int, int]:
    """Return the shape ``(k, B)`` of the Feistel domain for ``N`` positions.

    Parameters
    ----------
    n_positions : int
        ``N``, the length of the permuted range, in ``[0, MAX_POSITIONS]``.

    Returns
    -------
    low_bits : int
        ``k = max(3, ceil(bit_length(N - 1) / 2))``: the low half has ``2**k``
        values.
    high_size : int
        ``B = max(8, ceil(N / 2**k))``: the high half's values. From
        ``N = 129`` on, the domain ``[0, B * 2**k)`` holds ``[0, N)`` with
        fewer than ``2**k`` values to spare; below, it is at least 64 values,
        because rounds on halves of one or two bits mix poorly.
    """
    low_bits = max(_MIN_LOW_BITS, ((max(n_positions, 1) - 1).bit_length() + 1) // 2)
    high_size = max(_MIN_HIGH_SIZE, -(-n_positions // (1 << low_bits)))
    return low_bits, high_size


def round_keys(seed: int, draw_number: ArrayLike) -> NDArray[np.uint32]:
    """Return the Feistel round keys of an epoch (or of many epochs).

    Parameters
    ----------
    seed : int
        The sampler's 64-bit seed.
    draw_number : int or array_like of int
        The epoch (draw number), in ``[0, 2**32)``.

    Returns
    -------
    numpy.ndarray of numpy.uint32, shape ``(SHUFFLE_ROUNDS, *shape)``
        Key ``r`` of round ``r``: word ``r % 4`` of the Philox output of
        counter ``(r // 4, draw_number, PURPOSE_SHUFFLE, 0)``, for each draw
        number (``shape`` is that of ``draw_number``).
    """
    draws = np.asarray(draw_number)
    keys = np.empty((SHUFFLE_ROUNDS, *draws.shape), dtype=np.uint32)
    for block in range(SHUFFLE_ROUNDS // _WORDS_PER_CALL):
        # The block number is the counter's index word: rng's counter layout.
        words = rng.random_words(seed, block, draws, rng.PURPOSE_SHUFFLE)
        for word in range(_WORDS_PER_CALL):
            keys[block * _WORDS_PER_CALL + word] = words[word]
    return keys


class _Network:
    """The Feistel network of one ``N``, applied to arrays of values below ``D``."""

    def __init__(self, n_positions: int) -> None:
        self.low_bits, self.high_size = feistel_domain(n_positions)
        self.low_mask = np.uint32((1 << self.low_bits) - 1)
        self.high64 = np.uint64(self.high_size)
        self.high32 = np.uint32(self.high_size)
        self.low_shift = np.uint32(32 - self.low_bits)

    def _add_step(
        self,
        high: NDArray[np.uint32],
        mixed: NDArray[np.uint32],
        step: NDArray[np.uint64],
    ) -> None:
        """``high += ((mixed >> 16) * B) >> 16``, in ``[0, B)``; clobbers ``mixed``.

        Lemire's multiply-shift range reduction of ``F``'s top 16 bits: one
        formula for every ``B <= 2**31`` (the CUDA twin computes it in 64
        bits), and one multiply in uint32 whenever ``B < 2**16``.
        """
        mixed >>= np.uint32(16)
        if self.high_size < 1 << 16:
            # The product stays below 2**32: all in uint32, NumPy's fast path.
            mixed *= self.high32
            mixed >>= np.uint32(16)
            high += mixed
        else:
            np.multiply(mixed, self.high64, out=step, dtype=np.uint64)
            step >>= np.uint64(16)
            np.add(high, step, out=high, casting="unsafe")

    def apply(self, value: NDArray[np.int64], keys: list[Any], out: NDArray[np.int64]) -> None:
        """One pass of the network: ``out = network(value)`` (each below ``D``).

        Written as in-place ufunc calls on small uint32 buffers: this is the
        hot loop of a shuffled epoch on the CPU. ``out`` may be ``value``.
        """
        low = value.astype(np.uint32)  # the low 32 bits, then the low k
        low &= self.low_mask
        high = (value >> self.low_bits).astype(np.uint32)
        mixed = np.empty_like(low)
        scratch = np.empty_like(low)
        # Only orders of more than 2**32 positions need the uint64 product.
        step = np.empty(len(low) if self.high_size >= 1 << 16 else 0, dtype=np.uint64)
        for round_number, key in enumerate(keys):
            # F(x, key): fmix32's two multiply/xor-shift steps of x ^ key.
            source = high if round_number % 2 == 0 else low
            np.bitwise_xor(source, key, out=mixed)
            mixed *= _MIX1
            np.right_shift(mixed, np.uint32(16), out=scratch)
            mixed ^= scratch
            mixed *= _MIX2
            if round_number % 2 == 0:
                # L ^= the top k bits of F.
                mixed >>= self.low_shift
                low ^= mixed
            else:
                # R = (R + r) mod B, r = ((F >> 16) * B) >> 16 in [0, B).
                self._add_step(high, mixed, step)
                # (R + r) mod B for R + r < 2 B: when R + r < B the difference
                # wraps round to a huge value and the minimum keeps R + r.
                np.subtract(high, self.high32, out=scratch)
                np.minimum(high, scratch, out=high)
        np.copyto(out, high)
        out <<= self.low_bits
        out |= low


def _walk(
    position: NDArray[np.int64],
    n_positions: int,
    keys: NDArray[np.uint32],
    value: NDArray[np.int64],
) -> None:
    """Cycle-walk every position (below ``N``) to its image below ``N``, into ``value``.

    ``keys`` has shape ``(SHUFFLE_ROUNDS,)`` (one epoch; the first pass runs
    in cache-sized chunks) or ``(SHUFFLE_ROUNDS, len(position))``. ``value``
    may be ``position``: no other array as long as it is made, because fresh
    memory is costly to map.
    """
    network = _Network(n_positions)
    if keys.ndim == 2:
        network.apply(position, list(keys), value)
    else:
        scalar_keys = [np.uint32(k) for k in keys]
        for start in range(0, len(position), _CHUNK):
            rows = slice(start, start + _CHUNK)
            network.apply(position[rows], scalar_keys, value[rows])
    pending = np.flatnonzero(value >= n_positions)
    # From N = 129 on, fewer than 2**k of the D values lie at or above N: a
    # second pass is rare, and each pass shrinks the set again. (Smaller
    # orders walk in a domain of 64 values: more passes, over a few rows.)
    while pending.size:
        pass_keys = list(keys[:, pending]) if keys.ndim == 2 else scalar_keys
        stepped = value[pending]
        network.apply(stepped, pass_keys, stepped)
        value[pending] = stepped
        pending = pending[stepped >= n_positions]


def permute(
    positions: ArrayLike, n_positions: int, seed: int, draw_number: ArrayLike
) -> NDArray[np.int64]:
    """Return the patch index at each position of the shuffled order of an epoch.

    Parameters
    ----------
    positions : array_like of int
        Positions in ``[0, N)``.
    n_positions : int
        ``N``, the number of patches the permutation orders, in
        ``[0, MAX_POSITIONS]``.
    seed : int
        The sampler's 64-bit seed.
    draw_number : int or array_like of int
        The epoch, in ``[0, 2**32)``; an array broadcasts against
        ``positions`` (one permutation per element, as the tests of its
        statistics use).

    Returns
    -------
    numpy.ndarray of int64
        ``pi(position)``, where ``pi`` is a permutation of ``range(N)`` that
        depends only on ``(seed, draw_number, N)``; broadcast shape.

    Raises
    ------
    ValueError
        If a position lies outside ``[0, N)`` or ``N`` is out of range.
    """
    if not 0 <= n_positions <= MAX_POSITIONS:
        raise ValueError(f"n_positions must be in [0, 2**62], got {n_positions}")
    position = np.asarray(positions, dtype=np.int64)
    draws = np.asarray(draw_number)
    shape = np.broadcast_shapes(position.shape, draws.shape)
    if position.size and (position.min() < 0 or position.max() >= n_positions):
        bad = position.reshape(-1)[np.argmax((position < 0) | (position >= n_positions))]
        raise ValueError(f"position {int(bad)} is outside [0, {n_positions})")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=np.int64)
    flat = np.ascontiguousarray(np.broadcast_to(position, shape).reshape(-1))
    if draws.ndim == 0:
        keys = round_keys(seed, int(draws))
    else:
        keys = round_keys(seed, np.broadcast_to(draws, shape).reshape(-1))
    result = np.empty_like(flat)
    _walk(flat, n_positions, keys, result)
    return result.reshape(shape)


@dataclass(frozen=True)
class EpochOrder:
    """The patch index each row of a (shuffled, sharded) epoch draws.

    Row ``t`` takes position ``p = first_position + t * position_step``,
    reduced modulo ``n_positions`` when that is positive (the padding of a
    shard wraps round to the start of the order); its index is ``p``, or
    ``permute(p)`` when ``shuffle`` is set. Build one with :meth:`shard` (or
    :meth:`contiguous` for a plain range of indices).

    Attributes
    ----------
    first_position : int
        Position of row 0 (the rank).
    position_step : int
        Positions between consecutive rows (the world size).
    n_rows : int
        Rows of the result.
    n_positions : int
        ``N``: the length of the order (positions wrap modulo it) and the
        domain of the permutation; 0 for a plain range that never wraps.
    shuffle : bool
        Whether positions go through the permutation.
    """

    first_position: int
    position_step: int
    n_rows: int
    n_positions: int
    shuffle: bool

    @classmethod
    def contiguous(cls, start: int, stop: int) -> EpochOrder:
        """Return the plain order of the indices ``range(start, stop)``.

        Parameters
        ----------
        start, stop : int
            First index and the end of the range.

        Returns
        -------
        EpochOrder
            Row ``t`` draws index ``start + t``; nothing wraps or is shuffled.
        """
        return cls(start, 1, max(stop - start, 0), 0, False)

    @classmethod
    def shard(
        cls,
        n_patches: int,
        *,
        shuffle: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> EpochOrder:
        """Return one rank's share of an epoch, by ``DistributedSampler``'s rules.

        Parameters
        ----------
        n_patches : int
            ``N``, the patches of the epoch.
        shuffle : bool, default False
            Permute the order (by :func:`permute`) before sharding.
        rank : int, default 0
            This process's rank, ``0 <= rank < world_size``.
        world_size : int, default 1
            Number of ranks sharing the epoch, ``>= 1``.
        drop_last : bool, default False
            Drop the tail of the order so that it divides evenly (each rank
            gets ``N // world_size`` rows, all distinct across ranks) instead
            of padding it by wrapping round to the start (each rank gets
            ``ceil(N / world_size)`` rows, and every index is in some shard).

        Returns
        -------
        EpochOrder
            Rank ``rank``'s rows: positions ``rank, rank + world_size, ...``.

        Raises
        ------
        TypeError
            If ``rank`` or ``world_size`` is not an integer, or ``shuffle`` or
            ``drop_last`` not a bool.
        ValueError
            If ``world_size`` is outside ``[1, 2**32]`` or ``rank`` outside
            ``[0, world_size)``.
        """
        rank, world_size = check.check_rank_world_size(rank, world_size)
        shuffle = check.check_flag(shuffle, "shuffle")
        drop_last = check.check_flag(drop_last, "drop_last")
        n_rows = n_patches // world_size if drop_last else -(-n_patches // world_size)
        if not shuffle and world_size == 1:
            return cls.contiguous(0, n_patches)
        return cls(rank, world_size, n_rows, n_patches, shuffle)

    @property
    def is_contiguous(self) -> bool:
        """Whether the rows are the plain range ``first_position + t`` (no wrap, no shuffle)."""
        last = self.first_position + self.n_rows
        return (
            not self.shuffle
            and (self.position_step == 1 or self.n_rows <= 1)
            and (self.n_positions == 0 or last <= self.n_positions)
        )

    def check_within(self, n_patches: int) -> None:
        """Check that every row draws an index in ``[0, n_patches)``.

        Parameters
        ----------
        n_patches : int
            The number of patches of the epoch.

        Raises
        ------
        IndexError
            If some row's index would fall outside ``[0, n_patches)``.
        """
        if self.n_rows == 0:
            return
        if self.n_positions > 0:
            inside = (
                self.n_positions <= n_patches
                and self.first_position >= 0
                and self.position_step >= 0
            )
        else:
            last = self.first_position + (self.n_rows - 1) * self.position_step
            inside = not self.shuffle and 0 <= min(self.first_position, last)
            inside = inside and max(self.first_position, last) < n_patches
        if not inside:
            raise IndexError(f"{self} draws indices outside [0, {n_patches})")

    def positions(self) -> NDArray[np.int64]:
        """Return the position of every row, after wrapping.

        Returns
        -------
        numpy.ndarray of int64, shape (n_rows,)
            ``(first_position + t * position_step) mod n_positions`` (no
            modulo when ``n_positions`` is 0).
        """
        # In place on the one array made: fresh memory is costly to map.
        position = np.arange(self.n_rows, dtype=np.int64)
        if self.position_step != 1:
            position *= self.position_step
        if self.first_position:
            position += self.first_position
        if self.n_positions > 0 and self.n_rows and position[-1] >= self.n_positions:
            position %= self.n_positions
        return position

    def indices(self, seed: int, draw_number: int) -> NDArray[np.int64]:
        """Return the global patch index of every row.

        Parameters
        ----------
        seed : int
            The sampler's 64-bit seed (keys the shuffle).
        draw_number : int
            The epoch (keys the shuffle).

        Returns
        -------
        numpy.ndarray of int64, shape (n_rows,)
            ``permute(position)`` when shuffling, else the position.
        """
        position = self.positions()
        if self.shuffle and self.n_rows:
            keys = round_keys(seed, draw_number)
            _walk(position, self.n_positions, keys, position)
        return position
