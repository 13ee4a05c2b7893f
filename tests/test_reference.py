"""Side by side with the reference: CAREamics 0.3.5 ``StratifiedPatching``.

A user of the reference must be able to swap ours in without changing a line
(docs/design.md), so every deterministic answer must agree: the grid
coordinates, the included coordinates, the patch indices of every stack, the
number of patches, and which sample each patch index comes from. The random
corners themselves differ by design (different generators).

The reference computes its patch count as ``ceil(prod(D / P) - sum(1 - p) -
n_excluded)`` and crashes when that goes below 0 while selectable corners
remain, so the random scenarios here keep exclusion fractions moderate and skip
any exclusion that would take the reference there (tests/test_count_parity.py
fuzzes the counts themselves).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import all_cells, numpy_sampler, random_cells, selectable_corners

pytestmark = pytest.mark.reference


@dataclass
class Scenario:
    """A random configuration: shapes, patch size and per-sample changes."""

    data_shapes: list[tuple[int, ...]]
    patch_size: tuple[int, ...]
    # (data_idx, sample_idx, cells) in the order the exclusions are applied.
    exclusions: list[tuple[int, int, list[tuple[int, ...]]]] = field(default_factory=list)


def reference_formula(spatial, patch, n_excluded, probabilities=()) -> float:
    """The reference's patch count before its ceil (float64, its own order)."""
    total = float(np.prod(np.array(spatial) / np.array(patch)))
    for p in probabilities:
        total -= 1 - p
    return total - n_excluded


def random_scenario(generator: np.random.Generator, max_fraction: float) -> Scenario:
    ndim = int(generator.choice([2, 3]))
    largest = 40 if ndim == 2 else 16
    patch = tuple(int(p) for p in generator.integers(1, 9, size=ndim))
    shapes = []
    for _ in range(int(generator.integers(1, 4))):
        spatial = tuple(int(generator.integers(p, largest + 1)) for p in patch)
        samples, channels = (int(n) for n in generator.integers(1, 4, size=2))
        shapes.append((samples, channels, *spatial))
    scenario = Scenario(shapes, patch)
    for data_idx, shape in enumerate(shapes):
        spatial = shape[2:]
        for sample_idx in range(shape[0]):
            excluded: set[tuple[int, ...]] = set()
            # One or two calls, possibly naming a cell twice.
            for _ in range(int(generator.integers(0, 3))):
                fraction = float(generator.uniform(0, max_fraction / 2))
                cells = random_cells(generator, spatial, patch, fraction)
                if cells and generator.random() < 0.3:
                    cells.append(cells[0])
                count = len(excluded | set(cells))
                if math.ceil(reference_formula(spatial, patch, count)) <= 0:
                    continue  # the reference would crash (see module docstring)
                excluded |= set(cells)
                scenario.exclusions.append((data_idx, sample_idx, cells))
    return scenario


def build_both(reference, scenario: Scenario, seed: int):
    ours = numpy_sampler(scenario.data_shapes, scenario.patch_size, seed=seed)
    theirs = reference(scenario.data_shapes, scenario.patch_size, seed=seed)
    for data_idx, sample_idx, cells in scenario.exclusions:
        ours.exclude_patches(data_idx, sample_idx, cells)
        theirs.exclude_patches(data_idx, sample_idx, cells)
    return ours, theirs


def assert_same_deterministic_answers(ours, theirs, n_stacks: int) -> None:
    assert ours.n_patches == theirs.n_patches
    ours_all, theirs_all = ours.get_all_grid_coords(), theirs.get_all_grid_coords()
    assert list(ours_all) == list(theirs_all)  # same keys, same order
    for key in theirs_all:
        assert ours_all[key] == list(theirs_all[key]), key  # same order too
    ours_included = ours.get_included_grid_coords()
    theirs_included = theirs.get_included_grid_coords()
    assert list(ours_included) == list(theirs_included)
    for key, coords in theirs_included.items():
        # The reference returns an unordered list (a set difference).
        assert len(ours_included[key]) == len(coords), key
        assert set(ours_included[key]) == set(coords), key
    for data_idx in range(n_stacks):
        assert list(ours.get_patch_indices(data_idx)) == list(theirs.get_patch_indices(data_idx)), (
            data_idx
        )


SCENARIO_SEEDS = list(range(30))


@pytest.mark.parametrize("scenario_seed", SCENARIO_SEEDS)
def test_deterministic_answers_equal_the_reference_after_random_exclusions(
    reference, scenario_seed
):
    generator = np.random.default_rng(1000 + scenario_seed)
    scenario = random_scenario(generator, max_fraction=0.3)
    ours, theirs = build_both(reference, scenario, seed=scenario_seed)
    assert_same_deterministic_answers(ours, theirs, len(scenario.data_shapes))


@pytest.mark.parametrize("scenario_seed", SCENARIO_SEEDS[:8])
def test_each_patch_index_comes_from_the_same_sample_as_in_the_reference(reference, scenario_seed):
    generator = np.random.default_rng(2000 + scenario_seed)
    scenario = random_scenario(generator, max_fraction=0.3)
    ours, theirs = build_both(reference, scenario, seed=scenario_seed)
    for index in range(ours.n_patches):
        mine, other = ours.get_patch_spec(index), theirs.get_patch_spec(index)
        assert set(mine) == set(other)
        assert (mine["data_idx"], mine["sample_idx"]) == (
            other["data_idx"],
            other["sample_idx"],
        ), index
        assert tuple(mine["patch_size"]) == tuple(other["patch_size"])
        assert len(mine["coords"]) == len(other["coords"])


@pytest.mark.parametrize(
    ("data_shapes", "patch_size"),
    [
        ([(1, 1, 256, 256)], (64, 64)),
        ([(2, 1, 37, 29), (1, 1, 12, 40)], (5, 7)),
        ([(1, 1, 5, 21)], (3, 5)),  # prod(D / P) is 7.000000000000001 in float64
        ([(2, 1, 9, 13, 11), (1, 1, 12, 14, 16)], (3, 3, 5)),
        ([(3, 1, 7, 7)], (7, 7)),
        ([(1, 1, 8, 1)], (1, 1)),
    ],
)
def test_fresh_sampler_equals_the_reference(reference, data_shapes, patch_size):
    ours = numpy_sampler(data_shapes, patch_size, seed=0)
    theirs = reference(data_shapes, patch_size, seed=0)
    assert_same_deterministic_answers(ours, theirs, len(data_shapes))


def test_fully_excluded_sample_equals_the_reference(reference):
    data_shapes, patch = [(3, 1, 16, 16), (1, 1, 12, 12)], (4, 4)
    ours = numpy_sampler(data_shapes, patch, seed=0)
    theirs = reference(data_shapes, patch, seed=0)
    for sampler in (ours, theirs):
        sampler.exclude_patches(0, 1, all_cells((16, 16), patch))
    assert_same_deterministic_answers(ours, theirs, len(data_shapes))


def per_sample_patches(sampler) -> Counter:
    batch = sampler.sample_epoch(0).to_numpy()
    return Counter(zip(batch.data_idx.tolist(), batch.sample_idx.tolist(), strict=True))


@pytest.mark.parametrize("scenario_seed", SCENARIO_SEEDS)
def test_n_patches_equals_the_reference_with_random_probabilities(reference, scenario_seed):
    generator = np.random.default_rng(3000 + scenario_seed)
    scenario = random_scenario(generator, max_fraction=0.2)
    ours, theirs = build_both(reference, scenario, seed=scenario_seed)
    excluded: dict[tuple[int, int], set] = {}
    for data_idx, sample_idx, cells in scenario.exclusions:
        excluded.setdefault((data_idx, sample_idx), set()).update(cells)
    changed = 0
    massless: set[tuple[int, int]] = set()
    for data_idx, shape in enumerate(scenario.data_shapes):
        spatial = shape[2:]
        for sample_idx in range(shape[0]):
            cells = all_cells(spatial, scenario.patch_size)
            # Every cell gets a float: the reference's bin packing crashes
            # (int64 += float64) when its largest weighted area stays an int.
            probs = {cell: 1.0 for cell in cells}
            chosen = generator.choice(len(cells), size=len(cells) // 2, replace=False)
            probs.update({cells[int(k)]: float(generator.uniform(0, 1)) for k in chosen})
            if chosen.size:
                probs[cells[int(chosen[0])]] = 0.0
            n_excluded = len(excluded.get((data_idx, sample_idx), ()))
            wanted = reference_formula(spatial, scenario.patch_size, n_excluded, probs.values())
            if math.ceil(wanted) <= 0:
                continue  # the reference would crash (see module docstring)
            ours.set_region_probs(data_idx, sample_idx, probs)
            theirs.set_region_probs(data_idx, sample_idx, probs)
            changed += 1
            corners = selectable_corners(
                spatial, scenario.patch_size, excluded.get((data_idx, sample_idx), ())
            )
            cell_of = (
                tuple(c // p for c, p in zip(corner, scenario.patch_size, strict=True))
                for corner in corners
            )
            if all(probs[cell] == 0 for cell in cell_of):
                massless.add((data_idx, sample_idx))
    assert changed > 0
    counts = per_sample_patches(ours)
    for data_idx, samples in enumerate(theirs.image_patching):
        for sample_idx, sample in enumerate(samples):
            key = (data_idx, sample_idx)
            if key in massless:
                # Every selectable corner has p = 0: docs/design.md gives n = 0; the
                # reference keeps n > 0 but cannot draw (0 / 0 weights).
                assert counts[key] == 0
                continue
            assert counts[key] == sample.n_patches
    # Probabilities leave the grid answers alone.
    ours_included = ours.get_included_grid_coords()
    for key, coords in theirs.get_included_grid_coords().items():
        assert set(ours_included[key]) == set(coords)


def test_dyadic_probabilities_give_exactly_the_reference_n_patches(reference):
    data_shapes, patch = [(2, 1, 40, 36), (1, 1, 21, 17)], (5, 4)
    ours = numpy_sampler(data_shapes, patch, seed=0)
    theirs = reference(data_shapes, patch, seed=0)
    probs = {(0, 0): 0.5, (1, 2): 0.25, (3, 3): 0.0, (2, 5): 1.5, (7, 8): 0.875}
    for sampler in (ours, theirs):
        sampler.exclude_patches(0, 1, [(4, 4), (5, 5)])
        sampler.set_region_probs(0, 1, probs)
        sampler.set_region_probs(1, 0, {(0, 0): 0.125})
    assert ours.n_patches == theirs.n_patches
    for data_idx in range(2):
        assert list(ours.get_patch_indices(data_idx)) == list(theirs.get_patch_indices(data_idx))
