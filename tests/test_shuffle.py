"""Shuffled and sharded epochs on the NumPy backend, one rule per test.

The permutation (``gpu_patching.permutation``) must be a bijection of
``range(N)`` for every ``N``, a pure function of ``(seed, epoch, N)``,
different every epoch and unbiased; the shards follow PyTorch's
``DistributedSampler`` (checked here against its formula, written out below,
and in ``test_torch.py`` against the class itself); and the draw of an index
never depends on where the order puts it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from conftest import numpy_sampler

from gpu_patching import StratifiedPatching, rng
from gpu_patching.permutation import (
    MAX_POSITIONS,
    SHUFFLE_ROUNDS,
    EpochOrder,
    feistel_domain,
    permute,
    round_keys,
)

PRIMES = [2, 3, 5, 7, 11, 13, 31, 61, 127, 257, 1009, 8191, 65537]
POWERS_OF_TWO = [2**k for k in range(1, 17)]
SIZES = sorted({*range(0, 130), *PRIMES, *POWERS_OF_TWO, *(p - 1 for p in POWERS_OF_TWO)})


def distributed_sampler_shard(
    order: list[int], rank: int, world_size: int, drop_last: bool
) -> list[int]:
    """``torch.utils.data.DistributedSampler.__iter__`` on a given order, verbatim rules."""
    n = len(order)
    if drop_last and n % world_size != 0:
        num_samples = math.ceil((n - world_size) / world_size)
    else:
        num_samples = math.ceil(n / world_size)
    total_size = num_samples * world_size
    indices = list(order)
    if not drop_last:
        padding_size = total_size - len(indices)
        if padding_size <= len(indices):
            indices += indices[:padding_size]
        else:
            indices += (indices * math.ceil(padding_size / len(indices)))[:padding_size]
    else:
        indices = indices[:total_size]
    return indices[rank:total_size:world_size]


def chi_square_z(counts: np.ndarray) -> float:
    """How many standard deviations a chi-square statistic of uniform counts lies above its mean."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    expected = counts.sum() / counts.size
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.size - 1
    return (statistic - dof) / math.sqrt(2 * dof)


def probability_sampler(n_patches_wanted: int) -> StratifiedPatching:
    """A sampler whose one sample has exactly the wanted number of patches (>= 1)."""
    sampler = numpy_sampler([(1, 1, 80, 80)], (4, 4), seed=11)  # 400 cells
    # Each probability-0 region takes one patch off the count (docs/design.md, patches per sample).
    cells = 400 - n_patches_wanted
    grid = np.ones((20, 20))
    grid.reshape(-1)[:cells] = 0.0
    sampler.set_region_probs(0, 0, grid)
    assert sampler.n_patches == n_patches_wanted
    return sampler


# -- the permutation -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_permutation_is_a_bijection_for_many_sizes(seed: int) -> None:
    for n in SIZES:
        for epoch in (0, 2**32 - 1):
            order = permute(np.arange(n), n, seed, epoch)
            assert order.dtype == np.int64
            np.testing.assert_array_equal(np.sort(order), np.arange(n), err_msg=f"N={n}")


def test_permutation_is_a_bijection_of_an_order_just_above_a_power_of_four() -> None:
    n = 4**9 + 1
    order = permute(np.arange(n), n, 3, 4)
    np.testing.assert_array_equal(np.bincount(order, minlength=n), np.ones(n, dtype=np.int64))


def test_permutation_is_a_pure_function_of_seed_epoch_and_size() -> None:
    positions = np.arange(500)
    first = permute(positions, 500, 42, 9)
    np.testing.assert_array_equal(permute(positions, 500, 42, 9), first)
    # Any subset of positions, in any order, reads the same permutation.
    subset = np.array([499, 3, 250, 3])
    np.testing.assert_array_equal(permute(subset, 500, 42, 9), first[subset])


def test_permutation_differs_every_epoch() -> None:
    orders = {tuple(permute(np.arange(1000), 1000, 5, epoch).tolist()) for epoch in range(64)}
    assert len(orders) == 64


def test_permutation_differs_between_seeds() -> None:
    orders = {tuple(permute(np.arange(1000), 1000, seed, 0).tolist()) for seed in range(32)}
    assert len(orders) == 32


def test_permutation_of_an_array_of_epochs_is_one_permutation_per_element() -> None:
    epochs = np.arange(40)
    together = permute(np.full(40, 3), 17, 8, epochs)
    one_by_one = [int(permute([3], 17, 8, int(epoch))[0]) for epoch in epochs]
    assert together.tolist() == one_by_one


@pytest.mark.parametrize("n", [2, 3, 10, 64, 1000])
def test_first_position_is_uniform_over_epochs(n: int) -> None:
    epochs = np.arange(20_000)
    first = permute(np.zeros(epochs.size, dtype=np.int64), n, 2024, epochs)
    counts = np.bincount(first, minlength=n)
    # Fixed seed, deterministic; a bias of a few percent would be ~10 sigma.
    assert abs(chi_square_z(counts)) < 6, counts


def test_every_position_is_uniform_over_epochs() -> None:
    n, n_epochs = 6, 24_000
    epochs = np.arange(n_epochs)
    order = permute(np.broadcast_to(np.arange(n)[:, None], (n, n_epochs)), n, 77, epochs)
    counts = np.stack([np.bincount(row, minlength=n) for row in order])
    assert abs(chi_square_z(counts)) < 6, counts


def test_adjacent_positions_are_independent_over_epochs() -> None:
    # The ordered pair at positions (0, 1) is uniform over the N (N - 1) pairs.
    n, n_epochs = 12, 40_000
    epochs = np.arange(n_epochs)
    pair = permute(np.broadcast_to(np.array([[0], [1]]), (2, n_epochs)), n, 5, epochs)
    counts = np.bincount(pair[0] * n + pair[1], minlength=n * n).reshape(n, n)
    assert (np.diag(counts) == 0).all()
    assert abs(chi_square_z(counts[~np.eye(n, dtype=bool)])) < 6


def test_every_permutation_of_four_is_equally_likely() -> None:
    n_epochs = 24_000
    epochs = np.arange(n_epochs)
    order = permute(np.broadcast_to(np.arange(4)[:, None], (4, n_epochs)), 4, 31, epochs)
    code = ((order[0] * 4 + order[1]) * 4 + order[2]) * 4 + order[3]
    _, counts = np.unique(code, return_counts=True)
    assert counts.size == 24
    assert abs(chi_square_z(counts)) < 6, counts


def test_round_keys_are_philox_words_with_the_shuffle_purpose() -> None:
    keys = round_keys(123, 456)
    assert keys.shape == (SHUFFLE_ROUNDS,) and keys.dtype == np.uint32
    expected = [
        int(word)
        for block in range(SHUFFLE_ROUNDS // 4)
        for word in rng.random_words(123, block, 456, rng.PURPOSE_SHUFFLE)
    ]
    assert keys.tolist() == expected


@pytest.mark.parametrize("n", [129, 200, 1000, 4097, 66016, 264064, 2**40 + 1, MAX_POSITIONS])
def test_feistel_domain_wastes_fewer_values_than_one_low_half(n: int) -> None:
    # Cycle walking then rarely takes a second pass.
    low_bits, high_size = feistel_domain(n)
    domain = high_size * 2**low_bits
    assert n <= domain < n + 2**low_bits
    assert high_size <= 2**31  # R + step < 2 B never wraps 32 bits


def test_permute_refuses_positions_outside_the_order() -> None:
    with pytest.raises(ValueError, match="position 10 is outside"):
        permute([0, 10], 10, 1, 1)
    with pytest.raises(ValueError, match="position -1 is outside"):
        permute([-1], 10, 1, 1)
    with pytest.raises(ValueError, match="n_positions"):
        permute([], MAX_POSITIONS + 1, 1, 1)


# -- the shard rules -------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_sizes_follow_distributed_sampler(drop_last: bool) -> None:
    for n in range(0, 40):
        for world_size in range(1, 8):
            expected = len(distributed_sampler_shard(list(range(n)), 0, world_size, drop_last))
            for rank in range(world_size):
                order = EpochOrder.shard(n, rank=rank, world_size=world_size, drop_last=drop_last)
                assert order.n_rows == expected, (n, world_size, rank)
                assert len(order.indices(0, 0)) == expected


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_match_distributed_sampler_on_the_epoch_order(
    shuffle: bool, drop_last: bool
) -> None:
    for n in (1, 2, 3, 7, 10, 31, 64, 97):
        full = EpochOrder.shard(n, shuffle=shuffle).indices(seed=9, draw_number=4).tolist()
        if shuffle:
            assert full == permute(np.arange(n), n, 9, 4).tolist()
        else:
            assert full == list(range(n))
        for world_size in (1, 2, 3, 4, 8, 13):
            for rank in range(world_size):
                order = EpochOrder.shard(
                    n, shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last
                )
                expected = distributed_sampler_shard(full, rank, world_size, drop_last)
                assert order.indices(9, 4).tolist() == expected, (n, world_size, rank)


def test_shard_of_an_unshuffled_single_rank_is_the_plain_range() -> None:
    order = EpochOrder.shard(17)
    assert order.is_contiguous and order == EpochOrder.contiguous(0, 17)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"world_size": 0}, ValueError, "world_size must be >= 1"),
        ({"world_size": -2}, ValueError, "world_size must be >= 1"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank must be in"),
        ({"rank": -1, "world_size": 2}, ValueError, "rank must be in"),
        ({"rank": 1.0, "world_size": 2}, TypeError, "rank must be an integer"),
        ({"world_size": "2"}, TypeError, "world_size must be an integer"),
        ({"world_size": True}, TypeError, "world_size must be an integer"),
        ({"shuffle": 1}, TypeError, "shuffle must be a bool"),
        ({"drop_last": "yes"}, TypeError, "drop_last must be a bool"),
    ],
)
def test_bad_shard_arguments_are_refused(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    sampler = numpy_sampler([(2, 1, 40, 40)], (8, 8), seed=3)
    sampler.get_patch_spec(0)
    before = (sampler.epoch, sampler.state_dict()["calls"], sampler.n_patches)
    with pytest.raises(error, match=message):
        sampler.sample_epoch(0, **arguments)
    with pytest.raises(error, match=message):
        sampler.epoch_indices(0, **arguments)
    assert (sampler.epoch, sampler.state_dict()["calls"], sampler.n_patches) == before


def test_numpy_integer_rank_and_world_size_are_accepted() -> None:
    sampler = numpy_sampler([(1, 1, 40, 40)], (8, 8))
    batch = sampler.sample_epoch(1, rank=np.int64(1), world_size=np.int32(2), shuffle=np.True_)
    assert len(batch) == math.ceil(sampler.n_patches / 2)


# -- sample_epoch with shuffle and shard -----------------------------------------------


@pytest.fixture(scope="module")
def sampler() -> StratifiedPatching:
    """Two stacks, exclusions and probabilities: 219 patches, not a round number."""
    sampler = numpy_sampler([(3, 1, 61, 47), (2, 1, 30, 33)], (8, 6), seed=2**63 + 5)
    sampler.exclude_patches(0, 1, [(1, 1), (3, 4), (6, 2)])
    sampler.set_region_probs(1, 0, {(0, 0): 0.0, (2, 3): 2.5, (1, 1): 0.25})
    return sampler


@pytest.mark.parametrize("epoch", [0, 5, 2**32 - 1])
def test_shuffled_epoch_is_a_permutation_of_the_plain_epoch(
    sampler: StratifiedPatching, epoch: int
) -> None:
    plain = sampler.sample_epoch(epoch)
    shuffled = sampler.sample_epoch(epoch, shuffle=True)
    assert len(shuffled) == len(plain) == sampler.n_patches
    np.testing.assert_array_equal(np.sort(shuffled.indices), plain.indices)
    assert not np.array_equal(shuffled.indices, plain.indices)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_every_row_has_the_patch_its_index_has_in_the_plain_epoch(
    sampler: StratifiedPatching, shuffle: bool, drop_last: bool, world_size: int
) -> None:
    plain = sampler.sample_epoch(6)
    for rank in range(world_size):
        shard = sampler.sample_epoch(
            6, shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last
        )
        rows = shard.indices
        np.testing.assert_array_equal(shard.data_idx, plain.data_idx[rows])
        np.testing.assert_array_equal(shard.sample_idx, plain.sample_idx[rows])
        np.testing.assert_array_equal(shard.coords, plain.coords[rows])
        assert shard.patch_size == plain.patch_size


def test_shards_without_drop_last_cover_every_index(sampler: StratifiedPatching) -> None:
    n = sampler.n_patches
    for world_size in (2, 3, 4, 7, n + 3):
        shards = [
            sampler.sample_epoch(2, shuffle=True, rank=rank, world_size=world_size).indices
            for rank in range(world_size)
        ]
        assert {len(shard) for shard in shards} == {math.ceil(n / world_size)}
        assert set(np.concatenate(shards).tolist()) == set(range(n))


def test_shards_with_drop_last_are_disjoint_and_equal_sized(sampler: StratifiedPatching) -> None:
    n = sampler.n_patches
    for world_size in (2, 3, 4, 7):
        shards = [
            sampler.sample_epoch(
                2, shuffle=True, rank=rank, world_size=world_size, drop_last=True
            ).indices
            for rank in range(world_size)
        ]
        assert {len(shard) for shard in shards} == {n // world_size}
        together = np.concatenate(shards)
        assert len(set(together.tolist())) == len(together)


def test_padding_repeats_the_start_of_the_shuffled_order(sampler: StratifiedPatching) -> None:
    n = sampler.n_patches
    world_size = 4
    order = sampler.sample_epoch(3, shuffle=True).indices
    last_rows = [
        sampler.sample_epoch(3, shuffle=True, rank=rank, world_size=world_size).indices[-1]
        for rank in range(world_size)
    ]
    padded = math.ceil(n / world_size) * world_size - n
    assert padded > 0, "the fixture's patch count is not a multiple of 4"
    assert last_rows[-padded:] == order[:padded].tolist()


def test_shuffled_order_differs_every_epoch(sampler: StratifiedPatching) -> None:
    orders = {tuple(sampler.sample_epoch(e, shuffle=True).indices.tolist()) for e in range(10)}
    assert len(orders) == 10


def test_unshuffled_single_rank_epoch_is_the_plain_epoch(sampler: StratifiedPatching) -> None:
    plain = sampler.sample_epoch(4)
    same = sampler.sample_epoch(4, shuffle=False, rank=0, world_size=1, drop_last=True)
    for name in ("data_idx", "sample_idx", "coords", "indices"):
        np.testing.assert_array_equal(getattr(same, name), getattr(plain, name))


def test_epoch_indices_are_the_index_column_of_sample_epoch(sampler: StratifiedPatching) -> None:
    for arguments in (
        {},
        {"shuffle": True},
        {"shuffle": True, "rank": 2, "world_size": 3},
        {"rank": 1, "world_size": 4, "drop_last": True},
    ):
        indices = sampler.epoch_indices(8, **arguments)
        np.testing.assert_array_equal(indices, sampler.sample_epoch(8, **arguments).indices)


def test_get_patch_spec_returns_the_rows_of_a_shuffled_shard() -> None:
    # The per-index API and the epoch are two views of one function: after
    # set_epoch(e), the first call of get_patch_spec(i) is i's row of epoch e.
    sampler = numpy_sampler([(2, 1, 40, 30)], (8, 6), seed=21)
    shard = sampler.sample_epoch(9, shuffle=True, rank=1, world_size=3, drop_last=True)
    sampler.set_epoch(9)
    for row in range(len(shard)):
        assert sampler.get_patch_spec(int(shard.indices[row])) == shard.spec(row)


def test_shard_of_an_empty_epoch_is_empty() -> None:
    sampler = numpy_sampler([(1, 1, 12, 12)], (4, 4))
    sampler.exclude_patches(0, 0, [(y, x) for y in range(3) for x in range(3)])
    assert sampler.n_patches == 0
    for world_size in (1, 2):
        batch = sampler.sample_epoch(0, shuffle=True, rank=world_size - 1, world_size=world_size)
        assert len(batch) == 0 and batch.coords.shape == (0, 2)


@pytest.mark.parametrize("n_patches", [1, 2, 5, 64, 129])
def test_shuffled_epochs_of_any_size_are_permutations(n_patches: int) -> None:
    sampler = probability_sampler(n_patches)
    for epoch in range(3):
        order = sampler.sample_epoch(epoch, shuffle=True).indices
        np.testing.assert_array_equal(np.sort(order), np.arange(n_patches))


def test_shuffled_shard_of_a_3d_stack_keeps_its_rows() -> None:
    sampler = numpy_sampler([(2, 1, 9, 20, 17)], (3, 5, 4), seed=4)
    plain = sampler.sample_epoch(1)
    shard = sampler.sample_epoch(1, shuffle=True, rank=0, world_size=2)
    assert shard.coords.shape == (math.ceil(sampler.n_patches / 2), 3)
    np.testing.assert_array_equal(shard.coords, plain.coords[shard.indices])
