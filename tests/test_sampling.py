"""The documented sampling behaviour of ``StratifiedPatching`` (NumPy backend).

docs/design.md states what the sampler promises (sections 1 and 2) and how.
Each test checks one rule. Probabilities are computed exactly where the draw
algorithm allows it (every stratum ``[lo_j, hi_j)`` of mass points is drawn
once per epoch, each point with probability ``1 / (hi_j - lo_j)``); where a
test counts draws instead, the tolerance is many standard errors wide and the
seed is fixed.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from conftest import (
    all_cells,
    corners_are_selectable,
    coverage_map,
    epoch_corners,
    expected_corner_counts,
    expected_sample_patches,
    grid_shape,
    numpy_sampler,
    patches_overlap_cells,
    random_cells,
    rank_corners,
    sample_rows,
    selectable_corners,
    selectable_mask,
)
from draw_reference import stratum_points

from gpu_patching import PatchBatch, StratifiedPatching

PROB_ONE = 1 << 20  # the quantisation step of docs/design.md section 1


def cell_of(corners: np.ndarray, patch_size) -> np.ndarray:
    """The grid cell (region) that holds each corner."""
    return np.asarray(corners) // np.asarray(patch_size)


def draws_in_cell(corners: np.ndarray, patch_size, cell) -> int:
    """How many of the corners lie in the given cell."""
    return int(np.all(cell_of(corners, patch_size) == np.asarray(cell), axis=1).sum())


# -- coverage: the mean expected pixel coverage per epoch is ~1 ------------------------

COVERAGE_CASES = [
    pytest.param((40, 40), (8, 8), id="2d-dividing"),
    pytest.param((37, 29), (5, 7), id="2d-odd-patch"),
    pytest.param((33, 33), (3, 3), id="2d-small-odd-patch"),
    pytest.param((12, 14, 16), (3, 5, 4), id="3d"),
    pytest.param((9, 13, 11), (3, 3, 5), id="3d-odd-patch"),
]


@pytest.mark.parametrize(("spatial", "patch"), COVERAGE_CASES)
def test_mean_expected_pixel_coverage_per_epoch_is_one(spatial, patch):
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=3)
    n_patches = sampler.n_patches
    corners, expected = expected_corner_counts(sampler, 0, 0, n_patches)
    # Each stratum draws exactly one patch: the expectations add up to n.
    assert expected.sum() == pytest.approx(n_patches, rel=1e-12)
    coverage = coverage_map(spatial, patch, corners, expected)
    mean = coverage.mean()
    pixels_per_patch = math.prod(patch)
    assert mean == pytest.approx(n_patches * pixels_per_patch / math.prod(spatial))
    # n = ceil(prod(D / P)): the mean is 1, up to the rounding up of one patch.
    assert 1 - 1e-9 <= mean < 1 + pixels_per_patch / math.prod(spatial)
    # Every pixel can be covered.
    assert coverage.min() > 0


def test_mean_expected_coverage_of_the_pixels_left_is_one_after_exclusion():
    spatial, patch = (48, 40), (6, 5)
    excluded = [(1, 1), (2, 5), (4, 3), (5, 6), (6, 2)]  # interior cells
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=4)
    sampler.exclude_patches(0, 0, excluded)
    corners, expected = expected_corner_counts(sampler, 0, 0, sampler.n_patches)
    coverage = coverage_map(spatial, patch, corners, expected)
    left = np.ones(spatial, dtype=bool)
    for cell in excluded:
        left[tuple(slice(c * p, (c + 1) * p) for c, p in zip(cell, patch, strict=True))] = False
    assert np.all(np.abs(coverage[~left]) < 1e-9)
    mean_left = coverage[left].mean()
    pixels_per_patch = math.prod(patch)
    assert 1 - 1e-9 <= mean_left < 1 + pixels_per_patch / left.sum()


@pytest.mark.parametrize(("spatial", "patch"), [COVERAGE_CASES[1], COVERAGE_CASES[4]])
def test_drawn_coverage_matches_the_exact_expected_coverage(spatial, patch):
    epochs = 1500
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=5)
    corners, expected = expected_corner_counts(sampler, 0, 0, sampler.n_patches)
    expected_coverage = coverage_map(spatial, patch, corners, expected)
    drawn = epoch_corners(sampler, 0, 0, range(epochs))
    drawn_coverage = coverage_map(spatial, patch, drawn) / epochs
    # A pixel's coverage per epoch is a sum of independent Bernoulli draws (one
    # per stratum), so its variance is at most its mean.
    standard_error = np.sqrt(expected_coverage / epochs)
    assert np.all(np.abs(drawn_coverage - expected_coverage) <= 6 * standard_error + 1e-12)


# -- probabilities ---------------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.25, 2.0])
def test_region_probability_scales_how_often_the_region_is_drawn(probability):
    # Cells (2, 2) and (5, 5) are interior regions with identical areas (64).
    patch = (8, 8)
    sampler = numpy_sampler([(1, 1, 64, 64)], patch, seed=11)
    sampler.set_region_probs(0, 0, {(2, 2): probability})
    corners = epoch_corners(sampler, 0, 0, range(4000))
    scaled = draws_in_cell(corners, patch, (2, 2))
    plain = draws_in_cell(corners, patch, (5, 5))
    ratio = scaled / plain
    # Poisson bounds the variance of both counts (stratified draws vary less).
    standard_error = ratio * math.sqrt(1 / scaled + 1 / plain)
    assert abs(ratio - probability) < 6 * standard_error
    assert plain > 1000  # enough draws for the tolerance to mean something


def test_region_with_probability_zero_is_never_drawn():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 32, 32)], patch, seed=12)
    sampler.set_region_probs(0, 0, {(3, 3): 0.0, (0, 0): 0.0})
    corners = epoch_corners(sampler, 0, 0, range(2000))
    assert draws_in_cell(corners, patch, (3, 3)) == 0
    assert draws_in_cell(corners, patch, (0, 0)) == 0
    # The regions around it are still drawn.
    assert draws_in_cell(corners, patch, (3, 4)) > 0
    assert draws_in_cell(corners, patch, (2, 3)) > 0


def test_region_probability_zero_removes_only_its_own_corners_from_the_rank_mapping():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 32, 32)], patch, seed=12)
    sampler.set_region_probs(0, 0, {(3, 3): 0.0})
    ranks = rank_corners(sampler, 0, 0)
    assert (3, 3) not in ranks
    reachable = {tuple(c) for region in ranks.values() for c in region["first"].tolist()}
    everything = selectable_corners((32, 32), patch, [])
    assert reachable == {c for c in everything if (c[0] // 4, c[1] // 4) != (3, 3)}


def test_tiny_positive_probability_keeps_a_region_reachable():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 32, 32)], patch, seed=13)
    sampler.set_region_probs(0, 0, {(2, 2): 1e-12})
    ranks = rank_corners(sampler, 0, 0)
    assert (2, 2) in ranks
    assert ranks[(2, 2)]["weight"] >= 1
    assert len(ranks[(2, 2)]["first"]) == 16


def test_region_weight_is_the_quantised_probability():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 32, 32)], patch, seed=14)
    sampler.set_region_probs(0, 0, {(1, 1): 0.5, (2, 2): 1.5, (3, 3): 0.0})
    ranks = rank_corners(sampler, 0, 0)
    assert ranks[(1, 1)]["weight"] == PROB_ONE // 2
    assert ranks[(2, 2)]["weight"] == 3 * PROB_ONE // 2
    assert ranks[(4, 4)]["weight"] == PROB_ONE
    for region in ranks.values():
        assert region["mass"] == len(region["first"]) * region["weight"]


# -- exclusion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_shapes", "patch"),
    [
        pytest.param([(2, 1, 50, 45)], (6, 7), id="2d"),
        pytest.param([(1, 2, 20, 18, 22)], (4, 5, 3), id="3d"),
        pytest.param([(1, 1, 30, 30), (2, 3, 17, 23)], (3, 4), id="2d-two-stacks"),
    ],
)
def test_excluded_cell_is_never_touched(data_shapes, patch):
    generator = np.random.default_rng(21)
    sampler = numpy_sampler(data_shapes, patch, seed=21)
    excluded = {}
    for data_idx, shape in enumerate(data_shapes):
        for sample_idx in range(shape[0]):
            cells = random_cells(generator, shape[2:], patch, 0.25)
            sampler.exclude_patches(data_idx, sample_idx, cells)
            excluded[(data_idx, sample_idx)] = cells
    touched = 0
    for epoch in range(300):
        batch = sampler.sample_epoch(epoch).to_numpy()
        for (data_idx, sample_idx), cells in excluded.items():
            rows = sample_rows(batch, data_idx, sample_idx)
            touched += int(patches_overlap_cells(batch.coords[rows], patch, cells).sum())
    assert touched == 0


def test_patches_next_to_an_excluded_cell_are_still_drawn():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 32, 32)], patch, seed=22)
    sampler.exclude_patches(0, 0, [(3, 3)])
    corners = epoch_corners(sampler, 0, 0, range(1000))
    assert not patches_overlap_cells(corners, patch, [(3, 3)]).any()
    # Region (2, 2) keeps its sub-box at offset 0 on both axes, i.e. corner (8, 8).
    assert np.any(np.all(corners == (8, 8), axis=1))
    # ... and region (3, 4) keeps the corners whose patch starts right of the cell.
    assert draws_in_cell(corners, patch, (3, 4)) > 0


def test_excluding_a_cell_twice_is_a_no_op():
    once = numpy_sampler([(1, 1, 32, 32)], (4, 4), seed=23)
    twice = numpy_sampler([(1, 1, 32, 32)], (4, 4), seed=23)
    once.exclude_patches(0, 0, [(1, 2), (5, 5)])
    twice.exclude_patches(0, 0, [(1, 2), (1, 2)])
    twice.exclude_patches(0, 0, [(5, 5), (1, 2)])
    assert once.n_patches == twice.n_patches
    assert once.get_included_grid_coords() == twice.get_included_grid_coords()
    for epoch in (0, 1, 2):
        np.testing.assert_array_equal(
            once.sample_epoch(epoch).coords, twice.sample_epoch(epoch).coords
        )


def test_exclusions_accumulate_over_calls():
    sampler = numpy_sampler([(1, 1, 32, 32)], (4, 4), seed=24)
    sampler.exclude_patches(0, 0, [(0, 0)])
    sampler.exclude_patches(0, 0, [(7, 7)])
    included = set(sampler.get_included_grid_coords()[(0, 0)])
    assert (0, 0) not in included
    assert (7, 7) not in included
    assert len(included) == 8 * 8 - 2


def test_exclusion_changes_only_its_own_sample():
    sampler = numpy_sampler([(2, 1, 24, 24)], (4, 4), seed=25)
    before = sampler.sample_epoch(0).to_numpy()
    sampler.exclude_patches(0, 1, [(2, 2)])
    after = sampler.sample_epoch(0).to_numpy()
    rows_before = sample_rows(before, 0, 0)
    rows_after = sample_rows(after, 0, 0)
    np.testing.assert_array_equal(before.coords[rows_before], after.coords[rows_after])
    assert len(sample_rows(after, 0, 1)) == len(sample_rows(before, 0, 1)) - 1


@pytest.mark.parametrize(
    ("data_shapes", "patch"),
    [
        pytest.param([(2, 1, 40, 36), (1, 1, 23, 50), (3, 1, 17, 17)], (4, 5), id="2d"),
        pytest.param([(2, 1, 12, 14, 11), (1, 1, 9, 20, 8)], (3, 4, 2), id="3d"),
    ],
)
def test_draws_after_updates_equal_a_fresh_samplers(data_shapes, patch):
    # The NumPy backend keeps a lookup table derived from the region tables
    # (built at the first draw); every update must reach it.
    sampler = numpy_sampler(data_shapes, patch, seed=26)
    sampler.sample_epoch(0)
    rng = np.random.default_rng(26)
    updates = []
    for data_idx, shape in enumerate(data_shapes):
        for sample_idx in range(shape[0]):
            cells = random_cells(rng, shape[2:], patch, 0.2)
            probs = {cell: float(rng.choice([0.0, 0.3, 2.5])) for cell in cells[:2]}
            updates.append((data_idx, sample_idx, cells[2:], probs))
    for data_idx, sample_idx, cells, probs in updates:
        sampler.exclude_patches(data_idx, sample_idx, cells)
        sampler.set_region_probs(data_idx, sample_idx, probs)
        sampler.sample_epoch(1)  # a draw between updates
    fresh = numpy_sampler(data_shapes, patch, seed=26)
    for data_idx, sample_idx, cells, probs in updates:
        fresh.exclude_patches(data_idx, sample_idx, cells)
        fresh.set_region_probs(data_idx, sample_idx, probs)
    for epoch in (0, 7):
        mine, theirs = sampler.sample_epoch(epoch), fresh.sample_epoch(epoch)
        np.testing.assert_array_equal(mine.coords, theirs.coords)
        np.testing.assert_array_equal(mine.data_idx, theirs.data_idx)
        np.testing.assert_array_equal(mine.sample_idx, theirs.sample_idx)
        # Out-of-order draws (a shuffled shard) give the same rows as the epoch.
        shard = sampler.sample_epoch(epoch, shuffle=True, rank=1, world_size=3)
        np.testing.assert_array_equal(shard.coords, theirs.coords[shard.indices])


# -- reachability: every selectable corner, and nothing else ---------------------------


RANK_CASES = [
    pytest.param((23, 31), (4, 5), 0.2, id="2d"),
    pytest.param((16, 16), (4, 4), 0.3, id="2d-dividing"),
    pytest.param((19, 8), (1, 3), 0.1, id="2d-patch-one"),
    pytest.param((14, 11, 13), (3, 4, 5), 0.25, id="3d"),
    pytest.param((8, 9, 10), (8, 2, 3), 0.2, id="3d-full-axis"),
]


@pytest.mark.parametrize(("spatial", "patch", "fraction"), RANK_CASES)
def test_ranks_of_each_region_map_one_to_one_onto_its_selectable_corners(spatial, patch, fraction):
    generator = np.random.default_rng(31)
    excluded = random_cells(generator, spatial, patch, fraction)
    sampler = numpy_sampler([(1, 1, *spatial)], patch)
    sampler.exclude_patches(0, 0, excluded)
    selectable = selectable_corners(spatial, patch, excluded)
    by_region: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for corner in selectable:
        by_region.setdefault(tuple(c // p for c, p in zip(corner, patch, strict=True)), set()).add(
            corner
        )
    ranks = rank_corners(sampler, 0, 0)
    for cell in all_cells(spatial, patch):
        region = ranks[cell]
        mapped = [tuple(c) for c in region["first"].tolist()]
        assert len(mapped) == len(set(mapped)), f"rank mapping of {cell} repeats corners"
        assert set(mapped) == by_region.get(cell, set()), f"region {cell}"
        assert region["mass"] == len(mapped) * region["weight"]


@pytest.mark.parametrize(("spatial", "patch", "fraction"), RANK_CASES)
def test_every_mass_point_of_a_corner_locates_the_same_corner(spatial, patch, fraction):
    generator = np.random.default_rng(32)
    sampler = numpy_sampler([(1, 1, *spatial)], patch)
    sampler.exclude_patches(0, 0, random_cells(generator, spatial, patch, fraction))
    sampler.set_region_probs(0, 0, {(0,) * len(patch): 0.375})
    for region in rank_corners(sampler, 0, 0).values():
        np.testing.assert_array_equal(region["first"], region["last"])


def test_drawn_corners_are_exactly_the_selectable_corners_over_many_epochs():
    spatial, patch = (13, 11), (3, 4)
    excluded = [(1, 1), (3, 0)]
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=33)
    sampler.exclude_patches(0, 0, excluded)
    drawn = {tuple(c) for c in epoch_corners(sampler, 0, 0, range(3000)).tolist()}
    assert drawn == selectable_corners(spatial, patch, excluded)


# -- strata and indices ----------------------------------------------------------------


def _stratum_draw(mass_total: int, n_patches: int, strata, words) -> list[int]:
    strata = np.asarray(strata, dtype=np.int64)
    return stratum_points(
        strata,
        np.full(len(strata), n_patches, dtype=np.int64),
        np.full(len(strata), mass_total, dtype=np.int64),
        np.asarray(words, dtype=np.uint64),
    ).tolist()


@pytest.mark.parametrize(
    ("mass_total", "n_patches"),
    [
        (10, 3),
        (7, 7),
        (1234567, 89),
        ((1 << 40) + 7, 1000),
        ((1 << 62) - 1, (1 << 31) - 1),  # the largest tables allow
    ],
)
def test_strata_tile_the_mass_line_and_each_reaches_both_of_its_ends(mass_total, n_patches):
    # Stratum j owns [floor(j M / n), floor((j + 1) M / n)); checked with
    # Python ints on the first and the last strata.
    strata = sorted({*range(min(n_patches, 300)), *range(max(0, n_patches - 300), n_patches)})
    lowest = _stratum_draw(mass_total, n_patches, strata, [0] * len(strata))
    highest = _stratum_draw(mass_total, n_patches, strata, [(1 << 64) - 1] * len(strata))
    for j, low, high in zip(strata, lowest, highest, strict=True):
        assert low == j * mass_total // n_patches
        assert high == (j + 1) * mass_total // n_patches - 1


@pytest.mark.parametrize(("mass_total", "n_patches"), [(10, 3), (1000, 7), (99991, 2)])
def test_every_mass_point_of_a_stratum_is_drawn_by_an_equal_share_of_words(mass_total, n_patches):
    for j in range(n_patches):
        low, high = j * mass_total // n_patches, (j + 1) * mass_total // n_patches
        width = high - low
        # Word ceil(k 2**64 / w) is the first that lands on point low + k, so
        # each point gets floor(2**64 / w) or ceil(2**64 / w) of the 2**64 words.
        first_word = [-(-k * (1 << 64) // width) for k in range(width)]
        assert _stratum_draw(mass_total, n_patches, [j] * width, first_word) == list(
            range(low, high)
        )
        before = [w - 1 for w in first_word[1:]]
        assert _stratum_draw(mass_total, n_patches, [j] * (width - 1), before) == list(
            range(low, high - 1)
        )


def test_an_index_draws_only_from_the_regions_its_stratum_overlaps():
    spatial, patch = (30, 26), (4, 5)
    excluded = [(2, 2), (5, 1)]
    probabilities = {(0, 0): 0.5, (3, 3): 0.0, (1, 4): 2.0}
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=41)
    sampler.exclude_patches(0, 0, excluded)
    sampler.set_region_probs(0, 0, probabilities)
    # Mass line recomputed from the brute-force areas (row-major regions).
    selectable = selectable_corners(spatial, patch, excluded)
    area = Counter(
        tuple(c // p for c, p in zip(corner, patch, strict=True)) for corner in selectable
    )
    cells = all_cells(spatial, patch)
    mass = [area[cell] * round(probabilities.get(cell, 1.0) * PROB_ONE) for cell in cells]
    prefix = np.concatenate([[0], np.cumsum(mass)])
    total, n_patches = int(prefix[-1]), sampler.n_patches
    batches = [sampler.sample_epoch(epoch).to_numpy() for epoch in range(200)]
    for index in range(n_patches):
        low, high = index * total // n_patches, (index + 1) * total // n_patches
        allowed = {
            cell
            for cell, start, stop in zip(cells, prefix[:-1], prefix[1:], strict=True)
            if start < high and low < stop
        }
        drawn = {tuple(b.coords[index] // np.asarray(patch)) for b in batches}
        assert drawn <= allowed, f"index {index}"


def test_the_same_index_usually_comes_from_the_same_region():
    patch = (8, 8)
    sampler = numpy_sampler([(1, 1, 64, 64)], patch, seed=42)
    regions = np.stack([cell_of(sampler.sample_epoch(epoch).coords, patch) for epoch in range(300)])
    modal_share = [
        Counter(map(tuple, regions[:, index].tolist())).most_common(1)[0][1] / 300
        for index in range(sampler.n_patches)
    ]
    # Without stratification the most frequent of the 64 regions would get
    # a few percent of an index's draws.
    assert np.mean(modal_share) > 0.6


def test_patch_indices_partition_all_indices_into_one_contiguous_range_per_stack():
    data_shapes = [(2, 1, 32, 32), (3, 1, 20, 24), (1, 1, 16, 16)]
    patch = (4, 4)
    sampler = numpy_sampler(data_shapes, patch, seed=43)
    sampler.exclude_patches(1, 2, [(0, 0), (1, 1), (2, 2)])
    sampler.set_region_probs(0, 1, {(3, 3): 0.5})
    ranges = [list(sampler.get_patch_indices(k)) for k in range(len(data_shapes))]
    assert list(itertools.chain(*ranges)) == list(range(sampler.n_patches))
    batch = sampler.sample_epoch(0).to_numpy()
    for data_idx, indices in enumerate(ranges):
        assert indices == list(range(indices[0], indices[-1] + 1))
        assert all(type(i) is int for i in indices)
        assert np.all(batch.data_idx[indices] == data_idx)


def test_indices_run_through_samples_in_data_idx_then_sample_idx_order():
    sampler = numpy_sampler([(3, 1, 16, 16), (2, 1, 12, 12)], (4, 4), seed=44)
    sampler.exclude_patches(0, 1, [(1, 1)])
    batch = sampler.sample_epoch(0).to_numpy()
    keys = list(zip(batch.data_idx.tolist(), batch.sample_idx.tolist(), strict=True))
    assert keys == sorted(keys)
    counts = Counter(keys)
    assert counts == {(0, 0): 16, (0, 1): 15, (0, 2): 16, (1, 0): 9, (1, 1): 9}


# -- determinism and the draw number ---------------------------------------------------


def _spec_sequence(sampler: StratifiedPatching, rounds: int = 3) -> list:
    return [sampler.get_patch_spec(i) for _ in range(rounds) for i in range(sampler.n_patches)]


def test_same_seed_gives_the_same_patches():
    first = numpy_sampler([(2, 1, 40, 36)], (5, 6), seed=1234)
    second = numpy_sampler([(2, 1, 40, 36)], (5, 6), seed=1234)
    for epoch in (0, 1, 77):
        np.testing.assert_array_equal(
            first.sample_epoch(epoch).coords, second.sample_epoch(epoch).coords
        )
    assert _spec_sequence(first) == _spec_sequence(second)


def test_different_seeds_give_different_patches():
    first = numpy_sampler([(2, 1, 40, 36)], (5, 6), seed=1234)
    second = numpy_sampler([(2, 1, 40, 36)], (5, 6), seed=1235)
    assert not np.array_equal(first.sample_epoch(0).coords, second.sample_epoch(0).coords)
    assert _spec_sequence(first) != _spec_sequence(second)


def test_different_epochs_give_different_patches():
    sampler = numpy_sampler([(2, 1, 40, 36)], (5, 6), seed=1234)
    assert not np.array_equal(sampler.sample_epoch(0).coords, sampler.sample_epoch(1).coords)


def test_kth_call_of_get_patch_spec_returns_row_of_sample_epoch_k():
    sampler = numpy_sampler([(2, 1, 24, 20), (1, 1, 12, 12)], (4, 3), seed=51)
    sampler.exclude_patches(0, 1, [(2, 2)])
    n_patches = sampler.n_patches
    epochs = [sampler.sample_epoch(k) for k in range(5)]
    order = np.random.default_rng(51)
    for k in range(5):
        # The order in which indices are visited does not matter.
        for index in order.permutation(n_patches).tolist():
            assert sampler.get_patch_spec(index) == epochs[k].spec(index)


def test_each_index_counts_its_own_calls():
    sampler = numpy_sampler([(1, 1, 24, 24)], (4, 4), seed=52)
    epochs = [sampler.sample_epoch(k) for k in range(4)]
    for _ in range(3):
        sampler.get_patch_spec(5)
    assert sampler.get_patch_spec(0) == epochs[0].spec(0)
    assert sampler.get_patch_spec(5) == epochs[3].spec(5)


def test_set_epoch_makes_the_next_call_use_that_epoch():
    sampler = numpy_sampler([(2, 1, 24, 20)], (4, 3), seed=53)
    for index in range(sampler.n_patches):
        sampler.get_patch_spec(index)
    sampler.get_patch_spec(0)
    sampler.set_epoch(7)
    assert sampler.epoch == 7
    seventh, eighth = sampler.sample_epoch(7), sampler.sample_epoch(8)
    for index in range(sampler.n_patches):
        assert sampler.get_patch_spec(index) == seventh.spec(index)
    for index in range(sampler.n_patches):
        assert sampler.get_patch_spec(index) == eighth.spec(index)


def test_set_epoch_back_to_zero_replays_the_first_epoch():
    sampler = numpy_sampler([(1, 1, 24, 20)], (4, 3), seed=54)
    first = _spec_sequence(sampler, rounds=2)
    sampler.set_epoch(0)
    assert _spec_sequence(sampler, rounds=2) == first


def test_sample_epoch_does_not_advance_get_patch_spec():
    sampler = numpy_sampler([(1, 1, 24, 20)], (4, 3), seed=55)
    zeroth = sampler.sample_epoch(0)
    sampler.sample_epoch(3)
    assert sampler.get_patch_spec(2) == zeroth.spec(2)


# -- types of inputs and outputs -------------------------------------------------------


@pytest.mark.parametrize("integer_type", [np.int64, np.int32, np.uint16, np.intp])
def test_numpy_integer_arguments_behave_like_python_ints(integer_type):
    plain = numpy_sampler([(2, 1, 24, 24), (1, 1, 16, 16)], (4, 4), seed=61)
    numpy_ints = numpy_sampler([(2, 1, 24, 24), (1, 1, 16, 16)], (4, 4), seed=61)
    plain.exclude_patches(0, 1, [(1, 2), (3, 3)])
    numpy_ints.exclude_patches(
        integer_type(0),
        integer_type(1),
        [(integer_type(1), integer_type(2)), (integer_type(3), integer_type(3))],
    )
    plain.set_region_probs(1, 0, {(0, 0): 0.5})
    numpy_ints.set_region_probs(integer_type(1), integer_type(0), {(0, 0): np.float32(0.5)})
    plain.set_epoch(2)
    numpy_ints.set_epoch(integer_type(2))
    assert plain.get_patch_indices(1) == numpy_ints.get_patch_indices(integer_type(1))
    for index in range(plain.n_patches):
        assert plain.get_patch_spec(index) == numpy_ints.get_patch_spec(integer_type(index))
    np.testing.assert_array_equal(
        plain.sample_epoch(4).coords, numpy_ints.sample_epoch(integer_type(4)).coords
    )


def test_numpy_integer_data_shapes_patch_size_and_seed_are_accepted():
    plain = numpy_sampler([(1, 1, 20, 24)], (4, 6), seed=62)
    numpy_ints = StratifiedPatching(
        np.array([[1, 1, 20, 24]], dtype=np.int64),
        np.array([4, 6], dtype=np.int32),
        seed=np.uint64(62),
        backend="numpy",
    )
    assert numpy_ints.seed == 62
    assert type(numpy_ints.seed) is int
    assert numpy_ints.patch_size == (4, 6)
    assert _spec_sequence(plain, rounds=1) == _spec_sequence(numpy_ints, rounds=1)


def test_get_patch_spec_returns_python_ints_and_tuples():
    sampler = numpy_sampler([(2, 1, 20, 24), (1, 1, 10, 10)], [4, 6], seed=63)
    for index in range(sampler.n_patches):
        spec = sampler.get_patch_spec(index)
        assert set(spec) == {"data_idx", "sample_idx", "coords", "patch_size"}
        assert type(spec["data_idx"]) is int
        assert type(spec["sample_idx"]) is int
        assert type(spec["coords"]) is tuple
        assert all(type(c) is int for c in spec["coords"])
        assert spec["patch_size"] == (4, 6)
        assert type(spec["patch_size"]) is tuple
        assert all(type(p) is int for p in spec["patch_size"])


def test_grid_coordinate_getters_return_python_int_tuples():
    sampler = numpy_sampler([(2, 1, 20, 24)], (4, 6), seed=64)
    sampler.exclude_patches(0, 0, [(1, 1)])
    for getter in (sampler.get_all_grid_coords, sampler.get_included_grid_coords):
        for key, coords in getter().items():
            assert all(type(k) is int for k in key)
            assert all(type(c) is tuple and all(type(v) is int for v in c) for c in coords)


def test_sample_epoch_returns_a_patch_batch_of_numpy_arrays_in_index_order():
    sampler = numpy_sampler([(2, 1, 20, 24)], (4, 6), seed=65)
    batch = sampler.sample_epoch(0)
    assert isinstance(batch, PatchBatch)
    assert len(batch) == sampler.n_patches
    np.testing.assert_array_equal(batch.indices, np.arange(sampler.n_patches))
    assert batch.coords.shape == (sampler.n_patches, 2)
    assert batch.coords.dtype == np.int64
    assert batch.patch_size == (4, 6)


def test_get_all_grid_coords_lists_the_whole_grid_row_major_for_every_sample():
    sampler = numpy_sampler([(2, 1, 20, 24), (1, 1, 9, 10)], (4, 6), seed=66)
    grids = sampler.get_all_grid_coords()
    assert list(grids) == [(0, 0), (0, 1), (1, 0)]
    assert grids[(0, 0)] == list(itertools.product(range(5), range(4)))
    assert grids[(1, 0)] == list(itertools.product(range(2), range(1)))


# -- fully excluded samples ------------------------------------------------------------


def test_fully_excluded_sample_has_no_patches_and_the_others_still_work():
    patch = (4, 4)
    sampler = numpy_sampler([(3, 1, 16, 16)], patch, seed=71)
    sampler.exclude_patches(0, 1, all_cells((16, 16), patch))
    assert sampler.n_patches == 2 * 16
    assert sampler.get_included_grid_coords()[(0, 1)] == []
    batch = sampler.sample_epoch(0).to_numpy()
    assert len(sample_rows(batch, 0, 1)) == 0
    assert sorted(set(batch.sample_idx.tolist())) == [0, 2]
    for index in range(sampler.n_patches):
        spec = sampler.get_patch_spec(index)
        assert spec["sample_idx"] in (0, 2)
        assert all(0 <= c <= 12 for c in spec["coords"])


def test_stack_whose_samples_are_all_excluded_has_no_patch_indices():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 16, 16), (1, 1, 16, 16)], patch, seed=72)
    sampler.exclude_patches(0, 0, all_cells((16, 16), patch))
    assert list(sampler.get_patch_indices(0)) == []
    assert list(sampler.get_patch_indices(1)) == list(range(16))
    assert set(sampler.sample_epoch(0).data_idx.tolist()) == {1}


def test_sample_with_cells_left_but_no_selectable_corner_has_no_patches():
    # D = 15, P = 4: the cells with index 3 hold no valid corner (12 > 15 - 4).
    patch = (4, 4)
    sampler = numpy_sampler([(2, 1, 15, 15)], patch, seed=73)
    inner = [cell for cell in all_cells((15, 15), patch) if 3 not in cell]
    sampler.exclude_patches(0, 0, inner)
    assert len(sampler.get_included_grid_coords()[(0, 0)]) == 7
    assert sampler.n_patches == expected_sample_patches((15, 15), patch, [])
    assert set(sampler.sample_epoch(0).sample_idx.tolist()) == {1}


def test_sampler_with_every_sample_excluded_has_an_empty_epoch():
    patch = (4, 4)
    sampler = numpy_sampler([(1, 1, 16, 16)], patch, seed=74)
    sampler.exclude_patches(0, 0, all_cells((16, 16), patch))
    assert sampler.n_patches == 0
    assert len(sampler.sample_epoch(0)) == 0
    assert list(sampler.get_patch_indices(0)) == []


# -- the number of patches -------------------------------------------------------------

N_PATCH_CASES = [
    pytest.param((64, 64), (8, 8), 0.0, {}, id="2d-dividing"),
    pytest.param((37, 29), (5, 7), 0.0, {}, id="2d-not-dividing"),
    pytest.param((5, 21), (3, 5), 0.0, {}, id="2d-float-product"),
    pytest.param((37, 29), (5, 7), 0.2, {}, id="2d-excluded"),
    pytest.param((37, 29), (5, 7), 0.2, {(0, 0): 0.5, (1, 1): 0.0, (2, 3): 1.75}, id="2d-probs"),
    pytest.param((12, 14, 16), (3, 5, 4), 0.0, {}, id="3d"),
    pytest.param((12, 14, 16), (3, 5, 4), 0.15, {(1, 1, 1): 0.25}, id="3d-excluded-probs"),
    pytest.param((7, 7), (5, 5), 0.0, {(0, 0): 0.0}, id="no-mass"),
    pytest.param(
        (9, 9),
        (5, 5),
        0.0,
        {(0, 0): 0.125, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.0},
        id="below-zero-is-zero",
    ),
]


@pytest.mark.parametrize(("spatial", "patch", "fraction", "probabilities"), N_PATCH_CASES)
def test_n_patches_follows_the_documented_formula(spatial, patch, fraction, probabilities):
    generator = np.random.default_rng(81)
    excluded = random_cells(generator, spatial, patch, fraction)
    sampler = numpy_sampler([(2, 1, *spatial)], patch, seed=81)
    sampler.exclude_patches(0, 1, excluded)
    sampler.set_region_probs(0, 1, probabilities)
    untouched = expected_sample_patches(spatial, patch, [])
    changed = expected_sample_patches(spatial, patch, excluded, probabilities)
    assert sampler.n_patches == untouched + changed
    batch = sampler.sample_epoch(0)
    assert len(sample_rows(batch, 0, 0)) == untouched
    assert len(sample_rows(batch, 0, 1)) == changed


def test_n_patches_without_exclusions_is_ceil_of_the_patches_that_fit():
    for spatial, patch in [((64, 64), (8, 8)), ((65, 64), (8, 8)), ((10, 10, 10), (3, 3, 3))]:
        sampler = numpy_sampler([(3, 1, *spatial)], patch)
        fit = math.prod(d / p for d, p in zip(spatial, patch, strict=True))
        assert sampler.n_patches == 3 * math.ceil(fit)


def test_n_patches_drops_by_one_per_excluded_cell():
    sampler = numpy_sampler([(1, 1, 64, 64)], (8, 8))
    for count, cell in enumerate([(1, 1), (4, 4), (6, 2), (4, 4)], start=1):
        sampler.exclude_patches(0, 0, [cell])
        assert sampler.n_patches == 64 - min(count, 3)


def test_n_patches_drops_by_one_minus_the_probability_per_region():
    sampler = numpy_sampler([(1, 1, 64, 64)], (8, 8))
    sampler.set_region_probs(0, 0, {(0, 0): 0.5, (1, 1): 0.25, (2, 2): 0.0})
    assert sampler.n_patches == math.ceil(64 - 0.5 - 0.75 - 1.0)
    sampler.set_region_probs(0, 0, {(3, 3): 3.0})
    assert sampler.n_patches == math.ceil(64 - 0.5 - 0.75 - 1.0 + 2.0)


def test_grid_has_d_plus_one_floor_p_cells_per_axis():
    for spatial, patch in [((64, 64), (8, 8)), ((63, 17), (8, 4)), ((5, 6, 7), (5, 3, 1))]:
        sampler = numpy_sampler([(1, 1, *spatial)], patch)
        expected = list(itertools.product(*(range(g) for g in grid_shape(spatial, patch))))
        assert sampler.get_all_grid_coords()[(0, 0)] == expected


# -- seeds -----------------------------------------------------------------------------


def test_seed_none_draws_a_64_bit_seed_that_replays_the_run():
    drawn = StratifiedPatching([(2, 1, 32, 28)], (4, 4), seed=None, backend="numpy")
    assert type(drawn.seed) is int
    assert 0 <= drawn.seed < 1 << 64
    replay = numpy_sampler([(2, 1, 32, 28)], (4, 4), seed=drawn.seed)
    for epoch in (0, 1, 2):
        np.testing.assert_array_equal(
            drawn.sample_epoch(epoch).coords, replay.sample_epoch(epoch).coords
        )
    assert _spec_sequence(drawn, rounds=2) == _spec_sequence(replay, rounds=2)


def test_seed_none_gives_a_fresh_seed_each_time():
    seeds = {StratifiedPatching([(1, 1, 8, 8)], (4, 4), backend="numpy").seed for _ in range(4)}
    assert len(seeds) == 4


@pytest.mark.parametrize("seed", [0, 1, (1 << 32) - 1, 1 << 32, (1 << 64) - 1])
def test_seed_is_kept_exactly(seed):
    sampler = numpy_sampler([(1, 1, 8, 8)], (4, 4), seed=seed)
    assert sampler.seed == seed


def test_seeds_differing_only_in_the_high_word_give_different_patches():
    low = numpy_sampler([(1, 1, 40, 40)], (4, 4), seed=5)
    high = numpy_sampler([(1, 1, 40, 40)], (4, 4), seed=5 + (1 << 32))
    assert not np.array_equal(low.sample_epoch(0).coords, high.sample_epoch(0).coords)


# -- dense forms -----------------------------------------------------------------------


@pytest.mark.parametrize(("spatial", "patch"), [((30, 26), (4, 5)), ((12, 14, 16), (3, 5, 4))])
def test_boolean_exclusion_mask_equals_the_coordinate_list(spatial, patch):
    generator = np.random.default_rng(91)
    cells = random_cells(generator, spatial, patch, 0.3)
    mask = np.zeros(grid_shape(spatial, patch), dtype=bool)
    mask[tuple(np.asarray(cells).T)] = True
    listed = numpy_sampler([(2, 1, *spatial)], patch, seed=91)
    dense = numpy_sampler([(2, 1, *spatial)], patch, seed=91)
    as_array = numpy_sampler([(2, 1, *spatial)], patch, seed=91)
    listed.exclude_patches(0, 1, cells)
    dense.exclude_patches(0, 1, mask)
    as_array.exclude_patches(0, 1, np.asarray(cells, dtype=np.int32))
    for other in (dense, as_array):
        assert other.n_patches == listed.n_patches
        assert other.get_included_grid_coords() == listed.get_included_grid_coords()
        for epoch in (0, 1, 2):
            np.testing.assert_array_equal(
                other.sample_epoch(epoch).coords, listed.sample_epoch(epoch).coords
            )


@pytest.mark.parametrize(("spatial", "patch"), [((30, 26), (4, 5)), ((12, 14, 16), (3, 5, 4))])
def test_probability_array_equals_the_probability_dict(spatial, patch):
    generator = np.random.default_rng(92)
    cells = grid_shape(spatial, patch)
    values = generator.choice([0.0, 0.125, 0.5, 1.0, 1.5, 4.0], size=cells)
    as_dict = {cell: float(values[cell]) for cell in all_cells(spatial, patch)}
    listed = numpy_sampler([(2, 1, *spatial)], patch, seed=92)
    dense = numpy_sampler([(2, 1, *spatial)], patch, seed=92)
    as_float32 = numpy_sampler([(2, 1, *spatial)], patch, seed=92)
    listed.set_region_probs(0, 1, as_dict)
    dense.set_region_probs(0, 1, values)
    as_float32.set_region_probs(0, 1, values.astype(np.float32))
    for other in (dense, as_float32):
        assert other.n_patches == listed.n_patches
        for epoch in (0, 1, 2):
            np.testing.assert_array_equal(
                other.sample_epoch(epoch).coords, listed.sample_epoch(epoch).coords
            )


def test_probability_dict_leaves_regions_it_does_not_name_unchanged():
    sampler = numpy_sampler([(1, 1, 32, 32)], (4, 4), seed=93)
    sampler.set_region_probs(0, 0, {(1, 1): 0.0})
    sampler.set_region_probs(0, 0, {(2, 2): 0.5})
    ranks = rank_corners(sampler, 0, 0)
    assert (1, 1) not in ranks
    assert ranks[(2, 2)]["weight"] == PROB_ONE // 2
    assert ranks[(3, 3)]["weight"] == PROB_ONE


def test_probability_array_replaces_every_region():
    sampler = numpy_sampler([(1, 1, 32, 32)], (4, 4), seed=94)
    sampler.set_region_probs(0, 0, {(1, 1): 0.0})
    sampler.set_region_probs(0, 0, np.full((8, 8), 0.5))
    ranks = rank_corners(sampler, 0, 0)
    assert all(region["weight"] == PROB_ONE // 2 for region in ranks.values())
    assert len(ranks) == 64


def test_drawn_patches_are_always_inside_the_image_and_selectable():
    spatial, patch = (29, 31), (6, 4)
    excluded = [(0, 0), (2, 3), (4, 7)]
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=95)
    sampler.exclude_patches(0, 0, excluded)
    corners = epoch_corners(sampler, 0, 0, range(500))
    assert corners.min() >= 0
    assert np.all(corners <= np.asarray(spatial) - np.asarray(patch))
    assert corners_are_selectable(corners, selectable_mask(spatial, patch, excluded)).all()


def test_epochs_own_their_arrays_and_threads_can_draw_at_once():
    # The NumPy backend reuses scratch memory between draws: what it returns
    # must never change afterwards, and threads drawing at once must each get
    # the epoch they would get alone.
    from concurrent.futures import ThreadPoolExecutor

    sampler = numpy_sampler([(2, 1, 300, 220), (1, 1, 90, 400)], (8, 8), seed=27)
    options = [
        {},
        {"shuffle": True},
        {"shuffle": True, "rank": 1, "world_size": 3},
        {"shuffle": True, "rank": 0, "world_size": 2, "drop_last": True},
    ]
    jobs = [(epoch, kind) for epoch in range(6) for kind in range(len(options))]
    alone = {job: sampler.sample_epoch(job[0], **options[job[1]]).to_numpy() for job in jobs}
    kept = {job: batch.coords.copy() for job, batch in alone.items()}
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda job: sampler.sample_epoch(job[0], **options[job[1]]), jobs * 3)
        )
    for job, batch in zip(jobs * 3, together, strict=True):
        np.testing.assert_array_equal(batch.coords, alone[job].coords)
        np.testing.assert_array_equal(batch.indices, alone[job].indices)
        np.testing.assert_array_equal(batch.data_idx, alone[job].data_idx)
        np.testing.assert_array_equal(batch.sample_idx, alone[job].sample_idx)
    for job, coords in kept.items():
        np.testing.assert_array_equal(alone[job].coords, coords)


@pytest.mark.parametrize(
    ("spatial_shapes", "counts", "patch"),
    [
        pytest.param([(2500, 1690)], [1], (64, 64), id="2d"),
        pytest.param([(37, 29), (40, 41)], [3, 2], (5, 7), id="2d-stacks"),
        pytest.param([(8, 8)], [2], (8, 8), id="2d-one-cell"),
        pytest.param([(12, 14, 16), (9, 13, 11)], [2, 1], (3, 5, 4), id="3d"),
    ],
)
def test_fresh_tables_are_the_general_rows_of_nothing_excluded_at_probability_one(
    spatial_shapes, counts, patch
):
    # A new sampler's tables take a shortcut; it must build the very rows the
    # general update computes.
    from gpu_patching.tables import RegionTables

    tables = RegionTables(spatial_shapes, counts, patch)
    for stack in range(len(spatial_shapes)):
        first, last = int(tables.first_sample[stack]), int(tables.first_sample[stack + 1])
        batch = (last - first, *tables.sample_grid(first))
        general = tables._compute(
            stack, np.zeros(batch, dtype=bool), np.ones(batch), np.full(batch, -1, dtype=np.int64)
        )
        rows = slice(int(tables.region_offset[first]), int(tables.region_offset[last]))
        samples = slice(first, last)
        for field in general.__dataclass_fields__:
            expected = getattr(general, field)
            per_sample = field in ("n_excluded", "budget", "mass_total", "mass_estimate")
            got = getattr(tables, field)[samples if per_sample else rows]
            assert np.asarray(got).dtype == np.asarray(expected).dtype, field
            np.testing.assert_array_equal(got, expected, err_msg=field)
        prefix = tables.mass_prefix[rows] - tables.mass_offset[first]
        np.testing.assert_array_equal(prefix, np.cumsum(general.mass) - general.mass)


@pytest.mark.parametrize("probability", [1.0, 0.5, 0.3, 7.25])
def test_uniform_weights_take_the_same_corners_as_per_region_weights(probability):
    # With one weight for every drawable region the NumPy backend divides the
    # rank by a scalar (a shift for powers of two); it must pick the corners
    # the per-region division picks. A region at probability 0 is not drawn
    # and does not break the uniformity.
    from gpu_patching.backends.host_tables import box_index

    sampler = numpy_sampler([(2, 1, 60, 44)], (6, 5), seed=28)
    for sample_idx in range(2):
        probs = np.full(sampler.get_region_probs(0, sample_idx).shape, probability)
        probs[1, 2] = 0.0
        sampler.set_region_probs(0, sample_idx, probs)
    sampler.exclude_patches(0, 1, [(3, 3)])
    fast = [sampler.sample_epoch(epoch).coords for epoch in range(3)]
    index = box_index(sampler._tables)
    assert index.uniform_weight == round(probability * PROB_ONE)
    index.weight_shift, index.uniform_weight = -1, 0  # the per-region path
    for epoch in range(3):
        np.testing.assert_array_equal(sampler.sample_epoch(epoch).coords, fast[epoch])


def test_epochs_are_the_same_with_and_without_the_kept_chunk_parts(monkeypatch):
    # Small samplers keep the draw-independent parts of their epoch chunks
    # (Philox prefixes, stratum bounds); large ones recompute them.
    from gpu_patching.backends import host_tables

    shapes, patch, epochs = [(2, 1, 90, 70), (1, 1, 40, 300)], (6, 7), (0, 1, 9, 2**32 - 1)

    def epochs_of_a_used_sampler() -> tuple[list[np.ndarray], object]:
        sampler = numpy_sampler(shapes, patch, seed=29)
        sampler.sample_epoch(3)
        sampler.exclude_patches(0, 1, [(2, 2), (5, 1)])
        coords = [sampler.sample_epoch(epoch).coords for epoch in epochs]
        return coords, host_tables.box_index(sampler._tables)

    kept, kept_index = epochs_of_a_used_sampler()
    monkeypatch.setattr(host_tables, "CACHED_PATCHES", 0)
    recomputed, recomputed_index = epochs_of_a_used_sampler()
    for mine, theirs in zip(kept, recomputed, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert kept_index.prefixes and kept_index.bounds
    assert not recomputed_index.prefixes and not recomputed_index.bounds


def test_kept_chunk_parts_do_not_pile_up_over_updates():
    from gpu_patching.backends import host_tables, numpy_backend

    sampler = numpy_sampler([(3, 1, 200, 160)], (8, 8), seed=30)
    index = host_tables.box_index(sampler._tables)
    rng = np.random.default_rng(30)
    sizes = []
    for epoch in range(12):
        cell = tuple(int(c) for c in rng.integers(0, 19, 2))
        sampler.exclude_patches(0, epoch % 3, [cell])  # moves the samples' ranges
        sampler.sample_epoch(epoch)
        sizes.append(len(index.prefixes))
    assert max(sizes) <= 2 * (sampler.n_patches // numpy_backend.CHUNK_ROWS + 3)
    for first in range(0, 500, 7):  # many other ranges
        sampler._backend.draw(sampler._tables, range(first, first + 40), 0, sampler.seed)
    assert len(index.prefixes) <= 2 * (sampler.n_patches // numpy_backend.CHUNK_ROWS + 3) + 1
